#!/usr/bin/env python
"""Microbenchmark: clipping alone, clipops against tf.clip_by_global_norm.

Times ``tf.clip_by_global_norm`` eagerly, in ``tf.function`` and in
``tf.function(jit_compile=True)`` against ``clipops.clip_by_global_norm``
eagerly and in ``tf.function``, and against the NumPy front end
(``clipops.numpy``, copying and in place), on these gradient lists:

  mnist            the MNIST MLP's 6 float32 gradients (535,818 elements)
  resnet50         torchvision ResNet-50's 161 parameter shapes (25,557,032)
  bert_base        BERT-base's 199 parameter shapes (109,482,240)
  small_10k        10,000 small float32 tensors (1 to 2,047 elements each)
  mixed_f16_f32    ResNet-50's shapes, kernels and the classifier weight float16,
                   BatchNorm parameters and the bias float32
  *_noclip         the same lists with clip_norm far above the norm

With ``--health``, bench/health.py follows: the gradient-health ops
(``clipops.clip_by_norm``, ``clipops.clip_by_value``, ``return_norms``) against
TF's per-tensor loops on the mnist and resnet50 lists.

Every case is validated before it is timed: each clipops variant's outputs and
norm against ``tf.clip_by_global_norm`` and the norm against a float64 NumPy
reference. A mismatch skips the case's timing and makes the exit status 1
(missed speed targets do not).

How it is timed:
  - in rounds: each round runs a block of calls of every implementation in
    turn, so that a burst of load from another process hits all of them
    alike, while each timed call follows one of its own (a block of short
    calls starts with an untimed one); the CPU other processes took meanwhile
    is recorded per case ("background_cores"), and a case disturbed by more
    than BUSY_WARNING_CORES is timed again (--retries), keeping the least
    disturbed attempt;
  - eager calls are fenced with ``norm.numpy()`` (CPU ops run synchronously);
    tf.function calls take the tensors and clip_norm as arguments (traced
    once, in validation, whose call is reported as the first call) and return
    every output;
  - clip_norm is half the norm, or for *_noclip a power of two far above it so
    that TF's scale ``clip * (1 / clip)`` is exactly 1;
  - numpy_inplace restores its arrays (untimed) before each call when clipping;
  - tf_identity_n and tf_function_identity_n time the eager and tf.function
    routes with no arithmetic, back to back; their *_cold rows time them after
    that same untimed restore, which streams the list through the caches as
    each clip's previous call does (TF's runtime is then out of the caches);
    the Targets' "route + in place" bound adds a *_cold row to numpy_inplace;
  - no-clip cases add *_fwd rows: tf.function computes stand-in gradients
    (``x * one``, ``one`` an argument) and clips them, so the clip may forward
    buffers nothing else holds; their net time subtracts `producer`, the same
    function with a clip that does nothing, in the same round; for a list under
    32 MiB the function chains 10 clips (each on the previous one's outputs)
    and the net time is per clip, or it would drown in the call's own cost;
  - mixed_f16_f32: tf.clip_by_global_norm raises on mixed dtypes, so TF's rows
    time what a TF user would write instead: clip float32 casts of the list,
    then cast each result back (tf_clip_via_float32), casts included;
  - the copy bandwidth that sets a case's floor is measured right before and
    right after the case is timed, and the higher is used: the VM's speed
    drifts over a run (the start and end of the run are measured too);
  - tf_xla is not run for lists of more than XLA_MAX_TENSORS tensors (the
    compile alone would take minutes); *_norm_* rows time the norm alone, the
    first of clipping's two passes.

Results go to bench/out/micro.json (or --out DIR), then micro.md and micro.png
are drawn from that JSON file by bench/plot.py. See bench/plot.py's module
docstring for what each column means.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cases import Case, bert_shapes, mixed_dtypes, mnist_shapes, resnet50_shapes, small_shapes
from cases import case as make_case
from common import (OUT, copy_bandwidth_gbs, import_tensorflow, machine_info, summarize,
                    wants_verbose, write_json)

tf, _ = import_tensorflow(verbose=wants_verbose(__name__))
import clipops  # noqa: E402
import clipops.numpy as cnp  # noqa: E402
import plot  # noqa: E402  (bench/plot.py: micro.md and micro.png from micro.json)

ClipFn = Callable[[Sequence, object], tuple]

DATA_SCALE = 1e-3        # gradients ~ N(0, 1e-3)
NORM_RTOL = 1e-5         # the norm against TF and against float64
OUT_TOL = {              # (rtol, atol) of the outputs against TF, by dtype
    "float32": (1e-5, 1e-9),
    # TF raises on a mixed list; its reference scales float32 casts and rounds
    # once, clipops casts the scale to float16 first as TF does for a float16
    # list: up to 2 float16 ulps apart (2 subnormal steps near zero).
    "float16": (2e-3, 1.2e-7),
}
XLA_MAX_TENSORS = 1000   # jit_compile of 1,000 tensors already takes ~50 s here
MIN_REPEATS = 5
REWARM_BELOW_S = 5e-3    # a call this short gets an untimed call before each block
FORWARD_CHAIN = 10       # clips chained in a forwarded function for a small list
FORWARD_CHAIN_BELOW_BYTES = 32 << 20
BUSY_WARNING_CORES = 0.15  # other processes' CPU use that makes a case's timing suspect
CASE_BANDWIDTH_REPEATS = 3  # copies timed (per thread count) right before and after each case


# ---- the cases -------------------------------------------------------------------

def build_cases(smoke: bool) -> list[Case]:
    """The full cases, or (smoke) the same kinds of list at toy sizes."""
    resnet = resnet50_shapes(8, 100) if smoke else resnet50_shapes()
    bert = bert_shapes(1000, 64, 2, 256, 64) if smoke else bert_shapes()
    small = small_shapes(200 if smoke else 10_000)
    noclip = "; clip_norm far above the norm (a power of two, so the scale is exactly 1)"
    return [
        make_case("mnist", "MNIST MLP 784-512-256-10 gradients, float32", mnist_shapes()),
        make_case("mnist_noclip", "MNIST MLP gradients" + noclip, mnist_shapes(), clipping=False),
        make_case("small_10k", f"{len(small)} small 1-D float32 tensors, log-uniform sizes in "
              "[1, 2047]", small),
        make_case("resnet50", "ResNet-50-like: torchvision ResNet-50 parameter shapes, float32",
              resnet),
        make_case("resnet50_noclip", "ResNet-50-like list" + noclip, resnet, clipping=False),
        make_case("mixed_f16_f32", "ResNet-50 shapes; conv kernels and fc weight float16, "
              "BatchNorm and fc bias float32", resnet, dtypes=mixed_dtypes(resnet)),
        make_case("bert_base", "BERT-base-like: BERT-base parameter shapes (with pooler), float32",
              bert),
    ]


# ---- data ---------------------------------------------------------------------

@dataclass
class CaseData:
    """A case's tensors, with NumPy copies and the float64 reference norm."""
    case: Case
    arrays: list[np.ndarray]     # pristine; the NumPy front end reads these
    work: list[np.ndarray]       # clipped in place by numpy_inplace
    tensors: list[tf.Tensor]
    norm64: float
    clip_norm: float


