"""Keras 3 integration: any Keras optimizer clips with clipops' fused op inside ``model.fit``,
and SGD, Adam and AdamW do their clip, weight decay and update as one op.

    import keras, clipops.keras
    model.compile(optimizer=clipops.keras.fused(keras.optimizers.AdamW(1e-3, global_clipnorm=1.0)),
                  loss="mse")
    model.fit(x, y)

The fused update (``optimizer.fuses_update``): for Keras' own ``SGD`` (momentum, nesterov),
``Adam`` and ``AdamW`` (not ``amsgrad``; hyperparameters that are Python numbers), the clip,
the weight decay and the update of every variable are ONE op after the cross-replica sum
(``ClipopsFusedUpdate``: one CUDA launch on a GPU, a norm pass and an update pass on a CPU),
where Keras runs some 30 small ops per variable. It writes Keras' own state (``momentums``,
``_momentums`` and ``_velocities``), with Keras' float32 arithmetic op for op: bit for bit
Keras' own update step (non-XLA, eager) applied to the clipped gradients. Two known
differences, both within an ulp of a variable where they show: Keras' weight decay
``p - p * wd * lr`` is rewritten by TensorFlow's graph optimizer (Grappler) inside a
``tf.function`` to ``p - p * (wd * lr)``, while the op keeps Keras' written (eager) order; and a
clipped step's scale differs by the norm's rounding (as with the fused clip alone). Under XLA
(``jit_compile=True`` or ``"auto"``) the same formula runs as TF ops and gives Keras' own XLA
bits. Any other optimizer (RMSprop, Lion, Adam with amsgrad, a subclass that overrides
``update_step``, ...) keeps the fused clip and Keras' own weight decay and update, as does a
step whose variables are not all float32 on one device.

``fused(optimizer)`` turns the optimizer itself into an object of a subclass of its own class
("FusedAdam" for Adam, registered with Keras as ``clipops>FusedAdam``) and returns it: only its
class changes, so everything it holds is kept, what its config records and what it does not
(``exclude_from_weight_decay``, a learning-rate schedule object, a LossScaleOptimizer's inner
optimizer). Everything but the clip is Keras' own code: the update rule, weight decay, EMA,
``gradient_accumulation_steps``, ``loss_scale_factor``, saving. Its ``variables`` are Keras' own
(the norms it records are kept out of them), so checkpoints of a fused and a plain optimizer of
the same class load into each other.

Where the clip happens, and how it differs from Keras 3 (TensorFlow backend):

  - Keras 3 clips in ``BaseOptimizer._backend_apply_gradients`` (``_clip_gradients``), then
    ``TFOptimizer._backend_update_step`` sums the gradients across replicas. Under
    ``tf.distribute.MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` each replica's
    gradients are therefore clipped by their own norm before the sum. A fused optimizer moves
    the clip into ``_backend_update_step``, after the cross-replica sum: one all-reduce, then
    one fused clip of the summed gradients, so the norm is the norm of the global batch's
    gradient, as Keras 2 did. On one device the two orders are the same computation.
  - ``gradient_accumulation_steps`` under a strategy that synchronizes with ``merge_call``
    (MirroredStrategy, MultiWorkerMirroredStrategy): Keras' own optimizer fails to trace there
    (its accumulation ``cond`` holds the all-reduce). A fused optimizer takes that ``cond`` to
    the cross-replica context, as Keras' LossScaleOptimizer does with its own: each branch runs
    on every replica; the update branch sums the accumulated gradients across replicas and
    clips the sum, once per ``gradient_accumulation_steps`` micro-batches.
  - ``global_clipnorm``: ``clipops.tensorflow.clip_by_global_norm`` (one fused op; inside XLA,
    ``jit_compile=True``, the same math in TF ops, clipops/_tf_xla.py). The scale is Keras' and
    TF's formula ``c * min(1/norm, 1/c) + (norm - norm)``, so a step that is not clipped gives
    bit-identical gradients; a clipped one differs by the rounding of the norm.
  - ``clipnorm`` (each gradient by its own norm): ``clipops.tensorflow.clip_by_norm``, one fused
    op for the whole list with Keras' formula ``g * c / max(norm, c)`` (a tensor that is not
    clipped keeps Keras' bits; a clipped one differs by the rounding of its norm).
  - ``clipvalue``: ``clipops.tensorflow.clip_by_value(grads, -v, v)``, one fused op, Keras' bits.

Mixed precision: ``fused(LossScaleOptimizer(...))`` gives a ``FusedLossScaleOptimizer`` (pass
it to ``compile``; Keras does not wrap it again): the non-finite check, the unscale and the clip
(and with SGD, Adam or AdamW and ``global_clipnorm``, the update too) are one fused op, one pass
over the gradients (``clip_by_global_norm(..., unscale=1/s,
nonfinite="skip")``; see ``FusedLossScaleOptimizer``), with no per-tensor ``isfinite``. Keras'
skip-on-overflow is kept: a step with a non-finite gradient changes no weight and halves the
loss scale. A plain fused optimizer that ``compile``
wraps in Keras' own ``LossScaleOptimizer`` under ``mixed_float16`` still clips after the sum, but
the check and the unscale are then Keras' own passes.

The norms come from the clip's own pass: ``optimizer.last_global_norm`` and
``optimizer.last_tensor_norms`` (one per trainable variable) hold the last step's.
``GlobalNormLogger`` is a callback that writes them to TensorBoard with ``tf.summary``.

Keras versions: clipops.keras overrides and calls private Keras methods, so it is tested with
the releases in ``TESTED_KERAS`` (the ``clipops[keras]`` extra pins that range). Importing it
with another Keras warns; the first fused optimizer to be built then runs ``check_keras()`` (a
tiny step of each fused path against Keras' own), and a Keras whose optimizer no longer
behaves as these overrides expect is refused there, with what differs, before it trains.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

import numpy as np
import keras
import tensorflow as tf
from keras.src.utils import tracking
from tensorflow.core.framework import summary_pb2

from . import tensorflow as _ctf

__all__ = ["fused", "fused_class", "FusedLossScaleOptimizer", "GlobalNormLogger", "is_fused",
           "check_keras", "TESTED_KERAS"]

if keras.backend.backend() != "tensorflow":  # the fused op is a TensorFlow op
    raise ImportError(
        f"clipops.keras needs Keras' TensorFlow backend, but KERAS_BACKEND is "
        f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before importing keras")

_LossScaleOptimizer = keras.optimizers.LossScaleOptimizer
# Keras 3.15's MultiOptimizer hands each variable to a sub-optimizer of its own and clips
# nothing itself (it takes no clip option): its sub-optimizers are what can be fused.
_MultiOptimizer = getattr(keras.optimizers, "MultiOptimizer", None)
_MULTI_MESSAGE = ("{} has no clip of its own (each of its sub-optimizers clips the gradients it "
                  "is given): make the sub-optimizers fused before building it, e.g. "
                  "MultiOptimizer(OptimizerMap(clipops.keras.fused(Adam(1e-3, "
                  "global_clipnorm=1.0)), {{'encoder/.*': clipops.keras.fused(SGD(0.1, "
                  "global_clipnorm=1.0))}}))")

# The Keras 3 releases clipops.keras is tested with, by minor version, oldest first. The one
# place this is written: pyproject.toml's `keras` extra pins the same range
# (tests/test_keras_versions.py checks that they agree) and .ci/run runs that test module
# (check_keras() among it) under the newest release of each minor and the oldest of the range.
TESTED_KERAS = ("3.12", "3.13", "3.14", "3.15")

# The Keras internals clipops.keras overrides or calls (TensorFlow backend). Checked at import:
# a Keras that renamed one fails here, with its name, instead of training without the fused
# clip. A name that still exists but behaves otherwise is what check_keras() is for.
_INTERNALS = {
    keras.optimizers.Optimizer: ("_clip_gradients", "_backend_update_step",
                                 "_backend_apply_gradients", "_all_reduce_sum_gradients",
                                 "_distributed_tf_update_step", "_get_variable_index",
                                 "_backend_increment_gradient_accumulators",
                                 "_backend_reset_gradient_accumulators", "_apply_weight_decay",
                                 "_update_model_variables_moving_average",
                                 "_overwrite_model_variables_with_average_value"),
    _LossScaleOptimizer: ("_overwrite_variable_with_gradient",
                          "_stateful_handle_non_finite_grads"),
    # the fused update: the rules it replaces and the state it writes in their place
    keras.optimizers.SGD: ("update_step", "build"),
    keras.optimizers.Adam: ("update_step", "build"),
}


def _minor(version: str) -> str:
    """'3.15' of '3.15.1' or '3.15.0.dev2025...'."""
    return ".".join(version.split(".")[:2])


def _tested(version: str) -> bool:
    return _minor(version) in TESTED_KERAS


def _check_keras_internals() -> None:
    missing = [f"{cls.__name__}.{name}" for cls, names in _INTERNALS.items() for name in names
               if not hasattr(cls, name)]
    if missing:
        raise ImportError(
            f"clipops.keras needs Keras internals that Keras {keras.__version__} lacks: "
            f"{', '.join(missing)}. It is tested with Keras {', '.join(TESTED_KERAS)}; install "
            "one of those (pip install 'clipops[keras]') or use clipops.clip_by_global_norm in "
            "a custom training loop.")


_check_keras_internals()

# Set while a FusedLossScaleOptimizer calls its inner optimizer's apply() with gradients it
# has already summed across replicas (and clipped). Thread-local: MirroredStrategy runs each
# replica's step in a thread of its own, and each replica sets and reads its own flags.
_PREPARED = threading.local()


@contextlib.contextmanager
def _prepared(optimizer, summed: bool, clipped: bool, updated: bool = False):
    """While alive, `optimizer`'s update step takes its gradients as already summed across
    replicas (summed), clipped, or its whole update as done (updated: the
    FusedLossScaleOptimizer ran the fused update itself)."""
    flags = getattr(_PREPARED, "flags", None)
    if flags is None:
        flags = _PREPARED.flags = {}
    old = flags.get(id(optimizer))
    flags[id(optimizer)] = (summed, clipped, updated)
    try:
        yield
    finally:
        if old is None:
            del flags[id(optimizer)]
        else:
            flags[id(optimizer)] = old


def _prepared_flags(optimizer) -> tuple:
    return getattr(_PREPARED, "flags", {}).get(id(optimizer), (False, False, False))


def _clip_option(optimizer) -> str | None:
    """The clip option an optimizer uses, as Keras' _clip_gradients picks it."""
    for name in ("clipnorm", "global_clipnorm", "clipvalue"):  # Keras' order of precedence
        value = getattr(optimizer, name, None)
        if value is not None and value > 0:
            return name
    return None


