"""Arguments of the fused clip + optimizer update, as Keras 3 converts them.

Shared by the update's front ends (clipops.numpy, clipops.cupy and
clipops.tensorflow): the host checks of a call, which clip, the float32
hyperparameters with Keras' roundings, the weight-decay flags, the core's
``UpdateArgs`` and the messages. Array handling stays with each front end.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from . import _common


def keras_float32(value, what: str) -> float:
    """``ops.cast(value, "float32")`` of a Python number (or a 0-d array), as a
    float: one correct rounding of the number to float32."""
    _common.check_scalar(value, what)
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got a bool")
    return float(np.asarray(value).astype(np.float32))


def keras_one_minus(beta, what: str) -> float:
    """Keras' ``1 - self.beta_1`` (computed with the value as given: in double
    for a Python float), then cast to float32 as ``ops.multiply`` does."""
    _common.check_scalar(beta, what)
    return keras_float32(1 - beta, f"1 - {what}")


def clip_choice(global_clipnorm, clipnorm, clipvalue) -> tuple[str, float]:
    """The clip Keras' ``_clip_gradients`` applies: ``(mode, value)``, mode one of
    ``"norm"`` (clipnorm), ``"global_norm"``, ``"value"`` or ``"none"``. As in
    Keras, at most one may be given, and one that is not > 0 means no clip."""
    given = {name: v for name, v in (("clipnorm", clipnorm), ("global_clipnorm", global_clipnorm),
                                     ("clipvalue", clipvalue)) if v is not None}
    if len(given) > 1:
        raise ValueError("Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                         f"Received: {', '.join(f'{k}={v}' for k, v in given.items())}")
    for name, mode in (("clipnorm", "norm"), ("global_clipnorm", "global_norm"),
                       ("clipvalue", "value")):  # Keras' order of precedence
        if name in given:
            value = given[name]
            _common.check_scalar(value, name)
            v = float(np.asarray(value, dtype=np.float64))
            if v > 0:  # Keras: `if self.clipnorm and self.clipnorm > 0` (NaN and 0 do not clip)
                if not np.isfinite(v):
                    raise ValueError(f"{name} must be finite, got {v!r}")
                return mode, value
    return "none", 0.0


def decay_flags(weight_decay, decay_mask, count: int) -> list[bool]:
    """Per variable, whether weight decay applies: none without weight_decay
    (Keras: ``weight_decay=None``), else every variable not masked out
    (``decay_mask[i]`` False, as Keras' ``exclude_from_weight_decay``)."""
    if weight_decay is None:
        if decay_mask is not None:
            raise ValueError("decay_mask is given, but weight_decay is None (no weight decay)")
        return [False] * count
    if decay_mask is None:
        return [True] * count
    mask = list(decay_mask)
    if len(mask) != count:
        raise ValueError(f"decay_mask has {len(mask)} entries for {count} variables")
    for i, m in enumerate(mask):
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(f"decay_mask[{i}] must be a bool, got {type(m).__name__}")
    return [bool(m) for m in mask]


def check_nonnegative_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    return int(value)


def check_step(t: int) -> int:
    """A host step number: Keras' ``iterations + 1``, so at least 1."""
    if t < 1:
        raise ValueError(f"step must be >= 1 (the first update is step 1), got {t}")
    return t


def keras_hyper(rule: str, *, weight_decay=None, momentum=0.0, nesterov=False, beta_1=0.9,
                beta_2=0.999, epsilon=1e-7) -> dict:
    """The rule's float hyperparameters as Keras 3 rounds them: float32 of each
    Python number, ``1 - beta`` taken in double first; weight_decay None is 0.
    Named as the fields of the core's ``UpdateArgs`` and the TF op's attrs."""
    h = {"weight_decay": 0.0 if weight_decay is None
         else keras_float32(weight_decay, "weight_decay")}
    if rule == "sgd":
        h["momentum"] = keras_float32(momentum, "momentum")
        h["nesterov"] = bool(nesterov)
    else:
        h["one_minus_beta_1"] = keras_one_minus(beta_1, "beta_1")
        h["one_minus_beta_2"] = keras_one_minus(beta_2, "beta_2")
        h["epsilon"] = keras_float32(epsilon, "epsilon")
    return h


def update_args(core, *, rule: str, clip_mode: str, clip_value: float, norm_code: int,
                unscale: float, skip: bool, learning_rate, weight_decay=None, momentum=0.0,
                nesterov: bool = False, beta_1=0.9, beta_2=0.999, epsilon=1e-7, step=None):
    """``core.UpdateArgs()`` (core: the pybind11 module the call goes to) with
    host scalars, every hyperparameter converted as Keras converts it
    (keras/src/optimizers/{sgd,adam}.py and the TensorFlow backend's weight
    decay). For Adam, beta^t is ``_core.keras_cpu_power`` (TensorFlow's CPU
    ``tf.pow``) of float32 beta and float32 ``step`` (Keras' ``iterations + 1``)."""
    a = core.UpdateArgs()
    a.rule = core.UPDATE_RULES[rule]
    a.clip_mode = core.UPDATE_CLIPS[clip_mode]
    a.norm_dtype = norm_code
    a.clip = _common.scalar_in(clip_value, norm_code, clip_mode) if clip_mode != "none" else 0.0
    a.unscale = unscale
    a.skip_nonfinite = skip
    a.learning_rate = keras_float32(learning_rate, "learning_rate")
    for name, value in keras_hyper(rule, weight_decay=weight_decay, momentum=momentum,
                                   nesterov=nesterov, beta_1=beta_1, beta_2=beta_2,
                                   epsilon=epsilon).items():
        setattr(a, name, value)
    if rule != "sgd":
        b1 = np.float32(keras_float32(beta_1, "beta_1"))
        b2 = np.float32(keras_float32(beta_2, "beta_2"))
        t = check_step(check_nonnegative_int(step, "step"))
        power = _common.load_core().keras_cpu_power
        a.beta_1_power = power(float(b1), t)
        a.beta_2_power = power(float(b2), t)
        a.beta_1, a.beta_2 = float(b1), float(b2)
        a.iterations = t - 1
    return a


# The kernel's tables and parameters as NumPy structured dtypes, for a route
# that launches the kernel itself (phase 2's NVRTC route): csrc/core/optim_math.h,
# struct StateEntry (32 bytes) and struct UpdateParams (176 bytes), field for
# field (tests/test_emulation_optim.py checks them against the C++ layout).
STATE_ENTRY = np.dtype([("param", "<u8"), ("m", "<u8"), ("v", "<u8"), ("decay", "<i4"),
                        ("pad", "<i4")])
UPDATE_PARAMS = np.dtype(
    [(name, "<u8") for name in ("clip_ptr", "unscale_ptr", "lr_ptr", "beta_1_power_ptr",
                                "beta_2_power_ptr", "iterations_ptr", "norm_out", "tensor_norms")]
    + [(name, "<f8") for name in ("clip_value", "unscale_value", "lr_value", "beta_1_power_value",
                                  "beta_2_power_value")]
    + [("iterations_value", "<i8")]
    + [(name, "<f4") for name in ("momentum", "one_minus_beta_1", "one_minus_beta_2", "epsilon",
                                  "weight_decay", "beta_1", "beta_2", "pad_f")]
    + [(name, "<i4") for name in ("rule", "clip_mode", "norm_dtype", "skip_nonfinite", "nesterov",
                                  "power_source", "increment_iterations", "has_momentum")])
assert STATE_ENTRY.itemsize == 32 and UPDATE_PARAMS.itemsize == 176


_TENSOR_REF = re.compile(r"tensor (\d+)'s (param|grad|m|v)")


def name_tensors(message: str, positions: list[int], names: dict[str, str]) -> str:
    """The core's "tensor k's m" (k counts the variables passed to it) as the
    front end's "momentums[i]" (i: the position in the caller's lists)."""
    return _TENSOR_REF.sub(lambda mo: f"{names[mo.group(2)]}[{positions[int(mo.group(1))]}]",
                           message)


# ---- host checks of the update's front ends ------------------------------------------------
# What every front end checks, with the same words, before it looks at an array
# (clipops.cupy before it touches a device).

STATE_NAMES = {"param": "params", "grad": "grads", "m": "momentums", "v": "velocities"}


def update_lists(params, grads, momentums, velocities) -> tuple[list, list, list | None,
                                                                list | None]:
    """The four lists as lists (None for a state list not given), their lengths
    checked against params'."""
    params = _common.check_list(params, "params")
    n = len(params)
    lists = {"grads": _common.check_list(grads, "grads")}
    for name, value in (("momentums", momentums), ("velocities", velocities)):
        if value is not None:
            lists[name] = _common.check_list(value, name)
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} params")
    return params, lists["grads"], lists.get("momentums"), lists.get("velocities")


