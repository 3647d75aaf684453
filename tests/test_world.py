"The committed world model (issue 16's behaviour checks): it loads offline with its frozen hash, zero-shot is far above chance, CoOp adapts."
import pytest, torch
from cocoamix.world import world_dataset
from cocoamix.worldclip import load_world_clip, weights_hash, world_weights, WORLD_WEIGHTS, WORLD_WEIGHTS_SHA
from cocoamix.data import few_shot_splits, base_new_split, load_dataset
from cocoamix.features import split_features
from cocoamix.registry import make_method
from cocoamix.coop import ZeroShotCLIP


@pytest.fixture(scope='module')
def clip():
    return load_world_clip(world_weights())


def _acc(logits, y): return float((logits.argmax(-1) == y).float().mean() * 100)


def test_loads_offline_with_its_frozen_hash(clip):
    assert weights_hash(WORLD_WEIGHTS) == WORLD_WEIGHTS_SHA and clip.context_length == 32 and 30 < clip.logit_scale <= 100


@pytest.mark.parametrize('key', ['world_glyphs', 'world_orbital'])
def test_zero_shot_far_above_chance(clip, key, tmp_path):
    ds = load_dataset(key)                                  # registered by cocoamix.world, rendered on demand
    te = split_features(clip, ds.test, cache_dir=tmp_path, progress=False)
    assert _acc(ZeroShotCLIP(clip, template=ds.template).logits(te.x, ds.classnames), te.labels) >= 100 / 30 + 25


def test_coop_adapts(clip, tmp_path):
    "CoOp as its authors train it (16 shots, 200 epochs, SGD 0.002, batch 32) raises base accuracy above zero-shot."
    ds = world_dataset('world_dishes')
    base, _ = base_new_split(few_shot_splits(ds, 16, 1))
    tr = split_features(clip, base.train, n_views=2, cache_dir=tmp_path, progress=False)
    tb = split_features(clip, base.test, cache_dir=tmp_path, progress=False)
    m = make_method('coop', clip, 'world_dishes', 16, template=ds.template).fit(tr, base.classnames, progress=False)   # 200 epochs
    zs = _acc(ZeroShotCLIP(clip, template=ds.template).logits(tb.x, base.classnames), tb.labels)
    assert _acc(m.logits(tb.x, base.classnames), tb.labels) > zs + 3


def test_the_world_is_the_offline_default(tmp_path, monkeypatch):
    from cocoamix.runner import expand_grid, run_grid, WORLD_DOWNSTREAM
    monkeypatch.delenv('COCOAMIX_OFFLINE', raising=False)
    cells = expand_grid('base2new', tmp_path, settings=['zsclip'])
    assert [c.dataset for c in cells][::3] == WORLD_DOWNSTREAM and {c.params['pretrained'] for c in cells} == {'world'}
    assert expand_grid('base2new', tmp_path, settings=['zsclip'], params={'model': 'cocoamix-tiny'})[0].dataset == 'fashion_mnist'
    s = run_grid('base2new', tmp_path, datasets=['world_orbital'], settings=['zsclip'], seeds=[1], progress=False)
    assert not s.failed and s.table['weights'].iloc[0].startswith('world model world-v1 (cb3ece7a8ab98223)')
    md = (tmp_path / 'base2new' / 'table.md').read_text()
    assert "World model: not the paper's numbers" in md and 'Pipeline check' not in md
    rec = __import__('json').loads(next(tmp_path.rglob('metrics.json')).read_text())
    assert rec['world'] == {'world_version': 'world-v1', 'weights_sha256_16': 'cb3ece7a8ab98223'}


def test_pretraining_is_deterministic_for_a_seed():
    "Two pretraining runs in separate processes (one thread each, as `make world`) end on the same weights, bit for bit."
    import subprocess, sys
    code = ("import hashlib, torch; torch.set_num_threads(1)\n"
            "from cocoamix.worldclip import pretrain\n"
            "r = pretrain(steps=3, batch_size=32, warmup=1, seed=0, eval_every=0, progress=False)\n"
            "print(hashlib.sha256(b''.join(t.detach().cpu().numpy().tobytes() for t in r['model'].state_dict().values())).hexdigest())")
    runs = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()[-1] for _ in range(2)]
    assert len(runs[0]) == 64 and runs[0] == runs[1]
