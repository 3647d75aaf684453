"""The data readers agree with CoOp's readers (KaiyangZhou/CoOp datasets/*.py, trainers/coop.py) and CEC's index
lists (icoz69/CEC-CVPR2021 data/index_list/), on small synthetic trees in the authors' exact layouts; and
`cocoamix data check` stats every file. Each test names the source file whose behaviour it pins."""
import json, os, pickle, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

import fixtures_data as fx
from cocoamix.data import (base_new_split, check_data, few_shot_splits, find_fscil_index_dir, fscil_sessions,
                           image_file_report, load_dataset)


def cli_data_check(root, *datasets):
    return subprocess.run([sys.executable, '-m', 'cocoamix', 'data', 'check', '--data-root', str(root), '--datasets',
                           *datasets], capture_output=True, text=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})


# ---------------------------------------------------------------- ImageNet-V2: CoOp datasets/imagenetv2.py


def test_imagenet_v2_reads_coops_folder(tmp_path):
    # CoOp datasets/imagenetv2.py: image_dir = "imagenetv2-matched-frequency-format-val"; `for label in range(1000)`:
    # class_dir = <image_dir>/<label>, classname = the label-th line of classnames.txt
    d = fx.imagenet_v2(tmp_path)
    assert (d / 'imagenetv2-matched-frequency-format-val' / '0' / 'a.jpeg').is_file()
    v2 = load_dataset('imagenet_v2', tmp_path)
    assert v2.classnames == fx.IMAGENET_NAMES and list(v2.test.labels) == [0, 1, 2, 3]
    assert all(f'/imagenetv2-matched-frequency-format-val/{y}/a.jpeg' in it for it, y in zip(v2.test.items, v2.test.labels))
    assert np.array_equal(np.asarray(v2.test.image(2)), fx.pixels(2, 0))
    assert 'imagenetv2/imagenetv2-matched-frequency-format-val/' in (Path(__file__).parents[1] / 'data' / 'README.md').read_text()


def test_imagenet_v2_old_folder_name_is_refused_with_the_right_one(tmp_path):
    d = fx.imagenet_v2(tmp_path)
    (d / fx.IMAGENET_V2_DIR).rename(d / 'imagenetv2-matched-frequency-f')
    with pytest.raises(FileNotFoundError) as e: load_dataset('imagenet_v2', tmp_path)
    msg = str(e.value)
    assert str(d / 'imagenetv2-matched-frequency-format-val') in msg and "Found 'imagenetv2-matched-frequency-f'" in msg


def test_imagenet_v2_needs_every_label_folder(tmp_path):
    # CoOp datasets/imagenetv2.py lists <label>/ for every label: a missing folder stops it, so it stops ours, by name
    d = fx.imagenet_v2(tmp_path)
    for f in (d / fx.IMAGENET_V2_DIR / '2').iterdir(): f.unlink()
    (d / fx.IMAGENET_V2_DIR / '2').rmdir()
    with pytest.raises(FileNotFoundError, match=r'1 of the 4 class folders 0..3 are missing \(e.g. 2\)'):
        load_dataset('imagenet_v2', tmp_path)


# ---------------------------------------------------------------- data check: every file


def test_data_check_counts_a_missing_last_image(tmp_path):
    # CoOp datasets/oxford_pets.py read_split (used by caltech101.py, dtd.py, ...) joins the json's paths and never
    # checks them; Dassl's DatasetWrapper (dassl/data/data_manager.py) opens each one while training. So we stat all.
    fx.caltech(tmp_path)                                 # 5 classes x (3 train, 1 val, 2 test) = 30 files
    ok = check_data(tmp_path, ['caltech101'])[0]
    assert ok['ok'] and 'all 30 image files present' in ok['message']
    last = tmp_path / 'caltech-101' / '101_ObjectCategories' / 'Motorbikes' / 'Motorbikes_0021.png'
    last.unlink()                                        # the very last test image
    load_dataset('caltech101', tmp_path)                 # the fast first-file check on load cannot see it ...
    row = check_data(tmp_path, ['caltech101'])[0]       # ... data check does
    assert not row['ok'] and '1 of 30 image files are missing or empty (test 1)' in row['message']
    assert str(last) in row['message'] and 'Fix: re-download or re-extract' in row['message']
    r = cli_data_check(tmp_path, 'caltech101')
    assert r.returncode == 1 and 'MISSING' in r.stdout and str(last) in r.stdout
    with pytest.raises(FileNotFoundError, match='1 of 30 image files'): load_dataset('caltech101', tmp_path, check_files='all')


