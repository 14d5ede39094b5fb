"""CuPy front end: the core's single CUDA launch on GPU arrays, without TensorFlow.

    import clipops.cupy as ccp
    grads, norm = ccp.clip_by_global_norm(grads, 1.0)           # new arrays
    grads, norm = ccp.clip_by_global_norm(grads, 1.0, in_place=True)  # like clip_grad_norm_
    norm = ccp.global_norm(grads)
    # Keras' AdamW with its clip, in place, in one launch (also sgd_update, adam_update):
    norm = ccp.adamw_update(params, grads, ms, vs, step=step, learning_rate=lr,
                            global_clipnorm=1.0)

Same semantics as clipops.clip_by_global_norm and clipops.numpy (TF's scale
formula, NaN on a non-finite norm, float32-or-better accumulation, mixed
dtypes in one launch), and the same bits as clipops.numpy on the same data:
every device follows the reduction order of csrc/core/clip_math.h.

Inputs: CuPy arrays, or any GPU array exposing DLPack or
``__cuda_array_interface__`` (PyTorch, JAX, Numba...), viewed without a copy.
DLPack is preferred: its producer orders its pending work before CuPy's current
stream without blocking the host. Through ``__cuda_array_interface__`` CuPy
may wait for the producer's stream (CUPY_CUDA_ARRAY_INTERFACE_SYNC). bfloat16
arrays need CuPy >= 14 with ml_dtypes (CuPy's bfloat16 dtype).

Streams and lifetimes: the call runs on CuPy's current stream
(``cupy.cuda.get_current_stream()``) and never waits for the GPU: it
returns as soon as the table copy and the launch are queued. Results are
ready in stream order, so work queued later on the same stream sees them;
synchronise the stream before reading them from another stream or the host.
The workspace (tensor table + partial sums), the outputs and the norm are
allocated from CuPy's memory pool on that stream. The workspace is dropped
when the call returns, while the kernel may still run: this is safe because
CuPy's pool is stream-ordered. A block freed on a stream is handed out again
only to allocations on that same stream, whose work the GPU runs after this
kernel; and releasing it to the driver (``free_all_blocks``) goes through
cudaFree, which waits for the device. (With a custom allocator that is not
stream-ordered, synchronise the stream before freeing memory.) Likewise keep
inputs that another framework owns alive, or on a stream ordered after this
one, until the kernel has run; e.g. run under
``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``.

The fused update (sgd_update, adam_update, adamw_update) takes the same
arrays and keeps to the same rules: one launch on the current stream, no host
wait (but for nonfinite="raise"), variables and state written in place. Its
learning rate and its step may live on the device (a 0-d float array; an int64
counter the kernel advances), so a training loop changes neither the call nor
anything compiled from step to step.

PyTorch: torch and CuPy share the legacy default stream (handle 0), so on
torch's default stream nothing needs doing. On another torch stream, run the
call on it: ``with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):``.
DLPack then orders the tensors' pending work before that stream, and the
update runs in torch's stream order.

The kernels are nvcc-compiled into clipops._core when the package was built
with CUDA; otherwise (or with CLIPOPS_FORCE_NVRTC=1) the same source, shipped in
clipops/kernels/, is compiled with NVRTC at the first call on a device (a few
seconds, then read from CuPy's disk cache; that first call loads a module and
may block) by clipops._nvrtc. The two routes give the same bits.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

try:
    import cupy
except ImportError as _exc:
    raise ImportError(
        f"clipops.cupy needs CuPy, which could not be imported ({_exc}). Install it with "
        "`pip install cupy-cuda13x` (CUDA 13 drivers; cupy-cuda12x for CUDA 12). clipops.numpy "
        "runs on the CPU without it.") from _exc
import numpy as np

from . import _common, _nvrtc, _optim
from ._nvrtc import CudaUnavailableError, LaunchError

__all__ = ["clip_by_global_norm", "global_norm", "clip_by_norm", "clip_by_value",
           "CudaUnavailableError", "LaunchError", "UnsupportedArrayError"]


class UnsupportedArrayError(ValueError, RuntimeError):
    """An array this GPU call cannot use as it is: on another device than the
    current one, not aligned to its element size, or not C-contiguous for
    in_place=True. A ValueError, like the other front ends' input errors, and
    a RuntimeError."""


# DLPack device types (dlpack.h): CUDA device memory and managed memory are
# readable by the kernel; CPU and pinned host memory are host arrays here.
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13
_DL_HOST = (1, 3)
_OUTPUT_ALIGN = 256  # bytes between outputs in their shared buffer: keeps 16-byte vector loads


# ---- environment -------------------------------------------------------------

def _current_device() -> int:
    """CuPy's current device, or CudaUnavailableError naming why there is none."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        try:
            built_for = cupy.cuda.runtime.runtimeGetVersion()
            built_for = f"CUDA {built_for // 1000}.{built_for % 1000 // 10}"
        except Exception:
            built_for = "its CUDA version"
        raise CudaUnavailableError(
            f"clipops.cupy needs an NVIDIA GPU, but the CUDA runtime reports: {exc}. Either no "
            f"NVIDIA driver is installed, the driver is older than {built_for} that this CuPy "
            "was built for, or CUDA_VISIBLE_DEVICES hides every GPU. clipops.numpy runs on the CPU."
        ) from exc
    if count < 1:
        raise CudaUnavailableError("clipops.cupy needs an NVIDIA GPU, but the CUDA runtime sees "
                                   "no device (check CUDA_VISIBLE_DEVICES)")
    return cupy.cuda.runtime.getDevice()


