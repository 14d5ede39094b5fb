"""Many Python threads at once: the results equal serial ones, bit for bit.

The NumPy front end releases the GIL and shares one worker pool between
callers (csrc/core/clip_common.cc); the TF op runs on TF's pools. Lists are
large enough (>= 2^20 elements) that the parallel paths are taken."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import clipops.numpy as cn
from conftest import CHUNK, random_array

THREADS = 8
CALLS_PER_THREAD = 6


def _lists(rng, count):
    # each list differs: a thread mixing up another's data would show
    return [[random_array(rng, (n,), dt) for n, dt in
             [(1_200_000, np.float32), (CHUNK + 7, np.float32), (333, np.float32)]]
            for _ in range(count)] + \
           [[random_array(rng, (n,), dt) for n, dt in
             [(1_100_000, np.float16), (5, np.float32), (2_000_000, np.float64)]]
            for _ in range(count)]


def _bits(result):
    out, norm = result
    return [o.tobytes() for o in out], norm.tobytes()


def test_numpy_front_end_from_eight_threads(rng):
    lists = _lists(rng, THREADS // 2)
    clips = [0.5 * float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)))
             for arrays in lists]
    serial = [_bits(cn.clip_by_global_norm(a, c)) for a, c in zip(lists, clips)]

    def worker(k):
        got = []
        for _ in range(CALLS_PER_THREAD):
            got.append(_bits(cn.clip_by_global_norm(lists[k], clips[k])))
            got.append((None, cn.global_norm(lists[k]).tobytes()))
        return got

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(len(lists))))
    for k, got in enumerate(results):
        for r in got:
            if r[0] is None:
                assert r[1] == serial[k][1], f"list {k}: global_norm"
            else:
                assert r == serial[k], f"list {k}: clip"


def test_numpy_in_place_from_eight_threads(rng):
    # each thread clips its own arrays in place, repeatedly, with use_norm so
    # every call applies the same scale: the result is known in advance
    lists = _lists(rng, THREADS // 2)
    want = [[a.copy() for a in arrays] for arrays in lists]
    for arrays in want:
        for _ in range(CALLS_PER_THREAD):
            cn.clip_by_global_norm(arrays, 1.0, use_norm=1.25, in_place=True)

    def worker(k):
        for _ in range(CALLS_PER_THREAD):
            cn.clip_by_global_norm(lists[k], 1.0, use_norm=1.25, in_place=True)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(worker, range(len(lists))))
    for got, w in zip(lists, want):
        assert all(g.tobytes() == x.tobytes() for g, x in zip(got, w))


def test_tf_op_eager_and_functions_from_eight_threads(rng):
    tf = pytest.importorskip("tensorflow", reason="the TensorFlow op needs tensorflow")
    import clipops

    lists = [[tf.constant(a) for a in arrays] for arrays in _lists(rng, THREADS // 2)]
    fns = [tf.function(lambda t: clipops.clip_by_global_norm(t, 0.75)) for _ in lists]

    def bits(result):
        out, norm = result
        return [o.numpy().tobytes() for o in out], norm.numpy().tobytes()

    serial = [bits(clipops.clip_by_global_norm(t, 0.75)) for t in lists]
    for f, t, s in zip(fns, lists, serial):
        assert bits(f(t)) == s  # traced once, before the threads start

    def worker(k):
        return [bits(clipops.clip_by_global_norm(lists[k], 0.75)) for _ in range(3)] + \
               [bits(fns[k](lists[k])) for _ in range(3)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(len(lists))))
    for k, got in enumerate(results):
        assert all(r == serial[k] for r in got), f"list {k}"