def check_unscale_clip(unscale, clip_mode: str) -> None:
    """unscale goes with the global-norm clip or no clip (as the core requires)."""
    if unscale is not None and clip_mode not in ("global_norm", "none"):
        raise ValueError("unscale goes with global_clipnorm or no clip (clipnorm and clipvalue "
                         "clip each gradient as it is)")


class UpdateCall(NamedTuple):
    """A call's host arguments once checked (check_update_call)."""

    policy: str                    # nonfinite: "nan", "raise" or "skip"
    params: list
    grads: list
    momentums: list | None
    velocities: list | None
    clip_mode: str                 # clip_choice's mode
    clip: object                   # its threshold, as given
    decay: list[bool]              # per variable: weight decay applies


def check_update_call(params, grads, momentums, velocities, *, weight_decay, decay_mask,
                      global_clipnorm, clipnorm, clipvalue, unscale, nonfinite,
                      choose_clip=clip_choice) -> UpdateCall:
    """The checks every front end's update makes first, in this order: the
    policy, the lists, the clip (``choose_clip``: clip_choice, or a front end's
    own that also takes tensors), unscale with it, the weight-decay flags.

    Raises:
      TypeError, ValueError: as the update functions document."""
    policy = _common.check_nonfinite(nonfinite)
    params, grads, momentums, velocities = update_lists(params, grads, momentums, velocities)
    mode, clip = choose_clip(global_clipnorm, clipnorm, clipvalue)
    check_unscale_clip(unscale, mode)
    if unscale is not None:
        _common.check_unscale(unscale)
    flags = decay_flags(weight_decay, decay_mask, len(params))
    return UpdateCall(policy, params, grads, momentums, velocities, mode, clip, flags)


