#!/usr/bin/env python
"""The fused clip + AdamW step on the CPU: clipops against Keras 3 and TF's raw ops.

One optimizer step -- the gradients clipped by their global norm, then Keras'
AdamW update of every variable (decoupled weight decay, then Adam) -- on two
parameter lists (bench/cases.py):

  mnist     the MNIST MLP 784-512-256-10: 6 tensors, 535,818 parameters
  resnet50  torchvision ResNet-50's parameter shapes: 161 tensors, 25,557,032

by these rows, eagerly and in tf.function where they run through TensorFlow:

  keras_eager, keras_function, keras_xla
      keras.optimizers.AdamW(global_clipnorm=c).apply(grads, variables), eagerly,
      in tf.function and in tf.function(jit_compile=True)
  tf_raw_eager, tf_raw_function
      what a TF user writes without Keras: tf.clip_by_global_norm, then per variable
      Keras' decoupled weight decay (p -= p * wd * lr) and
      tf.raw_ops.ResourceApplyAdam (powers by tf.pow, as Keras)
  clipops_numpy
      clipops.numpy.adamw_update: the fused CPU kernel on NumPy arrays, in place
  clipops_eager, clipops_function
      the TF op clipops.adamw_update over tf.Variables (where this clipops has it)
  fused_eager, fused_function, fused_xla
      clipops.keras.fused(AdamW(global_clipnorm=c)).apply(...): clipops' clip, and
      its fused update where clipops.keras fuses it (read from the traced ops and
      shown as "update fused" or "clip fused" beside the rows)

and model.fit on the MNIST MLP (batch 256, sparse cross-entropy), Keras' AdamW
against fused(AdamW), stepping in lockstep: the verdict is the paired
difference of their step times with a bootstrap 95% interval.

THE FLOOR. A fused clip + AdamW step must read each gradient twice (the norm
pass, then the update: the global norm must be known before any element is
updated) and read and write the parameter and both moments once: 8 + 12 + 12 =
32 bytes per float32 parameter. The floor is those bytes at the machine's copy
bandwidth (libc memmove, bytes read + written, common.copy_bandwidth_gbs)
measured right before and right after each case (the higher kept: the stricter
floor); "x floor" is a row's time over it. Every row is held to the same floor:
the work's minimum, not what the row itself moves (Keras' separate ops move
several times more).

VALIDATION, before any timing. From one state (random p, m, v; the step after
ITERATIONS earlier ones) every row takes one step with a binding clip (half the
norm), and:
  - its p, m, v are checked against a float64 evaluation of Keras' formula, each
    element within an error bound derived from the float32 operations (see
    error_bounds): a wrong order, a wrong constant or a lost step fails it;
  - clipops' rows (and the fused Keras rows) must equal, bit for bit, Keras'
    own AdamW update (eager, no clip) applied to clipops' clipped gradients
    (clipops.numpy.clip_by_global_norm): the update is Keras' op for op, and
    the clip is clipops' (Keras' own clip rounds the norm differently);
  - which other rows equal Keras' eager row bit for bit is reported.
A failed check skips the case's timing and makes the exit status 1; model.fit's
two models must end a few unclipped steps with bit-identical weights.

TIMING. In rounds: each round runs a block of calls of every row in turn (an
untimed call first where calls are short), so a burst of load from elsewhere
hits every row alike; medians, p10 and p90 over all calls; the first call
(tracing, XLA's compile) is timed apart. Each timed call continues from the
state the previous one left, as training does: the element-wise work does not
depend on the values, and after timing every row's state is checked to hold no
NaN, inf or subnormal value (a subnormal operand would take a slow path). The
copy bandwidth is measured around each case; the 1-minute load average at the
start and end of each case is recorded (2-core shared VMs: see docs/benchmarks.md).

Writes optim.json, optim.md and optim.png to bench/out/ (git ignores it) or
--out DIR; --replot FILE redraws the markdown and the plot from a JSON file.

    python bench/optim.py                  # everything (several minutes on 2 cores)
    python bench/optim.py --smoke          # toy sizes, seconds of timing (CI)
    python bench/optim.py --cases resnet50 --no-fit

Exit status: 0 when every check passed (missed targets are reported, not
errors), 1 when a validation failed, 2 when no MNIST data is available for the
model.fit rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cases import Case, mnist_shapes, resnet50_shapes
from cases import case as make_case
from common import (OUT, copy_bandwidth_gbs, import_tensorflow, load_average, machine_info,
                    paired_ci, step_clock, summarize, wants_verbose, write_json)
from report import (Progress, can_plot, machine_line, ms, pct, pyplot, save, table, verdict,
                    verdict_kind)

# ---- the step's hyperparameters (Keras' AdamW defaults but the learning rate) --------

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.004
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
ITERATIONS = 4          # the validated step is Keras' 5th: bias correction still matters
DATA_SCALE = 1e-3       # gradients ~ N(0, 1e-3)
FLOOR_BYTES_PER_PARAM = 32  # g read twice, p, m, v read and written once (float32)

XLA_MAX_TENSORS = 1000  # as micro.py: jit_compile of more takes minutes
SMOKE_XLA_MAX_TENSORS = 10  # a smoke run compiles only the MNIST list's step
MIN_REPEATS = 5
REWARM_BELOW_S = 5e-3   # a call this short gets an untimed call before each block
CASE_BANDWIDTH_REPEATS = 3

# model.fit on the MNIST MLP
FIT_BATCH = 256
FIT_CLIP = 1.0          # clips now and then early in training (the counts are reported)
FIT_VALIDATE_CLIP = 2.0 ** 20  # never binding, a power of two: unclipped steps are exact
FIT_VALIDATE_STEPS = 5
FIT_CHUNK = 25          # steps per model.fit call; the two models alternate per call

U = 2.0 ** -24          # float32's unit roundoff (round to nearest)
# The norm's relative error against float64, as micro.py holds every clip's norm:
# a float32 sum of positive squares in a tree or blocked order errs by at most
# (its depth) * U; 1e-5 = 168 U covers the depth of TF's, Keras' and clipops'
# orders on these lists (clipops: float lanes of 16 terms, then float64).
NORM_RTOL = 1e-5
BOUND_SAFETY = 2.0      # the first-order bounds of error_bounds, with room for second-order terms

tf, _ = import_tensorflow(verbose=wants_verbose(__name__))
import keras  # noqa: E402

import clipops  # noqa: E402
import clipops.keras as clipops_keras  # noqa: E402
import clipops.numpy as cnp  # noqa: E402

# The clip ops of clipops' TF front end: any other clipops op in a traced step is the update.
CLIP_OPS = {"ClipopsClipByGlobalNorm", "ClipopsGlobalNorm", "ClipopsClipByNorm",
            "ClipopsClipByValue"}


# ---- the cases and their data ------------------------------------------------------

def build_cases(smoke: bool) -> list[Case]:
    """The MNIST and ResNet-50 lists; smoke: ResNet-50's structure at toy widths."""
    resnet = resnet50_shapes(8, 100) if smoke else resnet50_shapes()
    return [make_case("mnist", "MNIST MLP 784-512-256-10, float32", mnist_shapes()),
            make_case("resnet50", "ResNet-50-like: torchvision ResNet-50 parameter shapes, "
                      "float32", resnet)]