def reference_norm(arrays: Sequence[np.ndarray]) -> float:
    """The global norm, accumulated in float64."""
    total = 0.0
    for a in arrays:
        v = a.ravel().astype(np.float64)
        total += float(np.dot(v, v))
    return math.sqrt(total)


def choose_clip_norm(norm: float, clipping: bool) -> float:
    """Half the norm (float32) when clipping; otherwise a power of two far above
    it, so that TF's scale clip * (1 / clip) is exactly 1."""
    if clipping:
        return float(np.float32(norm / 2))
    return 2.0 ** math.ceil(math.log2(norm * 1e3))


def make_data(case: Case, seed: int) -> CaseData:
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal(s, dtype=np.float32) * DATA_SCALE).astype(d, copy=False)
              for s, d in zip(case.shapes, case.dtypes)]
    norm = reference_norm(arrays)
    return CaseData(case, arrays, [a.copy() for a in arrays], [tf.constant(a) for a in arrays],
                    norm, choose_clip_norm(norm, case.clipping))


# ---- implementations ----------------------------------------------------------

@dataclass
class Runner:
    """One implementation bound to a case's data."""
    call: Callable[[], object]                 # one timed call
    sync: Callable[[object], None]             # forces the result to be computed
    fetch: Callable[[object], tuple[list[np.ndarray], float]] | None  # outputs, norm
    setup: Callable[[], None] | None = None    # untimed, before every call


def _tf_runner(call: Callable[[], tuple]) -> Runner:
    # CPU ops and tf.function calls return once computed; .numpy() is a cheap fence
    return Runner(call, sync=lambda r: r[1].numpy(),
                  fetch=lambda r: ([t.numpy() for t in r[0]], float(r[1])))


def _np_runner(call: Callable[[], tuple], setup: Callable[[], None] | None = None) -> Runner:
    return Runner(call, sync=lambda r: None, setup=setup,
                  fetch=lambda r: ([np.array(a) for a in r[0]], float(r[1])))


def _norm_runner(call: Callable[[], object]) -> Runner:
    return Runner(call, sync=lambda r: np.asarray(r), fetch=lambda r: ([], float(np.asarray(r))))


def tf_clip_via_float32(t_list: Sequence[tf.Tensor], clip_norm) -> tuple[list, tf.Tensor]:
    """What a TF user writes for a mixed list (tf.clip_by_global_norm raises on
    one): clip float32 casts, then cast each result back to its dtype."""
    wide = [tf.cast(t, tf.float32) for t in t_list]
    clipped, norm = tf.clip_by_global_norm(wide, clip_norm)
    return [tf.cast(c, t.dtype) for c, t in zip(clipped, t_list)], norm


def tf_clip_for(d: CaseData) -> ClipFn:
    return tf_clip_via_float32 if d.case.mixed else tf.clip_by_global_norm


def clipops_clip_for(d: CaseData) -> ClipFn:
    return clipops.clip_by_global_norm


