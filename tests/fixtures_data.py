"""Writers of tiny datasets in the exact on-disk formats cocoamix.data reads (CoOp split json, FGVC variant files,
ImageNet folders, CIFAR-100 pickles, CEC index files). Images are PNG, so pixels read back exactly."""
import json, pickle
from pathlib import Path

import numpy as np
from PIL import Image


def pixels(label: int, j: int, shape=(6, 5, 3)) -> np.ndarray:
    "A small image whose pixels encode (label, j), different for every pair."
    a = np.zeros(shape, np.uint8)
    a[..., 0] = 10 * label + j
    a[..., 1] = np.arange(shape[1], dtype=np.uint8)[None, :]
    a[..., 2] = 200 - j
    return a


def write_png(path, arr):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path, format='PNG')
    return path


def write_coop_json_dataset(root, folder, image_dir, split_file, classes, n_per_split=(3, 1, 2), json_names=None):
    """`classes`: raw folder names; `json_names`: the class name written in the json per class (default raw).
    Returns {split: [(relpath, label, pixels)]}."""
    base = Path(root) / folder
    json_names = json_names or classes
    split, written = {}, {}
    for part, n in zip(('train', 'val', 'test'), n_per_split):
        split[part], written[part] = [], []
        for label, (raw, jname) in enumerate(zip(classes, json_names)):
            for j in range(n):
                k = {'train': 0, 'val': 10, 'test': 20}[part] + j
                rel = f'{raw}/{raw}_{k:04d}.png'
                arr = pixels(label, k)
                write_png(base / image_dir / rel, arr)
                split[part].append([rel, label, jname])
                written[part].append((rel, label, arr))
    (base / split_file).write_text(json.dumps(split))
    return written


CALTECH = ['accordion', 'airplanes', 'Faces', 'Leopards', 'Motorbikes']
CALTECH_COOP_NAMES = ['accordion', 'airplane', 'face', 'leopard', 'motorbike']   # what CoOp's json holds


def caltech(root, json_names=None):
    return write_coop_json_dataset(root, 'caltech-101', '101_ObjectCategories', 'split_zhou_Caltech101.json',
                                   CALTECH, json_names=json_names)


EUROSAT = ['AnnualCrop', 'Forest', 'HerbaceousVegetation', 'Highway', 'Industrial', 'Pasture', 'PermanentCrop',
           'Residential', 'River', 'SeaLake']


def eurosat(root, json_names=None):
    return write_coop_json_dataset(root, 'eurosat', '2750', 'split_zhou_EuroSAT.json', EUROSAT, (1, 1, 1), json_names)


def ucf101(root):
    raw = ['ApplyEyeMakeup', 'YoYo', 'PlayingDaf']
    return write_coop_json_dataset(root, 'ucf101', 'UCF-101-midframes', 'split_zhou_UCF101.json', raw, (1, 1, 1),
                                   json_names=['Apply_Eye_Makeup', 'Yo_Yo', 'Playing_Daf'])


AIRCRAFT_ROWS = {'train': [('1000001', 'Boeing 737'), ('1000002', 'A300B4'), ('1000003', 'F/A-18'),
                           ('1000004', 'A300B4')],
                 'val': [('1000005', 'Boeing 737')],
                 'test': [('1000006', 'F/A-18'), ('1000007', 'A300B4'), ('1000008', 'Boeing 737')]}


def aircraft(root, variants='sorted'):
    """FGVC-Aircraft's own files. `variants`: the lines of variants.txt (default: the variant names sorted);
    None writes no variants.txt (the real dataset always has one)."""
    d = Path(root) / 'fgvc_aircraft'
    if variants == 'sorted': variants = sorted({v for rows in AIRCRAFT_ROWS.values() for _, v in rows})
    px = {}
    for part, rows in AIRCRAFT_ROWS.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / f'images_variant_{part}.txt').write_text(''.join(f'{i} {v}\n' for i, v in rows))
        for n, (i, v) in enumerate(rows):
            px[i] = pixels(n, int(i) % 100)
            write_png(d / 'images' / f'{i}.jpg', px[i])   # PNG bytes under CoOp's .jpg name: lossless
    if variants is not None: (d / 'variants.txt').write_text(''.join(v + '\n' for v in variants))
    return px


IMAGENET_WNIDS = ['n01440764', 'n01443537', 'n01484850', 'n01491361']
IMAGENET_NAMES = ['tench', 'goldfish', 'great white shark', 'tiger shark']


def write_classnames(path, wnids=IMAGENET_WNIDS, names=IMAGENET_NAMES):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(f'{w} {n}\n' for w, n in zip(wnids, names)))


def imagenet(root, n_train=3, n_val=2):
    d = Path(root) / 'imagenet'
    write_classnames(d / 'classnames.txt')
    for label, w in enumerate(IMAGENET_WNIDS):
        for j in range(n_train): write_png(d / 'images' / 'train' / w / f'{w}_{j}.JPEG', pixels(label, j))
        for j in range(n_val): write_png(d / 'images' / 'val' / w / f'ILSVRC2012_val_{label}{j}.JPEG', pixels(label, 50 + j))
    return d


def imagenet_a(root, wnids=('n01443537', 'n01491361')):
    d = Path(root) / 'imagenet-adversarial'
    write_classnames(d / 'classnames.txt')
    (d / 'imagenet-a').mkdir(parents=True, exist_ok=True)
    (d / 'imagenet-a' / 'README.txt').write_text('ImageNet-A')
    for w in wnids:
        for j in range(2): write_png(d / 'imagenet-a' / w / f'{j}.jpg', pixels(IMAGENET_WNIDS.index(w), j))
    return d


IMAGENET_V2_DIR = 'imagenetv2-matched-frequency-format-val'   # KaiyangZhou/CoOp datasets/imagenetv2.py, DATASETS.md


def imagenet_v2(root):
    d = Path(root) / 'imagenetv2'
    write_classnames(d / 'classnames.txt')
    for label in range(len(IMAGENET_WNIDS)):
        write_png(d / IMAGENET_V2_DIR / str(label) / 'a.jpeg', pixels(label, 0))
    return d


def cifar100(root, n_train=6, n_test=2, n_classes=100, seed=0):
    "CIFAR-100 python pickles with `n_classes` fine classes (meta always lists 100 names)."
    rng = np.random.default_rng(seed)
    d = Path(root) / 'cifar100' / 'cifar-100-python'
    d.mkdir(parents=True, exist_ok=True)
    names = [f'class_{i:02d}' for i in range(100)]
    names[:3] = ['apple', 'aquarium_fish', 'baby']
    with open(d / 'meta', 'wb') as f: pickle.dump({'fine_label_names': names, 'coarse_label_names': []}, f)
    out = {}
    for part, n in (('train', n_train), ('test', n_test)):
        labels = np.repeat(np.arange(n_classes), n).tolist()
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(d / part, 'wb') as f: pickle.dump({'data': data, 'fine_labels': labels}, f)
        out[part] = (data, labels)
    return out