_SGD, _ADAM = keras.optimizers.SGD, keras.optimizers.Adam
_KERAS_OPTIMIZER = keras.optimizers.Optimizer  # the TensorFlow backend's TFOptimizer below it


def _number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _update_rule(optimizer) -> str | None:
    """'sgd' or 'adam' when clipops' op can do this optimizer's weight decay and update step,
    else None (the fused clip only). That is Keras' own SGD.update_step or Adam.update_step
    (AdamW is Adam's), without amsgrad, with Keras' TF-backend weight decay and update step
    not overridden by a subclass, and hyperparameters that are Python numbers (the op takes
    them as float32 attrs, rounded as Keras rounds them)."""
    base = super(_FusedClip, optimizer)
    if getattr(base._apply_weight_decay, "__func__", None) is not \
            _KERAS_OPTIMIZER._apply_weight_decay or \
            getattr(base._backend_update_step, "__func__", None) is not \
            _KERAS_OPTIMIZER._backend_update_step:
        return None
    step = getattr(base.update_step, "__func__", None)
    if step is _SGD.update_step:
        rule, numbers = "sgd", (optimizer.momentum,)
    elif step is _ADAM.update_step and not optimizer.amsgrad:
        rule, numbers = "adam", (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon)
    else:
        return None
    if optimizer.weight_decay is not None:
        numbers += (optimizer.weight_decay,)
    return rule if all(_number(x) for x in numbers) else None


def _merge_call_strategy() -> bool:
    """True in a replica context of a strategy that synchronizes replicas with merge_call
    (MirroredStrategy, MultiWorkerMirroredStrategy), where a ``cond`` whose branch all-reduces
    or updates mirrored variables fails to trace."""
    return (tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
            and not tf.__internal__.distribute.strategy_supports_no_merge_call())