def test_data_check_counts_an_emptied_class_folder_and_empty_files(tmp_path):
    fx.caltech(tmp_path)
    folder = tmp_path / 'caltech-101' / '101_ObjectCategories' / 'Leopards'
    for f in folder.iterdir(): f.unlink()                # 6 files: 3 train, 1 val, 2 test
    (tmp_path / 'caltech-101' / '101_ObjectCategories' / 'accordion' / 'accordion_0000.png').write_bytes(b'')   # 0 bytes
    row = check_data(tmp_path, ['caltech101'])[0]
    assert not row['ok'] and '7 of 30 image files are missing or empty (train 4, val 1, test 2)' in row['message']
    rep = image_file_report(load_dataset('caltech101', tmp_path, check_files='none'))
    assert rep['n_files'] == 30 and [len(rep['missing'][p]) for p in ('train', 'val', 'test')] == [4, 1, 2]
    assert str(folder / 'Leopards_0000.png') in row['message'] and '  ...' in row['message']   # 5 examples, then ...


def test_data_check_finds_an_emptied_imagenet_class_folder(tmp_path):
    # CoOp datasets/imagenet.py lists the class folders: an emptied one leaves no path to miss, only a class with no image
    fx.imagenet(tmp_path)
    assert check_data(tmp_path, ['imagenet'])[0]['ok']
    for f in (tmp_path / 'imagenet' / 'images' / 'train' / 'n01443537').iterdir(): f.unlink()
    row = check_data(tmp_path, ['imagenet'])[0]
    assert not row['ok'] and "'goldfish' (label 1) in imagenet/train" in row['message']
    assert cli_data_check(tmp_path, 'imagenet').returncode == 1


# ---------------------------------------------------------------- the missing-image error names the data root


def test_missing_image_error_names_the_data_root(tmp_path):
    # CoOp datasets/dtd.py: dataset_dir = <ROOT>/dtd, image_dir = <ROOT>/dtd/images; the data root is <ROOT>
    fx.write_coop_json_dataset(tmp_path, 'dtd', 'images', 'split_zhou_DescribableTextures.json', ['banded', 'blotchy'])
    first = tmp_path / 'dtd' / 'images' / 'banded' / 'banded_0000.png'
    first.unlink()
    with pytest.raises(FileNotFoundError) as e: load_dataset('dtd', tmp_path)
    msg = str(e.value)
    assert f'image file not found: {first}' in msg and f'Expected layout for DTD under the data root {tmp_path}:' in msg
    assert f'under the data root {tmp_path / "dtd"}' not in msg and '--data-root' in msg


# ---------------------------------------------------------------- ImageNet: CoOp datasets/imagenet.py


def _imagenet_tree(root, wnids, names, folders, n=(2, 2)):
    "classnames.txt with `wnids`/`names` in the given order; image folders only for `folders`."
    d = root / 'imagenet'
    fx.write_classnames(d / 'classnames.txt', wnids, names)
    for w in folders:
        label = wnids.index(w)
        for part, k in zip(('train', 'val'), n):
            for j in range(k): fx.write_png(d / 'images' / part / w / f'{w}_{j}.JPEG', fx.pixels(label, j))
    return d


def test_imagenet_val_is_the_whole_test_folder_never_few_shot(tmp_path):
    # CoOp datasets/imagenet.py: test = read_data(classnames, "val"); only train goes through generate_fewshot_dataset;
    # super().__init__(train_x=train, val=test, test=test)
    fx.imagenet(tmp_path, n_train=3, n_val=2)
    ds = load_dataset('imagenet', tmp_path)
    assert ds.val is ds.test and ds.val_is_test and len(ds.test) == 8
    k1 = few_shot_splits(ds, 1, seed=1)
    assert len(k1.train) == 4 and k1.val is ds.test and len(k1.val) == 8 and k1.test is ds.test
    base, new = base_new_split(k1)     # subsample_classes(train, test), val = test
    assert base.val.items == base.test.items and len(base.val) == 4 and base.val_is_test


