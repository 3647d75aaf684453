"""The world as a public artifact (issue 24): `data/world/` loads in plain open_clip as `local-dir:` and predicts what
cocoamix's zero-shot CLIP predicts; `cocoamix world export` writes every format so that cocoamix's own readers give back
the rendered pixels, labels and class names; the README section "Using the world elsewhere" runs as written."""
import importlib.util, json, os, re, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from cocoamix.world import world_dataset
from cocoamix.worldclip import export_world, read_wds, EXPORT_FORMATS, WORLD_CONFIG

REPO = Path(__file__).resolve().parents[1]
KEY = 'world_flora'   # the README's dataset


def readme_blocks() -> list[tuple[str, str]]:
    "(language, code) of every fenced block of the README section 'Using the world elsewhere', in order."
    text = (REPO / 'README.md').read_text()
    start = text.index('\n## Using the world elsewhere\n')
    end = text.find('\n## ', start + 1)
    section = text[start:end if end > 0 else None]
    return re.findall(r'```(\w*)\n(.*?)```', section, flags=re.S)


def block(lang: str, needle: str) -> str:
    found = [code for l, code in readme_blocks() if l == lang and needle in code]
    assert len(found) == 1, f'the README section has {len(found)} {lang} blocks with {needle!r}'
    return found[0]


def env() -> dict:
    return {**os.environ, 'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}',
            'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}


def run(args, cwd, **kw):
    return subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope='module')
def readme_dir(tmp_path_factory):
    "A working folder where the README's paths hold (data/ is the repository's), after its export commands ran as written."
    d = tmp_path_factory.mktemp('readme')
    (d / 'data').symlink_to(REPO / 'data')
    r = run(['bash', '-e', '-c', block('bash', 'cocoamix world export')], d)
    assert r.returncode == 0, r.stderr
    assert all((d / 'exports' / fmt / KEY / 'world.json').is_file() for fmt in EXPORT_FORMATS)
    return d


@pytest.fixture(scope='module')
def cocoamix_zero_shot(tmp_path_factory):
    "cocoamix's own zero-shot CLIP predictions on the world_flora test split (the committed world model)."
    from cocoamix.protocols import get_clip
    from cocoamix.features import split_features
    from cocoamix.coop import ZeroShotCLIP
    ds = world_dataset(KEY)
    clip = get_clip('cocoamix-world', 'world', 'cpu')
    x = split_features(clip, ds.test, cache_dir=tmp_path_factory.mktemp('features'), progress=False)
    return ZeroShotCLIP(clip, template=ds.template).logits(x.x, ds.classnames).argmax(-1).numpy()


def test_open_clip_config_is_the_world_architecture():
    cfg = json.loads((REPO / 'data' / 'world' / 'open_clip_config.json').read_text())
    assert cfg['model_cfg'] == WORLD_CONFIG and cfg['preprocess_cfg']['size'] == WORLD_CONFIG['vision_cfg']['image_size']
    assert sorted(p.name for p in (REPO / 'data' / 'world').glob('*.safetensors')) == ['world_model.safetensors']  # not duplicated


