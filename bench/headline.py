#!/usr/bin/env python
"""The headline: the clip and the training step against TensorFlow, from committed results.

    python bench/headline.py          # bench/results/{micro,mnist}.json -> headline.md, .png

Reads a micro.json (the clip alone, bench/micro.py), a mnist.json (the
training step, bench/mnist.py) and, when it exists, an optim.json (the fused
clip + AdamW step and model.fit with fused(AdamW), bench/optim.py, with its
targets), and writes headline.md (one small table) and
headline.png (one picture) to --out, and the "current results" block of
docs/benchmarks.md and README.md's headline (between their markers; --no-docs
leaves both alone).
Every number is a median from those files; each speed-up is TF's time over
clipops' in the same run; a step's verdict is the paired difference of the two
runs' step times (report.verdict); the captions name each file's machine, date
and commit. No GPU result exists yet: the GPU rows say so. Needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS
from report import machine_line, ms, pyplot, save, table, verdict, verdict_kind

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- headline.py: begin -->", "<!-- headline.py: end -->"
# README's headline: headline.md's table, caption and picture, with links from the root
README_BEGIN, README_END = "<!-- headline:start -->", "<!-- headline:end -->"
CLIP_CASES = {"mnist": "MNIST MLP gradients", "resnet50": "ResNet-50 gradients",
              "bert_base": "BERT-base gradients"}
STEP_MODELS = {"classic-sgd": "MNIST training step, classic MLP, SGD",
               "keras-adam": "MNIST training step, Keras MLP, Adam"}
MODES = {"eager": ("tf_eager", "clipops_eager"), "function": ("tf_function", "clipops_function")}
NO_GPU = "not yet run on a GPU"
# bench/optim.py: the clip + AdamW step, Keras' AdamW against clipops' TF op, per mode
OPTIM_CASES = {"mnist": "clip + AdamW step, MNIST MLP variables", "resnet50":
               "clip + AdamW step, ResNet-50 variables"}
OPTIM_MODES = {"eager": ("keras_eager", "clipops_eager"),
               "function": ("keras_function", "clipops_function")}
# the optimizer targets the headline states (all of them are in optim.md)
OPTIM_TARGET_ROWS = ("clipops_function", "fused_function", "fused_xla", "fused_fit",
                     "fused_fit-xla")


def _machine(payload: dict) -> dict:
    """micro.json keeps the machine under "machine"; mnist.json at its top level."""
    return payload.get("machine", payload)


def _speedups(results: dict, modes: dict) -> dict:
    """{mode: TF's (or Keras') median, clipops' median and their ratio} for each mode whose
    two rows (the peer's, clipops') were both timed."""
    out = {}
    for mode, (peer, ours) in modes.items():
        if peer in results and ours in results:
            t, o = results[peer]["median_s"], results[ours]["median_s"]
            out[mode] = {"tf_s": t, "clipops_s": o, "speedup": t / o}
    return out


def clip_rows(micro: dict) -> list[dict]:
    """The clip alone, per case and mode: TF's and clipops' medians and TF / clipops."""
    rows = []
    for case, label in CLIP_CASES.items():
        c = micro["cases"].get(case)
        results = (c or {}).get("results") or {}
        row = {"what": f"clip alone, {label} ({c['num_tensors']} tensors, "
                       f"{c['nbytes'] / 1e6:.1f} MB)" if c else f"clip alone, {label}",
               "modes": _speedups(results, MODES)}
        if row["modes"]:
            rows.append(row)
    return rows


def step_rows(mnist: dict) -> list[dict]:
    """The training step, per model and mode: medians, TF / clipops and the paired verdict."""
    rows: dict[str, dict] = {}
    for p in mnist.get("pairs", []):
        tf_st, co_st = p["runs"]["tf"]["step_time"], p["runs"]["clipops"]["step_time"]
        if not (tf_st and co_st) or p["model"] not in STEP_MODELS:
            continue
        row = rows.setdefault(p["model"], {"what": STEP_MODELS[p["model"]], "modes": {}})
        row["modes"][p["mode"]] = {
            "tf_s": tf_st["median_s"], "clipops_s": co_st["median_s"],
            "speedup": tf_st["median_s"] / co_st["median_s"],
            "verdict": verdict_kind(p["paired_step_diff"]),
            "verdict_text": verdict(p["paired_step_diff"])}
    return list(rows.values())


def optim_rows(optim: dict | None) -> list[dict]:
    """The fused clip + AdamW step (bench/optim.py): Keras' AdamW against clipops'
    TF op per case and mode, and model.fit, Keras' AdamW against fused(AdamW)."""
    if not optim:
        return []
    rows = []
    for case, label in OPTIM_CASES.items():
        c = optim["cases"].get(case) or {}
        results = c.get("results") or {}
        row = {"what": f"{label} ({int(c['numel']) / 1e6:.1f}M params)" if c else label,
               "modes": _speedups(results, OPTIM_MODES)}
        if row["modes"]:
            rows.append(row)
    for f in optim.get("fit_rows") or []:
        if f["mode"] != "fit" or not (f["runs"].get("keras") and f["runs"].get("fused")):
            continue
        t, o = f["runs"]["keras"]["median_s"], f["runs"]["fused"]["median_s"]
        rows.append({"what": "model.fit step, MNIST MLP, Keras' AdamW / fused(AdamW)",
                     "modes": {"function": {"tf_s": t, "clipops_s": o, "speedup": t / o,
                                            "verdict": verdict_kind(f["paired_step_diff"])}}})
    return rows


