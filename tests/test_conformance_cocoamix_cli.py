"""CoCoA-Mix's hidden choices made visible (stage-2 batching, the out-class draw, the weights applied) and what the user
sees (`cocoamix methods` shows the t_0 a cell uses, `run --help` / `--list` say what runs, the world weights file is
accepted or refused before any cell runs, a table's title counts its own datasets)."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest, torch
from safetensors import safe_open

from cocoamix.cocoamix import CoCoAMix
from cocoamix.data import COOP_DATASETS
from cocoamix.mixture import out_class_names
from cocoamix.prompts import clean_classname
from cocoamix.registry import describe_method
from cocoamix.runner import run_grid, expand_grid, read_metrics
from cocoamix.worldclip import WORLD_WEIGHTS, WORLD_MODEL


def cli(*args, cmd='run', env=None):
    return subprocess.run([sys.executable, '-m', 'cocoamix', cmd, *args], capture_output=True, text=True,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1', **(env or {})})


# --- what `cocoamix methods` shows ------------------------------------------------------------------------------------
# CoOp's hand-crafted prompts, KaiyangZhou/CoOp trainers/zsclip.py CUSTOM_TEMPLATES (the t_0 of every peer and ours)
COOP_TEMPLATES = {'imagenet': 'a photo of a {}.', 'caltech101': 'a photo of a {}.', 'oxford_pets': 'a photo of a {}, a type of pet.',
                  'stanford_cars': 'a photo of a {}.', 'oxford_flowers': 'a photo of a {}, a type of flower.',
                  'food101': 'a photo of {}, a type of food.', 'fgvc_aircraft': 'a photo of a {}, a type of aircraft.',
                  'sun397': 'a photo of a {}.', 'dtd': '{} texture.', 'eurosat': 'a centered satellite photo of {}.',
                  'ucf101': 'a photo of a person doing {}.'}


def test_methods_shows_the_template_a_cell_uses():
    "`cocoamix methods zsclip --dataset D` prints the t_0 a cell on D passes: CoOp's template of D, not 'a photo of a {}.'."
    assert set(COOP_TEMPLATES) == set(COOP_DATASETS)
    for dataset, template in COOP_TEMPLATES.items():
        row = next(r for r in describe_method('zsclip', dataset) if r['param'] == 'template')
        assert (row['value'], row['source']) == (template, 'dataset'), dataset
    r = cli('zsclip', '--dataset', 'dtd', cmd='methods')
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.strip().startswith('template'))
    assert "'{} texture.'" in line and '[dataset]' in line and 'a photo of a' not in line
    # a method whose authors set their own template keeps it over the dataset's (KgCoOp's DTD prompt, in its setting_defaults)
    from cocoamix.coop import KgCoOp
    own = KgCoOp.setting_defaults('dtd', None, None)['template'][0]
    r = cli('kgcoop', '--dataset', 'dtd', cmd='methods')
    assert own != '{} texture.' and repr(own) in next(l for l in r.stdout.splitlines() if l.strip().startswith('template'))
    bad = cli('zsclip', '--dataset', 'dtdd', cmd='methods')
    assert bad.returncode == 2 and "unknown dataset 'dtdd'" in bad.stderr and 'Traceback' not in bad.stderr


def test_methods_shows_cocoamix_hidden_choices_as_ours():
    r = cli('cocoamix', cmd='methods')
    assert r.returncode == 0, r.stderr
    lines = {l.split()[0]: l for l in r.stdout.splitlines()[1:] if l.strip()}
    assert lines['weights_batch_size'].split()[1] == '0' and '[ours]' in lines['weights_batch_size'] and 'full batch' in lines['weights_batch_size']
    assert lines['outclass_seed'].split()[1] == '-1' and '[ours]' in lines['outclass_seed'] and 'training seed' in lines['outclass_seed']


def test_run_help_and_list_say_what_runs():
    r = cli('--help')
    text = ' '.join(r.stdout.split())
    assert r.returncode == 0 and 'default: the tiny built-in one' not in text
    start = text.index('--model MODEL', text.index('options:'))
    model_help = text[start:text.index('--pretrained PRETRAINED', start)]
    assert 'cocoamix-world' in model_help and 'COCOAMIX_OFFLINE=builtin' in model_help
    listed = cli('--list', env={'COCOAMIX_OFFLINE': 'world'}).stdout
    assert 'over 11 datasets' not in listed and 'on 10 datasets' not in listed
    b2n = listed[listed.index('base2new:'):listed.index('cross_dataset:')]
    assert 'world grid (the default): 7 datasets' in b2n and 'model cocoamix-world / world' in b2n
    assert 'paper grid (with --data-root): 11 datasets' in b2n
    builtin = cli('--list', env={'COCOAMIX_OFFLINE': 'builtin'}).stdout
    assert 'built-in grid (the default): 1 dataset (fashion_mnist)' in builtin


# --- CoCoA-Mix's hidden choices ----------------------------------------------------------------------------------------
def fit(setup, **kw):
    clip, base, _, train, _ = setup
    return CoCoAMix(clip, epochs=1, weights_epochs=4, **kw).fit(train, base.classnames, progress=False)


def test_out_class_words_follow_outclass_seed_not_the_training_seed(setup):
    base = setup[1]
    names = [clean_classname(n) for n in base.classnames]
    words = lambda m: m.run_record()['out_classes']
    default = fit(setup, seed=1)
    assert words(default) == out_class_names(5, 'words', seed=1001, exclude=names)        # the default: today's draw (seed + 1000)
    assert words(fit(setup, seed=2)) != words(default)                                      # -1 follows the training seed
    held = [words(fit(setup, seed=s, outclass_seed=1)) for s in (1, 2, 3)]
    assert held[0] == held[1] == held[2] == words(default)                                  # fixed words, three training seeds
    assert words(fit(setup, seed=1, outclass_seed=7)) != words(default)                     # other words, same training seed
    rec = fit(setup, seed=2, outclass_seed=7).run_record()
    assert rec['outclass_seed'] == 7 and rec['out_class_draws'][0]['seed'] == 1007 and rec['out_class_draws'][0]['kind'] == 'words'


def test_stage_two_batch_sets_the_number_of_weight_steps(setup):
    "Full batch (0, ours): one SGD step per weights epoch; B > 0: ceil(V N / B) per epoch (2 views x 20 images here)."
    train = setup[3]
    n = train.n_views * len(train.labels)
    assert n == 40
    assert fit(setup).run_record()['weights_steps'] == [4]
    for b in (16, 40, 7):
        m = fit(setup, weights_batch_size=b)
        assert m.run_record()['weights_steps'] == [4 * math.ceil(n / b)] and len(m.history['weights']) == 4
    full, mini = fit(setup), fit(setup, weights_batch_size=8)
    assert not torch.equal(full.weights.a_out, mini.weights.a_out)                          # the batching changes the fit
    assert fit(setup, stages=1).run_record()['weights_steps'] == []                         # one stage: no stage 2


def test_a_cocoamix_cell_records_its_words_and_applied_weights(setup, tmp_path):
    "metrics.json of a tiny built-in cell: the words drawn and the weights applied, which match the saved state."
    cache = setup[4]
    s = run_grid('base2new', tmp_path, settings=['cocoamix'], seeds=[1], progress=False,
                 params={'epochs': 1, 'weights_epochs': 3, 'n_views': 1, 'cache_dir': str(cache)})
    assert not s.failed, s.failed
    cell = s.cells[0]
    m = read_metrics(cell.metrics_path, 'base2new')['metrics']
    assert len(m['out_classes']) == m['n_base'] == 5 and all(isinstance(w, str) and w for w in m['out_classes'])
    assert m['out_class_draws'] == [{'prompt': 't_1', 'kind': 'words', 'seed': 1001, 'words': m['out_classes']}]
    assert m['method_config_resolved']['outclass_seed'] == -1 and m['method_config_resolved']['weights_batch_size'] == 0
    assert m['outclass_seed'] == 1 and m['weights_steps'] == [3]
    t0, t1 = m['mixture_weights']
    assert t0['prompt'] == 't_0' and t0['in_domain'] is None and t0['a_in'] is None                 # no unused a_in[0]
    with safe_open(str(cell.out_dir / 'state.safetensors'), 'pt') as f:
        a_in, a_out = f.get_tensor('weights.a_in'), f.get_tensor('weights.a_out')
    base_w = torch.stack([a_out[0], a_in[1]]).softmax(0)                                   # a base class: t_0 out, t_1 in
    new_w = a_out.softmax(0)                                                                # a new class: both out
    assert t1['in_domain'] == pytest.approx(base_w[1].item(), abs=1e-6) and t0['on_classes_of']['t_1'] == pytest.approx(base_w[0].item(), abs=1e-6)
    assert t0['out_of_domain'] == pytest.approx(new_w[0].item(), abs=1e-6) and t1['out_of_domain'] == pytest.approx(new_w[1].item(), abs=1e-6)
    assert 't_0' in m['mixture_weights_note'] and 'None' in m['mixture_weights_note']
    md = (tmp_path / 'base2new' / 'table.md').read_text()
    assert md.splitlines()[0] == '# base2new: 1 dataset: fashion_mnist' and '11 datasets' not in md


def test_the_title_counts_two_datasets(setup, tmp_path):
    s = run_grid('base2new', tmp_path, datasets=['fashion_mnist', 'digits'], settings=['zsclip'], seeds=[1], progress=False,
                 params={'n_views': 1, 'cache_dir': str(setup[4])})
    assert not s.failed, s.failed
    assert (tmp_path / 'base2new' / 'table.md').read_text().splitlines()[0] == '# base2new: 2 datasets: fashion_mnist, digits'


# --- the world weights file ----------------------------------------------------------------------------------------
def test_the_world_weights_file_is_refused_up_front_under_another_model(tmp_path):
    for args, message in [(['--model', 'cocoamix-tiny', '--pretrained', str(WORLD_WEIGHTS)], 'is the weights of cocoamix-world'),
                          (['--model', 'cocoamix-tiny', '--pretrained', 'world'], 'world is the weights of cocoamix-world'),
                          (['--model', 'no-such-clip'], 'unknown open_clip architecture')]:
        r = cli('base2new', '--methods', 'zsclip', *args, '--out', str(tmp_path))
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
        assert r.stderr.count('error:') == 1
    assert not any(tmp_path.iterdir())                                                      # refused before any cell ran


def test_a_world_file_of_another_architecture_is_refused_by_its_metadata(tmp_path):
    from cocoamix.protocols import check_model
    with pytest.raises(ValueError, match='holds cocoamix-world weights'):
        check_model('ViT-B-16', str(WORLD_WEIGHTS))
    check_model(WORLD_MODEL, str(WORLD_WEIGHTS))


def test_the_world_weights_file_is_the_world_model(tmp_path):
    "`--model cocoamix-world --pretrained data/world/world_model.safetensors` runs, as `--pretrained world` (same identity, world recorded)."
    from cocoamix.protocols import get_clip
    assert get_clip(WORLD_MODEL, str(WORLD_WEIGHTS), 'cpu').identity == get_clip(WORLD_MODEL, 'world', 'cpu').identity
    rel = os.path.relpath(WORLD_WEIGHTS)                                                    # as a user types it
    r = cli('base2new', '--methods', 'zsclip', '--seeds', '1', '--model', 'cocoamix-world', '--pretrained', rel,
            '--out', str(tmp_path / 'out'), '--cache-dir', str(tmp_path / 'cache'), '--param', 'n_views=1', '--in-process', '--quiet',
            env={'COCOAMIX_OFFLINE': 'builtin'})
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'running as --pretrained world' in r.stderr and '1 cells computed by this run' in r.stdout
    rec = json.loads(next((tmp_path / 'out' / 'base2new').rglob('metrics.json')).read_text())
    assert rec['params']['pretrained'] == 'world' and rec['world']['weights_sha256_16'] and not rec['pipeline_check']


def test_stage2_batch_and_word_seed_are_runner_knobs():
    "`--param outclass_seed=K` / `weights_batch_size=B` reach CoCoA-Mix's config, are checked, and name the cell."
    from cocoamix.runner import check_params, get_experiment, _label
    assert check_params('base2new', {'outclass_seed': 7, 'weights_batch_size': 16}) == {'outclass_seed': 7, 'weights_batch_size': 16}
    for bad in ({'outclass_seed': -2}, {'weights_batch_size': -1}, {'outclass_seed': 'seven'}):
        with pytest.raises((ValueError, TypeError)): check_params('base2new', bad)
    assert 'outclass_seed=7' in _label(get_experiment('base2new'), 'cocoamix', {'outclass_seed': 7, 'pretrained': 'none'})