def _use_nvrtc(core) -> bool:
    """The NVRTC route: no nvcc-compiled kernel in this build, or forced (tests)."""
    return os.environ.get("CLIPOPS_FORCE_NVRTC") == "1" or not core.cuda_compiled()


def _separate_allocations() -> bool:
    """CLIPOPS_SEPARATE_ALLOCATIONS=1 gives every output an allocation of its
    own, of its exact size: with CuPy's pool off, compute-sanitizer memcheck
    then sees each output's bounds (tests/gpu_checks.sh). Off by default: one
    pool allocation per output costs microseconds each."""
    return os.environ.get("CLIPOPS_SEPARATE_ALLOCATIONS") == "1"


# ---- inputs --------------------------------------------------------------------

def _dlpack_device_type(x) -> int | None:
    try:
        return int(x.__dlpack_device__()[0])
    except Exception:  # no DLPack, or a producer that cannot say
        return None


def _has_cuda_array_interface(x) -> bool:
    try:  # a property that may raise, e.g. torch's for CPU or bfloat16 tensors
        return getattr(x, "__cuda_array_interface__", None) is not None
    except Exception:
        return False


def _is_device_array(x) -> bool:
    if isinstance(x, cupy.ndarray):
        return True
    dl = _dlpack_device_type(x)
    if dl is not None:
        return dl in (_DL_CUDA, _DL_CUDA_MANAGED)
    return _has_cuda_array_interface(x)


def _is_host_array(x) -> bool:
    return isinstance(x, np.ndarray) or _dlpack_device_type(x) in _DL_HOST or \
        hasattr(x, "__array_interface__")


def _as_device_array(x, what: str) -> cupy.ndarray:
    """x as a CuPy array without a copy; TypeError for anything that is not a
    GPU array (host arrays are never copied to the device behind your back)."""
    if isinstance(x, cupy.ndarray):
        return x
    if _is_device_array(x):
        try:
            if hasattr(x, "__dlpack__"):
                return cupy.from_dlpack(x)
            return cupy.asarray(x)  # __cuda_array_interface__: a view, not a copy
        except Exception as exc:
            raise TypeError(f"{what} ({type(x).__module__}.{type(x).__name__}) is a GPU array that "
                            f"CuPy cannot view without a copy: {exc}") from exc
    if _is_host_array(x):
        raise TypeError(f"{what} is a host array ({type(x).__module__}.{type(x).__name__}); "
                        "clipops.cupy clips GPU arrays. Use clipops.numpy for host arrays, or "
                        "copy it to the GPU first (cupy.asarray).")
    raise TypeError(f"{what} is a {type(x).__name__}; expected a CuPy array or a GPU array that "
                    "supports DLPack or __cuda_array_interface__")


@dataclass
class _Prepared:
    """The validated list: positions of the non-None entries, their CuPy
    arrays and dtype codes, the norm's dtype code and the current device."""

    arrays: list
    positions: list[int]
    values: list[cupy.ndarray]
    codes: list[int]
    norm_code: int
    device: int


def _prepare(arrays, in_place: bool) -> _Prepared:
    arrays = _common.check_list(arrays, "arrays")
    positions = [i for i, a in enumerate(arrays) if a is not None]
    device = _current_device()
    values, codes = [], []
    for i in positions:
        what = f"arrays[{i}]"
        a = _as_device_array(arrays[i], what)
        codes.append(_common.dtype_code(a.dtype.name, i, "arrays"))
        _check_placement(a, what, device)
        if not a.flags.c_contiguous:
            if in_place:
                raise UnsupportedArrayError(
                    f"{what} is not C-contiguous; in_place=True needs contiguous arrays "
                    "(or pass in_place=False, which copies it to a contiguous array first)")
            a = cupy.ascontiguousarray(a)  # on the current stream; the result is C-ordered
        values.append(a)
    if in_place:
        _check_no_shared_memory(values, positions)
    return _Prepared(arrays, positions, values, codes, _common.norm_dtype_code(codes), device)


def _check_placement(a: cupy.ndarray, what: str, device: int) -> None:
    """On the current device and aligned to its elements, or UnsupportedArrayError."""
    if a.data.device_id != device:
        raise UnsupportedArrayError(
            f"{what} is on GPU {a.data.device_id} but the current device is GPU {device}; "
            f"clipops runs one kernel on one device: call it under "
            f"`with cupy.cuda.Device({a.data.device_id}):` or move the array")
    if a.size and a.data.ptr % a.dtype.itemsize:
        raise UnsupportedArrayError(
            f"{what} is not aligned to its {a.dtype.itemsize}-byte elements (address "
            f"{a.data.ptr:#x}); a GPU faults on such loads: pass an aligned array")


