"""cocoamix.data: loaders on fixtures in the exact CoOp formats, the vendored Fashion-MNIST, the protocols
(few-shot, base-to-new, FSCIL) and the error messages. Fast and offline."""
import gzip, json, os, re, warnings
from pathlib import Path

import numpy as np
import pytest

import fixtures_data as fx
from cocoamix import data as D
from cocoamix.data import (BUILTIN, REGISTRY, DatasetSplits, ImageDataset, Split, base_new_split, few_shot,
                           few_shot_splits, fscil_sessions, load_dataset, train_transform)
from cocoamix.data import test_transform as eval_transform   # a name starting with test_ would be collected

DEBIAN_FM = Path('/usr/share/datasets/fashion-mnist')
REPO = Path(__file__).resolve().parents[1]


def px(split, i): return np.asarray(split.image(i))


# ---------------------------------------------------------------- CoOp json datasets
def test_caltech_coop_json(tmp_path):
    written = fx.caltech(tmp_path)   # json holds raw folder names: the renames must apply
    ds = load_dataset('caltech101', tmp_path)
    assert ds.classnames == fx.CALTECH_COOP_NAMES
    assert ds.template == 'a photo of a {}.' and ds.prompts()[1] == 'a photo of a airplane.'
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 10)
    for split, part in ((ds.train, 'train'), (ds.val, 'val'), (ds.test, 'test')):
        assert split.classnames == ds.classnames and split.name == f'caltech101/{part}'
        assert split.labels.dtype == np.int64
        assert list(split.labels) == [l for _, l, _ in written[part]]
        for i, (rel, _, arr) in enumerate(written[part]):
            assert split.items[i] == str(tmp_path / 'caltech-101' / '101_ObjectCategories' / rel)
            assert Path(split.items[i]).is_absolute()
            assert split.image(i).mode == 'RGB' and np.array_equal(px(split, i), arr)
    assert 'split_zhou_Caltech101.json' in ds.source


def test_caltech_json_with_coop_names_is_identical(tmp_path):
    fx.caltech(tmp_path / 'a')
    fx.caltech(tmp_path / 'b', json_names=fx.CALTECH_COOP_NAMES)
    a, b = load_dataset('caltech101', tmp_path / 'a'), load_dataset('caltech101', tmp_path / 'b')
    assert a.classnames == b.classnames == fx.CALTECH_COOP_NAMES
    assert list(a.test.labels) == list(b.test.labels)


def test_caltech_json_still_holding_dropped_classes(tmp_path):
    classes = ['BACKGROUND_Google', 'accordion', 'Faces', 'Faces_easy', 'airplanes']
    fx.write_coop_json_dataset(tmp_path, 'caltech-101', '101_ObjectCategories', 'split_zhou_Caltech101.json',
                               classes, (2, 1, 1))
    ds = load_dataset('caltech101', tmp_path)
    assert ds.classnames == ['accordion', 'face', 'airplane']
    assert len(ds.train) == 6 and sorted(set(ds.train.labels)) == [0, 1, 2]
    assert np.array_equal(px(ds.train, 0), fx.pixels(1, 0))   # first kept image is accordion's


def test_caltech_folder_route_drops_and_renames(tmp_path):
    img = tmp_path / 'caltech-101' / '101_ObjectCategories'
    for label, c in enumerate(['BACKGROUND_Google', 'Faces', 'Faces_easy', 'Leopards', 'airplanes', 'dollar_bill']):
        for j in range(10): fx.write_png(img / c / f'image_{j:04d}.jpg', fx.pixels(label, j))
    ds = load_dataset('caltech101', tmp_path, source='folder', seed=3)
    assert ds.classnames == ['face', 'leopard', 'airplane', 'dollar bill']   # sorted raw names, then renamed
    assert list(ds.train.counts()) == [5] * 4 and list(ds.val.counts()) == [2] * 4 and list(ds.test.counts()) == [3] * 4
    again = load_dataset('caltech101', tmp_path, source='folder', seed=3)
    assert again.train.fingerprint() == ds.train.fingerprint()
    assert load_dataset('caltech101', tmp_path, source='folder', seed=4).train.fingerprint() != ds.train.fingerprint()
    all_items = ds.train.items + ds.val.items + ds.test.items
    assert len(set(all_items)) == 40


