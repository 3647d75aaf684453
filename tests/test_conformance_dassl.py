"""The training loop steps and schedules as the authors' Dassl does (every peer here trains in Dassl).

Figures come from the authors' code: `tests/data/dassl_lr_sequences.json` holds the lr of every epoch produced by
running KaiyangZhou/Dassl.pytorch `dassl/optim/lr_scheduler.py` itself (see the file's "how"); the step counts follow
`dassl/data/data_manager.py` (`drop_last=is_train and len(data_source) >= batch_size`).
"""
import json, math
from pathlib import Path

import pytest, torch

from cocoamix.method import ParamGroup, TrainImages, epoch_size, train_loop
from cocoamix.features import Features

DASSL = json.loads((Path(__file__).parent / 'data' / 'dassl_lr_sequences.json').read_text())


@pytest.mark.parametrize('epochs', [2, 5, 10, 200])
def test_lr_sequence_equals_dassl_constant_warmup_cosine(epochs):
    "dassl/optim/lr_scheduler.py (ConstantWarmupScheduler, WARMUP_RECOUNT=True): [1e-5, lr, cos(1/E), ..., cos((E-2)/E)]."
    theirs = DASSL['sequences'][str(epochs)]
    grp = ParamGroup([], 'sgd', lr=DASSL['lr'], warmup_epochs=DASSL['warmup_epochs'], warmup_lr=DASSL['warmup_lr'])
    ours = [grp.lr_at(e, epochs) for e in range(epochs)]
    assert len(theirs) == epochs
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert sum(ours) == pytest.approx(sum(theirs), rel=1e-12)


def test_lr_sequence_is_what_the_optimiser_sees():
    "train_loop gives the optimiser Dassl's lr at every step of every epoch (read back from the optimiser itself)."
    made = []
    class Recorded(ParamGroup):
        def make(self):
            made.append(super().make()); return made[-1]
    p = torch.nn.Parameter(torch.zeros(3))
    seen = []
    def loss_fn(x, y):
        seen.append(made[0].param_groups[0]['lr']); return (x @ p).pow(2).mean()
    feats = Features(torch.randn(16, 3), torch.zeros(16, dtype=torch.long), ['a'])
    train_loop(loss_fn, [Recorded([p], 'sgd', lr=DASSL['lr'], warmup_epochs=1, warmup_lr=1e-5)], feats, epochs=5, batch_size=8, progress=False)
    assert seen[::2] == pytest.approx(DASSL['sequences']['5'], rel=1e-12) and seen[1::2] == seen[::2]


@pytest.mark.parametrize('n, batch, steps', [
    (60, 32, 1),    # 4-shot world base set (15 classes): Dassl 1 step, a partial batch would make it 2
    (76, 32, 2),    # OxfordPets base, 19 classes x 4 shots: 2 (not 3)
    (200, 32, 6),   # Caltech101/Flowers/Food/Aircraft/UCF base, 50 classes x 4: 6 (not 7)
    (200, 128, 1),  # KgCoOp's batch 128: 1 (not 2)
    (20, 32, 1),    # fewer images than a batch: Dassl keeps the one partial batch
    (64, 32, 2),
])
def test_steps_per_epoch_follow_dassl_drop_last(n, batch, steps):
    "dassl/data/data_manager.py: the train loader drops the last partial batch when the split holds a full one."
    assert epoch_size(n, batch)[0] == steps
    calls, sizes = [], []
    p = torch.nn.Parameter(torch.zeros(4))
    feats = Features(torch.randn(2, n, 4), torch.arange(n) % 3, ['a', 'b', 'c'])  # 2 cached views
    def loss_fn(x, y):
        calls.append(1); sizes.append(len(y)); return (x @ p).pow(2).mean()
    train_loop(loss_fn, [ParamGroup([p], 'sgd', lr=0.1)], feats, epochs=3, batch_size=batch, progress=False)
    assert len(calls) == 3 * steps
    assert set(sizes) == {min(batch, n)}  # never a partial batch once a full one exists


def test_drop_last_is_a_parameter():
    p = torch.nn.Parameter(torch.zeros(4))
    feats = Features(torch.randn(60, 4), torch.zeros(60, dtype=torch.long), ['a'])
    sizes = []
    def loss_fn(x, y): sizes.append(len(y)); return (x @ p).pow(2).mean()
    train_loop(loss_fn, [ParamGroup([p], 'sgd', lr=0.1)], feats, epochs=1, batch_size=32, progress=False, drop_last=False)
    assert sizes == [32, 28]


def test_raw_image_batches_drop_last_too(setup):
    "The same rule for a method whose image encoder runs in the loop (TrainImages: fresh crops each epoch)."
    clip, base, _, train, _ = setup
    from cocoamix.data import train_transform
    images = TrainImages(base.train, train_transform(clip.image_size, clip.mean, clip.std))
    n = len(images); batch = 8
    assert n >= batch and n % batch, (n, batch)  # a partial batch exists to be dropped
    sizes, seen = [], []
    p = torch.nn.Parameter(torch.zeros(1))
    def loss_fn(x, y):
        sizes.append(len(y)); seen.extend(y.tolist()); return p.sum() * 0 + x.float().mean() * p.sum()
    train_loop(loss_fn, [ParamGroup([p], 'sgd', lr=0.1)], images, epochs=1, batch_size=batch, progress=False)
    assert sizes == [batch] * (n // batch)
    assert len(seen) == n // batch * batch
