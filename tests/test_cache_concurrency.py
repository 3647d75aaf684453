"""Several processes start on the same dataset at once (as parallel grid cells do): the feature cache must be
encoded exactly once, every process must get the same complete features, and no reader may ever see a partial file
under the cache's final name. The writer is slowed down on purpose so that the write takes long enough for a
torn read to be seen if the cache wrote in place."""
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

N_WRITERS = 3
SLOW_CHUNK, SLOW_PAUSE = 4096, 0.02   # the write of the features file takes ~0.5 s


def _slow_save(tensors, filename, metadata=None):
    "safetensors' save_file, written in small chunks with pauses: a slow shared file system."
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    with open(filename, 'wb') as f:
        for k in range(0, len(data), SLOW_CHUNK):
            f.write(data[k:k + SLOW_CHUNK]); f.flush(); time.sleep(SLOW_PAUSE)


def check_file(path: Path, n: int, d: int) -> str | None:
    "None if `path` is a complete features file of shape [n, d], else what is wrong."
    try:
        with safe_open(str(path), framework='pt') as f:
            meta, x = f.metadata() or {}, f.get_tensor('features')
    except Exception as e:
        return f'{path.name}: unreadable ({type(e).__name__}: {e})'
    if meta.get('complete') != '1' or tuple(x.shape) != (n, d):
        return f'{path.name}: incomplete (complete={meta.get("complete")}, shape={tuple(x.shape)})'
    return None


def _split():
    from cocoamix.data import load_dataset
    return load_dataset('fashion_mnist').test


def _writer(cache_dir, barrier, go, results):
    "One grid cell starting up: load the model and data, then ask for the split's features at the same moment as the others."
    import cocoamix.features as F
    from cocoamix.backbone import load_clip, TINY_MODEL
    from cocoamix.data import few_shot, load_dataset
    F.save_file = _slow_save
    clip, split = load_clip(TINY_MODEL), _split()
    train = load_dataset('fashion_mnist').train
    barrier.wait(); go.set()
    x = F.image_features(clip, split, cache_dir=cache_dir, progress=False)
    # the few-shot index cache, shared by the cells of one dataset and seed (see test_few_shot_cache_...)
    barrier.wait()
    fewshot_errors = []
    for seed in range(40):
        try: few_shot(train, 2, seed, cache_dir)
        except Exception as e: fewshot_errors.append(f'{type(e).__name__}: {e}'[:200])
    results.put(('writer', F.ENCODE_CALLS['n'], x.numpy(), clip.embed_dim, fewshot_errors))


def _reader(cache_dir, n, d, go, stop, results):
    "Polls the cache folder while the writers run: any file under a final name must load completely."
    seen_ok, seen_tmp, bad = 0, 0, []
    go.wait()   # no busy polling while the writers import torch
    while not stop.is_set():
        for p in Path(cache_dir).rglob('*'):
            if p.name.endswith('.tmp'): seen_tmp += 1
            elif p.suffix == '.safetensors':
                err = check_file(p, n, d)
                if err: bad.append(err)
                else: seen_ok += 1
        time.sleep(0.002)
    results.put(('reader', seen_ok, seen_tmp, bad))


@pytest.fixture(scope='module')
def concurrent_run(tmp_path_factory):
    from cocoamix.backbone import TINY_CONFIG
    cache = tmp_path_factory.mktemp('cache')
    n, d = len(_split()), TINY_CONFIG['embed_dim']
    ctx = mp.get_context('spawn')   # fresh interpreters, like separate cells (and no fork of a threaded torch)
    barrier, go, stop, results = ctx.Barrier(N_WRITERS), ctx.Event(), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(str(cache), n, d, go, stop, results)); reader.start()
    writers = [ctx.Process(target=_writer, args=(str(cache), barrier, go, results)) for _ in range(N_WRITERS)]
    for p in writers: p.start()
    out = [results.get(timeout=240) for _ in writers]
    stop.set()
    out.append(results.get(timeout=60))
    for p in writers + [reader]: p.join(timeout=60)
    assert all(p.exitcode == 0 for p in writers + [reader]), [p.exitcode for p in writers + [reader]]
    return cache, n, d, [r for r in out if r[0] == 'writer'], next(r for r in out if r[0] == 'reader')


def test_one_process_encodes_and_all_get_the_complete_file(concurrent_run):
    cache, n, d, writers, _ = concurrent_run
    assert sorted(w[1] for w in writers) == [0] * (N_WRITERS - 1) + [1]    # exactly one encoded, the others waited and read
    files = sorted(cache.rglob('*.safetensors'))
    assert len(files) == 1 and check_file(files[0], n, d) is None
    assert not [p for p in cache.rglob('*') if p.name.endswith('.tmp')]   # no temporary file left behind
    with safe_open(str(files[0]), framework='np') as f: on_disk = f.get_tensor('features')
    for w in writers:
        assert w[2].shape == (n, d) and np.array_equal(w[2], on_disk)


def test_a_reader_never_sees_a_partial_file(concurrent_run):
    *_, (_, seen_ok, seen_tmp, bad) = concurrent_run
    assert bad == []
    assert seen_tmp > 0 and seen_ok > 0   # the write was in progress while the reader looked, and it saw the result


def test_the_reader_would_notice_a_torn_file(tmp_path, concurrent_run):
    "The check above is not vacuous: a truncated copy of the features file fails it."
    cache, n, d, *_ = concurrent_run
    good = next(cache.rglob('*.safetensors'))
    torn = tmp_path / good.name
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert check_file(torn, n, d) is not None


def test_few_shot_cache_is_safe_when_cells_start_together(concurrent_run):
    writers = concurrent_run[3]
    assert [e for w in writers for e in w[4]] == []
