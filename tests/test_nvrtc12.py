"""The shipped kernel sources compile with CUDA 12's NVRTC, the one that
`tensorflow[and-cuda]` installs (nvidia-cuda-nvrtc-cu12), for every architecture
TensorFlow 2.21 is built for. No GPU needed: NVRTC only compiles.

The wheels are found in CLIPOPS_CUDA12_SITE (a folder holding their `nvidia/`,
e.g. from `pip install --target DIR nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
nvidia-cuda-cccl-cu12`,
as .ci/run does), else on sys.path."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

_nvrtc = pytest.importorskip("clipops._nvrtc", reason="the NVRTC route's options need CuPy",
                             exc_type=ImportError)

NVRTC = Path("nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12")
# cooperative_groups.h, and the <nv/target> of CCCL it includes
HEADERS = {Path("nvidia", "cuda_runtime", "include"): "cooperative_groups.h",
           Path("nvidia", "cuda_cccl", "include"): "nv/target"}


def cuda12_site() -> Path | None:
    env = os.environ.get("CLIPOPS_CUDA12_SITE")
    for root in [Path(env)] if env else [Path(p) for p in sys.path if p]:
        if (root / NVRTC).is_file() and all((root / d / f).is_file() for d, f in HEADERS.items()):
            return root
    return None


SITE = cuda12_site()
pytestmark = pytest.mark.skipif(
    SITE is None, reason="CUDA 12's NVRTC wheels are not installed (pip install --target DIR "
    "nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12, then "
    "CLIPOPS_CUDA12_SITE=DIR)")


class Nvrtc12:
    """The few NVRTC calls a compilation needs, through ctypes on libnvrtc.so.12
    (CuPy's binding loads its own CUDA's NVRTC)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))

    def _check(self, rc, what, prog=None):
        if rc != 0:
            log = self.log(prog) if prog is not None else ""
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise AssertionError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}\n{log}")

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return major.value, minor.value

    def log(self, prog) -> str:
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    def compile(self, source: str, options: tuple[str, ...], output: str) -> bytes:
        """output: "CUBIN" or "PTX"."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(),
                                                b"clipops_kernel.cu", 0, None, None), "create")
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            self._check(self.lib.nvrtcCompileProgram(prog, len(options), opts),
                        f"compile with {' '.join(options)}", prog)
            size = ctypes.c_size_t()
            self._check(getattr(self.lib, f"nvrtcGet{output}Size")(prog, ctypes.byref(size)), "size")
            buf = ctypes.create_string_buffer(size.value)
            self._check(getattr(self.lib, f"nvrtcGet{output}")(prog, buf), "get")
            return buf.raw
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc12():
    lib = Nvrtc12(SITE / NVRTC)
    assert lib.version()[0] == 12
    return lib


def options(arch: str) -> tuple[str, ...]:
    # the NVRTC route's own options (IEEE rounding, no FMA), over CUDA 12's headers
    return _nvrtc.nvrtc_options(arch, include_dirs=[str(SITE / d) for d in HEADERS])


def test_sources_are_the_installed_ones():
    # the package's copy (clipops/kernels), not the checkout's csrc/core, when installed
    d = _nvrtc.kernel_dir()
    assert f"-I{d}" in options("-arch=sm_60")
    assert all((d / f).is_file() for f in _nvrtc.KERNEL_FILES)


@pytest.mark.parametrize("sm", [60, 70, 80, 90])
def test_kernel_compiles_with_cuda12_nvrtc(nvrtc12, sm):
    cubin = nvrtc12.compile('#include "clip_kernel.cuh"\n', options(f"-arch=sm_{sm}"), "CUBIN")
    assert cubin.startswith(b"\x7fELF")
    assert b"clipops_clip_kernel" in cubin


def test_cuda12_code_keeps_ieee_rounding(nvrtc12):
    # as with CUDA 13 (test_cupy): no flush-to-zero and no FMA, the condition for
    # bit-equality with the CPU kernel
    ptx = nvrtc12.compile('#include "clip_kernel.cuh"\n', options("-arch=compute_60"), "PTX")
    ops = [ln.split()[0] for ln in ptx.decode(errors="replace").splitlines()
           if ln.startswith("\t") and ln.split()]
    assert any(op.startswith(("mul.rn.f32", "add.rn.f32")) for op in ops)
    assert not [op for op in ops if ".ftz" in op]
    assert not [op for op in ops if op.startswith("fma")]