def test_folder_route_with_split_folders(tmp_path):
    for part, n in (('train', 5), ('test', 2)):
        for label, c in enumerate(['cat', 'hot_dog']):
            for j in range(n): fx.write_png(tmp_path / 'mine' / part / c / f'{j}.png', fx.pixels(label, j))
    ds = load_dataset('my_data', source='folder', path=tmp_path / 'mine')
    assert ds.classnames == ['cat', 'hot dog'] and ds.template == 'a photo of a {}.'
    assert list(ds.train.counts()) == [4, 4] and list(ds.val.counts()) == [1, 1] and len(ds.test) == 4
    assert np.array_equal(px(ds.test, 3), fx.pixels(1, 1))


def test_eurosat_long_names(tmp_path):
    written = fx.eurosat(tmp_path)
    ds = load_dataset('eurosat', tmp_path)
    assert ds.classnames == ['Annual Crop Land', 'Forest', 'Herbaceous Vegetation Land', 'Highway or Road',
                             'Industrial Buildings', 'Pasture Land', 'Permanent Crop Land', 'Residential Buildings',
                             'River', 'Sea or Lake']
    assert ds.prompts()[-1] == 'a centered satellite photo of Sea or Lake.'
    assert len(ds.test) == 10 and np.array_equal(px(ds.test, 9), written['test'][9][2])
    # a json that already holds the long names gives the same result
    fx.eurosat(tmp_path / 'b', json_names=list(ds.classnames))
    assert load_dataset('eurosat', tmp_path / 'b').classnames == ds.classnames


def test_ucf101_camelcase(tmp_path):
    fx.ucf101(tmp_path)
    ds = load_dataset('ucf101', tmp_path)
    assert ds.classnames == ['Apply Eye Makeup', 'Yo Yo', 'Playing Daf']
    assert ds.prompts()[0] == 'a photo of a person doing Apply Eye Makeup.'


def test_aircraft_variant_files(tmp_path):
    pix = fx.aircraft(tmp_path)
    ds = load_dataset('fgvc_aircraft', tmp_path)
    assert ds.classnames == ['A300B4', 'Boeing 737', 'F/A-18']   # the order of variants.txt (the fixture writes it sorted)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 1, 3)
    assert list(ds.train.labels) == [1, 0, 2, 0] and list(ds.test.labels) == [2, 0, 1]
    assert ds.test.items[0].endswith('fgvc_aircraft/images/1000006.jpg')
    assert np.array_equal(px(ds.test, 0), pix['1000006'])
    assert ds.template == 'a photo of a {}, a type of aircraft.'


def test_aircraft_variants_txt_sets_the_order(tmp_path):
    fx.aircraft(tmp_path, variants=['F/A-18', 'Boeing 737', 'A300B4'])
    ds = load_dataset('fgvc_aircraft', tmp_path)
    assert ds.classnames == ['F/A-18', 'Boeing 737', 'A300B4'] and list(ds.train.labels) == [1, 2, 0, 2]


def test_imagenet_and_variants(tmp_path):
    fx.imagenet(tmp_path)
    ds = load_dataset('imagenet', tmp_path)
    assert ds.classnames == fx.IMAGENET_NAMES and len(ds.train) == 12 and len(ds.test) == 8
    assert ds.val.items == ds.test.items and ds.test.name == 'imagenet/test'   # CoOp tests on val
    assert np.array_equal(px(ds.train, 4), fx.pixels(1, 1))
    fx.imagenet_a(tmp_path)
    a = load_dataset('imagenet_a', tmp_path)
    assert a.classnames == ['goldfish', 'tiger shark'] and len(a.test) == 4 and len(a.train) == 0
    assert list(a.test.labels) == [0, 0, 1, 1]
    fx.imagenet_v2(tmp_path)
    v2 = load_dataset('imagenet_v2', tmp_path)
    assert v2.classnames == fx.IMAGENET_NAMES and list(v2.test.labels) == [0, 1, 2, 3]


