"`cocoamix world calibrate` end to end on the committed world model, at the smallest setting (issue 21, step 1)."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
from cocoamix.worldclip import WORLD_WEIGHTS, load_world_clip, world_weights
from cocoamix.calibration import TARGET_CHECKS

ROOT = Path(__file__).resolve().parents[1]


def test_calibrate_cli_writes_every_target(tmp_path):
    "One set, one seed, shots 1 and 2, 2 epochs, 1 view: every target T1-T6 in the JSON and the table, data/world untouched."
    before = sorted((p.name, p.stat().st_mtime_ns) for p in WORLD_WEIGHTS.parent.iterdir())
    out = tmp_path / 'calib.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    r = subprocess.run([sys.executable, '-m', 'cocoamix', 'world', 'calibrate', '--keys', 'world_orbital', '--seeds', '1',
                        '--shots', '1', '2', '--epochs', '2', '--views', '1', '--cache-dir', str(tmp_path / 'cache'),
                        '--out', str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    t = res['targets']
    assert list(t) == ['T1', 'T2', 'T3', 'T4', 'T5', 'T6']
    for d in t.values():
        assert {'name', 'description', 'threshold', 'measured', 'met'} <= set(d) and isinstance(d['met'], bool)
        assert d['met'] == all(c['met'] for c in d['checks'])
    assert sum(len(d['checks']) for d in t.values()) == len(TARGET_CHECKS)
    # the numbers are the runs': T1's base gain from the one base-to-new run, T5's logit scale the model's
    runs = res['raw']['runs']
    b2n = [x for x in runs if x['kind'] == 'base2new']
    assert len(b2n) == 1 and b2n[0]['shots'] == 2 and b2n[0]['coop_epochs'] == b2n[0]['kgcoop_epochs'] == 2
    assert np.isclose(t['T1']['measured']['CoOp - zero-shot, base (avg over sets)'], b2n[0]['coop_base'] - b2n[0]['zs_base'])
    assert np.isclose(t['T5']['measured']['logit scale'], load_world_clip(world_weights()).logit_scale)
    assert sorted(x['shots'] for x in runs if x['kind'] == 'curve') == [1, 2]
    assert t['T2']['measured']["sd over sets of CoOp's base gain"] is None and not t['T2']['met']   # one set: no spread
    # the table: a header, one row per check, the summary line
    lines = [l for l in r.stdout.splitlines() if l.startswith('|')]
    assert lines[0] == '| target | threshold | measured | met |' and len(lines) == len(TARGET_CHECKS) + 3
    assert all(any(l.startswith(f'| {k} ') for l in lines) for k in t)
    assert res['weights_sha256_16'] and sorted((p.name, p.stat().st_mtime_ns) for p in WORLD_WEIGHTS.parent.iterdir()) == before
    assert not (tmp_path / 'outputs').exists()   # --out was given: nothing written to the default place


def test_calibrations_over_disjoint_sets_merge_into_the_joint_one(tmp_path):
    "Two processes over disjoint sets, merged with `--merge`, give the very targets and runs of one process over both sets."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    def calibrate(*args):
        r = subprocess.run([sys.executable, '-m', 'cocoamix', 'world', 'calibrate', *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    flags = ['--seeds', '1', '--shots', '1', '--epochs', '1', '--views', '1', '--cache-dir', str(tmp_path / 'cache')]
    calibrate('--keys', 'world_orbital', 'world_flora', *flags, '--out', 'joint.json')
    calibrate('--keys', 'world_orbital', *flags, '--out', 'a.json')
    calibrate('--keys', 'world_flora', *flags, '--out', 'b.json')
    r = calibrate('--merge', 'a.json', 'b.json', '--out', 'merged.json')
    joint, merged = (json.loads((tmp_path / f).read_text()) for f in ('joint.json', 'merged.json'))
    assert merged['targets'] == joint['targets'] and merged['raw']['curve'] == joint['raw']['curve']
    strip = lambda runs: [{k: v for k, v in x.items() if k != 'sec'} for x in runs]
    assert strip(merged['raw']['runs']) == strip(joint['raw']['runs']) and merged['raw']['keys'] == ['world_orbital', 'world_flora']
    assert merged['merged_from'] == ['a.json', 'b.json'] and '| **all** |' in r.stdout
    # overlapping sets, or another model's file, are refused by name
    r = subprocess.run([sys.executable, '-m', 'cocoamix', 'world', 'calibrate', '--merge', 'a.json', 'a.json', '--out', 'x.json'],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and 'overlap' in r.stderr and not (tmp_path / 'x.json').exists()
