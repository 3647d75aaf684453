"The peers (CoCoOp, ProGrad, DAPT, ContCoOp, CAPT): their mechanisms, their formulas, and every method in the base2new and cross_version tables (tiny random model: a pipeline check)."
import json, math, os, subprocess, sys

import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F

from cocoamix.backbone import load_clip, TINY_MODEL, TINY_CONFIG, register_tiny_model
from cocoamix.data import load_dataset, few_shot_splits, base_new_split, train_transform, ImageDataset
from cocoamix.data import test_transform as eval_transform
from cocoamix.features import split_features
from cocoamix.method import TrainImages
from cocoamix.registry import make_method, load_method, METHODS
from cocoamix.coop import prograd_gradient
from cocoamix.dapt import encode_image_prompted, intra_dispersion, inter_dispersion, class_prototypes
from cocoamix.capt import ConfusionBank, hard_negative_loss
from cocoamix.metrics import confusion_summary
PEERS = ['cocoop', 'prograd', 'dapt', 'contcoop', 'capt']
from cocoamix.protocols import run_base2new, run_cross_version, train_data, evaluate, TINY_V2_MODEL
from cocoamix.runner import EXPERIMENTS, METHOD_SETTINGS, expand_grid, run_cell, summarise, collect, markdown_table


def images_of(clip, split, n=6):
    tf = eval_transform(clip.image_size, clip.mean, clip.std)
    return torch.stack([ImageDataset(split, tf)[i][0] for i in range(n)])


# --- DAPT -----------------------------------------------------------------------------------------------------------
def test_dapt_visual_tokens_change_features_and_alone_get_gradients(setup):
    clip, base, *_ = setup
    imgs = images_of(clip, base.train)
    torch.testing.assert_close(encode_image_prompted(clip, imgs), clip.encode_images(imgs))  # no tokens: the frozen encoder
    m = make_method('dapt', clip, epochs=1)
    tokens = m.ensure_modules()['visual_prompts'].tokens
    assert tokens.shape == (16, clip.model.visual.conv1.out_channels)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    f = m.encode(imgs)
    assert not torch.allclose(f, clip.encode_images(imgs), atol=1e-4)
    F.cross_entropy(f @ f.T, torch.arange(len(f))).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    # a real training run moves the tokens and the context, never the encoder
    m = make_method('dapt', clip, epochs=2, lr=0.01)
    m.fit(TrainImages(base.train, train_transform(clip.image_size, clip.mean, clip.std)), base.classnames, progress=False)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    assert m.needs_images and len(m.history['prompt']) == 2
    with pytest.raises(TypeError, match='image encoder in the loop'):
        make_method('dapt', clip).fit(setup[3], base.classnames, progress=False)


def test_dapt_dispersion_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    expected = sum(math.exp(-2.0 * float((text[i] - text[j]).pow(2).sum())) for i, j in pairs) / len(pairs)
    assert inter_dispersion(text, t=2.0).item() == pytest.approx(expected, rel=1e-5)
    f, p = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    assert intra_dispersion(f, p).item() == pytest.approx(float(((f - p) ** 2).sum(1).mean() / 16), rel=1e-5)
    feats, labels = torch.randn(6, 16, generator=g), torch.tensor([0, 0, 1, 1, 2, 2])  # one feature per image (DAPT's one crop per shot)
    protos = class_prototypes(feats, labels, 3)
    torch.testing.assert_close(protos[1], F.normalize(feats, dim=-1)[2:4].mean(0))


# --- ContCoOp -------------------------------------------------------------------------------------------------------
def test_contcoop_context_is_per_class_and_attention_learns(setup):
    clip, base, new, train, _ = setup
    m = make_method('contcoop', clip, epochs=2).fit(train, base.classnames, progress=False)
    ctx = m.class_contexts(base.classnames)
    assert ctx.shape == (5, 4, clip.text_width)
    assert all(not torch.allclose(ctx[i], ctx[j]) for i in range(5) for j in range(i + 1, 5))
    attn = m.extra['conditioner'].attn
    w0 = attn.in_proj_weight.detach().clone()
    m.extra.zero_grad()
    F.cross_entropy(m.scale() * train.view(0) @ m.text_features(base.classnames).T, train.labels).backward()
    assert attn.in_proj_weight.grad.abs().sum() > 0 and attn.out_proj.weight.grad.abs().sum() > 0
    m2 = make_method('contcoop', clip, epochs=3).fit(train, base.classnames, progress=False)
    assert not torch.equal(m2.extra['conditioner'].attn.in_proj_weight, make_method('contcoop', clip).ensure_modules()['conditioner'].attn.in_proj_weight)