def optim_targets(optim: dict | None) -> list[str]:
    """The optimizer step's targets (issue 25, CPU) with this run's numbers."""
    if not optim:
        return []
    rows = []
    for t in optim.get("targets", []):
        if t["row"] not in OPTIM_TARGET_ROWS or t.get("value") is None:
            continue
        if t["metric"] == "paired_step_diff":
            value = f"{t['value'] * 1e3:.2f} ms faster" if t["value"] >= 0 else \
                f"{-t['value'] * 1e3:.2f} ms slower"
        else:
            value = f"{t['value']:.2f}x"
        rows.append([t["target"], value, "met" if t["met"] else "**missed**"])
    if not rows:
        return []
    return ["", "The fused optimizer step's targets on the CPU (all of them: "
            "[optim.md](optim.md)):", "", *table(["target", "this run", ""], rows, "lrl")]


def _cell(m: dict | None, digits: int) -> tuple[str, str]:
    """("TF / clipops ms", "speed-up[, verdict]") of one mode, or dashes."""
    if not m:
        return "-", "-"
    kind = {"faster": "clipops faster", "same": "no measurable difference",
            "slower": "clipops slower"}.get(m.get("verdict"))
    return (f"{ms(m['tf_s'], digits)} / {ms(m['clipops_s'], digits)}",
            f"{m['speedup']:.2f}x" + (f" ({kind})" if kind else ""))


def caption(micro: dict, mnist: dict, micro_path: Path, mnist_path: Path,
            optim: dict | None = None, optim_path: Path | None = None) -> list[str]:
    """Where and when each part was measured, and how to read the table."""
    smoke = " (SMOKE run: toy sizes, not meaningful)" if micro.get("smoke") else ""
    steps = mnist.get("config", {}).get("steps", "?")
    lines = [f"Clip alone: `{_rel(micro_path)}`{smoke}, {machine_line(_machine(micro))}.",
             f"Training step: `{_rel(mnist_path)}`, {machine_line(_machine(mnist))}, {steps} "
             "steps per run, data: " + mnist.get("data", {}).get("source", "?") + "."]
    if optim:
        osmoke = " (SMOKE run: toy sizes, not meaningful)" if optim.get("smoke") else ""
        lines.append(f"Optimizer step (clipops' TF op `clipops.adamw_update`, Keras' own "
                     f"AdamW): `{_rel(optim_path)}`{osmoke}, {machine_line(_machine(optim))}.")
    return lines + [
            "Medians of repeated calls (clip) or steps (training); speed-up = TF's time / "
            "clipops' time in the same run (> 1: clipops faster); a step's verdict is the paired "
            "difference of the two runs' step times, with its 95% interval ([how to read "
            "them](../../docs/benchmarks.md#how-to-read-the-numbers))."]


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(DOCS.parent.parent))
    except ValueError:
        return str(path)


