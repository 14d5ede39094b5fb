#!/usr/bin/env python3
"""GPU benchmark of clipops.cupy.

Clipping alone (clip_by_global_norm), against
  - the device's measured copy bandwidth (the limit: clipping reads every
    element twice and writes it once, 12 bytes per float32 element);
  - torch.nn.utils.clip_grad_norm_(foreach=True);
  - optax.clip_by_global_norm under jax.jit;
  - a naive CuPy version (a norm per tensor, sum, sqrt, a scale per tensor).
The fused clip + optimizer step (adamw_update: global clip + AdamW, float32,
the step and the learning rate on the device), against
  - the copy bandwidth, at 32 bytes per parameter (the gradient read by the
    norm pass and again by the update, p, m and v read and written);
  - torch.nn.utils.clip_grad_norm_(foreach=True) + torch.optim.AdamW(fused=True);
  - optax.chain(optax.clip_by_global_norm, optax.adamw) under jax.jit;
with the kernel launches per call counted (torch.profiler, i.e. CUPTI).
Peers that are not installed are skipped with the reason. Every
implementation's result is checked against a float64 reference before it is
timed (the optimizer's: two steps from a fresh state, each implementation
against its own formula); a wrong one is reported and not timed.

Usage, on a GPU machine with clipops installed (Python puts only bench/ on
sys.path, so the source tree's clipops/ does not shadow the installed package):
    python bench/gpu.py            # all cases, a few minutes
    python bench/gpu.py --smoke    # small cases, a quick check; targets not judged
    python bench/gpu.py --suite optim   # only the fused clip + AdamW rows
Results: bench/out/gpu_<device>_<date>[_smoke].json (--out-dir bench/results to commit), a .md table and
a .png plot beside it.

Timing.
  device time: CUDA events between consecutive calls on one CuPy stream
    (torch runs on the same stream through torch.cuda.ExternalStream). A spin
    kernel holds the GPU while the host queues every repetition, so the gaps
    between events are GPU time, not Python time; the median after warm-up.
  pipelined: N calls back to back, one synchronisation, wall time / N. The
    only honest common measure with JAX, whose streams CuPy cannot record
    events on; where the host is slower than the GPU it measures the host.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

# JAX would otherwise take 75% of the GPU memory at its first use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

from cases import Case, bert_shapes, mixed_dtypes, mnist_shapes, resnet50_shapes, small_shapes
from cases import case as make_case
from common import machine_info, write_json
from report import pyplot, save, table

try:
    import cupy
except ImportError:
    sys.exit("bench/gpu.py needs CuPy: pip install cupy-cuda13x")

import clipops.cupy as ccp
from clipops import _common, _nvrtc

# ---- cases (bench/cases.py's lists, as on the CPU) -------------------------------


def cases(smoke: bool) -> list[Case]:
    """The full cases, or (smoke) the small ones: targets are not judged on those."""
    resnet = resnet50_shapes()
    mixed = make_case("resnet50_mixed_fp16_fp32", "float16 weights, float32 batch-norm parameters",
                 resnet, dtypes=mixed_dtypes(resnet))
    if smoke:
        return [make_case("mnist_mlp", "", mnist_shapes()),
                make_case("small_x1000", "", small_shapes(1000)), mixed]
    return [make_case("mnist_mlp", "", mnist_shapes()), make_case("resnet50", "", resnet),
            make_case("bert_base", "", bert_shapes()), make_case("small_x10000", "", small_shapes(10_000)),
            mixed]


def bytes_moved(c: Case) -> int:
    """Two reads and one write of every element: the traffic of any clip."""
    return 3 * c.nbytes


# ---- measuring -----------------------------------------------------------------

_SPIN = r"""
extern "C" __global__ void clipops_bench_spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""
_spin_kernel = None


def spin(seconds: float) -> None:
    """Occupies the current stream for `seconds` of GPU time."""
    global _spin_kernel
    if _spin_kernel is None:
        _spin_kernel = cupy.RawKernel(_SPIN, "clipops_bench_spin")
    _spin_kernel((1,), (1,), (np.uint64(int(seconds * 1e9)),))


def device_times(run: Callable[[], object], stream, reps: int) -> tuple[list[float], bool]:
    """Seconds of GPU time per call (event gaps), and whether the queue stayed
    primed, i.e. the host had queued every call before the GPU got to it."""
    with stream:
        t0 = time.perf_counter()
        run()
        stream.synchronize()
        per_call = time.perf_counter() - t0
        spin_s = min(30.0, 2.0 * reps * per_call + 0.01)
        for _ in range(3):  # a queue that drained early is retried with a longer spin
            events = [cupy.cuda.Event() for _ in range(reps + 1)]
            spin(spin_s)
            events[0].record(stream)
            for k in range(reps):
                run()
                events[k + 1].record(stream)
            primed = not events[0].done
            stream.synchronize()
            if primed:
                break
            spin_s = min(60.0, 4 * spin_s)
    return [cupy.cuda.get_elapsed_time(events[k], events[k + 1]) / 1e3 for k in range(reps)], primed


def pipelined_times(run: Callable[[], object], sync: Callable[[object], None], reps: int,
                    rounds: int) -> list[float]:
    """Wall seconds per call of `reps` calls queued back to back, per round."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        last = None
        for _ in range(reps):
            last = run()
        sync(last)
        out.append((time.perf_counter() - t0) / reps)
    return out


def copy_bandwidth(nbytes: int, stream, reps: int) -> dict:
    """Device-to-device copy bandwidth, bytes read + written per second:
    cudaMemcpyAsync and CuPy's copy kernel; the faster is the limit."""
    n = nbytes // 4
    with stream:
        src = cupy.ones(n, dtype=cupy.float32)
        dst = cupy.empty_like(src)
        copies = {"memcpy": lambda: dst.data.copy_from_device_async(src.data, src.nbytes, stream),
                  "copy_kernel": lambda: cupy.copyto(dst, src)}
        res = {}
        for name, fn in copies.items():
            for _ in range(3):
                fn()
            t, _ = device_times(fn, stream, reps)
            res[name + "_gbs"] = 2 * src.nbytes / statistics.median(t) / 1e9
    res["gbs"] = max(res["memcpy_gbs"], res["copy_kernel_gbs"])
    res["bytes"] = nbytes
    return res


# ---- the implementations ---------------------------------------------------------

# Accepted error of an output, relative to the float64 result: the roundings of
# a norm and a scale in the dtype, with margin (float32 2^-24 ~ 6e-8; float16 2^-11 ~ 4.9e-4).
RTOL = {"float16": 4e-3, "float32": 1e-5, "float64": 1e-12}
ATOL = {"float16": 2.0**-24, "float32": 2.0**-149, "float64": 5e-324}


