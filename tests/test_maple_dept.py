"MaPLe and DePT: the hooks see the layers they claim to, the zero-shot identity, gradients, DePT's base/new rule, save/load."
import subprocess, sys

import pytest, torch
import torch.nn.functional as F

from cocoamix.maple import MaPLe, encode_image_maple, prompt_layers
from cocoamix.dept import DePT
from cocoamix.coop import CoOp, ZeroShotCLIP
from cocoamix.registry import load_method, make_method

NAMES = ['cat', 'dog', 'sea lion', 'red panda', 'tree frog']

def _ready(m, names=NAMES):
    m.prompts.append(m.new_prompt(names)); m.domains.append(list(names)); m.ensure_modules()
    return m

def _record_block_inputs(blocks):
    "The input of every block's first LayerNorm (what the block computes on), in call order."
    seen, hooks = [], [b.ln_1.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0].detach().clone())))
                       for i, b in enumerate(blocks)]
    return seen, hooks

@pytest.mark.parametrize('shared_prefix', [True, False])
def test_deep_text_prompts_enter_exactly_layers_1_to_J_minus_1(vitb32, shared_prefix):
    m = _ready(MaPLe(vitb32, depth=3))
    m.prompts[-1].shared_prefix = shared_prefix
    deep = m.deep_text_prompts()
    assert deep.shape == (2, 2, vitb32.text_width)
    seen, hooks = _record_block_inputs(vitb32.model.transformer.resblocks)
    try:
        with torch.no_grad(): m.text_features(NAMES)
    finally:
        for h in hooks: h.remove()
    assert [i for i, _ in seen] == list(range(12))           # every layer ran, once, in order
    for i, x in seen:
        tokens = x[1:3] if shared_prefix else x[:, 1:3]      # packed: the shared prefix rows come first
        if i in (1, 2): assert torch.equal(tokens, (deep[i - 1] if shared_prefix else deep[i - 1].expand_as(tokens)).to(tokens.dtype))
        else: assert not torch.allclose(tokens, (deep[-1] if shared_prefix else deep[-1].expand_as(tokens)), atol=1e-3)

def test_vision_prompts_enter_layer_0_before_ln_pre_and_replace_the_last_tokens_up_to_J(vitb32):
    m = _ready(MaPLe(vitb32, depth=3))
    v = vitb32.model.visual
    vp = [p.detach() for p in m.vision_prompts()]
    assert len(vp) == 3 and all(p.shape == (2, v.conv1.out_channels) for p in vp)
    seen, hooks = _record_block_inputs(v.transformer.resblocks)
    images = torch.randn(2, 3, 224, 224)
    try:
        with torch.no_grad(): m.encode(images)
    finally:
        for h in hooks: h.remove()
    assert [i for i, _ in seen] == list(range(12))
    n_tokens = 1 + (224 // 32) ** 2 + 2
    assert all(x.shape[1] == n_tokens for _, x in seen)      # the 2 prompt tokens ride along through every layer
    with torch.no_grad(): assert torch.allclose(seen[0][1][:, -2:], v.ln_pre(vp[0]).expand(2, -1, -1), atol=1e-5)
    for i, x in seen[1:]:
        if i in (1, 2): assert torch.equal(x[:, -2:], vp[i].expand(2, -1, -1))
        else: assert not torch.allclose(x[:, -2:], vp[2].expand(2, -1, -1), atol=1e-3)

def test_plain_encoder_bit_for_bit_and_prompts_change_the_feature_with_gradients_through_the_coupling(vitb32):
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad(): assert torch.equal(encode_image_maple(vitb32, images), vitb32.model.encode_image(images, normalize=True))
    m = _ready(MaPLe(vitb32, depth=3))
    f = m.encode(images)
    assert not torch.allclose(f.detach(), vitb32.model.encode_image(images, normalize=True), atol=1e-4)
    f.sum().backward()
    couplings = m.extra['couplings']
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in couplings.parameters())
    assert m.prompts[-1].ctx.grad.abs().sum() > 0 and m.extra['deep_text'].prompts.grad.abs().sum() > 0

@pytest.mark.parametrize('shared_prefix', [True, False])
def test_depth_1_with_context_a_photo_is_zero_shot_clip(tiny_clip, shared_prefix):
    m = _ready(MaPLe(tiny_clip, depth=1))
    m.prompts[-1].shared_prefix = shared_prefix
    assert m.deep_text_prompts() is None
    t0 = ZeroShotCLIP(tiny_clip).handcrafted_features(NAMES)    # "a photo of a {}."
    with torch.no_grad(): t = m.text_features(NAMES)
    if shared_prefix: assert torch.allclose(t, t0, atol=1e-6)    # two-piece attention: float rounding only
    else: assert torch.equal(t, t0)

def test_depth_is_capped_by_the_shallower_encoder(tiny_clip, vitb32):
    capped = _ready(make_method('maple', tiny_clip))
    assert prompt_layers(tiny_clip) == 2 and capped.effective_depth == 2 == capped.config.depth and 'capped at the 2 layers' in capped.config_sources['depth']
    assert _ready(MaPLe(vitb32)).effective_depth == 9 and len(_ready(MaPLe(vitb32)).extra['couplings']) == 9
    deeper = _ready(MaPLe(vitb32, depth=4)).extra['couplings']
    assert torch.equal(deeper[1].weight, deeper[3].weight) and not torch.equal(deeper[0].weight, deeper[1].weight)  # the authors' clones

