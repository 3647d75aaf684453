"""What a run leaves behind: the committed record survives an interrupt, a sweep multiplies only the methods it applies to."""
import os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

from cocoamix.runner import expand_grid, get_experiment, _label

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, '-m', 'cocoamix', 'run']


def _as_in_a_terminal():
    "A child that takes Ctrl-C as a terminal's foreground job does, even when these tests run in the background (SIGINT ignored)."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sweep_of_a_cocoamix_parameter_leaves_coop_one_cell_per_seed(tmp_path):
    "`--param w=2.0 --sweep d=0.1,0.5,1.0` with CoOp: d is not a CoOp parameter, so CoOp runs once per seed, unlabelled by d."
    cells = expand_grid('base2new', tmp_path, ['fashion_mnist'], ['coop', 'cocoamix'], [1, 2], {'w': 2.0}, {'d': [0.1, 0.5, 1.0]})
    coop = [c for c in cells if c.setting == 'coop']
    mix = [c for c in cells if c.setting == 'cocoamix']
    assert len(coop) == 2 and len(mix) == 6
    assert all('d' not in c.params or c.params['d'] is None for c in coop)
    assert sorted({c.params['d'] for c in mix}) == [0.1, 0.5, 1.0]
    exp = get_experiment('base2new')
    assert {_label(exp, c.setting, c.params) for c in coop} == {'coop [w=2.0]'}   # w is a field of CoOp's config (CoA-loss weight)
    assert all('d=' not in str(c.out_dir) for c in coop)
    zs = expand_grid('base2new', tmp_path, ['fashion_mnist'], ['zsclip'], [1], {}, {'lr': [0.1, 0.2]})
    assert len(zs) == 1 and 'lr=' not in str(zs[0].out_dir)   # zero-shot CLIP has no lr


def _ignored(name: str) -> bool:
    "Would git ignore this file of an experiment folder (the committed outputs/ layout)?"
    return subprocess.run(['git', 'check-ignore', '--no-index', '-q', f'outputs/base2new/{name}'], cwd=REPO).returncode == 0


@pytest.mark.skipif(shutil.which('git') is None, reason='git is needed to read .gitignore')
def test_interrupt_leaves_the_committed_record_intact(tmp_path):
    env = {**os.environ, 'COCOAMIX_OFFLINE': 'builtin', 'COCOAMIX_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    done = subprocess.run(CLI + ['base2new', '--methods', 'zsclip', '--seeds', '1', '--out', str(tmp_path), '--quiet'],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'cells computed by this run in' in done.stdout   # make run's elapsed time and cell count
    folder = tmp_path / 'base2new'
    record = folder / 'base2new.ipynb'
    before, listing = record.read_bytes(), {p.name for p in folder.iterdir()}
    run = subprocess.Popen(CLI + ['base2new', '--methods', 'coop', '--seeds', '1', '2', '3', '--epochs', '400', '--out', str(tmp_path),
                                  '--quiet'], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=_as_in_a_terminal)
    deadline = time.time() + 300
    while not list(folder.glob('.base2new.*.partial.ipynb')) and time.time() < deadline and run.poll() is None: time.sleep(0.2)
    time.sleep(3)   # papermill is executing the notebook's cells
    assert run.poll() is None, 'the run ended before it could be interrupted'
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and 'interrupted' in err
    assert record.read_bytes() == before                      # the committed record is untouched
    assert (folder / 'base2new.interrupted.ipynb').is_file()  # the partial one is kept apart, named as such
    left = {p.name for p in folder.iterdir()} - listing
    assert all(_ignored(n) for n in left), left                # nothing a clean tree would show


def _counts(stdout: str) -> dict:
    "The run's own summary line: cells computed by this run, finished before it, finished meanwhile by another run."
    line = next(l for l in stdout.splitlines() if 'cells computed by this run,' in l)
    num = lambda key: int(line.split(key)[0].split()[-1]) if key in line else 0
    return {'ran': num(' cells computed by this run,'), 'before': num(' finished before it'), 'meanwhile': num(' finished meanwhile')}


def test_two_identical_grids_at_once_report_what_each_computed(tmp_path):
    "Two `cocoamix run` of one grid on one --out, through the notebook: their summaries add up to the grid, no cell twice."
    env = {**os.environ, 'COCOAMIX_OFFLINE': 'builtin', 'COCOAMIX_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    args = CLI + ['base2new', '--methods', 'coop', '--seeds', '1', '2', '3', '4', '--epochs', '2', '--out', str(tmp_path / 'out'), '--quiet']
    procs = [subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    counts = [_counts(o) for o, _ in outs]
    assert sum(c['ran'] for c in counts) == 4, counts                        # each cell computed by exactly one run ...
    assert all(c['ran'] + c['before'] + c['meanwhile'] == 4 for c in counts), counts   # ... and each run accounts for the grid
    assert all(f"{c['ran']} cells computed by this run in" in o for c, (o, _) in zip(counts, outs))
    folder = tmp_path / 'out' / 'base2new'
    assert not list(folder.glob('.summary*')) and not list(folder.glob('.progress*')) and not list(folder.glob('.*.partial.ipynb'))
    record = (folder / 'base2new.ipynb').read_text()
    assert '.summary.json' in record and not re.search(r'\.(summary|progress)\.[^"\\\s]+\.json', record)   # it names no host, no pid


def test_damaged_world_weights_are_refused_before_any_cell(tmp_path, monkeypatch):
    "A corrupted world weights file fails the up-front check (its hash), rc 2, with nothing written."
    import cocoamix.worldclip as world
    from cocoamix.cli import main
    bad = tmp_path / 'world_model.safetensors'
    data = bytearray(world.WORLD_WEIGHTS.read_bytes()); data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(world, 'WORLD_WEIGHTS', bad)
    monkeypatch.setenv('COCOAMIX_OFFLINE', 'world')
    out = tmp_path / 'out'
    assert main(['run', 'base2new', '--methods', 'zsclip', '--seeds', '1', '--datasets', 'world_flora', '--out', str(out), '--quiet']) == 2
    assert not out.exists()


def test_unwritable_out_is_refused_in_one_line(tmp_path, capsys):
    "An --out that cannot be written (here: below a regular file, which even root cannot write into) fails up front, rc 2."
    from cocoamix.cli import main
    (tmp_path / 'a_file').write_text('')
    code = main(['run', 'base2new', '--methods', 'zsclip', '--seeds', '1', '--out', str(tmp_path / 'a_file' / 'out'), '--quiet'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'cannot write' in err[0] and '--out' in err[0]


def test_a_table_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    from cocoamix.runner import write_text
    (tmp_path / 'table.csv').mkdir()   # a folder where the table should go: the rename fails
    with pytest.raises(OSError, match='cannot write .*table.csv'):
        write_text(tmp_path / 'table.csv', 'a,b\n')
    assert [p.name for p in tmp_path.iterdir()] == ['table.csv']