def test_cifar100_pickles(tmp_path):
    raw = fx.cifar100(tmp_path, n_train=3, n_test=1)
    ds = load_dataset('cifar100', tmp_path)
    assert len(ds.classnames) == 100 and ds.classnames[1] == 'aquarium fish'
    assert len(ds.train) == 300 and len(ds.test) == 100 and len(ds.val) == 0
    data, labels = raw['train']
    assert np.array_equal(ds.train.items[7], data[7].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.array_equal(px(ds.train, 7), ds.train.items[7]) and ds.train.labels[7] == labels[7]


# ---------------------------------------------------------------- Hugging Face route
def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip('datasets')
    from PIL import Image
    names = ['apple_pie', 'ramen', 'sushi']
    def part(n, off):
        labels = [c for c in range(3) for _ in range(n)]
        arrs = [fx.pixels(c, off + j) for j, c in enumerate(labels)]
        ds = datasets.Dataset.from_dict({'image': [Image.fromarray(a) for a in arrs], 'label': labels})
        ds = ds.cast_column('image', datasets.Image()).cast_column('label', datasets.ClassLabel(names=names))
        return ds, arrs, labels
    (tr, tr_arr, tr_lab), (te, te_arr, te_lab) = part(5, 0), part(2, 100)
    datasets.DatasetDict({'train': tr, 'test': te}).save_to_disk(str(tmp_path / 'hf'))
    ds = load_dataset('food101', source='hf', path=tmp_path / 'hf', seed=0)
    assert ds.classnames == ['apple pie', 'ramen', 'sushi'] and ds.template == 'a photo of {}, a type of food.'
    assert len(ds.test) == 6 and list(ds.test.labels) == te_lab
    assert all(np.array_equal(px(ds.test, i), te_arr[i]) for i in range(6))
    assert list(ds.train.counts()) == [4, 4, 4] and list(ds.val.counts()) == [1, 1, 1]   # 20% held out
    pool = {a.tobytes() for a in tr_arr}
    assert all(np.asarray(it).tobytes() in pool for it in ds.train.items + ds.val.items)
    assert 'load_from_disk' in ds.source
    # an unregistered name works with an explicit path; a custom split mapping and column names too
    d2 = datasets.DatasetDict({'training': tr.rename_column('image', 'img'), 'validation': te.rename_column('image', 'img'),
                               'testing': te.rename_column('image', 'img')})
    d2.save_to_disk(str(tmp_path / 'hf2'))
    ds2 = load_dataset('my_food', source='hf', path=tmp_path / 'hf2', image_column='img',
                       splits={'train': 'training', 'val': 'validation', 'test': 'testing'})
    assert len(ds2.train) == 15 and len(ds2.val) == 6 and ds2.classnames == ['apple pie', 'ramen', 'sushi']


# ---------------------------------------------------------------- built-in data
def test_builtin_fashion_mnist():
    ds = load_dataset(BUILTIN)
    assert ds is not None and ds.name == BUILTIN and ds.template == 'a photo of a {}.'
    assert ds.classnames == ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                             'Bag', 'Ankle boot']
    assert list(ds.train.counts()) == [32] * 10 and list(ds.val.counts()) == [8] * 10
    assert list(ds.test.counts()) == [40] * 10
    assert ds.train.image(0).mode == 'RGB' and ds.train.image(0).size == (28, 28)
    f = REPO / 'data' / 'fashion_mnist' / 'fashion_mnist_subset.npz'
    assert f.stat().st_size < 1_000_000
    assert load_dataset(BUILTIN, source='builtin').test.fingerprint() == ds.test.fingerprint()


def _read_idx(p):
    with gzip.open(p, 'rb') as f: b = f.read()
    nd = b[3]; dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], 'big') for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


@pytest.mark.skipif(not DEBIAN_FM.exists(), reason='Debian dataset-fashion-mnist not installed')
def test_builtin_pixels_equal_debian_files():
    z = np.load(REPO / 'data' / 'fashion_mnist' / 'fashion_mnist_subset.npz')
    ds = load_dataset(BUILTIN)
    for part, stem in (('train', 'train'), ('val', 'train'), ('test', 't10k')):
        imgs, labels = _read_idx(DEBIAN_FM / f'{stem}-images-idx3-ubyte.gz'), _read_idx(DEBIAN_FM / f'{stem}-labels-idx1-ubyte.gz')
        split, index = getattr(ds, part), z[f'{part}_index']
        for i in (0, 1, 17, len(split) - 1):
            assert np.array_equal(split.items[i], imgs[index[i]]) and split.labels[i] == labels[index[i]]
            assert np.array_equal(px(split, i)[..., 0], imgs[index[i]])
        # first-N per class in file order
        for c in range(10):
            first = np.flatnonzero(labels == c)
            got = index[split.labels == c]
            want = first[:32] if part == 'train' else first[32:40] if part == 'val' else first[:40]
            assert list(got) == list(want)


