"""TensorFlow front end: drop-ins for tf.clip_by_global_norm and
tf.linalg.global_norm, backed by one fused custom op (csrc/tf/), and the fused
clip + optimizer update (sgd_update, adam_update, adamw_update: Keras 3's
update_step in one op over a list of variables).

Where clipops deliberately differs from TensorFlow (docs/frontends.md, "Differences from
TensorFlow"):
  - the sum of squares is accumulated in float32 or better, so float16 and
    bfloat16 lists do not overflow where TF's own sum does;
  - a list may mix float16, bfloat16, float32 and float64 (TF raises); the
    norm of a mixed list is float32;
  - clip_norm and use_norm may be tensors of any float dtype; they are cast to
    the norm's dtype (TF raises on a mismatch);
  - tensors on different devices raise ValueError instead of being copied.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as _tf_ops

from . import _build_info, _common, _driver, _optim, _tf_xla
from . import clip_by_global_norm as _documented_clip, global_norm as _documented_norm
from . import clip_by_norm as _documented_clip_by_norm, clip_by_value as _documented_clip_by_value
from . import sgd_update as _documented_sgd_update, adam_update as _documented_adam_update
from . import adamw_update as _documented_adamw_update

__all__ = ["clip_by_global_norm", "global_norm", "clip_by_norm", "clip_by_value", "sgd_update",
           "adam_update", "adamw_update"]

_TF_DTYPES = {0: tf.float16, 1: tf.bfloat16, 2: tf.float32, 3: tf.float64}


def _same_abi(installed: str, built: str) -> bool:
    """TF keeps its C++ ABI within a patch series (2.21.0, 2.21.1, ...), not across
    minor releases: the op loads into the major.minor it was compiled against."""
    return installed.split(".")[:2] == built.split(".")[:2]


def _load_op_library():
    if not _build_info.WITH_TF:
        raise ImportError(
            "clipops was built without its TensorFlow op (TensorFlow was not importable at build "
            "time). Reinstall with `pip install --no-build-isolation .` in an environment that "
            "has tensorflow; clipops.numpy and clipops.cupy work without it.")
    if not _same_abi(tf.__version__, _build_info.TF_VERSION):
        series = ".".join(_build_info.TF_VERSION.split(".")[:2]) + ".*"
        raise ImportError(
            f"clipops' TensorFlow op was compiled against TensorFlow {_build_info.TF_VERSION}, "
            f"but TensorFlow {tf.__version__} is installed, and TF's C++ ABI changes between "
            f"minor releases. Install tensorflow=={series} or rebuild clipops with "
            "`pip install --no-build-isolation --force-reinstall .`.")
    path = os.path.join(os.path.dirname(__file__), "_clipops_tf.so")
    ops = tf.load_op_library(path)
    lib = ctypes.CDLL(path)  # the same library, for its plain C entry points
    # Where the GPU kernel (the driver route) finds NVRTC, the CUDA headers and
    # the kernel sources; it opens them only when it first runs on a GPU. The
    # cache folder (None) is resolved by the op's own core: clipops._core,
    # which holds CUDA 13 code, is not loaded into TensorFlow's process.
    c = _driver.config()
    lib.clipops_tf_configure_driver(
        c.nvrtc_library.encode(), c.cuda_library.encode(), "\n".join(c.include_dirs).encode(),
        c.kernel_dir.encode(), None)
    return ops, lib


_ops, _LIB = _load_op_library()


def _host_cache_stats() -> dict:
    """The op library's host block cache, where the CPU kernel's large fresh
    outputs come from (csrc/core/clipops.h). The library holds its own copy of
    the core, without CUDA, so this cache is separate from the NumPy front
    end's (``clipops._core.host_cache_stats()``) and bounded on its own by
    CLIPOPS_HOST_CACHE_MB: a process that uses both keeps up to twice that."""
    out = (ctypes.c_ulonglong * 5)()
    _LIB.clipops_tf_host_cache_stats(out)
    return dict(zip(("cached_bytes", "in_use_bytes", "limit_bytes", "hits", "misses"), out))


def _set_host_cache_limit(nbytes: int) -> None:
    _LIB.clipops_tf_set_host_cache_limit(ctypes.c_ulonglong(nbytes))


# Keyed by DType object: `dtype.name` costs 0.4 us a tensor, a tenth of an eager
# call's Python time on a list of 10,000 small tensors.
_CODES = {tf.as_dtype(name): code for name, code in _common.DTYPE_CODES.items()}


# EagerTensor's own type (plain eager tensors are exactly this type) and the
# dtype codes by TF's DataType enum: the eager fast path below reads both
# without the Python-level `.dtype` property and abc isinstance checks.
_EAGER_TENSOR = _tf_ops.EagerTensor
_ENUM_CODES = {dt.as_datatype_enum: code for dt, code in _CODES.items()}


class _PlainPositions(list):
    """The positions _eager_values gives: every entry, each a plain eager
    tensor, so _rebuild has nothing to rebuild (it tells by the type, without
    scanning the list a second time)."""


def _eager_values(t_list: list):
    """_values for the common eager list, a list of plain eager tensors of the
    supported dtypes on one device: its result, or None for anything else (the
    general path then converts, checks and explains). ~0.5 us a tensor less
    (161 tensors: 0.1 ms)."""
    codes = []
    device = None
    for t in t_list:
        if type(t) is not _EAGER_TENSOR:
            return None
        code = _ENUM_CODES.get(t._datatype_enum())
        if code is None:
            return None
        d = t.device
        if d != device:
            if device is not None:
                return None
            device = d
        codes.append(code)
    return list(t_list), _PlainPositions(range(len(t_list))), _common.norm_dtype_code(codes)


def _values(t_list: list):
    """The non-None entries as tensors (IndexedSlices give their values), with
    their positions and the norm dtype; raises on bad input."""
    eager = tf.executing_eagerly()
    if eager:
        fast = _eager_values(t_list)
        if fast is not None:
            return fast
    values, positions, codes = [], [], []
    device = None
    for i, t in enumerate(t_list):
        if t is None:
            continue
        v = t.values if isinstance(t, tf.IndexedSlices) else t
        if not isinstance(v, (tf.Tensor, tf.Variable)):
            v = tf.convert_to_tensor(v)
        code = _CODES.get(v.dtype)
        if code is None:
            _common.dtype_code(v.dtype.name, i)  # raises TypeError naming it
        if eager:
            if device is None:
                device = (i, v.device)
            elif v.device != device[1]:
                raise ValueError(
                    f"t_list[{i}] is on {v.device} but t_list[{device[0]}] is on {device[1]}; "
                    "clipops runs one kernel over the whole list, so every tensor must be on "
                    "one device (move them first, e.g. with tf.identity under tf.device)")
        values.append(v)
        positions.append(i)
        codes.append(code)
    return values, positions, _common.norm_dtype_code(codes)


# Eager calls reuse scalar tensors: building one costs more than the whole clip
# of a small list. Keyed by (Python number, dtype); bounded.
_EAGER_SCALARS: dict = {}


def _scalar(value, dtype: tf.DType, what: str) -> tf.Tensor:
    """clip_norm / use_norm as a scalar tensor of the norm dtype."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and tf.executing_eagerly():
        # keyed by the float's exact bits: -0.0 == 0.0 as keys, but they clip differently
        key = (float(value).hex(), dtype)
        cached = _EAGER_SCALARS.get(key)
        if cached is None:
            if len(_EAGER_SCALARS) >= 256:
                _EAGER_SCALARS.clear()
            # from a 0-d array: TF's own eager cache of Python scalars also returns
            # +0.0 for -0.0 once 0.0 has been made (TF 2.21)
            cached = _EAGER_SCALARS[key] = tf.constant(np.asarray(float(value)), dtype)
        return cached
    _common.check_scalar(value, what)
    if isinstance(value, (tf.Tensor, tf.Variable)):
        if not value.dtype.is_floating:
            raise TypeError(f"{what} must be a float, got a {value.dtype.name} tensor")
        return value if value.dtype == dtype else tf.cast(value, dtype)
    return tf.convert_to_tensor(value, dtype=dtype)


