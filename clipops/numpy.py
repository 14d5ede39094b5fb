"""NumPy front end: the core's CPU kernel on NumPy arrays, without TensorFlow.

Same semantics as clipops.clip_by_global_norm (TF's formula, float32-or-better
accumulation, mixed dtypes); bfloat16 arrays need the ml_dtypes package.
"""

from __future__ import annotations

import numpy as np

from . import _common

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
      clipops' bounded host cache, reused once freed (README, "Reliability").
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
