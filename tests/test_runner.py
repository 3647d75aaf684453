"`cocoamix run` end to end: papermill really executes the experiment notebooks on the tiny model (a pipeline check)."
import json, os, subprocess, sys
from pathlib import Path

import nbformat, numpy as np, pandas as pd, pytest
from PIL import Image

from cocoamix.runner import run_experiment, expand_grid, check_params, EXPERIMENTS


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'cocoamix', 'run', *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1'})


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp('outputs'), tmp_path_factory.mktemp('cache')
    common = ['--seeds', '1', '2', '--epochs', '3', '--out', str(out), '--cache-dir', str(cache), '--quiet']
    first = {name: cli(name, *extra, *common) for name, extra in
             [('base2new', ['--methods', 'zsclip', 'cocoamix']), ('ablation_outclass', [])]}
    return out, cache, common, first


@pytest.mark.parametrize('name,settings', [('base2new', ['zsclip', 'cocoamix']), ('ablation_outclass', ['random words', 'random strings'])])
def test_table_is_the_mean_of_the_seeds(runs, name, settings):
    out, _, _, first = runs
    r = first[name]
    assert r.returncode == 0, r.stdout + r.stderr
    assert '4 cells run, 0 already finished' in r.stdout
    table = pd.read_csv(out / name / 'table.csv')
    assert list(table['setting']) == settings and set(table['dataset']) == {'fashion_mnist'}
    for col in ('base_mean', 'base_std', 'new_mean', 'new_std', 'hm_mean', 'hm_std', 'seeds'):
        assert col in table.columns
    for _, row in table.iterrows():
        cells = sorted((out / name / 'fashion_mnist').glob(f"{row['setting'].replace(' ', '_')}*/seed*/metrics.json"))
        assert len(cells) == 2 == row['seeds']
        per_seed = [json.loads(p.read_text())['metrics'] for p in cells]
        for m in ('base', 'new', 'hm'):
            values = [s[m] for s in per_seed]
            assert row[f'{m}_mean'] == pytest.approx(np.mean(values)) and row[f'{m}_std'] == pytest.approx(np.std(values, ddof=1))
    md = (out / name / 'table.md').read_text()
    assert 'Pipeline check, not the paper' in md and 'random weights' in md
    png = out / name / 'figure.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(png) as im: im.verify()
    report = nbformat.read(out / name / 'report.ipynb', 4)
    assert any(o.get('output_type') == 'display_data' for c in report.cells if c.cell_type == 'code' for o in c.get('outputs', []))


def test_injected_parameters_override_the_defaults(runs):
    "Would catch nbdev_clean stripping the `parameters` tag: the injected epochs=3 must beat the notebook's default (None: the method's own epochs x the offline budget)."
    out = runs[0]
    cell = out / 'base2new' / 'fashion_mnist'
    rec = json.loads(next(cell.glob('cocoamix*/seed1/metrics.json')).read_text())
    assert rec['params']['epochs'] == 3 and len(rec['metrics']['history']['prompt']) == 3
    assert rec['params']['seed'] == 1 and rec['pipeline_check'] is True
    nb = nbformat.read(next(cell.glob('cocoamix*/seed1/notebook.ipynb')), 4)
    tags = [c.metadata.get('tags', []) for c in nb.cells]
    i_default = next(i for i, t in enumerate(tags) if 'parameters' in t)
    i_injected = next(i for i, t in enumerate(tags) if 'injected-parameters' in t)
    assert i_injected == i_default + 1


def test_rerun_recomputes_nothing(runs):
    out, cache, common, _ = runs
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('metrics.json')}
    r = cli('base2new', '--methods', 'zsclip', 'cocoamix', *common)
    assert r.returncode == 0 and '0 cells run, 4 already finished' in r.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob('metrics.json')} == stamps


def test_a_failing_cell_leaves_the_others(tmp_path, runs):
    cache = runs[1]
    s = run_experiment('base2new', tmp_path, datasets=['fashion_mnist', 'caltech101'], settings=['zsclip'], seeds=[1],
                       params={'data_root': str(tmp_path / 'no_data'), 'epochs': 1, 'cache_dir': str(cache)},
                       progress=False, report=False)
    assert [c.dataset for c, _ in s.failed] == ['caltech101'] and 'caltech-101' in s.failed[0][1]
    assert [c.dataset for c in s.ran] == ['fashion_mnist']
    assert list(pd.read_csv(tmp_path / 'base2new' / 'table.csv')['dataset']) == ['fashion_mnist']


def test_bad_input_fails_before_anything_runs(tmp_path):
    for args, message in [(['no_such'], "unknown experiment 'no_such'"),
                          (['base2new', '--param', 'shotz=4'], "unknown parameter 'shotz'"),
                          (['base2new', '--param', 'epochs=ten'], "parameter 'epochs' must be int"),
                          (['fscil', '--methods', 'kgcoop'], 'unknown method/setting')]:
        r = cli(*args, '--out', str(tmp_path))
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert not any(tmp_path.iterdir())


def test_grid_folders_encode_the_setting(tmp_path):
    cells = expand_grid('ablation_w_d', tmp_path, seeds=[1], params={'shots': 2})
    assert len(cells) == 9 and len({c.out_dir for c in cells}) == 9
    assert all('shots=2' in str(c.out_dir) and c.params['shots'] == 2 for c in cells)
    assert cells[0].params['config'] == {'w': 0.0, 'd': 0.0}
    assert check_params('base2new', {'w': 2}) == {'w': 2}


def test_list_shows_every_experiment():
    r = cli('--list')
    assert r.returncode == 0 and all(name in r.stdout for name in EXPERIMENTS)