def headline_md(micro: dict, mnist: dict, micro_path: Path, mnist_path: Path,
                optim: dict | None = None, optim_path: Path | None = None) -> str:
    """headline.md: one small table, the optimizer step's targets, and the caption."""
    rows = []
    for r, digits in ([(r, 3) for r in clip_rows(micro)] + [(r, 2) for r in step_rows(mnist)]
                      + [(r, 2) for r in optim_rows(optim)]):
        e, f = (_cell(r["modes"].get(m), digits) for m in MODES)
        rows.append([r["what"], "CPU", *e, *f])
    rows += [["clip alone, the same lists", "GPU", NO_GPU, "", "", ""],
             ["MNIST training step", "GPU", NO_GPU, "", "", ""]]
    if optim:
        rows.append(["clip + AdamW step", "GPU", NO_GPU, "", "", ""])
    lines = ["# clipops against TensorFlow: the clip, the training step and the optimizer step",
             ""]
    lines += table(["", "device", "eager: TF / clipops, ms", "speed-up",
                    "tf.function: TF / clipops, ms", "speed-up"], rows, "llrlrl")
    lines += optim_targets(optim)
    lines += ["", *caption(micro, mnist, micro_path, mnist_path, optim, optim_path), "",
              "![speed-up of clipops against TF](headline.png)"]
    return "\n".join(lines) + "\n"


