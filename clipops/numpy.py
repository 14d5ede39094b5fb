"""NumPy front end: the core's CPU kernel on NumPy arrays, without TensorFlow.

Same semantics as clipops.clip_by_global_norm (TF's formula, float32-or-better
accumulation, mixed dtypes); bfloat16 arrays need the ml_dtypes package.
"""

from __future__ import annotations

import numpy as np

from . import _common, _optim

__all__ = ["clip_by_global_norm", "global_norm", "clip_by_norm", "clip_by_value"]


# Keyed by dtype object: a dict lookup, where `dtype.name` costs microseconds
# per array (it matters for lists of thousands of small tensors).
_CODES = {np.dtype(name): code for name, code in _common.DTYPE_CODES.items() if name != "bfloat16"}


# NumpyBatch.run's arguments are always passed positionally, all of them:
#   (in_place, scale, clip_norm, use_norm, norm_out, tensor_norms, skip_nonfinite,
#    mode, clip_min, clip_max, unscale)
# Given a keyword for a parameter that has a default, pybind11 3.1's
# dispatcher made Python's traced memory grow by ~966 KB within the first
# 10,000 calls, and RSS by 1 to 2.5 MB, in steps, over 300,000 (its
# keyword_index interns each parameter name on every call, a likely cause).
# pybind11 2.13, and positional calls, show none (tests/test_numpy.py,
# test_repeated_calls_do_not_grow_python_memory).


def _code_of(a: np.ndarray, index: int) -> int:
    # non-native byte order (">f4" on x86) has its own dtype object: not in _CODES
    code = _CODES.get(a.dtype)
    return _common.dtype_code(a.dtype.name, index, "arrays") if code is None else code


def _prepare(arrays, in_place: bool):
    """The list checked and described for the kernel: ``(arrays, batch)``, batch
    a ``_core.NumpyBatch``. Plain contiguous arrays are described in C++ at once;
    anything else (non-arrays, views, byte-swapped or misaligned arrays,
    subclasses, bfloat16) goes through the checks below first."""
    arrays = _common.check_list(arrays, "arrays")
    core = _common.load_core()
    batch = core.NumpyBatch.from_list(arrays, in_place)
    if batch is not None:
        return arrays, batch
    prepared, codes = [], []
    for i, a in enumerate(arrays):
        if a is None:
            prepared.append(None)
            codes.append(-1)
            continue
        if isinstance(a, np.ndarray) and not a.dtype.isnative:
            # The kernel reads native floats: swapped bytes would be garbage.
            if in_place:
                raise ValueError(
                    f"arrays[{i}] has non-native byte order ({a.dtype.str}); in_place=True "
                    "cannot write it. Pass in_place=False (the result is native-order) or "
                    "convert it first with a.astype(a.dtype.newbyteorder('='))")
            a = a.astype(a.dtype.newbyteorder("="))
        if in_place:
            if not isinstance(a, np.ndarray):
                raise TypeError(f"arrays[{i}] is a {type(a).__name__}; in_place=True needs "
                                "NumPy arrays")
            if not a.flags.c_contiguous:
                raise ValueError(f"arrays[{i}] is not C-contiguous; in_place=True needs "
                                 "contiguous arrays (or pass in_place=False)")
            if not a.flags.writeable:
                raise ValueError(f"arrays[{i}] is read-only; it cannot be clipped in place")
            if not a.flags.aligned:
                raise ValueError(f"arrays[{i}] is not aligned to its {a.itemsize}-byte elements "
                                 "(a view at an odd byte offset); in_place=True needs aligned "
                                 "arrays (or pass in_place=False, which copies it)")
        elif not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            # not np.ascontiguousarray: it returns at least 1-d, so a 0-d entry
            # (np.float32(3.0), a Python float) would come back with shape (1,)
            a = np.asarray(a, order="C")
        elif not a.flags.aligned:  # a view at an odd byte offset: an aligned copy
            a = a.copy()
        prepared.append(a)
        codes.append(_code_of(a, i))
    # keeps `prepared` (and the copies in it) alive for as long as the batch
    return arrays, core.NumpyBatch.from_list(prepared, in_place, codes)


