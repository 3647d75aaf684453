"End to end on real small data (Fashion-MNIST, tiny random-weight model): every method trains, state round-trips, the cache is reused."
import pytest, torch
from cocoamix.backbone import load_clip, TINY_MODEL
from cocoamix.data import load_dataset, few_shot_splits, base_new_split
from cocoamix.features import split_features
from cocoamix.registry import make_method, load_method, METHODS
from cocoamix.cocoamix import CoCoAMixConfig
from cocoamix.mixture import in_domain_mask


SETTINGS = [('coop', {}), ('kgcoop', {'lr': 1e-4}), ('cocoamix', {}), ('cocoamix', {'stages': 1}),
            ('cocoamix', {'loss': 'focal', 'mixing': 'naive'}), ('cocoamix', {'loss': 'ce', 'out_classes': 'strings'})]


@pytest.mark.parametrize('name,kw', SETTINGS)
def test_every_method_trains_and_round_trips(name, kw, setup, tmp_path):
    clip, base, new, train, cache = setup
    m = make_method(name, clip, epochs=6, **kw).fit(train, base.classnames, progress=False)
    for key, h in m.history.items():
        assert len(h) >= 5 and h[-1] < h[0], (key, h)
    test_new = split_features(clip, new.test, cache_dir=cache, progress=False)
    path = m.save(tmp_path / 'state.safetensors')
    again = load_method(path, clip)
    assert again.config == m.config and again.domains == m.domains
    for classes, feats in [(base.classnames, train.view(0)), (new.classnames, test_new.x)]:  # any class list
        a, b = m.logits(feats, classes), again.logits(feats, classes)
        assert a.shape == (len(feats), len(classes)) and torch.equal(a, b)


def test_only_learned_state_changes(setup):
    clip, base, new, train, cache = setup
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    m = make_method('cocoamix', clip, epochs=2).fit(train, base.classnames, progress=False)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert sum(p.numel() for p in m.prompts[0].parameters()) == 16 * clip.text_width


def test_second_run_reads_the_cache_without_encoding(setup, monkeypatch):
    clip, base, new, train, cache = setup
    def no_encoder(*a, **k): raise AssertionError('the image encoder was called: the cache was not used')
    monkeypatch.setattr(type(clip), 'encode_images', no_encoder)
    again = split_features(clip, base.train, n_views=2, cache_dir=cache, progress=False)
    assert torch.equal(again.x, train.x)


def test_zero_shot_is_the_handcrafted_prompt(setup):
    clip, base, new, train, cache = setup
    m = make_method('zsclip', clip, template='a photo of a {}.').fit(train)
    text = clip.encode_text([f'a photo of a {c}.' for c in base.classnames])
    x = train.view(0)
    torch.testing.assert_close(m.logits(x, base.classnames), clip.logit_scale * x @ text.T)


def test_cocoamix_mixes_in_and_out_domain_weights(setup):
    "New classes are out-classes of the learned prompt: their logits mix with pi_out, base classes with pi_in."
    clip, base, new, train, cache = setup
    m = make_method('cocoamix', clip, epochs=2).fit(train, base.classnames, progress=False)
    x = train.view(0)
    classes = base.classnames + new.classnames
    per_prompt = m.prompt_logits(x, classes)
    a_in, a_out = m.weights.a_in.detach(), m.weights.a_out.detach()
    pi_base = torch.stack([a_out[0], a_in[1]]).softmax(0)  # t_0 is always out of its (empty) domain
    pi_new = a_out.softmax(0)
    expected = torch.cat([(pi_base[:, None, None] * per_prompt[:, :, :5]).sum(0), (pi_new[:, None, None] * per_prompt[:, :, 5:]).sum(0)], 1)
    torch.testing.assert_close(m.logits(x, classes), expected)
    mask = in_domain_mask([set(), set(base.classnames)], classes)
    assert mask[1, :5].all() and not mask[1, 5:].any() and not mask[0].any()


def test_config_errors_name_the_problem(setup):
    clip = setup[0]
    with pytest.raises(ValueError, match="unknown method 'cocoa'"):
        make_method('cocoa', clip)
    with pytest.raises(TypeError, match='unknown parameter'):
        make_method('coop', clip, epoch=3)
    with pytest.raises(TypeError, match='w must be float'):
        make_method('cocoamix', clip, w='high')
    with pytest.raises(ValueError, match='mixing must be one of'):
        CoCoAMixConfig(mixing='soft')


def test_stage_two_runs_no_encoder(setup, monkeypatch):
    "Two-stage CoCoA-Mix fits its weights on similarities computed once: no text or image pass inside stage 2."
    import cocoamix.cocoamix as methods
    clip, base, new, train, cache = setup
    calls = {'text': 0, 'in_stage2': False}
    real_text, real_fit = type(clip).encode_text_embeddings, methods.fit_coa_weights
    def counting_text(self, *a, **k):
        if calls['in_stage2']: calls['text'] += 1
        return real_text(self, *a, **k)
    def fit(*a, **k):
        calls['in_stage2'] = True
        try: return real_fit(*a, **k)
        finally: calls['in_stage2'] = False
    monkeypatch.setattr(type(clip), 'encode_text_embeddings', counting_text)
    monkeypatch.setattr(type(clip), 'encode_images', lambda *a, **k: (_ for _ in ()).throw(AssertionError('image pass')))
    monkeypatch.setattr(methods, 'fit_coa_weights', fit)
    m = make_method('cocoamix', clip, epochs=1, weights_epochs=20).fit(train, base.classnames, progress=False)
    assert len(m.history['weights']) == 20 and calls['text'] == 0
