"""Argument checks and dtype codes shared by the front ends."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}


def load_core():
    """The compiled pybind11 core, or an ImportError that says what to do."""
    try:
        from . import _core
    except ImportError as exc:
        raise ImportError(
            "clipops' compiled core (clipops._core) is missing. Build and install the package "
            "with `pip install --no-build-isolation .`, and import it from outside the source "
            "tree (a `clipops/` folder in the current directory shadows the installed one)."
        ) from exc
    return _core


def check_list(t_list, param: str = "t_list") -> list:
    """TF's rule: a sequence, not a string; returned as a list. `param` is the
    front end's name for the argument, used in the error."""
    if not isinstance(t_list, Sequence) or isinstance(t_list, (str, bytes)):
        raise TypeError(f"`{param}` should be a sequence of tensors. Received {type(t_list)}.")
    return list(t_list)


def dtype_code(name: str, index: int, param: str = "t_list") -> int:
    try:
        return DTYPE_CODES[name]
    except KeyError:
        raise TypeError(
            f"{param}[{index}] has dtype {name}; clipops clips float16, bfloat16, float32 "
            "and float64 tensors only") from None


def norm_dtype_code(codes: list[int]) -> int:
    """The norm's dtype: the list's own, or float32 for a mixed list. A list
    with no tensors (empty, or only None entries) has a float32 norm of 0, as
    in TensorFlow: `tf.clip_by_global_norm([], 1.0)` gives `([], 0.0)`."""
    if not codes:
        return DTYPE_CODES["float32"]
    return codes[0] if all(c == codes[0] for c in codes) else DTYPE_CODES["float32"]


def check_scalar(value, what: str):
    """A Python number or a 0-d array-like; returns it unchanged."""
    shape = getattr(value, "shape", ())
    if getattr(shape, "rank", 0) is None:
        return value  # a graph tensor of unknown rank: the op's kernel checks it
    if tuple(shape) != ():
        raise ValueError(f"{what} must be a scalar, got shape {tuple(shape)}")
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{what} must be a number or a 0-d array, got {type(value).__name__}")
    return value


def np_dtype(code: int) -> np.dtype:
    """The NumPy dtype of a dtype code (bfloat16 needs the ml_dtypes package)."""
    if code == DTYPE_CODES["bfloat16"]:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPE_NAMES[code])


def scalar_in(value, code: int, what: str) -> float:
    """A host scalar rounded to the norm dtype (as TF converts it), as a float."""
    check_scalar(value, what)
    return float(np.asarray(value).astype(np_dtype(code)))
