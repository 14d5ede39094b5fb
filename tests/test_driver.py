"""The driver route (csrc/core/clip_driver.cc): the TF op's GPU kernel compiled
at first use by the NVRTC of TensorFlow's CUDA 12 and launched through the
driver API. Tested here without a GPU:

  - against a fake libcuda.so.1 and a fake libnvrtc.so.12 (tests/fakes/),
    which record what the launcher does: the compile options, the tensor table
    it copies, the grid, the kernel parameters, the stream, the contexts;
  - every way the route cannot run gives one clear error naming the cause and
    the fix, never a crash;
  - with CUDA 12's real NVRTC (CLIPOPS_CUDA12_SITE, as in tests/test_nvrtc12.py)
    the C++ compile path makes real cubins and PTX;
  - no library the TF op loads holds CUDA code or a CUDA runtime.

Each case runs in a fresh process: the route loads its libraries once per
process, as it does in TensorFlow. The kernel itself runs in
tests/test_emulation.py (CPU) and tests/gpu_checks.sh (GPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import clipops
from clipops import _core, _driver

FAKES = Path(__file__).parent / "fakes"
CHUNK = _core.CHUNK
FLOAT32 = _core.DTYPE_CODES["float32"]
ENTRY = struct.Struct("<QQqqii")  # clip_math.h's TensorEntry: 40 bytes
assert ENTRY.size == 40

# Runs the launcher once per stream in `streams` over float32 arrays of `sizes`
# and prints what happened, with the fakes' records, as JSON.
RUNNER = textwrap.dedent("""
    import ctypes, json, sys
    import numpy as np
    from clipops import _core

    a = json.loads(sys.argv[1])
    _core.configure_driver(a["nvrtc"], a["cuda"], a["include"], a["kernel_dir"], a["cache"])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(n).astype(np.float32) for n in a["sizes"]]
    outs = [np.empty_like(x) for x in xs]
    descs = [(x.ctypes.data, o.ctypes.data, x.size, 2) for x, o in zip(xs, outs)]
    need = _core.cuda_workspace_bytes(descs)
    raw = np.zeros(need + 16, np.uint8)
    off = (-raw.ctypes.data) % 16
    norm = np.zeros(1, np.float32)
    calls = []
    for stream in a["streams"]:
        try:
            _core.clip_driver(descs, 2, True, 1.5, 0, None, 0, norm.ctypes.data,
                              raw.ctypes.data + off, need if a["workspace"] else 8, stream)
            calls.append(None)
        except Exception as e:
            calls.append([type(e).__name__, str(e)])
    out = {"calls": calls, "ws": raw.ctypes.data + off, "norm": norm.ctypes.data,
           "descs": descs, "table": raw[off:off + 40 * len(xs)].tobytes().hex()}
    if a["fake_cuda"]:
        f = ctypes.CDLL(a["cuda"])
        for name in ("fake_init_calls", "fake_module_loads", "fake_copies", "fake_launches",
                     "fake_ctx_depth", "fake_max_depth"):
            out[name] = ctypes.c_int.in_dll(f, name).value
        for name in ("fake_grid", "fake_block"):
            out[name] = list((ctypes.c_uint * 3).in_dll(f, name))
        out["fake_shared"] = ctypes.c_uint.in_dll(f, "fake_shared").value
        out["fake_launch_stream"] = ctypes.c_size_t.in_dll(f, "fake_launch_stream").value
        out["fake_params"] = bytes((ctypes.c_ubyte * 168).in_dll(f, "fake_params")).hex()
        out["fake_loaded_head"] = bytes((ctypes.c_ubyte * 64).in_dll(f, "fake_loaded_head")).hex()
    if a["fake_nvrtc"]:
        n = ctypes.CDLL(a["nvrtc"])
        out["fake_nvrtc_compiles"] = ctypes.c_int.in_dll(n, "fake_nvrtc_compiles").value
        out["fake_nvrtc_options"] = ctypes.c_char_p(
            ctypes.addressof(ctypes.c_char.in_dll(n, "fake_nvrtc_options"))).value.decode()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fake libcuda/libnvrtc with")
    out = tmp_path_factory.mktemp("fakes")
    built = {}
    for name in ("libcuda", "libnvrtc"):
        lib = out / f"fake_{name}.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(lib),
                        str(FAKES / f"fake_{name}.c")], check=True)
        built[name] = str(lib)
    return built


