"`cocoamix run` end to end: one papermill execution of the experiment notebook per table, the cells in-process (a pipeline check)."
import json, os, signal, subprocess, sys, time
from pathlib import Path

import nbformat, numpy as np, pandas as pd, pytest
from PIL import Image

from cocoamix.runner import run_experiment, run_grid, expand_grid, check_params, EXPERIMENTS, finished_cells, read_metrics


def _as_in_a_terminal():
    "A child that takes Ctrl-C as a terminal's foreground job does, even when these tests run in the background (SIGINT ignored)."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, cwd=None, cmd='run'):
    return subprocess.run([sys.executable, '-m', 'cocoamix', cmd, *args], capture_output=True, text=True, cwd=cwd,
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
    assert '4 cells computed by this run, 0 finished before it' in r.stdout
    table = pd.read_csv(out / name / 'table.csv')
    labels = [s if s == 'zsclip' else f'{s} [epochs=3]' for s in settings]   # a value off the grid's defaults is in the row's label,
                                                                              # unless the method has no such parameter (zero-shot CLIP)
    assert list(table['setting']) == labels and set(table['dataset']) == {'fashion_mnist'}
    assert set(table['weights']) == {'random weights (pipeline check)'}
    for col in ('base_mean', 'base_std', 'new_mean', 'new_std', 'hm_mean', 'hm_std', 'seeds'):
        assert col in table.columns
    for _, row in table.iterrows():
        cells = [c for c in finished_cells(name, out) if c.setting == row['setting']]
        assert len(cells) == 2 == row['seeds']
        per_seed = [read_metrics(c.metrics_path)['metrics'] for c in cells]
        for m in ('base', 'new', 'hm'):
            values = [s[m] for s in per_seed]
            assert row[f'{m}_mean'] == pytest.approx(np.mean(values)) and row[f'{m}_std'] == pytest.approx(np.std(values, ddof=1))
    md = (out / name / 'table.md').read_text()
    assert 'Pipeline check, not the paper' in md and 'random weights' in md
    png = out / name / 'figure.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(png) as im: im.verify()
    record = nbformat.read(out / name / f'{name}.ipynb', 4)             # one executed notebook: the record of the table
    assert 'start_time' not in record.metadata.get('papermill', {})      # no timings: the same grid gives the same record
    outputs = [o for c in record.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert any(o.get('output_type') == 'display_data' for o in outputs)
    assert not any(o.get('output_type') == 'error' for o in outputs)
    assert 'ERROR' not in r.stderr and 'Traceback' not in r.stderr and 'IPKernelApp' not in r.stderr   # the kernel's chatter is in .kernel.log
    assert 'Weights: random weights (pipeline check)' in md


def test_injected_parameters_override_the_defaults(runs):
    "Would catch nbdev_clean stripping the `parameters` tag: the grid injected by the CLI must beat the notebook's defaults."
    out = runs[0]
    rec = read_metrics(next((out / 'base2new' / 'fashion_mnist').glob('cocoamix*/seed1/metrics.json')))
    assert rec['params']['epochs'] == 3 and len(rec['metrics']['history']['prompt']) == 3
    assert rec['params']['seed'] == 1 and rec['pipeline_check'] is True
    nb = nbformat.read(out / 'base2new' / 'base2new.ipynb', 4)
    tags = [c.metadata.get('tags', []) for c in nb.cells]
    i_default = next(i for i, t in enumerate(tags) if 'parameters' in t)
    i_injected = next(i for i, t in enumerate(tags) if 'injected-parameters' in t)
    assert i_injected == i_default + 1


def test_rerun_recomputes_nothing(runs):
    out, cache, common, _ = runs
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob('metrics.json')}
    r = cli('base2new', '--methods', 'zsclip', 'cocoamix', *common)
    assert r.returncode == 0 and '0 cells computed by this run, 4 finished before it' in r.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob('metrics.json')} == stamps


def test_a_narrower_rerun_keeps_every_row(runs):
    out, cache, common, _ = runs
    r = cli('base2new', '--methods', 'zsclip', *common[:-1], '--seeds', '1', '--quiet')
    assert r.returncode == 0
    assert list(pd.read_csv(out / 'base2new' / 'table.csv')['setting']) == ['zsclip', 'cocoamix [epochs=3]']
    only = run_grid('base2new', out, settings=['zsclip'], seeds=[1], params={'epochs': 3, 'cache_dir': str(cache)}, progress=False,
                    only_this_grid=True)
    assert list(only.table['setting']) == ['zsclip'] and only.table['seeds'].tolist() == [1]


def test_a_torn_metrics_file_is_moved_aside_and_the_cell_rerun(tmp_path, runs):
    cache = runs[1]
    params = {'epochs': 1, 'cache_dir': str(cache)}
    run_grid('base2new', tmp_path, settings=['zsclip'], seeds=[1, 2], params=params, progress=False)
    torn = next(tmp_path.glob('base2new/fashion_mnist/*/seed2/metrics.json'))
    torn.write_text(torn.read_text()[:200])                            # a machine died mid-write
    s = run_grid('base2new', tmp_path, settings=['zsclip'], seeds=[1, 2], params=params, progress=False)
    assert [c.seed for c in s.ran] == [2] and [c.seed for c in s.skipped] == [1]
    assert read_metrics(torn) is not None and len(list(torn.parent.glob('metrics.json.torn-*'))) == 1