def _rebuild(t_list: list, positions: list, outputs: list) -> list:
    if type(positions) is _PlainPositions:
        return list(outputs)  # no None, no IndexedSlices: the outputs as they are
    result = [None] * len(t_list)
    for i, out in zip(positions, outputs):
        t = t_list[i]
        result[i] = tf.IndexedSlices(out, t.indices, t.dense_shape) \
            if isinstance(t, tf.IndexedSlices) else out
    return result


def clip_by_global_norm(t_list, clip_norm, use_norm=None, name=None, *, nonfinite="nan",
                        return_norms=False, unscale=None):
    t_list = _common.check_list(t_list)
    policy = _common.check_nonfinite(nonfinite)
    if tf.executing_eagerly():  # name scopes do nothing eagerly, and cost time
        return _clip(t_list, clip_norm, use_norm, policy, return_norms, unscale)
    with tf.name_scope(name or "clip_by_global_norm"):
        return _clip(t_list, clip_norm, use_norm, policy, return_norms, unscale)


clip_by_global_norm.__doc__ = _documented_clip.__doc__


def _expand_norms(norms: tf.Tensor, positions: list, length: int) -> tf.Tensor:
    """One entry per entry of t_list: 0 for None."""
    if len(positions) == length:
        return norms
    return tf.scatter_nd([[p] for p in positions], norms, [length])