@dataclass
class CaseData:
    """A case's gradients and the state every row starts validation from."""
    case: Case
    grads: list[np.ndarray]
    params: list[np.ndarray]
    momentums: list[np.ndarray]
    velocities: list[np.ndarray]
    norm64: float
    clip: float  # half the norm, as a float32 value: every step clips


def make_data(case: Case, seed: int) -> CaseData:
    """Fresh random gradients and state: p ~ N(0, 0.05), m ~ N(0, 1e-3) (a few steps
    of gradients ~1e-3 in), v ~ |N(0, 1e-6)| (squares of them)."""
    rng = np.random.default_rng(seed)
    draw = lambda scale: [rng.standard_normal(s, dtype=np.float32) * np.float32(scale)  # noqa: E731
                          for s in case.shapes]
    grads, params, momentums = draw(DATA_SCALE), draw(0.05), draw(DATA_SCALE)
    velocities = [np.abs(v) for v in draw(DATA_SCALE ** 2)]
    norm = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64)))
                         for g in grads))
    return CaseData(case, grads, params, momentums, velocities, norm, float(np.float32(norm / 2)))


# ---- the float64 reference and its error bounds ----------------------------------------

@dataclass(frozen=True)
class Constants:
    """An implementation's float32 constants of the step, as float64 numbers."""
    lr: float
    wd: float
    c1: float   # 1 - beta_1 as the implementation makes it
    c2: float
    eps: float
    b1p: float  # beta_1^t, correctly rounded to float32 (implementations: within 1 ulp)
    b2p: float


def keras_constants(step: int) -> Constants:
    """Keras' AdamW: 1 - beta in Python's double, then float32; the powers float32."""
    f = lambda x: float(np.float32(x))  # noqa: E731
    return Constants(f(LEARNING_RATE), f(WEIGHT_DECAY), f(1 - BETA_1), f(1 - BETA_2), f(EPSILON),
                     f(f(BETA_1) ** step), f(f(BETA_2) ** step))


def raw_op_constants(step: int) -> Constants:
    """ResourceApplyAdam takes beta_1, beta_2 and computes 1 - beta in float32."""
    k = keras_constants(step)
    f32 = np.float32
    return Constants(k.lr, k.wd, float(f32(1) - f32(BETA_1)), float(f32(1) - f32(BETA_2)), k.eps,
                     k.b1p, k.b2p)


def error_bounds(p, g, m, v, *, scale: float, k: Constants) -> tuple[tuple, tuple]:
    """Keras' AdamW step of one tensor in float64, and a first-order bound on how far
    a float32 evaluation of the same formula may be from it, element by element.

    The formula, op for op: g' = g * scale (the clip); q = p - (p * wd) * lr;
    m' = m + (g' - m) * c1; v' = v + (g' * g' - v) * c2;
    p' = q - (m' * alpha) / (sqrt(v') + eps), alpha = (lr * sqrt(1 - b2p)) / (1 - b1p).
    Each float32 op adds at most U of its result (IEEE round to nearest); an input's
    error carries through with the op's derivative. Beyond that: the scale's relative
    error (the norm's NORM_RTOL, plus the three roundings of clip * (1 / norm) and
    g * scale), and the powers' (each within 1 ulp of the correctly rounded float32,
    as TF's powf and clipops' power_by_squaring are; 1 - b2p cancels, which amplifies
    that ulp by b2p / (1 - b2p): ~200 at step 5).

    Returns:
      ((p', m', v'), (bound_p, bound_m, bound_v)), float64 arrays.
    """
    p, g, m, v = (np.asarray(a, np.float64) for a in (p, g, m, v))
    a = np.abs
    gs = g * scale
    e_g = a(gs) * (NORM_RTOL + 3 * U)
    t1 = gs - m
    t2 = t1 * k.c1
    m1 = m + t2
    e_m = k.c1 * (e_g + U * a(t1)) + U * a(t2) + U * a(m1)
    sq = gs * gs
    t3 = sq - v
    t4 = t3 * k.c2
    v1 = v + t4
    e_v = k.c2 * (2 * a(gs) * e_g + U * sq + U * a(t3)) + U * a(t4) + U * a(v1)
    d = p * k.wd * k.lr
    q = p - d
    e_q = 2 * U * a(d) + U * a(q)
    alpha = k.lr * math.sqrt(1 - k.b2p) / (1 - k.b1p)
    ulp = lambda x: float(np.spacing(np.float32(x)))  # noqa: E731
    e_alpha = alpha * (4 * U + 0.5 * ulp(k.b2p) / (1 - k.b2p) + ulp(k.b1p) / (1 - k.b1p))
    num = m1 * alpha
    e_num = e_m * alpha + a(m1) * e_alpha + U * a(num)
    r = np.sqrt(v1)
    e_r = np.where(r > 0, e_v / (2 * np.where(r > 0, r, 1)), np.sqrt(e_v)) + U * r
    den = r + k.eps
    e_den = e_r + U * den
    upd = num / den
    e_upd = e_num / den + a(upd) * e_den / den + U * a(upd)
    p1 = q - upd
    e_p = e_q + e_upd + U * a(p1)
    return (p1, m1, v1), (e_p, e_m, e_v)


def check_against_f64(d: CaseData, got: tuple[list, list, list], k: Constants) -> dict:
    """One step's p, m, v against the float64 reference; the worst error over its bound."""
    scale = min(1.0, d.clip / d.norm64)
    worst, over = 0.0, 0
    for i in range(len(d.grads)):
        refs, bounds = error_bounds(d.params[i], d.grads[i], d.momentums[i], d.velocities[i],
                                    scale=scale, k=k)
        for x, ref, bound in zip((got[0][i], got[1][i], got[2][i]), refs, bounds):
            err = np.abs(np.asarray(x, np.float64) - ref)
            # + the smallest subnormal: a bound of exactly 0 still allows an exact result
            ratio = err / (BOUND_SAFETY * bound + 2.0 ** -149)
            worst = max(worst, float(np.max(ratio, initial=0.0)))
            over += int(np.count_nonzero(~(ratio <= 1.0)))  # NaN counts as over
    return {"f64_ok": over == 0, "f64_worst_over_bound": worst, "f64_elements_over": over}


