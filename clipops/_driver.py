"""Where the driver route finds what it opens at run time.

The TF op's GPU kernel (csrc/core/clip_driver.cc) compiles the shipped kernel
source at first use with NVRTC and launches it through the CUDA driver API.
It links nothing of CUDA; this module tells it where the pieces are, without
importing CuPy or TensorFlow:

  - NVRTC: $CLIPOPS_NVRTC, else the libnvrtc.so.12 of the pip wheel that
    `tensorflow[and-cuda]` installs (nvidia-cuda-nvrtc-cu12), else whatever
    libnvrtc.so.12 the dynamic linker finds;
  - the CUDA headers NVRTC needs (<cooperative_groups.h>, and CCCL's
    <nv/target> that it includes): $CLIPOPS_CUDA_INCLUDE (os.pathsep-separated),
    else the wheels nvidia-cuda-runtime-cu12 and nvidia-cuda-cccl-cu12, else a
    CUDA toolkit ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda);
  - the kernel sources: clipops/kernels (csrc/core in a source checkout);
  - the cache of compiled kernels: $CLIPOPS_CACHE_DIR, else
    $XDG_CACHE_HOME/clipops, else ~/.cache/clipops (csrc/core/kernel_cache.h
    resolves it and checks it before use). Delete it freely.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import _build_info, _common

# The kernel sources, as the build lists and installs them (CMakeLists.txt).
KERNEL_FILES: tuple[str, ...] = tuple(_build_info.KERNEL_FILES)
# (folder inside a site-packages, the header that folder must hold)
_WHEEL_HEADERS = ((Path("nvidia", "cuda_runtime", "include"), "cooperative_groups.h"),
                  (Path("nvidia", "cuda_cccl", "include"), "nv/target"))
_WHEEL_NVRTC = Path("nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12")


@dataclass(frozen=True)
class Config:
    """What the route opens; the cache folder is not here: the library that
    runs the route resolves it (kernel_cache::default_dir, or cache_dir())."""

    nvrtc_library: str
    cuda_library: str
    include_dirs: tuple[str, ...]
    kernel_dir: str


def _site_roots() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def kernel_dir() -> Path | None:
    """The folder holding the kernel sources: clipops/kernels in an installed
    package, csrc/core in a source checkout; None if neither has them."""
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "csrc" / "core"):
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    return None


def nvrtc_library() -> str:
    env = os.environ.get("CLIPOPS_NVRTC")
    if env:
        return env
    for root in _site_roots():
        if (root / _WHEEL_NVRTC).is_file():
            return str(root / _WHEEL_NVRTC)
    return "libnvrtc.so.12"


def include_dirs() -> tuple[str, ...]:
    """The folders that hold cooperative_groups.h and nv/target, first found first."""
    env = os.environ.get("CLIPOPS_CUDA_INCLUDE")
    candidates = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    for root in _site_roots():
        candidates += [root / folder for folder, _ in _WHEEL_HEADERS]
    for root in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                              "/usr/local/cuda")):
        candidates += [Path(root) / "include", Path(root) / "include" / "cccl"]
    found: list[str] = []
    for _, header in _WHEEL_HEADERS:
        hit = next((d for d in candidates if (d / header).is_file()), None)
        if hit is not None and str(hit) not in found:
            found.append(str(hit))
    return tuple(found)


def cache_dir() -> str:
    """The compiled-kernel cache folder of both NVRTC routes, as
    csrc/core/kernel_cache.h resolves it (through clipops._core: the TF op
    resolves it with its own copy of the core, and never loads _core)."""
    return _common.load_core().kernel_cache_dir()


def config() -> Config:
    """Where the driver route finds NVRTC, libcuda ($CLIPOPS_LIBCUDA, else the
    system's libcuda.so.1), the CUDA headers and the kernel sources."""
    kdir = kernel_dir()
    return Config(nvrtc_library=nvrtc_library(),
                  cuda_library=os.environ.get("CLIPOPS_LIBCUDA", "libcuda.so.1"),
                  include_dirs=include_dirs(), kernel_dir=str(kdir) if kdir else "")