def _check_no_shared_memory(values: list[cupy.ndarray], positions: list[int]) -> None:
    """In place, every array is written: no two may share a byte, or scaling one
    would change another mid-call. (Out of place, inputs are only read and the
    outputs are fresh, so sharing is fine there.)"""
    # Checking neighbours in start order suffices: if ranges r_i and r_j
    # (i < j) overlap, r_j's predecessor starts inside r_i, so by induction
    # some neighbouring pair overlaps too.
    ranges = sorted((a.data.ptr, a.data.ptr + a.nbytes, i)
                    for a, i in zip(values, positions) if a.nbytes)
    for (_, prev_end, j), (begin, _, i) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            first, second = sorted((i, j))
            raise ValueError(f"arrays[{first}] and arrays[{second}] share memory; in_place=True "
                             "writes every array, so pass each buffer once (or use in_place=False)")


@dataclass
class _Scalar:
    """clip_norm or use_norm as the core takes it: a host double, or a device
    pointer to one element of the norm dtype (read by the kernel, so the host
    never waits); `array` keeps that element alive until the launch is queued."""

    value: float = 0.0
    ptr: int = 0
    array: cupy.ndarray | None = None


def _scalar(value, prep: _Prepared, what: str, copy: bool) -> _Scalar:
    """A Python number (or host scalar) is rounded to the norm dtype exactly as
    clipops.numpy does; a 0-d GPU array is cast to it on the current stream.
    copy=True always makes that a private copy: in place, the kernel writes
    the arrays while reading the scalar, which must not live in one of them.
    `value` has passed _common.check_scalar (clip_by_global_norm checks it
    before any device call)."""
    if not _is_device_array(value):
        return _Scalar(value=_common.scalar_in(value, prep.norm_code, what))
    a = _as_device_array(value, what)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"{what} must be a float, got a {a.dtype.name} array")
    if a.data.device_id != prep.device:
        raise UnsupportedArrayError(f"{what} is on GPU {a.data.device_id} but the arrays are on "
                                    f"GPU {prep.device}")
    a = a.astype(_common.np_dtype(prep.norm_code), copy=copy)
    return _Scalar(ptr=a.data.ptr, array=a)


# ---- outputs and the launch ----------------------------------------------------

def _empty_like_all(values: list[cupy.ndarray]) -> list[cupy.ndarray]:
    """Uninitialised C-contiguous arrays shaped like `values`, carved from ONE
    allocation (a pool allocation per tensor costs microseconds of host time,
    thousands of them milliseconds). Each starts on a 256-byte boundary. Every
    output keeps the shared buffer alive. With CLIPOPS_SEPARATE_ALLOCATIONS=1,
    one unpadded allocation per output instead (see _separate_allocations)."""
    if _separate_allocations():
        return [cupy.empty(a.shape, a.dtype) for a in values]
    offsets, total = [], 0
    for a in values:
        offsets.append(total)
        total += (a.nbytes + _OUTPUT_ALIGN - 1) // _OUTPUT_ALIGN * _OUTPUT_ALIGN
    buf = cupy.empty(total, dtype=cupy.uint8)
    return [cupy.ndarray(a.shape, a.dtype, memptr=buf.data + off) for a, off in zip(values, offsets)]


def _norm_without_tensors(use: _Scalar | None) -> cupy.ndarray:
    """The norm of a list with no tensors, made without the clip kernel (a
    copy on the current stream): 0.0 as in TensorFlow, or use_norm, in float32,
    the norm dtype of such a list. Always a new array, as the kernel's norm is."""
    if use is not None and use.ptr:
        return use.array.copy()
    return cupy.asarray(np.float32(0.0 if use is None else use.value))


def _launch(prep: _Prepared, outs: list[cupy.ndarray] | None, clip: _Scalar,
            use: _Scalar | None, norms: cupy.ndarray | None = None,
            skip_nonfinite: bool = False, mode: int = 0, bounds=None,
            unscale: _Scalar | None = None) -> cupy.ndarray:
    """One launch over prep's arrays on the current stream; returns the 0-d norm.
    outs None: the norm only. norms: where each tensor's own norm goes, or
    None. Never waits for the GPU. A list with no tensors launches nothing:
    the kernel would only write the norm."""
    if not prep.values:
        return _norm_without_tensors(use)
    core = _common.load_core()
    if outs is None:
        descs = [(a.data.ptr, 0, a.size, c) for a, c in zip(prep.values, prep.codes)]
    else:
        descs = [(a.data.ptr, o.data.ptr, a.size, c)
                 for a, o, c in zip(prep.values, outs, prep.codes)]
    norm = cupy.empty((), dtype=_common.np_dtype(prep.norm_code)) if mode == 0 else None
    nvrtc = _use_nvrtc(core)
    nbytes = (_nvrtc if nvrtc else core).cuda_workspace_bytes(descs)
    # Lives until this function returns; the pool's stream ordering covers
    # the rest of the kernel's run (see the module docstring).
    workspace = cupy.empty(nbytes, dtype=cupy.uint8)
    use_value = None if use is None or use.ptr else use.value
    args = (descs, prep.norm_code, outs is not None, clip.value, clip.ptr, use_value,
            use.ptr if use is not None else 0, 0 if norm is None else norm.data.ptr,
            workspace.data.ptr, nbytes,
            cupy.cuda.get_current_stream().ptr)
    # The rest of the launch arguments, positionally (keywords for parameters
    # with defaults cost pybind11 3.1 memory per call: clipops/numpy.py):
    # check_overlap, tensor_norms, skip_nonfinite, mode, clip_min, clip_min_ptr,
    # clip_max, clip_max_ptr, unscale, unscale_ptr.
    lo, hi = bounds if bounds is not None else (_Scalar(0.0, 0), _Scalar(0.0, 0))
    rest = (0 if norms is None else norms.data.ptr, skip_nonfinite, mode, lo.value, lo.ptr,
            hi.value, hi.ptr, 1.0 if unscale is None or unscale.ptr else unscale.value,
            0 if unscale is None else unscale.ptr)
    if nvrtc:
        _nvrtc.clip_cuda(*args, True, *rest)
    else:
        try:
            # Overlaps were ruled out above (outputs are fresh; in place was checked).
            core.clip_cuda(*args, False, *rest)
        except (ValueError, RuntimeError) as exc:
            # Inputs are validated in Python first, so what is left are CUDA
            # failures, which the core reports as ValueError (RuntimeError
            # once module.cc separates them).
            raise LaunchError(f"the clip kernel could not run: {exc}") from exc
    return norm