def headers_dir(tmp_path: Path) -> list[str]:
    """Stand-ins for the CUDA header folders: the route checks they hold
    cooperative_groups.h and nv/target before it compiles."""
    (tmp_path / "inc" / "nv").mkdir(parents=True, exist_ok=True)
    (tmp_path / "inc" / "cooperative_groups.h").write_text("// stand-in\n")
    (tmp_path / "inc" / "nv" / "target").write_text("// stand-in\n")
    return [str(tmp_path / "inc")]


def run_route(fakes, tmp_path, *, env=None, sizes=(5, CHUNK + 1, 0, 3 * CHUNK), streams=(0x100,),
              nvrtc=None, cuda=None, include=None, kernel_dir=None, cache=None,
              workspace=True) -> dict:
    args = {"nvrtc": nvrtc or fakes["libnvrtc"], "cuda": cuda or fakes["libcuda"],
            "include": headers_dir(tmp_path) if include is None else include,
            "kernel_dir": kernel_dir or str(_driver.kernel_dir()),
            "cache": str(tmp_path / "cache") if cache is None else cache,
            "sizes": list(sizes), "streams": list(streams), "workspace": workspace}
    args["fake_cuda"] = args["cuda"] == fakes["libcuda"]
    args["fake_nvrtc"] = args["nvrtc"] == fakes["libnvrtc"]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args)], capture_output=True,
                          text=True, env=full_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, f"the process crashed ({proc.returncode}):\n{proc.stderr}"
    out = json.loads(proc.stdout)
    out["include"] = args["include"]
    out["kernel_dir"] = args["kernel_dir"]
    return out


def params(out: dict) -> list[bytes]:
    raw = bytes.fromhex(out["fake_params"])
    return [raw[8 * i:8 * i + 8] for i in range(21)]


# ---- a launch, as the fakes see it -------------------------------------------------

