"""Does clipops clip like tf.clip_by_global_norm? One step, judged on the same gradients.

bench/mnist.py clips every step's gradients with both ops (teacher forcing:
one shared state, advanced with TensorFlow's clip) and asks this module
whether the two results agree. Comparing free-running trajectories instead
fails on one machine and passes on another: an optimizer such as Adam
amplifies a last-bit difference over hundreds of steps. Pure NumPy, so the
tests can show that a wrong scale on one step is caught.

The criterion, derived from how each op rounds (u = 2^-24, float32):
  - A step that neither op clips (both norms <= clip_norm) scales by
    clip * (1/clip) in both, the same float32 operations on the same inputs:
    the outputs must be bit-identical.
  - A clipped step scales by clip * min(1/norm, 1/clip), with each op's own
    norm. The two norms differ by their summation error: clipops' is within
    9u (float lanes of at most 16 terms, then double, one rounding), TF's
    float32 sum of squares within (D + 6)u for a summation depth D (Eigen
    reduces leaves of 1,024 elements linearly, then a tree of log2(n/1024)
    levels, then a few thread blocks, then the 2N+4 ops' stack-sum of N terms),
    and a square root halves a relative error. So the norms agree within
    NORM_RTOL; and given the two norms, each output must be its input times
    that op's own scale: the outputs' ratio equals the norms' inverse ratio
    to within the roundings of the two scales and the two products (6u).
    A wrong scale on any step breaks the second check by far more than 6u.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff


def norm_rtol(max_elements: int, num_tensors: int) -> float:
    """Bound on |norm_tf - norm_clipops| / norm for float32 (see the module docstring)."""
    depth = 1024 + math.ceil(math.log2(max(max_elements, 2))) + 64 + num_tensors + 6
    return (0.5 * depth + 9 + 1) * U32


OUTPUT_RTOL = 6 * U32  # two scale roundings and two products (module docstring)
TINY = 2.0 ** -126     # below float32's normal range a product's error is absolute


@dataclass
class StepAgreement:
    """The verdict on one step's two clips."""

    step: int
    clipped: bool
    ok: bool
    norm_rel_diff: float
    max_output_err: float  # in units of the allowed error; <= 1 passes
    why: str = ""


def compare_step(step: int, clip_norm: float, grads: Sequence[np.ndarray],
                 tf_out: Sequence[np.ndarray], tf_norm: float,
                 co_out: Sequence[np.ndarray], co_norm: float) -> StepAgreement:
    """Judges clipops' (co_out, co_norm) against TF's on the same float32 grads."""
    sizes = [g.size for g in grads]
    clipped = not (tf_norm <= clip_norm and co_norm <= clip_norm)
    both_nan = math.isnan(tf_norm) and math.isnan(co_norm)
    norm_diff = 0.0 if both_nan or tf_norm == co_norm else \
        abs(co_norm - tf_norm) / max(abs(tf_norm), abs(co_norm))
    if not clipped:
        same = all(a.tobytes() == b.tobytes() for a, b in zip(tf_out, co_out))
        return StepAgreement(step, False, same, norm_diff, 0.0 if same else math.inf,
                             "" if same else "not clipped, yet the outputs differ in their bits")
    allowed_norm = norm_rtol(max(sizes, default=1), len(sizes))
    if not (norm_diff <= allowed_norm or both_nan):
        return StepAgreement(step, True, False, norm_diff, math.inf,
                             f"the norms differ by {norm_diff:.3g} relative, more than the "
                             f"{allowed_norm:.3g} two float32 sums can")
    # each op's output is its input times its own scale clip / max(norm, clip),
    # so clipops' output is TF's times max(n_tf, clip) / max(n_co, clip)
    ratio = max(tf_norm, clip_norm) / max(co_norm, clip_norm) if not both_nan else math.nan
    worst = 0.0
    for t, c in zip(tf_out, co_out):
        t64, c64 = t.astype(np.float64), c.astype(np.float64)
        if both_nan:
            if not (np.isnan(t64).all() and np.isnan(c64).all()):
                return StepAgreement(step, True, False, norm_diff, math.inf,
                                     "a NaN norm, but not every output is NaN")
            continue
        err = np.abs(c64 - t64 * ratio)
        allowed = OUTPUT_RTOL * np.abs(t64 * ratio) + TINY
        if err.size:
            worst = max(worst, float(np.max(err / allowed)))
    ok = worst <= 1.0
    return StepAgreement(step, True, ok, norm_diff, worst,
                         "" if ok else f"an output is off its scale by {worst:.3g} times the "
                                       "allowed rounding")