@dataclass
class Impl:
    """One implementation set up for one case: run() clips once; outputs(r)
    and norm(r) read its result (as CuPy arrays and a float) for validation."""

    name: str
    run: Callable[[], object]
    outputs: Callable[[object], list]
    norm: Callable[[object], float | None]
    sync: Callable[[object], None]
    on_cupy_stream: bool = True
    restore: Callable[[], None] = lambda: None  # puts fresh gradients back (in-place peers)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    info: dict = field(default_factory=dict)


@contextlib.contextmanager
def nvrtc_route(force: bool):
    old = os.environ.get("CLIPOPS_FORCE_NVRTC")
    if force:
        os.environ["CLIPOPS_FORCE_NVRTC"] = "1"
    else:
        os.environ.pop("CLIPOPS_FORCE_NVRTC", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CLIPOPS_FORCE_NVRTC", None)
        else:
            os.environ["CLIPOPS_FORCE_NVRTC"] = old


def make_clipops(xs, clip, stream, nvrtc: bool) -> Impl:
    return Impl(f"clipops ({'nvrtc' if nvrtc else 'nvcc'})",
                run=lambda: ccp.clip_by_global_norm(xs, clip),
                outputs=lambda r: r[0], norm=lambda r: float(r[1]),
                sync=lambda r: stream.synchronize(),
                context=lambda: nvrtc_route(nvrtc))


def make_naive_cupy(xs, clip, stream) -> Impl:
    def run():
        sq = [cupy.sum(cupy.square(x.astype(cupy.float64 if x.dtype == cupy.float64 else cupy.float32,
                                            copy=False)))
              for x in xs]
        total = cupy.sqrt(cupy.sum(cupy.stack(sq)))
        scale = clip / cupy.maximum(total, clip)
        return [x * scale.astype(x.dtype) for x in xs], total

    return Impl("naive cupy", run, lambda r: r[0], lambda r: float(r[1]),
                sync=lambda r: stream.synchronize())


def make_torch(xs, clip, stream) -> Impl:
    import torch

    ext = torch.cuda.ExternalStream(stream.ptr)
    with torch.cuda.stream(ext):
        fresh = [torch.from_dlpack(x).clone() for x in xs]
        params = [torch.empty_like(g).requires_grad_() for g in fresh]
        grads = [g.clone() for g in fresh]
        for p, g in zip(params, grads):
            p.grad = g

    def run():
        with torch.cuda.stream(ext):
            return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)

    def restore():
        with torch.cuda.stream(ext):
            for g, f in zip(grads, fresh):
                g.copy_(f)

    return Impl("torch clip_grad_norm_ foreach", run,
                outputs=lambda r: [cupy.from_dlpack(g) for g in grads],
                norm=lambda r: float(r), sync=lambda r: stream.synchronize(), restore=restore,
                info={"torch": torch.__version__})


def make_optax(xs, clip, stream) -> Impl:
    import jax
    import optax

    dev = jax.devices("gpu")[0]
    stream.synchronize()
    gs = [jax.device_put(jax.dlpack.from_dlpack(x.copy()), dev) for x in xs]
    tx = optax.clip_by_global_norm(clip)
    state = tx.init(gs)
    fn = jax.jit(lambda g: tx.update(g, state)[0])
    jax.block_until_ready(fn(gs))  # compile outside the timing

    # optax returns no norm: its outputs alone are validated
    return Impl("optax clip_by_global_norm (jit)", lambda: fn(gs),
                outputs=lambda r: [cupy.from_dlpack(o) for o in r],
                norm=lambda r: None, sync=lambda r: jax.block_until_ready(r),
                on_cupy_stream=False, info={"jax": jax.__version__, "optax": optax.__version__})


PEERS: list[tuple[str, str, Callable]] = [
    ("naive cupy", "cupy", make_naive_cupy),
    ("torch clip_grad_norm_ foreach", "torch", make_torch),
    ("optax clip_by_global_norm (jit)", "optax", make_optax),
]


def peer_missing(module: str) -> str | None:
    try:
        if module == "torch":
            import torch

            return None if torch.cuda.is_available() else "torch has no CUDA here"
        if module == "optax":
            if importlib.util.find_spec("optax") is None:
                return "not installed (no module named 'optax')"
            import jax

            try:
                jax.devices("gpu")
            except RuntimeError:
                return "JAX has no GPU backend here"
        return None
    except ImportError as exc:
        return f"not installed ({exc})"


# ---- validation -------------------------------------------------------------------

def validate(impl: Impl, result, xs, dtypes, ref_norm: float, clip: float) -> dict:
    """Largest error of the norm and of any output element, as a fraction of
    the accepted tolerance (<= 1 passes)."""
    scale = clip / max(ref_norm, clip)
    worst = 0.0
    outs = impl.outputs(result)
    if len(outs) != len(xs):
        return {"ok": False, "why": f"{len(outs)} outputs for {len(xs)} inputs"}
    for x, o, d in zip(xs, outs, dtypes):
        if o.shape != x.shape or o.dtype != x.dtype:
            return {"ok": False, "why": f"output {o.shape} {o.dtype} for input {x.shape} {x.dtype}"}
        if x.size:
            ref = x.astype(cupy.float64) * scale
            err = cupy.abs(o.astype(cupy.float64) - ref) / (ATOL[d] + RTOL[d] * cupy.abs(ref))
            worst = max(worst, float(err.max()))
    norm = impl.norm(result)
    norm_rtol = max(RTOL[d] for d in dtypes) / 2
    norm_err = 0.0 if norm is None else abs(norm - ref_norm) / (norm_rtol * ref_norm)
    ok = worst <= 1.0 and norm_err <= 1.0
    return {"ok": ok, "output_err_over_tol": worst, "norm_err_over_tol": norm_err,
            "norm": norm, "ref_norm": ref_norm,
            **({} if ok else {"why": f"error {max(worst, norm_err):.3g}x the tolerance"})}


# ---- one case -------------------------------------------------------------------

def median_us(ts: list[float]) -> float:
    return statistics.median(ts) * 1e6