def test_the_notebook_and_the_in_process_grid_give_the_same_table(tmp_path, runs):
    cache = runs[1]
    kw = dict(settings=['zsclip', 'coop'], seeds=[1], params={'epochs': 2, 'cache_dir': str(cache)}, progress=False)
    a = run_experiment('base2new', tmp_path / 'a', **kw)
    b = run_experiment('base2new', tmp_path / 'b', notebook=False, **kw)
    assert not a.failed and not b.failed and (tmp_path / 'a' / 'base2new' / 'base2new.ipynb').is_file()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / 'a' / 'base2new' / 'table.csv'), pd.read_csv(tmp_path / 'b' / 'base2new' / 'table.csv'))


def test_a_failing_cell_leaves_the_others(tmp_path, runs):
    cache = runs[1]
    s = run_grid('base2new', tmp_path, datasets=['fashion_mnist', 'caltech101'], settings=['zsclip'], seeds=[1],   # run_grid: no up-front check
                 params={'data_root': str(tmp_path / 'no_data'), 'epochs': 1, 'cache_dir': str(cache)}, progress=False)
    assert [c.dataset for c, _ in s.failed] == ['caltech101'] and 'caltech-101' in s.failed[0][1]
    assert [c.dataset for c in s.ran] == ['fashion_mnist']
    assert 'Traceback' in (s.failed[0][0].out_dir / 'error.txt').read_text()
    assert list(pd.read_csv(tmp_path / 'base2new' / 'table.csv')['dataset']) == ['fashion_mnist']


