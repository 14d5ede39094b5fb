#!/usr/bin/env python
"""The markdown table and the PNG plot of a micro.json, drawn from that file.

    python bench/plot.py [bench/results/micro.json]   # writes micro.md, micro.png beside it

What the numbers mean (bench/micro.py writes them):
  - times are medians of repeated calls, with p10 and p90; the first call
    (tracing, compiling) is timed apart and left out;
  - "x floor" is time / floor, where the floor is the bytes the work must move
    at the copy bandwidth (common.copy_bandwidth_gbs, bytes read + written)
    measured right before and right after that case was timed, the higher of
    the two (the VM's speed drifts over a run; the Cases table has both; runs
    with no bandwidth there measured it at their start and end only): 3x
    the list's bytes when clipping (read for the norm, read and write for the
    scale; 12 bytes per float32 element), 1x when no clipping is needed and
    the buffers are forwarded;
  - ratios are TF's time / clipops' time in the same run (> 1: clipops faster);
  - *_fwd rows (no-clip cases) compute stand-in gradients (x * one) inside the
    same tf.function so their buffers can be forwarded; their "net" time is
    per clip, beyond the `producer` row (the same function with a clip that
    does nothing); for a list under 32 MiB the function chains 10 clips;
  - tf_identity_n (TF's eager cost of one op taking and returning the list,
    no arithmetic, no allocation) and tf_function_identity_n (the same op
    inside a tf.function taking and returning the list: the function boundary
    every *_function row pays) clip nothing: they are the least a clip through
    that route can take, set against the clip's floor. Both run back to
    back, warm; their *_cold rows run each call right after an untimed copy
    of the list (numpy_inplace's restore), as a clip's call follows its
    previous call's pass over the list, which pushes TF's runtime out of the
    caches. numpy_empty_like
    (NumPy's cost of making a fresh array like each of the list's) is what a
    copying front end built on NumPy's own calls pays; clipops makes its
    outputs in C++ and can pay less, so it bounds nothing;
  - "route + in place" (Targets) is what the target's metric would be had
    the call cost only its route's *_cold row above plus the same kernel's
    in-place NumPy time (numpy_inplace) in the same run, both after the same
    untimed stream of the list: (route + in place) / floor for a floor
    target, TF's time / (route + in place) for a speed-up. A miss where that
    misses too is the route's: the kernel would have to beat its own
    in-place time. Where it meets, the rest of the miss is the op's own
    (wrapper, outputs, thread pool), not proven to be its kernel's. Runs
    before the *_cold rows (bench/results at c685d75 to bc88736) used the warm
    rows, an optimistic bound. Copying NumPy (no route row) and net forwarded
    rows have none;
  - the scale pass is clip time minus norm time; times under 1x floor are
    possible here: the floor is measured copying 2 x 256 MiB, while this VM
    reports a 480 MiB L3 that can hold smaller lists;
  - "other load" is the CPU other processes (or the hypervisor) took while the
    case was timed; a case over the threshold was timed again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from report import ms as _ms
from report import can_plot, pyplot, save, table

MAIN_IMPLS = ("tf_eager", "tf_function", "tf_xla", "clipops_eager", "clipops_function",
              "numpy", "numpy_inplace", "producer", "tf_function_fwd", "clipops_function_fwd",
              "tf_identity_n", "tf_function_identity_n", "tf_identity_n_cold",
              "tf_function_identity_n_cold", "numpy_empty_like")
NORM_IMPLS = ("tf_norm_eager", "clipops_norm_eager", "numpy_norm")
# a clip implementation and its norm pass alone: clip - norm = the scale pass
PASS_PAIRS = (("clipops_eager", "clipops_norm_eager"), ("numpy", "numpy_norm"),
              ("tf_eager", "tf_norm_eager"))
RATIO_LABELS = {
    "eager": "eager: tf / clipops",
    "function": "tf.function: tf / clipops",
    "function_forwarded": "tf.function, forwarded, net",
    "function_forwarded_gross": "forwarded, gross",
    "xla_vs_clipops_function": "XLA / clipops tf.function",
}


def _case_label(name: str, c: dict) -> str:
    return (f"{name} ({c['num_tensors']} t, {c['numel'] / 1e6:.2f}M el, "
            f"floor {_ms(c.get('floor_s'))} ms)")


def _cores(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _load(c: dict) -> str:
    """The kept attempt's background load, and every attempt's when retried."""
    attempts = c.get("attempts_background_cores") or []
    tail = f" ({', '.join(_cores(a) for a in attempts)})" if len(attempts) > 1 else ""
    return _cores(c.get("background_cores")) + tail


def _cell(r: dict | None) -> str:
    """median ms and x floor (net of the producer for forwarded rows)."""
    if r is None:
        return "-"
    net = r.get("net_median_s")
    core = f"{_ms(r['median_s'])}" + (f", net {_ms(net)}" if net is not None else "")
    return f"{core} ({r['floor_ratio']:.2f}x)"


def _case_gbs_range(p: dict) -> str:
    """"lo to hi" of the cases' own copy bandwidths, or "" where a run has none
    (runs before each case measured its own)."""
    values = [c["bandwidth"]["gbs"] for c in p["cases"].values() if c.get("bandwidth")]
    if not values:
        return ""
    return f"{min(values):.1f}" if min(values) == max(values) else \
        f"{min(values):.1f} to {max(values):.1f}"


def _case_gbs(c: dict) -> str:
    bw = c.get("bandwidth")
    return "-" if not bw else f"**{bw['gbs']:.1f}** ({bw['before']:.1f}, {bw['after']:.1f})"


def header_section(p: dict) -> list[str]:
    m, bw, case_gbs = p["machine"], p["bandwidth"], _case_gbs_range(p)
    lines = [f"# clipops microbenchmark{' (SMOKE: toy sizes, not meaningful)' if p['smoke'] else ''}",
             "",
             f"{m.get('date')}, {m.get('cpu')} x {m.get('cpu_count')}, Python {m.get('python')}, "
             f"TensorFlow {m.get('tensorflow')}, NumPy {m.get('numpy')}, clipops "
             f"{m.get('clipops')} (git {m.get('git', '?')}"
             f"{', with uncommitted changes' if m.get('git_dirty') else ''}); TF threads "
             f"(0 = default) {p['tf_threads']}"
             f"{'; environment: ' + ', '.join(f'{k}={v}' for k, v in m['env'].items()) if m.get('env') else ''}.",
             "",
             f"Copy bandwidth (read + written; common.copy_bandwidth_gbs, the faster of 1 "
             f"thread and one per core): {bw['start']['gbs']:.1f} GB/s at the start, "
             f"{bw['end']['gbs']:.1f} GB/s at the end; "
             + (f"each case's floors use its own, measured around its timing "
                f"({case_gbs} GB/s; Cases table)."
                if case_gbs else f"floors use the higher, **{bw['gbs']:.1f} GB/s**.")
             + f" Run time {p['wall_s']:.0f} s.",
             "",
             f"CPU taken by other processes (or the hypervisor) during the run: "
             f"{_cores(p.get('background_cores'))} cores on average; per case in the last table.",
             ""]
    return lines


def times_section(p: dict) -> list[str]:
    lines = ["## Median time, ms (time / floor)", ""]
    rows = [[_case_label(n, c)] + [_cell(c["results"].get(i)) for i in MAIN_IMPLS]
            for n, c in p["cases"].items() if c.get("results")]
    return lines + table(["case"] + list(MAIN_IMPLS), rows) + [""]


def ratios_section(p: dict) -> list[str]:
    rows = [[n] + [f"{c['ratios'][k]:.2f}x" if k in c["ratios"] else "-" for k in RATIO_LABELS]
            for n, c in p["cases"].items() if c.get("ratios") is not None]
    return ["## Speed-up of clipops (TF time / clipops time, same run)", ""] + \
        table(["case"] + list(RATIO_LABELS.values()), rows) + [""]


def route_rows(p: dict) -> str:
    """The rows a run's route bound used: the *_cold ones where the run has
    them (since they were added), the warm ones before."""
    cold = any("tf_identity_n_cold" in (c.get("results") or {})
               for c in p.get("cases", {}).values())
    suffix = "_cold" if cold else ""
    return f"`tf_identity_n{suffix}` or `tf_function_identity_n{suffix}`"


def targets_section(p: dict) -> list[str]:
    def verdict(t: dict) -> str:
        if t["met"] is None:
            return "not run"
        if t["met"]:
            return "**met**"
        route_misses = t.get("route_bound_met") is False
        return "**missed**" + ("; the route's cost alone misses" if route_misses else "")

    def bound(t: dict) -> str:
        return "-" if t.get("route_bound") is None else f"{t['route_bound']:.2f}"
    rows = [[t["target"], t["case"], t["metric"],
             "-" if t["value"] is None else f"{t['value']:.2f}", f"{t['op']} {t['threshold']}",
             bound(t), verdict(t)] for t in p["targets"]]
    return ["## Targets", "",
            "\"route + in place\": the value had the call cost only its route (the "
            f"{route_rows(p)} row) plus the kernel's in-place NumPy time; see the notes.",
            ""] + \
        table(["target", "case", "metric", "value", "needed", "route + in place", "verdict"],
              rows, "lllrrrl") + [""]


def passes_section(p: dict) -> list[str]:
    """The two passes: the norm alone, and clip - norm (the scale pass)."""
    rows = []
    for n, c in p["cases"].items():
        res = c.get("results", {})
        for clip, norm in PASS_PAIRS:
            if clip not in res or norm not in res or not c["clipping"]:
                continue
            scale_s = res[clip]["median_s"] - res[norm]["median_s"]
            scale_floor = 2 * res[norm]["floor_s"]  # read and write the list once
            rows.append([n, clip, f"{_ms(res[norm]['median_s'])} ({res[norm]['floor_ratio']:.2f}x)",
                         f"{_ms(scale_s)} ({scale_s / scale_floor:.2f}x)",
                         f"{_ms(res[clip]['median_s'])} ({res[clip]['floor_ratio']:.2f}x)"])
    return ["## The two passes: norm alone, and clip minus norm", "",
            "Norm floor: the list read once; scale floor: read and written once.", ""] + \
        table(["case", "implementation", "norm pass ms (x floor)", "scale pass ms (x floor)",
                "clip ms (x floor)"], rows, "llrrr") + [""]


def spread_section(p: dict) -> list[str]:
    rows = []
    for n, c in p["cases"].items():
        for i, r in c.get("results", {}).items():
            rows.append([n, i, _ms(r["median_s"]), _ms(r["p10_s"]), _ms(r["p90_s"]),
                         _ms(r.get("net_median_s")), f"{r['floor_ratio']:.2f}",
                         str(r["repeats"]),
                         "-" if r.get("first_call_s") is None else f"{r['first_call_s']:.2f}"])
    return ["## All timings", ""] + table(
        ["case", "implementation", "median ms", "p10 ms", "p90 ms", "net ms", "x floor",
         "repeats", "first call s"], rows, "ll" + "r" * 7) + [""]


def validation_section(p: dict) -> list[str]:
    rows = []
    for n, c in p["cases"].items():
        v = c["validation"]
        clip = {i: r for i, r in v["impls"].items() if i.startswith(("clipops", "numpy"))}
        rows.append([n, "ok" if v["ok"] else "**FAILED**",
                     f"{max(r['norm_rel_err_tf'] for r in clip.values()):.1e}",
                     f"{max(r['norm_rel_err_f64'] for r in clip.values()):.1e}",
                     f"{v['tf_norm_rel_err_f64']:.1e}",
                     f"{max(r.get('max_abs_err', 0.0) for r in clip.values()):.1e}",
                     "; ".join(f"{k}: {why}" for k, why in c["skipped"].items()
                               if not why.startswith("only")) or "-"])
    return ["## Validation (before timing) and skipped implementations", ""] + table(
        ["case", "clipops", "norm rel err vs TF", "norm rel err vs f64", "TF norm vs f64",
         "max abs output err", "skipped"], rows, "llrrrrl") + [""]


def cases_section(p: dict) -> list[str]:
    rows = [[n, c["description"], str(c["num_tensors"]), f"{c['numel']:,}",
             ", ".join(f"{k} x{v}" for k, v in c["dtypes"].items()),
             f"{c['clip_norm']:.4g}", f"{c['norm_f64']:.4g}", _case_gbs(c), _load(c)]
            for n, c in p["cases"].items()]
    return ["## Cases", ""] + table(
        ["case", "list", "tensors", "elements", "dtypes", "clip_norm", "norm",
         "copy GB/s (before, after)", "other load, cores (attempts)"], rows, "llrrlrrrr") + [""]


def _bullets(text: str) -> list[str]:
    """A docstring's "- " list, each item joined onto one line."""
    items: list[str] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("- "):
            items.append(line)
        elif line and items:
            items[-1] += " " + line
    return items