def eager(clip_for: Callable[[CaseData], ClipFn]) -> Callable[[CaseData], Runner]:
    def build(d: CaseData) -> Runner:
        clip = clip_for(d)
        return _tf_runner(lambda: clip(d.tensors, d.clip_norm))
    return build


def graph(clip_for: Callable[[CaseData], ClipFn], jit: bool = False) -> Callable[[CaseData], Runner]:
    """tf.function taking the tensors and clip_norm as arguments (traced once)."""
    def build(d: CaseData) -> Runner:
        clip = clip_for(d)

        def step(xs, c):
            return clip(xs, c)

        f = tf.function(step, jit_compile=jit, autograph=False)
        c = tf.constant(d.clip_norm, tf.float32)
        return _tf_runner(lambda: f(d.tensors, c))
    return build


def _make_gradients(xs: Sequence[tf.Tensor], one: tf.Tensor) -> list[tf.Tensor]:
    """Stand-in gradients computed inside the function: x * one, with `one` an
    argument (a constant 1 would be folded away by Grappler). Each is a fresh
    temporary that nothing else holds, so the clip may forward its buffer."""
    return [x * tf.cast(one, x.dtype) for x in xs]


def forward_chain(case: Case) -> int:
    """Clips chained in one forwarded function: several for a small list, whose
    one clip would be lost in the function call's own cost and noise."""
    return FORWARD_CHAIN if case.nbytes < FORWARD_CHAIN_BELOW_BYTES else 1


def forwarded(clip_for: Callable[[CaseData], ClipFn]) -> Callable[[CaseData], Runner]:
    """tf.function that computes the gradients and clips them forward_chain()
    times, each clip taking the previous one's outputs: every clip gets buffers
    that nothing else holds. Net time per clip: (time - producer's) / chain."""
    def build(d: CaseData) -> Runner:
        clip, chain = clip_for(d), forward_chain(d.case)

        def step(xs, one, c):
            grads, norm = _make_gradients(xs, one), None
            for _ in range(chain):
                grads, norm = clip(grads, c)
            return grads, norm

        f = tf.function(step, autograph=False)
        one, c = tf.constant(1.0), tf.constant(d.clip_norm, tf.float32)
        return _tf_runner(lambda: f(d.tensors, one, c))
    return build


def _no_clip(t_list: Sequence[tf.Tensor], clip_norm: tf.Tensor) -> tuple[list, tf.Tensor]:
    """A stand-in clip that does nothing, with the same outputs' structure."""
    return list(t_list), clip_norm


def producer(d: CaseData) -> Runner:
    """`forwarded` with a clip that does nothing: the gradient computation and
    the function call alone, the baseline of the forwarded rows' net time."""
    runner = forwarded(lambda _: _no_clip)(d)
    runner.fetch = None
    return runner


def numpy_copy(d: CaseData) -> Runner:
    return _np_runner(lambda: cnp.clip_by_global_norm(d.arrays, d.clip_norm))


def _restore(d: CaseData) -> None:
    for w, a in zip(d.work, d.arrays):
        np.copyto(w, a)


def numpy_inplace(d: CaseData) -> Runner:
    """in_place=True on `work`; restored (untimed) before each call when clipping,
    because a clipped list would need no clipping the next time."""
    setup = (lambda: _restore(d)) if d.case.clipping else None
    return _np_runner(lambda: cnp.clip_by_global_norm(d.work, d.clip_norm, in_place=True), setup)


def tf_identity_n(d: CaseData) -> Runner:
    """TF's own eager cost of one op that takes the list and returns it, with
    no arithmetic and no allocation: below it no TF op on the list can go."""
    return Runner(lambda: tf.identity_n(d.tensors), sync=lambda r: None, fetch=None)


def tf_function_identity_n(d: CaseData) -> Runner:
    """TF's cost of calling a tf.function that takes the list and returns it
    (tf.identity_n inside): the function boundary every *_function row pays."""
    f = tf.function(lambda xs: tf.identity_n(xs), autograph=False)
    return Runner(lambda: f(d.tensors), sync=lambda r: None, fetch=None)


def after_stream(dispatch: Callable[[CaseData], Runner]) -> Callable[[CaseData], Runner]:
    """A dispatch row timed the way a clip's call runs: right after the list
    has streamed through the caches. In a block of clips, each call follows
    its predecessor's pass over the list, which pushes TF's runtime (code and
    data) out of the caches; the plain rows above run back to back, warm. The
    stream is numpy_inplace's own untimed restore (copy the list into `work`),
    so the route and the kernel of route_bound run after the same setup."""
    def build(d: CaseData) -> Runner:
        runner = dispatch(d)
        runner.setup = lambda: _restore(d)
        return runner
    return build


def numpy_empty_like(d: CaseData) -> Runner:
    """NumPy's cost of making a fresh array like each of the list's, untouched:
    what a copying front end built on NumPy's own calls pays before any
    arithmetic. clipops' front end makes its outputs in C++ (small ones as
    views into one block) and can pay less."""
    return Runner(lambda: [np.empty_like(a) for a in d.arrays], sync=lambda r: None, fetch=None)