def test_data_root_env_override(tmp_path, monkeypatch):
    fx.eurosat(tmp_path)
    monkeypatch.setenv('COCOAMIX_DATA', str(tmp_path))
    assert D.data_root() == tmp_path and len(load_dataset('eurosat').classnames) == 10
    assert len(load_dataset(BUILTIN).train) == 320   # built-in data falls back to the repo's data/


# ---------------------------------------------------------------- few-shot
def test_few_shot_deterministic_and_per_class():
    ds = load_dataset(BUILTIN)
    a, b, c = (few_shot_splits(ds, 8, s) for s in (1, 1, 2))
    assert list(a.train.counts()) == [8] * 10 and list(a.val.counts()) == [4] * 10 and len(a.test) == 400
    assert a.test is ds.test
    assert a.train.fingerprint() == b.train.fingerprint() and a.val.fingerprint() == b.val.fingerprint()
    assert a.train.fingerprint() != c.train.fingerprint()
    assert list(few_shot_splits(ds, 2, 1).val.counts()) == [2] * 10
    assert few_shot(ds.train, None, 1) is ds.train
    # shots are real members of the train split
    pool = {it.tobytes() for it in ds.train.items}
    assert all(it.tobytes() in pool for it in a.train.items)
    with pytest.raises(ValueError, match='shots must be >= 1'): few_shot(ds.train, 0, 1)


def test_few_shot_cache_written_and_reused(tmp_path):
    ds = load_dataset(BUILTIN)
    s1 = few_shot(ds.train, 4, 1, cache_dir=tmp_path)
    files = list(tmp_path.glob('fewshot_*.json'))
    assert len(files) == 1 and ds.train.fingerprint() in files[0].name and '_k4_s1' in files[0].name
    rec = json.loads(files[0].read_text())
    assert rec['seed'] == 1 and rec['shots'] == 4 and len(rec['indices']) == 40
    assert few_shot(ds.train, 4, 1, cache_dir=tmp_path).fingerprint() == s1.fingerprint()
    rec['indices'] = list(range(40))   # the cache is read, not recomputed
    files[0].write_text(json.dumps(rec))
    s2 = few_shot(ds.train, 4, 1, cache_dir=tmp_path)
    assert s2.items[5] is ds.train.items[5] and len(s2) == 40
    few_shot_splits(ds, 4, 2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob('fewshot_*.json'))) == 3   # + train seed 2 + val seed 2


