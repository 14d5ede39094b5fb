#!/usr/bin/env python
"""Benchmark: gradient health, clipops' fused list ops against TF's per-tensor loops.

Seed 000 teaches three clips and prints each gradient's norm. TensorFlow does
the per-tensor ones with one op chain per tensor; clipops with one fused op for
the whole list. On these float32 gradient lists (bench/micro.py's shapes):

  mnist      the MNIST MLP's 6 gradients (535,818 elements)
  resnet50   ResNet-50's 161 parameter shapes (25,557,032 elements)

it times, eagerly and in ``tf.function``:

  clip_by_norm   ``[tf.clip_by_norm(t, c) for t in ts]`` vs ``clipops.clip_by_norm(ts, c)``
  clip_by_value  ``[tf.clip_by_value(t, lo, hi) ...]`` vs ``clipops.clip_by_value(ts, lo, hi)``
  norms          what a training loop logs: ``tf.clip_by_global_norm`` plus
                 ``[tf.norm(t) for t in ts]`` vs ``clipops.clip_by_global_norm(ts, c,
                 return_norms=True)``, the per-tensor norms from the same pass

Every case is validated before it is timed: clip_by_value bit for bit against
TF (signed-zero ties aside, tests/test_health.py), clip_by_norm's outputs and
the norms within the float32 tolerance of tests/conftest.py against TF. A
mismatch skips the case's timing and makes the exit status 1.

Reported per row: median time of each side (time_calls: warm-up, then at least
`--repeats` calls and `--min-time` seconds, eager calls fenced by reading the
result), the ratio TF / clipops from the same run, and clipops' effective
bandwidth (bytes its passes move: clip_by_norm reads the list twice and writes
it once, clip_by_value reads and writes once, norms reads twice and writes once)
against this machine's copy bandwidth. Results: bench/out/health.{json,md} (or
--out DIR). Absolute times mean something only on the machine named in the JSON.
``python bench/micro.py --health`` runs it after micro's own cases. TensorFlow's
C++ start-up log is hidden unless --verbose.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import numpy as np

from cases import mnist_shapes, resnet50_shapes
from common import (OUT, copy_bandwidth_gbs, import_tensorflow, machine_info, time_calls,
                    wants_verbose, write_json)
from report import machine_line, table

tf, _ = import_tensorflow(verbose=wants_verbose(__name__))
import clipops  # noqa: E402

RTOL = 2e-6  # float32: tests/conftest.py TOL, ~5 roundings of u = 6e-8 plus the norm's error
SCALE = 1e-3  # gradients ~ N(0, 1e-3)


def make_list(shapes: Sequence[tuple[int, ...]], seed: int) -> list[tf.Tensor]:
    rng = np.random.default_rng(seed)
    return [tf.constant((rng.standard_normal(s) * SCALE).astype(np.float32)) for s in shapes]


def tf_ops(ts: list, c: float, lo: float, hi: float) -> dict[str, Callable]:
    return {
        "clip_by_norm": lambda: [tf.clip_by_norm(t, c) for t in ts],
        "clip_by_value": lambda: [tf.clip_by_value(t, lo, hi) for t in ts],
        "norms": lambda: (tf.clip_by_global_norm(ts, c), [tf.norm(t) for t in ts]),
    }


def clipops_ops(ts: list, c: float, lo: float, hi: float) -> dict[str, Callable]:
    return {
        "clip_by_norm": lambda: clipops.clip_by_norm(ts, c),
        "clip_by_value": lambda: clipops.clip_by_value(ts, lo, hi),
        "norms": lambda: clipops.clip_by_global_norm(ts, c, return_norms=True),
    }


def flat(result) -> list[np.ndarray]:
    """Every tensor in a (nested) result, as NumPy arrays, in order."""
    return [np.asarray(t.numpy()) for t in tf.nest.flatten(tuple(result)) if t is not None]


def first(result) -> tf.Tensor:
    """The first tensor of a (nested) result. Eager CPU ops run synchronously, so reading it
    fences the call without converting the other outputs (flat() would copy them all)."""
    return next(t for t in tf.nest.flatten(tuple(result)) if t is not None)


def validate(op: str, ours, theirs) -> str | None:
    """None if clipops' result agrees with TF's, else what differs."""
    if op == "norms":  # (clipped, global norm, tensor norms) against (TF's pair, per-tensor norms)
        (t_clipped, t_norm), t_norms = theirs
        mine = [*ours.clipped, ours.global_norm, ours.tensor_norms]
        want = [*t_clipped, t_norm, tf.stack(t_norms)]
    else:
        mine, want = ours, theirs
    for k, (a, b) in enumerate(zip(flat(mine), flat(want))):
        if op == "clip_by_value":
            same = (a.view(np.uint32) == b.view(np.uint32)) | ((a == 0) & (b == 0))
            if not same.all():
                return f"output {k}: {int((~same).sum())} elements differ from TF"
        elif not np.allclose(a, b, rtol=RTOL, atol=1e-30):
            return f"output {k}: off by up to {float(np.max(np.abs(a - b) / np.abs(b).clip(1e-30))):.2e}"
    return None


def bytes_moved(op: str, nbytes: int) -> int:
    return {"clip_by_norm": 3, "clip_by_value": 2, "norms": 3}[op] * nbytes


def run(cases: dict, modes: Sequence[str], repeats: int, min_time: float) -> tuple[dict, bool]:
    copy = copy_bandwidth_gbs()
    rows, ok = [], True
    for name, shapes in cases.items():
        ts = make_list(shapes, seed=0)
        nbytes = sum(int(np.prod(s)) * 4 for s in shapes)
        norm = float(clipops.global_norm(ts))
        c, lo, hi = norm / len(ts) / 2, -2 * SCALE, 2 * SCALE  # some tensors and values clipped
        for mode in modes:
            theirs_ops, ours_ops = tf_ops(ts, c, lo, hi), clipops_ops(ts, c, lo, hi)
            for op in theirs_ops:
                t_fn, o_fn = theirs_ops[op], ours_ops[op]
                if mode == "function":
                    t_fn, o_fn = tf.function(t_fn), tf.function(o_fn)
                problem = validate(op, o_fn(), t_fn())
                row = {"case": name, "mode": mode, "op": op, "tensors": len(ts), "bytes": nbytes}
                if problem:
                    ok = False
                    row["error"] = problem
                    print(f"  {name}/{mode}/{op}: VALIDATION FAILED, not timed: {problem}")
                    rows.append(row)
                    continue
                sync = lambda r: first(r).numpy()  # noqa: E731  (one small read: the fence)
                t = time_calls(t_fn, repeats=repeats, min_time_s=min_time, sync=sync)
                o = time_calls(o_fn, repeats=repeats, min_time_s=min_time, sync=sync)
                gbs = bytes_moved(op, nbytes) / o["median_s"] / 1e9
                row.update(tf=t, clipops=o, ratio=t["median_s"] / o["median_s"], clipops_gbs=gbs,
                           of_copy=gbs / copy["gbs"])
                rows.append(row)
                print(f"  {name:<9} {mode:<8} {op:<13} tf {t['median_s'] * 1e3:8.3f} ms  clipops "
                      f"{o['median_s'] * 1e3:8.3f} ms  ratio {row['ratio']:5.2f}x  "
                      f"{gbs:6.2f} GB/s ({row['of_copy']:.0%} of copy)", flush=True)
    return {"machine": machine_info(), "copy_bandwidth": copy, "rows": rows}, ok


def markdown(result: dict) -> str:
    """The results as a markdown table, with the machine and its copy bandwidth."""
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["case"], r["mode"], r["op"], f"validation failed: {r['error']}",
                         "", "", ""])
            continue
        rows.append([r["case"], r["mode"], r["op"], f"{r['tf']['median_s'] * 1e3:.3f}",
                     f"{r['clipops']['median_s'] * 1e3:.3f}", f"{r['ratio']:.2f}x",
                     f"{r['clipops_gbs']:.2f} ({r['of_copy']:.0%})"])
    lines = ["# Gradient health: clipops' fused list ops vs TF's per-tensor loops", "",
             f"{machine_line(result['machine'])}; copy bandwidth "
             f"{result['copy_bandwidth']['gbs']:.1f} GB/s. Medians; ratio = TF / clipops, same "
             "run.", ""]
    lines += table(["case", "mode", "op", "TF ms", "clipops ms", "ratio",
                    "clipops GB/s (of copy)"], rows, "lllrrrr")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="MNIST only, few calls (CI)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per side and row")
    ap.add_argument("--out", default=str(OUT), help="folder for health.json and health.md")
    ap.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log")
    args = ap.parse_args(argv)
    cases = {"mnist": mnist_shapes()}
    if not args.smoke:
        cases["resnet50"] = resnet50_shapes()
    repeats, min_time = (3, 0.0) if args.smoke else (args.repeats, args.min_time)
    print(f"gradient health ops, {len(cases)} lists, eager and tf.function; validating, then timing")
    result, ok = run(cases, ("eager", "function"), repeats, min_time)
    path = write_json("health", result, args.out)
    (path.parent / "health.md").write_text(markdown(result))
    print(f"results: {path} and {path.parent / 'health.md'}")
    if not ok:
        print("error: a clipops result disagreed with TF's; see above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