def test_imagenet_classnames_underscores_become_spaces(tmp_path):
    # CoOp trainers/coop.py: classnames = [name.replace("_", " ") for name in classnames]
    wnids = fx.IMAGENET_WNIDS
    _imagenet_tree(tmp_path, wnids, ['tench', 'goldfish', 'great_white_shark', 'tiger_shark'], wnids)
    ds = load_dataset('imagenet', tmp_path)
    assert ds.classnames == ['tench', 'goldfish', 'great white shark', 'tiger shark']
    assert ds.prompts()[2] == 'a photo of a great white shark.'
    fx.imagenet_a(tmp_path)
    fx.write_classnames(tmp_path / 'imagenet-adversarial' / 'classnames.txt', wnids, ['tench', 'gold_fish', 'x', 'tiger_shark'])
    assert load_dataset('imagenet_a', tmp_path).classnames == ['gold fish', 'tiger shark']


def test_partial_imagenet_tree_is_labelled_by_the_folders_present(tmp_path):
    # CoOp datasets/imagenet.py read_data: folders = sorted(folders present); `for label, folder in enumerate(folders)`,
    # classname = classnames[folder]. 2 of 4 folders -> 2 classes, labels 0, 1 in sorted-wnid order, whatever the
    # order of classnames.txt (written reversed here).
    wnids, names = fx.IMAGENET_WNIDS[::-1], fx.IMAGENET_NAMES[::-1]
    _imagenet_tree(tmp_path, wnids, names, ['n01491361', 'n01443537'])
    with pytest.warns(UserWarning, match='2 of the 4 classes of classnames.txt have folders'):
        ds = load_dataset('imagenet', tmp_path)
    assert ds.classnames == ['goldfish', 'tiger shark'] and list(ds.train.labels) == [0, 0, 1, 1]
    assert list(ds.test.labels) == [0, 0, 1, 1] and '/n01443537/' in ds.train.items[0]
    assert np.array_equal(np.asarray(ds.train.image(2)), fx.pixels(wnids.index('n01491361'), 0))
    row = check_data(tmp_path, ['imagenet'])[0]
    assert row['ok'] and '2 classes' in row['message'] and 'note: ' in row['message']


def test_imagenet_train_and_val_folders_must_agree(tmp_path):
    # CoOp labels train and val each by its own sorted folders: different folder sets would mislabel silently
    d = _imagenet_tree(tmp_path, fx.IMAGENET_WNIDS, fx.IMAGENET_NAMES, fx.IMAGENET_WNIDS)
    for f in (d / 'images' / 'val' / 'n01484850').iterdir(): f.unlink()
    (d / 'images' / 'val' / 'n01484850').rmdir()
    with pytest.raises(ValueError, match=r"train and val hold different class folders \(4 and 3; e.g. 'n01484850' only in train/\)"):
        load_dataset('imagenet', tmp_path)


# ---------------------------------------------------------------- FGVCAircraft: CoOp datasets/fgvc_aircraft.py


def test_aircraft_without_variants_txt_is_refused(tmp_path):
    # CoOp datasets/fgvc_aircraft.py: classnames = lines of variants.txt, cname2lab = {c: i}; no fallback order
    fx.aircraft(tmp_path, variants=None)
    with pytest.raises(FileNotFoundError) as e: load_dataset('fgvc_aircraft', tmp_path)
    msg = str(e.value)
    assert f'not found: {tmp_path / "fgvc_aircraft" / "variants.txt"}' in msg
    assert 'fgvc-aircraft-2013b.tar.gz' in msg and "CoOp's datasets/fgvc_aircraft.py" in msg
    assert not check_data(tmp_path, ['fgvc_aircraft'])[0]['ok']
    fx.aircraft(tmp_path, variants=['F/A-18', 'Boeing 737', 'A300B4'])    # label = line of variants.txt
    ds = load_dataset('fgvc_aircraft', tmp_path)
    assert ds.classnames == ['F/A-18', 'Boeing 737', 'A300B4'] and list(ds.test.labels) == [0, 2, 1]


# ---------------------------------------------------------------- FSCIL: CEC's index lists