def test_maple_protocol_defaults():
    from cocoamix.registry import resolve_config
    b2n, _ = resolve_config('maple', 'world_flora', 4, protocol='base2new')
    xd, src = resolve_config('maple', 'world_imagenet', 4, protocol='transfer')
    assert (b2n.depth, b2n.lr, b2n.epochs, b2n.batch_size, b2n.n_ctx) == (9, 0.0035, 5, 4, 2)
    assert (xd.depth, xd.lr, xd.epochs) == (3, 0.0026, 2) and src['depth'].startswith('peer (world_imagenet, 4 shots, transfer')

def test_dept_cosine_branch_is_the_base_method_and_the_base_new_rule(setup):
    clip, base, new, train, _ = setup
    d = _ready(DePT(clip), base.classnames)
    coop = _ready(CoOp(clip, n_ctx=16, ctx_init=''), base.classnames)
    coop.prompts[-1].ctx.data.copy_(d.prompts[-1].ctx.data)
    x = F.normalize(torch.randn(7, clip.embed_dim), dim=-1)
    with torch.no_grad():
        for names in (base.classnames, new.classnames):
            assert torch.allclose(MaPLe.logits(d, x, names), coop.logits(x, names), atol=1e-6)
        assert torch.equal(d.extra['film_image'](x), x) and torch.equal(d.extra['film_text'](x), x)
        cos, head = coop.logits(x, base.classnames), d.extra['head'](x)
        assert torch.allclose(d.logits(x, base.classnames), 0.3 * cos + 0.7 * head, atol=1e-6)   # base: fused
        assert torch.allclose(d.logits(x, new.classnames), coop.logits(x, new.classnames), atol=1e-6)  # new: cosine only
        assert torch.allclose(d.logits(x, base.classnames[2:4]), 0.3 * coop.logits(x, base.classnames[2:4]) + 0.7 * head[:, 2:4], atol=1e-6)

def test_dept_training_batch_and_learning_rates(setup):
    clip, base, new, train, _ = setup
    d = DePT(clip, epochs=1)
    seen = {}
    orig = d.optimise
    def spy(loss_fn, groups, data, progress=True, desc=None, **hooks):
        seen['lrs'] = [g.lr for g in groups]
        seen['sizes'] = [sum(p.numel() for p in g.params) for g in groups]
        x, y = data.view(0)[:4], data.labels[:4]
        assert torch.equal(x, train.raw[0][:4])   # the batches carry the raw cached features (Koorye/DePT trainers/elp_coop.py)
        e = d.extra
        t = d.text_features(base.classnames, normalize=False)   # raw text features into the head, normalised for the cosine
        expected = 0.3 * F.cross_entropy(d.scale() * F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T, y) + 0.7 * F.cross_entropy(
            e['head'](torch.cat([e['film_text'](t[y]), e['film_image'](x)])), torch.cat([y, y]))
        assert torch.allclose(loss_fn(x, y), expected)
        return orig(loss_fn, groups, data, progress, desc, **hooks)
    d.optimise = spy
    d.fit(train, progress=False)
    assert seen['lrs'] == [pytest.approx(0.0035), pytest.approx(0.0035 * 6.5)]
    D, C = clip.embed_dim, len(base.classnames)
    assert seen['sizes'] == [16 * clip.text_width, 4 * D + D * C + C]

@pytest.mark.parametrize('name,config', [('maple', {}), ('dept', {}), ('dept', {'base': 'maple'})])
def test_save_and_load_give_the_same_logits(setup, tmp_path, name, config):
    clip, base, new, train, _ = setup
    m = _ready(make_method(name, clip, **config), base.classnames)
    with torch.no_grad():
        for p in m.extra.parameters(): p.add_(0.01 * torch.randn_like(p))
    x = F.normalize(torch.randn(5, clip.embed_dim), dim=-1)
    back = load_method(m.save(tmp_path/f'{name}.safetensors'), clip)
    assert type(back) is type(m) and back.config == m.config
    with torch.no_grad():
        for names in (base.classnames, new.classnames): assert torch.equal(back.logits(x, names), m.logits(x, names))
    if m.needs_images:
        images = torch.randn(2, 3, clip.image_size, clip.image_size)
        with torch.no_grad(): assert torch.equal(back.encode(images), m.encode(images))

def test_run_list_and_default_rows_have_the_paper_rows():
    out = subprocess.run([sys.executable, '-m', 'cocoamix', 'run', '--list'], capture_output=True, text=True, check=True).stdout
    assert 'maple' in out and 'dept' in out
    from cocoamix.runner import EXPERIMENTS, PAPER_ROWS
    assert PAPER_ROWS == ['zsclip', 'coop', 'prograd', 'kgcoop', 'maple', 'dept', 'cocoamix']
    for e in ('base2new', 'cross_dataset', 'domain_generalization'): assert EXPERIMENTS[e].default_settings == PAPER_ROWS

@pytest.mark.parametrize('method,config', [('maple', {}), ('dept', {}), ('dept', {'base': 'maple'})])
def test_base2new_cell_end_to_end(tmp_path, method, config):
    from cocoamix.protocols import run_base2new
    r = run_base2new('fashion_mnist', method, 1, 2, n_views=1, cache_dir=tmp_path, progress=False, epoch_scale=0.2, **config)
    assert 0 <= r['base'] <= 100 and 0 <= r['new'] <= 100 and r['method_config_resolved']['method'] == method