def bit_identical(a: tuple[list, list, list], b: tuple[list, list, list]) -> bool:
    return all(x.tobytes() == y.tobytes() for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def state_health(state: tuple[list, list, list]) -> dict:
    """NaN/inf and subnormal counts of a state (timing leaves it drifted)."""
    tiny = np.finfo(np.float32).tiny
    nonfinite = sum(int(np.count_nonzero(~np.isfinite(x))) for xs in state for x in xs)
    subnormal = sum(int(np.count_nonzero((x != 0) & (np.abs(x) < tiny))) for xs in state
                    for x in xs)
    return {"nonfinite": nonfinite, "subnormal": subnormal}


# ---- the implementations -------------------------------------------------------------

@dataclass
class Row:
    """One timed way of taking the step."""
    name: str
    family: str         # keras, tf_raw, clipops, fused
    mode: str           # eager, function, xla, numpy
    call: Callable[[], object]
    impl: "Impl"
    note: str = ""
    # Which of Keras' own updates of clipops' clipped gradients the row must equal bit
    # for bit: "eager", "function" (tf.function: TF's graph optimizer rewrites Keras'
    # ops and changes a few bits), or None (not required: Keras' own clip, TF's raw
    # op, or XLA, which compiles the formula its own way).
    bits_reference: str | None = None


class Impl:
    """A set of variables and state that one or more rows (eager, function, XLA) step."""
    family = ""
    label = ""  # names the implementation in the results (state_after_timing)
    constants = staticmethod(keras_constants)

    def load(self, d: CaseData, iterations: int) -> None:
        """Sets p, m, v to the case's validation state and the step counter."""
        raise NotImplementedError

    def read(self) -> tuple[list, list, list]:
        """The current p, m, v as NumPy arrays."""
        raise NotImplementedError

    def rows(self, d: CaseData, xla: bool) -> list[Row]:
        """The rows stepping this implementation (xla: whether to compile one with XLA)."""
        raise NotImplementedError


def _assign_all(variables: Sequence, values: Sequence[np.ndarray]) -> None:
    for var, val in zip(variables, values):
        var.assign(val)


class KerasImpl(Impl):
    """keras.optimizers.AdamW with global_clipnorm, or its clipops.keras.fused form."""

    def __init__(self, d: CaseData, fused: bool, clip: bool = True):
        self.family = self.label = "fused" if fused else "keras"
        self.variables = [keras.Variable(p, name=f"p{i}") for i, p in enumerate(d.params)]
        self.opt = keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY, beta_1=BETA_1,
                                          beta_2=BETA_2, epsilon=EPSILON,
                                          global_clipnorm=d.clip if clip else None)
        if fused:
            clipops_keras.fused(self.opt)
        self.opt.build(self.variables)
        self.grads = [tf.constant(g) for g in d.grads]

    def load(self, d: CaseData, iterations: int) -> None:
        _assign_all(self.variables, d.params)
        _assign_all(self.opt._momentums, d.momentums)
        _assign_all(self.opt._velocities, d.velocities)
        self.opt.iterations.assign(iterations)

    def read(self) -> tuple[list, list, list]:
        return tuple([np.array(x.numpy()) for x in xs]
                     for xs in (self.variables, self.opt._momentums, self.opt._velocities))

    def apply(self, grads: Sequence) -> None:
        self.opt.apply(list(grads), self.variables)

    def rows(self, d: CaseData, xla: bool) -> list[Row]:
        fn = tf.function(lambda gs: self.apply(gs), autograph=False)
        xla_fn = tf.function(lambda gs: self.apply(gs), autograph=False, jit_compile=True)
        note, ref_eager, ref_function = "", None, None
        if self.family == "fused":
            update_fused = update_is_fused(self.opt, self.grads, self.variables)
            note = "update fused" if update_fused else "clip fused (Keras' own update)"
            # clipops' op runs as it does eagerly; Keras' own update is rewritten in a graph
            ref_eager, ref_function = "eager", "eager" if update_fused else "function"
        rows = [Row(f"{self.family}_eager", self.family, "eager", lambda: self.apply(self.grads),
                    self, note, ref_eager),
                Row(f"{self.family}_function", self.family, "function", lambda: fn(self.grads),
                    self, note, ref_function)]
        if xla:
            rows.append(Row(f"{self.family}_xla", self.family, "xla", lambda: xla_fn(self.grads),
                            self, note))
        return rows


def traced_op_types(fn: Callable, *args) -> set[str]:
    """The op types of fn traced as a tf.function (function bodies included)."""
    graph_def = tf.function(fn, autograph=False).get_concrete_function(*args).graph.as_graph_def()
    return {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function
                                              for n in f.node_def}


def runs_fused_update(op_types: set[str]) -> bool:
    """Whether a traced step runs a clipops op other than a clip: the fused update."""
    return any(op.startswith("Clipops") and op not in CLIP_OPS for op in op_types)


def update_is_fused(opt, grads: Sequence, variables: Sequence) -> bool:
    """Whether a built optimizer's apply fuses its update (clipops.keras fused only
    the clip before it had the update's op). Tracing applies nothing."""
    return runs_fused_update(traced_op_types(lambda *g: opt.apply(list(g), variables), *grads))


class TfRawImpl(Impl):
    """tf.clip_by_global_norm, then per variable Keras' weight decay and ResourceApplyAdam."""
    family = label = "tf_raw"
    constants = staticmethod(raw_op_constants)

    def __init__(self, d: CaseData):
        self.p = [tf.Variable(x) for x in d.params]
        self.m = [tf.Variable(x) for x in d.momentums]
        self.v = [tf.Variable(x) for x in d.velocities]
        self.iterations = tf.Variable(0, dtype=tf.int64)
        self.lr = tf.Variable(LEARNING_RATE, dtype=tf.float32)
        self.clip = tf.constant(d.clip, tf.float32)
        self.grads = [tf.constant(g) for g in d.grads]

    def step(self, grads: Sequence) -> None:
        clipped, _ = tf.clip_by_global_norm(list(grads), self.clip)
        t = tf.cast(self.iterations + 1, tf.float32)
        b1, b2 = tf.constant(BETA_1, tf.float32), tf.constant(BETA_2, tf.float32)
        b1p, b2p = tf.pow(b1, t), tf.pow(b2, t)  # as Keras: ops.power of float32 values
        lr = self.lr.read_value()
        wd = tf.constant(WEIGHT_DECAY, tf.float32)
        for p, m, v, g in zip(self.p, self.m, self.v, clipped):
            p.assign_sub(p * wd * lr)  # Keras' decoupled weight decay, in its order
            tf.raw_ops.ResourceApplyAdam(var=p.handle, m=m.handle, v=v.handle, beta1_power=b1p,
                                         beta2_power=b2p, lr=lr, beta1=b1, beta2=b2,
                                         epsilon=tf.constant(EPSILON, tf.float32), grad=g)
        self.iterations.assign_add(1)

    def load(self, d: CaseData, iterations: int) -> None:
        _assign_all(self.p, d.params)
        _assign_all(self.m, d.momentums)
        _assign_all(self.v, d.velocities)
        self.iterations.assign(iterations)

    def read(self) -> tuple[list, list, list]:
        return tuple([np.array(x.numpy()) for x in xs] for xs in (self.p, self.m, self.v))

    def rows(self, d: CaseData, xla: bool) -> list[Row]:
        fn = tf.function(lambda gs: self.step(gs), autograph=False)
        return [Row("tf_raw_eager", self.family, "eager", lambda: self.step(self.grads), self),
                Row("tf_raw_function", self.family, "function", lambda: fn(self.grads), self)]


