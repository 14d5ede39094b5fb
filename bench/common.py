"""Shared pieces of the clipops benchmarks: a quiet TensorFlow import, timing
statistics and paired intervals, the machine's measured copy bandwidth and
description, and result files. (Tables and plots: report.py; gradient lists:
cases.py.)

A run writes to bench/out/ (git ignores it), so running a benchmark never
rewrites the committed reference results in bench/results/: those change only
when a run is pointed there explicitly (`--out bench/results`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"  # committed reference results
OUT = Path(__file__).resolve().parent / "out"          # a run's default output, untracked


def import_tensorflow(verbose: bool = False) -> tuple[ModuleType, int]:
    """Imports TensorFlow and lists its devices with its C++ start-up log hidden.

    TF_CPP_MIN_LOG_LEVEL (set to 2 here unless the caller set it) does not
    hide that log: TF 2.21 writes its start-up checks (oneDNN, CUDA drivers,
    cuInit) through absl before absl::InitializeLog, which sends every message
    to stderr whatever the level. Each one prints twice because two of TF's
    libraries run the checks, each with its own static copy of TSL:
    libtensorflow_framework.so.2 and the profiler plugin
    (python/profiler/internal/_pywrap_profiler_plugin.so) that `import
    tensorflow` loads. So file descriptor 2 points at a temporary file while
    TF loads and finds its devices; if that fails, the file is printed.

    Args:
      verbose: leave TF's log alone (and TF_CPP_MIN_LOG_LEVEL as the caller set it).

    Returns:
      (the tensorflow module, how many lines of its log were hidden).

    Raises:
      whatever importing TensorFlow raises, after printing the hidden log.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf
        return tf, 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()  # cuInit and its complaint happen here
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        hidden = len(log.read().decode(errors="replace").splitlines())
    return tf, hidden


def wants_verbose(module_name: str) -> bool:
    """Whether a script was run with --verbose, read before argparse runs
    because TF's log must be hidden from its import on. False when the
    script is imported as a module (by the tests)."""
    return module_name == "__main__" and "--verbose" in sys.argv[1:]


def summarize(times_s: Sequence[float]) -> dict:
    """Median and spread of repeated timings, in seconds."""
    t = sorted(times_s)
    q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]  # noqa: E731
    return {
        "median_s": statistics.median(t),
        "p10_s": q(0.10),
        "p90_s": q(0.90),
        "min_s": t[0],
        "repeats": len(t),
    }


def time_calls(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20,
               min_time_s: float = 0.0, sync: Callable[[object], None] | None = None) -> dict:
    """Times fn() after warm-up; `sync` forces completion of fn's result
    (for example `lambda r: r[1].numpy()`), so lazy work is counted."""
    sync = sync or (lambda r: None)
    for _ in range(warmup):
        sync(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return summarize(times)


def paired_ci(diffs: Sequence[float], seed: int = 0, resamples: int = 2000) -> dict | None:
    """Median of paired differences (seconds) and a bootstrap 95% interval of
    that median; None without data. Pairs of runs in lockstep share the
    machine's drift, so their differences show what unpaired medians hide."""
    d = np.asarray([x for x in diffs if x is not None], dtype=np.float64)
    if len(d) == 0:
        return None
    boot = np.median(np.random.default_rng(seed).choice(d, (resamples, len(d))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median_s": float(np.median(d)), "ci95_s": [float(lo), float(hi)], "steps": len(d)}


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def copy_bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 7) -> dict:
    """The machine's memory copy bandwidth: bytes read + written per second.

    Copies with libc's memmove through ctypes, which releases the GIL, on one
    thread and on one thread per core, and keeps the faster: the floor a kernel
    is held to is then never understated. (NumPy's copyto holds the GIL, so
    threads running it measure contention, not memory.)"""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)  # touched by the warm-up, so no page faults are timed
    results = []
    for threads in sorted({1, cores}):
        step = nbytes // threads

        def part(k: int, step: int = step) -> None:
            ctypes.memmove(dst.ctypes.data + k * step, src.ctypes.data + k * step, step)

        with ThreadPoolExecutor(threads) as pool:
            stats = time_calls(lambda: list(pool.map(part, range(threads))), warmup=2,
                               repeats=repeats)
        results.append({"gbs": 2 * nbytes / stats["median_s"] / 1e9, "threads": threads, **stats})
    best = max(results, key=lambda r: r["gbs"])
    return {**best, "bytes": nbytes, "by_threads": {r["threads"]: r["gbs"] for r in results}}


def machine_info() -> dict:
    """The machine and versions, recorded beside every result."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "numpy": np.__version__,
    }
    for mod in ("tensorflow", "cupy", "torch", "jax", "optax"):
        if mod in sys.modules:
            info[mod] = getattr(sys.modules[mod], "__version__", "?")
    try:
        import clipops
        info["clipops"] = clipops.__version__
        info["clipops_build"] = clipops.build_info()
    except Exception as exc:  # the benchmark may time only the peers
        info["clipops"] = f"unavailable: {exc}"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip())
    except Exception:
        pass
    # settings that change the allocators or kernels the timings depend on
    info["env"] = {k: os.environ[k] for k in _ENV_OF_INTEREST if k in os.environ}
    return info


_ENV_OF_INTEREST = ("TF_ENABLE_ONEDNN_OPTS", "CLIPOPS_HOST_CACHE_MB", "MALLOC_ARENA_MAX",
                    "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS")


# The instruction-set extensions the CPU kernel's speed depends on.
_FLAGS_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS_OF_INTEREST if f in have]
    except OSError:
        pass
    return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Writes payload as bench/out/<name>.json (or under out_dir)."""
    out_dir = Path(out_dir) if out_dir else OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def step_clock():
    """A Keras callback that times each model.fit step, batch begin to batch end (a CPU step
    has finished when its function call returns), in ``.times`` (seconds); after the clock
    stops it reads a fused optimizer's recorded global norm into ``.norms``. Keras and
    clipops.keras are imported here, after the caller has imported TensorFlow quietly."""
    import keras
    import clipops.keras as clipops_keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self.norms: list[float] = []
            self._t = 0.0

        def on_train_batch_begin(self, batch, logs=None) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None) -> None:
            self.times.append(time.perf_counter() - self._t)
            if clipops_keras.is_fused(self.model.optimizer):
                self.norms.append(float(self.model.optimizer.last_global_norm.numpy()))

    return StepClock()