def global_norm(arrays, *, return_norms: bool = False):
    """sqrt(sum of squares of every element), as ``tf.linalg.global_norm``.

    Args:
      arrays: a sequence of NumPy arrays (float16, bfloat16, float32, float64,
        mixed allowed) or None entries, which are ignored.
      return_norms: also return each array's own norm (0 for None entries),
        from the same pass.

    Returns:
      A 0-d array of the norm dtype: the arrays' dtype, or float32 for a mixed
      list; 0.0 (float32) for a list with no arrays, as TensorFlow. With
      return_norms, ``(norm, tensor_norms)``, tensor_norms a 1-D array of the
      norm dtype.

    Raises:
      TypeError: ``arrays`` is not a sequence, or holds a non-float array.
    """
    arrays, batch = _prepare(arrays, in_place=False)
    dtype = _common.np_dtype(batch.norm_code)
    norm = np.empty((), dtype=dtype)
    positions = batch.positions
    norms = np.empty(len(positions), dtype=dtype)
    batch.run(False, False, 0.0, None, norm.ctypes.data,  # positional: see the top
              norms.ctypes.data if return_norms and positions else 0, False, 0, 0.0, 0.0, 1.0)
    if not return_norms:
        return norm
    return norm, _common.expand_norms(norms, positions, len(arrays), np)


def clip_by_global_norm(arrays, clip_norm, use_norm=None, in_place: bool = False, *,
                        nonfinite: str = "nan", return_norms: bool = False, unscale=None):
    """Scales every array by clip_norm / max(global_norm, clip_norm), with
    TensorFlow's formula and the same bits as the TF op on the same data.

    Args:
      arrays: a sequence of NumPy arrays (float16, bfloat16, float32, float64,
        mixed allowed) or None entries, which stay None. Non-contiguous and
        non-native byte order arrays are copied first (copy mode only).
      clip_norm: the clip threshold, a number or 0-d array, rounded to the
        norm dtype as TF converts it; normally > 0. 0, -0.0, negative
        numbers, NaN and inf are not refused and give TensorFlow's results,
        as described in ``clipops.clip_by_global_norm``.
      use_norm: optional global norm to use instead of computing it; it is
        returned as the norm.
      in_place: write the results into the caller's arrays (C-contiguous,
        writable, native byte order, sharing no memory) and return them.
      nonfinite: what an inf or NaN global norm does. "nan" (TF's behaviour):
        every output becomes NaN. "raise": NonFiniteError naming the first
        array whose own norm is not finite, with nothing written (in place,
        the arrays keep their values). "skip": the outputs are the inputs as
        they are (not multiplied by unscale either), and the result's
        ``skipped`` is True.
      return_norms: also return each array's own norm, from the same pass.
      unscale: optional positive number u (``1 / loss_scale``): the arrays are
        taken as ``a * u``; the norms and outputs are those of that list, from
        the same pass (``clipops.clip_by_global_norm``'s docstring).

    Returns:
      ``(clipped, norm)``: a list like ``arrays`` and a 0-d array of the norm
      dtype (the arrays' dtype, float32 for a mixed list). Copying, the clipped
      arrays are fresh C-contiguous ``numpy.ndarray`` s (a subclass such as
      ``np.matrix`` is not kept); those of 256 KiB or more live in blocks of
      clipops' bounded host cache, reused once freed (docs/reliability.md, "Bounded resources").
      The smaller ones of one call (two or more) are views into one such
      block, each at a 64-byte boundary: it is freed when the last of them
      is, so keeping one small output keeps that call's block. A list with no
      arrays gives ``([...None...], 0.0)`` as TensorFlow does. With
      return_norms or nonfinite="skip", a ``clipops.ClipResult``
      ``(clipped, global_norm, tensor_norms, skipped)`` instead.

    Raises:
      TypeError: ``arrays`` is not a sequence, holds a non-float array, or (in
        place) a non-NumPy object.
      ValueError: a scalar argument is not a scalar, or nonfinite is unknown;
        in place, an array is not contiguous, misaligned, read-only, byte-swapped, or
        shares memory with another.
      clipops.NonFiniteError: nonfinite="raise" and the norm is inf or NaN.
    """
    policy = _common.check_nonfinite(nonfinite)
    arrays, batch = _prepare(arrays, in_place)
    norm_code = batch.norm_code
    clip = _common.scalar_in(clip_norm, norm_code, "clip_norm")
    use = None if use_norm is None else _common.scalar_in(use_norm, norm_code, "use_norm")
    u = 1.0 if unscale is None else _common.scalar_in(_common.check_unscale(unscale), norm_code,
                                                       "unscale")
    dtype = _common.np_dtype(norm_code)
    norm = np.empty((), dtype=dtype)
    positions = batch.positions
    norms = np.empty(len(positions), dtype=dtype)
    want_norms = (return_norms or policy == "raise") and positions
    # in place, the results are the caller's own array objects
    result = batch.run(in_place, True, clip, use, norm.ctypes.data,  # positional: see the top
                       norms.ctypes.data if want_norms else 0, policy != "nan", 0, 0.0, 0.0, u)
    if policy == "raise" and not np.isfinite(norm):
        raise _common.NonFiniteError(_common.nonfinite_message(norm, norms, positions, "arrays"))
    if not (return_norms or policy == "skip"):
        return result, norm
    return _common.ClipResult(
        result, norm,
        _common.expand_norms(norms, positions, len(arrays), np) if return_norms else None,
        np.bool_(not np.isfinite(norm)) if policy == "skip" else None)