def run_case(case: Case, stream, args, routes: list[bool]) -> dict:
    print(f"\n== {case.name}: {len(case.shapes)} tensors, {case.numel:,} elements", flush=True)
    rng = cupy.random.default_rng(0)
    with stream:
        # gradient-like magnitudes: float16 squares stay normal, norms stay finite
        xs = [(rng.standard_normal(math.prod(s), dtype=cupy.float32) * 1e-2).astype(d).reshape(s)
              for s, d in zip(case.shapes, case.dtypes)]
        ref_norm = math.sqrt(sum(float(cupy.sum(cupy.square(x.astype(cupy.float64)))) for x in xs))
        stream.synchronize()
    clip = float(np.float32(ref_norm / 2))  # every implementation really scales
    record = {"case": case.name, "note": case.description, "tensors": len(case.shapes),
              "elements": case.numel, "bytes_moved": bytes_moved(case),
              "dtypes": sorted(set(case.dtypes)), "ref_norm": ref_norm, "clip_norm": clip,
              "results": {}}

    makers = [(f"clipops ({'nvrtc' if r else 'nvcc'})",
               lambda xs, c, s, r=r: make_clipops(xs, c, s, r)) for r in routes]
    run_impls(record, makers, PEERS, 34, lambda maker: maker(xs, clip, stream),
              lambda impl: measure(impl, case, xs, ref_norm, clip, stream, args),
              lambda res: f"   ({res['reps']} reps"
                          f"{'' if res.get('primed', True) else ', queue NOT primed'})")
    add_gbs(record, bytes_moved(case))
    return record


def run_impls(record: dict, makers: list, peers: list, width: int, make: Callable,
              measure_one: Callable, more: Callable[[dict], str]) -> None:
    """Sets up and measures every implementation of one case into
    record["results"], printing a line each: clipops' routes (makers: (name,
    maker)), then each peer (name, module, maker) that is installed. A peer
    that is missing or fails its setup is reported as skipped, not fatal.
    make(maker) sets one up, measure_one(impl) gives its row, more(row) ends
    its printed line; width: the names' column."""
    makers = list(makers)
    for name, module, maker in peers:
        reason = peer_missing(module)
        if reason:
            record["results"][name] = {"skipped": reason}
            print(f"  {name:{width}s} skipped: {reason}")
        else:
            makers.append((name, maker))
    for name, maker in makers:
        try:
            impl = make(maker)
        except Exception as exc:  # a peer that cannot even set up is reported, not fatal
            record["results"][name] = {"skipped": f"setup failed: {exc!r}"}
            print(f"  {name:{width}s} skipped: setup failed: {exc!r}")
            continue
        with impl.context():
            res = measure_one(impl)
        res.update(impl.info)
        record["results"][name] = res
        if "skipped" in res or "invalid" in res:
            print(f"  {name:{width}s} {res.get('skipped') or res.get('invalid')}")
        else:
            dev = f"{res['device_us']:10.1f} us" if "device_us" in res else " " * 13
            print(f"  {name:{width}s} device {dev}   pipelined {res['pipelined_us']:10.1f} us"
                  f"{more(res)}", flush=True)
        del impl
        cupy.get_default_memory_pool().free_all_blocks()


def add_gbs(record: dict, nbytes: int) -> None:
    """Each timed row's times as bandwidths: the case's bytes moved per second."""
    for r in record["results"].values():
        for k in ("device_us", "pipelined_us"):
            if k in r:
                r[k.replace("_us", "_gbs")] = nbytes / (r[k] * 1e-6) / 1e9


def measure(impl: Impl, case: Case, xs, ref_norm: float, clip: float, stream, args) -> dict:
    with stream:
        impl.restore()
        try:
            first = impl.run()
            impl.sync(first)
        except Exception as exc:
            return {"skipped": f"failed: {exc!r}"}
        check = validate(impl, first, xs, case.dtypes, ref_norm, clip)
        del first
        if not check["ok"]:
            return {"invalid": check["why"], "validation": check}
        return time_impl(impl, check, stream, args)


def time_impl(impl, check: dict, stream, args) -> dict:
    """The timings of a validated implementation (Impl or OptimImpl; called
    under `with stream:`): after args.warmup calls, one call's wall time, then
    device times (on CuPy's stream) and pipelined wall times over as many
    repetitions as fit in ~2 s, within [5, args.reps]. `check`: its validation."""
    for _ in range(args.warmup):
        impl.sync(impl.run())
    t0 = time.perf_counter()
    impl.sync(impl.run())
    one = time.perf_counter() - t0
    reps = int(max(5, min(args.reps, 2.0 / max(one, 1e-6))))
    res = {"validation": check, "reps": reps, "single_call_wall_us": one * 1e6}
    if impl.on_cupy_stream:
        times, primed = device_times(impl.run, stream, reps)
        res.update(device_us=median_us(times), device_p10_us=np.percentile(times, 10) * 1e6,
                   device_p90_us=np.percentile(times, 90) * 1e6, primed=primed)
    res.update(pipelined_us=median_us(pipelined_times(impl.run, impl.sync, reps, args.rounds)))
    return res


# ---- the fused clip + optimizer step (issue 25) -----------------------------------------

# AdamW's hyperparameters for every implementation (torch's defaults but for
# the decay; epsilon is each implementation's own, see adamw_reference).
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01)
OPTIM_STEPS = 2  # validated after two steps from a fresh state: m and v are not zero then
CLIPOPS_OPTIM = "clipops adamw_update"
TORCH_OPTIM = "torch clip_grad_norm_ + AdamW(fused)"
OPTAX_OPTIM = "optax chain(clip_by_global_norm, adamw) (jit)"


def optim_cases(smoke: bool) -> list[Case]:
    """float32 lists: the MNIST MLP and the ResNet-50-like list (25.6M parameters)."""
    if smoke:
        return [make_case("mnist_mlp", "", mnist_shapes()),
                make_case("small_x1000", "", small_shapes(1000))]
    return [make_case("mnist_mlp", "", mnist_shapes()), make_case("resnet50", "", resnet50_shapes())]


def optim_bytes_moved(c: Case) -> int:
    """The gradient read twice (the norm pass, then the update), p, m and v
    read and written: 32 B per float32 parameter."""
    return 2 * c.nbytes + 24 * c.numel


# The accepted error of a float32 implementation, against its float64 formula.
# The clip's scale inherits the float32 norm's error: a blocked or tree
# reduction of n float32 squares is within (log2(n) + 2) u of the exact sum
# (u = 2^-24), its square root half that; then m, v and the update term each
# take at most 8 float32 roundings per step: R = 2 (norm's + 16 u), a margin
# of 2. p adds the roundings of the decay and the subtraction (2 u |p| per step).
# The hyperparameters: Keras' (clipops') casts are known exactly and put into
# its reference; torch and optax compute 1 - beta and beta**t in float32 or in
# double depending on the release, so their bound also takes what float32
# constants could change: 1 - beta off by u beta / (1 - beta) relatively, and
# 1 - beta**t by (t + 1) u beta**t / (1 - beta**t).
U32 = 2.0 ** -24


