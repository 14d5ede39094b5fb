"""Packaging: the build under pip's build isolation, the TensorFlow version pin,
and build_info()."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import clipops

ROOT = Path(__file__).resolve().parents[1]


# ---- CMake configure under pip's build isolation --------------------------------

# pip's isolated builds run the target interpreter with PYTHONNOUSERSITE=1 and a
# PYTHONPATH whose sitecustomize.py drops the environment's site-packages
# (pip/_internal/build_env.py); this one does the same.
PIP_ISOLATION = """
import site, sys
hidden = set(site.getsitepackages() + [site.getusersitepackages()])
sys.path = [p for p in sys.path if p not in hidden]
"""


def _cmake() -> str:
    # the `cmake` on PATH may be the pip package's Python shim, which cannot import
    # itself under the emulated isolation: use the binary it wraps
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return shutil.which("cmake") or pytest.skip("cmake is not installed")


def configure(tmp_path, python=sys.executable, isolated=True, **defines):
    pybind11 = pytest.importorskip("pybind11", reason="the configure step needs pybind11's CMake files")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CLIPOPS_TF")}
    if isolated:
        site_dir = tmp_path / "isolation"
        site_dir.mkdir()
        (site_dir / "sitecustomize.py").write_text(PIP_ISOLATION)
        env.update(PYTHONPATH=str(site_dir), PYTHONNOUSERSITE="1")
    # CUDA off: finding nvcc takes seconds, and only the TensorFlow part is under test
    defines = {"CLIPOPS_CUDA": "OFF", "Python_EXECUTABLE": python,
               "pybind11_DIR": pybind11.get_cmake_dir(), **defines}
    cmd = [_cmake(), "-S", str(ROOT), "-B", str(tmp_path / "build"),
           *(f"-D{k}={v}" for k, v in defines.items())]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_isolated_build_stops_when_tensorflow_is_installed(tmp_path):
    pytest.importorskip("tensorflow", reason="needs tensorflow installed in this environment")
    out = configure(tmp_path)
    assert out.returncode != 0
    message = " ".join(out.stderr.split())  # CMake wraps long messages
    assert "pip's build isolation hides it" in message, out.stderr
    assert "pip install --no-build-isolation ." in message
    assert "CLIPOPS_TF=OFF pip install ." in message


def test_isolated_build_with_clipops_tf_off_configures(tmp_path):
    out = configure(tmp_path, CLIPOPS_TF="OFF")
    assert out.returncode == 0, out.stderr
    assert "clipops: TensorFlow op OFF" in out.stdout


def test_build_without_tensorflow_installed_warns_and_configures(tmp_path):
    # a virtual environment without the system's packages: no TensorFlow anywhere
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    out = configure(tmp_path, python=str(venv / "bin" / "python"), isolated=False)
    assert out.returncode == 0, out.stderr
    assert "building without the TensorFlow op" in " ".join(out.stderr.split())
    assert "clipops: TensorFlow op OFF" in out.stdout


# ---- the TensorFlow version: the extra and the import check agree ---------------

def tf_series_of_extra() -> str:
    # a regular expression, not tomllib: that is Python 3.11+, and clipops supports 3.10
    extra = re.search(r"^tensorflow = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    match = extra and re.fullmatch(r'"tensorflow==(\d+\.\d+)\.\*"', extra.group(1))
    assert match, f"the tensorflow extra should pin one minor release: {extra and extra.group(1)}"
    return match.group(1)


needs_tf_op = pytest.mark.skipif(not clipops.build_info()["with_tf"],
                                 reason="this build has no TensorFlow op")


@needs_tf_op
def test_extra_allows_exactly_the_release_the_op_was_built_for():
    built = clipops.build_info()["tf_version"]
    assert built.startswith(tf_series_of_extra() + "."), (built, tf_series_of_extra())


def import_under_tf_version(version: str) -> str:
    code = textwrap.dedent(f"""
        import tensorflow as tf
        tf.__version__ = {version!r}
        try:
            import clipops.tensorflow as ct
        except ImportError as e:
            print("RAISED", e)
        else:
            print("LOADED", ct.global_norm([tf.constant([3.0, 4.0])]).numpy())
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=os.path.dirname(__file__))
    return out.stdout + out.stderr


@needs_tf_op
def test_op_loads_under_another_patch_release():
    major_minor = ".".join(clipops.build_info()["tf_version"].split(".")[:2])
    out = import_under_tf_version(major_minor + ".99")
    assert "LOADED 5.0" in out, out


@needs_tf_op
def test_op_refuses_the_next_minor_release():
    major, minor = clipops.build_info()["tf_version"].split(".")[:2]
    out = import_under_tf_version(f"{major}.{int(minor) + 1}.0")
    assert "RAISED clipops' TensorFlow op was compiled against TensorFlow" in out, out
    assert f"Install tensorflow=={major}.{minor}.*" in out


# ---- build_info ------------------------------------------------------------------

def test_build_info_reports_the_gpu_route():
    info = clipops.build_info()
    if info["with_tf"]:  # the TF op's GPU kernel: the driver route on every build
        assert info["tf_gpu_route"] == "driver"
        assert info["tf_nvrtc"].endswith("libnvrtc.so.12"), info
    else:
        assert info["tf_gpu_route"] is None
    if not info["with_cuda"]:
        assert info["gpu_route"] == "nvrtc"
        assert info["cuda_version"] == info["cuda_architectures"] == ""
        return
    assert info["gpu_route"] == "nvcc"
    assert re.fullmatch(r"(\d+ ?)+", info["cuda_architectures"]), info
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH to compare the CUDA version with")
    release = re.search(r"release (\d+\.\d+)", subprocess.run(
        [nvcc, "--version"], capture_output=True, text=True).stdout).group(1)
    assert info["cuda_version"].startswith(release + "."), (info, release)


def test_front_ends_are_attributes_loaded_on_first_use(tmp_path):
    # `import clipops; help(clipops.keras)` must work, and `import clipops` alone must not
    # import TensorFlow, Keras or CuPy (the NumPy front end needs none of them)
    code = textwrap.dedent("""
        import sys, clipops
        heavy = [m for m in ("tensorflow", "keras", "cupy") if m in sys.modules]
        assert not heavy, heavy
        assert {"numpy", "cupy", "tensorflow", "keras"} <= set(dir(clipops))
        assert callable(clipops.keras.fused) and "keras" in sys.modules
        assert callable(clipops.numpy.clip_by_global_norm)
        try:
            clipops.no_such_thing
        except AttributeError as e:
            assert "no_such_thing" in str(e)
        else:
            raise AssertionError("clipops.no_such_thing did not raise")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