def headline_png(micro: dict, mnist: dict, path: Path, optim: dict | None = None) -> Path:
    """headline.png: TF / clipops per row and mode, a bar each, the 1x line marked."""
    rows = clip_rows(micro) + step_rows(mnist) + optim_rows(optim)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(rows) + 1.6))
    height = 0.38
    for k, (mode, color) in enumerate((("eager", "tab:orange"), ("function", "tab:blue"))):
        ys = [i + (k - 0.5) * height for i in range(len(rows))]
        vals = [r["modes"].get(mode, {}).get("speedup", 0.0) for r in rows]
        ax.barh(ys, vals, height, color=color,
                label="eager" if mode == "eager" else "tf.function")
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["what"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("TF time / clipops time, same run (> 1: clipops faster); CPU.\n"
                  f"GPU: {NO_GPU}")
    ax.legend(fontsize=8, loc="lower right")
    title = [f"clip: {machine_line(_machine(micro))}",
             f"training step: {machine_line(_machine(mnist))}"]
    if optim:
        title.append(f"optimizer step: {machine_line(_machine(optim))}")
    fig.suptitle("\n".join(title), fontsize=8)   # the whole figure's width: the lines are long
    return save(fig, path)


def results_block(micro: dict, mnist: dict, micro_path: Path, mnist_path: Path,
                  optim: dict | None = None, optim_path: Path | None = None) -> str:
    """docs/benchmarks.md's "current results": the headline, then the fuller tables."""
    lines = [BEGIN, "<!-- written by `python bench/headline.py` from the files it names; "
             "edit the script, not this block -->", ""]
    body = headline_md(micro, mnist, micro_path, mnist_path, optim, optim_path)
    body = body.split("\n", 2)[2]
    lines += [body.replace("](headline.png)", "](../bench/results/headline.png)")
              .replace("](optim.md)", "](../bench/results/optim.md)")
              .replace("](../../docs/benchmarks.md#", "](#")
              .rstrip(), ""]
    lines += [f"#### The clip alone: every list (`{_rel(micro_path)}`)", ""]
    rows = []
    for name, c in micro["cases"].items():
        res = c.get("results") or {}
        cells = [f"{ms(res[i]['median_s'])} ({res[i]['floor_ratio']:.2f}x)" if i in res else "-"
                 for i in ("tf_eager", "clipops_eager", "tf_function", "clipops_function",
                           "numpy", "numpy_inplace")]
        rows.append([name, str(c["num_tensors"]), f"{c['nbytes'] / 1e6:.1f}",
                     f"{ms(c.get('floor_s'))}", *cells])
    lines += table(["list", "tensors", "MB", "floor ms", "TF eager", "clipops eager",
                    "TF tf.function", "clipops tf.function", "NumPy", "NumPy in place"], rows)
    lines += ["", "Median ms (time / floor). The targets, with their route bounds:", ""]
    rows = []
    for t in micro.get("targets", []):
        if t.get("value") is None:
            continue
        why = "" if t["met"] or t.get("route_bound_met") is not False else \
            "; the route alone misses too"
        rows.append([t["target"], t["case"], f"{t['value']:.2f}", f"{t['op']} {t['threshold']:g}",
                     "-" if t.get("route_bound") is None else f"{t['route_bound']:.2f}",
                     ("met" if t["met"] else "missed") + why])
    lines += table(["target", "list", "value", "needed", "route + in place", "verdict"], rows,
                   "llrrrl")
    lines += ["", f"#### The training step (`{_rel(mnist_path)}`)", ""]
    rows = []
    for p in mnist.get("pairs", []):
        tf_st, co_st = p["runs"]["tf"]["step_time"], p["runs"]["clipops"]["step_time"]
        rows.append([p["model"], p["mode"], ms((tf_st or {}).get("median_s"), 2),
                     ms((co_st or {}).get("median_s"), 2), verdict(p["paired_step_diff"]),
                     "yes" if p["agreement"]["passed"] else "**no**"])
    for r in mnist.get("fit_rows") or []:
        rows.append(["model.fit (Keras's clip as TF)", r["mode"],
                     ms((r["runs"]["tf"]["step_time"] or {}).get("median_s"), 2),
                     ms((r["runs"]["clipops"]["step_time"] or {}).get("median_s"), 2),
                     verdict(r["paired_step_diff"]),
                     "yes (bit-identical)" if r["weights_identical"] else
                     f"{r['clipped_steps']} steps clipped"])
    lines += table(["recipe", "mode", "TF step ms", "clipops step ms",
                    "verdict (TF - clipops, paired, 95% interval)", "clips agree"], rows,
                   "llrrll")
    return "\n".join(lines + ["", END])


def readme_block(headline: str) -> str:
    """README's headline: headline.md without its title, its links made relative to the
    repository's root (tests/test_readme.py checks README holds exactly this)."""
    body = headline.split("\n", 2)[2].strip()
    body = body.replace("](headline.png)", "](bench/results/headline.png)")
    body = body.replace("](optim.md)", "](bench/results/optim.md)")
    body = body.replace("](../../docs/", "](docs/")
    return "\n".join([README_BEGIN, body, README_END])


def update_docs(docs: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the text from `begin` to `end` in `docs` with `block` (which holds both).

    Raises:
      ValueError: the file lacks the markers, so nothing is written.
    """
    text = docs.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{docs} has no {begin} ... {end} block to refresh")
    head, rest = text.split(begin, 1)
    docs.write_text(head + block + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> int:
    """Reads the two result files, writes the headline (and the docs' block)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro", type=Path, default=RESULTS / "micro.json",
                    help="bench/micro.py's result (default: %(default)s)")
    ap.add_argument("--optim", type=Path, default=RESULTS / "optim.json",
                    help="bench/optim.py's result; left out when the file does not exist "
                         "(default: %(default)s)")
    ap.add_argument("--mnist", type=Path, default=RESULTS / "mnist.json",
                    help="bench/mnist.py's result (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="folder for headline.md and headline.png (default: %(default)s)")
    ap.add_argument("--docs", type=Path, default=DOCS,
                    help="the file whose headline.py block is refreshed (default: %(default)s)")
    ap.add_argument("--readme", type=Path, default=README,
                    help="the file whose headline block is refreshed (default: %(default)s)")
    ap.add_argument("--no-docs", action="store_true", help="leave the docs and README alone")
    args = ap.parse_args(argv)
    micro, mnist = (json.loads(p.read_text()) for p in (args.micro, args.mnist))
    optim = json.loads(args.optim.read_text()) if args.optim.is_file() else None
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / "headline.md"
    md.write_text(headline_md(micro, mnist, args.micro, args.mnist, optim, args.optim))
    png = headline_png(micro, mnist, args.out / "headline.png", optim)
    print(md.read_text())
    print(f"wrote {md}, {png}")
    if not args.no_docs:
        try:
            update_docs(args.docs, results_block(micro, mnist, args.micro, args.mnist, optim,
                                                 args.optim))
            update_docs(args.readme, readme_block(md.read_text()), README_BEGIN, README_END)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"refreshed the current results in {args.docs} and the headline in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