@dataclass(frozen=True)
class Impl:
    """An implementation: what it is, how to build it, and when it runs.

    role: "clip" (the comparison proper), "forwarded" (no-clip cases, gradients
    made inside the function; net of `producer`), "producer" (that baseline),
    "norm_pass" (the norm alone: the first of clipping's two passes), or
    "dispatch" (a framework's own per-call cost on the list, no clipping: the
    least a clip through it can take; set against the clip's floor)."""
    name: str
    family: str
    role: str
    build: Callable[[CaseData], Runner]
    skip: Callable[[Case], str | None] = lambda case: None


def _skip_xla(case: Case) -> str | None:
    if len(case.shapes) > XLA_MAX_TENSORS:
        return (f"not run: jit_compile of {len(case.shapes)} tensors takes minutes here "
                "(1,000 tensors: ~50 s)")
    return None


def _only_noclip(case: Case) -> str | None:
    return None if not case.clipping else "only for the no-clip cases"


def _only_clipping(case: Case) -> str | None:
    # route_bound's rows: the no-clip cases' targets are forwarded, which have none
    return None if case.clipping else "only for the clipping cases (route bounds)"


def _skip_function_identity(case: Case) -> str | None:
    if len(case.shapes) > XLA_MAX_TENSORS:
        return (f"not run: tracing a function of {len(case.shapes)} tensors takes tens of "
                "seconds; tf_function's own row shows the boundary")
    return None


def _not_mixed(case: Case) -> str | None:
    return "tf.linalg.global_norm raises on mixed dtypes" if case.mixed else None


IMPLS: tuple[Impl, ...] = (
    Impl("tf_eager", "tf", "clip", eager(tf_clip_for)),
    Impl("tf_function", "tf", "clip", graph(tf_clip_for)),
    Impl("tf_xla", "tf", "clip", graph(tf_clip_for, jit=True), skip=_skip_xla),
    Impl("clipops_eager", "clipops", "clip", eager(clipops_clip_for)),
    Impl("clipops_function", "clipops", "clip", graph(clipops_clip_for)),
    Impl("numpy", "clipops", "clip", numpy_copy),
    Impl("numpy_inplace", "clipops", "clip", numpy_inplace),
    Impl("producer", "baseline", "producer", producer, skip=_only_noclip),
    Impl("tf_function_fwd", "tf", "forwarded", forwarded(tf_clip_for), skip=_only_noclip),
    Impl("clipops_function_fwd", "clipops", "forwarded", forwarded(clipops_clip_for),
         skip=_only_noclip),
    Impl("tf_identity_n", "baseline", "dispatch", tf_identity_n),
    Impl("tf_function_identity_n", "baseline", "dispatch", tf_function_identity_n,
         skip=_skip_function_identity),
    Impl("tf_identity_n_cold", "baseline", "dispatch", after_stream(tf_identity_n),
         skip=_only_clipping),
    Impl("tf_function_identity_n_cold", "baseline", "dispatch",
         after_stream(tf_function_identity_n),
         skip=lambda case: _only_clipping(case) or _skip_function_identity(case)),
    Impl("numpy_empty_like", "baseline", "dispatch", numpy_empty_like),
    Impl("tf_norm_eager", "tf", "norm_pass",
         lambda d: _norm_runner(lambda: tf.linalg.global_norm(d.tensors)), skip=_not_mixed),
    Impl("clipops_norm_eager", "clipops", "norm_pass",
         lambda d: _norm_runner(lambda: clipops.global_norm(d.tensors))),
    Impl("numpy_norm", "clipops", "norm_pass",
         lambda d: _norm_runner(lambda: cnp.global_norm(d.arrays))),
)

# (name, TF implementation, clipops implementation): TF's time / clipops' time
RATIOS = (
    ("eager", "tf_eager", "clipops_eager"),
    ("function", "tf_function", "clipops_function"),
    ("function_forwarded", "tf_function_fwd", "clipops_function_fwd"),
    ("xla_vs_clipops_function", "tf_xla", "clipops_function"),
)


def floor_bytes(case: Case, role: str) -> int:
    """Bytes the work must move at least: clipping reads the list twice and
    writes it once; without clipping, forwarded buffers are only read."""
    per_list = {"clip": 3 if case.clipping else 1, "forwarded": 1, "norm_pass": 1,
                "producer": 2, "dispatch": 3 if case.clipping else 1}[role]
    return per_list * case.nbytes


# ---- validation ----------------------------------------------------------------