class _FusedClip:
    """Mixin placed before a Keras optimizer class: moves the clip after the cross-replica
    sum and does it with clipops' fused ops; for SGD, Adam and AdamW the clip, the weight
    decay and the update of every variable are one op (``fuses_update``). See the module's
    docstring.

    ``fused`` gives an existing, unbuilt optimizer this class by assigning ``__class__``, so the
    mixin keeps no state of its own made in ``__init__`` (the ``__init__`` here only validates,
    for objects made from the class directly, e.g. by ``keras.saving.load_model``); what it
    needs it creates in ``build``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _clip_option(self) is None:
            raise ValueError(
                f"{type(self).__name__} clips gradients with clipops, but none of "
                "global_clipnorm, clipnorm or clipvalue is set (> 0) on it: create the optimizer "
                "with one, e.g. keras.optimizers.Adam(1e-3, global_clipnorm=1.0)")

    @tracking.no_automatic_dependency_tracking
    def build(self, variables):
        if self.built:
            return
        _require_keras_behaviour()
        super().build(variables)
        # The last step's global gradient norm (GlobalNormLogger reads it): the same value on
        # every replica, since it is the norm of the summed gradients. Not add_variable and
        # not a tracked attribute: the norms stay out of `variables` and out of
        # tf.train.Checkpoint's dependencies, so that a fused optimizer's checkpoints hold
        # what a plain one's do (Keras skips all of an optimizer's state when the counts
        # differ) and both load into each other. A logged value, not training state.
        object.__setattr__(self, "_clipops_norm",
                           self._clipops_variable((), "clipops_global_norm"))
        object.__setattr__(self, "_clipops_tensor_norms", self._clipops_variable(
            (len(self._trainable_variables),), "clipops_tensor_norms"))

    def _clipops_variable(self, shape, name):
        with keras.name_scope(self.name, caller=self):
            return keras.Variable(initializer="zeros", shape=shape, dtype="float32",
                                  trainable=False, aggregation="only_first_replica", name=name)

    @property
    def last_global_norm(self):
        """The global norm of the gradients of the last update step (before clipping, after the
        cross-replica sum and the loss-scale unscale), as a scalar variable; 0 before the first
        step. Recorded for ``global_clipnorm`` and ``clipnorm`` (there, with the fused clip
        alone, the norm of the per-tensor norms), not for ``clipvalue``."""
        if not self.built:
            raise ValueError("the optimizer has not run a step yet (it is not built)")
        return self._clipops_norm

    @property
    def last_tensor_norms(self):
        """Each gradient's own norm in the last update step, as a float32 vector variable in the
        order of the optimizer's variables (``optimizer.variables`` of the model: the trainable
        variables); 0 for a variable without a gradient in that step. From the clip's own pass
        (the partial sums of the global norm, or clip_by_norm's norms): no extra pass. Recorded
        for ``global_clipnorm`` and ``clipnorm``."""
        if not self.built:
            raise ValueError("the optimizer has not run a step yet (it is not built)")
        return self._clipops_tensor_norms

    def _record_norms(self, norm, tensor_norms, variables) -> None:
        """Stores the step's norms; `variables` may be a subset of the optimizer's (Keras drops
        the variables without a gradient before the update step)."""
        norms = tf.cast(tensor_norms, tf.float32)
        if norm is None:  # clipnorm: the norm of the per-tensor norms
            norm = tf.norm(norms)
        self._clipops_norm.assign(tf.cast(norm, tf.float32))
        index = [self._get_variable_index(v) for v in variables]
        if index != list(range(len(self._trainable_variables))):
            norms = tf.scatter_nd([[i] for i in index], norms, [len(self._trainable_variables)])
        self._clipops_tensor_norms.assign(norms)

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not (self.gradient_accumulation_steps and _merge_call_strategy()):
            return super()._backend_apply_gradients(grads, trainable_variables)
        # Keras' accumulation is a cond in the replica context whose update branch all-reduces
        # (a merge_call), which MirroredStrategy cannot trace. As Keras' LossScaleOptimizer does
        # with its own cond: one merge_call, the cond in the cross-replica context, and each
        # branch run on every replica, where the update branch sums and then clips.
        flags = _prepared_flags(self)  # thread-local: the branches run in threads of their own
        tf.distribute.get_replica_context().merge_call(
            lambda distribution, grads, variables: self._accumulate_across_replicas(
                distribution, grads, variables, flags),
            args=(list(grads), list(trainable_variables)))
        if self.use_ema:  # what Keras' _backend_apply_gradients does after its cond
            self._update_model_variables_moving_average(self._trainable_variables)
            if self.ema_overwrite_frequency:
                keras.ops.cond(
                    (self.iterations + 1) % self.ema_overwrite_frequency == 0,
                    lambda: self._overwrite_model_variables_with_average_value(
                        self._trainable_variables),
                    lambda: None)

    def _accumulate_across_replicas(self, distribution, grads, variables, flags):
        """The cross-replica half of _backend_apply_gradients under accumulation."""
        is_update_step = (self._iterations + 1) % self.gradient_accumulation_steps == 0

        def update():
            distribution.extended.call_for_each_replica(
                self._accumulated_update_step, args=(grads, variables, flags))

        def increment():
            distribution.extended.call_for_each_replica(
                self._increment_accumulators, args=(grads, variables))

        keras.ops.cond(is_update_step, update, increment)

    def _accumulators(self, variables) -> list:
        # `variables` may omit those without a gradient: index by variable, as Keras does
        return [self._accumulated_gradients[self._get_variable_index(v)] for v in variables]

    def _increment_accumulators(self, grads, variables):
        self._backend_increment_gradient_accumulators(grads, self._accumulators(variables))

    def _accumulated_update_step(self, grads, variables, flags):
        """Keras' accumulation update branch, on one replica: the mean of the micro-batches'
        gradients, the weight decay, then _backend_update_step (the sum, the clip, the update);
        the accumulators are reset."""
        steps = self.gradient_accumulation_steps
        grads = [(g + a) / steps for g, a in zip(grads, self._accumulators(variables))]
        with _prepared(self, *flags):
            grads = self._clip_gradients(grads)
            self._apply_weight_decay(variables)
            self._backend_update_step(grads, variables, self.learning_rate)
        self._backend_reset_gradient_accumulators()

    def _clip_gradients(self, grads):
        # Keras calls this before _backend_update_step sums across replicas; the clip is done
        # there instead, after the sum (see _backend_update_step).
        return grads

    @property
    def fuses_update(self) -> bool:
        """True when the clip, the weight decay and the update of all variables run as one
        clipops op (``ClipopsFusedUpdate``): Keras' own SGD, Adam and AdamW (not amsgrad).
        False: the fused clip, then Keras' own weight decay and update step. A step whose
        variables are not all float32 on one device also takes Keras' update."""
        return _update_rule(self) is not None

    def _apply_weight_decay(self, variables):
        # With the fused update the op decays the variables (Keras' formula, its flags from
        # _use_weight_decay); _backend_update_step applies Keras' own where it falls back.
        if _update_rule(self) is None:
            super()._apply_weight_decay(variables)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """TFOptimizer's update step with the clip between the all-reduce and the update, and
        for SGD, Adam and AdamW the clip, the weight decay and the update as one op."""
        summed, clipped, updated = _prepared_flags(self)
        if updated:  # the FusedLossScaleOptimizer ran the fused update already
            return
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        if not summed:
            pairs = self._all_reduce_sum_gradients(list(zip(grads, variables)))
            grads = [g for g, _ in pairs]
        rule = _update_rule(self)
        if rule is not None and self._can_fuse_update(grads, variables):
            norm, norms = self._fused_update(rule, list(grads), trainable_variables,
                                             learning_rate, clip=not clipped)
            if not clipped and _clip_option(self) in ("global_clipnorm", "clipnorm"):
                self._record_norms(norm, norms, trainable_variables)
            return
        if not clipped:
            grads = self._clip_summed(list(grads), trainable_variables)
        if rule is not None:  # _apply_weight_decay left it to the fused update
            super()._apply_weight_decay(trainable_variables)
        # The optimizer's own update step, which may keep state of its own there (Nadam's
        # u_product), with the gradients marked summed: its all-reduce passes them through.
        with _prepared(self, summed=True, clipped=True):
            super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Summed once only: not again when _backend_update_step hands the summed, clipped
        # gradients over to the optimizer's own update step.
        if _prepared_flags(self)[0]:
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def _can_fuse_update(self, grads, variables) -> bool:
        """Whether this step's gradients and variables suit the op: float32 variables, on one
        device (a strategy places each replica's on its own), float gradients."""
        if not all(v.dtype == tf.float32 for v in variables):
            return False
        if not all(g.dtype in (tf.float32, tf.float16, tf.bfloat16) for g in grads):
            return False
        if not tf.distribute.has_strategy():
            return len({v.device for v in variables}) <= 1
        return True

    def _fused_update(self, rule: str, grads: list, trainable_variables, learning_rate, *,
                      clip: bool, unscale=None, skip: bool = False):
        """The clip (unless the gradients are clipped already), the weight decay and the
        update of every variable as one ClipopsFusedUpdate per device, after the cross-replica
        sum (in the cross-replica context, as Keras' own update). Returns (global norm,
        per-variable norms) of the first device; unscale: the gradients are taken as
        g * unscale; skip: a non-finite norm writes nothing."""
        option = _clip_option(self) if clip else None
        mode, value = {"global_clipnorm": ("global_norm", self.global_clipnorm),
                       "clipnorm": ("norm", self.clipnorm), "clipvalue": ("value", self.clipvalue),
                       None: ("none", 1.0)}[option]
        if rule == "sgd":
            hyper = _ctf.keras_hyper(rule, weight_decay=self.weight_decay,
                                     momentum=self.momentum, nesterov=self.nesterov)
        else:
            hyper = _ctf.keras_hyper(rule, weight_decay=self.weight_decay, beta_1=self.beta_1,
                                     beta_2=self.beta_2, epsilon=self.epsilon)
        decay = [self.weight_decay is not None and self._use_weight_decay(v)
                 for v in trainable_variables]
        index = [self._get_variable_index(v) for v in trainable_variables]
        if rule == "adam":
            ms = [self._momentums[i].value for i in index]
            vs = [self._velocities[i].value for i in index]
        else:
            ms = [self.momentums[i].value for i in index] if self.momentum != 0 else []
            vs = []
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        grads = [_ctf._dense_gradient(g, "a gradient")[0] for g in grads]
        codes = [_ctf._CODES[g.dtype] for g in grads]
        norm_dtype = _ctf._TF_DTYPES[_ctf._common.norm_dtype_code(codes)]

        def update(first, grads, variables, ms, vs, learning_rate):
            # per device, as Keras' update_step: the learning rate cast to float32, and
            # beta^t from `iterations` (read before apply() increments it), tf.pow there
            lr = tf.cast(learning_rate, tf.float32)
            if rule == "adam":
                b1p, b2p = _ctf.keras_powers(self.beta_1, self.beta_2, self.iterations + 1)
            else:
                b1p = b2p = tf.ones((), tf.float32)  # unused by SGD
            c = tf.constant(value, norm_dtype)
            u = tf.ones((), norm_dtype) if unscale is None else tf.cast(unscale, norm_dtype)
            return _ctf.fused_update_op(rule, grads, variables, ms, vs, learning_rate=lr,
                                        beta_1_power=b1p, beta_2_power=b2p, clip_mode=mode,
                                        clip=c, unscale=u, decay=decay, hyper=hyper, skip=skip,
                                        with_norms=True)

        def distributed(distribution, grads, variables, ms, vs, learning_rate):
            return distribution.extended.update(variables[0], update,
                                                args=(grads, variables, ms, vs, learning_rate),
                                                group=False)

        norm, norms = tf.__internal__.distribute.interim.maybe_merge_call(
            distributed, self._distribution_strategy, grads, variables, ms, vs, learning_rate)
        if isinstance(norm, tuple):  # one per device (the same values): the first's
            norm, norms = norm[0], norms[0]
        return norm, norms

    def _clip_summed(self, grads: list, variables: list) -> list:
        option = _clip_option(self)
        if option == "global_clipnorm":
            r = _ctf.clip_by_global_norm(grads, self.global_clipnorm, return_norms=True)
            self._record_norms(r.global_norm, r.tensor_norms, variables)
            return r.clipped
        if option == "clipnorm":
            clipped, norms = _ctf.clip_by_norm(grads, self.clipnorm, return_norms=True)
            self._record_norms(None, norms, variables)
            return clipped
        if option == "clipvalue":
            return _ctf.clip_by_value(grads, -self.clipvalue, self.clipvalue)
        return grads


_FUSED_CLASSES: dict = {}
_REGISTERED: dict = {}


def fused_class(cls: type) -> type:
    """The fused subclass of a Keras optimizer class (created and registered once).

    ``fused_class(keras.optimizers.Adam)`` is ``FusedAdam``, registered for Keras' saving as
    ``clipops>FusedAdam``. The subclasses of every optimizer in ``keras.optimizers`` exist once
    ``clipops.keras`` is imported, so a saved model loads after ``import clipops.keras``; for an
    optimizer class of your own, call this (or ``fused``) before ``keras.saving.load_model``.

    Args:
      cls: a subclass of ``keras.optimizers.Optimizer`` (not ``LossScaleOptimizer``: use
        ``FusedLossScaleOptimizer``).

    Returns:
      The fused class; ``cls`` itself if it is already fused.

    Raises:
      TypeError: ``cls`` is not a Keras optimizer class, or is a LossScaleOptimizer or a
        MultiOptimizer (which clips nothing itself: make its sub-optimizers fused).
      ValueError: another class of the same name was already made fused.
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)):
        raise TypeError(f"fused_class takes a keras.optimizers.Optimizer subclass, got {cls!r}")
    if issubclass(cls, _FusedClip) or cls is FusedLossScaleOptimizer:
        return cls
    if issubclass(cls, _LossScaleOptimizer):
        raise TypeError(f"{cls.__name__} is a LossScaleOptimizer: use "
                        "clipops.keras.fused(optimizer) or FusedLossScaleOptimizer")
    if _MultiOptimizer is not None and issubclass(cls, _MultiOptimizer):
        raise TypeError(_MULTI_MESSAGE.format(cls.__name__))
    made = _FUSED_CLASSES.get(cls)
    if made is not None:
        return made
    # clipops replaces these; a class's own version would be silently dropped
    replaced = [m for m in ("_clip_gradients", "_backend_apply_gradients")
                if getattr(cls, m) is not getattr(_KERAS_OPTIMIZER, m)]
    if replaced:
        raise TypeError(f"{cls.__qualname__} overrides {', '.join(replaced)}, which "
                        "clipops.keras replaces with its own (the clip after the cross-replica "
                        "sum); its override would be lost, so it cannot be fused")
    name = "Fused" + cls.__name__
    other = _REGISTERED.get(name)
    if other is not None:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} and {other.__module__}."
                         f"{other.__qualname__} would both be saved as clipops>{name}; "
                         "rename one of the classes")
    made = type(name, (_FusedClip, cls), {
        "__module__": __name__,
        "__doc__": f"``{cls.__module__}.{cls.__qualname__}`` whose clip (global_clipnorm, "
                   "clipnorm or clipvalue) runs after the cross-replica sum with clipops' fused "
                   "ops" + (", and with it the weight decay and the update of every variable "
                            "in one op (fuses_update; not with amsgrad)"
                            if getattr(cls, "update_step", None) in (_SGD.update_step,
                                                                     _ADAM.update_step) else
                            "; its update is Keras' own (clipops fuses SGD's, Adam's and "
                            "AdamW's)") + ". Made by clipops.keras.fused_class.",
    })
    keras.saving.register_keras_serializable(package="clipops", name=name)(made)
    setattr(sys.modules[__name__], name, made)  # `clipops.keras.FusedAdam`: pickle finds it
    _FUSED_CLASSES[cls] = made
    _REGISTERED[name] = cls
    return made


def is_fused(optimizer) -> bool:
    """True if ``optimizer`` clips with clipops (made by ``fused``)."""
    return isinstance(optimizer, (_FusedClip, FusedLossScaleOptimizer))


def fused(optimizer):
    """Makes an optimizer clip with clipops' fused op after the cross-replica sum, and fuses
    the update too for SGD, Adam and AdamW.

    For Keras' own ``SGD``, ``Adam`` and ``AdamW`` (not ``amsgrad``) the clip, the weight decay
    and the update of all variables become one op (``optimizer.fuses_update`` is True); other
    optimizers keep the fused clip and Keras' own update (``fuses_update`` False). See the
    module's docstring for the numerics.

    ``fused(keras.optimizers.Adam(1e-3, global_clipnorm=1.0))`` changes the optimizer's class to
    ``FusedAdam`` (``fused_class``) and returns the same object: everything it holds is kept,
    including what ``get_config`` does not record (``exclude_from_weight_decay``, a schedule
    object, its name). A ``LossScaleOptimizer`` becomes a ``FusedLossScaleOptimizer`` and its
    inner optimizer is made fused the same way. Use the result in
    ``model.compile(optimizer=...)`` or a custom loop (``apply_gradients``).

    Args:
      optimizer: a Keras 3 optimizer that has not been used yet (not built), with one of
        ``global_clipnorm`` (fused), ``clipnorm`` or ``clipvalue``.

    Returns:
      ``optimizer`` itself, now fused (unchanged if it already was).

    Raises:
      TypeError: ``optimizer`` is not a Keras 3 optimizer (e.g. a ``tf.keras``/Keras 2 one, or
        a class), or is a ``MultiOptimizer`` (make its sub-optimizers fused instead).
      ValueError: it sets no clip option, or it is already built (call ``fused`` before
        training). Nothing is changed when it raises.
    """
    if is_fused(optimizer):
        return optimizer
    if isinstance(optimizer, type):
        raise TypeError(f"fused takes an optimizer object, got the class {optimizer.__name__}; "
                        "use fused_class for classes")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            f"fused takes a Keras 3 optimizer (keras.optimizers.Optimizer), got "
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__}")
    if _MultiOptimizer is not None and isinstance(optimizer, _MultiOptimizer):
        raise TypeError(_MULTI_MESSAGE.format(type(optimizer).__name__))
    inner = optimizer.inner_optimizer if isinstance(optimizer, _LossScaleOptimizer) else None
    # every check before any change: a refused optimizer is left as it was
    for opt in (optimizer, inner):
        if opt is not None and opt.built:
            raise ValueError(f"optimizer {opt.name!r} is already built (it has state); call "
                             "clipops.keras.fused on it before it is used")
    if inner is not None and type(optimizer) is not _LossScaleOptimizer:
        # a subclass's own overrides would be dropped by the class change
        raise TypeError(f"fused handles keras.optimizers.LossScaleOptimizer itself, not its "
                        f"subclass {type(optimizer).__module__}.{type(optimizer).__qualname__}")
    target = inner if inner is not None else optimizer
    if not is_fused(target):
        if _clip_option(target) is None:
            raise ValueError(
                f"optimizer {target.name!r} ({type(target).__name__}) sets none of "
                "global_clipnorm, clipnorm or clipvalue, so there is nothing for clipops to "
                "clip; create it with one, e.g. keras.optimizers.Adam(1e-3, global_clipnorm=1.0)")
        target.__class__ = fused_class(type(target))
    if inner is not None:
        optimizer.__class__ = FusedLossScaleOptimizer
    return optimizer


def _sum_across_replicas(optimizer, grads: list, variables) -> list:
    """The gradients summed across replicas (TFOptimizer's all-reduce; unchanged outside
    tf.distribute or with one replica)."""
    variables = variables if variables is not None else optimizer._trainable_variables
    pairs = optimizer._all_reduce_sum_gradients(list(zip(grads, variables)))
    return [g for g, _ in pairs]


@keras.saving.register_keras_serializable(package="clipops")
class FusedLossScaleOptimizer(_LossScaleOptimizer):
    """Keras' ``LossScaleOptimizer`` with the non-finite check, the unscale and the clip fused
    into one op: one pass over the gradients, one launch on a GPU.

    Keras 3 checks every gradient for inf/NaN (one pass, ~2N ops), divides each by the loss
    scale (another pass), then clips (the norm and the scale, a third). Here, after the
    cross-replica sum, with loss scale ``s``:

      - with ``global_clipnorm = c``: ``clip_by_global_norm(scaled_grads, c, unscale=1/s,
        nonfinite="skip", return_norms=True)``. The op sums the squares of the scaled
        gradients, takes the norm of the unscaled ones (``sqrt(sum) / s``, rounded once), and
        writes ``g * (c * min(1/n, 1/c) / s)``: unscaled and clipped in the one pass. Keras'
        loss scale is a power of two, so this is bit for bit Keras' unscale-then-clip on a
        step that is not clipped (on the CPU, subnormal results aside: the op keeps them, TF's
        CPU divide flushes them to zero). The step is skipped (weights unchanged, scale halved,
        as Keras does) when that norm is not finite: an inf or NaN anywhere makes it so (a
        finite gradient whose unscaled norm overflows float32 is skipped too; Keras would apply
        NaN updates there).
      - without ``global_clipnorm``, or with ``gradient_accumulation_steps`` (the clip must
        wait for the accumulated gradient), the same op only unscales (``use_norm=1``, clip 1:
        the scale is exactly ``1/s``) and returns each gradient's own norm; the step is skipped
        when one of them is not finite. The inner optimizer clips later, as it would.

    ``clipops.keras.fused(loss_scale_optimizer)`` gives an existing LossScaleOptimizer this
    class (and its inner optimizer a fused one) in place, so nothing here may depend on state
    made in ``__init__``.

    Args: those of ``keras.optimizers.LossScaleOptimizer``; ``inner_optimizer`` is made fused
    (``clipops.keras.fused``) if it is not.
    """

    def __init__(self, inner_optimizer, initial_scale=2.0 ** 15, dynamic_growth_steps=2000,
                 name=None, **kwargs):
        if not is_fused(inner_optimizer):
            inner_optimizer = fused(inner_optimizer)
        super().__init__(inner_optimizer, initial_scale=initial_scale,
                         dynamic_growth_steps=dynamic_growth_steps, name=name, **kwargs)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        grads = _sum_across_replicas(self.inner_optimizer, list(grads), trainable_variables)
        fused = self._fused_update(grads, trainable_variables)
        if fused is not None:  # one op: unscale, check, clip, weight decay and update
            finite, norm, norms = fused
            unscaled, clipped, updated = grads, True, True
        else:
            unscaled, finite, norm, norms, clipped = self._unscale(grads, trainable_variables)
            updated = False
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            keras.ops.cond(finite,
                           lambda: self._apply_finite(unscaled, trainable_variables, norm, norms,
                                                      clipped, updated),
                           self._stateful_handle_non_finite_grads)
            return

        def cross_replica(distribution, unscaled, finite, norm, norms):
            # computed from the summed gradients: the same on every replica
            finite = distribution.experimental_local_results(finite)[0]

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self._apply_finite,
                    args=(unscaled, trainable_variables, norm, norms, clipped, updated))

            # a cond whose branch calls merge_call must be in cross-replica context (as Keras)
            keras.ops.cond(finite, apply_fn, self._stateful_handle_non_finite_grads)

        tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(unscaled, finite, norm, norms))

    def _fused_update(self, grads: list, trainable_variables):
        """When the inner optimizer fuses its update (SGD, Adam, AdamW with global_clipnorm):
        the one op that unscales, clips, decays and updates every variable, and writes nothing
        when the norm is not finite; returns (finite, norm, per-tensor norms). None when the
        step needs the separate unscale (_unscale): gradient accumulation, a
        loss_scale_factor, clipnorm or clipvalue (which clip the unscaled gradients one by
        one), variables overwritten with their gradients, or variables the op cannot take."""
        inner = self.inner_optimizer
        variables = trainable_variables if trainable_variables is not None \
            else self._trainable_variables
        rule = _update_rule(inner)
        if (rule is None or _clip_option(inner) != "global_clipnorm"
                or inner.gradient_accumulation_steps or inner.loss_scale_factor is not None):
            return None
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        if not pairs or any(self._overwrite_variable_with_gradient(v) for _, v in pairs):
            return None
        present, used = [g for g, _ in pairs], [v for _, v in pairs]
        if not inner._can_fuse_update(present, [v.value if isinstance(v, keras.Variable) else v
                                                for v in used]):
            return None
        inverse = tf.math.reciprocal(tf.cast(self.dynamic_scale, tf.float32))  # exact: 2^k
        norm, norms = inner._fused_update(rule, present, used, inner.learning_rate, clip=True,
                                          unscale=inverse, skip=True)
        return tf.math.is_finite(norm), tf.cast(norm, tf.float32), tf.cast(norms, tf.float32)

    def _unscale(self, grads: list, trainable_variables):
        """The one fused op: (unscaled gradients, finite, global norm, per-tensor norms of the
        present gradients, whether they are clipped too). See the class docstring."""
        inner = self.inner_optimizer
        variables = trainable_variables if trainable_variables is not None \
            else self._trainable_variables
        keep = [i for i, (g, v) in enumerate(zip(grads, variables))
                if g is not None and not self._overwrite_variable_with_gradient(v)]
        values = [grads[i] for i in keep]
        # Keras' clip sees every non-None gradient; overwrite-with-gradient ones are not
        # clipped by it, so clip here only when there are none
        clip_here = (_clip_option(inner) == "global_clipnorm"
                     and not inner.gradient_accumulation_steps
                     and len(keep) == sum(g is not None for g in grads))
        inverse = tf.math.reciprocal(tf.cast(self.dynamic_scale, tf.float32))  # exact: 2^k
        if not values:
            return list(grads), tf.constant(True), tf.zeros(()), tf.zeros((0,)), clip_here
        if clip_here:
            r = _ctf.clip_by_global_norm(values, float(inner.global_clipnorm), unscale=inverse,
                                         nonfinite="skip", return_norms=True)
            finite = tf.logical_not(r.skipped)
        else:
            r = _ctf.clip_by_global_norm(values, 1.0, use_norm=1.0, unscale=inverse,
                                         return_norms=True)
            finite = tf.reduce_all(tf.math.is_finite(r.tensor_norms))
        kept = set(keep)
        others = [g for i, g in enumerate(grads) if g is not None and i not in kept]
        if others:  # overwrite-with-gradient ones (float8 scales): checked, as Keras does
            finite = tf.logical_and(finite, tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in others]))
        unscaled = list(grads)
        for i, v in zip(keep, r.clipped):
            unscaled[i] = v
        return (unscaled, finite, tf.cast(r.global_norm, tf.float32),
                tf.cast(r.tensor_norms, tf.float32), clip_here)

    def _apply_finite(self, unscaled, trainable_variables, norm, norms, clipped: bool,
                      updated: bool = False):
        inner = self.inner_optimizer
        variables = trainable_variables if trainable_variables is not None \
            else self._trainable_variables
        # updated: the weights are already updated; inner.apply() does the rest of its step
        # (EMA, constraints, the iteration count) on this finite step only, as Keras' would
        with _prepared(inner, summed=True, clipped=clipped, updated=updated):
            inner.apply(list(unscaled), trainable_variables=trainable_variables)
        if clipped:  # the norms the clip used, of the unscaled gradients
            inner._record_norms(norm, norms, [v for g, v in zip(unscaled, variables)
                                              if g is not None])

        def upscale():
            self.step_counter.assign(0)
            self.dynamic_scale.assign(self.dynamic_scale * 2.0)

        def increment():
            self.step_counter.assign_add(1)

        keras.ops.cond(keras.ops.equal(self.step_counter, self.dynamic_growth_steps - 1),
                       upscale, increment)


_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class GlobalNormLogger(keras.callbacks.Callback):
    """Writes each training step's gradient norms to TensorBoard: the global one and, with
    ``per_tensor=True``, each trainable variable's.

    The norms are the ones the fused clip computed (of the gradients summed across replicas,
    unscaled under a loss scale; see ``last_global_norm`` and ``last_tensor_norms``), read from
    the optimizer after each batch and written with ``tf.summary`` (TensorBoard's scalar
    plugin; the tensorboard package is needed to view them, not to write them) at step
    ``optimizer.iterations``, into ``log_dir/train``, where ``keras.callbacks.TensorBoard(log_dir)``
    writes its own training scalars. Tags: ``global_gradient_norm``, and
    ``gradient_norm/<variable path>`` (e.g. ``gradient_norm/sequential/dense/kernel``). Steps
    skipped by a loss-scale overflow and micro-steps of gradient accumulation repeat the last
    norms; a variable without a gradient in a step logs 0.

    Args:
      log_dir: the TensorBoard log directory.
      update_freq: write every ``update_freq`` batches (1: every batch). With
        ``steps_per_execution = k`` Keras calls back every k steps: the norms are the k-th's.
      per_tensor: also write each variable's own gradient norm.

    Raises (at the start of training):
      TypeError: the model's optimizer is not fused (``clipops.keras.fused``).
      ValueError: it clips by ``clipvalue``, which computes no norm.
    """

    def __init__(self, log_dir, update_freq: int = 1, per_tensor: bool = True):
        super().__init__()
        if not isinstance(update_freq, int) or isinstance(update_freq, bool) or update_freq < 1:
            raise ValueError(f"update_freq must be an int >= 1, got {update_freq!r}")
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.per_tensor = bool(per_tensor)
        self._writer = None
        self._optimizer = None
        self._batches = 0

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        inner = optimizer.inner_optimizer if isinstance(optimizer, _LossScaleOptimizer) \
            else optimizer
        if not isinstance(inner, _FusedClip):
            raise TypeError("GlobalNormLogger reads the norms that clipops' fused clip records: "
                            "compile the model with optimizer=clipops.keras.fused(...)")
        if _clip_option(inner) not in ("global_clipnorm", "clipnorm"):
            raise ValueError("GlobalNormLogger needs an optimizer that clips by global_clipnorm "
                             f"or clipnorm (which compute norms); {inner.name!r} uses "
                             f"{_clip_option(inner)}")
        self._optimizer = inner
        self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        opt = self._optimizer
        if self._batches % self.update_freq or not opt.built:
            return
        step = int(opt.iterations)
        with self._writer.as_default():
            # tf.summary.write with TensorBoard's scalar metadata: what tf.summary.scalar
            # writes, without needing the tensorboard package to write it
            tf.summary.write("global_gradient_norm", tf.cast(opt.last_global_norm.value, tf.float32),
                             step=step, metadata=_SCALAR_METADATA)
            if self.per_tensor:
                norms = opt.last_tensor_norms.numpy()
                for v, n in zip(opt._trainable_variables, norms):
                    tf.summary.write(f"gradient_norm/{v.path}", tf.constant(n, tf.float32),
                                     step=step, metadata=_SCALAR_METADATA)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


# Every Keras optimizer's fused class exists at import, so saved models load after
# `import clipops.keras` alone (a MultiOptimizer has none: fused_class refuses it).
for _name in dir(keras.optimizers):
    _cls = getattr(keras.optimizers, _name)
    if (isinstance(_cls, type) and issubclass(_cls, keras.optimizers.Optimizer)
            and _cls is not keras.optimizers.Optimizer
            and not issubclass(_cls, _LossScaleOptimizer)
            and not (_MultiOptimizer is not None and issubclass(_cls, _MultiOptimizer))):
        fused_class(_cls)
del _name, _cls


# ---- Keras versions: the behaviour check -------------------------------------------------

_U32 = 2.0 ** -24
_SHAPES = ((5,), (3, 4))  # check_keras' weights: 17 elements


def _clipped_rtol(terms: int) -> float:
    """How far (relative) a clipped update may be from Keras' when the norm sums `terms`
    squares: each side sums them in its own order (<= (terms - 1)u relative for positive terms)
    and takes a square root (u/2), so the two norms differ by <= (2 terms - 1)u; the scale
    c * (1/n), g * s and lr * (g s) round once each per side (6u), and 2u spare."""
    return (2 * terms + 7) * _U32


def _keras_step_differs(before, fused_after, keras_after, clipped: bool,
                        terms: int = 17) -> str:
    """'' when one step's new weights agree, else what differs: the same bits when the step is
    not clipped; when it is, the update within _clipped_rtol(terms) of Keras' and 2 ulp of the
    weight (w0 - update rounds once per side, and the update read back as w0 - w1 once more)."""
    for i, (w0, wf, wk) in enumerate(zip(before, fused_after, keras_after)):
        if not clipped:
            if wf.tobytes() != wk.tobytes():
                return f"weight {i} differs from Keras' in {int(np.sum(wf != wk))} elements"
            continue
        tol = (np.abs(w0.astype(np.float64) - wk) * _clipped_rtol(terms)
               + 2 * np.spacing(np.maximum(np.abs(w0), np.abs(wk))))
        over = np.abs(wf.astype(np.float64) - wk) / tol
        if not over.max() <= 1.0:
            return f"weight {i} is off Keras' by {over.max():.3g} times the clip's rounding"
    return ""


def _traced_ops(optimizer, grads, variables) -> set:
    """The op types of one traced apply (branch bodies included); the optimizer is built."""
    fn = tf.function(lambda *g: optimizer.apply(list(g), variables))
    graph_def = fn.get_concrete_function(*grads).graph.as_graph_def()
    return {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function
                                              for n in f.node_def}


def _behaviour_problems(rng: np.random.Generator) -> list:
    """check_keras' cases; see there."""
    problems = []
    w0 = [rng.standard_normal(s).astype(np.float32) for s in _SHAPES]

    def with_norms(*norms):
        """Fresh random gradients, tensor i of norm norms[i] (or all of global norm norms[0])."""
        g = [rng.standard_normal(s) for s in _SHAPES]
        if len(norms) == 1:
            total = np.sqrt(sum(np.sum(x * x) for x in g))
            return [(x * (norms[0] / total)).astype(np.float32) for x in g]
        return [(x * (n / np.linalg.norm(x))).astype(np.float32) for x, n in zip(g, norms)]

    def pair(make):
        """(fused, keras) optimizers from `make`, each with its own copy of the weights."""
        out = []
        for fuse in (True, False):
            variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(w0)]
            opt = make(variables)
            out.append((fused(opt) if fuse else opt, variables))
        return out

    def compare(case, make, steps, clipped, records_norms=False, op=None, fuses_update=None):
        (fo, fv), (ko, kv) = pair(make)
        for i, grads in enumerate(steps):
            before = [v.numpy() for v in kv]
            for opt, variables in ((fo, fv), (ko, kv)):
                opt.apply([tf.constant(g) for g in grads], variables)
            problem = _keras_step_differs(before, [v.numpy() for v in fv],
                                          [v.numpy() for v in kv], clipped[i])
            if not problem and not clipped[i]:  # the state too: m, v, iterations
                problem = next((f"optimizer variable {a.path} differs from Keras'"
                                for a, b in zip(fo.variables, ko.variables)
                                if a.numpy().tobytes() != b.numpy().tobytes()), "")
            if problem:
                problems.append(f"{case}, step {i}: {problem}")
                return fo, ko
            if records_norms:  # each gradient's norm, from the fused clip's own pass
                got = fo.last_tensor_norms.numpy().astype(np.float64)
                want = np.array([np.linalg.norm(g.astype(np.float64)) for g in grads])
                # one side's rounding only: _clipped_rtol is looser
                if not np.all(np.abs(got - want) <= _clipped_rtol(17) * want):
                    problems.append(f"{case}, step {i}: the fused clip recorded the norms {got}, "
                                    f"not {want}: it did not run")
                    return fo, ko
        if [v.path for v in fo.variables] != [v.path for v in ko.variables]:
            problems.append(f"{case}: the fused optimizer's variables "
                            f"{[v.path for v in fo.variables]} are not Keras' "
                            f"{[v.path for v in ko.variables]} (checkpoints would not load)")
        inner = getattr(fo, "inner_optimizer", fo)
        if fuses_update is not None and inner.fuses_update != fuses_update:
            problems.append(f"{case}: fuses_update is {inner.fuses_update}, not {fuses_update}")
        if op is not None:
            ops = _traced_ops(fo, [tf.constant(g) for g in steps[0]], fv)
            if op not in ops:
                problems.append(f"{case}: a traced step has no {op}")
            # the fused update replaces Keras' per-variable update ops
            left = ops & {"AssignSubVariableOp", "AssignAddVariableOp"}
            if op == "ClipopsFusedUpdate" and left:
                problems.append(f"{case}: a traced step still has Keras' update ops {left}")
        return fo, ko

    def sgd(**kw):
        return lambda variables: keras.optimizers.SGD(0.5, name="clipops_check", **kw)

    # SGD fuses its update: the clip, the weight decay and the update in one op.
    # global_clipnorm: a step under the clip (Keras' bits), one over it (the norm's rounding)
    compare("global_clipnorm", sgd(global_clipnorm=1.0), [with_norms(0.5), with_norms(3.0)],
            clipped=[False, True], records_norms=True, op="ClipopsFusedUpdate",
            fuses_update=True)
    # clipnorm: one tensor under, one over; judged as clipped (the looser bound) as a whole
    compare("clipnorm", sgd(clipnorm=1.0), [with_norms(0.5, 3.0)], clipped=[True],
            records_norms=True, op="ClipopsFusedUpdate")
    compare("clipvalue", sgd(clipvalue=0.3), [with_norms(2.0)], clipped=[False],
            op="ClipopsFusedUpdate")
    # the fused update's rules: momentum with nesterov and weight decay, Adam (its powers from
    # `iterations`), over steps whose state carries over; none clipped (Keras' bits)
    compare("SGD(momentum, nesterov, weight_decay)",
            sgd(momentum=0.9, nesterov=True, weight_decay=0.1, global_clipnorm=1.0),
            [with_norms(0.5), with_norms(0.7), with_norms(0.3)], clipped=[False] * 3,
            op="ClipopsFusedUpdate", fuses_update=True)
    compare("Adam", lambda variables: keras.optimizers.Adam(0.1, global_clipnorm=1.0,
                                                            name="clipops_check"),
            [with_norms(0.5), with_norms(0.7), with_norms(0.3)], clipped=[False] * 3,
            op="ClipopsFusedUpdate", fuses_update=True)
    # an optimizer whose update clipops does not fuse keeps the fused clip and Keras' update
    compare("RMSprop (the fused clip only)",
            lambda variables: keras.optimizers.RMSprop(0.1, global_clipnorm=1.0,
                                                       name="clipops_check"),
            [with_norms(0.5), with_norms(0.7)], clipped=[False] * 2, records_norms=True,
            op="ClipopsClipByGlobalNorm", fuses_update=False)
    # state that is not in the config: weight decay exclusions, by name and by variable
    for how in ("var_names", "var_list"):
        def adamw(variables, how=how):
            opt = keras.optimizers.AdamW(0.1, weight_decay=0.5, global_clipnorm=10.0,
                                         name="clipops_check")
            if how == "var_names":
                opt.exclude_from_weight_decay(var_names=["w1"])
            else:
                opt.exclude_from_weight_decay(var_list=[variables[1]])
            return opt
        compare(f"AdamW exclude_from_weight_decay({how}=...)", adamw,
                [with_norms(1.0), with_norms(1.0)], clipped=[False, False],
                op="ClipopsFusedUpdate", fuses_update=True)
    compare("gradient_accumulation_steps=2", sgd(global_clipnorm=1.0,
                                                 gradient_accumulation_steps=2),
            [with_norms(0.5), with_norms(0.5), with_norms(3.0), with_norms(3.0)],
            clipped=[False, False, False, True])
    # the loss scale: an unclipped step (Keras' bits), an overflow (skipped, scale halved),
    # a clipped one
    scale = 2.0 ** 10
    steps = [[g * np.float32(scale) for g in with_norms(n)] for n in (0.5, 1.0, 3.0)]
    steps[1][0][2] = np.inf
    fo, ko = compare("LossScaleOptimizer", lambda variables: _LossScaleOptimizer(
        keras.optimizers.SGD(0.5, global_clipnorm=1.0, name="clipops_check"),
        initial_scale=scale, name="clipops_check_lso"), steps, clipped=[False, False, True])
    if not isinstance(fo, FusedLossScaleOptimizer):
        problems.append(f"fused(LossScaleOptimizer) is a {type(fo).__name__}")
    elif float(fo.dynamic_scale.numpy()) != float(ko.dynamic_scale.numpy()) or \
            float(ko.dynamic_scale.numpy()) != scale / 2:
        problems.append(f"LossScaleOptimizer: the loss scale is {fo.dynamic_scale.numpy()}, "
                        f"Keras' {ko.dynamic_scale.numpy()}, after one overflow from {scale}")
    return problems