def optim_rtol(numel: int) -> float:
    return 2 * ((math.log2(max(numel, 2)) + 2) * U32 + 16 * U32)


def adamw_reference(p0: list, grads: list, *, steps: int, conv: str, lr: float, b1: float,
                    b2: float, eps: float, wd: float, clip: float):
    """`steps` AdamW steps with a global-norm clip in float64, as each
    implementation defines them:
      keras (clipops): scale c / max(norm, c); p -= p*wd*lr; m += (g-m)(1-b1);
        v += (g^2-v)(1-b2); p -= m*alpha / (sqrt(v)+eps), alpha = lr sqrt(1-b2^t)/(1-b1^t),
        with Keras' float32 constants (lr, wd, eps, float32(1 - beta) and
        beta^t of float32 beta as the kernel derives it from the step counter);
      torch: scale min(1, c / (norm + 1e-6)), written into the gradient (the
        next step clips the clipped one); p *= 1 - lr*wd; p -= lr m^ / (sqrt(v^)+eps)
        with m^ = m/(1-b1^t), v^ = v/(1-b2^t);
      optax: scale 1 if norm < c else c / norm; p -= lr (m^/(sqrt(v^)+eps) + wd p).
    Returns (params, m, v, (p_bounds, m_bounds, v_bounds)): float64 lists, and
    per tensor the bounds on a float32 run's errors (see the comment above),
    carried from step to step."""
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    if conv == "keras":
        power = _common.load_core().power_by_squaring  # the kernel's beta**t (kPowersFromStep)
        lr, wd, eps = f32(lr), f32(wd), f32(eps)
        c1, c2 = f32(1 - b1), f32(1 - b2)  # 1 - beta in double, then float32, as Keras
        b1f, b2f = f32(b1), f32(b2)
        powers = lambda t: (power(b1f, t), power(b2f, t))  # noqa: E731
        dm = dv = 0.0
        dbc = lambda t: 0.0  # noqa: E731
    else:
        c1, c2 = 1 - b1, 1 - b2
        powers = lambda t: (b1 ** t, b2 ** t)  # noqa: E731
        dm, dv = U32 * b1 / (1 - b1), U32 * b2 / (1 - b2)
        dbc = lambda t: (t + 1) * U32 * (b1 ** t / (1 - b1 ** t) + 0.5 * b2 ** t / (1 - b2 ** t))  # noqa: E731
    g = [np.asarray(x, np.float64) for x in grads]
    p = [np.asarray(x, np.float64).copy() for x in p0]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    bp, bm, bv = ([np.zeros_like(x) for x in p] for _ in range(3))
    rtol = optim_rtol(sum(x.size for x in p))
    for t in range(1, steps + 1):
        norm = math.sqrt(sum(float(np.dot(x.ravel(), x.ravel())) for x in g))
        if conv == "keras":
            scale = clip / max(norm, clip)
        elif conv == "torch":
            scale = min(1.0, clip / (norm + 1e-6))
        else:
            scale = 1.0 if norm < clip else clip / norm
        gc = [x * scale for x in g]
        if conv == "torch":
            g = gc  # clip_grad_norm_ scales the gradients in place
        b1t, b2t = powers(t)
        bc1, bc2 = 1 - b1t, 1 - b2t
        for i in range(len(p)):
            dmi = (gc[i] - m[i]) * c1
            dvi = (gc[i] * gc[i] - v[i]) * c2
            m[i] = m[i] + dmi
            v[i] = v[i] + dvi
            bm[i] = (1 - c1) * bm[i] + rtol * np.abs(m[i]) + dm * np.abs(dmi)
            bv[i] = (1 - c2) * bv[i] + rtol * np.abs(v[i]) + dv * np.abs(dvi)
            if conv == "keras":
                decay = p[i] * wd * lr
                step = m[i] * (lr * math.sqrt(bc2) / bc1) / (np.sqrt(v[i]) + eps)
            else:
                decay = p[i] * lr * wd
                step = lr * (m[i] / bc1) / (np.sqrt(v[i] / bc2) + eps)
            # the step's error: its own roundings and constants, and m's and v's errors
            with np.errstate(divide="ignore", invalid="ignore"):
                rel_m = np.where(m[i] != 0, bm[i] / np.abs(m[i]), 0.0)
                rel_v = np.where(v[i] > 0, bv[i] / v[i], 0.0)
            err_step = np.abs(step) * (rtol + dbc(t) + rel_m + 0.5 * rel_v)
            p[i] = p[i] - decay - step
            bp[i] = bp[i] + 2 * U32 * np.abs(p[i]) + rtol * np.abs(decay) + err_step
    return p, m, v, (bp, bm, bv)


@dataclass
class OptimImpl:
    """One optimizer implementation set up for one case: run() makes one step
    (clip + AdamW) in place; params(), m(), v() read its state as CuPy arrays
    (m, v: None where it cannot be read); restore() puts the fresh state back."""

    name: str
    conv: str  # which formula (adamw_reference)
    run: Callable[[], object]
    sync: Callable[[object], None]
    params: Callable[[], list]
    restore: Callable[[], None]
    m: Callable[[], list | None] = lambda: None
    v: Callable[[], list | None] = lambda: None
    on_cupy_stream: bool = True
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    info: dict = field(default_factory=dict)


def make_clipops_adamw(p0, gs, clip, stream, nvrtc: bool) -> OptimImpl:
    """clipops.cupy.adamw_update: the step counter and the learning rate on the
    device, so that every call is the same launch with no host sync."""
    with stream:
        ps = [x.copy() for x in p0]
        ms = [cupy.zeros_like(x) for x in p0]
        vs = [cupy.zeros_like(x) for x in p0]
        step = cupy.zeros((), cupy.int64)
        lr = cupy.asarray(np.float32(ADAMW["lr"]))

    def run():
        return ccp.adamw_update(ps, gs, ms, vs, step=step, learning_rate=lr,
                                weight_decay=ADAMW["wd"], beta_1=ADAMW["b1"], beta_2=ADAMW["b2"],
                                epsilon=ADAMW["eps"], global_clipnorm=clip)

    def restore():
        with stream:
            for p, f, m, v in zip(ps, p0, ms, vs):
                p[...] = f
                m.fill(0)
                v.fill(0)
            step.fill(0)

    return OptimImpl(f"{CLIPOPS_OPTIM} ({'nvrtc' if nvrtc else 'nvcc'})", "keras", run,
                     sync=lambda r: stream.synchronize(), params=lambda: ps, restore=restore,
                     m=lambda: ms, v=lambda: vs, context=lambda: nvrtc_route(nvrtc))


