"""How the benchmarks report: numbers as text, markdown tables, plots' common
parts, progress lines, and the plain-words verdict on a paired difference.

Every script's tables and figures go through here, so that they read alike
and each script holds only its cases and what it measures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterable, Sequence, TextIO


def ms(seconds: float | None, digits: int = 3) -> str:
    """Seconds as milliseconds with `digits` decimals; "n/a" for None."""
    return "n/a" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; "n/a" for None."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(header: Sequence[str], rows: Iterable[Sequence[str]],
          align: str | None = None) -> list[str]:
    """A markdown table's lines. `align` has one letter per column, "l" or
    "r" (default: the first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return (["| " + " | ".join(header) + " |", rule] +
            ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def machine_line(m: dict) -> str:
    """"<date>, <cpu> x <cores>, git <sha>": where and when a result was measured."""
    dirty = ", with uncommitted changes" if m.get("git_dirty") else ""
    return (f"{str(m.get('date', '?'))[:16].replace('T', ' ')} UTC, {m.get('cpu', '?')} x "
            f"{m.get('cpu_count', '?')}, git {m.get('git', '?')}{dirty}")


# ---- the verdict on a paired difference ---------------------------------------

def verdict(diff: dict | None, digits: int = 2) -> str:
    """Plain words for a paired difference TF - clipops (seconds, with the
    95% interval of its median): which is faster, by how much, or that the
    interval includes 0 (a tie within the noise is no evidence either way).

    Args:
      diff: {"median_s": float, "ci95_s": [lo, hi]}, or None (nothing timed).
      digits: decimals of the milliseconds shown (more where a bound would read 0).

    Returns:
      "clipops faster by X ms [lo, hi]", "clipops slower by X ms [lo, hi]",
      "no measurable difference (X ms [lo, hi])" or "not timed".
    """
    if not diff or diff.get("median_s") is None:
        return "not timed"
    med, (lo, hi) = diff["median_s"], diff["ci95_s"]
    while digits < 4 and any(b != 0 and ms(abs(b), digits) == ms(0.0, digits) for b in (lo, hi)):
        digits += 1  # a bound that is not 0 must not read "0.00"
    if lo > 0:
        return f"clipops faster by {ms(med, digits)} ms [{ms(lo, digits)}, {ms(hi, digits)}]"
    if hi < 0:
        return f"clipops slower by {ms(-med, digits)} ms [{ms(-hi, digits)}, {ms(-lo, digits)}]"
    return f"no measurable difference ({ms(med, digits)} ms [{ms(lo, digits)}, {ms(hi, digits)}])"


def verdict_kind(diff: dict | None) -> str | None:
    """"faster", "slower" or "same" for clipops (see verdict); None when not timed."""
    if not diff or diff.get("median_s") is None:
        return None
    lo, hi = diff["ci95_s"]
    return "faster" if lo > 0 else "slower" if hi < 0 else "same"


# ---- plots --------------------------------------------------------------------

def can_plot(what: str) -> bool:
    """Whether matplotlib is installed; if not, says on stderr that `what` is not drawn
    (the tables and the JSON file are written all the same)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: {what} not drawn (pip install matplotlib)",
              file=sys.stderr)
        return False
    return True


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Writes the figure, closes it, returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


# ---- progress ------------------------------------------------------------------

class Progress:
    """The progress of one phase of a long run.

    On a terminal, one line redrawn in place. On a pipe or a file, plain lines:
    one at each quarter of the phase and one at its end, so that a log holds no
    control characters and still shows a long run moving.

    Args:
      label: what the phase is ("classic-sgd / eager").
      total: its steps.
      stream: where to write (default sys.stdout).
      unit: what a step is called in the lines.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 unit: str = "steps") -> None:
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._quarter = 0
        self._width = 0

    def update(self, done: int, values: dict[str, float] | None = None) -> None:
        """Reports `done` steps finished, with the latest `values` (name: number)."""
        shown = "".join(f", {k} {v:.4g}" for k, v in (values or {}).items())
        line = (f"  {self.label}: {done}/{self.total} {self.unit}, "
                f"{time.perf_counter() - self.start:.1f} s{shown}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            if done >= self.total:
                self.stream.write("\n")
        else:
            quarter = 4 * done // self.total
            if quarter <= self._quarter and done < self.total:
                return
            self._quarter = quarter
            self.stream.write(line + "\n")
        self.stream.flush()