def check_keras(seed: int = 0) -> list:
    """Runs a tiny step of each fused path against the installed Keras' own optimizer.

    ``global_clipnorm``, ``clipnorm`` and ``clipvalue`` on SGD; the fused update's rules (SGD
    with momentum, nesterov and weight decay; Adam over three steps; AdamW with weight-decay
    exclusions by name and by variable); an optimizer whose update is not fused (RMSprop: the
    fused clip only); ``gradient_accumulation_steps`` and a ``LossScaleOptimizer`` (with an
    overflow step): each on two small random weights, eagerly on one device (in a thread of its
    own, outside any strategy scope or dtype policy of the caller). Each step must give Keras'
    bits where nothing is clipped (weights and optimizer state) and agree within the norm's
    rounding where it is; the fused op must have run (its recorded norms, its op in a traced
    step, and no Keras update op left beside the fused update) and the optimizer's variables
    must be Keras' (checkpoints interchange).

    Args:
      seed: the random weights' and gradients' seed.

    Returns:
      What differs, one line each; empty when this Keras behaves as clipops.keras expects.
    """
    result = []

    def run():
        _PREPARED.checking = True  # this thread's fused optimizers skip the version check
        try:
            result.extend(_behaviour_problems(np.random.default_rng(seed)))
        except Exception as e:  # noqa: BLE001 - a Keras that breaks the check is a finding
            result.append(f"the check raised {type(e).__name__}: {e}")

    thread = threading.Thread(target=run, name="clipops-check-keras")
    thread.start()
    thread.join()
    return result