def _clip_each(arrays, in_place: bool, mode: int, clip=0.0, lo=0.0, hi=0.0,
               return_norms: bool = False):
    """clip_by_norm / clip_by_value: one pass of the CPU kernel in `mode`.
    clip (clip_by_norm) is rounded to the norm dtype, as clip_by_global_norm's."""
    arrays, batch = _prepare(arrays, in_place)
    norm_code = batch.norm_code
    clip = _common.scalar_in(clip, norm_code, "clip_norm")
    lo = _common.scalar_in(lo, norm_code, "clip_value_min")
    hi = _common.scalar_in(hi, norm_code, "clip_value_max")
    positions = batch.positions
    norms = np.empty(len(positions), dtype=_common.np_dtype(norm_code))
    result = batch.run(in_place, True, clip, None, 0,  # positional: see the top
                       norms.ctypes.data if return_norms and positions else 0, False, mode, lo,
                       hi, 1.0)
    if return_norms:
        return result, _common.expand_norms(norms, positions, len(arrays), np)
    return result


def clip_by_norm(arrays, clip_norm, in_place: bool = False, *, return_norms: bool = False):
    """``tf.clip_by_norm`` on every array of a list, in one pass pair over the
    whole list: each array becomes ``x * clip_norm / max(norm(x), clip_norm)``,
    computed as TensorFlow does, ``(x * clip_norm) / maximum(l2norm, clip_norm)``
    in the array's dtype, with its own norm accumulated as the global norm's
    partials are (float32 or better).

    Args:
      arrays: a sequence of NumPy float arrays (mixed dtypes allowed) or None.
      clip_norm: a number (or 0-d array), normally > 0, rounded to the list's
        norm dtype and then to each array's dtype (exact for a list of one
        dtype). As in TensorFlow, a negative one (-inf too) is taken as 0:
        0 and negative values give zeros, -0.0 zeros of the opposite sign
        (NaN for an array of zeros); NaN and inf give NaN
        (``clipops.clip_by_norm``).
      in_place: write into the caller's arrays (as clip_by_global_norm).
      return_norms: also return each array's own norm (0 for None entries),
        in the list's norm dtype (float32 for a mixed list).

    Returns:
      The clipped list (None entries stay None); with return_norms,
      ``(clipped, tensor_norms)``.

    Raises: as clip_by_global_norm.
    """
    return _clip_each(arrays, in_place, _common.load_core().MODES["norm"], clip=clip_norm,
                      return_norms=return_norms)