def test_few_shot_too_few_images_warns(tmp_path):
    fx.caltech(tmp_path)   # 3 train images per class
    ds = load_dataset('caltech101', tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = few_shot(ds.train, 5, 1)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 5 and all(issubclass(x.category, UserWarning) for x in w)
    assert "caltech101/train: class 'airplane' (label 1) has only 3 images, fewer than 5 shots; taking all" in msgs[1]
    assert list(s.counts()) == [3] * 5


def test_shots_sampled_before_base_new():
    ds = load_dataset(BUILTIN)
    fs = few_shot_splits(ds, 4, 3)
    base, new = base_new_split(fs)
    keep = fs.train.labels < 5
    assert [id(i) for i in base.train.items] == [id(i) for i, k in zip(fs.train.items, keep) if k]
    assert list(base.train.labels) == list(fs.train.labels[keep])
    assert [id(i) for i in new.train.items] == [id(i) for i, k in zip(fs.train.items, keep) if not k]
    assert list(new.train.labels) == list(fs.train.labels[~keep] - 5)
    assert base.orig_labels == [0, 1, 2, 3, 4] and new.orig_labels == [5, 6, 7, 8, 9]
    assert base.train.name.endswith('/base') and base.train.fingerprint() != new.train.fingerprint()
    assert len(new.test) == 200 and set(new.test.labels) == set(range(5))


@pytest.mark.parametrize('n,m', [(5, 3), (4, 2), (1, 1), (7, 4)])
def test_base_new_relabelling(n, m):
    names = [f'c{i}' for i in range(n)]
    items = [np.full((2, 2), i, np.uint8) for i in range(n) for _ in range(2)]
    sp = lambda p: Split(items, np.repeat(np.arange(n), 2), names, f't/{p}')
    ds = DatasetSplits('toy', sp('train'), sp('val'), sp('test'), names, '{}', 'toy')
    base, new = base_new_split(ds)
    assert base.classnames == names[:m] and new.classnames == names[m:]
    assert list(base.test.labels) == list(np.repeat(np.arange(m), 2))
    assert list(new.test.labels) == list(np.repeat(np.arange(n - m), 2))
    assert all(int(it[0, 0]) == m + y for it, y in zip(new.test.items, new.test.labels))
    # applying base_new_split again to the base half keeps the original labels traceable
    bb, bn = base_new_split(base)
    assert bb.orig_labels + bn.orig_labels == list(range(m))


# ---------------------------------------------------------------- FSCIL
def _toy100(n_train=7):
    names = [f'class {c}' for c in range(100)]
    items = [np.array([[c, j], [0, 0]], np.uint8) for c in range(100) for j in range(n_train)]   # unique images
    tr = Split(items, np.repeat(np.arange(100), n_train), names, 'toy/train')
    te = Split([np.full((2, 2), c, np.uint8) for c in range(100) for _ in range(2)], np.repeat(np.arange(100), 2), names, 'toy/test')
    return DatasetSplits('toy', tr, Split([], [], names, 'toy/val'), te, names, 'a photo of a {}.', 'toy')


def test_fscil_generated():
    ds = _toy100()
    fs = fscil_sessions(ds, seed=1)
    assert len(fs.sessions) == 9 and not fs.from_index_files and 'generated' in fs.source
    assert fs[0].classes == list(range(60)) and len(fs[0].train) == 60 * 7
    for k, s in enumerate(fs.sessions[1:], 1):
        assert s.classes == list(range(60 + 5 * (k - 1), 60 + 5 * k))
        assert len(s.train) == 25 and list(np.bincount(s.train.labels, minlength=100)[s.classes]) == [5] * 5
        assert len(s.test) == 2 * (60 + 5 * k) and len(s.test.classnames) == 60 + 5 * k
        # each image belongs to its class (the toy pixel value is the original label)
        assert all(fs.class_order[y] == int(it[0, 0]) for it, y in zip(s.train.items, s.train.labels))
    assert fs.class_order == list(range(100))
    again, other = fscil_sessions(ds, seed=1), fscil_sessions(ds, seed=2)
    assert [s.train.fingerprint() for s in again.sessions] == [s.train.fingerprint() for s in fs.sessions]
    assert [s.train.fingerprint() for s in other.sessions[1:]] != [s.train.fingerprint() for s in fs.sessions[1:]]


def test_fscil_cec_index_files(tmp_path):
    ds = _toy100()
    # CEC's CIFAR-100 files list indices into the training arrays; session 1 is the base session
    (tmp_path / 'session_1.txt').write_text('\n'.join(str(i) for i in range(60 * 7)) + '\n')
    chosen = {}
    for k in range(2, 10):
        cls = range(60 + 5 * (k - 2), 60 + 5 * (k - 1))
        idx = [c * 7 + j for c in cls for j in (6, 4, 2, 1, 0)]
        chosen[k] = idx
        (tmp_path / f'session_{k}.txt').write_text('\n'.join(map(str, idx)) + '\n')
    fs = fscil_sessions(ds, index_dir=tmp_path)
    assert fs.from_index_files and str(tmp_path) in fs.source
    assert len(fs[0].train) == 420 and fs[1].classes == [60, 61, 62, 63, 64]
    assert [id(i) for i in fs[3].train.items] == [id(ds.train.items[i]) for i in chosen[4]]
    assert len(fs[8].test) == 200
    # without session_1.txt the base session is all training images of the first 60 classes
    (tmp_path / 'session_1.txt').unlink()
    assert len(fscil_sessions(ds, index_dir=tmp_path)[0].train) == 420


def test_fscil_index_files_with_paths(tmp_path):
    # mini-ImageNet/CUB style: lines are image paths, matched by their trailing components
    names = [f'c{i}' for i in range(6)]
    root = tmp_path / 'imgs'
    items = [str(root / 'train' / f'c{c}' / f'{j}.png') for c in range(6) for j in range(3)]
    tr = Split(items, np.repeat(np.arange(6), 3), names, 'p/train')
    ds = DatasetSplits('p', tr, Split([], [], names, 'p/val'), tr.subset(range(0, 18, 3), 'p/test'), names, '{}', 'p')
    idx = tmp_path / 'index'; idx.mkdir()
    (idx / 'session_1.txt').write_text('\n'.join(f'imgs/train/c{c}/{j}.png' for c in (0, 1, 2, 3) for j in range(3)))
    (idx / 'session_2.txt').write_text('train/c5/2.png\ntrain/c5/0.png\n')
    (idx / 'session_3.txt').write_text('train/c4/1.png\n')
    fs = fscil_sessions(ds, index_dir=idx, base_classes=4, ways=1, shots=2, n_sessions=2)
    assert fs.class_order == [0, 1, 2, 3, 5, 4]
    assert fs[1].train.items == [items[17], items[15]] and list(fs[1].train.labels) == [4, 4]
    assert fs.classnames[4] == 'c5' and len(fs[2].test) == 6
    (idx / 'session_3.txt').write_text('train/c9/1.png\n')
    with pytest.raises(ValueError, match=r"'train/c9/1.png' matches no image"):
        fscil_sessions(ds, index_dir=idx, base_classes=4, ways=1, shots=2, n_sessions=2)


def test_fscil_on_cifar100_fixture(tmp_path):
    fx.cifar100(tmp_path, n_train=6, n_test=1)
    fs = fscil_sessions(load_dataset('cifar100', tmp_path))
    assert len(fs.sessions) == 9 and [len(s.train) for s in fs.sessions] == [360] + [25] * 8
    assert fs[0].train.items[0].shape == (32, 32, 3)


def test_fscil_errors(tmp_path):
    with pytest.raises(ValueError, match='FSCIL needs 100 classes'):
        fscil_sessions(load_dataset(BUILTIN))
    with pytest.raises(FileNotFoundError, match='session_2.txt'):
        fscil_sessions(_toy100(), index_dir=tmp_path)


# ---------------------------------------------------------------- transforms, torch dataset, fingerprints
def test_transforms_and_image_dataset():
    import torch
    ds = load_dataset(BUILTIN)
    x, y = ImageDataset(ds.test, eval_transform(224))[0]
    assert x.shape == (3, 224, 224) and y == int(ds.test.labels[0])
    assert torch.allclose(x[0], x[1], atol=1.0)   # grey image: channels differ only by the normalisation
    torch.manual_seed(0)
    xa = ImageDataset(ds.train, train_transform(64))[3][0]
    assert xa.shape == (3, 64, 64)
    t = train_transform(32); names = [type(s).__name__ for s in t.transforms]
    assert names == ['Lambda', 'RandomResizedCrop', 'RandomHorizontalFlip', 'ToTensor', 'Normalize']
    rrc = t.transforms[1]
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation.value == 'bicubic'
    assert [type(s).__name__ for s in eval_transform(32).transforms] == ['Lambda', 'Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    import pickle; pickle.dumps(eval_transform(32).transforms[0].lambd)   # picklable for loader workers


def test_fingerprint_stability(tmp_path):
    fx.caltech(tmp_path)
    a, b = load_dataset('caltech101', tmp_path), load_dataset('caltech101', tmp_path)
    assert a.train.fingerprint() == b.train.fingerprint() and re.fullmatch(r'[0-9a-f]{16}', a.train.fingerprint())
    assert a.train.fingerprint() != a.test.fingerprint()
    renamed = Split(a.train.items, a.train.labels, a.train.classnames, 'other/train')
    assert renamed.fingerprint() != a.train.fingerprint()


# ---------------------------------------------------------------- bad input
def test_unknown_dataset_name():
    with pytest.raises(ValueError) as e: load_dataset('imagenet1k')
    msg = str(e.value)
    assert "unknown dataset 'imagenet1k'" in msg and all(k in msg for k in REGISTRY)
    with pytest.raises(ValueError, match='unknown source'): load_dataset('caltech101', source='s3')


def test_missing_folder_and_split_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e: load_dataset('oxford_pets', tmp_path)
    msg = str(e.value)
    assert str(tmp_path / 'oxford_pets') in msg and 'split_zhou_OxfordPets.json' in msg
    assert 'data/README.md' in msg and "CoOp's DATASETS.md" in msg and 'images/' in msg
    (tmp_path / 'oxford_pets' / 'images').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'oxford_pets' / 'split_zhou_OxfordPets.json'))):
        load_dataset('oxford_pets', tmp_path)
    fx.caltech(tmp_path)
    os.remove(tmp_path / 'caltech-101' / '101_ObjectCategories' / 'accordion' / 'accordion_0000.png')
    with pytest.raises(FileNotFoundError, match='accordion_0000.png'): load_dataset('caltech101', tmp_path)
    with pytest.raises(FileNotFoundError, match='images_variant_train.txt'): load_dataset('fgvc_aircraft', tmp_path)
    with pytest.raises(FileNotFoundError, match='classnames.txt'):
        (tmp_path / 'imagenet').mkdir(); load_dataset('imagenet', tmp_path)