def test_one_cooperative_launch_with_the_table_the_kernel_expects(fakes, tmp_path):
    # 4 SMs x 2 blocks = 8 resident; items: 1 + 2 + 0 + 3 = 6, so 6 blocks
    out = run_route(fakes, tmp_path, env={"FAKE_CUDA_SMS": "4", "FAKE_CUDA_BLOCKS_PER_SM": "2"})
    assert out["calls"] == [None]
    assert out["fake_launches"] == 1 and out["fake_copies"] == 1
    assert out["fake_grid"] == [6, 1, 1] and out["fake_block"] == [_core.THREADS, 1, 1]
    assert out["fake_shared"] == 0 and out["fake_launch_stream"] == 0x100
    assert out["fake_ctx_depth"] == 0 and out["fake_max_depth"] == 1  # pushed, then popped

    # the table copied into the workspace: one row per tensor, first items 0, 1, 3, 3
    table = bytes.fromhex(out["table"])
    first = 0
    for i, (inp, outp, numel, dtype) in enumerate(out["descs"]):
        assert ENTRY.unpack_from(table, 40 * i) == (inp, outp, numel, first, dtype, 0)
        first += -(-numel // CHUNK)

    # the kernel's parameters, in clipops_clip_kernel's order
    p = params(out)
    ws, n = out["ws"], len(out["descs"])
    assert struct.unpack("<Q", p[0])[0] == ws                         # the table
    assert struct.unpack("<i", p[1][:4])[0] == n                      # num_tensors
    assert struct.unpack("<q", p[2])[0] == 6                          # num_items
    assert struct.unpack("<Q", p[3])[0] == ws + (40 * n + 15) // 16 * 16  # partials after it
    assert struct.unpack("<i", p[4][:4])[0] == FLOAT32                # norm dtype
    assert struct.unpack("<i", p[5][:4])[0] == 1                      # do_scale
    assert struct.unpack("<d", p[6])[0] == 1.5                        # clip_value
    assert struct.unpack("<Q", p[7])[0] == 0                          # clip on the host
    assert struct.unpack("<i", p[8][:4])[0] == 0                      # no use_norm
    assert struct.unpack("<Q", p[11])[0] == out["norm"]               # norm_out
    assert struct.unpack("<Q", p[12])[0] == 0                         # no tensor_norms
    assert struct.unpack("<i", p[13][:4])[0] == 0                     # nonfinite: TF's NaN
    assert struct.unpack("<i", p[14][:4])[0] == 0                     # clip by the global norm
    assert struct.unpack("<d", p[19])[0] == 1.0                       # unscale: none
    assert struct.unpack("<Q", p[20])[0] == 0                         # unscale on the host


def test_compile_options_are_the_nvcc_build_s_code_generation(fakes, tmp_path):
    out = run_route(fakes, tmp_path, env={"FAKE_CUDA_CC": "86"})
    assert out["fake_nvrtc_options"].splitlines() == [
        "-std=c++17", f"-I{out['kernel_dir']}", *(f"-I{d}" for d in out["include"]),
        "-arch=sm_86", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]
    # the same options as the CuPy route's NVRTC (clipops/_nvrtc.py), when CuPy is here
    try:
        from clipops import _nvrtc
    except ImportError:
        return
    assert _nvrtc.nvrtc_options("-arch=sm_86", out["include"])[2:] == \
        tuple(out["fake_nvrtc_options"].splitlines()[2:])
    assert bytes.fromhex(out["fake_loaded_head"]).startswith(b"\x7fELF")


def test_grid_is_capped_at_the_resident_blocks(fakes, tmp_path):
    out = run_route(fakes, tmp_path, sizes=(20 * CHUNK,),
                    env={"FAKE_CUDA_SMS": "3", "FAKE_CUDA_BLOCKS_PER_SM": "2"})
    assert out["calls"] == [None] and out["fake_grid"] == [6, 1, 1]
    out = run_route(fakes, tmp_path, sizes=())  # an empty list: one block writes the norm 0
    assert out["calls"] == [None] and out["fake_grid"] == [1, 1, 1] and out["fake_copies"] == 0


def test_compiled_once_loaded_once_per_context_and_cached_on_disk(fakes, tmp_path):
    # each fake stream is its own context (GPU): 0x100 twice, then 0x200
    out = run_route(fakes, tmp_path, streams=(0x100, 0x100, 0x200))
    assert out["calls"] == [None] * 3 and out["fake_launches"] == 3
    assert out["fake_module_loads"] == 2  # once per context
    assert out["fake_nvrtc_compiles"] == 1  # the second context reads the disk cache
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("clipops_") and cached[0].suffix == ".cubin"
    again = run_route(fakes, tmp_path)  # a new process: from the cache, no compilation
    assert again["calls"] == [None] and again["fake_nvrtc_compiles"] == 0
    other = run_route(fakes, tmp_path, env={"FAKE_CUDA_CC": "90"})  # another GPU: another key
    assert other["fake_nvrtc_compiles"] == 1 and len(list((tmp_path / "cache").iterdir())) == 2


def test_an_unknown_newer_gpu_gets_ptx_of_the_newest_known_architecture(fakes, tmp_path):
    out = run_route(fakes, tmp_path, env={"FAKE_CUDA_CC": "100", "FAKE_CUDA_DRIVER_VERSION": "12080"})
    assert out["calls"] == [None]
    assert "-arch=compute_90" in out["fake_nvrtc_options"].splitlines()
    assert bytes.fromhex(out["fake_loaded_head"]).startswith(b"// fake ptx\n\0")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".ptx"]


