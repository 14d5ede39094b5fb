#!/usr/bin/env python
"""Memory over many calls: RSS before and after N calls of each front end.

    python bench/leaks.py                 # 100,000 calls per front end, a few minutes
    python bench/leaks.py --calls 2000    # a quick look

Each front end is warmed up first (caches, TF's tracing, allocator pools), then
called N times on the same small gradient list; the resident set size is read
from /proc/self/statm before and after. A leak of even 16 bytes per call shows
as 1.6 MB over 100,000 calls. Writes leaks.json to bench/out/ (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common import OUT, import_tensorflow, machine_info, write_json
from report import Progress, table

WARMUP = 2000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def front_ends() -> dict[str, Callable[[], object]]:
    """One call of each front end on a small list of gradients (clipped). The
    100,000-element array's outputs (400 KB) come from the host block cache
    (csrc/core/host_cache.cc), the others from NumPy's and TF's allocators."""
    import clipops.numpy as cn

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (512, 40_000, 10, 100_000)]
    calls = {"numpy clip": lambda: cn.clip_by_global_norm(arrays, 1.0),
             "numpy in place": lambda: cn.clip_by_global_norm(arrays, 1.0, use_norm=1.0,
                                                              in_place=True),
             "numpy global_norm": lambda: cn.global_norm(arrays)}
    try:
        tf, _ = import_tensorflow()
        import clipops
    except ImportError:
        return calls
    tensors = [tf.constant(a) for a in arrays]
    fn = tf.function(lambda t: clipops.clip_by_global_norm(t, 1.0))
    calls["tf eager"] = lambda: clipops.clip_by_global_norm(tensors, 1.0)[1].numpy()
    calls["tf.function"] = lambda: fn(tensors)[1].numpy()
    return calls


def measure(name: str, call: Callable[[], object], calls: int) -> dict:
    for _ in range(WARMUP):
        call()
    before = rss_bytes()
    t0 = time.perf_counter()
    progress = Progress(name, calls, unit="calls")
    for i in range(calls):
        call()
        if (i + 1) % max(calls // 10, 1) == 0:
            progress.update(i + 1)
    after = rss_bytes()
    return {"front_end": name, "calls": calls, "rss_before_bytes": before,
            "rss_after_bytes": after, "growth_fraction": (after - before) / before,
            "growth_bytes_per_call": (after - before) / calls,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = [measure(name, call, args.calls) for name, call in front_ends().items()]
    print("\n".join(table(
        ["front end", "calls", "RSS before MB", "RSS after MB", "growth", "bytes per call"],
        [[r["front_end"], r["calls"], f"{r['rss_before_bytes'] / 2**20:.1f}",
          f"{r['rss_after_bytes'] / 2**20:.1f}", f"{100 * r['growth_fraction']:+.2f}%",
          f"{r['growth_bytes_per_call']:+.1f}"] for r in rows])))
    print(f"results: {write_json('leaks', {**machine_info(), 'rows': rows}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