def test_split_json_label_disagreement(tmp_path):
    fx.caltech(tmp_path)
    f = tmp_path / 'caltech-101' / 'split_zhou_Caltech101.json'
    js = json.loads(f.read_text())
    js['test'][3][2] = 'tambourine'    # label 1 ('airplane') in train, 'tambourine' in test
    f.write_text(json.dumps(js))
    with pytest.raises(ValueError, match=r"label 1: expected 'airplane', got 'tambourine'"):
        load_dataset('caltech101', tmp_path)


def test_classnames_disagree_with_registry_or_caller(tmp_path):
    names = list(fx.EUROSAT); names[3] = 'Motorway'
    fx.eurosat(tmp_path, json_names=names)
    with pytest.raises(ValueError, match=r"label 3: expected 'Highway or Road', got 'Motorway'"):
        load_dataset('eurosat', tmp_path)
    fx.caltech(tmp_path)
    with pytest.raises(ValueError, match=r"label 2: expected 'faces', got 'face'"):
        load_dataset('caltech101', tmp_path, classnames=['accordion', 'airplane', 'faces', 'leopard', 'motorbike'])
    assert load_dataset('caltech101', tmp_path, classnames=fx.CALTECH_COOP_NAMES).classnames == fx.CALTECH_COOP_NAMES


