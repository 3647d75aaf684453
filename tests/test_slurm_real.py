"""The cluster path on a real Slurm: Debian's `slurm-wlm` and `munge` (installed when missing), slurmctld and slurmd
started for this host on a private state folder with no accounting (so `sacct` cannot answer, as on clusters without
slurmdbd), and the built-in grid run through `cocoamix run --executor slurm`: the table equals the local run's, Ctrl-C
+ rerun submits nothing new, scancel + rerun runs only the rest, a task killed at its `--slurm-time` is requeued and its
cells finish once, a failing cell is named with its reason. Skipped, with the reason, where the daemons cannot run
(not root, no package). Every daemon started here is stopped by its pid."""
import json, os, re, shutil, signal, socket, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest

from cocoamix import executors
from cocoamix.executors import JOB_RECORD, JOBS_NOTE, run_cells
from cocoamix.runner import expand_grid, run_cell_safely

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(ROOT / '.venv' / 'bin' / 'cocoamix')] if (ROOT / '.venv' / 'bin' / 'cocoamix').exists() else [sys.executable, '-m', 'cocoamix']
GRID = ['base2new', '--methods', 'zsclip', 'coop', '--seeds', '1', '2', '--param', 'epochs=2']


def _as_in_a_terminal():
    "A child that takes Ctrl-C as a terminal's foreground job does, even when these tests run in the background (SIGINT ignored)."
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _install():
    "Debian's slurm-wlm and munge, when missing (apt-get update once, then install); the reason when they cannot be had."
    need = ('slurmctld', 'slurmd', 'sbatch', 'squeue', 'munged', 'mungekey')
    if all(shutil.which(b) for b in need): return None
    if not shutil.which('apt-get'): return f'no {", ".join(b for b in need if not shutil.which(b))} and no apt-get to install slurm-wlm and munge'
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    for cmd in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', 'slurm-wlm', 'munge']):
        r = _sh(cmd, env=env, timeout=900)
        if r.returncode: return f'`{" ".join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}'
    missing = [b for b in need if not shutil.which(b)]
    return f'installed slurm-wlm and munge but {missing} are still missing' if missing else None


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _pid(path, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try: return int(Path(path).read_text().strip())
        except (OSError, ValueError): time.sleep(0.2)
    return None


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    "A one-node Slurm for this host, 1 CPU per task, no accounting; yields its environment; stops its daemons by pid."
    if os.geteuid() != 0: pytest.skip('a real Slurm needs root to start munged, slurmctld and slurmd (CI runs as root)')
    reason = _install()
    if reason: pytest.skip(f'no Slurm: {reason}')
    d = tmp_path_factory.mktemp('slurm')
    for sub in ('state', 'spool', 'munge'): (d / sub).mkdir()
    os.chmod(d, 0o700); os.chmod(d / 'munge', 0o700)
    key, sock, pids = d / 'munge' / 'munge.key', d / 'munge' / 'munge.socket', {}
    env = {**os.environ, 'SLURM_CONF': str(d / 'slurm.conf')}
    env.pop('SLURM_JOB_ID', None)

    def stop():
        if pids.get('slurmctld'): _sh(['scancel', '-u', 'root'], env=env, timeout=30)
        for name in ('slurmd', 'slurmctld', 'munged'):
            pid = pids.get(name)
            if not pid: continue
            try: os.kill(pid, signal.SIGTERM)
            except ProcessLookupError: continue
            for _ in range(100):
                try: os.kill(pid, 0); time.sleep(0.1)
                except ProcessLookupError: break
            else:
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass

    def logs():
        return ' | '.join(f'{f.name}: {f.read_text()[-300:]}' for f in d.glob('*.log'))
    try:
        r = _sh(['mungekey', '--create', f'--keyfile={key}'])
        r = r if r.returncode else _sh(['munged', '--force', f'--socket={sock}', f'--key-file={key}', f'--log-file={d}/munged.log',
                                        f'--pid-file={d}/munged.pid', f'--seed-file={d}/munge/seed'])
        pids['munged'] = None if r.returncode else _pid(d / 'munged.pid')
        if not pids['munged']: pytest.skip(f'munged did not start: {r.stderr.strip()[-300:]}')
        node = _sh(['slurmd', '-C']).stdout.splitlines()[0]          # NodeName=host CPUs=... RealMemory=...: this machine
        host = re.match(r'NodeName=(\S+)', node).group(1)
        (d / 'slurm.conf').write_text(f"""ClusterName=cocoamixtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2
MinJobAge=600
{node} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ('slurmctld', 'slurmd'):
            r = _sh([daemon, '-f', str(d / 'slurm.conf')], env=env)
            pids[daemon] = _pid(d / f'{daemon}.pid')
            if r.returncode or not pids[daemon]: pytest.skip(f'{daemon} did not start: {r.stderr.strip()[-300:]} {logs()}')
        for _ in range(60):
            if _sh(['sinfo', '-h', '-o', '%t'], env=env).stdout.strip() == 'idle': break
            time.sleep(1)
        else: pytest.skip(f'the Slurm node never became idle: {logs()}')
        assert 'accounting storage is disabled' in (lambda r: r.stdout + r.stderr)(_sh(['sacct'], env=env))   # sacct cannot answer
        old = os.environ.get('SLURM_CONF'); os.environ['SLURM_CONF'] = env['SLURM_CONF']   # for run_cells in this process
        try: yield env
        finally:
            if old is None: os.environ.pop('SLURM_CONF', None)
            else: os.environ['SLURM_CONF'] = old
    finally:
        stop()


def cli(out, *args, env, timeout=240):
    r = subprocess.run(CLI + ['run', *GRID, '--out', str(out), '--quiet', *args], capture_output=True, text=True,
                       env={**env, 'COCOAMIX_OFFLINE': 'builtin', 'OMP_NUM_THREADS': '1'}, timeout=timeout, cwd=ROOT)
    return r


def slurm_args(out, *extra):
    return ['--executor', 'slurm', '--cpus-per-cell', '1', '--slurm-time', '10', '--param', f'cache_dir={out}/cache', *extra]


def jobs_in(folder) -> set:
    "The Slurm array jobs submitted into a submitit folder."
    return {p.name.split('_')[0] for p in Path(folder).glob('*_submitted.pkl')}


def wait_for(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond(): return
        time.sleep(1)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def test_slurm_grid_gives_the_local_table(slurm, tmp_path):
    local = cli(tmp_path / 'local', '--in-process', '--param', f'cache_dir={tmp_path}/local/cache', env=slurm)
    assert local.returncode == 0, local.stderr[-2000:]
    # no --gpus-per-cell: the partition has no GPUs, so the cells ask for none (the old default, 1, failed at submission)
    r = cli(tmp_path / 'slurm', *slurm_args(tmp_path / 'slurm', '--cells-per-task', '2'), env=slurm)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a, b = (pd.read_csv(tmp_path / k / 'base2new' / 'table.csv') for k in ('local', 'slurm'))
    pd.testing.assert_frame_equal(a, b)
    folder = tmp_path / 'slurm' / 'base2new' / '.submitit'
    assert len(jobs_in(folder)) == 1 and len(list(folder.glob('*_result.pkl'))) == 2   # one job array, 2 tasks of 2 cells
    logs = ''.join(p.read_text() for p in folder.glob('*_log.out'))
    assert logs.count('1 CPU thread(s) per cell') == 2 and logs.count('cocoamix: cell finished') == 4   # --cpus-per-cell in the task
    assert not (tmp_path / 'slurm' / 'base2new' / JOBS_NOTE).exists()
    # a GPU asked of a partition without any is refused before anything is submitted, with the fix
    r = cli(tmp_path / 'gpu', *slurm_args(tmp_path / 'gpu', '--gpus-per-cell', '1'), env=slurm)
    assert r.returncode == 2 and 'no GPUs' in r.stderr and '--gpus-per-cell 0' in r.stderr and not (tmp_path / 'gpu' / 'base2new' / '.submitit').exists()


def test_ctrl_c_then_rerun_waits_for_the_running_tasks(slurm, tmp_path):
    "Ctrl-C (SIGINT to the terminal's process group) while the tasks run: the terminal names the jobs; the rerun submits nothing."
    out = tmp_path / 'o'
    args = slurm_args(out, '--cells-per-task', '2', '--slurm-setup', 'sleep 20')   # tasks that run a while
    cmd = CLI + ['run', *GRID, '--out', str(out), '--quiet', *args]
    env = {**slurm, 'COCOAMIX_OFFLINE': 'builtin', 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True,
                         preexec_fn=_as_in_a_terminal)
    note = out / 'base2new' / JOBS_NOTE
    wait_for(note.exists, 120, 'the job array to be submitted')
    time.sleep(2)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    first = jobs_in(out / 'base2new' / '.submitit')
    assert len(first) == 1 and f'the Slurm tasks go on: job(s) {next(iter(first))}' in err and 'logs in' in err, err[-2000:]
    assert executors.squeue_states() and any(s in executors.LIVE_STATES for s in executors.squeue_states().values())
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert jobs_in(out / 'base2new' / '.submitit') == first                       # nothing new was submitted
    assert '(4 cells from an earlier run)' in (out / 'base2new' / 'base2new.ipynb').read_text()   # what run_cells said, in the record
    assert (out / 'base2new' / 'table.csv').is_file() and len(list((out / 'base2new').glob('*/*/seed*/metrics.json'))) == 4


def test_scancel_then_rerun_runs_only_the_rest(slurm, tmp_path):
    "A job cancelled mid-way: its unfinished cells are reported as cancelled, with the job id and its log; the rerun runs only them."
    cells = expand_grid('base2new', tmp_path, settings=['zsclip'], seeds=[1, 2, 3, 4], params={'cache_dir': str(tmp_path / 'cache')})
    folder = tmp_path / 'logs'
    import threading
    def cancel_after_first_cell():
        wait_for(lambda: any(c.done for c in cells) and 'RUNNING' in executors.squeue_states().values(), 180, 'the first cell and the next task')
        ids = jobs_in(folder)
        subprocess.run(['scancel', *ids], check=True, env=slurm)
    t = threading.Thread(target=cancel_after_first_cell, daemon=True); t.start()
    res = run_cells(cells, run_cell_safely, executor='slurm', slurm={'time': '10', 'setup': ['sleep 15'], 'array_parallelism': 1},
                    cpus_per_cell=1, cells_per_task=1, folder=folder, progress=False, poll_s=1)   # one task at a time, each a while
    t.join(5)
    done = [c for c in cells if c.done]
    assert 1 <= len(done) < 4 and [c for c, e in res if e is None] == done
    for c, e in res:
        if e is None: continue
        assert re.search(r'Slurm job \d+_\d+ (was cancelled|ended before it started)', e) and str(folder) in e, e
        assert e in (c.out_dir / 'error.txt').read_text()                          # the summary's "see error.txt" exists
    assert any('was cancelled' in e for _, e in res if e)                          # the running task, from its log
    kept = {c.metrics_path: c.metrics_path.stat().st_mtime_ns for c in done}
    res = run_cells(cells, run_cell_safely, executor='slurm', slurm={'time': '10'}, cpus_per_cell=1, folder=folder, progress=False, poll_s=1)
    assert [c for c, _ in res] == [c for c in cells if c not in done] and all(e is None for _, e in res)
    assert res.submitted == [c for c, _ in res] and res.waited == []
    assert {p: p.stat().st_mtime_ns for p in kept} == kept and all(c.done for c in cells)


def _slow_cell(cell):
    "A cell that takes a known wall time, whatever the machine's speed: what a time limit must interrupt."
    time.sleep(14)
    return run_cell_safely(cell)


def test_a_task_killed_at_its_time_limit_is_requeued_and_its_cells_finish_once(slurm, tmp_path):
    "--slurm-time 2 (minutes) with a task of more work than that: submitit requeues it, the requeued run skips the finished cells."
    # Slurm signals the task 30 s before its limit, or up to 60 s earlier than that: 30 to 90 s after it starts. 8 cells
    # of at least 14 s each (a sleep, so the machine's speed does not matter) outlast the signal in every case.
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the task cannot import this test module: send it by value
    cells = expand_grid('base2new', tmp_path, settings=['coop'], seeds=list(range(1, 9)),
                        params={'epochs': 2, 'cache_dir': str(tmp_path / 'cache')})
    folder = tmp_path / 'logs'
    res = run_cells(cells, _slow_cell, executor='slurm', slurm={'time': '2'}, cpus_per_cell=1, cells_per_task=8,
                    folder=folder, progress=False, poll_s=1)
    assert all(e is None for _, e in res), res
    logs = ''.join(p.read_text() for p in folder.glob('*_log.*'))
    assert 'Requeued job' in logs or 'requeue' in logs.lower(), logs[-2000:]
    finished = re.findall(r'cocoamix: cell finished: (\S+)', logs)
    assert sorted(finished) == sorted(str(c.out_dir.resolve()) for c in cells)   # every cell finished exactly once


def test_a_failing_cell_is_named_with_its_reason(slurm, tmp_path):
    good = expand_grid('base2new', tmp_path, settings=['zsclip'], seeds=[1], params={'cache_dir': str(tmp_path / 'cache')})
    bad = expand_grid('base2new', tmp_path, datasets=['caltech101'], settings=['zsclip'], seeds=[1],
                      params={'data_root': str(tmp_path / 'no_data'), 'cache_dir': str(tmp_path / 'cache')})
    res = run_cells(good + bad, run_cell_safely, executor='slurm', slurm={'time': '10'}, cpus_per_cell=1, folder=tmp_path / 'logs',
                    progress=False, poll_s=1)
    errors = {c.dataset: e for c, e in res}
    assert errors['fashion_mnist'] is None and 'caltech-101' in errors['caltech101'].lower()
    assert 'caltech' in (bad[0].out_dir / 'error.txt').read_text().lower() and all((c.out_dir / JOB_RECORD).is_file() for c in good + bad)