def test_two_identical_runs_at_once_compute_each_cell_once(tmp_path, runs):
    cache = runs[1]
    args = ['base2new', '--methods', 'coop', '--seeds', '1', '2', '3', '--epochs', '2', '--out', str(tmp_path), '--cache-dir', str(cache),
            '--quiet', '--in-process']
    procs = [subprocess.Popen([sys.executable, '-m', 'cocoamix', 'run', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ran = [int(o.split(' cells computed by this run,')[0].split()[-1]) for o, _ in outs]
    assert sum(ran) == 3                                               # every cell computed by exactly one of the runs
    assert all(read_metrics(p) is not None for p in tmp_path.rglob('metrics.json')) and len(list(tmp_path.rglob('metrics.json'))) == 3
    assert len(pd.read_csv(tmp_path / 'base2new' / 'table.csv')) == 1


@pytest.mark.parametrize('sig,code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_grid_resumes_without_recomputing(tmp_path, runs, sig, code):
    cache = runs[1]
    args = ['base2new', '--methods', 'coop', '--seeds', *map(str, range(1, 9)), '--epochs', '30', '--out', str(tmp_path),
            '--cache-dir', str(cache), '--quiet', '--in-process']
    p = subprocess.Popen([sys.executable, '-m', 'cocoamix', 'run', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_as_in_a_terminal)
    deadline = time.time() + 300
    while not list(tmp_path.rglob('metrics.json')) and time.time() < deadline: time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == code, (out, err)
    assert err.strip().splitlines()[-1].startswith('interrupted;') and 'rerun to resume' in err and 'Traceback' not in err
    done = {m: m.stat().st_mtime_ns for m in tmp_path.rglob('metrics.json')}
    assert 1 <= len(done) < 8 and all(read_metrics(m) is not None for m in done)
    r = cli(*args)
    assert r.returncode == 0 and f'{8 - len(done)} cells computed by this run, {len(done)} finished before it' in r.stdout
    assert {m: m.stat().st_mtime_ns for m in done} == done


def test_bad_input_fails_before_anything_runs(tmp_path):
    for args, message in [(['no_such'], "unknown experiment 'no_such'"),
                          (['base2new', '--param', 'shotz=4'], "unknown parameter 'shotz'"),
                          (['base2new', '--param', 'epochs=ten'], "parameter 'epochs' must be int"),
                          (['base2new', '--param', 'w=abc'], "parameter 'w' must be float"),
                          (['base2new', '--shots', '0'], "parameter 'shots' must be >= 1"),
                          (['base2new', '--seeds', '-1'], '--seeds: seeds are non-negative'),
                          (['base2new', '--datasets', 'nosuch'], "unknown dataset(s) ['nosuch']"),
                          (['base2new', '--data-root', str(tmp_path / 'nonexistent')], '11 dataset(s) not usable under --data-root'),
                          (['base2new', '--pretrained', 'openai'], 'a hub tag, and HF_HUB_OFFLINE=1'),
                          (['base2new', '--pretrained', str(tmp_path / 'none.safetensors')], 'no such weights file'),
                          (['fscil', '--methods', 'kgcoop'], 'unknown method/setting')]:
        r = cli(*args, '--out', str(tmp_path))
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
        assert r.stderr.count('error:') == 1                             # one message, even for 11 missing datasets
    assert not any(tmp_path.iterdir())


def test_a_seed_given_twice_is_one_cell(tmp_path):
    assert [c.seed for c in expand_grid('base2new', tmp_path, settings=['zsclip'], seeds=[1, 1, 2])] == [1, 2]


def test_grid_folders_encode_the_setting(tmp_path):
    cells = expand_grid('ablation_w_d', tmp_path, seeds=[1], params={'shots': 2})
    assert len(cells) == 9 and len({c.out_dir for c in cells}) == 9
    assert all('shots=2' in str(c.out_dir) and c.params['shots'] == 2 for c in cells)
    assert cells[0].params['config'] == {'w': 0.0, 'd': 0.0}
    assert check_params('base2new', {'w': 2}) == {'w': 2.0}


def test_list_shows_every_experiment():
    r = cli('--list')
    assert r.returncode == 0 and all(name in r.stdout for name in EXPERIMENTS)


def test_data_check(tmp_path):
    from fixtures_data import caltech
    good = cli('check', '--data-root', str(tmp_path), '--datasets', 'fashion_mnist', cmd='data')
    assert good.returncode == 0 and 'found' in good.stdout
    empty = cli('check', '--data-root', str(tmp_path), '--datasets', 'caltech101', cmd='data')
    assert empty.returncode == 1 and 'MISSING' in empty.stdout and 'Expected layout' in empty.stdout
    caltech(tmp_path)
    assert cli('check', '--data-root', str(tmp_path), '--datasets', 'caltech101', cmd='data').returncode == 0
    split = next(tmp_path.rglob('split_zhou_*.json')); split.unlink()
    r = cli('check', '--data-root', str(tmp_path), '--datasets', 'caltech101', cmd='data')
    assert r.returncode == 1 and 'split file not found' in r.stdout and split.name in r.stdout


def test_eval_gives_back_the_cells_metrics(runs):
    out = runs[0]
    cell = next((out / 'base2new' / 'fashion_mnist').glob('cocoamix*/seed1'))
    r = cli(str(cell), '--dataset', 'fashion_mnist', cmd='eval')
    assert r.returncode == 0, r.stderr
    got, want = json.loads(r.stdout), read_metrics(cell / 'metrics.json')['metrics']
    for k in ('base', 'new', 'hm'): assert got[k] == pytest.approx(want[k], abs=1e-6)
    assert cli(str(out), '--dataset', 'fashion_mnist', cmd='eval').returncode == 2


def test_the_same_grid_gives_the_same_outputs(tmp_path, runs):
    "What makes a fresh clone stay clean after `make run`: the table and the executed record do not depend on when or where."
    cache, outs = runs[1], []
    for sub in ('a', 'b'):
        r = cli('base2new', '--methods', 'zsclip', 'coop', '--seeds', '1', '--epochs', '2', '--out', str(tmp_path / sub), '--cache-dir', str(cache), '--quiet')
        assert r.returncode == 0, r.stderr
        outs.append(tmp_path / sub / 'base2new')
    assert (outs[0] / 'table.csv').read_bytes() == (outs[1] / 'table.csv').read_bytes()
    assert (outs[0] / 'table.md').read_bytes() == (outs[1] / 'table.md').read_bytes()
    strip = lambda nb: [[{k: v for k, v in o.items() if k != 'execution_count'} for o in c.get('outputs', [])]
                        for c in nb.cells if 'injected-parameters' not in c.metadata.get('tags', [])]
    a, b = (nbformat.read(o / 'base2new.ipynb', 4) for o in outs)
    assert strip(a) == strip(b)
    for nb in (a, b): nb.metadata.papermill.pop('parameters')      # they differ here only by the test's --out and cache
    assert a.metadata == b.metadata


def test_average_row_spread_is_the_std_over_seeds_of_the_dataset_average():
    from cocoamix.runner import summarise, get_experiment
    df = pd.DataFrame([{'dataset': d, 'setting': 'coop', 'seed': s, 'base': b, 'new': n, 'hm': 2 * b * n / (b + n)}
                       for d, s, b, n in [('a', 1, 80, 60), ('b', 1, 70, 50), ('a', 2, 84, 66), ('b', 2, 72, 50), ('b', 3, 90, 90)]])
    avg = summarise(get_experiment('base2new'), df).set_index('dataset').loc['average']
    # seed 3 ran on one dataset only, so the spread uses seeds 1 and 2: base averages 75 and 78, new 55 and 58
    assert avg['base_std'] == pytest.approx(pd.Series([75.0, 78.0]).std()) and avg['new_std'] == pytest.approx(pd.Series([55.0, 58.0]).std())
    hm = lambda b, n: 2 * b * n / (b + n)
    assert avg['hm_std'] == pytest.approx(pd.Series([hm(75, 55), hm(78, 58)]).std())