class NumpyImpl(Impl):
    """clipops.numpy.adamw_update, in place on NumPy arrays."""
    family, label = "clipops", "clipops_numpy"

    def __init__(self, d: CaseData):
        self.p, self.m, self.v = ([x.copy() for x in xs]
                                  for xs in (d.params, d.momentums, d.velocities))
        self.grads, self.clip, self.iterations = d.grads, d.clip, 0

    def step(self) -> None:
        self.iterations += 1
        cnp.adamw_update(self.p, self.grads, self.m, self.v, step=self.iterations,
                         learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, beta_1=BETA_1,
                         beta_2=BETA_2, epsilon=EPSILON, global_clipnorm=self.clip)

    def load(self, d: CaseData, iterations: int) -> None:
        for dst, src in zip((self.p, self.m, self.v), (d.params, d.momentums, d.velocities)):
            for x, y in zip(dst, src):
                np.copyto(x, y)
        self.iterations = iterations

    def read(self) -> tuple[list, list, list]:
        return tuple([x.copy() for x in xs] for xs in (self.p, self.m, self.v))

    def rows(self, d: CaseData, xla: bool) -> list[Row]:
        return [Row("clipops_numpy", self.family, "numpy", self.step, self, "", "eager")]


def has_tf_update() -> bool:
    """Whether this clipops has the TF op of the fused update (clipops.adamw_update)."""
    return hasattr(clipops, "adamw_update") and clipops.build_info().get("with_tf", False)


class ClipopsTfImpl(Impl):
    """The TF op clipops.adamw_update over tf.Variables (step = iterations + 1)."""
    family, label = "clipops", "clipops_tf"

    def __init__(self, d: CaseData):
        self.p = [tf.Variable(x) for x in d.params]
        self.m = [tf.Variable(x) for x in d.momentums]
        self.v = [tf.Variable(x) for x in d.velocities]
        self.iterations = tf.Variable(0, dtype=tf.int64)
        self.clip = d.clip
        self.grads = [tf.constant(g) for g in d.grads]

    def step(self, grads: Sequence) -> None:
        clipops.adamw_update(self.p, list(grads), self.m, self.v, step=self.iterations + 1,
                             learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                             beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON,
                             global_clipnorm=self.clip)
        self.iterations.assign_add(1)

    load = TfRawImpl.load
    read = TfRawImpl.read

    def rows(self, d: CaseData, xla: bool) -> list[Row]:
        fn = tf.function(lambda gs: self.step(gs), autograph=False)
        return [Row("clipops_eager", self.family, "eager", lambda: self.step(self.grads), self,
                    "", "eager"),
                Row("clipops_function", self.family, "function", lambda: fn(self.grads), self,
                    "", "eager")]


def build_impls(d: CaseData, only: Sequence[str] | None = None) -> tuple[list[Impl], dict]:
    """Every implementation this clipops has, and why any other is not run."""
    makers: dict[str, Callable[[], Impl]] = {
        "keras": lambda: KerasImpl(d, fused=False), "tf_raw": lambda: TfRawImpl(d),
        "clipops_numpy": lambda: NumpyImpl(d), "clipops_tf": lambda: ClipopsTfImpl(d),
        "fused": lambda: KerasImpl(d, fused=True)}
    skipped = {}
    if not has_tf_update():
        skipped["clipops_eager, clipops_function"] = \
            "not run: this clipops has no TF op of the fused update (clipops.adamw_update)"
    impls = []
    for name, make in makers.items():
        if name == "clipops_tf" and not has_tf_update():
            continue
        if only and name not in only:
            continue
        impls.append(make())
    return impls, skipped


IMPL_NAMES = ("keras", "tf_raw", "clipops_numpy", "clipops_tf", "fused")


# ---- validation ----------------------------------------------------------------------

def clipops_reference(d: CaseData, mode: str) -> tuple[list, list, list]:
    """Keras' own AdamW update (no clip) of clipops' clipped gradients
    (clipops.numpy.clip_by_global_norm), eagerly or in tf.function: what clipops'
    rows must equal bit for bit (Row.bits_reference)."""
    clipped, _ = cnp.clip_by_global_norm(d.grads, d.clip)
    ref = KerasImpl(d, fused=False, clip=False)
    ref.load(d, ITERATIONS)
    grads = [tf.constant(g) for g in clipped]
    if mode == "eager":
        ref.apply(grads)
    else:
        tf.function(lambda gs: ref.apply(gs), autograph=False)(grads)
    out = ref.read()
    del ref
    return out


def validate(d: CaseData, rows: list[Row]) -> dict:
    """One step of every row from the same state, checked (see the module docstring);
    the first call of each row (tracing, compiling) is timed here."""
    refs = {mode: clipops_reference(d, mode) for mode in ("eager", "function")}
    report: dict = {"rows": {}, "keras_function_equals_keras_eager":
                    bit_identical(refs["eager"], refs["function"])}
    keras_eager = None
    for row in rows:
        row.impl.load(d, ITERATIONS)
        t0 = time.perf_counter()
        row.call()
        first_call_s = time.perf_counter() - t0
        got = row.impl.read()
        r = check_against_f64(d, got, row.impl.constants(ITERATIONS + 1))
        r["bits_vs_reference"] = {m: bit_identical(got, ref) for m, ref in refs.items()}
        r["bits_reference"] = row.bits_reference
        if row.name == "keras_eager":
            keras_eager = got
        r["bits_vs_keras_eager"] = None if keras_eager is None else bit_identical(got, keras_eager)
        r["bits_ok"] = row.bits_reference is None or r["bits_vs_reference"][row.bits_reference]
        r["ok"] = r["f64_ok"] and r["bits_ok"]
        r["first_call_s"] = first_call_s
        report["rows"][row.name] = r
        bits = ("not required" if row.bits_reference is None else
                f"{r['bits_ok']} (Keras' {row.bits_reference} update of clipops' clip)")
        print(f"  [{d.case.name}] {row.name:17s} validated {'ok' if r['ok'] else 'FAILED'}: "
              f"worst error {r['f64_worst_over_bound']:.3g} of its bound; bit-identical: {bits}; "
              f"first call {first_call_s:.2f} s", flush=True)
    report["ok"] = all(r["ok"] for r in report["rows"].values())
    return report