def render_markdown(p: dict) -> str:
    sections = (header_section, targets_section, ratios_section, times_section, passes_section,
                spread_section, validation_section, cases_section)
    notes = _bullets(__doc__.split("What the numbers mean")[1].split("\n", 1)[1])
    lines = [line for section in sections for line in section(p)]
    return "\n".join(lines + ["## Notes", "", *notes]).rstrip() + "\n"


# ---- plot ----------------------------------------------------------------------

PLOT_IMPLS = ("tf_eager", "tf_function", "tf_xla", "clipops_eager", "clipops_function",
              "numpy", "numpy_inplace")


def _time_panel(ax, p: dict) -> None:
    """Time vs list size for the float32 clipping cases, log-log, with the floor."""
    cases = sorted(((n, c) for n, c in p["cases"].items()
                    if c.get("results") and c["clipping"] and list(c["dtypes"]) == ["float32"]),
                   key=lambda nc: nc[1]["numel"])
    if not cases:
        ax.text(0.5, 0.5, "no float32 clipping case in this run", ha="center",
                transform=ax.transAxes)
        return
    x = [c["numel"] for _, c in cases]
    for impl in PLOT_IMPLS:
        pts = [(c["numel"], c["results"][impl]["median_s"] * 1e3) for _, c in cases
               if impl in c["results"]]
        if pts:
            style = "-o" if impl.startswith(("clipops", "numpy")) else "--s"
            ax.plot(*zip(*pts), style, label=impl, markersize=4)
    ax.plot(x, [c["floor_s"] * 1e3 for _, c in cases], "k:", label="bandwidth floor")
    for n, c in cases:
        ax.annotate(n, (c["numel"], c["floor_s"] * 1e3), textcoords="offset points",
                    xytext=(0, -12), ha="center", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="elements in the list",
           ylabel="median time (ms)", title="Clipping time (float32 lists)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _ratio_panel(ax, p: dict) -> None:
    """TF / clipops per case: eager, tf.function, forwarded (net)."""
    keys = ("eager", "function", "function_forwarded")
    names = [n for n, c in p["cases"].items() if c.get("ratios")]
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        vals = [p["cases"][n]["ratios"].get(key, 0.0) for n in names]
        ax.bar([i + k * width for i in range(len(names))], vals, width, label=RATIO_LABELS[key])
    ax.axhline(1.0, color="k", linewidth=0.8)
    if all(v > 0 for n in names for v in p["cases"][n]["ratios"].values()):
        ax.set_yscale("log")
    ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="TF time / clipops time", title="Speed-up of clipops (> 1: faster)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def render_plot(p: dict, png: Path) -> None:
    """The time panel and the speed-up panel of a micro.json, side by side."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(13, 5))
    _time_panel(left, p)
    _ratio_panel(right, p)
    title = f"clipops micro, {p['machine'].get('cpu')} x {p['machine'].get('cpu_count')}, " \
            f"{p['bandwidth']['gbs']:.1f} GB/s copy" + (" (SMOKE)" if p["smoke"] else "")
    fig.suptitle(title, fontsize=10)
    save(fig, png)


def render_all(json_path: Path) -> tuple[Path, Path | None]:
    """Reads the JSON file and writes <stem>.md and <stem>.png beside it (the png where
    matplotlib is installed; else None)."""
    json_path = Path(json_path)
    payload = json.loads(json_path.read_text())
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md.write_text(render_markdown(payload))
    if not can_plot(png.name):
        return md, None
    render_plot(payload, png)
    return md, png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw micro.md and micro.png from micro.json.")
    p.add_argument("json", type=Path, nargs="?",
                   default=Path(__file__).resolve().parent / "results" / "micro.json",
                   help="the benchmark's JSON file (default: %(default)s)")
    args = p.parse_args(argv)
    for path in render_all(args.json):
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