# --- CAPT -----------------------------------------------------------------------------------------------------------
def test_capt_bank_finds_the_planted_pair_and_the_term_vanishes_without_one():
    labels = torch.arange(6).repeat_interleave(10)
    bank = ConfusionBank(6, window=2, min_rate=0.2)
    for r in range(3):
        p = labels.clone()
        p[20:24] = 4                                    # planted: class 2 -> 4, the same 4 images, every round
        noisy = torch.tensor([31, 45, 52]) + r          # a few one-off errors that move from round to round
        p[noisy] = (labels[noisy] + 1 + r) % 6
        bank.update(p, labels)
    assert [(a, b) for a, b, _ in bank.stable_pairs()] == [(2, 4)]
    assert bank.misclassified(2, 4) == [20, 21, 22, 23]
    hard = bank.hard_negatives(3)
    assert hard.sum() == 1 and hard[2, 4]
    logits = torch.randn(60, 6, requires_grad=True)
    none = hard_negative_loss(logits, labels, torch.zeros(6, 6, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward(); assert logits.grad.abs().sum() == 0
    some = hard_negative_loss(logits, labels, hard)
    rows = labels == 2
    expected = F.cross_entropy(logits[rows][:, [2, 4]], torch.zeros(10, dtype=torch.long), reduction='sum') / 60
    assert some.item() == pytest.approx(expected.item(), rel=1e-5)


def test_capt_trains_with_its_bank(setup):
    clip, base, new, train, _ = setup
    m = make_method('capt', clip, epochs=3).fit(train, base.classnames, progress=False)
    assert len(m.bank.rates) == 3 and len(m.history['bank_stable_pairs']) == 3  # zero-shot round + one per later epoch


# --- ProGrad --------------------------------------------------------------------------------------------------------
def test_prograd_rule():
    g_g = torch.tensor([2.0, 0.0, 1.0])
    agree = torch.tensor([1.0, 1.0, 1.0])
    assert torch.equal(prograd_gradient(agree, g_g), agree)
    conflict = torch.tensor([-3.0, 1.0, 0.5])
    expected = conflict - (conflict @ g_g) / (g_g @ g_g) * g_g
    torch.testing.assert_close(prograd_gradient(conflict, g_g), expected)
    assert abs(float(prograd_gradient(conflict, g_g) @ g_g)) < 1e-6  # nothing left against G_g


def test_prograd_step_sets_the_projected_gradient(setup):
    clip, base, new, train, _ = setup
    m = make_method('prograd', clip, epochs=1).fit(train, base.classnames, progress=False)
    ctx = m.prompts[-1].ctx
    seen = {'conflict': False, 'agree': False}
    x_all = train.x.reshape(-1, train.x.shape[-1])
    y_all = train.labels.repeat(train.n_views)
    for start in range(0, len(y_all), 4):
        x, y = x_all[start:start + 4], y_all[start:start + 4]
        l_ce, l_kl = m.losses(base.classnames)(x, y)
        g_d = torch.autograd.grad(l_ce, ctx, retain_graph=True)[0].flatten()
        g_g = torch.autograd.grad(l_kl, ctx)[0].flatten()
        m.backward_fn(base.classnames)(x, y)
        if g_d @ g_g < 0:
            seen['conflict'] = True
            torch.testing.assert_close(ctx.grad.flatten(), g_d - (g_d @ g_g) / (g_g @ g_g) * g_g)
        else:
            seen['agree'] = True
            torch.testing.assert_close(ctx.grad.flatten(), g_d)
    assert seen['conflict'] or seen['agree']


# --- CoCoOp ---------------------------------------------------------------------------------------------------------
def test_cocoop_context_depends_on_the_image(setup):
    clip, base, new, train, _ = setup
    m = make_method('cocoop', clip, epochs=1).fit(train, base.classnames, progress=False)
    net = m.extra['meta_net']
    assert (net.linear1.in_features, net.linear1.out_features, net.linear2.out_features) == (clip.embed_dim, clip.embed_dim // 16, clip.text_width)
    x = F.normalize(torch.randn(8, clip.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    ctx = m.conditional_context(x)
    expected = m.prompts[-1].ctx + net(x).unsqueeze(1)  # the same shift on every context token
    torch.testing.assert_close(ctx, expected)
    assert (ctx - ctx[:1]).abs().amax() > 1e-4
    text = m.conditional_text_features(x, base.classnames)
    assert (text - text[:1]).abs().amax() > 1e-4
    # image i's logits use image i's prompt: equal to a per-image pass
    prompt_i = torch.cat([m.prompts[-1](base.classnames)[0][:, :1], ctx[3].expand(5, -1, -1), m.prompts[-1](base.classnames)[0][:, 5:]], 1)
    t3 = clip.encode_text_embeddings(prompt_i, m.prompts[-1](base.classnames)[1])
    torch.testing.assert_close(text[3], t3, atol=1e-5, rtol=1e-4)


# --- every peer: interface, save/load, cross-version ---------------------------------------------------------------
@pytest.mark.parametrize('name', list(PEERS))
def test_every_peer_fits_and_round_trips(name, setup, tmp_path):
    clip, base, new, train, cache = setup
    feats = lambda split, v=0: split_features(clip, split, n_views=v, cache_dir=cache, progress=False)
    m = make_method(name, clip, epochs=2)
    assert METHODS[name] is type(m)
    m.fit(train_data(m, clip, base.train, feats, 2), base.classnames, progress=False)
    again = load_method(m.save(tmp_path / 's.safetensors'), clip)
    assert again.config == m.config and set(again.extra.state_dict()) == set(m.extra.state_dict())
    x = m.eval_features(feats(new.test), new.test)
    torch.testing.assert_close(again.logits(x, new.classnames), m.logits(x, new.classnames))


def test_cross_version_moves_the_state_to_the_other_clip(setup, tmp_path):
    cache = setup[4]
    r = run_cross_version(method='contcoop', epochs=1, n_views=1, cache_dir=cache, out_dir=tmp_path, progress=False)
    assert r['source_model'] == 'cocoamix-tiny@random' and r['target_model'] == f'{TINY_V2_MODEL}@random-seed1'
    assert (tmp_path / 'state.safetensors').exists() and r['target_zs'] != r['source_zs']
    with pytest.raises(ValueError, match='same CLIP'):
        run_cross_version(method='coop', target_model=TINY_MODEL, target_seed=0, epochs=1, cache_dir=cache, progress=False)
    narrow = register_tiny_model('cocoamix-tiny-w32', {**TINY_CONFIG, 'text_cfg': {**TINY_CONFIG['text_cfg'], 'width': 32}})
    with pytest.raises(ValueError, match='same text width'):
        run_cross_version(method='coop', target_model=narrow, epochs=1, cache_dir=cache, progress=False)


# --- the tables: every method a row -------------------------------------------------------------------------------
@pytest.mark.parametrize('experiment', ['base2new', 'cross_dataset', 'cross_version'])
def test_every_method_is_a_row_of_the_table(experiment, setup, tmp_path):
    "The runner's grid with all methods, each cell run in this process (papermill is exercised in test_runner and below)."
    cache = setup[4]
    cells = expand_grid(experiment, tmp_path, settings=['all'], seeds=[1], params={'epochs': 1, 'n_views': 1, 'cache_dir': str(cache)})
    assert [c.setting for c in cells] == list(METHOD_SETTINGS) and len(cells) == 12 and {'maple', 'dept', 'dept (maple)'} <= set(METHOD_SETTINGS)
    for c in cells: run_cell(experiment, c.params, c.out_dir, progress=False)
    exp = EXPERIMENTS[experiment]
    table = summarise(exp, collect(cells))
    assert list(table['setting']) == list(METHOD_SETTINGS) and 'resolved_mean' in table.columns
    md = markdown_table(exp, table, True, cells[0].params)
    header = next(l for l in md.splitlines() if l.startswith('| dataset |'))
    assert all(f'| {s} |' in md for s in METHOD_SETTINGS) and ' resolved |' in header
    metrics = json.loads(cells[-1].metrics_path.read_text())['metrics']
    key = {'base2new': 'confusion_base', 'cross_dataset': 'confusion_source', 'cross_version': 'confusion_target'}[experiment]
    assert set(metrics[key]) == {'classes', 'names', 'before', 'after', 'pairs'}


def test_cross_version_notebook_runs_through_papermill(tmp_path, setup):
    r = subprocess.run([sys.executable, '-m', 'cocoamix', 'run', 'cross_version', '--methods', 'contcoop', '--seeds', '1',
                        '--epochs', '1', '--param', 'n_views=1', '--out', str(tmp_path), '--cache-dir', str(setup[4]), '--quiet'],
                       capture_output=True, text=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stdout + r.stderr
    table = pd.read_csv(tmp_path / 'cross_version' / 'table.csv')
    assert list(table['setting']) == ['contcoop [epochs=1 n_views=1]'] and {'target_mean', 'target_zs_mean', 'gain_target_mean', 'resolved_mean'} <= set(table.columns)
    rec = json.loads(next((tmp_path / 'cross_version').rglob('metrics.json')).read_text())
    assert rec['params']['target_model'] == TINY_V2_MODEL and rec['metrics']['target_model'].startswith(TINY_V2_MODEL)


def test_confusion_summary_counts():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    zs = np.array([1, 1, 0, 1, 2, 2, 0, 2])
    after = np.array([0, 1, 0, 1, 1, 2, 2, 2])
    s = confusion_summary(zs, after, labels, ['a', 'b', 'c'], k=2)
    assert s['pairs'][0] == {'true': 'a', 'pred': 'b', 'before': 2, 'after': 1}
    assert s['names'][:2] == ['a', 'b'] and s['before'][0][1] == 2 and s['after'][0][1] == 1