def make_clipops_adamw_torch(p0, gs, clip, stream) -> OptimImpl:
    """clipops.cupy.adamw_update called with torch tensors, as README shows
    (p.data, p.grad, torch state): the same kernel, plus the host's cost of
    viewing every tensor through DLPack on every call (the pipelined time)."""
    import torch

    ext = torch.cuda.ExternalStream(stream.ptr)
    with torch.cuda.stream(ext):
        fresh = [torch.from_dlpack(x).clone() for x in p0]
        params = [f.clone().requires_grad_() for f in fresh]
        for p, g in zip(params, gs):
            p.grad = torch.from_dlpack(g).clone()
        ms = [torch.zeros_like(f) for f in fresh]
        vs = [torch.zeros_like(f) for f in fresh]
        step = torch.zeros((), dtype=torch.int64, device=fresh[0].device)
        lr = torch.tensor(ADAMW["lr"], dtype=torch.float32, device=fresh[0].device)

    def run():
        with torch.cuda.stream(ext):  # torch's current stream is CuPy's: no cross-stream waits
            return ccp.adamw_update([p.data for p in params], [p.grad for p in params], ms, vs,
                                    step=step, learning_rate=lr, weight_decay=ADAMW["wd"],
                                    beta_1=ADAMW["b1"], beta_2=ADAMW["b2"],
                                    epsilon=ADAMW["eps"], global_clipnorm=clip)

    def restore():
        with torch.cuda.stream(ext), torch.no_grad():
            for p, f, m, v in zip(params, fresh, ms, vs):
                p.copy_(f)
                m.zero_()
                v.zero_()
            step.zero_()

    return OptimImpl(f"{CLIPOPS_OPTIM}, torch tensors", "keras", run,
                     sync=lambda r: stream.synchronize(),
                     params=lambda: [cupy.from_dlpack(p.detach()) for p in params],
                     restore=restore, m=lambda: [cupy.from_dlpack(m) for m in ms],
                     v=lambda: [cupy.from_dlpack(v) for v in vs], info={"torch": torch.__version__})


def make_torch_adamw(p0, gs, clip, stream) -> OptimImpl:
    import torch

    ext = torch.cuda.ExternalStream(stream.ptr)
    with torch.cuda.stream(ext):
        fresh = [torch.from_dlpack(x).clone() for x in p0]
        grads0 = [torch.from_dlpack(g).clone() for g in gs]
        params = [f.clone().requires_grad_() for f in fresh]
        for p, g in zip(params, grads0):
            p.grad = g.clone()
        opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                                eps=ADAMW["eps"], weight_decay=ADAMW["wd"], fused=True)

    def run():
        with torch.cuda.stream(ext):
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()

    def restore():
        with torch.cuda.stream(ext), torch.no_grad():
            for p, f, g0 in zip(params, fresh, grads0):
                p.copy_(f)
                p.grad.copy_(g0)
            opt.state.clear()  # the next step creates fresh state (zeros, step 0)

    def state(key):
        return [cupy.from_dlpack(opt.state[p][key]) for p in params]

    return OptimImpl(TORCH_OPTIM, "torch", run, sync=lambda r: stream.synchronize(),
                     params=lambda: [cupy.from_dlpack(p.detach()) for p in params],
                     restore=restore, m=lambda: state("exp_avg"), v=lambda: state("exp_avg_sq"),
                     info={"torch": torch.__version__})


