"""Where the driver route finds what it opens at run time.

The TF op's GPU kernel (csrc/core/clip_driver.cc) compiles the shipped kernel
source at first use with NVRTC and launches it through the CUDA driver API.
It links nothing of CUDA; this module tells it where the pieces are, without
importing CuPy or TensorFlow:

  - NVRTC: $CLIPOPS_NVRTC, else the libnvrtc.so.12 of the pip wheel that
    `tensorflow[and-cuda]` installs (nvidia-cuda-nvrtc-cu12), else whatever
    libnvrtc.so.12 the system's dynamic linker finds;
  - the CUDA headers NVRTC needs (<cooperative_groups.h>, and CCCL's
    <nv/target> that it includes): $CLIPOPS_CUDA_INCLUDE (os.pathsep-separated),
    else the wheels nvidia-cuda-runtime-cu12 and nvidia-cuda-cccl-cu12, else a
    CUDA toolkit ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda);
  - the kernel sources: clipops/kernels (csrc/core in a source checkout);
  - the cache of compiled kernels: $CLIPOPS_CACHE_DIR, else
    $XDG_CACHE_HOME/clipops, else ~/.cache/clipops (csrc/core/kernel_cache.h
    resolves it and checks it before use). Delete it freely.

The wheels are found as installed distributions (importlib.metadata) in the
interpreter's own package folders only: site-packages, the user site, and
sysconfig's purelib/platlib. Never through sys.path as a whole: its first entry
is the script's folder or the current directory, and a library or header
found there would become code in the user's CUDA context.
"""

from __future__ import annotations

import importlib.metadata
import os
import site
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import _build_info, _common

# The kernel sources, as the build lists and installs them (CMakeLists.txt).
KERNEL_FILES: tuple[str, ...] = tuple(_build_info.KERNEL_FILES)
# (distribution, the file or folder inside it, a header that folder must hold)
_WHEEL_NVRTC = ("nvidia-cuda-nvrtc-cu12", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
_WHEEL_HEADERS = (("nvidia-cuda-runtime-cu12", "nvidia/cuda_runtime/include", "cooperative_groups.h"),
                  ("nvidia-cuda-cccl-cu12", "nvidia/cuda_cccl/include", "nv/target"))


@dataclass(frozen=True)
class Config:
    """What the route opens; the cache folder is not here: the library that
    runs the route resolves it (kernel_cache::default_dir, or cache_dir())."""

    nvrtc_library: str
    cuda_library: str
    include_dirs: tuple[str, ...]
    kernel_dir: str


def site_dirs() -> list[str]:
    """The interpreter's package folders, where pip installs: site-packages
    (a venv's and, with --system-site-packages, the system's), the user site,
    sysconfig's purelib and platlib. Absolute, existing, first found first."""
    found: list[str] = []
    candidates = list(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    paths = sysconfig.get_paths()
    candidates += [paths.get("purelib"), paths.get("platlib")]
    for d in candidates:
        if d and os.path.isabs(d) and os.path.isdir(d) and d not in found:
            found.append(d)
    return found


def wheel_path(distribution: str, relative: str) -> Path | None:
    """`relative` (a path inside the wheel, e.g. nvidia/cuda_nvrtc/lib/...)
    of the installed distribution `distribution` in site_dirs(), if the
    distribution is installed there and the path exists; None otherwise."""
    inside = relative.rstrip("/") + "/"
    for dist in importlib.metadata.distributions(name=distribution, path=site_dirs()):
        files = dist.files
        # a file must be one the wheel installed (its RECORD), a folder must hold some
        if files is not None and not any(str(f) == relative or str(f).startswith(inside)
                                         for f in files):
            continue
        path = Path(dist.locate_file(relative))
        if path.exists():
            return path
    return None


def kernel_dir() -> Path | None:
    """The folder holding the kernel sources: clipops/kernels in an installed
    package, csrc/core in a source checkout; None if neither has them."""
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "csrc" / "core"):
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    return None


def nvrtc_library() -> str:
    """$CLIPOPS_NVRTC, else the nvidia-cuda-nvrtc-cu12 wheel's libnvrtc.so.12,
    else the bare name (the system's library path)."""
    env = os.environ.get("CLIPOPS_NVRTC")
    if env:
        return env
    found = wheel_path(*_WHEEL_NVRTC)
    return str(found) if found is not None else "libnvrtc.so.12"


def absolute_only(dirs: list[Path]) -> list[Path]:
    """The absolute folders of `dirs`; the others are dropped with a warning. Headers are
    compiled into code, and a relative folder is wherever the current directory happens to be
    (both NVRTC routes filter their include folders through this)."""
    relative = [str(d) for d in dirs if not d.is_absolute()]
    if relative:
        warnings.warn(f"clipops ignores the relative CUDA include folders {relative} (set "
                      "CLIPOPS_CUDA_INCLUDE, CUDA_HOME or CUDA_PATH to absolute paths)",
                      RuntimeWarning, stacklevel=3)
    return [d for d in dirs if d.is_absolute()]


def include_dirs() -> tuple[str, ...]:
    """The folders that hold cooperative_groups.h and nv/target, first found first.
    Relative folders (in $CLIPOPS_CUDA_INCLUDE, $CUDA_HOME, $CUDA_PATH) are skipped with a
    warning: headers are compiled into code, and a relative folder is wherever the
    current directory happens to be."""
    env = os.environ.get("CLIPOPS_CUDA_INCLUDE")
    candidates = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    for dist, folder, _ in _WHEEL_HEADERS:
        found = wheel_path(dist, folder)
        if found is not None:
            candidates.append(found)
    for root in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                              "/usr/local/cuda")):
        candidates += [Path(root) / "include", Path(root) / "include" / "cccl"]
    candidates = absolute_only(candidates)
    found_dirs: list[str] = []
    for _, _, header in _WHEEL_HEADERS:
        hit = next((d for d in candidates if (d / header).is_file()), None)
        if hit is not None and str(hit) not in found_dirs:
            found_dirs.append(str(hit))
    return tuple(found_dirs)


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