def _norms_out(prep: _Prepared, wanted: bool) -> cupy.ndarray | None:
    if not wanted:
        return None
    return cupy.zeros(len(prep.values), dtype=_common.np_dtype(prep.norm_code))


def global_norm(arrays, *, return_norms: bool = False):
    """sqrt(sum of squares of every element) as a 0-d CuPy array of the norm
    dtype (the arrays' dtype, float32 for a mixed list); None entries are
    ignored. Queued on the current stream; the host does not wait. A list with
    no arrays (empty, or only None) has the norm 0.0 in float32, as in
    TensorFlow, and launches no kernel. With return_norms, ``(norm,
    tensor_norms)``: each array's own norm (0 for None), from the same launch.

    Raises:
      TypeError: not a sequence, a non-float array, or a host / non-GPU array.
      UnsupportedArrayError (a ValueError): an array on another device.
      CudaUnavailableError: no usable GPU (no driver, no device, no NVRTC).
      LaunchError: the launch failed.
    """
    prep = _prepare(arrays, in_place=False)
    norms = _norms_out(prep, return_norms)
    norm = _launch(prep, None, _Scalar(), None, norms)
    if not return_norms:
        return norm
    return norm, _common.expand_norms(norms, prep.positions, len(prep.arrays), cupy)


def clip_by_global_norm(arrays, clip_norm, use_norm=None, in_place: bool = False, *,
                        nonfinite: str = "nan", return_norms: bool = False, unscale=None):
    """Scales every array by clip_norm / max(global_norm, clip_norm), with
    TensorFlow's formula in the norm's dtype, in one CUDA launch.

    Args:
      arrays: a sequence of GPU arrays (CuPy, or DLPack / __cuda_array_interface__
        producers) or None; float16, bfloat16, float32, float64, mixed allowed.
      clip_norm: a Python number (rounded to the norm dtype as TF does) or a 0-d
        GPU array (cast to the norm dtype on the stream, read by the kernel);
        normally > 0. 0, -0.0, negative numbers, NaN and inf are not refused
        and give TensorFlow's results (``clipops.clip_by_global_norm``).
      use_norm: optional, likewise: the global norm to use instead of computing
        it; it is then returned as the norm.
      in_place: write the results into the caller's arrays (they must be
        C-contiguous and not share memory) and return those same objects, as
        torch.nn.utils.clip_grad_norm_ does; it writes through the zero-copy
        view, so do not use it on arrays their owner treats as immutable (JAX).
        Otherwise non-contiguous inputs are copied to contiguous ones first and
        new CuPy arrays are returned.
      nonfinite: what an inf or NaN norm does: "nan" (TF's behaviour, every
        output NaN), "raise" (NonFiniteError naming the first array whose own
        norm is not finite, nothing written; it waits for the GPU), or "skip"
        (the outputs are the inputs as they are, not multiplied by unscale
        either; never waits, and the result's ``skipped`` says so).
      return_norms: also return each array's own norm, from the same launch.
      unscale: optional, a positive number or 0-d GPU array u (1 / loss
        scale): the arrays are taken as ``a * u``, and the norms and outputs
        are those of that list, from the same launch (see
        clipops.clip_by_global_norm).

    Returns:
      (clipped, norm): a list (None entries stay None) and the 0-d norm of the
      norm dtype, both on the current stream's timeline (not waited for).
      Out of place, the clipped arrays are views into one shared allocation.
      A list with no arrays gives ([None, ...], 0.0 float32) as in TensorFlow,
      or use_norm as the norm, without a kernel. With return_norms or
      nonfinite="skip", a ``clipops.ClipResult(clipped, global_norm,
      tensor_norms, skipped)`` instead (see clipops.clip_by_global_norm).

    Raises: as global_norm; ValueError also when in-place arrays share memory
    or a scalar argument is not a scalar (checked before any device call).
    """
    policy = _common.check_nonfinite(nonfinite)
    _common.check_scalar(clip_norm, "clip_norm")
    if use_norm is not None:
        _common.check_scalar(use_norm, "use_norm")
    if unscale is not None:
        _common.check_unscale(unscale)
    prep = _prepare(arrays, in_place)
    clip = _scalar(clip_norm, prep, "clip_norm", copy=in_place)
    use = None if use_norm is None else _scalar(use_norm, prep, "use_norm", copy=in_place)
    u = None if unscale is None else _scalar(unscale, prep, "unscale", copy=in_place)
    outs = prep.values if in_place else _empty_like_all(prep.values)
    norms = _norms_out(prep, return_norms or policy == "raise")
    norm = _launch(prep, outs, clip, use, norms, skip_nonfinite=policy != "nan", unscale=u)
    if policy == "raise" and not bool(cupy.isfinite(norm)):  # waits for the GPU
        raise _common.NonFiniteError(_common.nonfinite_message(
            norm.get(), norms.get(), prep.positions, "arrays"))
    result = [None] * len(prep.arrays)
    for i, out in zip(prep.positions, outs):
        result[i] = prep.arrays[i] if in_place else out
    if not (return_norms or policy == "skip"):
        return result, norm
    return _common.ClipResult(
        result, norm,
        _common.expand_norms(norms, prep.positions, len(prep.arrays), cupy) if return_norms else None,
        cupy.logical_not(cupy.isfinite(norm)) if policy == "skip" else None)