def clip_by_value(arrays, clip_value_min, clip_value_max, in_place: bool = False):
    """``tf.clip_by_value`` on every array of a list, in one pass:
    ``maximum(minimum(x, clip_value_max), clip_value_min)`` element by element,
    with TensorFlow's CPU semantics (a NaN element stays NaN; an element inside
    the bounds keeps its bits).

    Args:
      arrays: a sequence of NumPy float arrays (mixed dtypes allowed) or None.
      clip_value_min, clip_value_max: numbers (or 0-d arrays), rounded to the
        list's norm dtype and then to each array's dtype (exact for a list of
        one dtype). Not checked, as in TensorFlow: min > max gives min
        everywhere, and a NaN bound NaN everywhere.
      in_place: write into the caller's arrays (as clip_by_global_norm).

    Returns:
      The clipped list (None entries stay None).

    Raises: as clip_by_global_norm; ValueError when a bound is not a scalar.
    """
    return _clip_each(arrays, in_place, _common.load_core().MODES["value"], lo=clip_value_min,
                      hi=clip_value_max)


# ---- the fused clip + optimizer update (csrc/core: update_cpu) ----------------------------------
# Keras 3's SGD, Adam and AdamW update_step, with the clip folded in, over lists of float32
# NumPy variables, in place. Argument conversion as Keras does it: clipops/_optim.py.

__all__ += ["sgd_update", "adam_update", "adamw_update"]


def _writable_float32(a, what: str) -> np.ndarray:
    """A variable or state array the update writes in place."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} is a {type(a).__name__}; the update writes NumPy arrays in place")
    if a.dtype != np.float32:
        raise TypeError(f"{what} has dtype {a.dtype}; variables and optimizer state are float32")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous; the update needs contiguous arrays")
    if not a.flags.writeable:
        raise ValueError(f"{what} is read-only; the update writes it in place")
    if not a.flags.aligned:
        raise ValueError(f"{what} is not aligned to its 4-byte elements (a view at an odd byte "
                         "offset)")
    return a


def _state_like(x, p: np.ndarray, what: str, pwhat: str) -> np.ndarray:
    """An optimizer state array of p's shape."""
    a = _writable_float32(x, what)
    if a.shape != p.shape:
        raise ValueError(f"{what} has shape {a.shape}, but {pwhat} has {p.shape}")
    return a


def _gradient(g, shape, what: str) -> tuple[np.ndarray, int]:
    """A gradient as the kernel reads it (a contiguous, aligned, native-order copy
    when it is not one already) and its dtype code."""
    if not isinstance(g, np.ndarray):
        g = np.asarray(g)
    if g.dtype.kind != "f" and g.dtype.name != "bfloat16":
        raise TypeError(f"{what} has dtype {g.dtype}; gradients are float32, float16 or bfloat16")
    if not g.dtype.isnative:
        g = g.astype(g.dtype.newbyteorder("="))
    code = _common.DTYPE_CODES.get(g.dtype.name)
    if code is None or code == _common.DTYPE_CODES["float64"]:
        raise TypeError(f"{what} has dtype {g.dtype}; gradients of float32 variables are float32, "
                        "float16 or bfloat16 (Keras casts them to float32)")
    if g.shape != shape:
        raise ValueError(f"{what} has shape {g.shape}, but its variable has shape {shape}")
    if not (g.flags.c_contiguous and g.flags.aligned):
        g = np.array(g, order="C")  # a fresh array: contiguous and aligned
    return g, code


