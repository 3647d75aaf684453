"""DePT's head sees the encoders' raw outputs, as the authors' code does.

Koorye/DePT, trainers/elp_coop.py (and trainers/elp_maple.py, the same for MaPLe): `_forward_feats` returns
`text_encoder(prompts)` and `image_encoder(img)` as they come out of the encoders; `_forward_logits_similarity`
normalises its own copies for the cosine logits; `_forward_logits_linear_probe` feeds the unnormalised ones through
`film_lp_text` / `film_lp_img` into `linear_probe_proj`, at training (`[FiLM(text)[labels]; FiLM(img)]`, labels twice)
and at test (`FiLM(img)` alone). The feature cache keeps the norms so that the raw image features can be rebuilt;
every other method keeps seeing the normalised features.
"""
import pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import cocoamix.features as feat_mod
from cocoamix.data import test_transform as _test_transform
from cocoamix.dept import DePT, FiLM
from cocoamix.features import Features, split_features, _feature_path
from cocoamix.maple import encode_image_maple
from cocoamix.method import ParamGroup, train_loop
from cocoamix.registry import make_method, METHODS


def _images(clip, split):
    tf = _test_transform(clip.image_size, clip.mean, clip.std)
    return torch.stack([tf(split.image(i)) for i in range(len(split))])


def _ready(m, names):
    m.prompts.append(m.new_prompt(names)); m.domains.append(list(names)); m.ensure_modules()
    with torch.no_grad():   # FiLMs away from the identity, so that "FiLM of the raw features" is a real check
        for k in ('film_image', 'film_text'):
            m.extra[k].scale.copy_(1 + 0.3 * torch.randn_like(m.extra[k].scale)); m.extra[k].bias.normal_(0, 0.1)
    return m


def _head_inputs(d):
    "Every input of DePT's linear head (linear_probe_proj in the authors' code), in call order."
    seen = []
    hook = d.extra['head'].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen, hook


@pytest.fixture(scope='module')
def small_test(setup):
    clip, base, new, train, cache = setup
    split = base.test.subset(list(range(0, len(base.test), 10)))
    return split, split_features(clip, split, cache_dir=cache, progress=False)


def test_the_cache_keeps_the_norms_and_the_raw_output_comes_back(setup, small_test, tmp_path):
    "Round trip through the file: norms and normalised features, x * norm == the image encoder's raw output."
    clip, *_ = setup
    split, _ = small_test
    raw = clip.encode_images(_images(clip, split), normalize=False)
    n0 = feat_mod.ENCODE_CALLS['n']
    a = split_features(clip, split, cache_dir=tmp_path, progress=False)
    feat_mod.MEMORY.clear()
    b = split_features(clip, split, cache_dir=tmp_path, progress=False)       # read from the file
    assert feat_mod.ENCODE_CALLS['n'] == n0 + 1
    assert torch.equal(a.norms, b.norms) and torch.equal(a.x, b.x) and b.norms.shape == (len(split),)
    assert torch.allclose(b.norms, raw.norm(dim=-1), rtol=1e-6) and torch.allclose(b.raw, raw, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b.norms, torch.ones_like(b.norms), atol=0.1)   # the tiny model's raw features are not unit-norm
    path, meta = _feature_path(tmp_path, clip, split, 'test', 0)
    with safe_open(str(path), framework='pt') as f:   # what an older reader takes from the file is unchanged
        assert set(f.keys()) == {'features', 'norms'} and torch.equal(f.get_tensor('features'), b.x)
    tr = split_features(clip, split, n_views=2, cache_dir=tmp_path, progress=False)
    assert tr.norms.shape == (2, len(split)) and torch.allclose(tr.raw.norm(dim=-1), tr.norms, rtol=1e-5)


def test_a_cache_file_from_before_the_norms_is_encoded_again(setup, small_test, tmp_path):
    clip, *_ = setup
    split, _ = small_test
    a = split_features(clip, split, cache_dir=tmp_path, progress=False)
    path, meta = _feature_path(tmp_path, clip, split, 'test', 0)
    save_file({'features': a.x.contiguous()}, str(path), metadata={**meta, 'complete': '1'})   # the old format: no norms
    assert feat_mod._read(path, meta) is None
    feat_mod.MEMORY.clear()
    n0 = feat_mod.ENCODE_CALLS['n']
    b = split_features(clip, split, cache_dir=tmp_path, progress=False)
    assert feat_mod.ENCODE_CALLS['n'] == n0 + 1 and torch.equal(b.x, a.x) and torch.equal(b.norms, a.norms)
    assert feat_mod._read(path, meta) is not None   # rewritten in place, with the norms


