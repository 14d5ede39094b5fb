"""NumPy front end: the core's CPU kernel on NumPy arrays, without TensorFlow.

Same semantics as clipops.clip_by_global_norm (TF's formula, float32-or-better
accumulation, mixed dtypes); bfloat16 arrays need the ml_dtypes package.
"""

from __future__ import annotations

import numpy as np

from . import _common

__all__ = ["clip_by_global_norm", "global_norm"]


# Keyed by dtype object: a dict lookup, where `dtype.name` costs microseconds
# per array (it matters for lists of thousands of small tensors).
_CODES = {np.dtype(name): code for name, code in _common.DTYPE_CODES.items() if name != "bfloat16"}


def _code_of(a: np.ndarray, index: int) -> int:
    code = _CODES.get(a.dtype)
    return _common.dtype_code(a.dtype.name, index) if code is None else code


def _prepare(arrays, in_place: bool):
    arrays = _common.check_list(arrays)
    present = []  # (position, array, dtype code)
    for i, a in enumerate(arrays):
        if a is None:
            continue
        if in_place:
            if not isinstance(a, np.ndarray):
                raise TypeError(f"arrays[{i}] is a {type(a).__name__}; in_place=True needs "
                                "NumPy arrays")
            if not a.flags.c_contiguous:
                raise ValueError(f"arrays[{i}] is not C-contiguous; in_place=True needs "
                                 "contiguous arrays (or pass in_place=False)")
            if not a.flags.writeable:
                raise ValueError(f"arrays[{i}] is read-only; it cannot be clipped in place")
        elif not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        present.append((i, a, _code_of(a, i)))
    norm_code = _common.norm_dtype_code([c for _, _, c in present])
    return arrays, present, norm_code


def global_norm(arrays) -> np.ndarray:
    """sqrt(sum of squares of every element); a 0-d array of the norm dtype."""
    _, present, norm_code = _prepare(arrays, in_place=False)
    norm = np.empty((), dtype=_common.np_dtype(norm_code))
    descs = [(a.ctypes.data, 0, a.size, c) for _, a, c in present]
    _common.load_core().clip_cpu(descs, norm_code, False, 0.0, None, norm.ctypes.data)
    return norm


def clip_by_global_norm(arrays, clip_norm, use_norm=None, in_place: bool = False):
    """Scales every array by clip_norm / max(global_norm, clip_norm).

    Returns (clipped, norm): a list (None entries stay None) and the 0-d norm,
    or use_norm when given. With in_place=True the caller's arrays are written
    and returned; they must be C-contiguous, writable and not share memory.
    """
    arrays, present, norm_code = _prepare(arrays, in_place)
    clip = _common.scalar_in(clip_norm, norm_code, "clip_norm")
    use = None if use_norm is None else _common.scalar_in(use_norm, norm_code, "use_norm")
    outs = [a if in_place else np.empty_like(a) for _, a, _ in present]
    norm = np.empty((), dtype=_common.np_dtype(norm_code))
    descs = [(a.ctypes.data, o.ctypes.data, a.size, c) for (_, a, c), o in zip(present, outs)]
    _common.load_core().clip_cpu(descs, norm_code, True, clip, use, norm.ctypes.data)
    result = [None] * len(arrays)
    for (i, _, _), o in zip(present, outs):
        result[i] = o  # in place: the caller's own array object
    return result, norm