def _clip_each(arrays, in_place: bool, mode: str, *, clip=None, bounds=None,
               return_norms: bool = False):
    """clip_by_norm / clip_by_value: one launch in the kernel's `mode`."""
    for name, value in ([("clip_norm", clip)] if clip is not None else []) + \
            list(zip(("clip_value_min", "clip_value_max"), bounds or ())):
        _common.check_scalar(value, name)
    prep = _prepare(arrays, in_place)
    copy = in_place  # in place, a scalar must not live in an array that is written
    clip_s = _Scalar() if clip is None else _scalar(clip, prep, "clip_norm", copy=copy)
    bound_s = None if bounds is None else tuple(
        _scalar(v, prep, name, copy=copy) for v, name in zip(bounds, ("clip_value_min",
                                                                      "clip_value_max")))
    outs = prep.values if in_place else _empty_like_all(prep.values)
    norms = _norms_out(prep, return_norms)
    if prep.values:
        _launch(prep, outs, clip_s, None, norms, mode=_common.load_core().MODES[mode],
                bounds=bound_s)
    result = [None] * len(prep.arrays)
    for i, out in zip(prep.positions, outs):
        result[i] = prep.arrays[i] if in_place else out
    if return_norms:
        return result, _common.expand_norms(norms, prep.positions, len(prep.arrays), cupy)
    return result


def clip_by_norm(arrays, clip_norm, in_place: bool = False, *, return_norms: bool = False):
    """``tf.clip_by_norm`` on every array of a list in ONE launch: each array
    becomes ``(x * clip_norm) / maximum(norm(x), clip_norm)`` in its dtype,
    with the same bits as clipops.numpy.clip_by_norm. Arguments, results and
    errors as clipops.numpy.clip_by_norm (a negative clip_norm is taken as 0,
    as in TensorFlow); clip_norm may also be a 0-d GPU array (read by the
    kernel). Queued on the current stream."""
    return _clip_each(arrays, in_place, "norm", clip=clip_norm, return_norms=return_norms)


def clip_by_value(arrays, clip_value_min, clip_value_max, in_place: bool = False):
    """``tf.clip_by_value`` on every array of a list in ONE launch, with the same
    bits as clipops.numpy.clip_by_value. The bounds may be numbers or 0-d GPU
    arrays (read by the kernel); they are not checked (min > max gives min,
    a NaN bound NaN, as in TensorFlow). Queued on the current stream."""
    return _clip_each(arrays, in_place, "value", bounds=(clip_value_min, clip_value_max))


# ---- the fused clip + optimizer update (csrc/core: update_cuda) ----------------------------------
# Keras 3's SGD, Adam and AdamW steps with their clip folded in, over float32
# GPU variables, in place, in ONE cooperative launch that the host never waits
# for. Arguments as clipops.numpy's (converted by clipops/_optim.py); here the
# learning rate and the step may also live on the device.

__all__ += ["sgd_update", "adam_update", "adamw_update"]

_FLOAT32 = _common.DTYPE_CODES["float32"]
_GRAD_DTYPES = ("float32", "float16", "bfloat16")


def _state_array(x, what: str, device: int) -> cupy.ndarray:
    """A variable or an optimizer state array: float32, written in place."""
    a = _as_device_array(x, what)
    if a.dtype != np.float32:
        raise TypeError(f"{what} has dtype {a.dtype}; variables and optimizer state are float32")
    _check_placement(a, what, device)
    if not a.flags.c_contiguous:
        raise UnsupportedArrayError(f"{what} is not C-contiguous; the update writes it in place, "
                                    "which needs a contiguous array")
    return a


def _state_like(x, p: cupy.ndarray, what: str, pwhat: str, device: int) -> cupy.ndarray:
    a = _state_array(x, what, device)
    if a.shape != p.shape:
        raise ValueError(f"{what} has shape {a.shape}, but {pwhat} has {p.shape}")
    return a


