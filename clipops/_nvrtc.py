"""The CUDA kernel compiled at run time with NVRTC: the CuPy front end's route
when this build has no nvcc-compiled kernel (``_core.cuda_compiled()`` is
False) or when ``CLIPOPS_FORCE_NVRTC=1``.

It mirrors csrc/core/clip_cuda.cu step by step: the same kernel source (the
headers shipped in clipops/kernels/), the same 40-byte tensor table at the front
of the workspace followed by one double of partials per work item, the same
grid rule (one block per work item, at most the resident blocks, because a
cooperative launch fails otherwise) and one cooperative launch on the caller's
stream. ``cuda_workspace_bytes`` and ``clip_cuda`` take the arguments of their
``clipops._core`` namesakes, so clipops.cupy calls either route the same way,
and the two routes produce the same bits.

The fused update's kernel (csrc/core/optim_kernel.cuh) is in the same module.
``update_cuda`` takes ``_core.update_cuda``'s arguments; its checks, tables and
kernel parameters come from ``_core.update_launch_layout``, the functions the
nvcc build's launcher (optim_cuda.cu) uses, so only the launch is mirrored here.

Why not ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` to every
NVRTC compilation it caches. That turns __fmul_rn/__fadd_rn/__fdiv_rn into
their flush-to-zero forms, so squares, sums and scaled values below 2^-126
would become 0 here but not in the nvcc build (-ftz=false) nor on the CPU.
This module therefore drives NVRTC itself (cupy.cuda.nvrtc) with the options
of the nvcc build and loads the binary with cupy.cuda.function.Module, once
per device and process. The options, the program, the disk cache (folder,
key, trust checks) and what happens to a cached binary the driver refuses
are the driver route's (csrc/core/kernel_cache.h, through clipops._core): the
two NVRTC routes share one implementation and one cache folder.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import cupy
import numpy as np
from cupy.cuda import driver, function, runtime

from . import _common, _driver

__all__ = ["CudaUnavailableError", "LaunchError", "TENSOR_ENTRY", "build_table",
           "cuda_workspace_bytes", "clip_cuda", "grid_size", "select_target",
           "cuda_include_dirs", "compile_kernel", "get_kernel", "get_update_kernel",
           "update_cuda_workspace_bytes", "update_kernel_args", "update_cuda"]

KERNEL_FILES = _driver.KERNEL_FILES


class CudaUnavailableError(RuntimeError):
    """No usable GPU path: no driver or device, no cooperative launch support,
    or the NVRTC kernel cannot be built (no NVRTC, no CUDA headers)."""


class LaunchError(RuntimeError):
    """The kernel launch itself failed (for example a cooperative grid larger
    than the GPU can hold at once)."""


# csrc/core/clip_kernel.cuh, struct TensorEntry:
#   const void* in; void* out; long long numel; long long first_item; int dtype; int pad;
TENSOR_ENTRY = np.dtype([("in", "<u8"), ("out", "<u8"), ("numel", "<i8"),
                         ("first_item", "<i8"), ("dtype", "<i4"), ("pad", "<i4")])
assert TENSOR_ENTRY.itemsize == 40, "TENSOR_ENTRY must match the C struct (40 bytes)"


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def _constants() -> tuple[int, int]:
    """(elements per work item, threads per block), from the compiled core so
    that clip_math.h stays the one place that defines them."""
    core = _common.load_core()
    return int(core.CHUNK), int(core.THREADS)


# ---- host-side layout (pure NumPy: testable without a GPU) -------------------

def build_table(descs: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, int]:
    """The device tensor table for descs = [(in_ptr, out_ptr, numel, dtype code)]
    and the number of work items, exactly as clip_cuda.cu builds it: a tensor's
    first item is the number of chunks of the tensors before it."""
    chunk, _ = _constants()
    table = np.zeros(len(descs), dtype=TENSOR_ENTRY)
    if not descs:
        return table, 0
    cols = np.array(descs, dtype=np.uint64).reshape(len(descs), 4)
    numel = cols[:, 2].astype(np.int64)
    items = (numel + (chunk - 1)) // chunk
    table["in"] = cols[:, 0]
    table["out"] = cols[:, 1]
    table["numel"] = numel
    table["first_item"] = np.cumsum(items) - items
    table["dtype"] = cols[:, 3].astype(np.int32)
    return table, int(items.sum())


def _layout(num_tensors: int, num_items: int) -> tuple[int, int]:
    """(offset of the partials in the workspace, total workspace bytes): the
    table 16-byte aligned, then one double per work item and one per tensor,
    at least 16 bytes."""
    partials_at = _align16(TENSOR_ENTRY.itemsize * num_tensors)
    return partials_at, max(16, partials_at + 8 * (num_items + num_tensors))


def cuda_workspace_bytes(descs: list[tuple[int, int, int, int]]) -> int:
    """Device workspace bytes clip_cuda needs (the same as _core's)."""
    chunk, _ = _constants()
    items = sum((d[2] + chunk - 1) // chunk for d in descs)
    return _layout(len(descs), items)[1]


def grid_size(num_items: int, resident_blocks: int) -> int:
    """One block per work item, but no more blocks than can be resident at
    once (a cooperative launch requires it); at least one block, which
    writes the norm of an empty list."""
    return max(1, min(num_items, resident_blocks))


# ---- locating the sources and CUDA headers -----------------------------------

def kernel_dir() -> Path:
    """The folder holding clip_kernel.cuh and clip_math.h: clipops/kernels in an
    installed package, csrc/core in a source checkout."""
    found = _driver.kernel_dir()
    if found is None:
        raise CudaUnavailableError(
            f"clipops' kernel sources ({', '.join(KERNEL_FILES)}) are missing from "
            f"{Path(__file__).resolve().parent / 'kernels'}; reinstall clipops "
            "(`pip install --no-build-isolation .`)")
    return found


def _header_candidates(lib: str) -> list[Path]:
    """Folders that may hold the CUDA headers of `lib` ('cudart' or 'cccl'),
    most specific first."""
    found: list[Path] = []
    env = os.environ.get("CLIPOPS_CUDA_INCLUDE")
    if env:
        found += [Path(p) for p in env.split(os.pathsep) if p]
    try:  # CuPy's own locator (a CuPy 14 dependency): pip wheels, conda, CUDA_HOME, /usr/local/cuda
        from cuda import pathfinder

        d = pathfinder.find_nvidia_header_directory(lib)
        if d:
            found.append(Path(d))
    except Exception:  # absent or older cuda-pathfinder: fall back to the toolkit paths below
        pass
    roots = [cupy.cuda.get_cuda_path(), os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"),
             "/usr/local/cuda"]
    for root in filter(None, roots):
        found += [Path(root) / "include", Path(root) / "include" / "cccl"]
    if lib == "cccl":  # last resort: the libcu++ that CuPy bundles for its own kernels
        found.append(Path(cupy.__file__).parent / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx")
    return _driver.absolute_only(found)


def cuda_include_dirs() -> list[str]:
    """-I folders for <cooperative_groups.h>, which NVRTC does not ship, and for
    the libcu++ headers it includes since CUDA 13 (<cuda/std/type_traits>).

    Set CLIPOPS_CUDA_INCLUDE (os.pathsep-separated) to choose them yourself."""
    dirs: list[str] = []
    for lib, header, required in (("cudart", "cooperative_groups.h", True),
                                  ("cccl", "cuda/std/type_traits", False)):
        hit = next((d for d in _header_candidates(lib) if (d / header).is_file()), None)
        if hit is None and required:
            raise CudaUnavailableError(
                "clipops compiles its CUDA kernel with NVRTC (this build has no nvcc-compiled kernel), "
                f"and that needs the CUDA runtime headers, but <{header}> was not found. Install them "
                "(`pip install nvidia-cuda-runtime nvidia-cuda-cccl`, or a CUDA toolkit) or point "
                "CLIPOPS_CUDA_INCLUDE at the folder that holds cooperative_groups.h.")
        if hit is not None and str(hit) not in dirs:
            dirs.append(str(hit))
    return dirs


# ---- compiling ---------------------------------------------------------------

def _nvrtc():
    """cupy.cuda.nvrtc with the library loaded, or CudaUnavailableError."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()  # loads libnvrtc
    except Exception as exc:
        raise CudaUnavailableError(
            f"NVRTC, which compiles clipops' kernel at run time, could not be loaded ({exc}). "
            "Install it with `pip install nvidia-cuda-nvrtc` (CUDA 13) or a CUDA toolkit.") from exc
    return nvrtc


def select_target(cc: int, supported: tuple[int, ...]) -> tuple[str, str]:
    """(-arch option, 'cubin' or 'ptx') for a device of compute capability cc
    (e.g. 90): native code when NVRTC knows the architecture, else PTX of the
    newest older one, which the driver compiles for the device."""
    if cc in supported:
        return f"-arch=sm_{cc}", "cubin"
    older = [a for a in supported if a <= cc]
    if not older:
        raise CudaUnavailableError(
            f"this GPU (compute capability {cc // 10}.{cc % 10}) is older than the oldest "
            f"architecture this NVRTC supports (sm_{min(supported)})")
    return f"-arch=compute_{max(older)}", "ptx"


def nvrtc_options(arch_option: str, include_dirs: list[str] | None = None) -> tuple[str, ...]:
    """The NVRTC options, the driver route's own (kernel_cache.h): the nvcc
    build's code generation (CMakeLists.txt: --fmad=false, nvcc's defaults for
    the rest), every option that changes floating-point results spelled out.
    include_dirs: the CUDA header folders (default: cuda_include_dirs(), those
    of CuPy's CUDA)."""
    if include_dirs is None:
        include_dirs = cuda_include_dirs()
    return tuple(_common.load_core().nvrtc_options(arch_option, str(kernel_dir()),
                                                   [str(d) for d in include_dirs]))


def _compile(nvrtc, options: tuple[str, ...], kind: str) -> bytes:
    core = _common.load_core()
    prog = nvrtc.createProgram(core.KERNEL_PROGRAM, core.KERNEL_PROGRAM_NAME, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise CudaUnavailableError(
                f"NVRTC failed to compile clipops' kernel ({exc}); options {' '.join(options)}:\n{log}"
            ) from exc
        binary = nvrtc.getCUBIN(prog) if kind == "cubin" else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    if isinstance(binary, str):
        binary = binary.encode()
    if kind == "ptx" and not binary.endswith(b"\0"):
        binary += b"\0"  # cuModuleLoadData reads PTX as a C string
    return binary


def compile_kernel(arch_option: str, kind: str, load=None) -> bytes:
    """The kernel as a cubin or PTX for arch_option; needs NVRTC but no GPU.

    Through the cache of both NVRTC routes (csrc/core/kernel_cache.h): the
    folder _driver.cache_dir(), used only when it and the entry pass the
    trust checks; the key covers the kernel sources and CUDA headers it
    includes (their contents), the options and the NVRTC version.

    Args:
      arch_option: "-arch=sm_XX" (kind "cubin") or "-arch=compute_XX" ("ptx").
      kind: "cubin" or "ptx".
      load: None, or a callable that loads a binary and raises if the driver
        refuses it: a cached binary it refuses is compiled afresh (once), and
        only what it raises for a fresh binary propagates.

    Returns:
      The binary (the one `load` accepted).

    Raises:
      CudaUnavailableError: no NVRTC, a kernel source missing, or NVRTC failed.
    """
    nvrtc = _nvrtc()
    options = nvrtc_options(arch_option)
    core = _common.load_core()
    try:
        key = core.kernel_cache_key(core.KERNEL_PROGRAM, list(options),
                                    tuple(nvrtc.getVersion()))
    except RuntimeError as exc:
        raise CudaUnavailableError(str(exc)) from exc
    return core.kernel_cache_get(_driver.cache_dir(), core.kernel_cache_entry(key, kind),
                                 lambda: _compile(nvrtc, options, kind), load)


# ---- loading, per device -----------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """The loaded kernel on one device and the largest cooperative grid."""

    module: object  # cupy.cuda.function.Module: keeps the code loaded
    function: object  # cupy.cuda.function.Function
    resident_blocks: int
    num_regs: int


_kernels: dict[int, Kernel] = {}
_kernels_lock = threading.Lock()


def _load_module(arch: str, kind: str):
    """The kernel loaded into the current device as a cupy.cuda.function.Module."""
    module = None

    def load(binary: bytes) -> None:
        nonlocal module
        fresh = function.Module()
        fresh.load(binary)
        module = fresh

    try:
        compile_kernel(arch, kind, load=load)
    except driver.CUDADriverError as exc:
        raise CudaUnavailableError(
            f"the driver cannot load the kernel NVRTC {_nvrtc().getVersion()} built for "
            f"{arch[6:]} ({exc}); the driver may be older than this NVRTC: update it, or "
            "install the NVRTC of the driver's CUDA version") from exc
    return module


def _kernel_in(module, name: str, device: int, what: str) -> Kernel:
    """Kernel `name` of a loaded module with its largest cooperative grid on
    `device`; `what` names it in the error when not one block fits."""
    _, threads = _constants()
    fn = module.get_function(name)
    # The occupancy calculator accounts for registers and static shared memory
    # (the clip kernel's 2 KiB); no guessed bound needed.
    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, 0)
    regs = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, fn.ptr)
    if per_sm < 1:
        raise CudaUnavailableError(
            f"clipops' {what} ({regs} registers per thread, {threads} threads per block) does not "
            f"fit on one multiprocessor of GPU {device}")
    sms = runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device)
    return Kernel(module, fn, per_sm * sms, regs)


def _load(device: int) -> Kernel:
    if not runtime.deviceGetAttribute(runtime.cudaDevAttrCooperativeLaunch, device):
        raise CudaUnavailableError(f"GPU {device} does not support cooperative launches, which "
                                   "clipops' single-launch kernel needs")
    cc = int(cupy.cuda.Device(device).compute_capability)
    arch, kind = select_target(cc, tuple(_nvrtc().getSupportedArchs()))
    return _kernel_in(_load_module(arch, kind), _common.load_core().KERNEL_NAME, device, "kernel")


def _cached(kernels: dict[int, Kernel], device: int, load) -> Kernel:
    """kernels[device], made by load(device) once per process (double-checked
    under _kernels_lock, so concurrent first calls load it once)."""
    kernel = kernels.get(device)
    if kernel is None:
        with _kernels_lock:
            kernel = kernels.get(device)
            if kernel is None:
                kernel = kernels[device] = load(device)
    return kernel


def get_kernel(device: int) -> Kernel:
    """The kernel for `device` (compiled or read from the disk cache on first
    use, then kept for the life of the process). The device must be current."""
    return _cached(_kernels, device, _load)


# ---- the launch --------------------------------------------------------------

# Pinned buffers whose table copies may not have run yet, oldest first, each
# with an event recorded after its copy. cudaMemcpyAsync from pageable memory
# "may synchronize with the stream" (CUDA's API synchronisation notes) when it
# must stage the data; from pinned memory it never does. A buffer goes back to
# CuPy's pinned pool only once its event has completed, so a later call cannot
# overwrite a table that the GPU has not read yet.
_in_flight: collections.deque = collections.deque()
_in_flight_lock = threading.Lock()


def _record_event(stream: int) -> cupy.cuda.Event:
    event = cupy.cuda.Event(block=False, disable_timing=True)
    runtime.eventRecord(event.ptr, stream)
    return event


def _check_workspace(workspace: int, workspace_bytes: int, needed: int, sizer: str) -> None:
    """The workspace the caller passed: at least `needed` bytes (what `sizer`,
    the function that tells the size, returns), 16-byte aligned."""
    if workspace == 0 or workspace_bytes < needed:
        raise ValueError(f"the CUDA workspace is missing or smaller than {sizer}()")
    if workspace % 16:
        raise ValueError("the CUDA workspace must be 16-byte aligned")


def _copy_table_async(table: np.ndarray, dst: int, stream: int) -> None:
    """Copies the table to device address dst in stream order; never waits."""
    with _in_flight_lock:
        while _in_flight and _in_flight[0][0].done:  # cudaEventQuery: does not block
            _in_flight.popleft()
    staging = cupy.cuda.alloc_pinned_memory(table.nbytes)
    ctypes.memmove(staging.ptr, table.ctypes.data, table.nbytes)
    runtime.memcpyAsync(dst, staging.ptr, table.nbytes, runtime.memcpyHostToDevice, stream)
    event = _record_event(stream)
    with _in_flight_lock:
        _in_flight.append((event, staging))


def _launch(kernel: Kernel, num_items: int, values: tuple, stream: int, what: str) -> None:
    """One cooperative launch of `kernel` on `stream`, a grid for num_items
    work items; values: the kernel's parameters in declaration order, as C
    values (the launch copies them, so they only need to live until it returns)."""
    _, threads = _constants()
    grid = grid_size(num_items, kernel.resident_blocks)
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    try:
        driver.launchCooperativeKernel(kernel.function.ptr, grid, 1, 1, threads, 1, 1, 0, stream,
                                       ctypes.addressof(pointers))
    except driver.CUDADriverError as exc:
        raise LaunchError(f"launching the {what} ({grid} blocks of {threads} threads, "
                          f"{kernel.resident_blocks} resident at most) failed: {exc}") from exc


def clip_cuda(descs: list[tuple[int, int, int, int]], norm_dtype: int, scale: bool,
              clip_norm: float, clip_ptr: int, use_norm: float | None, use_ptr: int,
              norm_out: int, workspace: int, workspace_bytes: int, stream: int,
              check_overlap: bool = True, tensor_norms: int = 0,
              skip_nonfinite: bool = False, mode: int = 0, clip_min: float = 0.0,
              clip_min_ptr: int = 0, clip_max: float = 0.0, clip_max_ptr: int = 0,
              unscale: float = 1.0, unscale_ptr: int = 0) -> None:
    """_core.clip_cuda through NVRTC: one cooperative launch on `stream`.

    The caller has validated the list (dtypes, norm dtype, aliasing); like the
    C++ launcher this never waits for the GPU. The table goes through pinned
    memory (see _copy_table_async)."""
    table, items = build_table(descs)
    partials_at, needed = _layout(len(descs), items)
    _check_workspace(workspace, workspace_bytes, needed, "cuda_workspace_bytes")
    kernel = get_kernel(runtime.getDevice())
    if len(descs):
        _copy_table_async(table, workspace, stream)
    values = (ctypes.c_uint64(workspace), ctypes.c_int(len(descs)), ctypes.c_longlong(items),
              ctypes.c_uint64(workspace + partials_at), ctypes.c_int(norm_dtype),
              ctypes.c_int(1 if scale else 0), ctypes.c_double(clip_norm), ctypes.c_uint64(clip_ptr),
              ctypes.c_int(1 if (use_norm is not None or use_ptr) else 0),
              ctypes.c_double(use_norm if use_norm is not None else 0.0), ctypes.c_uint64(use_ptr),
              ctypes.c_uint64(norm_out), ctypes.c_uint64(tensor_norms),
              ctypes.c_int(1 if skip_nonfinite else 0), ctypes.c_int(mode), ctypes.c_double(clip_min),
              ctypes.c_uint64(clip_min_ptr), ctypes.c_double(clip_max), ctypes.c_uint64(clip_max_ptr),
              ctypes.c_double(unscale), ctypes.c_uint64(unscale_ptr))
    _launch(kernel, items, values, stream, "clip kernel")


# ---- the fused update (csrc/core/optim_kernel.cuh, optim_cuda.cu) --------------

_update_kernels: dict[int, Kernel] = {}


def _load_update(device: int) -> Kernel:
    """The update kernel from the module that holds the clip kernel (one
    program, one compilation and one cache entry for both), with its own
    cooperative grid limit: it uses more registers than the clip kernel."""
    return _kernel_in(get_kernel(device).module, _common.load_core().UPDATE_KERNEL_NAME, device,
                      "update kernel")


def get_update_kernel(device: int) -> Kernel:
    """The update kernel for `device` (loaded with the clip kernel on first
    use, then kept for the life of the process). The device must be current."""
    if device not in _update_kernels:
        get_kernel(device)  # outside _cached's lock: it takes _kernels_lock itself
    return _cached(_update_kernels, device, _load_update)


def update_cuda_workspace_bytes(params: list[tuple]) -> int:
    """Device workspace bytes update_cuda needs (_core's own computation)."""
    return int(_common.load_core().update_cuda_workspace_bytes(params))


def update_kernel_args(workspace: int, states_at: int, num_tensors: int, items: int,
                       partials_at: int, kernel_params: bytes) -> tuple:
    """clipops_update_kernel's parameters in declaration order, as C values
    (the launch copies them): grads, states, num_tensors, num_items, partials,
    and the UpdateParams struct by value."""
    return (ctypes.c_uint64(workspace), ctypes.c_uint64(workspace + states_at),
            ctypes.c_int(num_tensors), ctypes.c_longlong(items),
            ctypes.c_uint64(workspace + partials_at),
            (ctypes.c_char * len(kernel_params)).from_buffer_copy(kernel_params))


def update_cuda(params: list[tuple], args, workspace: int, workspace_bytes: int,
                stream: int) -> None:
    """_core.update_cuda through NVRTC: one cooperative launch on `stream`.

    params: (param, grad, grad dtype code, m or 0, v or 0, numel, decay) per
    variable; args: a ``_core.UpdateArgs``. Raises ValueError on invalid input
    (the core's checks, nothing queued), CudaUnavailableError when the kernel
    cannot be built or loaded, LaunchError when the launch fails. Never waits
    for the GPU: the tables go through pinned memory (_copy_table_async)."""
    core = _common.load_core()
    # the core's checks of the input and the workspace, the launchers' own
    image, items, states_at, partials_at, kernel_params = core.update_launch_layout(
        params, args, workspace, workspace_bytes)
    kernel = get_update_kernel(runtime.getDevice())
    if params:
        _copy_table_async(np.frombuffer(image, dtype=np.uint8), workspace, stream)
    _launch(kernel, items, update_kernel_args(workspace, states_at, len(params), items,
                                              partials_at, kernel_params), stream, "update kernel")