def _clip(t_list: list, clip_norm, use_norm, policy: str, return_norms: bool, unscale=None):
    values, positions, code = _values(t_list)
    dtype = _TF_DTYPES[code]
    clip = _scalar(clip_norm, dtype, "clip_norm")
    given = use_norm is not None
    use = _scalar(use_norm if given else 0.0, dtype, "use_norm")
    unscale_given = unscale is not None
    if unscale_given:
        _common.check_unscale(unscale)
    unscale = _scalar(unscale if unscale_given else 1.0, dtype, "unscale")
    want_norms = return_norms or policy == "raise"
    if not values:  # TF's answer for a list with no tensors: the norm is 0 (or use_norm)
        clipped, norm, norms = [], use if given else tf.zeros((), dtype), tf.zeros((0,), dtype)
    elif _tf_xla.in_xla_context():  # XLA cannot compile the custom op: the same math in TF ops
        if policy == "raise":
            raise ValueError(
                "nonfinite='raise' needs the host to look at the norm, which a function that XLA "
                "compiles cannot do; use nonfinite='skip' (and its `skipped` flag) under XLA")
        clipped, norm, norms = _tf_xla.clip_by_global_norm(
            values, clip, use if given else None, skip_nonfinite=policy == "skip",
            unscale=unscale if unscale_given else None)
    else:
        clipped, norm, norms = _ops.clipops_clip_by_global_norm(
            t_list=values, clip_norm=clip, use_norm=use, unscale=unscale, use_given=given,
            with_norms=want_norms, skip_nonfinite=policy != "nan")
    if policy == "raise":
        clipped, norm = _raise_if_nonfinite(clipped, norm, norms, positions)
    clipped = _rebuild(t_list, positions, clipped)
    if not (return_norms or policy == "skip"):
        return clipped, norm
    return _common.ClipResult(
        clipped, norm, _expand_norms(norms, positions, len(t_list)) if return_norms else None,
        tf.logical_not(tf.math.is_finite(norm)) if policy == "skip" else None)


def _raise_if_nonfinite(clipped: list, norm, norms, positions: list):
    """nonfinite="raise": eagerly a NonFiniteError (waiting for the device);
    in a graph an assertion that fails the step with InvalidArgumentError. The
    op ran with skip_nonfinite, so nothing was scaled by NaN either way."""
    if tf.executing_eagerly():
        if not np.isfinite(norm.numpy()):
            raise _common.NonFiniteError(
                _common.nonfinite_message(norm.numpy(), norms.numpy(), positions, "t_list"))
        return clipped, norm
    bad = tf.logical_not(tf.math.is_finite(norms))
    first = tf.where(tf.reduce_any(bad),
                     tf.gather(tf.constant(positions + [-1], tf.int64),
                               tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int64)),
                     tf.constant(-1, tf.int64))
    check = tf.debugging.Assert(
        tf.math.is_finite(norm),
        ["clipops: the global norm is not finite (nonfinite='raise'); the first tensor whose "
         "own norm is not finite is t_list[i] with i =", first, "(-1: none is, their sum "
         "overflows); global norm:", norm, ". Nothing was clipped."])
    with tf.control_dependencies([check]):
        return [tf.identity(c) for c in clipped], tf.identity(norm)


def global_norm(t_list, name=None, *, return_norms=False):
    t_list = _common.check_list(t_list)
    if tf.executing_eagerly():
        return _global_norm(t_list, return_norms)
    with tf.name_scope(name or "global_norm"):
        return _global_norm(t_list, return_norms)


global_norm.__doc__ = _documented_norm.__doc__


def _global_norm(t_list: list, return_norms: bool):
    values, positions, code = _values(t_list)
    dtype = _TF_DTYPES[code]
    if not values:  # as tf.linalg.global_norm([])
        norm, norms = tf.zeros((), tf.float32), tf.zeros((0,), tf.float32)
    elif _tf_xla.in_xla_context():
        norm, norms = _tf_xla.global_norm(values, dtype, with_norms=True)
    else:
        norm, norms = _ops.clipops_global_norm(t_list=values, Tnorm=dtype, with_norms=return_norms)
    if not return_norms:
        return norm
    return norm, _expand_norms(norms, positions, len(t_list))