def _gradient(x, shape: tuple, what: str, device: int) -> tuple[cupy.ndarray, int]:
    """A gradient as the kernel reads it (a contiguous copy, made on the current
    stream, when it is not contiguous) and its dtype code."""
    g = _as_device_array(x, what)
    if g.dtype.name not in _GRAD_DTYPES:
        raise TypeError(f"{what} has dtype {g.dtype.name}; gradients of float32 variables are "
                        "float32, float16 or bfloat16 (Keras casts them to float32)")
    _check_placement(g, what, device)
    if g.shape != shape:
        raise ValueError(f"{what} has shape {g.shape}, but its variable has shape {shape}")
    if not g.flags.c_contiguous:
        g = cupy.ascontiguousarray(g)  # one more kernel; the update reads g in chunks
    return g, _common.DTYPE_CODES[g.dtype.name]


_STEP_KINDS = ("step must be an int (this update's number, from 1) or a one-element int64 GPU "
               "array (the number of updates done so far, which the kernel advances)")


def _step_argument(step) -> tuple[int | None, object]:
    """(t, None) for a host int t >= 1, or (None, step) for a GPU array, checked
    once converted (_counter). Touches no device."""
    if _is_device_array(step):
        return None, step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"{_STEP_KINDS}; got {type(step).__module__}.{type(step).__name__}")
    return _optim.check_step(int(step)), None


def _counter(x, device: int) -> cupy.ndarray:
    """The device step counter (Keras' ``iterations``): one int64, read and
    advanced by the kernel."""
    a = _as_device_array(x, "step")
    if a.dtype != np.int64:
        raise TypeError(f"step, a GPU step counter, has dtype {a.dtype}; it must be int64 (the "
                        "kernel reads and writes 8 bytes), e.g. cupy.zeros((), cupy.int64) or "
                        "torch.zeros((), dtype=torch.int64, device='cuda')")
    if a.size != 1:
        raise ValueError(f"step, a GPU step counter, must hold one element; got shape {a.shape}")
    _check_placement(a, "step", device)
    return a


def _float_scalar(x, what: str, device: int, dtype) -> cupy.ndarray:
    """A 0-d GPU float as the kernel reads it: cast to `dtype` on the current
    stream (one more kernel) unless it has that dtype already."""
    a = _as_device_array(x, what)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"{what} must be a float, got a {a.dtype.name} array")
    _check_placement(a, what, device)
    return a.astype(dtype, copy=False)


def _launch_update(core, descs: list, args, positions: list[int]) -> None:
    """One launch on the current stream through the build's route; never waits.
    The core's checks (overlaps among every buffer and scalar, the state each
    rule needs) run first on both routes; a refusal names the caller's lists."""
    nvrtc = _use_nvrtc(core)
    nbytes = core.update_cuda_workspace_bytes(descs)
    # Lives until this function returns; the pool's stream ordering covers
    # the rest of the kernel's run (see the module docstring).
    workspace = cupy.empty(nbytes, dtype=cupy.uint8)
    stream = cupy.cuda.get_current_stream().ptr
    try:
        if nvrtc:
            _nvrtc.update_cuda(descs, args, workspace.data.ptr, nbytes, stream)
        else:
            core.update_cuda(descs, args, workspace.data.ptr, nbytes, stream)
    except ValueError as exc:  # invalid input: refused before anything was queued
        msg = _optim.name_tensors(str(exc), positions, _optim.STATE_NAMES)
        raise ValueError(re.sub(r"\biterations\b", "step", msg)) from None  # the core's name
    except RuntimeError as exc:
        if nvrtc:  # already CudaUnavailableError or LaunchError
            raise
        raise LaunchError(f"the update kernel could not run: {exc}") from exc