# ---- timing --------------------------------------------------------------------------

@dataclass
class Settings:
    warmup: int
    repeats: int
    rounds: int
    budget_s: float
    seed: int
    xla_max_tensors: int = XLA_MAX_TENSORS


def _timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def block_sizes(estimates: dict[str, float], s: Settings) -> dict[str, int]:
    """Calls per block: `repeats` calls over `rounds` blocks, fewer when they would
    take longer than budget_s, never under MIN_REPEATS in all."""
    calls = {n: max(MIN_REPEATS, min(s.repeats, int(s.budget_s / max(e, 1e-9))))
             for n, e in estimates.items()}
    return {n: math.ceil(c / s.rounds) for n, c in calls.items()}


def time_rows(case: Case, rows: list[Row], s: Settings) -> dict[str, list[float]]:
    """Warm-up, then rounds: a block of calls of every row in turn (the starting row
    rotating), GC off meanwhile."""
    estimates = {}
    for row in rows:
        estimates[row.name] = statistics.median(_timed(row.call) for _ in range(max(s.warmup, 1)))
        print(f"  [{case.name}] {row.name:17s} warm, ~{estimates[row.name] * 1e3:.3f} ms a call",
              flush=True)
    sizes = block_sizes(estimates, s)
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    bar = Progress(f"{case.name} timing", s.rounds, unit="rounds")
    gc.collect()
    gc.disable()
    try:
        for r in range(s.rounds):
            for row in rows[r % len(rows):] + rows[:r % len(rows)]:
                if estimates[row.name] < REWARM_BELOW_S:
                    row.call()
                times[row.name] += [_timed(row.call) for _ in range(sizes[row.name])]
            bar.update(r + 1)
    finally:
        gc.enable()
    return times


def run_case(case: Case, s: Settings, only: Sequence[str] | None) -> dict:
    """Validates, then times, every row that this clipops has for the case."""
    print(f"[{case.name}] {len(case.shapes)} tensors, {case.numel:,} parameters, floor "
          f"{FLOOR_BYTES_PER_PARAM * case.numel / 1e6:.1f} MB a step", flush=True)
    d = make_data(case, s.seed)
    impls, skipped = build_impls(d, only)
    xla = len(case.shapes) <= s.xla_max_tensors
    if not xla:
        skipped["keras_xla, fused_xla"] = (f"not run: jit_compile of {len(case.shapes)} tensors "
                                           f"(more than {s.xla_max_tensors})")
    rows = [row for impl in impls for row in impl.rows(d, xla)]
    out = {"description": case.description, "num_tensors": len(case.shapes),
           "numel": case.numel, "floor_bytes": FLOOR_BYTES_PER_PARAM * case.numel,
           "clip": d.clip, "norm_f64": d.norm64, "skipped": skipped,
           "notes": {row.name: row.note for row in rows if row.note}}
    out["validation"] = validate(d, rows)
    if not out["validation"]["ok"]:
        bad = [n for n, r in out["validation"]["rows"].items() if not r["ok"]]
        print(f"  [{case.name}] VALIDATION FAILED: {bad}; not timed", flush=True)
        return out
    load_before = load_average()
    bw_before = copy_bandwidth_gbs(repeats=CASE_BANDWIDTH_REPEATS)
    times = time_rows(case, rows, s)
    bw_after = copy_bandwidth_gbs(repeats=CASE_BANDWIDTH_REPEATS)
    out["load_average"] = {"before": load_before, "after": load_average()}
    out["bandwidth"] = {"gbs": max(bw_before["gbs"], bw_after["gbs"]),
                        "before": bw_before["gbs"], "after": bw_after["gbs"]}
    out["results"] = {}
    for row in rows:
        r = summarize(times[row.name])
        r.update(family=row.family, mode=row.mode,
                 first_call_s=out["validation"]["rows"][row.name]["first_call_s"])
        out["results"][row.name] = r
    out["state_after_timing"] = {impl.label: state_health(impl.read()) for impl in impls}
    add_derived(out)
    for name, r in out["results"].items():
        print(f"  [{case.name}] {name:17s} {r['median_s'] * 1e3:10.3f} ms  (p10 "
              f"{r['p10_s'] * 1e3:.3f}, p90 {r['p90_s'] * 1e3:.3f}, n={r['repeats']})  "
              f"x{r['floor_ratio']:.2f} floor", flush=True)
    return out


# ---- derived numbers and targets ----------------------------------------------------------

# The peers each clipops row is set against: (key, peer row)
PEERS = (("vs_keras_eager", "keras_eager"), ("vs_keras_function", "keras_function"),
         ("vs_keras_xla", "keras_xla"), ("vs_tf_raw_eager", "tf_raw_eager"),
         ("vs_tf_raw_function", "tf_raw_function"))
CLIPOPS_ROWS = ("clipops_numpy", "clipops_eager", "clipops_function", "fused_eager",
                "fused_function", "fused_xla")


def add_derived(c: dict) -> None:
    """The case's floor from its own bandwidth; each row's time over it and its share
    of the copy bandwidth; each clipops row's speed-up over each peer (peer's time /
    its time, same run)."""
    results = c.get("results")
    if not results:
        return
    c["floor_s"] = c["floor_bytes"] / (c["bandwidth"]["gbs"] * 1e9)
    for r in results.values():
        r["floor_ratio"] = r["median_s"] / c["floor_s"]
        r["of_copy_bandwidth"] = c["floor_s"] / r["median_s"]
    c["speedups"] = {row: {key: results[peer]["median_s"] / results[row]["median_s"]
                           for key, peer in PEERS if peer in results}
                     for row in CLIPOPS_ROWS if row in results}


# (description, case, kind, row, key, op, threshold): kind "floor" reads the row's
# floor_ratio, "speedup" its speedups[key]. Issue 25's CPU targets.
TARGETS = [
    *[(f"ResNet-50, clip + AdamW: {row} at most 1.3x the 32 B/param floor", "resnet50",
       "floor", row, None, "<=", 1.3) for row in CLIPOPS_ROWS[:5]],
    *[(f"ResNet-50, clip + AdamW: {row} at least 3x faster than Keras' AdamW in tf.function",
       "resnet50", "speedup", row, "vs_keras_function", ">=", 3.0)
      for row in ("clipops_function", "fused_function", "clipops_numpy")],
    *[(f"ResNet-50, clip + AdamW: {row} faster than Keras' AdamW under XLA", "resnet50",
       "speedup", row, "vs_keras_xla", ">", 1.0)
      for row in ("clipops_function", "fused_function", "fused_xla", "clipops_numpy")],
]