def clip_by_norm(t_list, clip_norm, name=None, *, return_norms=False):
    t_list = _common.check_list(t_list)
    if tf.executing_eagerly():
        return _clip_by_norm(t_list, clip_norm, return_norms)
    with tf.name_scope(name or "clip_by_norm"):
        return _clip_by_norm(t_list, clip_norm, return_norms)


def _clip_by_norm(t_list: list, clip_norm, return_norms: bool):
    values, positions, code = _values(t_list)
    dtype = _TF_DTYPES[code]
    clip = _scalar(clip_norm, dtype, "clip_norm")
    if not values:
        clipped, norms = [], tf.zeros((0,), dtype)
    elif _tf_xla.in_xla_context():
        clipped, norms = _tf_xla.clip_by_norm(values, clip)
    else:
        clipped, norms = _ops.clipops_clip_by_norm(t_list=values, clip_norm=clip,
                                                   with_norms=return_norms)
    clipped = _rebuild(t_list, positions, clipped)
    return (clipped, _expand_norms(norms, positions, len(t_list))) if return_norms else clipped


def clip_by_value(t_list, clip_value_min, clip_value_max, name=None):
    t_list = _common.check_list(t_list)
    if tf.executing_eagerly():
        return _clip_by_value(t_list, clip_value_min, clip_value_max)
    with tf.name_scope(name or "clip_by_value"):
        return _clip_by_value(t_list, clip_value_min, clip_value_max)


def _clip_by_value(t_list: list, lo, hi):
    values, positions, code = _values(t_list)
    dtype = _TF_DTYPES[code]
    lo = _scalar(lo, dtype, "clip_value_min")
    hi = _scalar(hi, dtype, "clip_value_max")
    if not values:
        return [None] * len(t_list)
    if _tf_xla.in_xla_context():
        clipped = [tf.clip_by_value(v, tf.cast(lo, v.dtype), tf.cast(hi, v.dtype)) for v in values]
    else:
        clipped = _ops.clipops_clip_by_value(t_list=values, clip_value_min=lo, clip_value_max=hi)
    return _rebuild(t_list, positions, clipped)


clip_by_norm.__doc__ = _documented_clip_by_norm.__doc__
clip_by_value.__doc__ = _documented_clip_by_value.__doc__


# ---- gradients: the chain rule of TF's own formula ---------------------------
# y_i = s * t_i with s = c * min(1/n, 1/c) and n = ||t||. TF's minimum sends the
# gradient to 1/n on ties (less_equal), so the clipped branch is 1/n <= 1/c.

def _dot(grads, tensors, dtype):
    terms = [tf.reduce_sum(tf.cast(g, dtype) * tf.cast(t, dtype))
             for g, t in zip(grads, tensors) if g is not None]
    return tf.add_n(terms) if terms else tf.zeros((), dtype)


def _clip_grads(tensors, clip, norm, g_out, g_norm, given: bool):
    """Gradients of (clipped, norm) = clip_by_global_norm(tensors, clip[, use])
    with respect to the tensors, clip and use_norm, given the upstream ones."""
    dtype = norm.dtype
    inv_n, inv_c = 1.0 / norm, 1.0 / clip
    on_norm = inv_n <= inv_c
    scale = clip * tf.minimum(inv_n, inv_c)
    dot = _dot(g_out, tensors, dtype)
    # d s / d n and d s / d c, on the branch TF's minimum picks
    ds_dn = tf.where(on_norm, -clip * inv_n * inv_n, tf.zeros_like(norm))
    ds_dc = tf.where(on_norm, inv_n, tf.zeros_like(norm))
    g_n = dot * ds_dn + (g_norm if g_norm is not None else 0.0)
    g_t = []
    for t, g in zip(tensors, g_out):
        gt = tf.zeros_like(t) if g is None else g * tf.cast(scale, t.dtype)
        if not given:  # n depends on t: d n / d t = t / n
            gt = gt + t * tf.cast(g_n * inv_n, t.dtype)
        g_t.append(gt)
    return g_t, dot * ds_dc, (g_n if given else None)


def _norms_grads(tensors, norms, g_norms) -> list:
    """The gradient through tensor_norms: d n_i / d t_i = t_i / n_i, times g_norms[i]."""
    factors = g_norms / norms
    return [t * tf.cast(factors[i], t.dtype) for i, t in enumerate(tensors)]


def _add_norms_grads(g_t: list, tensors, norms, g_norms) -> list:
    """Adds the gradient through tensor_norms (None: nothing flows through them)."""
    if g_norms is None:
        return g_t
    return [g + h for g, h in zip(g_t, _norms_grads(tensors, norms, g_norms))]