def test_plain_open_clip_predicts_what_cocoamix_predicts(readme_dir, cocoamix_zero_shot):
    "The README's two open_clip snippets, as written, in one process without cocoamix: cocoamix's predictions, image by image."
    check = """
import sys
assert not any(m == 'cocoamix' or m.startswith('cocoamix.') for m in sys.modules), 'cocoamix was imported'
print('PREDS', json.dumps(preds.tolist()))
first = {k: v.clone() for k, v in model.state_dict().items()}
"""
    after = "\nassert all(torch.equal(first[k], v) for k, v in model.state_dict().items()), 'add_model_config gives other weights'\n"
    code = block('python', "local-dir:data/world") + check + block('python', 'add_model_config') + after
    r = run([sys.executable, '-c', code], readme_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    preds = np.array(json.loads(next(l for l in r.stdout.splitlines() if l.startswith('PREDS '))[6:]))
    ds = world_dataset(KEY)
    assert len(preds) == len(ds.test) and (preds == cocoamix_zero_shot).all()   # exact equality of every prediction
    acc = (cocoamix_zero_shot == ds.test.labels).mean() * 100
    assert f'zero-shot accuracy: {acc:.2f}%' in r.stdout
    assert f'{acc:.2f}% on `world_flora`' in (REPO / 'README.md').read_text()   # the figure the README quotes


def test_readme_readers_give_back_the_rendered_dataset(readme_dir, monkeypatch):
    "The README's cocoamix reading block, as written: every split of every format, pixel for pixel, label for label."
    monkeypatch.chdir(readme_dir)
    ns = {}
    exec(block('python', 'read_coop_split'), ns)
    ds = world_dataset(KEY)
    coop = dict(zip(('train', 'val', 'test'), (ns['train'], ns['val'], ns['test'])))
    assert ns['classnames'] == ds.classnames
    for name, get in (('folder', lambda p: getattr(ns['folder'], p)), ('hf', lambda p: getattr(ns['hf'], p)), ('coop', coop.get)):
        for part in ('train', 'val', 'test'):
            o, r = getattr(ds, part), get(part)
            assert r.classnames == ds.classnames and all(type(c) is str for c in r.classnames), (name, part)
            assert (r.labels == o.labels).all(), (name, part)
            assert all((np.asarray(r.image(i)) == o.items[i]).all() for i in range(len(o))), (name, part)
    w = read_wds(readme_dir / 'exports' / 'wds' / KEY, 'test')
    assert w.classnames == ds.classnames and (w.labels == ds.test.labels).all()
    assert all((a == b).all() for a, b in zip(w.items, ds.test.items))
    meta = json.loads((readme_dir / 'exports' / 'coop' / KEY / 'world.json').read_text())
    assert meta['template'] == ds.template and meta['classnames'] == ds.classnames


def test_readme_coop_paths_as_coop_reads_them(readme_dir):
    r = run([sys.executable, '-c', block('python', "split['test'][0]")], readme_dir)
    assert r.returncode == 0, r.stderr
    path, label, classname = r.stdout.split()
    ds = world_dataset(KEY)
    assert (readme_dir / path).is_file() and classname == ds.classnames[int(label)] == ds.test.classnames[ds.test.labels[0]]


def test_readme_clip_benchmark(readme_dir, cocoamix_zero_shot):
    "The README's CLIP_benchmark command, as written, where CLIP_benchmark is installed (it is not a dependency)."
    if shutil.which('clip_benchmark', path=env()['PATH']) is None:
        pytest.skip('CLIP_benchmark is not installed (not a dependency of cocoamix): pip install clip_benchmark to run this')
    r = run(['bash', '-e', '-c', block('bash', 'clip_benchmark eval')], readme_dir)
    if r.returncode and 'only 0-dimensional arrays can be converted' in r.stderr:
        pytest.skip('CLIP_benchmark fails in its accuracy function under this NumPy (LAION-AI/CLIP_benchmark#147)')
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((readme_dir / 'exports' / 'clip_benchmark_world_flora.json').read_text())['metrics']['acc1']
    assert got == pytest.approx((cocoamix_zero_shot == world_dataset(KEY).test.labels).mean(), abs=1e-9)


def test_readme_dassl_class(readme_dir):
    "The README's Dassl dataset class, where Dassl and a CoOp checkout ($COOP_REPO) are at hand (peer code, no dependency)."
    coop = os.environ.get('COOP_REPO')
    if importlib.util.find_spec('dassl') is None or not coop:
        pytest.skip('needs Dassl installed and $COOP_REPO pointing at a CoOp checkout (peer code, not a dependency)')
    code = block('python', 'DATASET_REGISTRY') + f"""
from types import SimpleNamespace as N
cfg = N(DATASET=N(ROOT={str(readme_dir / 'exports' / 'coop')!r}, NUM_SHOTS=0, SUBSAMPLE_CLASSES='all'))
d = WorldFlora(cfg)
print(len(d.train_x), len(d.val), len(d.test))
"""
    r = subprocess.run([sys.executable, '-c', code], cwd=coop, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = world_dataset(KEY)
    assert r.stdout.split()[-3:] == [str(len(ds.train)), str(len(ds.val)), str(len(ds.test))]


def test_export_of_a_shifted_rendering(tmp_path):
    "A test-only dataset (an ImageNet variant of the world) in every format, a subset: its splits read back aligned."
    from cocoamix.data import load_dataset, read_coop_split, REGISTRY
    key = 'world_imagenet_sketch'
    ds = world_dataset(key)
    idx = np.concatenate([np.flatnonzero(ds.test.labels == c)[:1] for c in range(len(ds.classnames))])
    got = {fmt: export_world(key, fmt, tmp_path / fmt, max_per_class=1) for fmt in EXPORT_FORMATS}
    tests = {'imagefolder': load_dataset(key, source='folder', path=got['imagefolder']).test,
             'hf': load_dataset(key, source='hf', path=got['hf'], splits={'train': 'test', 'test': 'test'}).test,   # its only split
             'coop': read_coop_split(got['coop'] / 'split_zhou_WorldImagenetSketch.json', got['coop'] / 'images', REGISTRY[key])[2],
             'wds': read_wds(got['wds'], 'test')}
    for fmt, t in tests.items():
        assert t.classnames == ds.classnames and (t.labels == ds.test.labels[idx]).all(), fmt
        assert all((np.asarray(t.image(i)) == ds.test.items[j]).all() for i, j in enumerate(idx)), fmt
    assert not (got['wds'] / 'train').exists() and not (got['hf'] / 'train').exists()   # an empty split is not written
    assert json.loads((got['hf'] / 'world.json').read_text())['counts'] == {'train': 0, 'val': 0, 'test': len(idx)}

