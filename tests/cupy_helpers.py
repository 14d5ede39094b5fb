"""What the CuPy front end's tests share (tests/test_cupy.py, test_cupy_optim.py):
whether CuPy and a GPU are here (the markers that skip with the reason),
whether the NVRTC route can build, a kernel that keeps a stream busy, and
stand-ins for the NVRTC route's pinned table copies."""

from __future__ import annotations

import collections
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

try:
    import cupy
except ImportError:
    cupy = None


def gpu_status() -> tuple[bool, str]:
    """(whether CuPy sees a usable GPU, and if not why)."""
    if cupy is None:
        return False, "CuPy is not installed (pip install cupy-cuda13x)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no usable GPU: {exc}"
    return (n > 0), ("ok" if n > 0 else "no CUDA device")


HAVE_GPU, GPU_REASON = gpu_status()
needs_cupy = pytest.mark.skipif(cupy is None, reason="CuPy is not installed (pip install cupy-cuda13x)")


def gpu(fn):
    """Marks a test `gpu` and skips it, with the reason, where no GPU is usable."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason=GPU_REASON)(fn))


def nvrtc_skip_reason() -> str | None:
    """Why the NVRTC route (CuPy's NVRTC, CUDA 13) cannot build its kernel here, or None."""
    if cupy is None:
        return "CuPy is not installed"
    from clipops import _nvrtc

    try:
        _nvrtc._nvrtc()
        _nvrtc.cuda_include_dirs()
    except _nvrtc.CudaUnavailableError as exc:
        return f"the NVRTC route cannot build here: {exc}"
    return None


_SPIN = r"""
extern "C" __global__ void clipops_test_spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


def spin(seconds: float) -> None:
    """Keeps the current stream busy for `seconds` of GPU time (one thread:
    the rest of the GPU stays free for work queued on other streams)."""
    kernel = cupy.RawKernel(_SPIN, "clipops_test_spin")
    kernel((1,), (1,), (np.uint64(int(seconds * 1e9)),))


def record_table_copies(monkeypatch, copies: list) -> None:
    """The NVRTC route's table copies without a device: pinned memory is host
    buffers, each copy is appended to `copies` as (dst, bytes, kind, stream),
    and no copy's event completes (so every pinned source is kept)."""
    from clipops import _nvrtc

    pinned = []  # host buffers standing in for CuPy's pinned memory

    def alloc_pinned(n):
        pinned.append(ctypes.create_string_buffer(max(n, 1)))
        return SimpleNamespace(ptr=ctypes.addressof(pinned[-1]))

    monkeypatch.setattr(cupy.cuda, "alloc_pinned_memory", alloc_pinned)
    monkeypatch.setattr(_nvrtc, "_record_event", lambda stream: SimpleNamespace(done=False))
    monkeypatch.setattr(_nvrtc, "_in_flight", collections.deque())
    monkeypatch.setattr(_nvrtc.runtime, "memcpyAsync", lambda dst, src, n, kind, stream: copies
                        .append((dst, ctypes.string_at(src, n), kind, stream)))
