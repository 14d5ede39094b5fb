"""clipops: fused global-norm gradient clipping.

One pass (one CUDA launch on a GPU) computes the global norm of a whole list of
tensors and scales every tensor, with TensorFlow's formula::

    import clipops
    grads, norm = clipops.clip_by_global_norm(grads, 15.0)  # tf.clip_by_global_norm
    norm = clipops.global_norm(grads)                        # tf.linalg.global_norm

The optimizer update fused with the clip, Keras 3's SGD, Adam and AdamW step
over a list of variables in one op (one CUDA launch on a GPU)::

    norm = clipops.adamw_update(variables, grads, m, v, step=t, learning_rate=1e-3,
                                global_clipnorm=1.0)

Front ends, one core (csrc/core):
  - clipops.clip_by_global_norm / clipops.global_norm / clipops.adamw_update, ...:
    TensorFlow ops (clipops.tensorflow)
  - clipops.numpy: NumPy arrays on the CPU
  - clipops.cupy: CuPy (and any __cuda_array_interface__ / DLPack) arrays on a GPU
  - clipops.keras: Keras 3 optimizers that clip with the fused op (``fused(optimizer)``)

TensorFlow and CuPy are imported only when their front end is used; but once
both clipops and TensorFlow are imported, in either order, clipops' op is
registered with TensorFlow, so that SavedModels and graphs holding it load.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os as _os
import sys

__version__ = "0.1.0"

if importlib.util.find_spec(f"{__name__}._build_info") is None:
    # Every build writes _build_info.py beside the compiled parts. Without it,
    # this is the source folder, shadowing the installed package on sys.path.
    raise ImportError(
        f"`import clipops` found the source folder {_os.path.dirname(__file__)}, which has no "
        "compiled parts, instead of the installed package: the current directory comes first on "
        "sys.path (`python -m pytest` or `python` started in the repository root). Run `pytest` "
        "(not `python -m pytest`) or start Python in another directory; install the package "
        "first with `pip install --no-build-isolation .` (README, Install).")
from ._common import ClipResult, NonFiniteError  # noqa: E402  (after the source-folder check)

__all__ = ["clip_by_global_norm", "global_norm", "clip_by_norm", "clip_by_value", "sgd_update",
           "adam_update", "adamw_update", "build_info", "ClipResult", "NonFiniteError",
           "__version__"]


def clip_by_global_norm(t_list, clip_norm, use_norm=None, name=None, *, nonfinite="nan",
                        return_norms=False, unscale=None):
    """Clips values of multiple tensors by the ratio of the sum of their norms.

    A drop-in for ``tf.clip_by_global_norm``, computed by one fused op (one
    CUDA launch on a GPU, one pass pair on a CPU). Each tensor is multiplied
    by ``clip_norm / max(global_norm, clip_norm)``, with TensorFlow's own
    formula ``clip_norm * min(1 / global_norm, 1 / clip_norm)`` in the norm's
    dtype, so a list that needs no clipping comes back bit-identical to TF's.

    Args:
      t_list: a sequence of ``Tensor``, ``IndexedSlices`` or ``None``, of
        float16, bfloat16, float32 or float64 (dtypes may be mixed).
      clip_norm: the clipping ratio: a Python number or scalar tensor,
        normally > 0. Other values are not refused; they give what
        TensorFlow's formula gives (README, "Semantics"): +0.0 gives zeros
        (NaN for a list whose norm is 0); -0.0 gives NaN; a negative number
        passes the list through (the scale is ``clip_norm * (1 /
        clip_norm)``, 1 to within an ulp); NaN, inf and -inf give NaN
        everywhere, whatever ``nonfinite`` says (it looks at the norm only).
        ``clipops.keras`` refuses a clip <= 0 or NaN when the optimizer is
        made, where Keras itself silently does not clip.
      use_norm: optional scalar: the global norm to use instead of computing
        it; it is returned as the norm.
      name: optional name scope (graph mode).
      nonfinite: what an inf or NaN global norm does (docs/health.md, "Gradient
        health"). ``"nan"``, the default: TensorFlow's behaviour, every
        output is NaN. ``"raise"``: ``clipops.NonFiniteError`` naming the first
        tensor whose own norm is not finite; it waits for the device (in a
        ``tf.function``, a failed assertion, ``InvalidArgumentError``, at run
        time; not available under XLA). ``"skip"``: never waits; the outputs
        are the inputs as they are (not multiplied by ``unscale`` either), and
        ``skipped`` says so (torch's found_inf). Its gradient is the
        identity's.
      return_norms: also return each tensor's own norm, computed from the
        same partial sums in the same launch (no extra pass over the data).
      unscale: optional positive scalar u (a Python number or scalar tensor,
        e.g. ``1 / loss_scale``): the tensors are taken as ``t * u``, and the
        norms and outputs are those of that list, still from one pass over
        ``t``: the norm is ``sqrt(sum(t**2)) * u`` rounded once, each output
        ``t * (scale * u)``. For a power of two (Keras' loss scales) this is
        bit for bit unscaling first and clipping after, without the extra
        pass. ``use_norm``, if given, is the norm of the unscaled list. It
        gets no gradient (the gradients with respect to the tensors include
        the factor u).

    Returns:
      ``(list_clipped, global_norm)``: a list like ``t_list`` (``None`` entries
      stay ``None``; ``IndexedSlices`` keep their indices and dense shape),
      and a scalar tensor of the norm dtype: the list's dtype, or float32 for
      a list of mixed dtypes. A list with no tensors (``[]`` or only ``None``)
      gives ``([...None...], 0.0)``, or ``use_norm``, as TensorFlow does.
      If the norm is inf or NaN, every output is NaN, as in TensorFlow.
      With ``return_norms=True`` or ``nonfinite="skip"``, a
      ``clipops.ClipResult(clipped, global_norm, tensor_norms, skipped)``
      instead: ``tensor_norms`` a 1-D tensor of the norm dtype with one entry
      per entry of ``t_list`` (0 for ``None``), ``skipped`` a scalar bool
      tensor; each is None when not asked for.

    Raises:
      TypeError: ``t_list`` is not a sequence, or holds a non-float tensor.
      ValueError: ``clip_norm`` or ``use_norm`` is not a scalar, ``nonfinite``
        is unknown, or (eagerly) the tensors are on different devices.
      clipops.NonFiniteError: ``nonfinite="raise"`` and the norm is inf or NaN.
      ImportError: clipops was built without its TensorFlow op, or against
        another TensorFlow release.

    Differences from TensorFlow (docs/frontends.md, "Differences from TensorFlow"): the
    sum of squares is accumulated in float32 or better (float16 lists do not
    overflow), mixed dtypes are accepted, ``clip_norm`` / ``use_norm`` of
    another float dtype are cast to the norm's dtype, and tensors on different
    devices raise instead of being copied.

    Example::

        grads = tape.gradient(loss, model.trainable_variables)
        grads, norm = clipops.clip_by_global_norm(grads, 15.0)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    """
    from . import tensorflow as _tf

    return _tf.clip_by_global_norm(t_list, clip_norm, use_norm=use_norm, name=name,
                                   nonfinite=nonfinite, return_norms=return_norms,
                                   unscale=unscale)


def global_norm(t_list, name=None, *, return_norms=False):
    """The global norm of a list of tensors: a drop-in for ``tf.linalg.global_norm``.

    ``sqrt(sum(t ** 2 for every element of every tensor))``, in one fused op.

    Args:
      t_list: a sequence of ``Tensor``, ``IndexedSlices`` or ``None`` (ignored),
        of float16, bfloat16, float32 or float64 (dtypes may be mixed).
      name: optional name scope (graph mode).
      return_norms: also return each tensor's own norm, from the same pass.

    Returns:
      A scalar tensor of the list's dtype (float32 for a mixed list); 0.0
      (float32) for a list with no tensors, as TensorFlow. With
      ``return_norms=True``, ``(norm, tensor_norms)``, tensor_norms a 1-D
      tensor of the norm dtype, one entry per entry of ``t_list`` (0 for None).

    Raises:
      TypeError: ``t_list`` is not a sequence, or holds a non-float tensor.
      ValueError: (eagerly) the tensors are on different devices.

    Unlike TensorFlow, float16 and bfloat16 squares are summed in float32 or
    better, so a large float16 list gives its finite norm instead of inf.
    """
    from . import tensorflow as _tf

    return _tf.global_norm(t_list, name=name, return_norms=return_norms)


def clip_by_norm(t_list, clip_norm, name=None, *, return_norms=False):
    """``tf.clip_by_norm`` on every tensor of a list, in one fused op (one CUDA
    launch on a GPU, one pass pair on a CPU).

    Each tensor becomes ``t * clip_norm / max(norm(t), clip_norm)``, computed
    with TensorFlow's own formula ``(t * clip_norm) / maximum(l2norm,
    clip_norm)`` in the tensor's dtype. Its norm is accumulated in float32 or
    better in the fixed order of the global norm (docs/design.md, "Reduction order"),
    so it may differ from TF's in the last bit (and a float16 tensor's norm
    does not overflow where TF's does); everything else is TF's arithmetic.

    Args:
      t_list: a sequence of ``Tensor``, ``IndexedSlices`` (their values are
        clipped by their own norm, as TF does) or ``None``; float16, bfloat16,
        float32 or float64, dtypes may be mixed.
      clip_norm: a Python number or scalar tensor, normally > 0; cast to the
        list's norm dtype (float32 for a mixed list), then to each tensor's
        dtype. Other values than > 0 are not refused; as in TensorFlow, a
        negative one (-inf too) is taken as 0 (``maximum(clip_norm, 0)``,
        and clip_norm then gets no gradient): 0 and negative values give
        zeros, each of its element's sign, -0.0 zeros of the opposite sign,
        and a tensor of zeros NaN (0 / 0) in all three; NaN and inf give NaN.
      name: optional name scope (graph mode).
      return_norms: also return each tensor's own norm (before clipping), a
        1-D tensor of the norm dtype, 0 for None entries.

    Returns:
      The list of clipped tensors (None entries stay None); with
      ``return_norms=True``, ``(clipped, tensor_norms)``.

    Raises:
      TypeError, ValueError: as ``clip_by_global_norm``.

    Gradients are those of TF's formula (TF's maximum sends the gradient to
    the norm on ties). Under XLA the same math runs as TF ops.
    """
    from . import tensorflow as _tf

    return _tf.clip_by_norm(t_list, clip_norm, name=name, return_norms=return_norms)


def clip_by_value(t_list, clip_value_min, clip_value_max, name=None):
    """``tf.clip_by_value`` on every tensor of a list, in one fused op (one pass,
    one CUDA launch): ``maximum(minimum(t, clip_value_max), clip_value_min)``.

    Bit-identical to ``tf.clip_by_value`` on the CPU, with one exception: an
    element equal to a bound keeps its own bits, so a -0.0 element against a
    +0.0 bound stays -0.0, as TF's one-element (scalar) loop gives, where TF's
    vectorized loop for larger float32/float64 tensors gives +0.0 (the two
    compare equal). A NaN element, or a NaN bound, gives NaN.

    Args:
      t_list: a sequence of ``Tensor``, ``IndexedSlices`` (their values are
        clipped) or ``None``; float16, bfloat16, float32, float64, mixed.
      clip_value_min, clip_value_max: Python numbers or scalar tensors; cast to
        the list's norm dtype (float32 for a mixed list), then to each tensor's
        dtype. Not checked, as in TensorFlow: with clip_value_min >
        clip_value_max every element becomes clip_value_min, and a NaN bound
        makes every element NaN (under XLA, TF's own ops ignore a NaN bound,
        and so does clipops' XLA route).
      name: optional name scope (graph mode).

    Returns:
      The list of clipped tensors (None entries stay None).

    Raises:
      TypeError, ValueError: as ``clip_by_global_norm``.

    Gradients are those of TF's minimum and maximum.
    """
    from . import tensorflow as _tf

    return _tf.clip_by_value(t_list, clip_value_min, clip_value_max, name=name)


_UPDATE_ARGS = """
      weight_decay: Keras' ``weight_decay``: ``p -= p * weight_decay * learning_rate``
        (float32, Keras' order) before the update, for every variable not masked
        out; None: no decay.
      decay_mask: a sequence of bools, one per variable: False excludes it from weight
        decay (Keras' ``exclude_from_weight_decay``); None: every variable decays.
      global_clipnorm, clipnorm, clipvalue: Keras' clip options (at most one; a Python
        number that is not > 0 does not clip, as in Keras; a tensor is taken as given).
        The gradients are then exactly what ``clip_by_global_norm``, ``clip_by_norm`` or
        ``clip_by_value(g, -v, v)`` of clipops output, in their own dtype, before the
        update casts them to float32.
      unscale: with global_clipnorm or no clip, the gradients are taken as
        ``g * unscale`` (``1 / loss_scale``), as in ``clip_by_global_norm``.
      nonfinite: an inf or NaN global norm (of ``g * unscale``): "nan" (Keras'
        behaviour: the NaN reaches the variables), "skip" (nothing is written; the
        returned norm says so), or "raise" (``clipops.NonFiniteError`` naming the first
        bad gradient, nothing written; in a ``tf.function`` a failed assertion at run
        time; not under XLA).
      return_norms: also return each gradient's own norm (0 for a None gradient), from
        the same pass.
      name: optional name scope (graph mode).

    Returns:
      The global norm of the gradients (of ``g * unscale``) before the clip, a scalar
      tensor of the gradients' dtype (float32 for a mixed list); with return_norms,
      ``(global_norm, tensor_norms)``. With nonfinite="skip", a norm that is not finite
      means the step was skipped.

    Raises:
      TypeError: a list is not a sequence; a variable is not a float32 ``tf.Variable``
        (or ``keras.Variable``); a gradient is not float32, float16 or bfloat16.
      ValueError: lengths or shapes differ; a variable is passed twice; a scalar is out
        of range; an option is given that the rule does not take. Nothing is written.
      clipops.NonFiniteError: nonfinite="raise" and the norm is inf or NaN.
      ImportError: clipops was built without its TensorFlow op.

    The variables are locked while the op runs, and copied first when a read still
    holds their buffer, as TensorFlow's own ``ResourceApplyAdam`` does. An
    ``IndexedSlices`` gradient is made dense first (duplicate indices summed), as
    Keras' ``update_step`` makes it, so its norm is the dense gradient's. Inside XLA
    (``jit_compile=True``) the same formula runs as TF ops (clipops/_tf_xla.py). The
    op has no gradient.
"""


def sgd_update(params, grads, momentums=None, *, learning_rate=0.01, momentum=0.0,
               nesterov=False, weight_decay=None, decay_mask=None, global_clipnorm=None,
               clipnorm=None, clipvalue=None, unscale=None, nonfinite="nan", return_norms=False,
               name=None):
    """Keras 3's ``SGD`` step fused with its clip, in place, over TensorFlow variables:
    one op (one CUDA launch on a GPU; a norm pass and an update pass on a CPU).

    Bit-identical to Keras' weight decay and ``SGD.update_step`` (TensorFlow backend,
    not XLA) applied to the clipped gradients: every hyperparameter is cast to float32
    as Keras casts it and every operation is Keras' float32 operation in Keras' order
    (``m = m * momentum - g * lr``; ``p = p + m``, or with nesterov
    ``p = p + (m * momentum - g * lr)``; without momentum ``p = p - g * lr``).

    Args:
      params: a sequence of float32 ``tf.Variable`` (or ``keras.Variable``), updated in
        place.
      grads: gradients, one per variable, of its shape: float32, float16 or bfloat16
        tensors or ``IndexedSlices``, or None (the variable is left alone, as Keras does).
      momentums: with momentum != 0, Keras' ``momentums``: float32 variables like params,
        updated in place; else None.
      learning_rate: a Python number or a scalar tensor/variable (a schedule's value for
        this step), cast to float32.
      momentum, nesterov: as ``keras.optimizers.SGD``."""
    from . import tensorflow as _tf

    return _tf.sgd_update(params, grads, momentums, learning_rate=learning_rate,
                          momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                          decay_mask=decay_mask, global_clipnorm=global_clipnorm,
                          clipnorm=clipnorm, clipvalue=clipvalue, unscale=unscale,
                          nonfinite=nonfinite, return_norms=return_norms, name=name)


def adam_update(params, grads, momentums, velocities, *, step, learning_rate=0.001, beta_1=0.9,
                beta_2=0.999, epsilon=1e-7, weight_decay=None, decay_mask=None,
                global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                nonfinite="nan", return_norms=False, name=None):
    """Keras 3's ``Adam`` step fused with its clip, in place, over TensorFlow variables:
    one op reads g, p, m, v once and writes p, m, v (one CUDA launch on a GPU).

    Bit-identical to Keras' weight decay and ``Adam.update_step`` (TensorFlow backend,
    not XLA) applied to the clipped gradients: ``m += (g - m) * (1 - beta_1)``,
    ``v += (g*g - v) * (1 - beta_2)``, ``p -= (m * alpha) / (sqrt(v) + epsilon)`` with
    ``alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)``, every constant as Keras
    makes it (``1 - beta_1`` in double, then float32; ``beta**t`` by TensorFlow's
    ``tf.pow`` of float32 values, computed once per call on the variables' device).

    Args:
      params: a sequence of float32 ``tf.Variable`` (or ``keras.Variable``), updated in
        place.
      grads: gradients, one per variable, of its shape: float32, float16 or bfloat16
        tensors or ``IndexedSlices``, or None (the variable is left alone, as Keras does).
      momentums, velocities: Keras' ``momentums`` and ``velocities`` (m and v): float32
        variables like params, updated in place (zeros before the first step).
      step: the number of this update, from 1: a Python int or an integer tensor
        (Keras' ``optimizer.iterations + 1``).
      learning_rate: a Python number or a scalar tensor/variable, cast to float32.
      beta_1, beta_2, epsilon: as ``keras.optimizers.Adam`` (Python numbers)."""
    from . import tensorflow as _tf

    return _tf.adam_update(params, grads, momentums, velocities, step=step,
                           learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                           epsilon=epsilon, weight_decay=weight_decay, decay_mask=decay_mask,
                           global_clipnorm=global_clipnorm, clipnorm=clipnorm,
                           clipvalue=clipvalue, unscale=unscale, nonfinite=nonfinite,
                           return_norms=return_norms, name=name)


def adamw_update(params, grads, momentums, velocities, *, step, learning_rate=0.001,
                 weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, decay_mask=None,
                 global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                 nonfinite="nan", return_norms=False, name=None):
    """Keras 3's ``AdamW`` step fused with its clip, in place, over TensorFlow variables:
    ``adam_update`` with the decoupled weight decay first (Keras' AdamW is Adam plus the
    weight decay every Keras optimizer applies before ``update_step``):
    ``p -= p * weight_decay * learning_rate`` for each variable ``decay_mask`` does not
    exclude, then the Adam step, in the same op.

    Example::

        m = [tf.Variable(tf.zeros_like(v)) for v in variables]
        v = [tf.Variable(tf.zeros_like(v)) for v in variables]
        for t, (x, y) in enumerate(data, start=1):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x))
            grads = tape.gradient(loss, variables)
            norm = clipops.adamw_update(variables, grads, m, v, step=t,
                                        learning_rate=1e-3, global_clipnorm=1.0)

    Args:
      params, grads, momentums, velocities, step, learning_rate, beta_1, beta_2,
        epsilon: as adam_update."""
    from . import tensorflow as _tf

    return _tf.adamw_update(params, grads, momentums, velocities, step=step,
                            learning_rate=learning_rate, weight_decay=weight_decay,
                            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, decay_mask=decay_mask,
                            global_clipnorm=global_clipnorm, clipnorm=clipnorm,
                            clipvalue=clipvalue, unscale=unscale, nonfinite=nonfinite,
                            return_norms=return_norms, name=name)


# The Args shared by the three (a docstring must be a literal, so they are appended here;
# python -OO strips docstrings).
if sgd_update.__doc__ is not None:
    sgd_update.__doc__ += _UPDATE_ARGS
    adam_update.__doc__ += _UPDATE_ARGS
    adamw_update.__doc__ += _UPDATE_ARGS.replace(
        "before the update, for every variable not masked\n        out; None: no decay.",
        "before the update, for every variable not masked\n        out; Keras' default "
        "0.004; it must be a number.")


def build_info() -> dict:
    """What this installation was built with, and its GPU routes.

    gpu_route, for clipops.cupy: "nvcc" when the kernel was compiled by nvcc
    (CUDA `cuda_version`, whose runtime is linked in statically, for
    `cuda_architectures`); "nvrtc" when nothing was compiled for the GPU and
    clipops.cupy compiles the shipped kernel source at first use with the NVRTC
    that CuPy loads, for the GPU present.

    tf_gpu_route, for the TF op's GPU kernel: "driver" on every build with the
    op. The kernel is compiled at first use by the NVRTC of TensorFlow's CUDA
    (`tf_nvrtc`, libnvrtc.so.12 from `tensorflow[and-cuda]`) for the GPU
    present and launched through the driver API: no CUDA runtime of clipops'
    own, so any driver and GPU that TensorFlow's CUDA 12 supports (sm_60+).
    """
    from . import _build_info as b

    info = {"gpu_route": "nvcc" if b.WITH_CUDA else "nvrtc",
            "with_cuda": b.WITH_CUDA, "cuda_version": b.CUDA_VERSION,
            "cuda_architectures": b.CUDA_ARCHITECTURES,
            "with_tf": b.WITH_TF, "tf_version": b.TF_VERSION,
            "tf_gpu_route": "driver" if b.WITH_TF else None, "tf_nvrtc": None}
    if b.WITH_TF:
        from . import _driver

        info["tf_nvrtc"] = _driver.nvrtc_library()
    return info


_SUBMODULES = ("numpy", "cupy", "tensorflow", "keras")


def __getattr__(name: str):
    # The front ends load on first use (`clipops.numpy`, `help(clipops.keras)`), so
    # `import clipops` imports neither TensorFlow, Keras nor CuPy.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))


def _register_tf_op() -> None:
    try:
        from . import tensorflow  # noqa: F401  (loading it registers the op with TF)
    except ImportError:
        # built without the op, or for another TF: clipops' own calls raise that clearly,
        # and importing TensorFlow must not fail because of clipops
        pass


class _RegisterOpAfterTensorFlow(importlib.abc.MetaPathFinder):
    """Registers the op as soon as `import tensorflow` has run: tf.saved_model.load
    needs every op of a model registered, and `import clipops` may come first."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once only, and the search below must not find us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_tf_op()

            spec.loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


if "tensorflow" in sys.modules:
    _register_tf_op()
else:
    sys.meta_path.insert(0, _RegisterOpAfterTensorFlow())