def _meets(value: float, op: str, threshold: float) -> bool:
    return {"<=": value <= threshold, ">=": value >= threshold, ">": value > threshold}[op]


def evaluate_targets(cases: dict, fit_rows: list[dict]) -> list[dict]:
    """Each target with its value in this run, met or not (None: not run)."""
    rows = []
    for text, case, kind, row, key, op, threshold in TARGETS:
        c = cases.get(case, {})
        r = (c.get("results") or {}).get(row)
        value = None
        if r is not None:
            value = r["floor_ratio"] if kind == "floor" else c["speedups"][row].get(key)
        rows.append({"target": text, "case": case, "row": row, "metric": key or "floor_ratio",
                     "op": op, "threshold": threshold, "value": value,
                     "met": None if value is None else _meets(value, op, threshold),
                     "note": c.get("notes", {}).get(row, "")})
    for f in fit_rows:
        diff = f.get("paired_step_diff")
        rows.append({"target": f"model.fit ({f['mode']}), MNIST MLP: fused(AdamW) faster than "
                               "Keras' AdamW (paired 95% interval above 0)",
                     "case": "mnist_fit", "row": f"fused_{f['mode']}", "metric": "paired_step_diff",
                     "op": "interval > 0", "threshold": 0.0,
                     "value": None if not diff else diff["median_s"],
                     "met": None if not diff else verdict_kind(diff) == "faster",
                     "note": f.get("fused", "")})
    return rows


# ---- model.fit on the MNIST MLP ---------------------------------------------------------

FIT_MODES = {"fit": False, "fit-xla": True}  # mode name: jit_compile