def test_a_cubin_runs_on_an_older_driver_of_the_same_major_version(fakes, tmp_path):
    # CUDA's minor-version compatibility: NVRTC 12.5's sm_80 cubin on a 12.0 driver (525)
    out = run_route(fakes, tmp_path, env={"FAKE_CUDA_DRIVER_VERSION": "12000"})
    assert out["calls"] == [None] and out["fake_launches"] == 1


# ---- every way it cannot run: one clear error, no crash -----------------------------

MISSING = "/nonexistent/clipops-test"
CANNOT_RUN = {
    "old GPU": ({"env": {"FAKE_CUDA_CC": "52"}},
                r"compute capability 6\.0 or newer.*this GPU has 5\.2\. Run the op on the CPU"),
    "no cooperative launch": ({"env": {"FAKE_CUDA_COOP": "0"}},
                              r"does not support cooperative launches"),
    "driver older than NVRTC's major": (
        {"env": {"FAKE_CUDA_DRIVER_VERSION": "11080"}},
        r"driver supports CUDA 11\.8, older than the NVRTC.*CUDA 12\.5.*Update the NVIDIA driver "
        r"\(CUDA 12 needs 525 or newer\)"),
    "PTX needs a driver as new as NVRTC": (
        {"env": {"FAKE_CUDA_CC": "100", "FAKE_CUDA_DRIVER_VERSION": "12020"}},
        r"driver supports CUDA 12\.2, older than the NVRTC.*nvidia-cuda-nvrtc-cu12 no newer than "
        r"CUDA 12\.2"),
    "driver refuses the binary": ({"env": {"FAKE_CUDA_LOAD_ERROR": "222"}},
                                  r"cannot load clipops' kernel.*fake error 222.*Update the NVIDIA driver"),
    "compilation fails": ({"env": {"FAKE_NVRTC_FAIL": "1"}},
                          r"NVRTC failed to compile.*--fmad=false.*fake compile error"),
    "no NVRTC": ({"nvrtc": MISSING + "/libnvrtc.so.12"},
                 r"libnvrtc\.so\.12 could not be loaded.*pip install tensorflow\[and-cuda\]"),
    "no driver": ({"cuda": MISSING + "/libcuda.so.1"},
                  r"needs the CUDA driver.*libcuda\.so\.1 could not be loaded.*Install the NVIDIA driver"),
    "driver fails to start": ({"env": {"FAKE_CUDA_INIT_ERROR": "100"}},
                              r"could not be initialised \(CUDA error 100\)"),
    "no CUDA headers": ({"include": []},
                        r"<cooperative_groups\.h>.*pip install nvidia-cuda-runtime-cu12 "
                        r"nvidia-cuda-cccl-cu12"),
    "no kernel sources": ({"kernel_dir": MISSING}, r"clip_kernel\.cuh is missing.*reinstall clipops"),
}


@pytest.mark.parametrize("case", list(CANNOT_RUN))
def test_a_route_that_cannot_run_says_why_and_what_to_do(fakes, tmp_path, case):
    kwargs, message = CANNOT_RUN[case]
    out = run_route(fakes, tmp_path, streams=(0x100, 0x100), **kwargs)
    for call in out["calls"]:  # the same clear error every time, never a crash
        assert call is not None and call[0] == "RuntimeError", call
        assert re.search(message, call[1], re.S), call[1]
    if out.get("fake_launches") is not None:
        assert out["fake_launches"] == 0 and out["fake_ctx_depth"] == 0


def test_a_failed_launch_is_reported_and_leaves_no_context_pushed(fakes, tmp_path):
    out = run_route(fakes, tmp_path, env={"FAKE_CUDA_LAUNCH_ERROR": "720"})
    assert out["calls"] == [["RuntimeError", "launching the clip kernel: fake error 720 "
                                             "(CUDA error 720)"]]
    assert out["fake_ctx_depth"] == 0