def _cec_index_lists(folder, n_train=6):
    """CEC's format (icoz69/CEC-CVPR2021 data/index_list/README.md): session_1.txt = every training image of the 60
    base classes (30000 = 60 x 500 lines for CIFAR-100), session_t.txt (t = 2..9) = 25 lines, 5 classes x 5 shots;
    each line an index into CIFAR-100's training arrays (dataloader/cifar100/cifar.py). Here 6 images per class."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'session_1.txt').write_text('\n'.join(str(c * n_train + j) for c in range(60) for j in range(n_train)) + '\n')
    chosen = {}
    for t in range(2, 10):
        cls = range(60 + 5 * (t - 2), 60 + 5 * (t - 1))
        chosen[t] = [c * n_train + j for c in cls for j in (5, 3, 1, 0, 4)]
        (folder / f'session_{t}.txt').write_text('\n'.join(map(str, chosen[t])) + '\n')
    return chosen


@pytest.mark.parametrize('layout', ['cifar100/index_list', 'index_list/cifar100'])
def test_fscil_finds_cec_index_lists_under_the_data_root(tmp_path, layout):
    raw = fx.cifar100(tmp_path, n_train=6, n_test=1)
    chosen = _cec_index_lists(tmp_path / layout)
    ds = load_dataset('cifar100', tmp_path)
    assert find_fscil_index_dir('cifar100', tmp_path) == tmp_path / layout
    fs = fscil_sessions(ds)
    assert fs.source == f'cec-index: {tmp_path / layout} (found under the data root)' and fs.from_index_files
    train_px = raw['train'][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert len(fs[0].train) == 360 and [len(s.train) for s in fs.sessions[1:]] == [25] * 8
    assert all(np.array_equal(it, train_px[i]) for it, i in zip(fs[2].train.items, chosen[3]))   # sessions[k] = session_{k+1}.txt
    row = check_data(tmp_path, ['cifar100'])[0]
    assert row['ok'] and f'FSCIL index files: {tmp_path / layout}' in row['message']


def test_fscil_prefers_our_layout_and_says_where_it_looked(tmp_path):
    fx.cifar100(tmp_path, n_train=6, n_test=1)
    ds = load_dataset('cifar100', tmp_path)
    gen = fscil_sessions(ds)
    assert gen.source.startswith('generated (seed 0); no CEC index files in ')
    assert str(tmp_path / 'cifar100' / 'index_list') in gen.source and str(tmp_path / 'index_list' / 'cifar100') in gen.source
    _cec_index_lists(tmp_path / 'index_list' / 'cifar100'); _cec_index_lists(tmp_path / 'cifar100' / 'index_list')
    assert fscil_sessions(ds).source.startswith(f'cec-index: {tmp_path / "cifar100" / "index_list"} ')
    assert fscil_sessions(ds, index_dir='generated').source.startswith('generated')


def test_fscil_base_shots_with_cec_index_files(tmp_path):
    # the bug: K-shot sampling shrank the training split first, so CEC's indices (into the full arrays) ran out of
    # range ("index 32048 is out of range" with CEC's session_1.txt). Now the K shots come from the base session itself.
    raw = fx.cifar100(tmp_path, n_train=6, n_test=1)
    chosen = _cec_index_lists(tmp_path / 'index_list' / 'cifar100')
    ds = load_dataset('cifar100', tmp_path)
    fs = fscil_sessions(ds, base_shots=2, seed=1)
    assert fs.from_index_files and 'base session 2 shots per class (seed 1)' in fs.source
    assert len(fs[0].train) == 120 and (np.bincount(fs[0].train.labels) == 2).all()
    assert [len(s.train) for s in fs.sessions[1:]] == [25] * 8
    train_px = raw['train'][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert all(np.array_equal(it, train_px[i]) for it, i in zip(fs[1].train.items, chosen[2]))
    pos = [next(i for i in range(600) if np.array_equal(train_px[i], it)) for it in fs[0].train.items]
    assert all(p // 6 == fs.class_order[y] for p, y in zip(pos, fs[0].train.labels))   # each shot is of its class
    assert [s.train.fingerprint() for s in fs.sessions] == [s.train.fingerprint() for s in fscil_sessions(ds, base_shots=2, seed=1).sessions]
    assert fs[0].train.fingerprint() != fscil_sessions(ds, base_shots=2, seed=2)[0].train.fingerprint()


def test_run_fscil_with_base_shots_and_index_files(tmp_path):
    # the protocol end to end (zero-shot CLIP, tiny model: no training), `--param base_shots` with CEC's files
    from cocoamix.protocols import run_fscil
    fx.cifar100(tmp_path, n_train=6, n_test=1)
    _cec_index_lists(tmp_path / 'cifar100' / 'index_list')
    r = run_fscil(dataset='cifar100', method='zsclip', data_root=str(tmp_path), base_shots=2, progress=False)
    assert r['split_source'].startswith(f'cec-index: {tmp_path / "cifar100" / "index_list"} (found under the data root)')
    assert len(r['sessions']) == 9
