"The benchmark runs end to end on the tiny model, and its two paths compute the same loss."
import json, re, subprocess, sys
import pytest, torch
import cocoamix.method as methods_mod
from cocoamix.registry import make_method
from cocoamix.backbone import TINY_MODEL
from cocoamix import bench

NAMES = ['golden retriever', 'Annual Crop Land', 'airplane', 'Apply Eye Makeup', 'T-shirt/top', 'sea lion']


@pytest.mark.parametrize('method', ['cocoamix', 'coop', 'kgcoop'])
def test_both_paths_same_loss(tiny_clip, method):
    "Same parameters and images: the reference encodes them and runs 77 tokens; ours reads their features."
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, tiny_clip.image_size, tiny_clip.image_size, generator=g)
    labels = torch.randint(len(NAMES), (8,), generator=g)
    ref, ours = bench.loss_both_ways(tiny_clip, NAMES, images, labels, method=method)
    assert ref == pytest.approx(ours, rel=1e-5, abs=1e-6)
    # and the two really take different paths
    _, _, p_ref = bench.step_setup(tiny_clip, NAMES, method=method, reference=True)
    _, _, p_ours = bench.step_setup(tiny_clip, NAMES, method=method)
    assert not p_ref.uses_shared_prefix and not p_ref.truncate
    assert p_ours.uses_shared_prefix and p_ours.truncate


def test_steps_same_losses_over_several_steps(tiny_clip):
    "A few optimiser steps both ways on the same batch: the same loss sequence (same optimiser, same gradients)."
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, tiny_clip.image_size, tiny_clip.image_size, generator=g)
    labels = torch.randint(len(NAMES), (8,), generator=g)
    x = tiny_clip.encode_images(images)
    ref_setup = bench.step_setup(tiny_clip, NAMES, reference=True)
    ours_setup = bench.step_setup(tiny_clip, NAMES)
    ref = [bench.reference_steps(tiny_clip, NAMES, images, labels, 1, setup=ref_setup)[0] for _ in range(3)]
    ours = [bench.ours_steps(tiny_clip, NAMES, x, labels, 1, setup=ours_setup)[0] for _ in range(3)]
    assert ref == pytest.approx(ours, rel=1e-4)
    assert torch.allclose(ref_setup[2].ctx, ours_setup[2].ctx, atol=1e-5)


def test_coop_style_restores_the_library(tiny_clip):
    m = make_method('coop', tiny_clip)
    loop = methods_mod.train_loop
    with bench.coop_style(m, []):
        assert methods_mod.train_loop is not loop and not m.new_prompt(NAMES).uses_shared_prefix
    assert methods_mod.train_loop is loop and m.new_prompt(NAMES).uses_shared_prefix


def test_bench_main_tiny(tmp_path, capsys):
    res = bench.main(['--model', TINY_MODEL, '--classes', '10', '--batch-size', '8', '--steps', '3', '--device', 'cpu',
                      '--seeds', '1', '--epochs', '1', '--n-views', '2', '--out', str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r'speedup: \d+\.\d\dx', out[-1])
    saved = json.loads((tmp_path/f'bench_cpu_{TINY_MODEL}_10c_b8.json').read_text())
    assert (tmp_path/f'bench_cpu_{TINY_MODEL}_10c_b8.txt').read_text().strip().splitlines()[-1] == out[-1]
    assert saved['loss_check']['abs_diff'] < 1e-4
    for k in ('reference', 'ours'):
        s = saved['steps'][k]
        assert s['steps'] == 3 and s['steps_per_s'] > 0 and s['memory']['peak_bytes'] > 0
    assert saved['steps']['text_positions']['reference'] == 77 * 10
    assert saved['steps']['text_positions']['ours'] < saved['steps']['text_positions']['reference'] / 3
    cell = saved['cell']
    assert cell['ours_s'] > 0 and cell['reference_s'] > 0 and set(cell['accuracy']) == {
        f'{m}/seed1' for m in ('zsclip', 'coop', 'kgcoop', 'cocoamix')}
    assert saved['speedup'] == pytest.approx(res['speedup'])
    for key in ('date', 'hardware', 'command', 'versions'): assert saved[key]


def test_module_entry_point():
    r = subprocess.run([sys.executable, '-m', 'cocoamix.bench', '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '--classes' in r.stdout and '--batch-size' in r.stdout