def test_bad_input_is_a_value_error_before_any_library_is_opened(fakes, tmp_path):
    out = run_route(fakes, tmp_path, workspace=False, cuda=MISSING + "/libcuda.so.1")
    assert out["calls"][0][0] == "ValueError" and "workspace" in out["calls"][0][1]


# ---- CUDA 12's real NVRTC through the C++ route --------------------------------------

def cuda12_site() -> Path | None:
    env = os.environ.get("CLIPOPS_CUDA12_SITE")
    for root in [Path(env)] if env else [Path(p) for p in sys.path if p]:
        if (root / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12").is_file():
            return root
    return None


needs_nvrtc12 = pytest.mark.skipif(
    cuda12_site() is None, reason="CUDA 12's NVRTC wheels are not installed (pip install --target "
    "DIR nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12, then "
    "CLIPOPS_CUDA12_SITE=DIR)")


@needs_nvrtc12
@pytest.mark.parametrize("cc", [60, 70, 80, 90])
def test_real_nvrtc12_makes_a_cubin_for_the_gpu(fakes, tmp_path, cc):
    site = cuda12_site()
    include = [str(site / "nvidia" / "cuda_runtime" / "include"),
               str(site / "nvidia" / "cuda_cccl" / "include")]
    out = run_route(fakes, tmp_path, nvrtc=str(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"),
                    include=include, env={"FAKE_CUDA_CC": str(cc)})
    assert out["calls"] == [None], out["calls"]
    head = bytes.fromhex(out["fake_loaded_head"])
    assert head[:4] == b"\x7fELF"
    e_machine = struct.unpack_from("<H", head, 18)[0]
    e_flags = struct.unpack_from("<I", head, 48)[0]
    assert e_machine == 190  # EM_CUDA
    assert e_flags & 0xFF == cc, hex(e_flags)  # the cubin's SM (EF_CUDA_SM)
    [cached] = (tmp_path / "cache").iterdir()
    assert cached.read_bytes()[:64] == head


# ---- the TF op brings no CUDA of its own -----------------------------------------------

def elf_sections_and_needed(path: Path) -> tuple[set[str], list[str]]:
    """Section names and DT_NEEDED entries of a 64-bit little-endian ELF."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, path
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(table_offset: int, at: int) -> str:
        end = data.index(b"\0", table_offset + at)
        return data[table_offset + at:end].decode()

    names = {cstr(sections[shstrndx][4], s[0]) for s in sections}
    needed = []
    for s in sections:
        if s[1] == 6:  # SHT_DYNAMIC; its sh_link is the string table
            strtab = sections[s[6]][4]
            for off in range(s[4], s[4] + s[5], 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == 1:  # DT_NEEDED
                    needed.append(cstr(strtab, val))
    return names, needed


CUDA_SECTIONS = {".nv_fatbin", ".nvFatBinSegment", "__nv_relfatbin"}


def test_the_tf_op_library_holds_no_cuda_code_or_runtime():
    if not clipops.build_info()["with_tf"]:
        pytest.skip("this build has no TensorFlow op")
    pkg = Path(clipops.__file__).parent
    op = pkg / "_clipops_tf.so"
    names, needed = elf_sections_and_needed(op)
    assert not CUDA_SECTIONS & names, names
    assert not [n for n in needed if "cuda" in n or "nvrtc" in n or "clipops" in n], needed
    data = op.read_bytes()
    for marker in (b"__cudaRegisterFatBinary", b"cudaLaunchKernel", b"cudaGetErrorString"):
        assert marker not in data, marker
    # the check can fail: the pybind11 core, built by nvcc with the static runtime, has them
    if clipops.build_info()["with_cuda"]:
        core_names, _ = elf_sections_and_needed(pkg / "libclipops_core.so")
        assert ".nv_fatbin" in core_names
        assert b"__cudaRegisterFatBinary" in (pkg / "libclipops_core.so").read_bytes()


# ---- where the route looks --------------------------------------------------------------

@needs_nvrtc12
def test_config_finds_tensorflow_s_cuda12_wheels(tmp_path):
    site = cuda12_site()
    script = ("import json; from clipops import _driver; c = _driver.config(); "
              "print(json.dumps([c.nvrtc_library, c.include_dirs, c.cache_dir]))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLIPOPS_NVRTC", "CLIPOPS_CUDA_INCLUDE", "CLIPOPS_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["XDG_CACHE_HOME"] = str(tmp_path)
    nvrtc, include, cache = json.loads(subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
        check=True).stdout)
    assert nvrtc == str(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12")
    assert include[:2] == [str(site / "nvidia" / "cuda_runtime" / "include"),
                           str(site / "nvidia" / "cuda_cccl" / "include")]
    assert cache == str(tmp_path / "clipops")


def test_config_follows_the_environment(tmp_path, monkeypatch):
    inc = headers_dir(tmp_path)[0]
    monkeypatch.setenv("CLIPOPS_NVRTC", "/opt/x/libnvrtc.so.12")
    monkeypatch.setenv("CLIPOPS_CUDA_INCLUDE", inc)
    monkeypatch.setenv("CLIPOPS_CACHE_DIR", str(tmp_path / "c"))
    c = _driver.config()
    assert c.nvrtc_library == "/opt/x/libnvrtc.so.12"
    assert c.include_dirs == (inc,)  # both headers in one folder: listed once
    assert c.cache_dir == str(tmp_path / "c")
    assert Path(c.kernel_dir, "clip_kernel.cuh").is_file()


# ---- on a GPU ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_the_driver_route_on_a_gpu_gives_the_cpu_kernel_s_bits(tmp_path):
    """The TF op's GPU route without TF (the device machines have none): the
    same launcher, here with whichever NVRTC the machine has."""
    import ctypes

    import numpy as np

    cupy = pytest.importorskip("cupy", reason="needs CuPy to hold the GPU arrays")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no device")
    except Exception:
        pytest.skip("needs a CUDA GPU")
    from clipops import numpy as cnp

    candidates = [os.environ.get("CLIPOPS_NVRTC"), _driver.nvrtc_library(), "libnvrtc.so.13",
                  "/usr/local/cuda/lib64/libnvrtc.so"]
    nvrtc = next((c for c in filter(None, candidates) if _loads(ctypes, c)), None)
    if nvrtc is None:
        pytest.fail(f"no NVRTC could be loaded from {candidates}")
    _core.configure_driver(nvrtc, "libcuda.so.1", list(_driver.include_dirs()),
                           str(_driver.kernel_dir()), str(tmp_path))
    rng = np.random.default_rng(7)
    host = [rng.standard_normal(n).astype(dt) * 3
            for n, dt in ((3, np.float32), (CHUNK + 1, np.float32), (700, np.float16),
                          (5 * CHUNK - 1, np.float32))]
    dev = [cupy.asarray(h) for h in host]
    outs = [cupy.empty_like(d) for d in dev]
    descs = [(d.data.ptr, o.data.ptr, d.size, _core.DTYPE_CODES[d.dtype.name])
             for d, o in zip(dev, outs)]
    need = _core.cuda_workspace_bytes(descs)
    ws = cupy.empty(need, cupy.uint8)
    norm = cupy.zeros((), cupy.float32)
    stream = cupy.cuda.get_current_stream()
    _core.clip_driver(descs, FLOAT32, True, 2.0, 0, None, 0, norm.data.ptr, ws.data.ptr, need,
                      stream.ptr)
    stream.synchronize()
    want, want_norm = cnp.clip_by_global_norm(host, 2.0)
    assert norm.get().tobytes() == np.asarray(want_norm).tobytes()
    for o, w in zip(outs, want):
        assert o.get().tobytes() == w.tobytes()


def _loads(ctypes, path: str) -> bool:
    try:
        ctypes.CDLL(path)
        return True
    except OSError:
        return False