def test_normalised_features_for_every_other_method_are_unchanged(setup, small_test):
    "x is what open_clip's encode_image(normalize=True) gives, and every method but DePT scores it as before."
    clip, base, new, train, cache = setup
    split, test = small_test
    assert torch.equal(test.x, clip.encode_images(_images(clip, split)))            # normalize=True, bit for bit on the CPU
    assert torch.allclose(test.x.norm(dim=-1), torch.ones(len(split)), atol=1e-5)
    assert torch.allclose(train.x.norm(dim=-1), torch.ones(train.x.shape[:2]), atol=1e-5)
    others = [n for n in METHODS if n != 'dept' and not make_method(n, clip).needs_images]
    assert {'zsclip', 'coop', 'kgcoop', 'cocoamix'} <= set(others)
    for name in others: assert torch.equal(make_method(name, clip).eval_features(test, split), test.x), name
    coop, norms = make_method('coop', clip, epochs=1), []
    objective = coop.prompt_objective
    coop.prompt_objective = lambda names: (lambda x, y, f=objective(names): (norms.append(x.norm(dim=-1)), f(x, y))[1])
    coop.fit(train, progress=False)
    assert norms and torch.allclose(torch.cat(norms), torch.ones(sum(len(n) for n in norms)), atol=1e-5)   # CoOp trains on unit-norm features