def test_labels_must_be_contiguous(tmp_path):
    fx.caltech(tmp_path)
    f = tmp_path / 'caltech-101' / 'split_zhou_Caltech101.json'
    js = json.loads(f.read_text())
    for part in js.values():
        for e in part:
            if e[1] == 4: e[1] = 7
    f.write_text(json.dumps(js))
    with pytest.raises(ValueError, match=r'labels must run 0..n-1; missing labels \[4, 5, 6\]'):
        load_dataset('caltech101', tmp_path)


# ---------------------------------------------------------------- data/README.md
def test_readme_covers_every_dataset():
    text = (REPO / 'data' / 'README.md').read_text()
    for info in REGISTRY.values():
        assert f'`{info.key}`' in text and info.folder in text, info.key
        if info.split_file: assert info.split_file in text
    assert 'cocoamix run base2new --data-root /path/to/DATA --datasets caltech101' in text
    assert 'MIT' in text and "CoOp's DATASETS.md" in text


def test_a_split_entry_whose_file_is_missing_names_it(tmp_path):
    fx.caltech(tmp_path)
    split = tmp_path / 'caltech-101' / 'split_zhou_Caltech101.json'
    d = json.loads(split.read_text()); d['train'][0][0] = 'accordion/not_there.png'; split.write_text(json.dumps(d))
    with pytest.raises(FileNotFoundError, match='not_there.png'):   # checked when the split is read, with the path
        D.load_dataset('caltech101', root=tmp_path)