@tf.RegisterGradient("ClipopsClipByGlobalNorm")
def _clip_by_global_norm_grad(op, *grads):
    n = len(op.inputs) - 3
    tensors, norm, unscale = op.inputs[:n], op.outputs[n], op.inputs[n + 2]
    # With unscale u the op is the clip of z = t * u (and its norms those of z):
    # the chain rule through z gives d/dt = u * d/dz. u itself (a loss scale's
    # inverse) gets no gradient.
    plain = tf.get_static_value(unscale) == 1.0
    z = tensors if plain else [t * tf.cast(unscale, t.dtype) for t in tensors]

    def through_z(g_z: list) -> list:
        return g_z if plain else [g * tf.cast(unscale, g.dtype) for g in g_z]

    g_z, g_clip, g_use = _clip_grads(z, op.inputs[n], norm, grads[:n], grads[n],
                                     op.get_attr("use_given"))
    g_t = through_z(g_z)
    if op.get_attr("skip_nonfinite"):
        # A skipped step passed its inputs through, not unscaled (scale 1,
        # clip_math.h step_scale): the outputs are the identity of t, whatever
        # u is, so their gradient is the upstream one as it is, as on the XLA
        # route. Only the outputs: the norms still depend on t.
        finite = tf.math.is_finite(norm)
        g_t = [tf.where(finite, g, tf.zeros_like(g) if up is None else up)
               for g, up in zip(g_t, grads[:n])]
        g_clip = tf.where(finite, g_clip, tf.zeros_like(g_clip))
        if g_use is not None:
            g_use = tf.where(finite, g_use, tf.zeros_like(g_use))
    if op.get_attr("with_norms") and grads[n + 1] is not None:
        g_norms = through_z(_norms_grads(z, op.outputs[n + 1], grads[n + 1]))
        g_t = [g + h for g, h in zip(g_t, g_norms)]
    return g_t + [g_clip, g_use, None]


def _global_norm_grads(tensors, norm, g_norm) -> list:
    """d norm / d t = t / norm, times the upstream gradient."""
    factor = g_norm / norm
    return [t * tf.cast(factor, t.dtype) for t in tensors]


@tf.RegisterGradient("ClipopsGlobalNorm")
def _global_norm_grad(op, g_norm, g_norms):
    tensors = list(op.inputs)
    if g_norm is None:
        g_t = [tf.zeros_like(t) for t in tensors]
    else:
        g_t = _global_norm_grads(tensors, op.outputs[0], g_norm)
    if op.get_attr("with_norms"):
        g_t = _add_norms_grads(g_t, tensors, op.outputs[1], g_norms)
    return g_t


@tf.RegisterGradient("ClipopsClipByNorm")
def _clip_by_norm_grad(op, *grads):
    """y = t * c / m with m = max(n, c), n = ||t||, as tf.clip_by_norm; TF's
    maximum sends the gradient to n on ties (greater_equal). As in TF (and the
    kernel), c is maximum(clip_norm, 0), whose gradient goes to clip_norm where
    clip_norm >= 0 (a negative clip gets none)."""
    k = len(op.inputs) - 1
    tensors, clip_in = op.inputs[:k], op.inputs[k]
    clip = tf.maximum(clip_in, tf.zeros_like(clip_in))
    g_t, g_clip = [], []
    for i, (t, g) in enumerate(zip(tensors, grads[:k])):
        c = tf.cast(clip, t.dtype)
        n = tf.norm(t)
        on_norm = n >= c
        m = tf.maximum(n, c)
        g = tf.zeros_like(t) if g is None else g
        dot = tf.reduce_sum(g * t)
        g_m = -dot * c / (m * m)  # d y / d m, summed with g
        gt = g * c / m + tf.where(on_norm, g_m / n, tf.zeros_like(n)) * t
        g_clip.append(tf.cast(dot / m + tf.where(on_norm, tf.zeros_like(g_m), g_m), clip.dtype))
        g_t.append(gt)
    if op.get_attr("with_norms"):
        g_t = _add_norms_grads(g_t, tensors, op.outputs[k], grads[k])
    g_clip = tf.add_n(g_clip)
    return g_t + [tf.where(clip_in >= 0, g_clip, tf.zeros_like(g_clip))]