def check_sgd_state(momentum, momentums, kind: str = "arrays") -> None:
    """Keras' SGD keeps momentums exactly when momentum is not 0. kind: what the
    front end's variables are ("arrays", "variables")."""
    if momentum != 0 and momentums is None:
        raise ValueError(f"momentum is not 0: pass momentums (float32 {kind} like params)")
    if momentum == 0 and momentums is not None:
        raise ValueError("momentums are given, but momentum is 0 (Keras keeps none then)")


def check_adam_state(momentums, velocities, kind: str = "arrays") -> None:
    """Adam keeps both moments."""
    if momentums is None or velocities is None:
        raise ValueError(f"Adam needs momentums and velocities (float32 {kind} like params)")


def check_adamw_decay(weight_decay) -> None:
    """AdamW is Adam with weight decay: None is refused (not taken as no decay)."""
    if weight_decay is None:
        raise ValueError("weight_decay must be a number for AdamW (Keras' default is 0.004); "
                         "adam_update is AdamW without it")


def nonfinite_update_message(norm, tensor_norms, positions: list[int]) -> str:
    """The NonFiniteError text of a refused update (nonfinite="raise")."""
    return _common.nonfinite_message(norm, tensor_norms, positions, "grads").replace(
        "Nothing was clipped: the outputs are the inputs.",
        "Nothing was updated: the variables and their state keep their values.")


def add_update_docs(sgd_update, adam_update, adamw_update, common_args: str) -> None:
    """Appends the Args, Returns and Raises the three update functions share (a
    docstring must be a literal, so they are added here; python -OO strips
    docstrings, and then this does nothing). AdamW's weight_decay has a default."""
    if sgd_update.__doc__ is None:
        return
    sgd_update.__doc__ += common_args
    adam_update.__doc__ += common_args
    adamw_update.__doc__ += common_args.replace(
        "None: no decay.", "Keras' default 0.004;\n        it must be a number.")
