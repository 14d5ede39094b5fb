"""Shared test helpers: float64 references, per-dtype tolerances, random lists,
and an independent NumPy model of clipops' documented reduction order."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases are skipped without it
    BF16 = None

CHUNK, LANES, THREADS = 16384, 1024, 256


def pytest_configure(config):
    """One clear error, instead of one per test module, when the clipops that
    Python finds is the source folder (no compiled parts) or is not installed."""
    try:
        import clipops  # noqa: F401
    except ImportError as exc:
        pytest.exit(f"cannot test clipops: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)

# Sizes that straddle every boundary of the work table and the lanes.
BOUNDARY_SIZES = [0, 1, 2, 3, 4, 5, LANES - 1, LANES, LANES + 1, CHUNK - 1, CHUNK, CHUNK + 1,
                  2 * CHUNK + 3]

# Tolerances for an output or norm against the float64 reference, as
# atol + rtol * |ref|. u is the unit roundoff of the dtype.
#  float64: u = 2^-53; clipops sums in double, ~1e-16 * log(n): rtol 1e-12.
#  float32: the norm is accurate to ~1e-7 (float lanes of 16 terms, then double);
#           the scale takes 3 float roundings and the product 1: ~5u = 3e-7; rtol 2e-6.
#  float16: the norm and TF's scale formula are rounded to half (u = 2^-11) at
#           ~5 steps, plus the product: 6u = 2.9e-3; rtol 4e-3. atol covers the
#           half subnormal step (6e-8) where a product underflows.
#  bfloat16: the same 6 roundings with u = 2^-8: 2.3e-2; rtol 3e-2.
TOL = {
    "float64": (1e-300, 1e-12),
    "float32": (1e-30, 2e-6),
    "float16": (1e-7, 4e-3),
    "bfloat16": (1e-30, 3e-2),
}


def dtype_name(dt) -> str:
    return np.dtype(dt).name


def assert_close(actual, ref, dtype, what=""):
    atol, rtol = TOL[dtype_name(dtype)]
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    bad = ~(np.abs(actual - ref) <= atol + rtol * np.abs(ref))
    bad &= ~(np.isnan(actual) & np.isnan(ref))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} elements off (dtype {dtype_name(dtype)}); "
        f"first: got {actual[bad].ravel()[:3]}, want {ref[bad].ravel()[:3]}")


def ref_norm(arrays) -> float:
    """Global norm in float64 (the norm of the concatenation)."""
    total = 0.0
    for a in arrays:
        if a is not None and a.size:
            a64 = np.asarray(a, dtype=np.float64).ravel()
            total += float(np.dot(a64, a64))
    return float(np.sqrt(total))


def ref_clip(arrays, clip_norm):
    """Reference outputs in float64: a * clip / max(norm, clip)."""
    norm = ref_norm(arrays)
    factor = clip_norm / max(norm, clip_norm)
    return [None if a is None else np.asarray(a, np.float64) * factor for a in arrays], norm


def random_array(rng, shape, dtype, scale=1.0):
    """Fresh normal values; never zeros only."""
    a = rng.standard_normal(shape) * scale
    return a.astype(dtype)


# ---- an independent model of the documented reduction order ------------------

def _chunk_partials(a: np.ndarray) -> np.ndarray:
    """Per-chunk partial sums of squares, following the reduction order of docs/design.md."""
    acc_t = np.float64 if a.dtype == np.float64 else np.float32
    x = np.asarray(a, dtype=acc_t).ravel()
    n = x.size
    chunks = -(-n // CHUNK)
    padded = np.zeros(chunks * CHUNK, dtype=acc_t)
    padded[:n] = x
    rows = padded.reshape(chunks, CHUNK // LANES, LANES)
    lanes = np.zeros((chunks, LANES), dtype=acc_t)
    for r in range(CHUNK // LANES):  # lane j += x*x, row by row, rounded each time
        lanes = lanes + rows[:, r, :] * rows[:, r, :]
    q = lanes.astype(np.float64).reshape(chunks, THREADS, 4)
    v = (q[:, :, 0] + q[:, :, 1]) + (q[:, :, 2] + q[:, :, 3])
    s = THREADS // 2
    while s:  # halving tree
        v[:, :s] = v[:, :s] + v[:, s:2 * s]
        s //= 2
    return v[:, 0]


def model_sumsq(arrays) -> float:
    """The sum of squares exactly as clipops computes it, in NumPy."""
    parts = [_chunk_partials(a) for a in arrays if a is not None and a.size]
    p = np.concatenate(parts) if parts else np.zeros(0)
    k = -(-p.size // THREADS)
    grid = np.zeros(max(k, 1) * THREADS)
    grid[:p.size] = p
    grid = grid.reshape(-1, THREADS)
    u = np.zeros(THREADS)
    for row in grid:  # thread t sums partials t, t+256, ... in order
        u = u + row
    s = THREADS // 2
    while s:
        u[:s] = u[:s] + u[s:2 * s]
        s //= 2
    return float(u[0])


def model_norm(arrays, norm_dtype) -> np.ndarray:
    """The global norm as clipops returns it: sqrt in double, rounded to float,
    then to the norm dtype."""
    n = np.sqrt(np.float64(model_sumsq(arrays)))
    if np.dtype(norm_dtype) == np.float64:
        return np.asarray(n)
    return np.asarray(np.float32(n)).astype(norm_dtype)


def model_scale(norm, clip, norm_dtype):
    """TF's scale formula, op by op in the norm dtype (half and bfloat16 ops are
    float ops rounded to the type)."""
    dt = np.dtype(norm_dtype)
    if dt == np.float64:
        one = np.float64(1)
        n, c = np.float64(norm), np.float64(clip)
        a, b = one / n, one / c
        m = b if b < a else a
        return c * m + (n - n)
    r = (lambda x: np.float32(x)) if dt == np.float32 else (lambda x: np.float32(np.asarray(np.float32(x)).astype(dt)))
    n, c = np.float32(norm), np.float32(clip)
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = r(np.float32(1) / n), r(np.float32(1) / c)
        m = b if b < a else a
        return r(r(c * m) + r(n - n))


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name (reproducible)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