@tf.RegisterGradient("ClipopsClipByValue")
def _clip_by_value_grad(op, *grads):
    """y = maximum(minimum(t, hi), lo), with the gradients of TF's minimum
    (to t where t <= hi) and maximum (to the first argument where it is >= lo)."""
    k = len(op.inputs) - 2
    lo_in, hi_in = op.inputs[k], op.inputs[k + 1]
    g_t, g_lo, g_hi = [], [], []
    for t, g in zip(op.inputs[:k], grads):
        lo, hi = tf.cast(lo_in, t.dtype), tf.cast(hi_in, t.dtype)
        g = tf.zeros_like(t) if g is None else g
        t_min = tf.minimum(t, hi)
        to_min = t_min >= lo
        g_tmin = tf.where(to_min, g, tf.zeros_like(g))
        to_t = t <= hi
        g_t.append(tf.where(to_t, g_tmin, tf.zeros_like(g)))
        g_lo.append(tf.cast(tf.reduce_sum(tf.where(to_min, tf.zeros_like(g), g)), lo_in.dtype))
        g_hi.append(tf.cast(tf.reduce_sum(tf.where(to_t, tf.zeros_like(g), g_tmin)), hi_in.dtype))
    return g_t + [tf.add_n(g_lo), tf.add_n(g_hi)]


# ---- the fused clip + optimizer update (ClipopsFusedUpdate) ------------------
# Keras 3's weight decay and update_step for SGD, Adam and AdamW, with the clip,
# in one op over the variables (csrc/tf/update_ops.cc). The scalars are made as
# Keras makes them: the float hyperparameters are float32 attrs
# (_optim.keras_float32: one rounding of the Python number; 1 - beta in double
# first), the learning rate is cast to float32, and beta^t is tf.pow of
# float32(beta) and float32(t) on the variables' device, once per step.

_UPDATE_CLIPS = {"global_norm": "global_norm", "norm": "norm", "value": "value", "none": "none"}
# the op's names for the state, as they appear in its errors
_STATE_ARGS = ("params", "momentums", "velocities", "grads")


def _variable(v, what: str):
    """A float32 resource variable (a keras.Variable gives its tf.Variable)."""
    if not isinstance(v, tf.Variable) and isinstance(getattr(v, "value", None), tf.Variable):
        v = v.value  # a keras.Variable (TensorFlow backend) holds its tf.Variable here
    if not hasattr(v, "handle") or not hasattr(v, "assign"):
        raise TypeError(f"{what} must be a tf.Variable (or keras.Variable), got "
                        f"{type(v).__name__}")
    if v.dtype != tf.float32:
        raise TypeError(f"{what} is a {v.dtype.name} variable; the fused update takes float32 "
                        "variables (as Keras' mixed-precision policies keep them)")
    return v


def _dense_gradient(g, what: str):
    """A gradient as the op takes it: a dense tensor of float16, bfloat16 or float32. An
    IndexedSlices is made dense (its duplicate indices summed), as Keras' update_step makes it."""
    if isinstance(g, tf.IndexedSlices):
        g = tf.convert_to_tensor(g)
    elif not isinstance(g, (tf.Tensor, tf.Variable)):
        g = tf.convert_to_tensor(g)
    code = _CODES.get(g.dtype)
    if code is None or code == _common.DTYPE_CODES["float64"]:
        raise TypeError(f"{what} has dtype {g.dtype.name}; gradients of float32 variables are "
                        "float32, float16 or bfloat16 (Keras casts them to float32)")
    return g, code


def keras_powers(beta_1, beta_2, step):
    """Adam's beta_1^t and beta_2^t as Keras computes them in update_step:
    ``ops.power(ops.cast(beta, "float32"), ops.cast(step, "float32"))``, i.e. TF's
    Pow of two float32 tensors, on the current device (call it where the variables
    are: TF's CPU and GPU Pow differ in the last bit for some t)."""
    t = tf.cast(step, tf.float32)
    return (tf.pow(tf.cast(beta_1, tf.float32), t), tf.pow(tf.cast(beta_2, tf.float32), t))


def fused_update_op(rule: str, grads: list, params: list, momentums: list, velocities: list, *,
                    learning_rate, beta_1_power, beta_2_power, clip_mode: str, clip, unscale,
                    decay: list, hyper: dict, skip: bool, with_norms: bool):
    """ClipopsFusedUpdate over checked inputs, or its XLA route inside XLA.

    grads: dense float16/bfloat16/float32 tensors; params, momentums, velocities:
    float32 tf.Variables (or their components inside a tf.distribute update);
    learning_rate, beta_1_power, beta_2_power: float32 scalars; clip, unscale:
    scalars of the norm dtype; decay: one bool per variable; hyper: the float32
    attrs (weight_decay, momentum, nesterov, one_minus_beta_1, one_minus_beta_2,
    epsilon) as Python numbers. Returns (global norm, tensor norms: empty unless
    with_norms)."""
    if _tf_xla.in_xla_context():
        norm, norms = _tf_xla.fused_update(
            rule, grads, params, momentums, velocities, learning_rate=learning_rate,
            beta_1_power=beta_1_power, beta_2_power=beta_2_power, clip_mode=clip_mode, clip=clip,
            unscale=unscale, decay=decay, skip=skip, **hyper)
        return norm, (norms if with_norms else norms[:0])
    # Every float attr given as a Python float: the generated wrapper's defaults are ints
    # (0), which TF's eager fast path refuses, falling back to a ~20x slower path.
    attrs = dict(_NO_HYPER, **hyper)
    return _ops.clipops_fused_update(
        grads=grads, params=[p.handle for p in params],
        momentums=[m.handle for m in momentums], velocities=[v.handle for v in velocities],
        learning_rate=learning_rate, beta_1_power=beta_1_power, beta_2_power=beta_2_power,
        clip=clip, unscale=unscale, rule=rule, clip_mode=clip_mode, decay=decay,
        skip_nonfinite=skip, with_norms=with_norms, **attrs)