def _check_keras_version(version: str | None = None) -> None:
    """Warns when `version` (Keras') is not in TESTED_KERAS; _FusedClip.build then runs
    check_keras() once before the first fused optimizer is built."""
    version = keras.__version__ if version is None else version
    if _tested(version):
        return
    warnings.warn(
        f"clipops.keras is tested with Keras {', '.join(TESTED_KERAS)}, not {version}: it "
        "overrides private Keras methods, so the first fused optimizer to be built runs "
        "clipops.keras.check_keras() (a tiny step against Keras' own) and refuses to train "
        "if they differ. pip install 'clipops[keras]' installs a tested Keras.",
        UserWarning, stacklevel=3)
    _VERSION_CHECK["needed"] = True


# {"needed": whether this Keras is untested, "problems": check_keras()' result once run}
_VERSION_CHECK: dict = {"needed": False, "problems": None}
_VERSION_LOCK = threading.Lock()


def _require_keras_behaviour() -> None:
    """On an untested Keras: check_keras() once per process; raises if it found a difference."""
    if not _VERSION_CHECK["needed"] or getattr(_PREPARED, "checking", False):
        return
    with _VERSION_LOCK:
        if _VERSION_CHECK["problems"] is None:
            _VERSION_CHECK["problems"] = check_keras()
    if _VERSION_CHECK["problems"]:
        raise RuntimeError(
            f"clipops.keras does not work with Keras {keras.__version__} (untested; tested: "
            f"{', '.join(TESTED_KERAS)}): a fused step differs from Keras' own: "
            + "; ".join(_VERSION_CHECK["problems"]))


_check_keras_version()