def _outputs_report(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict:
    """Worst deviation of outputs from the reference, by the dtype's tolerance."""
    worst_excess, worst_abs, ok = -math.inf, 0.0, len(outs) == len(refs)
    for o, r in zip(outs, refs):
        rtol, atol = OUT_TOL[r.dtype.name]
        ok = ok and o.dtype == r.dtype and o.shape == r.shape
        err = np.abs(o.astype(np.float32) - r.astype(np.float32))
        excess = float(np.max(err - rtol * np.abs(r.astype(np.float32)) - atol, initial=-math.inf))
        worst_excess = max(worst_excess, excess)
        worst_abs = max(worst_abs, float(np.max(err, initial=0.0)))
    return {"outputs_ok": bool(ok and worst_excess <= 0), "max_abs_err": worst_abs}


def check(outs: list[np.ndarray] | None, norm: float, ref: tuple[list[np.ndarray], float],
          norm64: float, inputs: Sequence[np.ndarray], clipping: bool) -> dict:
    """One implementation's result against TF's and the float64 norm."""
    report = {"norm": norm, "norm_rel_err_tf": abs(norm - ref[1]) / ref[1],
              "norm_rel_err_f64": abs(norm - norm64) / norm64}
    report["norm_ok"] = max(report["norm_rel_err_tf"], report["norm_rel_err_f64"]) <= NORM_RTOL
    if outs:
        report.update(_outputs_report(outs, ref[0]))
        if not clipping:  # the scale is exactly 1: the outputs are the inputs
            report["unchanged"] = all(np.array_equal(o, a) for o, a in zip(outs, inputs))
            report["outputs_ok"] = report["outputs_ok"] and report["unchanged"]
    report["ok"] = report["norm_ok"] and report.get("outputs_ok", True)
    return report


def validate(d: CaseData, runners: dict[str, tuple[Impl, Runner]]) -> dict:
    """Checks every implementation once; only clipops' results can fail the case."""
    ref_out, ref_norm = tf_clip_for(d)(d.tensors, d.clip_norm)
    ref = ([t.numpy() for t in ref_out], float(ref_norm))
    report = {"tf_norm_rel_err_f64": abs(ref[1] - d.norm64) / d.norm64, "impls": {}}
    for name, (impl, runner) in runners.items():
        if runner.fetch is None:
            continue
        if runner.setup:
            runner.setup()
        t0 = time.perf_counter()
        result = runner.call()
        runner.sync(result)
        first_call_s = time.perf_counter() - t0  # includes tracing and compiling
        outs, norm = runner.fetch(result)
        report["impls"][name] = check(outs, norm, ref, d.norm64, d.arrays, d.case.clipping)
        report["impls"][name]["first_call_s"] = first_call_s
    report["ok"] = all(r["ok"] for n, r in report["impls"].items()
                       if runners[n][0].family == "clipops")
    return report


# ---- timing -------------------------------------------------------------------

def _timed(runner: Runner) -> float:
    if runner.setup:
        runner.setup()
    t0 = time.perf_counter()
    runner.sync(runner.call())  # the result is dropped before the next call
    return time.perf_counter() - t0


Blocks = list[list[float]]  # per round, the times of one block of calls


def _net(blocks: Blocks, baseline: Blocks, chain: int) -> dict:
    """Per round, (median of the block - the baseline's block median) / chain:
    the time of one clip beyond the baseline; its median and spread over rounds."""
    net = summarize([(statistics.median(b) - statistics.median(p)) / chain
                     for b, p in zip(blocks, baseline)])
    return {"net_median_s": net["median_s"], "net_p10_s": net["p10_s"],
            "net_p90_s": net["p90_s"], "chain": chain}


def _warm_up(case: Case, name: str, runner: Runner, warmup: int) -> float:
    """Untimed calls; returns their median, an estimate of one call."""
    estimate = statistics.median(_timed(runner) for _ in range(max(warmup, 1)))
    print(f"  [{case.name}] {name:27s} warm, ~{estimate * 1e3:.3f} ms a call", flush=True)
    return estimate


def block_sizes(estimates: dict[str, float], s: Settings) -> dict[str, int]:
    """Calls per block: `repeats` calls over `rounds` blocks, fewer calls when
    they would take longer than budget_s, never under MIN_REPEATS in all."""
    calls = {n: max(MIN_REPEATS, min(s.repeats, int(s.budget_s / max(e, 1e-9))))
             for n, e in estimates.items()}
    return {n: math.ceil(c / s.rounds) for n, c in calls.items()}


def run_rounds(runners: dict[str, Runner], estimates: dict[str, float],
               s: Settings) -> dict[str, Blocks]:
    """In each round, a block of calls of every runner in turn (GC off). A block
    of short calls starts with an untimed one, which restores the state (caches,
    thread pools) that the other implementations' blocks disturbed."""
    sizes = block_sizes(estimates, s)
    times: dict[str, Blocks] = {name: [] for name in runners}
    gc.collect()
    gc.disable()
    try:
        for _ in range(s.rounds):
            for name, runner in runners.items():
                if estimates[name] < REWARM_BELOW_S:
                    _timed(runner)
                times[name].append([_timed(runner) for _ in range(sizes[name])])
    finally:
        gc.enable()
    return times


# ---- the machine: bandwidth and other load ---------------------------------------

CpuSnapshot = tuple[float, float, float]


def cpu_snapshot() -> CpuSnapshot | None:
    """(CPU seconds busy on the whole machine, including time stolen by the
    hypervisor; CPU seconds of this process; wall seconds), or None without /proc."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def background_cores(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Cores' worth of CPU that other processes (or the hypervisor) took meanwhile."""
    if before is None or after is None:
        return None
    busy, own, wall = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / wall)