def _update(rule: str, params, grads, momentums, velocities, *, weight_decay, decay_mask,
            global_clipnorm, clipnorm, clipvalue, unscale, nonfinite, return_norms, **hyper):
    """The checks and the call shared by sgd_update, adam_update and adamw_update."""
    call = _optim.check_update_call(
        params, grads, momentums, velocities, weight_decay=weight_decay, decay_mask=decay_mask,
        global_clipnorm=global_clipnorm, clipnorm=clipnorm, clipvalue=clipvalue, unscale=unscale,
        nonfinite=nonfinite)
    policy, ms, vs, flags = call.policy, call.momentums, call.velocities, call.decay
    u = 1.0 if unscale is None else float(unscale)

    descs, positions, keep = [], [], []
    for i, (p, g) in enumerate(zip(call.params, call.grads)):
        if g is None:  # as Keras: a variable without a gradient is neither updated nor decayed
            continue
        p = _writable_float32(p, f"params[{i}]")
        g, code = _gradient(g, p.shape, f"grads[{i}]")
        m = None if ms is None else _state_like(ms[i], p, f"momentums[{i}]", f"params[{i}]")
        v = None if vs is None else _state_like(vs[i], p, f"velocities[{i}]", f"params[{i}]")
        keep.append(g)  # a copied gradient lives until the call returns
        descs.append((p.ctypes.data, g.ctypes.data, code, 0 if m is None else m.ctypes.data,
                      0 if v is None else v.ctypes.data, p.size, flags[i]))
        positions.append(i)

    core = _common.load_core()
    norm_code = _common.norm_dtype_code([d[2] for d in descs])
    dtype = _common.np_dtype(norm_code)
    norm = np.zeros((), dtype=dtype)
    norms = np.zeros(len(descs), dtype=dtype)
    args = _optim.update_args(core, rule=rule, clip_mode=call.clip_mode, clip_value=call.clip,
                              norm_code=norm_code, unscale=u, skip=policy != "nan",
                              learning_rate=hyper.pop("learning_rate"), weight_decay=weight_decay,
                              **hyper)
    args.norm_out = norm.ctypes.data
    if (return_norms or policy == "raise") and descs:
        args.tensor_norms = norms.ctypes.data
    try:
        core.update_cpu(descs, args)
    except ValueError as exc:
        raise ValueError(_optim.name_tensors(str(exc), positions, _optim.STATE_NAMES)) from None
    del keep
    if policy == "raise" and not np.isfinite(norm):
        raise _common.NonFiniteError(_optim.nonfinite_update_message(norm, norms, positions))
    if return_norms:
        return norm, _common.expand_norms(norms, positions, len(call.params), np)
    return norm


_UPDATE_COMMON_ARGS = """
      weight_decay: Keras' ``weight_decay``: ``p -= p * weight_decay * learning_rate``
        before the update, for every variable not masked out; None: no decay.
      decay_mask: a sequence of bools, one per variable: False excludes it from weight
        decay (Keras' ``exclude_from_weight_decay``); None: every variable decays.
      global_clipnorm, clipnorm, clipvalue: Keras' clip options (at most one; one that
        is not > 0 does not clip). The gradients are then exactly the outputs of
        ``clip_by_global_norm``, ``clip_by_norm`` or ``clip_by_value(g, -v, v)`` of
        this module, in their own dtype, before the update casts them to float32.
      unscale: with global_clipnorm or no clip, the gradients are taken as
        ``g * unscale`` (``1 / loss_scale``), as in ``clip_by_global_norm``.
      nonfinite: an inf or NaN global norm (of ``g * unscale``): "nan" (Keras' behaviour:
        the NaN reaches the variables), "skip" (nothing is written; the caller keeps
        its step count, as Keras' LossScaleOptimizer does), or "raise"
        (clipops.NonFiniteError naming the first bad gradient; nothing is written).
      return_norms: also return each gradient's own norm (0 for a None gradient).

    Returns:
      The global norm of the gradients (of ``g * unscale``) before the clip, a 0-d
      array of the gradients' dtype (float32 for a mixed list); with return_norms,
      ``(global_norm, tensor_norms)``. With nonfinite="skip", a norm that is not
      finite means the step was skipped.

    Raises:
      TypeError: a list is not a sequence; a variable or state array is not a float32
        NumPy array; a gradient is not float32, float16 or bfloat16.
      ValueError: lengths or shapes differ; an array the update writes is read-only,
        not contiguous or misaligned; two buffers share memory that is written; a
        scalar is out of range. Nothing is written then.
      clipops.NonFiniteError: nonfinite="raise" and the norm is inf or NaN.
"""


