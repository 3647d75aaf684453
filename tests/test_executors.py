"""The grid run by submitit in long-lived worker processes gives the same table as the sequential run, and a rerun on
the (Slurm) job-array path submits only the cells without metrics, in tasks of many cells."""
import datetime, json, shutil
from pathlib import Path

import pandas as pd
import pytest

from cocoamix import executors
from cocoamix.executors import run_cells, live_job, JOB_RECORD
from cocoamix.runner import expand_grid, collect, summarise, get_experiment, run_cell_safely, read_metrics

GRID = dict(settings=['zsclip', 'coop'], seeds=[1, 2])


def grid(out, cache):
    return expand_grid('base2new', out, **GRID, params={'epochs': 2, 'cache_dir': str(cache)})


def table(cells):
    t = summarise(get_experiment('base2new'), collect(cells))
    return t.sort_values(['dataset', 'setting']).reset_index(drop=True)


def assert_same_table(a, b):
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 2
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope='module')
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp('seq')
    cells = grid(out, out / 'cache')
    res = run_cells(cells, run_cell_safely, progress=False)
    assert [(c.setting, c.seed, e) for c, e in res] == [(s, k, None) for s in GRID['settings'] for k in GRID['seeds']]
    return table(cells)


@pytest.fixture(scope='module')
def parallel(tmp_path_factory):
    "submitit's LocalExecutor, two worker processes sharing the cells, with a fresh feature cache that they build concurrently."
    out = tmp_path_factory.mktemp('par')
    cells = grid(out, out / 'cache')
    res = run_cells(cells, run_cell_safely, executor='local', jobs=2, progress=False)
    return out, cells, res


def test_parallel_local_run_gives_the_sequential_table(sequential, parallel):
    out, cells, res = parallel
    assert [e for _, e in res] == [None] * 4 and all(c.done for c in cells)
    assert_same_table(table(cells), sequential)
    # two long-lived workers (one submitit job each) shared the four cells: two process ids, two cells each
    assert len(list((out / 'base2new' / '.submitit').glob('*_result.pkl'))) == 2
    pids = [read_metrics(c.metrics_path)['pid'] for c in cells]
    assert len(set(pids)) == 2 and sorted(pids.count(p) for p in set(pids)) == [2, 2]
    assert len(list((out / 'cache').rglob('*.safetensors'))) > 0 and not list((out / 'cache').rglob('*.tmp'))


def test_job_array_path_resubmits_only_unfinished_cells(sequential, parallel, tmp_path):
    """The Slurm code path (AutoExecutor, one batch = a job array) with submitit's local cluster: a cell lost its
    metrics and another cannot run; only those two are submitted, the failure comes back as a message."""
    out, cells, _ = parallel
    lost = [c for c in cells if c.seed == 2 and c.setting == 'coop']
    for c in lost: c.metrics_path.unlink()
    kept = {c.metrics_path: c.metrics_path.stat().st_mtime_ns for c in cells if c not in lost}
    failing = expand_grid('base2new', out, datasets=['caltech101'], settings=['zsclip'], seeds=[1],
                          params={'data_root': str(tmp_path / 'no_data'), 'epochs': 1, 'cache_dir': str(out / 'cache')})
    slurm = {'cluster': 'local', 'partition': 'ignored-here', 'time': '0:10:00', 'array_parallelism': 4}
    res = run_cells(cells + failing, run_cell_safely, executor='slurm', slurm=slurm, gpus_per_cell=0, folder=tmp_path / 'logs', progress=False)
    assert [(c.dataset, c.setting, c.seed) for c, _ in res] == [(c.dataset, c.setting, c.seed) for c in lost + failing]
    errors = dict((c.dataset, e) for c, e in res)
    assert errors['fashion_mnist'] is None and 'caltech-101' in errors['caltech101']
    assert {p: p.stat().st_mtime_ns for p in kept} == kept              # finished cells untouched
    assert_same_table(table(cells), sequential)
    assert len(list((tmp_path / 'logs').glob('*_result.pkl'))) == 1           # one task ran both cells (cells_per_task=20)
    assert not list(out.rglob(JOB_RECORD))                               # job records are for Slurm only
    assert run_cells(cells, run_cell_safely, executor='slurm', slurm=slurm, progress=False) == []   # all done: nothing submitted


class FakeSlurmJob:
    "Stands in for a job that an earlier, interrupted `cocoamix run --executor slurm` left in the queue."
    states = {}
    def __init__(self, folder, job_id): self.folder, self.job_id = folder, job_id
    @property
    def state(self): return self.states[self.job_id]


def test_a_rerun_waits_for_still_queued_slurm_jobs(tmp_path, monkeypatch):
    cell = expand_grid('base2new', tmp_path, settings=['zsclip'], seeds=[1])[0]
    monkeypatch.setattr(executors.submitit, 'SlurmJob', FakeSlurmJob)
    assert live_job(cell, 'slurm') is None                               # never submitted
    cell.out_dir.mkdir(parents=True)
    (cell.out_dir / JOB_RECORD).write_text(json.dumps({'cluster': 'slurm', 'job_id': '77_0', 'folder': str(tmp_path / '%j')}))
    for state, live in [('PENDING', True), ('RUNNING', True), ('COMPLETED', False), ('FAILED', False), ('TIMEOUT', False),
                        ('CANCELLED by 1000', False), ('UNKNOWN', False)]:
        FakeSlurmJob.states['77_0'] = state
        assert (live_job(cell, 'slurm') is not None) == live, state
    assert live_job(cell, 'local') is None                               # another cluster: resubmit