def fit_model(fused: bool, jit_compile: bool, init: list[np.ndarray] | None, clip: float,
              weight_decay: float = WEIGHT_DECAY) -> keras.Model:
    """The MNIST MLP 784-512-256-10 (ReLU), sparse softmax cross-entropy, AdamW(1e-3,
    weight_decay, global_clipnorm=clip), plain or fused."""
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    for var, w in zip(model.weights, init or []):
        var.assign(w)
    opt = keras.optimizers.AdamW(LEARNING_RATE, weight_decay=weight_decay, global_clipnorm=clip)
    if fused:
        clipops_keras.fused(opt)
    model.compile(optimizer=opt, jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit_batches(x: np.ndarray, y: np.ndarray, steps: int, rng: np.random.Generator):
    """`steps` batches' worth of training data, reshuffled each epoch, cycling."""
    per_epoch = len(y) // FIT_BATCH
    idx = np.concatenate([rng.permutation(len(y))[:per_epoch * FIT_BATCH]
                          for _ in range(-(-steps // per_epoch))])[:steps * FIT_BATCH]
    return x[idx], y[idx]


def fit_validate(data, jit_compile: bool, seed: int) -> dict:
    """A few steps of both models from the same weights on the same batches with a
    clip that never binds: their weights must end bit-identical. Without weight
    decay: in a graph TF's arithmetic optimizer turns Keras' (p * wd) * lr into
    p * (wd * lr), which a fused update does not do (its decay is validated against
    Keras' eager update by the cases above)."""
    keras.utils.set_random_seed(seed)
    init = [w.numpy() for w in fit_model(False, False, None, FIT_VALIDATE_CLIP).weights]
    models = {f: fit_model(f, jit_compile, init, FIT_VALIDATE_CLIP, weight_decay=0.0)
              for f in (False, True)}
    x, y = fit_batches(data.x_train, data.y_train, FIT_VALIDATE_STEPS, np.random.default_rng(seed))
    for m in models.values():
        m.fit(x, y, batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    weights = [[w.numpy() for w in m.trainable_weights] for m in models.values()]
    identical = all(a.tobytes() == b.tobytes() for a, b in zip(*weights))
    return {"steps": FIT_VALIDATE_STEPS, "clip": FIT_VALIDATE_CLIP, "weight_decay": 0.0,
            "weights_identical": identical}


def fit_compare(mode: str, data, steps: int, seed: int) -> dict:
    """Keras' AdamW and fused(AdamW) from the same weights on the same batches, FIT_CHUNK
    steps each in turn (rotating which goes first); the first call of each (tracing)
    is left out. Paired difference: per step, Keras' time - fused's."""
    jit = FIT_MODES[mode]
    check = fit_validate(data, jit, seed)
    keras.utils.set_random_seed(seed)
    init = [w.numpy() for w in fit_model(False, False, None, FIT_CLIP).weights]
    models = {"keras": fit_model(False, jit, init, FIT_CLIP),
              "fused": fit_model(True, jit, init, FIT_CLIP)}
    fused_note = "update fused" if _fit_update_fused(models["fused"]) else \
        "clip fused (Keras' own update)"
    clocks = {k: step_clock() for k in models}
    chunk = max(1, min(FIT_CHUNK, steps))
    chunks = -(-steps // chunk) + 1  # the first is warm-up (traces)
    x, y = fit_batches(data.x_train, data.y_train, chunks * chunk, np.random.default_rng(seed))
    print(f"\nmodel.fit / {mode}: {chunks} calls of {chunk} steps per model, batch "
          f"{FIT_BATCH}, global_clipnorm {FIT_CLIP:g}; fused(AdamW): {fused_note}", flush=True)
    bar = Progress(f"model.fit / {mode}", chunks, unit="calls")
    names = list(models)
    timed: dict[str, list[float]] = {k: [] for k in models}
    for c in range(chunks):
        sl = slice(c * chunk * FIT_BATCH, (c + 1) * chunk * FIT_BATCH)
        for k in names[c % 2:] + names[:c % 2]:
            clocks[k].times.clear()
            models[k].fit(x[sl], y[sl], batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0,
                          callbacks=[clocks[k]])
            if c > 0:
                timed[k] += clocks[k].times
        bar.update(c + 1)
    norms = clocks["fused"].norms
    diffs = [a - b for a, b in zip(timed["keras"], timed["fused"])]
    weights = [[w.numpy() for w in m.trainable_weights] for m in models.values()]
    max_rel = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                  for a, b in zip(*weights))
    return {"mode": mode, "jit_compile": jit, "fused": fused_note, "validation": check,
            "chunk": chunk,
            "steps_timed": len(diffs), "clip": FIT_CLIP,
            "clipped_steps": int(sum(n > FIT_CLIP for n in norms)), "steps_with_norm": len(norms),
            "runs": {k: summarize(v) if v else None for k, v in timed.items()},
            "paired_step_diff": paired_ci(diffs, seed), "max_weight_rel_diff": max_rel}


def _fit_update_fused(model: keras.Model) -> bool:
    """Whether a compiled model's fused optimizer fuses its update (traced, not run)."""
    opt = model.optimizer
    variables = model.trainable_variables
    if not opt.built:
        opt.build(variables)
    return update_is_fused(opt, [tf.zeros_like(v.value) for v in variables], variables)


# ---- the report -----------------------------------------------------------------------------

ROW_ORDER = ("keras_eager", "keras_function", "keras_xla", "tf_raw_eager", "tf_raw_function",
             "clipops_numpy", "clipops_eager", "clipops_function", "fused_eager",
             "fused_function", "fused_xla")


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def case_section(name: str, c: dict) -> list[str]:
    lines = [f"### {name}: {c['num_tensors']} tensors, {c['numel']:,} parameters", ""]
    if "results" not in c:
        lines += ["Not timed: validation failed (see the JSON file's `validation`).", ""]
        return lines
    bw = c["bandwidth"]
    lines += [f"Floor {ms(c['floor_s'])} ms: {c['floor_bytes'] / 1e6:.1f} MB at the copy bandwidth "
              f"{bw['gbs']:.1f} GB/s (before {bw['before']:.1f}, after {bw['after']:.1f}); load "
              f"average {c['load_average']['before']} before, {c['load_average']['after']} after.",
              ""]
    val = c["validation"]["rows"]
    rows = []
    for row in (r for r in ROW_ORDER if r in c["results"]):
        r = c["results"][row]
        sp = c.get("speedups", {}).get(row, {})
        v = val[row]
        bits = ("-" if v["bits_reference"] is None else
                f"{'yes' if v['bits_ok'] else 'NO'} ({v['bits_reference']})")
        rows.append([row, c.get("notes", {}).get(row, ""), ms(r["median_s"]),
                     f"{ms(r['p10_s'])} to {ms(r['p90_s'])}", _x(r["floor_ratio"]),
                     pct(r["of_copy_bandwidth"]),
                     *[_x(sp.get(key)) if row in c.get("speedups", {}) else "-"
                       for key, _ in PEERS],
                     f"{val[row]['f64_worst_over_bound']:.2g}", bits,
                     f"{r['first_call_s']:.2f}"])
    lines += table(["row", "", "median ms", "p10 to p90", "x floor", "of copy bw",
                    "vs Keras eager", "vs Keras function", "vs Keras XLA", "vs TF raw eager",
                    "vs TF raw function", "error / bound", "bits = Keras update",
                    "first call s"], rows, "llrrrrrrrrrrlr")
    for what, why in c.get("skipped", {}).items():
        lines.append(f"\n{what}: {why}")
    return lines + [""]


def fit_section(fit_rows: list[dict]) -> list[str]:
    if not fit_rows:
        return []
    lines = ["## model.fit: Keras' AdamW against clipops.keras.fused(AdamW)", "",
             f"MNIST MLP 784-512-256-10, batch {FIT_BATCH}, AdamW(1e-3, weight_decay "
             f"{WEIGHT_DECAY}, global_clipnorm {FIT_CLIP:g}); the two models take turns of "
             f"{fit_rows[0].get('chunk', FIT_CHUNK)} steps; step = batch begin to batch end. "
             "Verdict: the median of the per-step differences Keras - fused with its bootstrap "
             "95% interval "
             "(report.verdict; \"clipops\" is the fused model).", ""]
    rows = []
    for f in fit_rows:
        rk, rf = f["runs"]["keras"], f["runs"]["fused"]
        rows.append([f["mode"], f["fused"], ms(rk and rk["median_s"], 2),
                     ms(rf and rf["median_s"], 2), verdict(f["paired_step_diff"]),
                     f"{f['clipped_steps']} of {f['steps_with_norm']}",
                     "yes" if f["validation"]["weights_identical"] else "NO"])
    return lines + table(["mode", "fused", "Keras step ms", "fused step ms",
                          "verdict (Keras - fused, paired, 95%)", "clipped steps",
                          f"bit-identical after {FIT_VALIDATE_STEPS} unclipped steps (no decay)"],
                         rows, "llrrlrl") + [""]


def targets_section(targets: list[dict]) -> list[str]:
    def value(t):
        if t["value"] is None:
            return "not run"
        if t["metric"] == "paired_step_diff":
            return ms(t["value"], 2) + " ms"
        return f"{t['value']:.2f}"
    rows = [[t["target"], t["note"], value(t),
             f"{t['op']} {t['threshold']:g}" if t["metric"] != "paired_step_diff" else t["op"],
             {True: "met", False: "missed", None: "-"}[t["met"]]] for t in targets]
    return ["## Targets (issue 25, CPU)", ""] + table(
        ["target", "", "value", "needed", "verdict"], rows, "llrll") + [""]


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = ["# The fused clip + AdamW step on the CPU (bench/optim.py)", ""]
    if payload.get("smoke"):
        lines += ["**A smoke run: toy sizes and few repeats; its numbers mean nothing.**", ""]
    flags = ", ".join(m.get("cpu_flags", []))
    lines += [f"{machine_line(m)}; CPU flags: {flags}. {payload['wall_s']:.0f} s.", "",
              f"Floor: {FLOOR_BYTES_PER_PARAM} B per parameter (each gradient read twice, the "
              "parameter and both moments read and written once, float32) at the copy bandwidth "
              "measured around each case. Medians of repeated calls; speed-up = the peer's "
              "median / the row's, same run; error / bound: the worst element's distance from "
              "float64 over its derived bound (<= 1 passes); bits = Keras update: whether the "
              "row equals, bit for bit, Keras' own AdamW update of clipops' clipped gradients run "
              "eagerly or in tf.function (where TF's graph optimizer rewrites Keras' ops; "
              "required of clipops' rows, - where not: Keras' own clip, TF's raw op, XLA).", ""]
    same = [c["validation"].get("keras_function_equals_keras_eager")
            for c in payload["cases"].values()]
    if False in same:
        lines += ["Keras' own update in tf.function differs from its eager bits here (TF's graph "
                  "optimizer turns its weight decay (p * wd) * lr into p * (wd * lr)): the rows "
                  "in a tf.function are held to the tf.function update where the update is "
                  "Keras' own.", ""]
    for name, c in payload["cases"].items():
        lines += case_section(name, c)
    lines += fit_section(payload.get("fit_rows", []))
    lines += targets_section(payload["targets"])
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path:
    """Left: each case's rows as time / floor (median, p10 to p90), the 1.3x target
    dashed; right: model.fit's step times and the paired interval."""
    plt = pyplot()
    cases = [(n, c) for n, c in payload["cases"].items() if c.get("results")]
    fits = payload.get("fit_rows", [])
    fig, axes = plt.subplots(1, len(cases) + (1 if fits else 0),
                             figsize=(5.5 * (len(cases) + (1 if fits else 0)), 4.8), squeeze=False)
    colors = {"keras": "tab:orange", "tf_raw": "tab:red", "clipops": "tab:blue",
              "fused": "tab:green"}
    for ax, (name, c) in zip(axes[0], cases):
        names = [r for r in ROW_ORDER if r in c["results"]]
        res = [c["results"][r] for r in names]
        f = c["floor_s"]
        y = np.arange(len(names))
        ax.barh(y, [r["median_s"] / f for r in res], color=[colors[r["family"]] for r in res],
                xerr=[[(r["median_s"] - r["p10_s"]) / f for r in res],
                      [(r["p90_s"] - r["median_s"]) / f for r in res]])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.3, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yticks(y, [n + (" (clip fused)" if c.get("notes", {}).get(n, "").startswith("clip")
                               else "") for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"time / floor ({ms(f, 2)} ms; dashed: 1.3x)")
        ax.set_title(f"{name}: clip + AdamW step")
    if fits:
        ax = axes[0][-1]
        for i, fr in enumerate(fits):
            for j, k in enumerate(("keras", "fused")):
                r = fr["runs"][k]
                if r:
                    ax.errorbar([i + 0.15 * (2 * j - 1)], [r["median_s"] * 1e3],
                                yerr=[[(r["median_s"] - r["p10_s"]) * 1e3],
                                      [(r["p90_s"] - r["median_s"]) * 1e3]], fmt="o",
                                color=colors[k], label=k if i == 0 else None)
        ax.set_xticks(range(len(fits)), [f"{fr['mode']}\n{verdict(fr['paired_step_diff'])}"
                                         for fr in fits], fontsize=7)
        ax.set_ylabel("step ms (median, p10 to p90)")
        ax.set_title("model.fit, MNIST MLP")
        ax.legend()
    return save(fig, path)


def render_all(json_path: Path, draw: bool = True) -> tuple[Path, Path | None]:
    """optim.md (and optim.png) beside a results file, drawn from it alone."""
    payload = json.loads(Path(json_path).read_text())
    md = Path(json_path).with_suffix(".md")
    md.write_text(markdown(payload))
    png = Path(json_path).with_suffix(".png")
    png = plot(payload, png) if draw and can_plot(png.name) else None
    return md, png


# ---- main -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=OUT,
                   help="directory for optim.json, optim.md and optim.png (default: %(default)s, "
                        "untracked)")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes and few repeats, seconds of timing (CI: keeps the script alive)")
    p.add_argument("--cases", nargs="+", choices=["mnist", "resnet50"], metavar="CASE",
                   help="cases to run (default: both): mnist, resnet50")
    p.add_argument("--impls", nargs="+", choices=IMPL_NAMES, metavar="IMPL",
                   help=f"implementations to run (default: all there are): {', '.join(IMPL_NAMES)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per row and case, at most (default 100; smoke 5); fewer when "
                        "they would take longer than --budget, never under 5")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds the calls are spread over (default 5; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per row and case, roughly (default 3; smoke 0.2)")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="timed model.fit steps per model and mode (default 400; smoke 10)")
    p.add_argument("--no-fit", action="store_true", help="skip the model.fit rows")
    p.add_argument("--fit-modes", nargs="+", choices=list(FIT_MODES), default=list(FIT_MODES),
                   help="model.fit modes (default: both)")
    p.add_argument("--data", default="auto", help="MNIST source for model.fit (mnist_data.py)")
    p.add_argument("--no-plot", action="store_true", help="write no optim.png")
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="only redraw optim.md and optim.png beside this results file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data")
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    pick = lambda value, full, smoke: value if value is not None else (smoke if args.smoke else full)  # noqa: E731
    return Settings(warmup=pick(args.warmup, 2, 1), repeats=pick(args.repeats, 100, MIN_REPEATS),
                    rounds=pick(args.rounds, 5, 2), budget_s=pick(args.budget, 3.0, 0.2),
                    seed=args.seed,
                    xla_max_tensors=SMOKE_XLA_MAX_TENSORS if args.smoke else XLA_MAX_TENSORS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        md, png = render_all(args.replot, draw=not args.no_plot)
        print(f"wrote {md}" + (f", {png}" if png else ""))
        return 0
    started = time.perf_counter()
    bandwidth_start = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bandwidth_start['gbs']:.1f} GB/s, read + written "
          f"(by threads: {bandwidth_start['by_threads']})", flush=True)
    s = settings_from(args)
    selected = [c for c in build_cases(args.smoke) if not args.cases or c.name in args.cases]
    cases = {c.name: run_case(c, s, args.impls) for c in selected}
    fit_rows, data_summary = [], None
    if not args.no_fit:
        import mnist_data
        try:
            data = mnist_data.load(args.data, seed=args.seed)
        except mnist_data.DataUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        data_summary = data.summary()
        steps = args.fit_steps if args.fit_steps is not None else (10 if args.smoke else 400)
        fit_rows = [fit_compare(mode, data, steps, args.seed) for mode in args.fit_modes]
    payload = {
        "benchmark": "optim", "smoke": args.smoke, "machine": machine_info(),
        "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "settings": {"warmup": s.warmup, "repeats": s.repeats, "rounds": s.rounds,
                     "budget_s": s.budget_s, "seed": s.seed, "min_repeats": MIN_REPEATS,
                     "rewarm_below_s": REWARM_BELOW_S, "data_scale": DATA_SCALE,
                     "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                     "beta_1": BETA_1, "beta_2": BETA_2, "epsilon": EPSILON,
                     "iterations_before_validated_step": ITERATIONS,
                     "floor_bytes_per_param": FLOOR_BYTES_PER_PARAM, "norm_rtol": NORM_RTOL,
                     "bound_safety": BOUND_SAFETY, "fit_batch": FIT_BATCH, "fit_chunk": FIT_CHUNK,
                     "fit_clip": FIT_CLIP},
        "bandwidth_start": bandwidth_start, "cases": cases, "fit_data": data_summary,
        "fit_rows": fit_rows, "targets": evaluate_targets(cases, fit_rows),
        "wall_s": time.perf_counter() - started,
    }
    path = write_json("optim", payload, args.out)
    md, png = render_all(path, draw=not args.no_plot)
    print(md.read_text())
    print(f"wrote {path}, {md}" + (f", {png}" if png else "") + f" in {payload['wall_s']:.0f} s")
    failed = [n for n, c in cases.items() if not c["validation"]["ok"]]
    failed += [f"model.fit/{f['mode']}" for f in fit_rows
               if not f["validation"]["weights_identical"]]
    if failed:
        print(f"VALIDATION FAILED for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
