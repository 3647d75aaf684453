"Backbone and learned-prompt invariants (METHOD.md): exactness, truncation, layouts, frozen encoders, loading routes."
import time
import pytest, torch
from cocoamix.backbone import load_clip, TINY_MODEL, PretrainedUnavailable
from cocoamix.prompts import PromptLearner

CLASSNAMES = ['golden retriever', 'Annual Crop Land', 'airplane', 'Apply Eye Makeup', 'sea or lake',
              'Boeing 737-800', 'pizza', 'banded texture', 'face', 'T-shirt/top']


@pytest.mark.parametrize('model', ['tiny_clip', 'vitb32'])
def test_exactness_invariant(model, request):
    clip = request.getfixturevalue(model)
    learner = PromptLearner(clip, init='a photo of a', position='end')
    with torch.no_grad():
        ours = learner.text_features(CLASSNAMES)
        reference = clip.model.encode_text(clip.tokenize([f'a photo of a {c}.' for c in CLASSNAMES]), normalize=True)
    assert ours.shape == (len(CLASSNAMES), clip.embed_dim)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('model', ['tiny_clip', 'vitb32'])
def test_truncation_invariant_and_shorter_sequence(model, request):
    clip = request.getfixturevalue(model)
    learner = PromptLearner(clip, n_ctx=16)
    lengths = []
    hook = clip.model.transformer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            emb, eot = learner(CLASSNAMES)
            full = clip.encode_text_embeddings(emb, eot, truncate=False)
            cut = clip.encode_text_embeddings(emb, eot, truncate=True)
    finally:
        hook.remove()
    torch.testing.assert_close(cut, full, atol=2e-5, rtol=1e-4)
    assert lengths[0] == clip.context_length == 77
    assert lengths[1] == int(eot.max()) + 1 and lengths[1] < 40  # 16 ctx + longest name + '.' + SOS/EOT


def test_local_weights_file_roundtrip(tmp_path, tiny_clip):
    path = tmp_path / 'tiny.pt'
    torch.save(tiny_clip.model.state_dict(), path)
    other = load_clip(TINY_MODEL, seed=123)  # different random weights
    loaded = load_clip(TINY_MODEL, pretrained=str(path), seed=123)
    texts = ['a photo of a dog.', 'a photo of a cat.']
    images = torch.randn(3, 3, 32, 32)
    assert not torch.allclose(other.encode_text(texts), tiny_clip.encode_text(texts))
    assert torch.equal(loaded.encode_text(texts), tiny_clip.encode_text(texts))
    assert torch.equal(loaded.encode_images(images), tiny_clip.encode_images(images))
    assert loaded.identity.startswith(f'{TINY_MODEL}@tiny.pt-') and tiny_clip.identity == f'{TINY_MODEL}@random'


def test_offline_hub_tag_fails_fast_with_help():
    t = time.time()
    with pytest.raises(PretrainedUnavailable, match=r'pass its path|--pretrained /path'):
        load_clip('ViT-B-32', pretrained='openai')
    assert time.time() - t < 30


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match='unknown open_clip architecture'):
        load_clip('ViT-Z-99')
    with pytest.raises(FileNotFoundError, match='weights file not found'):
        load_clip(TINY_MODEL, pretrained=str(tmp_path / 'missing.pt'))
    with pytest.raises(ValueError, match='unknown pretrained tag'):
        load_clip('ViT-B-32', pretrained='no_such_tag')
    with pytest.raises(TypeError, match='model name must be a string'):
        load_clip(32)


def test_random_weights_are_seeded():
    a, b = load_clip(TINY_MODEL, seed=1), load_clip(TINY_MODEL, seed=1)
    assert torch.equal(a.encode_text(['x']), b.encode_text(['x']))