def test_coop_dept_head_sees_film_of_the_raw_encoder_outputs(setup, small_test):
    "Test time: head(FiLM_img(image encoder output)); training: head([FiLM_text(raw text)[y]; FiLM_img(raw image)])."
    clip, base, new, train, cache = setup
    split, test = small_test
    d = _ready(DePT(clip), base.classnames)
    e = d.extra
    raw = clip.encode_images(_images(clip, split), normalize=False)                # CLIP's image encoder, no normalisation
    seen, hook = _head_inputs(d)
    try:
        with torch.no_grad():
            x = d.eval_features(test, split)
            logits = d.logits(x, base.classnames)
            assert len(seen) == 1 and torch.allclose(seen[0], e['film_image'](raw), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(seen[0], e['film_image'](test.x), atol=1e-2)   # not the normalised ones
            cos = make_method('coop', clip, n_ctx=16, ctx_init='')
            cos.prompts, cos.domains = d.prompts, d.domains
            assert torch.allclose(logits, 0.3 * cos.logits(test.x, base.classnames) + 0.7 * e['head'](e['film_image'](raw)), atol=1e-4)
        # training: the authors' 2B batch on the raw features
        prompt = d.prompts[-1]
        emb, eot = prompt(base.classnames)
        t_raw = clip.encode_text_embeddings(emb, eot, normalize=False)             # the text encoder, no normalisation
        xb, y = train.raw[0][:4], train.labels[:4]
        n_seen = len(seen)
        loss = d.losses(base.classnames)(xb, y)
        assert len(seen) == n_seen + 1 and torch.allclose(seen[-1], torch.cat([e['film_text'](t_raw[y]), e['film_image'](xb)]).detach(), rtol=1e-4, atol=1e-5)
        t = F.normalize(t_raw, dim=-1)
        expected = 0.3 * F.cross_entropy(clip.logit_scale * F.normalize(xb, dim=-1) @ t.T, y) + \
                   0.7 * F.cross_entropy(e['head'](torch.cat([e['film_text'](t_raw[y]), e['film_image'](xb)])), torch.cat([y, y]))
        assert torch.allclose(loss, expected, rtol=1e-5)
        assert not torch.allclose(t_raw.norm(dim=-1), torch.ones(len(t_raw)), atol=0.1)
    finally:
        hook.remove()


def test_coop_dept_fit_feeds_the_raw_cached_batches(setup):
    "In fit, the image half of the head's first batch is FiLM of rows of the cached raw views, the text half their classes'."
    clip, base, new, train, cache = setup
    d = _ready(DePT(clip, epochs=1), base.classnames)
    d.prompts, d.domains = [], []   # fit starts its own prompt; the modules (and their non-identity FiLMs) stay
    torch.manual_seed(d.config.seed)
    t_raw = d.new_prompt(base.classnames).text_features(base.classnames, normalize=False).detach()   # fit's prompt, at init
    with torch.no_grad():
        img = d.extra['film_image'](train.raw.reshape(-1, clip.embed_dim))
        txt = d.extra['film_text'](t_raw)
    labels = train.labels.repeat(train.n_views)
    seen, hook = _head_inputs(d)
    try: d.fit(train, progress=False)
    finally: hook.remove()
    B = d.config.batch_size
    first = seen[0]
    assert first.shape == (2 * B, clip.embed_dim)
    match = torch.cdist(first[B:], img).argmin(dim=1)
    assert torch.allclose(first[B:], img[match], atol=1e-5)                       # raw cached image features, FiLM'd
    assert torch.allclose(first[:B], txt[labels[match]], atol=1e-4)               # raw text features of their labels, FiLM'd


def test_maple_dept_head_sees_film_of_the_raw_prompted_encoder_outputs(setup, small_test):
    "MaPLe+DePT (trainers/elp_maple.py): the prompted image encoder's output before normalisation, in training and at test."
    clip, base, new, train, cache = setup
    split, test = small_test
    d = _ready(DePT(clip, base='maple'), base.classnames)
    e = d.extra
    images = _images(clip, split)[:4]
    with torch.no_grad():
        assert torch.equal(encode_image_maple(clip, images, [], normalize=False), clip.model.encode_image(images, normalize=False))
        raw = encode_image_maple(clip, images, d.vision_prompts(), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4), atol=0.1)
    seen, hook = _head_inputs(d)
    try:
        y = torch.tensor([0, 1, 2, 0])
        d.losses(base.classnames)(images, y)
        t_raw = d.text_features(base.classnames, normalize=False)
        assert torch.allclose(seen[0], torch.cat([e['film_text'](t_raw[y]), e['film_image'](raw)]).detach(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            x = d.eval_features(test, split)
            full = encode_image_maple(clip, _images(clip, split), d.vision_prompts(), normalize=False)
            assert torch.allclose(x, full, rtol=1e-5, atol=1e-5)
            d.logits(x, base.classnames)
            assert torch.allclose(seen[1], e['film_image'](full), rtol=1e-5, atol=1e-5)
    finally:
        hook.remove()


def test_hand_built_features_without_norms_warn(setup):
    clip, base, new, train, cache = setup
    bare = Features(train.x, train.labels, train.classnames)
    with pytest.raises(ValueError, match='no norms'): bare.raw
    with pytest.warns(UserWarning, match='no norms'): DePT(clip, epochs=1).fit(bare, progress=False)


def test_the_head_barely_learns_on_unit_norm_features():
    """Why it matters (the issue's synthetic check): DePT's FiLM + Linear(512, 10), its optimiser (SGD 0.0035 x 6.5,
    momentum 0.9, wd 5e-4, batch 4, 10 epochs, cosine, 1 warm-up epoch at 1e-5; Koorye/DePT vit_b16_ep10_bs4_lr35 and
    OPTIM.LR_EXP 6.5), 16 noisy shots of 10 classes: train CE stays near ln 10 at norm 1 and falls to ~0.02 at norm 10."""
    D, C, shots = 512, 10, 16
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    y = torch.arange(C).repeat_interleave(shots)
    x = F.normalize(centers[y] + 8 * torch.randn(len(y), D, generator=g) / D ** 0.5, dim=-1)
    def train_ce(norm):
        torch.manual_seed(0)
        film, head = FiLM(D), nn.Linear(D, C)
        grp = ParamGroup(list(film.parameters()) + list(head.parameters()), 'sgd', 0.0035 * 6.5, 0.9, 5e-4, 'cosine', 1, 1e-5)
        train_loop(lambda xb, yb: F.cross_entropy(head(film(xb)), yb), [grp], Features(norm * x, y, [str(c) for c in range(C)]),
                   epochs=10, batch_size=4, seed=1, progress=False)
        with torch.no_grad(): return F.cross_entropy(head(film(norm * x)), y).item()
    at_1, at_10 = train_ce(1.0), train_ce(10.0)
    assert at_1 > 1.5 and at_10 < 0.1, (at_1, at_10)