# ---- one case -----------------------------------------------------------------

@dataclass
class Settings:
    warmup: int
    repeats: int
    rounds: int
    retries: int
    budget_s: float
    seed: int
    gbs: float  # copy bandwidth, for the progress lines


def _progress(case: Case, name: str, r: dict, floor_s: float) -> None:
    t = r.get("net_median_s", r["median_s"])
    net = f" net, per clip of {r['chain']}" if "net_median_s" in r else ""
    first = "" if r["first_call_s"] is None else f"  first call {r['first_call_s']:.2f} s"
    print(f"  [{case.name}] {name:27s} {r['median_s'] * 1e3:10.3f} ms  "
          f"(p10 {r['p10_s'] * 1e3:.3f}, p90 {r['p90_s'] * 1e3:.3f}, n={r['repeats']})  "
          f"x{t / floor_s:.2f} floor{net}{first}", flush=True)


def time_case(d: CaseData, runners: dict[str, tuple[Impl, Runner]], s: Settings,
              checked: dict[str, dict]) -> dict:
    """Times every implementation in rounds: each round runs a block of calls
    of each implementation in turn, so that a burst of load from elsewhere
    hits them all alike, while each call still follows one of its own. The
    first call (made by validation, with any tracing and compiling) is
    reported apart."""
    estimates = {name: _warm_up(d.case, name, runner, s.warmup)
                 for name, (_, runner) in runners.items()}
    times = run_rounds({name: runner for name, (_, runner) in runners.items()}, estimates, s)
    results = {}
    for name, (impl, _) in runners.items():
        r = summarize([t for block in times[name] for t in block])
        if impl.role == "forwarded":
            r.update(_net(times[name], times["producer"], forward_chain(d.case)))
        r.update(family=impl.family, role=impl.role, rounds=s.rounds,
                 first_call_s=checked.get(name, {}).get("first_call_s"))
        results[name] = r
        _progress(d.case, name, r, floor_bytes(d.case, impl.role) / (s.gbs * 1e9))
    return results


def case_header(case: Case, d: CaseData) -> dict:
    dtypes = {dt: case.dtypes.count(dt) for dt in sorted(set(case.dtypes))}
    return {"description": case.description, "num_tensors": len(case.shapes),
            "numel": case.numel, "nbytes": case.nbytes, "dtypes": dtypes,
            "clipping": case.clipping, "clip_norm": d.clip_norm, "norm_f64": d.norm64,
            "largest_tensor": max(math.prod(s) for s in case.shapes)}


def run_case(case: Case, s: Settings) -> dict:
    """Validates, then times, every implementation that applies to the case."""
    print(f"[{case.name}] {len(case.shapes)} tensors, {case.numel:,} elements, "
          f"{case.nbytes / 1e6:.1f} MB", flush=True)
    d = make_data(case, s.seed)
    out = case_header(case, d)
    out["skipped"] = {i.name: i.skip(case) for i in IMPLS if i.skip(case)}
    runners = {i.name: (i, i.build(d)) for i in IMPLS if not i.skip(case)}
    out["validation"] = validate(d, runners)
    if not out["validation"]["ok"]:
        bad = [n for n, r in out["validation"]["impls"].items() if not r["ok"]]
        print(f"  [{case.name}] VALIDATION FAILED: {bad}; not timed", flush=True)
        return out
    kept, out["background_cores"], out["attempts_background_cores"] = \
        time_quietly(d, runners, s, out["validation"]["impls"])
    out["results"], out["bandwidth"] = kept["results"], kept["bandwidth"]
    return out


def time_quietly(d: CaseData, runners: dict[str, tuple[Impl, Runner]], s: Settings,
                 checked: dict[str, dict]) -> tuple[dict, float | None, list[float | None]]:
    """Times the case, again (up to s.retries times) while other processes took
    more than BUSY_WARNING_CORES meanwhile; keeps the least disturbed attempt.
    Each attempt is bracketed by copy-bandwidth measurements, so that the
    case's floor comes from the minutes it was timed in (the VM's speed
    drifts over a run). Returns {"results", "bandwidth"} of the kept attempt,
    its background load and every attempt's."""
    attempts: list[tuple[dict, float | None]] = []
    for attempt in range(s.retries + 1):
        before = cpu_snapshot()
        bandwidth_before = copy_bandwidth_gbs(repeats=CASE_BANDWIDTH_REPEATS)
        results = time_case(d, runners, s, checked)
        bandwidth_after = copy_bandwidth_gbs(repeats=CASE_BANDWIDTH_REPEATS)
        load = background_cores(before, cpu_snapshot())
        bandwidth = {"gbs": max(bandwidth_before["gbs"], bandwidth_after["gbs"]),
                     "before": bandwidth_before["gbs"], "after": bandwidth_after["gbs"]}
        attempts.append(({"results": results, "bandwidth": bandwidth}, load))
        if (load or 0.0) <= BUSY_WARNING_CORES:
            break
        again = "timing it again" if attempt < s.retries else "keeping the least disturbed"
        print(f"  [{d.case.name}] WARNING: other processes used {load:.2f} cores while this "
              f"case was timed; {again}", flush=True)
    kept, load = min(attempts, key=lambda a: a[1] or 0.0)
    return kept, load, [a[1] for a in attempts]