def sgd_update(params, grads, momentums=None, *, learning_rate=0.01, momentum=0.0,
               nesterov=False, weight_decay=None, decay_mask=None, global_clipnorm=None,
               clipnorm=None, clipvalue=None, unscale=None, nonfinite="nan",
               return_norms=False):
    """Keras 3's ``SGD`` step, fused with its clip, in place: one norm pass over
    the gradients and one pass that reads g, p (and m) once.

    Bit-identical to Keras' weight decay and ``SGD.update_step`` (TensorFlow
    backend, not XLA) applied to the clipped gradients: every hyperparameter is
    cast to float32 as Keras casts it, and every operation is Keras' float32
    operation in Keras' order (``m = m * momentum - g * lr``; ``p = p + m``, or
    with nesterov ``p = p + (m * momentum - g * lr)``; without momentum
    ``p = p - g * lr``).

    Args:
      params: a sequence of float32 NumPy arrays (C-contiguous, writable), updated in place.
      grads: gradients, one per variable, of its shape: float32, float16 or bfloat16
        arrays, or None (the variable is left alone, as Keras does).
      momentums: with momentum != 0, Keras' ``momentums``: float32 arrays like params,
        updated in place; else None.
      learning_rate: the float32 learning rate (a schedule's value for this step).
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
    """Keras 3's ``Adam`` step, fused with its clip, in place: one norm pass over
    the gradients and one pass that reads g, p, m, v once and writes p, m, v.

    Bit-identical to Keras' weight decay and ``Adam.update_step`` (TensorFlow
    backend on the CPU, not XLA) applied to the clipped gradients:
    ``m += (g - m) * (1 - beta_1)``, ``v += (g*g - v) * (1 - beta_2)``,
    ``p -= (m * alpha) / (sqrt(v) + epsilon)`` with
    ``alpha = lr * sqrt(1 - beta_2**step) / (1 - beta_1**step)``, every constant
    cast as Keras does (``1 - beta_1`` in double, then float32; ``beta**step`` by
    TensorFlow's CPU ``pow`` in float32).

    Args:
      params: a sequence of float32 NumPy arrays (C-contiguous, writable), updated in place.
      grads: gradients, one per variable, of its shape: float32, float16 or bfloat16
        arrays, or None (the variable is left alone, as Keras does).
      momentums, velocities: Keras' ``momentums`` and ``velocities`` (m and v): float32
        arrays like params, updated in place (zeros before the first step).
      step: the number of this update, from 1 (Keras' ``iterations + 1``).
      learning_rate, beta_1, beta_2, epsilon: as ``keras.optimizers.Adam``."""
    _optim.check_adam_state(momentums, velocities)
    return _update("adam", params, grads, momentums, velocities, weight_decay=weight_decay,
                   decay_mask=decay_mask, global_clipnorm=global_clipnorm, clipnorm=clipnorm,
                   clipvalue=clipvalue, unscale=unscale, nonfinite=nonfinite,
                   return_norms=return_norms, learning_rate=learning_rate, beta_1=beta_1,
                   beta_2=beta_2, epsilon=epsilon, step=step)


def adamw_update(params, grads, momentums, velocities, *, step, learning_rate=0.001,
                 weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, decay_mask=None,
                 global_clipnorm=None, clipnorm=None, clipvalue=None, unscale=None,
                 nonfinite="nan", return_norms=False):
    """Keras 3's ``AdamW`` step, fused with its clip, in place: ``adam_update``
    with decoupled weight decay first (Keras' AdamW is Adam plus the weight
    decay every Keras optimizer applies before ``update_step``), so
    ``p -= p * weight_decay * learning_rate`` for each variable ``decay_mask``
    does not exclude, then the Adam step.

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