_NO_HYPER = {"weight_decay": 0.0, "momentum": 0.0, "nesterov": False, "one_minus_beta_1": 0.0,
             "one_minus_beta_2": 0.0, "epsilon": 0.0}


@tf.RegisterGradient("ClipopsFusedUpdate")
def _fused_update_grad(op, *grads):
    raise LookupError("ClipopsFusedUpdate (clipops' fused optimizer update) writes variables in "
                      "place and has no gradient; compute the norms you differentiate with "
                      "clipops.global_norm instead")


# The op's float attrs as Keras 3 rounds them (clipops.keras takes them from here too).
keras_hyper = _optim.keras_hyper


def _clip_choice(global_clipnorm, clipnorm, clipvalue):
    """(mode, value): Keras' choice (_optim.clip_choice) for Python numbers; a tensor
    threshold is taken as given (its sign cannot be checked while tracing)."""
    given = [(n, v) for n, v in (("norm", clipnorm), ("global_norm", global_clipnorm),
                                 ("value", clipvalue)) if v is not None]
    if any(isinstance(v, (tf.Tensor, tf.Variable)) for _, v in given):
        if len(given) > 1:
            raise ValueError("Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set")
        _common.check_scalar(given[0][1], given[0][0])
        return given[0]
    return _optim.clip_choice(global_clipnorm, clipnorm, clipvalue)


_STATE_REF = None


def _caller_names(message: str, positions: list) -> str:
    """The op's "params[3]" (3 counts the gradients that are not None) as the
    caller's index."""
    import re

    global _STATE_REF
    if _STATE_REF is None:
        _STATE_REF = re.compile(r"\b(params|momentums|velocities|grads)\[(\d+)\]")
    return _STATE_REF.sub(lambda mo: f"{mo.group(1)}[{positions[int(mo.group(2))]}]", message)


def _update(rule: str, params, grads, momentums, velocities, *, learning_rate, step, hyper: dict,
            weight_decay, decay_mask, global_clipnorm, clipnorm, clipvalue, unscale, nonfinite,
            return_norms, name):
    """The checks and the call shared by sgd_update, adam_update and adamw_update."""
    call = _optim.check_update_call(
        params, grads, momentums, velocities, weight_decay=weight_decay, decay_mask=decay_mask,
        global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue, unscale=unscale,
        nonfinite=nonfinite, choose_clip=_clip_choice)
    policy, mode, clip_value, flags = call.policy, call.clip_mode, call.clip, call.decay
    n = len(call.params)
    if rule == "adam" and isinstance(step, (int, np.integer)) and not isinstance(step, bool):
        _optim.check_step(step)  # a tensor step is the op's to take

    g_in, p_in, m_in, v_in, decay, positions, codes = [], [], [], [], [], [], []
    ms, vs = call.momentums, call.velocities
    for i, (p, g) in enumerate(zip(call.params, call.grads)):
        if g is None:  # as Keras: a variable without a gradient is neither updated nor decayed
            continue
        p = _variable(p, f"params[{i}]")
        g, code = _dense_gradient(g, f"grads[{i}]")
        if g.shape.is_fully_defined() and p.shape.is_fully_defined() and g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {g.shape}, but params[{i}] has {p.shape}")
        for what, lst, out in (("momentums", ms, m_in), ("velocities", vs, v_in)):
            if lst is not None:
                s = _variable(lst[i], f"{what}[{i}]")
                if s.shape != p.shape:
                    raise ValueError(f"{what}[{i}] has shape {s.shape}, but params[{i}] has "
                                     f"{p.shape}")
                out.append(s)
        g_in.append(g)
        p_in.append(p)
        decay.append(flags[i])
        positions.append(i)
        codes.append(code)
    norm_dtype = _TF_DTYPES[_common.norm_dtype_code(codes)]
    if not p_in:  # nothing to update: the norm of no gradients, as the clip's
        norm = tf.zeros((), norm_dtype)
        return (norm, tf.zeros((n,), norm_dtype)) if return_norms else norm
    want_norms = return_norms or policy == "raise"
    with tf.device(p_in[0].device), tf.name_scope(name or f"{rule}_update"):
        lr = _scalar(learning_rate, tf.float32, "learning_rate")
        if rule == "adam":
            b1p, b2p = keras_powers(hyper.pop("beta_1"), hyper.pop("beta_2"), step)
        else:
            b1p = b2p = _scalar(1.0, tf.float32, "beta_power")  # unused by SGD
        clip = _scalar(clip_value if mode != "none" else 1.0, norm_dtype, mode)
        u = _scalar(1.0 if unscale is None else unscale, norm_dtype, "unscale")
        if policy == "raise" and _tf_xla.in_xla_context():
            raise ValueError(
                "nonfinite='raise' needs the host to look at the norm, which a function that XLA "
                "compiles cannot do; use nonfinite='skip' under XLA")
        try:
            norm, norms = fused_update_op(
                rule, g_in, p_in, m_in, v_in, learning_rate=lr, beta_1_power=b1p,
                beta_2_power=b2p, clip_mode=_UPDATE_CLIPS[mode], clip=clip, unscale=u,
                decay=decay, hyper=hyper, skip=policy != "nan", with_norms=want_norms)
        except tf.errors.InvalidArgumentError as exc:  # eager: the caller's indices
            raise ValueError(_caller_names(exc.message, positions)) from None
        if policy == "raise":
            norm = _raise_if_not_updated(norm, norms, positions)
    if return_norms:
        return norm, _expand_norms(norms, positions, n)
    return norm