def make_optax_adamw(p0, gs, clip, stream) -> OptimImpl:
    import functools

    import jax
    import optax

    dev = jax.devices("gpu")[0]
    stream.synchronize()
    grads = [jax.device_put(jax.dlpack.from_dlpack(g.copy()), dev) for g in gs]
    fresh = [cupy.asnumpy(x) for x in p0]
    tx = optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                                 weight_decay=ADAMW["wd"]))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    holder = {}

    def restore():
        holder["p"] = [jax.device_put(x, dev) for x in fresh]
        holder["s"] = tx.init(holder["p"])

    def run():
        holder["p"], holder["s"] = step(holder["p"], holder["s"], grads)
        return holder["p"]

    def adam_state(key):
        found = [s for s in jax.tree_util.tree_leaves(
            holder["s"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
        return [cupy.from_dlpack(x) for x in getattr(found[0], key)] if found else None

    restore()
    jax.block_until_ready(run())  # compile outside the timing
    restore()
    return OptimImpl(OPTAX_OPTIM, "optax", run, sync=lambda r: jax.block_until_ready(r),
                     params=lambda: [cupy.from_dlpack(x) for x in holder["p"]], restore=restore,
                     m=lambda: adam_state("mu"), v=lambda: adam_state("nu"), on_cupy_stream=False,
                     info={"jax": jax.__version__, "optax": optax.__version__})


OPTIM_PEERS: list[tuple[str, str, Callable]] = [
    (f"{CLIPOPS_OPTIM}, torch tensors", "torch", make_clipops_adamw_torch),
    (TORCH_OPTIM, "torch", make_torch_adamw),
    (OPTAX_OPTIM, "optax", make_optax_adamw),
]


def validate_optim(impl: OptimImpl, refs: dict) -> dict:
    """The state after OPTIM_STEPS steps against the implementation's own
    float64 reference: the largest error as a fraction of the bound (<= 1 passes)."""
    ref_p, ref_m, ref_v, (bound_p, bound_m, bound_v) = refs[impl.conv]
    worst = {}
    for what, got, ref, bound in (("p", impl.params(), ref_p, bound_p),
                                  ("m", impl.m(), ref_m, bound_m),
                                  ("v", impl.v(), ref_v, bound_v)):
        if got is None:
            continue
        if len(got) != len(ref):
            return {"ok": False, "why": f"{len(got)} {what} arrays for {len(ref)} variables"}
        err = 0.0
        for i, (gi, ri) in enumerate(zip(got, ref)):
            if gi.shape != ri.shape or gi.dtype != np.float32:
                return {"ok": False, "why": f"{what}[{i}] is {gi.shape} {gi.dtype}"}
            if ri.size:
                e = np.abs(cupy.asnumpy(gi).astype(np.float64) - ri) / (bound[i] + 1e-30)
                err = max(err, float(e.max()))
        worst[what] = err
    ok = all(e <= 1.0 for e in worst.values()) and "p" in worst
    out = {"ok": ok, **{f"{k}_err_over_tol": v for k, v in worst.items()}}
    if not ok:
        out["why"] = f"error {max(worst.values(), default=math.inf):.3g}x the tolerance"
    return out


def count_launches(impl) -> tuple[int | None, str | None]:
    """Kernels launched by one call, counted by torch.profiler (CUPTI sees every
    kernel of the process: CuPy's, the driver API's, XLA's). Copies and
    memsets are not kernels. (None, why) where it cannot count."""
    try:
        import torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        if not torch.cuda.is_available():
            return None, "torch has no CUDA here"
        impl.sync(impl.run())
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            impl.sync(impl.run())
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset", "memcpy", "memset"))]
    except Exception as exc:  # no torch, or a profiler that cannot run here
        return None, f"not counted: {exc!r}"
    if not kernels:  # every implementation launches something: the profiler saw nothing
        return None, "not counted: the profiler recorded no kernel"
    return len(kernels), None


def measure_optim(impl: OptimImpl, refs: dict, stream, args) -> dict:
    with stream:
        impl.restore()
        try:
            last = None
            for _ in range(OPTIM_STEPS):
                last = impl.run()
            impl.sync(last)
        except Exception as exc:
            return {"skipped": f"failed: {exc!r}"}
        check = validate_optim(impl, refs)
        if not check["ok"]:
            return {"invalid": check["why"], "validation": check}
        res = time_impl(impl, check, stream, args)
        launches, why = count_launches(impl)
        res["launches"] = launches
        if why:
            res["launches_note"] = why
    return res


def run_optim_case(case: Case, stream, args, routes: list[bool]) -> dict:
    print(f"\n== fused clip + AdamW, {case.name}: {len(case.shapes)} tensors, "
          f"{case.numel:,} parameters", flush=True)
    rng = cupy.random.default_rng(1)
    with stream:
        p0 = [rng.standard_normal(math.prod(s), dtype=cupy.float32).reshape(s) for s in case.shapes]
        gs = [(rng.standard_normal(math.prod(s), dtype=cupy.float32) * 1e-2).reshape(s)
              for s in case.shapes]
        host_p = [cupy.asnumpy(x) for x in p0]
        host_g = [cupy.asnumpy(x) for x in gs]
    norm = math.sqrt(sum(float(np.dot(g.astype(np.float64).ravel(), g.astype(np.float64).ravel()))
                         for g in host_g))
    clip = float(np.float32(norm / 2))  # every step really clips
    refs = {conv: adamw_reference(host_p, host_g, steps=OPTIM_STEPS, conv=conv, clip=clip, **ADAMW)
            for conv in ("keras", "torch", "optax")}
    record = {"case": case.name, "note": case.description, "tensors": len(case.shapes),
              "elements": case.numel, "bytes_moved": optim_bytes_moved(case),
              "dtypes": sorted(set(case.dtypes)), "ref_norm": norm, "clip_norm": clip,
              "hyperparameters": ADAMW, "results": {}}
    makers = [(f"{CLIPOPS_OPTIM} ({'nvrtc' if r else 'nvcc'})",
               lambda p, g, c, s, r=r: make_clipops_adamw(p, g, c, s, r)) for r in routes]
    run_impls(record, makers, OPTIM_PEERS, 46, lambda maker: maker(p0, gs, clip, stream),
              lambda impl: measure_optim(impl, refs, stream, args),
              lambda res: "   launches "
                          f"{res['launches'] if res['launches'] is not None else '?'}")
    add_gbs(record, optim_bytes_moved(case))
    return record


def optim_main(records: list[dict]) -> str:
    """The clipops route the targets are judged on: nvcc's when it was timed."""
    nvcc = f"{CLIPOPS_OPTIM} (nvcc)"
    timed = any("device_us" in r["results"].get(nvcc, {}) for r in records)
    return nvcc if timed else f"{CLIPOPS_OPTIM} (nvrtc)"


def judge_optim(records: list[dict], copy_gbs: float, smoke: bool) -> list[dict]:
    """The issue's targets for the fused step, met or missed, with the numbers.
    Never relaxed."""
    main = optim_main(records)
    out = []

    def add(target, case, value, threshold, met, note=""):
        out.append({"target": target, "case": case, "value": value, "threshold": threshold,
                    "met": None if smoke or met is None else bool(met),
                    "note": ("smoke run: not judged. " if smoke else "") + note})

    for rec in records:
        case, res = rec["case"], rec["results"]
        ours = res.get(main, {})
        t, launches = ours.get("device_us"), ours.get("launches")
        add("1 launch per call, any number of tensors", case, launches, 1,
            None if launches is None else launches == 1,
            f"{main}; counted by torch.profiler" if launches is not None else
            ours.get("launches_note", "not measured"))
        if t is not None and case == "resnet50":
            frac = rec["bytes_moved"] / (t * 1e-6) / 1e9 / copy_gbs
            add(">= 85% of copy bandwidth (32 B per parameter)", case, round(frac, 4), 0.85,
                frac >= 0.85, f"{main}: {t:.1f} us; copy limit {copy_gbs:.0f} GB/s")
        theirs = res.get(TORCH_OPTIM, {}).get("device_us")
        add(">= 1.5x faster than torch clip_grad_norm_(foreach) + AdamW(fused)", case,
            None if not (t and theirs) else round(theirs / t, 3), 1.5,
            None if not (t and theirs) else theirs / t >= 1.5,
            "torch not measured" if not theirs else f"device time: torch {theirs:.1f} us vs "
            f"{t:.1f} us")
        ours_p, optax_p = ours.get("pipelined_us"), res.get(OPTAX_OPTIM, {}).get("pipelined_us")
        add("faster than optax chain(clip_by_global_norm, adamw) under jit (pipelined)", case,
            None if not (ours_p and optax_p) else round(optax_p / ours_p, 3), 1.0,
            None if not (ours_p and optax_p) else optax_p > ours_p,
            "optax not measured" if not optax_p else f"optax {optax_p:.1f} us vs {ours_p:.1f} us")
        if t is not None:
            per_param = t * 1e-6 * copy_gbs * 1e9 / rec["elements"]
            add("stretch: 28 B per parameter (time x copy bandwidth / parameters)", case,
                round(per_param, 2), 28, per_param <= 28,
                "the bytes the copy bandwidth moves in the kernel's time; tests/gpu_checks.sh "
                "measures DRAM bytes with ncu")
    return out


# ---- targets and reports -----------------------------------------------------------

MAIN = "clipops (nvcc)"


def judge(records: list[dict], copy_gbs: float, smoke: bool) -> list[dict]:
    """The issue's targets, met or missed, with the numbers. Never relaxed."""
    by_case = {r["case"]: r["results"] for r in records}
    main = MAIN if any(MAIN in res and "device_us" in res[MAIN] for res in by_case.values()) \
        else "clipops (nvrtc)"
    out = []

    def add(target, case, value, threshold, met, note=""):
        out.append({"target": target, "case": case, "value": value, "threshold": threshold,
                    "met": None if smoke else met,
                    "note": ("smoke run: not judged. " if smoke else "") + note})

    def get(case, impl, key):
        return by_case.get(case, {}).get(impl, {}).get(key)

    for case in ("resnet50", "bert_base"):
        t = get(case, main, "device_us")
        if t is not None:
            rec = next(r for r in records if r["case"] == case)
            frac = 12 * rec["elements"] / (t * 1e-6) / 1e9 / copy_gbs
            add(">= 90% of copy bandwidth (12 B per float32 element)", case, round(frac, 4), 0.9,
                frac >= 0.9, f"{main}: {t:.1f} us; copy limit {copy_gbs:.0f} GB/s")
    for case, rec in by_case.items():
        n = next(r["tensors"] for r in records if r["case"] == case)
        ours, theirs = get(case, main, "device_us"), get(case, "torch clip_grad_norm_ foreach", "device_us")
        if n >= 1000:
            if ours and theirs:
                add(">= 3x faster than torch foreach (1,000+ tensors, device time)", case,
                    round(theirs / ours, 3), 3.0, theirs / ours >= 3.0,
                    f"torch {theirs:.1f} us vs {ours:.1f} us")
            else:
                add(">= 3x faster than torch foreach (1,000+ tensors, device time)", case, None, 3.0,
                    None, "torch not measured")
        ours_p = get(case, main, "pipelined_us")
        optax_p = get(case, "optax clip_by_global_norm (jit)", "pipelined_us")
        add("faster than optax under jit (pipelined wall time per call)", case,
            None if not (ours_p and optax_p) else round(optax_p / ours_p, 3), 1.0,
            None if not (ours_p and optax_p) else optax_p > ours_p,
            "optax not measured" if not optax_p else f"optax {optax_p:.1f} us vs {ours_p:.1f} us")
    t = get("mnist_mlp", main, "device_us")
    add("< 10 us of device time on the MNIST MLP set", "mnist_mlp", t, 10.0,
        None if t is None else t < 10.0)
    return out


def device_info() -> dict:
    dev = cupy.cuda.runtime.getDevice()
    props = cupy.cuda.runtime.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"name": name, "index": dev, "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": props["multiProcessorCount"],
            "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
            "driver": cupy.cuda.runtime.driverGetVersion(),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}


def write_markdown(path, payload: dict) -> None:
    """The results table and the targets, as markdown beside the JSON file."""
    impls = list(dict.fromkeys(name for rec in payload["cases"] for name in rec["results"]))
    rows = []
    for rec in payload["cases"]:
        cells = []
        for name in impls:
            r = rec["results"].get(name, {})
            if "invalid" in r:
                cells.append("invalid: " + r["invalid"])
            elif "skipped" in r or not r:
                cells.append("skipped")
            else:
                dev = f"{r['device_us']:.1f}" if "device_us" in r else "n/a"
                cells.append(f"{dev} / {r['pipelined_us']:.1f}")
        rows.append([rec["case"], f"{rec['tensors']:,}", f"{rec['elements']:,}", *cells])
    bw = payload["copy_bandwidth"]
    lines = [f"# clipops GPU benchmark: {payload['device']['name']}, {payload['machine']['date']}",
             "", f"Copy bandwidth (limit): {bw['gbs']:.0f} GB/s (memcpy {bw['memcpy_gbs']:.0f}, "
             f"copy kernel {bw['copy_kernel_gbs']:.0f})."]
    if payload["cases"]:
        lines += ["", "## Global-norm clipping", "",
                  "Device time (CUDA events, median) / pipelined wall time per call, microseconds.",
                  ""]
        lines += table(["case", "tensors", "elements", *impls], rows)
    lines += optim_markdown(payload)
    targets = [[t["target"], t["case"], "-" if t["value"] is None else f"{t['value']:.4g}",
                str(t["threshold"]), {True: "met", False: "MISSED", None: "-"}[t["met"]],
                t["note"]] for t in payload["targets"]]
    lines += ["", "## Targets", ""] + table(
        ["target", "case", "value", "threshold", "met", "note"], targets, "llrrll")
    skipped = sorted({f"{n}: {r['skipped']}"
                      for rec in payload["cases"] + payload.get("optim_cases", [])
                      for n, r in rec["results"].items() if "skipped" in r})
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    path.write_text("\n".join(lines) + "\n")


def optim_markdown(payload: dict) -> list[str]:
    """The fused clip + AdamW rows: one line per case and implementation."""
    recs = payload.get("optim_cases")
    if not recs:
        return []
    bw = payload["copy_bandwidth"]["gbs"]
    rows = []
    for rec in recs:
        for name, r in rec["results"].items():
            if "skipped" in r or "invalid" in r:
                rows.append([rec["case"], name, "skipped" if "skipped" in r else
                             "invalid: " + r["invalid"], "", "", "", "", ""])
                continue
            t = r.get("device_us")
            shown = t if t is not None else r["pipelined_us"]  # optax: wall time only
            gbs = rec["bytes_moved"] / (shown * 1e-6) / 1e9
            rows.append([rec["case"], name, "n/a" if t is None else f"{t:.1f}",
                         f"{r['pipelined_us']:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}%",
                         f"{shown * 1e-6 * bw * 1e9 / rec['elements']:.1f}",
                         "?" if r.get("launches") is None else str(r["launches"])])
    lines = ["", "## Fused clip + AdamW (clipops.cupy.adamw_update)", "",
             "float32 variables and gradients; global-norm clip + AdamW, the step and the learning "
             "rate on the device. Bytes moved: 32 B per parameter (the gradient read twice, p, m "
             "and v read and written). Device time: CUDA events, median; optax (other streams): "
             "pipelined wall time. B per parameter at copy bandwidth: the bytes the measured copy "
             "bandwidth moves in that time.", ""]
    lines += table(["case", "implementation", "device us", "pipelined us", "GB/s", "of copy bandwidth",
                    "B/param at copy bw", "launches per call"], rows, "llrrrrrr")
    main = optim_main(recs)
    ratios = []
    for rec in recs:
        ours = rec["results"].get(main, {})
        torch_t = rec["results"].get(TORCH_OPTIM, {}).get("device_us")
        optax_p = rec["results"].get(OPTAX_OPTIM, {}).get("pipelined_us")
        if ours.get("device_us") and torch_t:
            ratios.append(f"{rec['case']}: torch / clipops {torch_t / ours['device_us']:.2f}x "
                          "(device time)")
        if ours.get("pipelined_us") and optax_p:
            ratios.append(f"{rec['case']}: optax / clipops {optax_p / ours['pipelined_us']:.2f}x "
                          "(pipelined)")
    if ratios:
        lines += ["", "; ".join(ratios) + "."]
    return lines


def write_plot(path, payload: dict) -> str | None:
    """The clip's figure at `path` and the fused step's at <stem>_optim.png (each
    when its rows exist); returns why there is no plot, or None."""
    try:
        plt = pyplot()
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc})"
    if payload["cases"]:
        write_clip_plot(plt, path, payload)
    if payload.get("optim_cases"):
        write_optim_plot(plt, path.with_name(path.stem + "_optim.png"), payload)
    return None


