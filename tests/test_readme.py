"""README.md is the user's manual: every ```python block in it is a complete program, run here
as its own script in a fresh folder, as a user would paste it; the examples under examples/ run
too. A block whose first line is `# on a GPU:` needs a GPU (and CuPy or PyTorch): it is marked
`gpu` and skipped, with that reason, where there is none. README's headline must be the one
bench/headline.py wrote into bench/results/headline.md, so its figures come from committed
result files."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GPU_MARK = "# on a GPU:"
# Each block imports TensorFlow or NumPy and trains at most a few tiny steps: seconds, but
# minutes on a loaded 2-core CI machine.
TIMEOUT_S = 600


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def gpu_available(code: str) -> str | None:
    """None when a CUDA GPU is usable through CuPy and the block's GPU framework (CuPy,
    PyTorch) is installed, else why not."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU"
    except Exception as exc:  # no CuPy, no driver, no device
        return f"no usable CUDA GPU ({type(exc).__name__}: {exc})"
    for module in re.findall(r"^import (\w+)", code, flags=re.M):
        if module in ("torch", "jax") and importlib.util.find_spec(module) is None:
            return f"a GPU but no {module}"
    return None


def run_script(path: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, str(path), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _cases():
    for line, code in python_blocks(README.read_text()):
        marks = [pytest.mark.gpu] if code.startswith(GPU_MARK) else []
        yield pytest.param(line, code, id=f"README.md:{line}", marks=marks)


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5, "README's quick start lost its examples"
    assert any(code.startswith(GPU_MARK) for _, code in blocks)
    assert any(not code.startswith(GPU_MARK) for _, code in blocks)


@pytest.mark.parametrize("line,code", list(_cases()))
def test_readme_block_runs_as_written(line, code, tmp_path):
    if code.startswith(GPU_MARK):
        why = gpu_available(code)
        if why is not None:
            pytest.skip(f"README.md:{line} is marked '{GPU_MARK}' and this machine has {why}")
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code)
    done = run_script(script, tmp_path)
    assert done.returncode == 0, (f"README.md:{line} failed (exit {done.returncode}):\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    assert done.stdout.strip(), f"README.md:{line} printed nothing: an example shows its result"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != script)
    assert not leftovers, f"README.md:{line} left files behind in its folder: {leftovers}"


def test_seed_loop_example_clips_the_exploding_steps(tmp_path):
    done = run_script(ROOT / "examples" / "seed_loop.py", tmp_path, "--steps", "4")
    assert done.returncode == 0, done.stderr[-4000:]
    steps = re.findall(r"^step (\d+): loss \S+, global norm (\S+) \((clipped|not clipped)\)$",
                       done.stdout, flags=re.M)
    assert [int(s) for s, _, _ in steps] == [0, 1, 2, 3], done.stdout
    # the random data explodes in its first steps, as the tutorial's digits do at lr 0.1
    verdicts = {v for _, _, v in steps}
    assert verdicts == {"clipped", "not clipped"}, done.stdout
    for _, norm, verdict in steps:
        assert (float(norm) > 15.0) == (verdict == "clipped")
    # after a clipped step the printed norms are the before-norms times one common scale 15/norm
    blocks = re.findall(r"global norm (\S+) \(clipped\)\n  before: (.*)\n  after: (.*)",
                        done.stdout)
    assert blocks
    for norm, before, after in blocks:
        scale = 15.0 / float(norm)
        for b, a in zip(before.split(), after.split()):
            assert abs(float(a) - float(b) * scale) <= 2e-4 * max(1.0, float(b) * scale)


def test_readme_headline_is_the_committed_one():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import headline
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = README.read_text()
    assert text.count(headline.README_BEGIN) == 1 and text.count(headline.README_END) == 1
    committed = (ROOT / "bench" / "results" / "headline.md").read_text()
    assert headline.readme_block(committed) in text, (
        "README's headline differs from bench/results/headline.md: run `python bench/headline.py`")