def _raise_if_not_updated(norm, norms, positions: list):
    """nonfinite="raise" after the op skipped a non-finite step (nothing written):
    eagerly NonFiniteError; in a graph a failed assertion at run time."""
    if tf.executing_eagerly():
        if not np.isfinite(norm.numpy()):
            raise _common.NonFiniteError(_optim.nonfinite_update_message(
                norm.numpy(), norms.numpy(), positions))
        return norm
    check = tf.debugging.Assert(
        tf.math.is_finite(norm),
        ["clipops: the global norm of the gradients is not finite (nonfinite='raise'); nothing "
         "was updated. Global norm:", norm, "each gradient's norm:", norms])
    with tf.control_dependencies([check]):
        return tf.identity(norm)


def sgd_update(params, grads, momentums=None, *, learning_rate=0.01, momentum=0.0,
               nesterov=False, weight_decay=None, decay_mask=None, global_clipnorm=None,
               clipnorm=None, clipvalue=None, unscale=None, nonfinite="nan", return_norms=False,
               name=None):
    _optim.check_sgd_state(momentum, momentums, "variables")
    hyper = keras_hyper("sgd", weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
    return _update("sgd", params, grads, momentums, None, learning_rate=learning_rate,
                   step=None, hyper=hyper, weight_decay=weight_decay, decay_mask=decay_mask,
                   global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue,
                   unscale=unscale, nonfinite=nonfinite, return_norms=return_norms, name=name)


def adam_update(params, grads, momentums, velocities, *, step, learning_rate=0.001, beta_1=0.9,
                beta_2=0.999, epsilon=1e-7, weight_decay=None, decay_mask=None,
                global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                nonfinite="nan", return_norms=False, name=None):
    _optim.check_adam_state(momentums, velocities, "variables")
    hyper = keras_hyper("adam", weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2,
                        epsilon=epsilon)
    hyper.update(beta_1=beta_1, beta_2=beta_2)  # for the powers; _update takes them out
    return _update("adam", params, grads, momentums, velocities, learning_rate=learning_rate,
                   step=step, hyper=hyper, weight_decay=weight_decay, decay_mask=decay_mask,
                   global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue,
                   unscale=unscale, nonfinite=nonfinite, return_norms=return_norms, name=name)


def adamw_update(params, grads, momentums, velocities, *, step, learning_rate=0.001,
                 weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, decay_mask=None,
                 global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                 nonfinite="nan", return_norms=False, name=None):
    _optim.check_adamw_decay(weight_decay)
    return adam_update(params, grads, momentums, velocities, step=step,
                       learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                       weight_decay=weight_decay, decay_mask=decay_mask,
                       global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue,
                       unscale=unscale, nonfinite=nonfinite, return_norms=return_norms,
                       name=name or "adamw_update")


sgd_update.__doc__ = _documented_sgd_update.__doc__
adam_update.__doc__ = _documented_adam_update.__doc__
adamw_update.__doc__ = _documented_adamw_update.__doc__
