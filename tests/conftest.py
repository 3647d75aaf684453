import os
# Tests never touch the network: hub look-ups fail at once instead of hanging.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import pytest, torch

@pytest.fixture(scope='session')
def tiny_clip():
    from cocoamix.backbone import load_clip, TINY_MODEL
    return load_clip(TINY_MODEL)

@pytest.fixture(scope='session')
def vitb32():
    from cocoamix.backbone import load_clip
    return load_clip('ViT-B-32')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "Fashion-MNIST, 4 shots, base/new, the tiny model and 2 cached training views of the base classes."
    from cocoamix.backbone import load_clip, TINY_MODEL
    from cocoamix.data import load_dataset, few_shot_splits, base_new_split
    from cocoamix.features import split_features
    cache = tmp_path_factory.mktemp('features')
    clip = load_clip(TINY_MODEL)
    base, new = base_new_split(few_shot_splits(load_dataset('fashion_mnist'), shots=4, seed=1))
    train = split_features(clip, base.train, n_views=2, cache_dir=cache, progress=False)
    return clip, base, new, train, cache

# The tests run the built-in real-data grid on the tiny random model (fast); the world grid, the default of
# `cocoamix run`, has tests of its own (tests/test_world.py).
os.environ.setdefault('COCOAMIX_OFFLINE', 'builtin')