# ---- derived numbers and targets ------------------------------------------------

def _time(r: dict) -> float:
    return r.get("net_median_s", r["median_s"])


def add_derived(cases: dict, defs: Sequence[Case], gbs: float) -> None:
    """Floors, time/floor per implementation, and TF/clipops ratios. A case's
    floors use the bandwidth measured around its own timing (the higher of
    before and after: the stricter floor), or `gbs` where it has none."""
    for case in defs:
        c = cases[case.name]
        results = c.get("results")
        if not results:
            continue
        gbs_case = c.get("bandwidth", {}).get("gbs", gbs)
        for r in results.values():
            r["floor_s"] = floor_bytes(case, r["role"]) / (gbs_case * 1e9)
            r["floor_ratio"] = _time(r) / r["floor_s"]
        c["floor_s"] = floor_bytes(case, "clip") / (gbs_case * 1e9)
        c["ratios"] = {key: _time(results[a]) / _time(results[b])
                       for key, a, b in RATIOS if a in results and b in results}
        if "tf_function_fwd" in results and "clipops_function_fwd" in results:
            c["ratios"]["function_forwarded_gross"] = (results["tf_function_fwd"]["median_s"] /
                                                       results["clipops_function_fwd"]["median_s"])


# (description, case, kind, key, op, threshold): kind "ratio" reads case["ratios"][key],
# kind "floor" reads case["results"][key]["floor_ratio"]
TARGETS = [
    ("small list, eager: clipops >= 6x faster than TF", "mnist", "ratio", "eager", ">=", 6.0),
    ("small list, tf.function: clipops >= 1.5x faster than TF", "mnist", "ratio",
     "function", ">=", 1.5),
    *[(f"large list, clipping: {impl} within 1.15x of the bandwidth floor", case, "floor",
       impl, "<=", 1.15)
      for case in ("resnet50", "bert_base")
      for impl in ("clipops_function", "clipops_eager", "numpy", "numpy_inplace")],
    *[(f"10,000 small tensors: {impl} within 5x of the bandwidth floor", "small_10k", "floor",
       impl, "<=", 5.0)
      for impl in ("clipops_eager", "numpy", "numpy_inplace")],
    *[(f"mixed float16/float32 list: {impl} within 1.3x of the bandwidth floor",
       "mixed_f16_f32", "floor", impl, "<=", 1.3)
      for impl in ("clipops_function", "clipops_eager", "numpy", "numpy_inplace")],
    *[("no clipping, forwarded buffers: clipops >= 2x faster than TF (net of the producer)",
       case, "ratio", "function_forwarded", ">=", 2.0)
      for case in ("mnist_noclip", "resnet50_noclip")],
]

# The route each clipops row goes through, and the "dispatch" row that times
# that route doing no arithmetic (an eager TF op, a tf.function call) right
# after the list streamed through the caches, as each clip's call does. The
# copying NumPy call has no such row: numpy_empty_like is what NumPy's own
# calls cost, and clipops makes its outputs in C++ for less (small ones as
# views of one block).
ROUTE_COST = {"clipops_eager": "tf_identity_n_cold",
              "clipops_function": "tf_function_identity_n_cold"}
KERNEL_ROW = "numpy_inplace"  # the same kernel with no route: no op, no function, no outputs


def route_bound(case: dict, kind: str, key: str) -> float | None:
    """What a target's metric would be had the call cost only its route (the
    dispatch row, no arithmetic) plus the kernel's in-place time on the same
    list in the same run; None where the run does not say.

    Where this misses the target too, the route's own cost accounts for the
    miss: a faster kernel would have to beat its own in-place time. Both rows
    run right after the same untimed stream of the list (the route row is
    the *_cold one), as a clip's call follows its predecessor's. What the op
    adds beyond them (its Python wrapper, its outputs, TF's thread pool instead
    of clipops') is not in the bound, so where it meets, the miss is the op's
    to find, not yet proven to be its kernel's. Floor targets: (route +
    in-place) / floor; speed-ups: TF's time / (route + in-place). Forwarded
    rows are net of a producer that carries the route, and copying NumPy has
    no route row, so neither gets one."""
    results = case.get("results") or {}
    clipops_impl = key if kind == "floor" else next(
        (b for k, a, b in RATIOS if k == key and k != "function_forwarded"), None)
    route = ROUTE_COST.get(clipops_impl)
    if route not in results or KERNEL_ROW not in results:
        return None
    least = results[route]["median_s"] + results[KERNEL_ROW]["median_s"]
    if kind == "floor":
        return least / case["floor_s"] if case.get("floor_s") else None
    tf_impl = next(a for k, a, b in RATIOS if k == key)
    return _time(results[tf_impl]) / least if tf_impl in results else None