def _update(rule: str, params, grads, momentums, velocities, *, step=None, learning_rate,
            weight_decay, decay_mask, global_clipnorm, clipnorm, clipvalue, unscale, nonfinite,
            return_norms, **hyper):
    """The checks and the launch shared by sgd_update, adam_update and adamw_update."""
    # ---- host arguments, checked and converted before any device call ----
    call = _optim.check_update_call(
        params, grads, momentums, velocities, weight_decay=weight_decay, decay_mask=decay_mask,
        global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue, unscale=unscale,
        nonfinite=nonfinite)
    policy, ms, vs, flags = call.policy, call.momentums, call.velocities, call.decay
    mode, clip = call.clip_mode, call.clip
    unscale_on_device = unscale is not None and _is_device_array(unscale)
    _common.check_scalar(learning_rate, "learning_rate")
    lr_on_device = _is_device_array(learning_rate)
    t, counter = (None, None) if rule == "sgd" else _step_argument(step)
    core = _common.load_core()
    # float32 stands in for the norm's dtype until the gradients are seen; only
    # the clip threshold's rounding depends on it (set again below).
    args = _optim.update_args(
        core, rule=rule, clip_mode=mode, clip_value=clip, norm_code=_FLOAT32,
        unscale=1.0 if unscale is None or unscale_on_device else float(unscale),
        skip=policy != "nan", learning_rate=0.0 if lr_on_device else learning_rate,
        weight_decay=weight_decay, step=1 if counter is not None else t, **hyper)

    # ---- the arrays ----
    device = _current_device()
    descs, positions, keep = [], [], []
    for i, (p, g) in enumerate(zip(call.params, call.grads)):
        if g is None:  # as Keras: a variable without a gradient is neither updated nor decayed
            continue
        p = _state_array(p, f"params[{i}]", device)
        g, code = _gradient(g, p.shape, f"grads[{i}]", device)
        m = None if ms is None else _state_like(ms[i], p, f"momentums[{i}]", f"params[{i}]", device)
        v = None if vs is None else _state_like(vs[i], p, f"velocities[{i}]", f"params[{i}]",
                                                device)
        keep.append(g)  # a contiguous copy lives until the launch is queued
        descs.append((p.data.ptr, g.data.ptr, code, 0 if m is None else m.data.ptr,
                      0 if v is None else v.data.ptr, p.size, flags[i]))
        positions.append(i)
    norm_code = _common.norm_dtype_code([d[2] for d in descs])
    ndt = _common.np_dtype(norm_code)
    if norm_code != _FLOAT32:
        args.norm_dtype = norm_code
        if mode != "none":
            args.clip = _common.scalar_in(clip, norm_code, mode)

    # ---- device scalars and outputs (all read or written by the kernel only) ----
    if lr_on_device:
        lr = _float_scalar(learning_rate, "learning_rate", device, np.float32)
        args.learning_rate_ptr = lr.data.ptr
        keep.append(lr)
    if unscale_on_device:
        u = _float_scalar(unscale, "unscale", device, ndt)
        args.unscale_ptr = u.data.ptr
        keep.append(u)
    if counter is not None:
        c = _counter(counter, device)
        args.power_source = core.POWER_SOURCES["from_step"]
        args.iterations_ptr = c.data.ptr
        args.increment_iterations = True
        keep.append(c)
    norm = cupy.empty((), dtype=ndt)
    args.norm_out = norm.data.ptr
    norms = None
    if (return_norms or policy == "raise") and descs:
        norms = cupy.empty(len(descs), dtype=ndt)  # the kernel writes every entry
        args.tensor_norms = norms.data.ptr
    _launch_update(core, descs, args, positions)
    del keep

    if policy == "raise":
        host_norm = norm.get()  # waits for the GPU
        if not np.isfinite(host_norm):
            raise _common.NonFiniteError(_optim.nonfinite_update_message(
                host_norm, norms.get(), positions))
    if not return_norms:
        return norm
    if norms is None:
        norms = cupy.zeros(0, dtype=ndt)
    return norm, _common.expand_norms(norms, positions, len(call.params), cupy)


_UPDATE_COMMON_ARGS = """
      weight_decay: Keras' ``weight_decay``: ``p -= p * weight_decay * learning_rate``
        before the update, for every variable not masked out; None: no decay.
      decay_mask: a sequence of bools, one per variable: False excludes it from weight
        decay (Keras' ``exclude_from_weight_decay``); None: every variable decays.
      global_clipnorm, clipnorm, clipvalue: Keras' clip options, Python numbers (at most
        one; one that is not > 0 does not clip). The gradients are then exactly the
        outputs of ``clip_by_global_norm``, ``clip_by_norm`` or ``clip_by_value(g, -v, v)``,
        in their own dtype, before the update casts them to float32.
      unscale: with global_clipnorm or no clip, the gradients are taken as
        ``g * unscale`` (``1 / loss_scale``): a number, or a 0-d GPU float array (read
        by the kernel; cast to the norm's dtype on the stream when it has another).
      nonfinite: an inf or NaN global norm (of ``g * unscale``): "nan" (Keras' behaviour:
        the NaN reaches the variables), "skip" (nothing is written and a device step
        counter is not advanced, as Keras' LossScaleOptimizer; never waits), or "raise"
        (clipops.NonFiniteError naming the first bad gradient, nothing written; this
        one waits for the GPU to read the norm).
      return_norms: also return each gradient's own norm (0 for a None gradient), from
        the same launch.

    Returns:
      The global norm of the gradients (of ``g * unscale``) before the clip, a 0-d
      CuPy array of the gradients' dtype (float32 for a mixed list), on the current
      stream's timeline; with return_norms, ``(global_norm, tensor_norms)``. With
      nonfinite="skip", a norm that is not finite means the step was skipped
      (``cupy.isfinite(norm)`` tells without waiting).

    Raises:
      TypeError: a list is not a sequence; an array is a host array, or not a GPU
        array; a variable or state array is not float32; a gradient is not float32,
        float16 or bfloat16; step or learning_rate of a wrong kind or dtype.
      ValueError: lengths or shapes differ; a scalar is out of range or not a scalar;
        two buffers share memory that the update writes (the message names them).
        UnsupportedArrayError (a ValueError): an array on another device, not
        contiguous (variables and state) or misaligned. Nothing is queued then.
      CudaUnavailableError: no usable GPU (no driver, no device, no NVRTC).
      LaunchError: the launch failed.
      clipops.NonFiniteError: nonfinite="raise" and the norm is inf or NaN.
"""


