"The shared-prefix text pass computes the plain pass's numbers: features and gradients w.r.t. the context."
import copy
import pytest, torch
from cocoamix.prompts import PromptLearner, encode_text_shared_prefix, supports_shared_prefix

NAMES = ['golden retriever', 'Annual Crop Land', 'airplane', 'Apply Eye Makeup', 'T-shirt/top', 'sea lion',
         'a very long class name with many many tokens in it, longer than the others', 'x']


def _feats_and_grad(lp, names, shared, truncate=True, target=None):
    lp.shared_prefix, lp.ctx.grad = shared, None
    t = lp.text_features(names, truncate=truncate)
    target = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) if target is None else target
    (t * target.to(t.device)).sum().backward()
    return t.detach(), lp.ctx.grad.clone()


@pytest.mark.parametrize('init', [None, 'a photo of a'])
def test_shared_prefix_equals_plain_and_full_pass(tiny_clip, init):
    torch.manual_seed(0)
    lp = PromptLearner(tiny_clip, n_ctx=16, init=init)
    assert lp.uses_shared_prefix
    f_shared, g_shared = _feats_and_grad(lp, NAMES, True)
    f_plain, g_plain = _feats_and_grad(lp, NAMES, False)
    f_full, g_full = _feats_and_grad(lp, NAMES, False, truncate=False)
    for f, g in ((f_plain, g_plain), (f_full, g_full)):
        assert torch.allclose(f_shared, f, atol=1e-5)
        assert torch.allclose(g_shared, g, atol=1e-5, rtol=1e-4)


def test_shared_prefix_vitb32(vitb32):
    "The same on ViT-B-32's real-size text tower (12 layers, width 512, 8 heads)."
    torch.manual_seed(0)
    lp = PromptLearner(vitb32, n_ctx=16)
    f_shared, g_shared = _feats_and_grad(lp, NAMES[:5], True)
    f_plain, g_plain = _feats_and_grad(lp, NAMES[:5], False)
    assert torch.allclose(f_shared, f_plain, atol=1e-5)
    assert torch.allclose(g_shared, g_plain, atol=1e-4 * g_plain.abs().max().item())


def test_exactness_invariant_through_shared_prefix(tiny_clip):
    "Context = embeddings of 'a photo of a': the shared pass reproduces open_clip's encode_text of the full text."
    lp = PromptLearner(tiny_clip, init='a photo of a')
    with torch.no_grad():
        ours = lp.text_features(NAMES)
        theirs = tiny_clip.model.encode_text(tiny_clip.tokenize([f'a photo of a {n}.' for n in NAMES]), normalize=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_grad_checkpointing_same_numbers(tiny_clip):
    torch.manual_seed(0)
    lp = PromptLearner(tiny_clip, n_ctx=8)
    f0, g0 = _feats_and_grad(lp, NAMES, True)
    lp.grad_checkpointing = True
    f1, g1 = _feats_and_grad(lp, NAMES, True)
    assert torch.allclose(f0, f1, atol=1e-6) and torch.allclose(g0, g1, atol=1e-6)


def test_automatic_choice_and_fallbacks(tiny_clip):
    assert supports_shared_prefix(tiny_clip)
    assert PromptLearner(tiny_clip, n_ctx=4).uses_shared_prefix
    assert not PromptLearner(tiny_clip, n_ctx=4, shared_prefix=False).uses_shared_prefix
    assert not PromptLearner(tiny_clip, n_ctx=4, position='middle').uses_shared_prefix
    assert not PromptLearner(tiny_clip, n_ctx=4, position='front').uses_shared_prefix
    assert not PromptLearner(tiny_clip, n_ctx=4, csc=True, classnames=NAMES).uses_shared_prefix
    full = PromptLearner(tiny_clip, n_ctx=4, truncate=False)
    assert not full.uses_shared_prefix
    # a text tower the shared pass does not know (here: not batch-first) falls back to the plain pass
    other = copy.deepcopy(tiny_clip)
    other.model.transformer.batch_first = False
    assert not supports_shared_prefix(other)
    lp = PromptLearner(other, n_ctx=4)
    assert not lp.uses_shared_prefix


def test_middle_front_layouts_match_plain_pass(tiny_clip):
    "The vectorised middle/front splice gives the features of the same token sequence built by hand."
    torch.manual_seed(0)
    for position in ('middle', 'front'):
        lp = PromptLearner(tiny_clip, n_ctx=6, position=position)
        emb, eot = lp(NAMES)
        for i, n in enumerate(NAMES[:4]):
            k = len(tiny_clip.tokenizer.encode(n))
            row = lp(['' + n])[0][0]
            assert torch.equal(row, emb[i])
            name_emb = tiny_clip.token_embedding(tiny_clip.tokenize([n]))[0, 1:1 + k]
            start = 1 + (3 if position == 'middle' else 0)
            assert torch.allclose(emb[i, start:start + k], name_emb)


def test_eot_must_be_in_suffix(tiny_clip):
    prefix = torch.zeros(5, tiny_clip.text_width)
    suffix = torch.zeros(2, 72, tiny_clip.text_width)
    with pytest.raises(ValueError, match='suffix'):
        encode_text_shared_prefix(tiny_clip, prefix, suffix, torch.tensor([3, 8]))


def test_many_classes_keep_only_suffix_activations(tiny_clip):
    "1000 classes: the autograd graph holds suffix-length activations, not 77 (nor M + 1 + suffix) positions."
    names = [f'class {i}' for i in range(1000)]
    lp = PromptLearner(tiny_clip, n_ctx=16)
    saved = {}
    for shared in (True, False):
        lp.shared_prefix = shared
        total = [0]
        def pack(t):
            total[0] += t.numel() * t.element_size(); return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp.text_features(names).sum().backward()
        saved[shared] = total[0]
    assert saved[True] < 0.5 * saved[False], saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_shared_prefix_cuda_bf16():
    from cocoamix.backbone import load_clip
    clip = load_clip('ViT-B-16', device='cuda')
    torch.manual_seed(0)
    lp = PromptLearner(clip, n_ctx=16)
    f_s, g_s = _feats_and_grad(lp, NAMES, True)
    f_p, g_p = _feats_and_grad(lp, NAMES, False)
    assert torch.allclose(f_s, f_p, atol=1e-4) and torch.allclose(g_s, g_p, atol=1e-3 * g_p.abs().max().item())
    with torch.autocast('cuda', dtype=torch.bfloat16):
        b_s = lp.text_features(NAMES).float()
    assert (b_s - f_p).norm(dim=-1).max() < 0.05