def write_clip_plot(plt, path, payload: dict) -> None:
    """Time per clip per case and implementation, log scale, with the copy-bandwidth limit."""
    bar_plot(plt, path, payload, payload["cases"], (11, 5), "copy-bandwidth limit",
             lambda r: f"{r['tensors']:,} tensors",
             "microseconds per clip (device time; optax: pipelined wall)",
             f"Global-norm clipping on {payload['device']['name']}")


def write_optim_plot(plt, path, payload: dict) -> None:
    """Time per fused clip + AdamW step per case and implementation, log scale,
    with the time 32 B per parameter take at copy bandwidth."""
    bar_plot(plt, path, payload, payload["optim_cases"], (9, 5), "32 B/param at copy bandwidth",
             lambda r: f"{r['elements']:,} parameters",
             "microseconds per step (device time; optax: pipelined wall)",
             f"Global-norm clip + AdamW on {payload['device']['name']}")


def bar_plot(plt, path, payload: dict, recs: list[dict], figsize, limit: str, size, ylabel: str,
             title: str) -> None:
    """One bar per case and timed implementation (clipops' first; device time,
    else pipelined wall), log scale, and per case a dashed line at the time its
    bytes take at copy bandwidth (labelled `limit`); size(record) is the second
    line of a case's label."""
    impls = sorted({n for r in recs for n, v in r["results"].items() if "pipelined_us" in v},
                   key=lambda n: (not n.startswith("clipops"), n))
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / max(1, len(impls))
    for k, name in enumerate(impls):
        vals = [r["results"].get(name, {}).get("device_us") or r["results"].get(name, {}).get(
            "pipelined_us") or 0 for r in recs]
        ax.bar([i + k * width for i in range(len(recs))], vals, width, label=name)
    bw = payload["copy_bandwidth"]["gbs"]
    for i, r in enumerate(recs):
        ax.hlines(r["bytes_moved"] / bw / 1e3, i - width / 2, i + width * (len(impls) - 0.5),
                  colors="black", linestyles="dashed", label=limit if i == 0 else None)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(recs))])
    ax.set_xticklabels([f"{r['case']}\n{size(r)}" for r in recs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small cases, few repetitions")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per measurement (at most)")
    ap.add_argument("--rounds", type=int, default=5, help="pipelined rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--suite", choices=("all", "clip", "optim"), default="all",
                    help="the clip rows, the fused clip + AdamW rows, or both")
    ap.add_argument("--out-dir", default=None,
                    help="default bench/out (untracked); commit a device's run with "
                         "`--out-dir bench/results`")
    args = ap.parse_args()
    if args.smoke:
        args.reps, args.rounds, args.warmup = min(args.reps, 10), min(args.rounds, 3), 2

    try:
        ccp._current_device()
    except ccp.CudaUnavailableError as exc:
        print(f"bench/gpu.py needs a GPU: {exc}", file=sys.stderr)
        return 2
    stream = cupy.cuda.Stream(non_blocking=True)
    core = _common.load_core()
    routes = []
    if core.cuda_compiled():
        routes.append(False)
    try:
        _nvrtc.cuda_include_dirs()
        _nvrtc._nvrtc()
        routes.append(True)
    except _nvrtc.CudaUnavailableError as exc:
        print(f"clipops (nvrtc) skipped: {exc}")
    dev = device_info()
    print(f"device: {dev['name']} (cc {dev['compute_capability']}, {dev['multiprocessors']} SMs)")
    bw = copy_bandwidth((256 << 20) if args.smoke else (1 << 30), stream, 10 if args.smoke else 20)
    print(f"copy bandwidth: {bw['gbs']:.0f} GB/s (memcpy {bw['memcpy_gbs']:.0f}, "
          f"kernel {bw['copy_kernel_gbs']:.0f})")

    wanted = (lambda c: not args.cases or c.name in args.cases.split(","))
    records, optim_records = [], []
    if args.suite in ("all", "clip"):
        records = [run_case(c, stream, args, routes) for c in cases(args.smoke) if wanted(c)]
    if args.suite in ("all", "optim"):
        optim_records = [run_optim_case(c, stream, args, routes)
                         for c in optim_cases(args.smoke) if wanted(c)]
    targets = judge(records, bw["gbs"], args.smoke) if records else []
    targets += judge_optim(optim_records, bw["gbs"], args.smoke)
    payload = {"benchmark": "gpu", "smoke": args.smoke, "machine": machine_info(), "device": dev,
               "copy_bandwidth": bw, "cases": records, "optim_cases": optim_records,
               "targets": targets,
               "method": {"device_time": "CUDA events between calls, queue primed by a spin kernel, "
                                         "median", "pipelined": "wall time of back-to-back calls / N",
                          "launches": "kernels per call seen by torch.profiler (CUPTI)",
                          "optim_validation": f"{OPTIM_STEPS} steps from a fresh state against "
                                              "each implementation's float64 formula",
                          "adamw": ADAMW,
                          "reps_max": args.reps, "rounds": args.rounds, "warmup": args.warmup}}
    slug = re.sub(r"[^a-z0-9]+", "_", dev["name"].lower()).strip("_")
    stem = f"gpu_{slug}_{dt.datetime.now(dt.timezone.utc):%Y%m%d}" + ("_smoke" if args.smoke else "")
    path = write_json(stem, payload, out_dir=args.out_dir)
    write_markdown(path.with_suffix(".md"), payload)
    why_no_plot = write_plot(path.with_suffix(".png"), payload)
    print("\n" + path.with_suffix(".md").read_text())
    print(f"results: {path} (+ .md{'' if why_no_plot else ', .png'}"
          f"{', _optim.png' if optim_records and not why_no_plot else ''})" +
          (f"; {why_no_plot}" if why_no_plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