def sgd_update(params, grads, momentums=None, *, learning_rate=0.01, momentum=0.0,
               nesterov=False, weight_decay=None, decay_mask=None, global_clipnorm=None,
               clipnorm=None, clipvalue=None, unscale=None, nonfinite="nan",
               return_norms=False):
    """Keras 3's ``SGD`` step, fused with its clip, in place, in ONE launch on
    CuPy's current stream; the host does not wait. The same bits as
    clipops.numpy.sgd_update on the same data (Keras' float32 operations in
    Keras' order: ``m = m * momentum - g * lr``; ``p = p + m``, or with nesterov
    ``p = p + (m * momentum - g * lr)``; without momentum ``p = p - g * lr``).

    Args:
      params: float32 GPU arrays (the variables), C-contiguous, updated in place:
        CuPy arrays or any DLPack / ``__cuda_array_interface__`` producer (torch's
        ``p.data``; the gradients and state likewise), viewed without a copy.
      grads: one gradient per variable, of its shape (float32, float16 or
        bfloat16), or None (the variable is left alone, as Keras does).
      momentums: with momentum != 0, Keras' ``momentums``: float32 arrays like
        params, updated in place; else None.
      learning_rate: a number (cast to float32 as Keras does) or a 0-d GPU float
        array (a schedule's value for this step, read by the kernel: changing
        it needs no host sync and nothing is recompiled).
      momentum, nesterov: as ``keras.optimizers.SGD``."""
    _optim.check_sgd_state(momentum, momentums)
    return _update("sgd", params, grads, momentums, None, weight_decay=weight_decay,
                   decay_mask=decay_mask, global_clipnorm=global_clipnorm, clipnorm=clipnorm,
                   clipvalue=clipvalue, unscale=unscale, nonfinite=nonfinite,
                   return_norms=return_norms, learning_rate=learning_rate, momentum=momentum,
                   nesterov=nesterov)


def adam_update(params, grads, momentums, velocities, *, step, learning_rate=0.001, beta_1=0.9,
                beta_2=0.999, epsilon=1e-7, weight_decay=None, decay_mask=None,
                global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                nonfinite="nan", return_norms=False):
    """Keras 3's ``Adam`` step, fused with its clip, in place, in ONE launch on
    CuPy's current stream; the host does not wait. One norm pass over the
    gradients, a grid-wide sync, then one pass that reads g, p, m, v once and
    writes p, m, v.

    ``m += (g - m) * (1 - beta_1)``, ``v += (g*g - v) * (1 - beta_2)``,
    ``p -= (m * alpha) / (sqrt(v) + epsilon)`` with
    ``alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)``, every constant cast
    as Keras casts it. With an int step, the same bits as
    clipops.numpy.adam_update (beta**t as TensorFlow's CPU pow gives it).

    Args:
      params, grads: as sgd_update (GPU arrays, DLPack producers among them).
      momentums, velocities: Keras' ``momentums`` and ``velocities`` (m and v):
        float32 arrays like params, updated in place (zeros before the first step).
      step: an int t >= 1, this update's number (Keras' ``iterations + 1``), or
        a step counter on the GPU: a one-element int64 array holding the number
        of updates done so far (0 before the first; Keras' ``iterations``,
        torch's ``state["step"]``). The kernel then takes t = counter + 1,
        derives beta**t from it (within 1 ulp of TensorFlow's pow) and stores
        t back into the counter (not on a skipped step): no host sync and the
        same call every step.
      learning_rate: a number (cast to float32 as Keras does) or a 0-d GPU float
        array (read by the kernel).
      beta_1, beta_2, epsilon: as ``keras.optimizers.Adam`` (Python numbers)."""
    _optim.check_adam_state(momentums, velocities)
    return _update("adam", params, grads, momentums, velocities, step=step,
                   weight_decay=weight_decay, decay_mask=decay_mask,
                   global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue,
                   unscale=unscale, nonfinite=nonfinite, return_norms=return_norms,
                   learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)


def adamw_update(params, grads, momentums, velocities, *, step, learning_rate=0.001,
                 weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, decay_mask=None,
                 global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                 nonfinite="nan", return_norms=False):
    """Keras 3's ``AdamW`` step, fused with its clip, in place, in ONE launch:
    ``adam_update`` with decoupled weight decay first
    (``p -= p * weight_decay * learning_rate`` for each variable ``decay_mask``
    does not exclude), then the Adam step.

    A torch training step with no host sync (``p.data``, ``p.grad`` and the
    state tensors are viewed through DLPack)::

        norm = clipops.cupy.adamw_update(
            [p.data for p in ps], [p.grad for p in ps], ms, vs, step=step,
            learning_rate=1e-3, weight_decay=0.01, global_clipnorm=1.0)

    Args:
      params, grads, momentums, velocities, step, learning_rate, beta_1, beta_2,
        epsilon: as adam_update."""
    _optim.check_adamw_decay(weight_decay)
    return adam_update(params, grads, momentums, velocities, step=step,
                       learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                       epsilon=epsilon, weight_decay=weight_decay, decay_mask=decay_mask,
                       global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue,
                       unscale=unscale, nonfinite=nonfinite, return_norms=return_norms)


_optim.add_update_docs(sgd_update, adam_update, adamw_update, _UPDATE_COMMON_ARGS)