def evaluate_targets(cases: dict) -> list[dict]:
    rows = []
    for text, case, kind, key, op, threshold in TARGETS:
        c = cases.get(case, {})
        source = c.get("ratios", {}) if kind == "ratio" else {
            k: v["floor_ratio"] for k, v in c.get("results", {}).items()}
        value = source.get(key)
        meets = lambda v: v >= threshold if op == ">=" else v <= threshold  # noqa: E731
        bound = route_bound(c, kind, key) if c.get("results") else None
        rows.append({"target": text, "case": case, "metric": key, "op": op,
                     "threshold": threshold, "value": value,
                     "met": None if value is None else meets(value), "route_bound": bound,
                     "route_bound_met": None if bound is None else meets(bound)})
    return rows


# ---- main ----------------------------------------------------------------------

def _gbs_by_threads(bandwidth: dict) -> str:
    return ", ".join(f"{t}: {g:.1f}" for t, g in bandwidth.get("by_threads", {}).items())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [c.name for c in build_cases(smoke=True)]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=OUT,
                   help="directory for micro.json, micro.md and micro.png (default: %(default)s, "
                        "untracked; `--out bench/results` replaces the committed reference)")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes and few repeats, under a minute (CI: keeps the script alive)")
    p.add_argument("--cases", nargs="+", choices=names, metavar="CASE",
                   help=f"cases to run (default: all): {', '.join(names)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per implementation and case, at most (default 200; "
                        "smoke 5); fewer when they would take longer than --budget, never "
                        "under 5")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds the calls are spread over, each running a block of every "
                        "implementation in turn (default 5; smoke 2)")
    p.add_argument("--retries", type=int, default=None,
                   help="times a case is timed again when other processes took more than "
                        f"{BUSY_WARNING_CORES} cores meanwhile; the least disturbed attempt "
                        "is kept (default 2; smoke 0)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; smoke 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per implementation and case, roughly "
                        "(default 2.5; smoke 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random gradients")
    p.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log")
    p.add_argument("--health", action="store_true",
                   help="then the gradient-health ops (clip_by_norm, clip_by_value, per-tensor "
                        "norms) against TF's per-tensor loops: bench/health.py, validated first, "
                        "into health.json and health.md beside micro's results")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, gbs: float) -> Settings:
    pick = lambda value, full, smoke: value if value is not None else (smoke if args.smoke else full)  # noqa: E731
    return Settings(warmup=pick(args.warmup, 3, 1), repeats=pick(args.repeats, 200, MIN_REPEATS),
                    rounds=pick(args.rounds, 5, 2), retries=pick(args.retries, 2, 0),
                    budget_s=pick(args.budget, 2.5, 0.2), seed=args.seed, gbs=gbs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    snapshot = cpu_snapshot()
    bandwidth_start = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bandwidth_start['gbs']:.1f} GB/s, read + written "
          f"(by threads: {_gbs_by_threads(bandwidth_start)})", flush=True)
    s = settings_from(args, bandwidth_start["gbs"])
    selected = [c for c in build_cases(args.smoke) if not args.cases or c.name in args.cases]
    cases = {c.name: run_case(c, s) for c in selected}
    bandwidth_end = copy_bandwidth_gbs()
    # where a case has no bandwidth of its own (not timed), the higher of these two
    gbs = max(bandwidth_start["gbs"], bandwidth_end["gbs"])
    add_derived(cases, selected, gbs)
    payload = {
        "benchmark": "micro", "smoke": args.smoke, "machine": machine_info(),
        "tf_threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        "settings": {"warmup": s.warmup, "repeats": s.repeats, "rounds": s.rounds,
                     "retries": s.retries, "busy_warning_cores": BUSY_WARNING_CORES,
                     "budget_s": s.budget_s, "rewarm_below_s": REWARM_BELOW_S,
                     "forward_chain": FORWARD_CHAIN,
                     "forward_chain_below_bytes": FORWARD_CHAIN_BELOW_BYTES,
                     "min_repeats": MIN_REPEATS, "seed": s.seed, "data_scale": DATA_SCALE,
                     "case_bandwidth_repeats": CASE_BANDWIDTH_REPEATS},
        "bandwidth": {"gbs": gbs, "start": bandwidth_start, "end": bandwidth_end},
        "cases": cases, "targets": evaluate_targets(cases),
        "wall_s": time.perf_counter() - started,
        "background_cores": background_cores(snapshot, cpu_snapshot()),
    }
    path = write_json("micro", payload, args.out)
    md_path, png_path = plot.render_all(path)
    print(md_path.read_text())
    print(f"wrote {path}, {md_path}{f', {png_path}' if png_path else ''} in "
          f"{payload['wall_s']:.0f} s")
    failed = [n for n, c in cases.items() if not c["validation"]["ok"]]
    if failed:
        print(f"VALIDATION FAILED for {', '.join(failed)}", file=sys.stderr)
    health_rc = 0
    if args.health:
        import health
        health_rc = health.main(["--out", str(args.out)] + (["--smoke"] if args.smoke else []))
    return 1 if failed or health_rc else 0


if __name__ == "__main__":
    sys.exit(main())
