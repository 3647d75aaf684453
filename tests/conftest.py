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
