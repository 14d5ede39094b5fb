"""Argument checks and dtype codes shared by the front ends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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


def check_unscale(value):
    """unscale: a host number must be finite and > 0 (a device scalar is the
    caller's to get right); returns it unchanged."""
    check_scalar(value, "unscale")
    if isinstance(value, (int, float, np.number, np.ndarray)) and not isinstance(value, bool):
        v = float(np.asarray(value, dtype=np.float64))
        if not (v > 0.0 and np.isfinite(v)):
            raise ValueError(f"unscale must be a finite number > 0 (1 / loss scale), got {v!r}")
    return value


# ---- gradient health: the non-finite policy and the extra results ------------

NONFINITE_POLICIES = ("nan", "raise", "skip")


class NonFiniteError(FloatingPointError):
    """``nonfinite="raise"``: the global norm is inf or NaN. The message names
    the first tensor whose own norm is not finite. Nothing was clipped: the
    caller's arrays (in place too) hold their inputs."""


class ClipResult(NamedTuple):
    """What ``clip_by_global_norm`` returns when asked for more than TF's pair
    (``return_norms=True`` or ``nonfinite="skip"``). It unpacks as a 4-tuple.

    clipped: the list of clipped tensors (None entries stay None).
    global_norm: the global norm (use_norm when given), as without extras.
    tensor_norms: with return_norms, a 1-D array of the norm dtype, one entry
      per entry of the list (0 for None), each tensor's own norm, from the same
      partial sums as the global norm (no extra pass); else None.
    skipped: with nonfinite="skip", a 0-d bool on the norm's device, True when
      the norm was inf or NaN and the outputs are the inputs as they are, not
      multiplied by unscale either (torch's found_inf); computed from the
      norm, so the host never waits. Else None.
    """

    clipped: list
    global_norm: Any
    tensor_norms: Any = None
    skipped: Any = None


def check_nonfinite(policy) -> str:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, "
                         f"got {policy!r}")
    return policy


def nonfinite_message(norm: float, tensor_norms, positions: list[int], param: str) -> str:
    """The NonFiniteError text: the norm, and the first tensor whose own norm
    is not finite (an inf or NaN in it, or squares past float32's range)."""
    bad = [p for p, n in zip(positions, np.asarray(tensor_norms, dtype=np.float64))
           if not np.isfinite(n)]
    if bad:
        first = (f"{param}[{bad[0]}] is the first tensor whose own norm is not finite "
                 f"({len(bad)} of {len(positions)} are): it holds inf or NaN, or squares beyond "
                 "float32's range")
    else:
        first = ("every tensor's own norm is finite: their sum overflows the norm's dtype, or "
                 "use_norm is not finite")
    return (f"the global norm is {float(norm)} (nonfinite='raise'); {first}. Nothing was "
            "clipped: the outputs are the inputs.")


def expand_norms(norms, positions: list[int], length: int, xp):
    """Per-tensor norms of the present tensors, as one entry per list entry
    (0 for None). `xp`: numpy or cupy."""
    if len(positions) == length:
        return norms
    full = xp.zeros(length, dtype=norms.dtype)
    full[xp.asarray(positions, dtype=np.int64)] = norms
    return full
