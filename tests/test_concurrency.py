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


# ---- fork(): the child gets a pool of its own ------------------------------------
# A child has none of its parent's threads. The pool used to keep handing out
# tickets there that no worker would take: the queue grew by one ticket per
# parallel pass (RSS +6.5 MB over 40,000 calls) and the child ran on one
# thread. Each test runs in a fresh interpreter, so that only this test's
# threads exist when it forks.

_FORK_COMMON = r"""
import json, os, sys, time
import numpy as np
import clipops.numpy as cn
from clipops import _core

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

rng = np.random.default_rng(int(sys.argv[1]))
# 2^20 elements in 104 work items of 16,384: past both thresholds of the
# parallel path (clip_cpu.cc kParallelMinElements; clip_common.cc's cost split
# gives 2 pieces, so every parallel pass hands a worker one ticket)
arrays = [rng.standard_normal(16384).astype(np.float32) for _ in range(64)] + \
         [rng.standard_normal(1).astype(np.float32) for _ in range(40)]
parent_out, parent_norm = cn.clip_by_global_norm(arrays, 1.0)
parent_bits = [o.tobytes() for o in parent_out] + [parent_norm.tobytes()]

def same_bits_as_parent():
    out, norm = cn.clip_by_global_norm(arrays, 1.0)
    return [o.tobytes() for o in out] + [norm.tobytes()] == parent_bits
"""


def _run_forking_script(body: str, seed: int, timeout: float) -> dict:
    import json
    import os
    import subprocess
    import sys

    code = _FORK_COMMON + body
    out = subprocess.run([sys.executable, "-c", code, str(seed)], capture_output=True, text=True,
                         timeout=timeout, cwd=os.path.dirname(__file__))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    return json.loads(lines[-1])


CHILD_CALLS = 10_000


@pytest.mark.skipif(__import__("os").cpu_count() < 2,
                    reason="one CPU: the pool has no worker threads to rebuild")
def test_a_forked_child_gets_its_own_workers_and_a_bounded_queue(rng):
    body = r"""
parent_stats = _core._worker_pool_stats()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    report = {}
    try:
        for _ in range(200):  # warm up: the child's pool starts, its arenas settle
            cn.clip_by_global_norm(arrays, 1e30, in_place=True)
        report["before"] = _core._worker_pool_stats()
        rss0 = rss_kb()
        # in place with a clip above the norm: two parallel passes a call (the
        # norm, then a scale of 1 that writes nothing), arrays unchanged
        norm_ok = True
        for _ in range(%d):
            norm_ok &= cn.clip_by_global_norm(arrays, 1e30, in_place=True)[1].tobytes() == parent_bits[-1]
        report["rss_growth_kb"] = rss_kb() - rss0
        report["after"] = _core._worker_pool_stats()
        report["threads"] = len(os.listdir("/proc/self/task"))
        report["norm_ok"] = bool(norm_ok)
        report["bits_ok"] = same_bits_as_parent()
    except BaseException as exc:
        report["error"] = repr(exc)
    os.write(w, json.dumps(report).encode())
    os._exit(0)
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
os.waitpid(pid, 0)
print(json.dumps({"parent": parent_stats, "child": json.loads(data)}))
""" % CHILD_CALLS
    got = _run_forking_script(body, int(rng.integers(1 << 30)), timeout=600)
    parent, child = got["parent"], got["child"]
    assert "error" not in child, child
    assert parent["workers"] >= 1 and parent["queued"] <= parent["workers"], parent
    before, after = child["before"], child["after"]
    # (c) the child computes the parent's bits
    assert child["bits_ok"] and child["norm_ok"], child
    # (b) the child has workers of its own, and they do work
    assert after["workers"] == parent["workers"], (parent, after)
    assert child["threads"] >= 1 + after["workers"], child
    assert after["workers_that_ran"] >= 1 and after["worker_pieces"] > before["worker_pieces"], child
    # (a) no ticket is left for a worker that does not exist: the queue holds
    # at most one stale ticket per worker (2 * CHILD_CALLS were handed out)
    assert after["queued"] <= after["workers"], child
    # ... and RSS stays flat. The old pool's tickets cost ~160 bytes each:
    # 2 * CHILD_CALLS of them ~3 MB. 1 MiB leaves room for the allocator's noise.
    assert child["rss_growth_kb"] < 1024, child


def test_a_fork_while_another_thread_is_inside_a_call_does_not_deadlock(rng):
    """Another thread keeps calling while the main thread forks 40 times; each
    child must finish its own parallel calls (the pool's mutex or condition
    variable, caught held at fork, would block it forever) with the parent's
    bits. A child that hangs for 60 s fails the test."""
    body = r"""
import threading
stop = threading.Event()
def hammer():
    while not stop.is_set():
        cn.global_norm(arrays)
t = threading.Thread(target=hammer)
t.start()
results = []
for k in range(40):
    time.sleep(0.002 * (k % 7))  # fork at different points of the other thread's calls
    pid = os.fork()
    if pid == 0:
        ok = all(same_bits_as_parent() for _ in range(3))
        os._exit(0 if ok else 3)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            results.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            results.append("hung")
            break
        time.sleep(0.01)
stop.set()
t.join()
print(json.dumps({"results": results}))
"""
    got = _run_forking_script(body, int(rng.integers(1 << 30)), timeout=600)
    assert got["results"] == [0] * 40, got
