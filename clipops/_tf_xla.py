"""The TensorFlow front end's route inside XLA: clipops' math in plain TF ops.

XLA compiles a function only if it can lower every op in it, and it cannot lower
a custom op such as ClipopsClipByGlobalNorm ("unsupported operations"). Inside
an XLA context (``tf.function(jit_compile=True)``, Keras' ``jit_compile``, TPU
replication), detected while the function is traced, clipops therefore emits
the same computation as TF ops, which XLA compiles and fuses:

  - the sum of squares is accumulated in float32 or better, as the op does:
    16-bit and float32 tensors are squared in float32 and summed in groups of
    16 (the 16 terms of one of the op's float lanes), and the group sums are
    added in float64, so a long tensor's rounding error does not grow with its
    length whatever order XLA reduces in; float64 tensors are summed in float64;
  - the norm is the sqrt of that double, rounded to float32 and then to the
    norm's dtype, as in clip_math.h;
  - the scale is TF's formula, ``clip * min(1/norm, 1/clip) + (norm - norm)``,
    op for op in the norm's dtype, and each tensor is multiplied by it cast to
    its own dtype. A list that is not clipped therefore comes back with the
    same bits as from the op;
  - ``unscale`` (a loss scale's inverse) multiplies the norms in float64
    before their rounding and the scale after it, as the kernel does.

Gradients are TF's own for these ops: the chain rule of the same formula.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

# Terms summed in float32 before a partial sum goes to float64: the length of
# one float lane of the op's reduction order (clip_math.h: 16,384 / 1024).
_GROUP = 16


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _sum_of_squares(v: tf.Tensor) -> tf.Tensor:
    """sum(v**2) as a float64 scalar."""
    if v.dtype == tf.float64:
        return tf.reduce_sum(tf.square(v))
    x = tf.reshape(tf.cast(v, tf.float32), [-1])
    x = tf.pad(x, [[0, -tf.size(x) % _GROUP]])  # zeros add nothing to a sum of squares
    groups = tf.reduce_sum(tf.square(tf.reshape(x, [-1, _GROUP])), axis=1)
    return tf.reduce_sum(tf.cast(groups, tf.float64))


def _norm_from_sumsq(sumsq: tf.Tensor, dtype: tf.DType, unscale=None) -> tf.Tensor:
    norm = tf.sqrt(sumsq)
    if unscale is not None:  # times unscale in float64, then rounded once (clip_math.h)
        norm = norm * tf.cast(unscale, tf.float64)
    if dtype == tf.float64:
        return norm
    # rounded to float32 first, as the op rounds it (clip_math.h norm_from_sumsq)
    return tf.cast(tf.cast(norm, tf.float32), dtype)


def global_norm(values: list, dtype: tf.DType, with_norms: bool = False):
    """The global norm of `values` (tensors, no None) in `dtype`; with
    with_norms, (norm, each tensor's own norm as a 1-D tensor)."""
    sums = [_sum_of_squares(v) for v in values]
    norm = _norm_from_sumsq(tf.add_n(sums), dtype)
    if not with_norms:
        return norm
    return norm, _norm_from_sumsq(tf.stack(sums), dtype)


def _global_scale(norm: tf.Tensor, clip: tf.Tensor, unscale: tf.Tensor | None) -> tf.Tensor:
    """TF's clip scale in the norm dtype, times unscale in float64 (clip_math.h step_scale)."""
    scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
    if unscale is not None:  # in float64, then to each dtype through float32 (Scaler)
        scale = tf.cast(scale, tf.float64) * tf.cast(unscale, tf.float64)
    return scale


def _scaled(values: list, scale: tf.Tensor) -> list:
    """Each value times the scale cast to its dtype, as the kernels' Scaler."""

    def cast(s, dtype):
        if s.dtype == tf.float64 and dtype in (tf.float16, tf.bfloat16):
            s = tf.cast(s, tf.float32)
        return tf.cast(s, dtype)

    return [v * cast(scale, v.dtype) for v in values]


def clip_by_global_norm(values: list, clip: tf.Tensor, use_norm: tf.Tensor | None,
                        skip_nonfinite: bool = False, unscale: tf.Tensor | None = None):
    """(clipped values, norm, tensor norms); clip, use_norm and unscale are
    scalars of the norm dtype. skip_nonfinite: an inf or NaN norm gives scale
    1. unscale: the values are taken as v * unscale (ClipArgs::unscale): the
    norms are multiplied by it before their rounding, the scale after its own."""
    sums = [_sum_of_squares(v) for v in values]
    norm = _norm_from_sumsq(tf.add_n(sums), clip.dtype, unscale)
    norms = _norm_from_sumsq(tf.stack(sums), clip.dtype, unscale)
    if use_norm is not None:
        norm = use_norm
    scale = _global_scale(norm, clip, unscale)
    if skip_nonfinite:
        scale = tf.where(tf.math.is_finite(norm), scale, tf.ones_like(scale))
    return _scaled(values, scale), norm, norms


def clip_by_norm(values: list, clip: tf.Tensor):
    """tf.clip_by_norm's formula on each tensor with its norm from
    _sum_of_squares, in the tensor's dtype; (clipped, norms in clip's dtype).
    As TF, a negative clip is first raised to 0 (maximum(clip, 0))."""
    sums = [_sum_of_squares(v) for v in values]
    clip = tf.maximum(clip, tf.zeros_like(clip))
    clipped = []
    for v, s in zip(values, sums):
        c = tf.cast(clip, v.dtype)
        clipped.append((v * c) / tf.maximum(_norm_from_sumsq(s, v.dtype), c))
    return clipped, _norm_from_sumsq(tf.stack(sums), clip.dtype)


def _clip_by_value(values: list, clip: tf.Tensor) -> list:
    """clip_by_value(v, -clip, clip), the bounds cast to each dtype (ValueClipper)."""
    return [tf.clip_by_value(v, tf.cast(-clip, v.dtype), tf.cast(clip, v.dtype)) for v in values]


def fused_update(rule: str, grads: list, params: list, momentums: list, velocities: list, *,
                 learning_rate, beta_1_power, beta_2_power, clip_mode: str, clip, unscale,
                 decay: list, skip: bool, weight_decay: float = 0.0, momentum: float = 0.0,
                 nesterov: bool = False, one_minus_beta_1: float = 0.0,
                 one_minus_beta_2: float = 0.0, epsilon: float = 0.0):
    """ClipopsFusedUpdate's computation in TF ops, for XLA: the op's norms (the
    sums of squares above), its clip of each gradient in the gradient's dtype, and
    Keras 3's weight decay and update_step op for op in float32
    (csrc/core/optim_math.h): the same formula as the op's kernels and as Keras'
    own code, which XLA compiles alike. The variables are assigned; with skip, a
    step whose norm is not finite assigns their old values. Returns (global norm,
    tensor norms), in clip's dtype.

    Where the bits can differ from the op's (tests/test_tf_optim.py): XLA sums the
    float32 groups in an order of its own (a clipped step's scale, through the
    norm), and XLA's Pow (Keras' beta^t under XLA, computed by the caller) is not
    the C library's."""
    dtype = clip.dtype
    sums = [_sum_of_squares(g) for g in grads]
    norm = _norm_from_sumsq(tf.add_n(sums), dtype, unscale)
    norms = _norm_from_sumsq(tf.stack(sums), dtype, unscale)
    if clip_mode == "global_norm":
        clipped = _scaled(grads, _global_scale(norm, clip, unscale))
    elif clip_mode == "norm":
        clipped, _ = clip_by_norm(grads, clip)
    elif clip_mode == "value":
        clipped = _clip_by_value(grads, clip)
    else:  # the gradients times unscale (1: as they are)
        clipped = _scaled(grads, tf.cast(unscale, tf.float64))
    finite = tf.math.is_finite(norm) if skip else None
    lr = tf.cast(learning_rate, tf.float32)
    wd = tf.constant(weight_decay, tf.float32)
    if rule == "adam":
        b1p, b2p = (tf.cast(b, tf.float32) for b in (beta_1_power, beta_2_power))
        alpha = lr * tf.sqrt(1.0 - b2p) / (1.0 - b1p)
        c1, c2 = tf.constant(one_minus_beta_1, tf.float32), tf.constant(one_minus_beta_2,
                                                                         tf.float32)
        eps = tf.constant(epsilon, tf.float32)
    mu = tf.constant(momentum, tf.float32)

    def store(var, new):
        var.assign(new if finite is None else tf.where(finite, new, var.read_value()))

    for i, (g, p) in enumerate(zip(clipped, params)):
        g = tf.cast(g, tf.float32)
        w = p.read_value()
        if decay[i]:  # the TF backend's weight decay, before update_step: p - (p * wd) * lr
            w = w - w * wd * lr
        if rule == "adam":
            m = momentums[i].read_value()
            v = velocities[i].read_value()
            m = m + (g - m) * c1
            v = v + (tf.square(g) - v) * c2
            w = w - (m * alpha) / (tf.sqrt(v) + eps)
            store(momentums[i], m)
            store(velocities[i], v)
        elif momentums:
            m = momentums[i].read_value() * mu - g * lr
            w = w + (m * mu - g * lr) if nesterov else w + m
            store(momentums[i], m)
        else:
            w = w - g * lr
        store(p, w)
    return norm, norms
