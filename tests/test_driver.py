"""The driver route (csrc/core/clip_driver.cc): the TF op's GPU kernel compiled
at first use by the NVRTC of TensorFlow's CUDA 12 and launched through the
driver API. Tested here without a GPU:

  - against a fake libcuda.so.1 and a fake libnvrtc.so.12 (tests/fakes/),
    which record what the launcher does: the compile options, the tensor table
    it copies, the grid, the kernel parameters, the stream, the contexts;
  - every way the route cannot run gives one clear error naming the cause and
    the fix, never a crash;
  - the disk cache of compiled kernels (csrc/core/kernel_cache.h) loads only
    what this user compiled: a planted, linked, foreign or damaged entry, or
    one in a folder others can write, is never loaded;
  - where the route finds NVRTC, the CUDA headers and libcuda: never in the
    current directory, the script's folder or beside the package;
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
import stat
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
    for i, stream in enumerate(a["streams"]):
        if i in a["recreate_before"]:  # the contexts destroyed and made anew, same addresses
            ctypes.CDLL(a["cuda"]).fake_recreate_contexts()
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
                     "fake_ctx_depth", "fake_max_depth", "fake_host_allocs"):
            out[name] = ctypes.c_int.in_dll(f, name).value
        for name in ("fake_grid", "fake_block"):
            out[name] = list((ctypes.c_uint * 3).in_dll(f, name))
        out["fake_shared"] = ctypes.c_uint.in_dll(f, "fake_shared").value
        out["fake_launch_stream"] = ctypes.c_size_t.in_dll(f, "fake_launch_stream").value
        out["fake_launch_function"] = ctypes.c_size_t.in_dll(f, "fake_launch_function").value
        out["fake_params"] = bytes((ctypes.c_ubyte * 168).in_dll(f, "fake_params")).hex()
        out["fake_loaded_head"] = bytes((ctypes.c_ubyte * 64).in_dll(f, "fake_loaded_head")).hex()
    if a["fake_nvrtc"]:
        n = ctypes.CDLL(a["nvrtc"])
        out["fake_nvrtc_compiles"] = ctypes.c_int.in_dll(n, "fake_nvrtc_compiles").value
        for name in ("fake_nvrtc_options", "fake_nvrtc_source"):
            out[name] = ctypes.c_char_p(ctypes.addressof(ctypes.c_char.in_dll(n, name))).value.decode()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fake libcuda/libnvrtc with")
    out = tmp_path_factory.mktemp("fakes")
    built = {}
    # (key, source, extra flags): libcuda11 lacks cuCtxGetId, as a CUDA 11 driver does
    for key, name, flags in (("libcuda", "libcuda", []), ("libnvrtc", "libnvrtc", []),
                             ("libcuda11", "libcuda", ["-DFAKE_CUDA_11"])):
        lib = out / f"fake_{key}.so"
        build_fake(cc, name, lib, flags)
        built[key] = str(lib)
    built["cc"] = cc
    return built


def build_fake(cc: str, name: str, out: Path, flags: list[str]) -> None:
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", *flags, "-o", str(out),
                    str(FAKES / f"fake_{name}.c")], check=True)


def headers_dir(tmp_path: Path) -> list[str]:
    """Stand-ins for the CUDA header folders: the route checks they hold
    cooperative_groups.h and nv/target before it compiles."""
    (tmp_path / "inc" / "nv").mkdir(parents=True, exist_ok=True)
    (tmp_path / "inc" / "cooperative_groups.h").write_text("// stand-in\n")
    (tmp_path / "inc" / "nv" / "target").write_text("// stand-in\n")
    return [str(tmp_path / "inc")]


def run_route(fakes, tmp_path, *, env=None, sizes=(5, CHUNK + 1, 0, 3 * CHUNK), streams=(0x100,),
              nvrtc=None, cuda=None, include=None, kernel_dir=None, cache=None,
              workspace=True, recreate_before=()) -> dict:
    """Runs RUNNER in a fresh process (cwd: tmp_path) and returns its JSON,
    with the arguments' include folders and kernel_dir, and its stderr."""
    args = {"nvrtc": nvrtc or fakes["libnvrtc"], "cuda": cuda or fakes["libcuda"],
            "include": headers_dir(tmp_path) if include is None else include,
            "kernel_dir": kernel_dir or str(_driver.kernel_dir()),
            "cache": str(tmp_path / "cache") if cache is None else cache,
            "sizes": list(sizes), "streams": list(streams), "workspace": workspace,
            "recreate_before": list(recreate_before)}
    args["fake_cuda"] = args["cuda"] in (fakes["libcuda"], fakes["libcuda11"])
    args["fake_nvrtc"] = args["nvrtc"] == fakes["libnvrtc"]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args)], capture_output=True,
                          text=True, env=full_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, f"the process crashed ({proc.returncode}):\n{proc.stderr}"
    out = json.loads(proc.stdout)
    out["include"] = args["include"]
    out["kernel_dir"] = args["kernel_dir"]
    out["stderr"] = proc.stderr
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


NVCC_CODEGEN = ["--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]


def test_compile_options_are_the_nvcc_build_s_code_generation(fakes, tmp_path):
    out = run_route(fakes, tmp_path, env={"FAKE_CUDA_CC": "86"})
    options = out["fake_nvrtc_options"].splitlines()
    assert options == [
        "-std=c++17", f"-I{out['kernel_dir']}", *(f"-I{d}" for d in out["include"]),
        "-arch=sm_86", *NVCC_CODEGEN]
    # the one list both NVRTC routes compile with (kernel_cache.h)
    assert options == _core.nvrtc_options("-arch=sm_86", out["kernel_dir"], out["include"])
    assert bytes.fromhex(out["fake_loaded_head"]).startswith(b"\x7fELF fake cubin")


def test_the_program_includes_the_kernel_from_the_include_folders_only(fakes, tmp_path):
    # NVRTC looks for a quoted include of the program itself in the current
    # directory (test_a_kernel_source_in_the_working_directory_is_not_compiled)
    out = run_route(fakes, tmp_path)
    assert out["fake_nvrtc_source"] == _core.KERNEL_PROGRAM == \
        "#include <clip_kernel.cuh>\n#include <optim_kernel.cuh>\n"


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


def test_a_context_made_where_a_destroyed_one_was_gets_its_own_kernel_and_staging(fakes, tmp_path):
    # The driver reuses a destroyed context's address for the next one; the
    # kernel loaded in the old one is gone with it. cuCtxGetId tells them apart.
    out = run_route(fakes, tmp_path, streams=(0x100, 0x100, 0x100), recreate_before=(2,))
    assert out["calls"] == [None] * 3 and out["fake_launches"] == 3
    assert out["fake_module_loads"] == 2  # loaded again in the new context
    assert out["fake_launch_function"] == 0x5000 + 0x10000 + 0x1000  # the new module's function
    assert out["fake_host_allocs"] == 2  # the old context's pinned block is not reused
    assert out["fake_nvrtc_compiles"] == 1  # the binary itself comes from the disk cache


def test_a_driver_without_context_ids_is_told_to_update(fakes, tmp_path):
    out = run_route(fakes, tmp_path, cuda=fakes["libcuda11"], streams=(0x100, 0x100),
                    env={"FAKE_CUDA_DRIVER_VERSION": "11080"})
    for call in out["calls"]:
        assert call[0] == "RuntimeError"
        assert re.search(r"driver supports CUDA 11\.8, older than the CUDA 12 that clipops' GPU "
                         r"kernel needs.*Update the NVIDIA driver \(CUDA 12 needs 525 or newer\)",
                         call[1]), call[1]
    assert out["fake_launches"] == 0 and out["fake_ctx_depth"] == 0


# A first compilation (held inside the fake NVRTC) on one context, and launches
# on another context meanwhile, from another thread.
CONCURRENT = textwrap.dedent("""
    import ctypes, json, sys, threading, time
    import numpy as np
    from clipops import _core

    a = json.loads(sys.argv[1])
    _core.configure_driver(a["nvrtc"], a["cuda"], a["include"], a["kernel_dir"], "")
    nv = ctypes.CDLL(a["nvrtc"])
    hold = ctypes.c_int.in_dll(nv, "fake_nvrtc_hold")
    in_compile = ctypes.c_int.in_dll(nv, "fake_nvrtc_in_compile")
    x = np.ones(100, np.float32)
    descs = [(x.ctypes.data, x.ctypes.data, x.size, 2)]
    need = _core.cuda_workspace_bytes(descs)
    ws = np.zeros(need + 16, np.uint8)
    norm = np.zeros(1, np.float32)
    def launch(stream):
        _core.clip_driver(descs, 2, True, 1.5, 0, None, 0, norm.ctypes.data,
                          ws.ctypes.data + (-ws.ctypes.data) % 16, need, stream)
    launch(0x200)  # the second GPU's kernel: compiled and loaded
    hold.value = 1
    first = threading.Thread(target=launch, args=(0x100,))  # the first GPU's first launch
    first.start()
    while not in_compile.value:
        time.sleep(0.001)
    other = threading.Thread(target=launch, args=(0x200,))
    other.start()
    other.join(timeout=20)
    result = {"other_done_during_compile": not other.is_alive() and in_compile.value == 1}
    hold.value = 0
    first.join()
    other.join()
    print(json.dumps(result))
""")


def test_a_first_compilation_does_not_hold_up_launches_on_other_gpus(fakes, tmp_path):
    args = {"nvrtc": fakes["libnvrtc"], "cuda": fakes["libcuda"], "include": headers_dir(tmp_path),
            "kernel_dir": str(_driver.kernel_dir())}
    proc = subprocess.run([sys.executable, "-c", CONCURRENT, json.dumps(args)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"other_done_during_compile": True}


# ---- the disk cache: only what this user compiled is loaded ----------------------------

FRESH = b"\x7fELF fake cubin"         # what the fake NVRTC makes
PLANTED = b"\x7fELF planted" + b"\0" * 52  # a valid-looking image someone else wrote


def entry_name(fakes, tmp_path: Path) -> str:
    """The cache entry's file name for run_route's defaults (learned from a run
    into a scratch folder: the key covers the headers' contents, not paths)."""
    scratch = tmp_path / "scratch"
    run_route(fakes, tmp_path, cache=str(scratch))
    [entry] = scratch.iterdir()
    return entry.name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_cache_folder_and_its_entries_are_private(fakes, tmp_path):
    cache = tmp_path / "a" / "b" / "cache"  # missing parents are made too
    out = run_route(fakes, tmp_path, cache=str(cache), env={"FAKE_CUDA_CC": "90"})
    assert out["calls"] == [None]
    assert mode(cache) == 0o700 and mode(tmp_path / "a") == 0o700
    [entry] = cache.iterdir()  # no temporary file left beside it
    assert entry.name.startswith("clipops_") and entry.suffix == ".cubin"
    assert mode(entry) == 0o600 and entry.stat().st_uid == os.geteuid()
    assert entry.read_bytes()[:len(FRESH)] == FRESH


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making a file owned by another user "
                                "needs root")


def plant_folder_writable_by_others(cache: Path, name: str) -> None:
    cache.mkdir()
    (cache / name).write_bytes(PLANTED)
    os.chmod(cache / name, 0o600)
    os.chmod(cache, 0o777)


def plant_folder_of_another_user(cache: Path, name: str) -> None:
    cache.mkdir(mode=0o700)
    (cache / name).write_bytes(PLANTED)
    os.chmod(cache / name, 0o600)
    os.chown(cache / name, 65534, 65534)
    os.chown(cache, 65534, 65534)


@pytest.mark.parametrize("plant", [plant_folder_writable_by_others,
                                   pytest.param(plant_folder_of_another_user, marks=needs_root)])
def test_an_untrusted_folder_is_neither_read_nor_written(fakes, tmp_path, plant):
    name = entry_name(fakes, tmp_path)
    cache = tmp_path / "cache"
    plant(cache, name)
    before = sorted(p.name for p in cache.iterdir())
    out = run_route(fakes, tmp_path, streams=(0x100, 0x200))  # two contexts: two cache lookups
    assert out["calls"] == [None, None]
    assert bytes.fromhex(out["fake_loaded_head"]).startswith(FRESH)  # compiled, not the planted
    assert out["fake_nvrtc_compiles"] == 2  # each context compiles in memory
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing written
    assert (cache / name).read_bytes() == PLANTED
    # one warning that says which folder and why
    assert out["stderr"].count("clipops: not using the kernel cache folder") == 1, out["stderr"]
    assert str(cache) in out["stderr"]


def plant_entry_writable_by_others(cache: Path, name: str) -> None:
    (cache / name).write_bytes(PLANTED)
    os.chmod(cache / name, 0o666)


def plant_entry_readable_by_others(cache: Path, name: str) -> None:
    # mode 0644: a copy or a checkout, not a file this cache wrote (0600)
    (cache / name).write_bytes(PLANTED)
    os.chmod(cache / name, 0o644)


def plant_entry_of_another_user(cache: Path, name: str) -> None:
    (cache / name).write_bytes(PLANTED)
    os.chmod(cache / name, 0o600)
    os.chown(cache / name, 65534, 65534)


def plant_entry_as_a_link(cache: Path, name: str) -> None:
    target = cache.parent / "elsewhere.cubin"  # a file of ours, named through a link
    target.write_bytes(PLANTED)
    os.chmod(target, 0o600)
    (cache / name).symlink_to(target)


@pytest.mark.parametrize("plant", [plant_entry_writable_by_others, plant_entry_readable_by_others,
                                   pytest.param(plant_entry_of_another_user, marks=needs_root),
                                   plant_entry_as_a_link])
def test_an_untrusted_entry_is_not_loaded_but_replaced(fakes, tmp_path, plant):
    name = entry_name(fakes, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    plant(cache, name)
    out = run_route(fakes, tmp_path)
    assert out["calls"] == [None] and out["fake_nvrtc_compiles"] == 1
    assert bytes.fromhex(out["fake_loaded_head"]).startswith(FRESH)
    entry = cache / name  # replaced by our own file (a link is replaced, not followed)
    assert not entry.is_symlink() and mode(entry) == 0o600 and entry.stat().st_uid == os.geteuid()
    assert entry.read_bytes()[:len(FRESH)] == FRESH
    if (tmp_path / "elsewhere.cubin").exists():
        assert (tmp_path / "elsewhere.cubin").read_bytes() == PLANTED
    assert sorted(p.name for p in cache.iterdir()) == [name]


def test_a_relative_cache_folder_is_not_used(fakes, tmp_path):
    # it would name a folder under whatever the current directory is
    out = run_route(fakes, tmp_path, cache="relative/cache")
    assert out["calls"] == [None] and out["fake_nvrtc_compiles"] == 1
    assert not (tmp_path / "relative").exists()
    assert "not an absolute path" in out["stderr"]


def test_a_damaged_entry_is_compiled_again_once_and_rewritten(fakes, tmp_path):
    name = entry_name(fakes, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / name).write_bytes(b"\0damaged")  # e.g. a disk error: the driver refuses it
    os.chmod(cache / name, 0o600)
    out = run_route(fakes, tmp_path, streams=(0x100, 0x200))
    assert out["calls"] == [None, None]
    assert out["fake_nvrtc_compiles"] == 1  # once, then the second context reads the new entry
    assert out["fake_module_loads"] == 3  # the damaged one, the fresh one, the second context's
    assert (cache / name).read_bytes()[:len(FRESH)] == FRESH


def test_a_binary_the_driver_refuses_is_not_cached(fakes, tmp_path):
    out = run_route(fakes, tmp_path, streams=(0x100, 0x100), env={"FAKE_CUDA_LOAD_ERROR": "222"})
    assert all(c is not None and "Update the NVIDIA driver" in c[1] for c in out["calls"])
    assert out["fake_nvrtc_compiles"] == 2 and list((tmp_path / "cache").iterdir()) == []


def test_the_cache_key_follows_the_headers_contents_not_their_paths(fakes, tmp_path):
    first = run_route(fakes, tmp_path)
    assert first["fake_nvrtc_compiles"] == 1
    # the same headers in another folder: the same key, no compilation
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "inc", moved)
    again = run_route(fakes, tmp_path, include=[str(moved)])
    assert again["calls"] == [None] and again["fake_nvrtc_compiles"] == 0
    # a header that cooperative_groups.h includes changes: a new key
    (moved / "cooperative_groups.h").write_text('#include "cg_detail.h"\n')
    (moved / "cg_detail.h").write_text("// one version\n")
    changed = run_route(fakes, tmp_path, include=[str(moved)])
    assert changed["fake_nvrtc_compiles"] == 1
    (moved / "cg_detail.h").write_text("// another version\n")
    assert run_route(fakes, tmp_path, include=[str(moved)])["fake_nvrtc_compiles"] == 1
    # a file nothing includes does not enter the key
    (moved / "unrelated.h").write_text("// not included\n")
    assert run_route(fakes, tmp_path, include=[str(moved)])["fake_nvrtc_compiles"] == 0
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_the_cache_key(tmp_path):
    inc = Path(headers_dir(tmp_path)[0])
    kdir = str(_driver.kernel_dir())

    def key(include=inc, arch="-arch=sm_80", version=(12, 5), k=kdir):
        return _core.kernel_cache_key(_core.KERNEL_PROGRAM,
                                      _core.nvrtc_options(arch, k, [str(include)]), version)

    base = key()
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert key(version=(12, 6)) != base and key(arch="-arch=sm_90") != base
    # the kernel sources' contents count, their folder does not
    copy = tmp_path / "kernels"
    shutil.copytree(kdir, copy)
    assert key(k=str(copy)) == base
    (copy / "clip_math.h").write_text((copy / "clip_math.h").read_text() + "\n// edited\n")
    assert key(k=str(copy)) != base
    with pytest.raises(RuntimeError, match=r"clip_kernel\.cuh is missing.*reinstall clipops"):
        key(k=str(tmp_path / "nothing"))


@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 1000, 1 << 20])
def test_sha256_is_sha256(size):
    import hashlib

    data = os.urandom(size)
    assert _core.sha256_hex(data) == hashlib.sha256(data).hexdigest()


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


@needs_nvrtc12
def test_a_kernel_source_in_the_working_directory_is_not_compiled(fakes, tmp_path):
    # NVRTC resolves a quoted include of the program itself in the current
    # directory; the program includes <clip_kernel.cuh>, from -I folders only.
    site = cuda12_site()
    for name in ("clip_kernel.cuh", "optim_kernel.cuh"):
        (tmp_path / name).write_text("#error planted in the working directory\n")
    include = [str(site / "nvidia" / "cuda_runtime" / "include"),
               str(site / "nvidia" / "cuda_cccl" / "include")]
    out = run_route(fakes, tmp_path, nvrtc=str(site / "nvidia" / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"),
                    include=include, env={"FAKE_CUDA_CC": "80"})
    assert out["calls"] == [None], out["calls"]
    [cached] = (tmp_path / "cache").iterdir()
    assert b"clipops_clip_kernel" in cached.read_bytes()
    assert b"clipops_update_kernel" in cached.read_bytes()


# ---- the fused update through the same route (update_driver) ------------------------------

# Runs update_driver once per stream (after a clip launch on the first stream, if asked) over
# float32 "device" arrays of `sizes` (host memory: the fake copies for real), Adam with device
# scalars, and prints what the fakes saw as JSON.
UPDATE_RUNNER = textwrap.dedent("""
    import ctypes, json, sys
    import numpy as np
    from clipops import _core

    a = json.loads(sys.argv[1])
    _core.configure_driver(a["nvrtc"], a["cuda"], a["include"], a["kernel_dir"], a["cache"])
    rng = np.random.default_rng(0)
    n = len(a["sizes"])
    p = [rng.standard_normal(k).astype(np.float32) for k in a["sizes"]]
    g = [rng.standard_normal(k).astype(np.float16) for k in a["sizes"]]
    m = [np.zeros(k, np.float32) for k in a["sizes"]]
    v = [np.zeros(k, np.float32) if a["with_v"] else None for k in a["sizes"]]
    descs = [(p[i].ctypes.data, g[i].ctypes.data, 0, m[i].ctypes.data,
              0 if v[i] is None else v[i].ctypes.data, p[i].size, i % 2 == 0) for i in range(n)]
    need = _core.update_cuda_workspace_bytes(descs)
    raw = np.zeros(need + 16, np.uint8)
    off = (-raw.ctypes.data) % 16
    ws = raw.ctypes.data + off
    scalars = np.array([0.01, 0.9, 0.999], np.float32)  # lr, beta_1^t, beta_2^t on the "device"
    # the norm dtype's: float16 gradients (float32 for an empty list)
    ndt = np.float16 if n else np.float32
    clip_unscale = np.array([1.5, 0.25], ndt)
    norm = np.zeros(1, ndt)
    norms = np.zeros(max(n, 1), ndt)
    args = _core.UpdateArgs()
    args.rule = _core.UPDATE_RULES["adam"]
    args.clip_mode = _core.UPDATE_CLIPS["global_norm"]
    args.norm_dtype = 0 if n else 2
    args.clip_ptr = clip_unscale.ctypes.data
    args.unscale_ptr = clip_unscale.ctypes.data + clip_unscale.itemsize
    args.learning_rate_ptr = scalars.ctypes.data
    args.beta_1_power_ptr = scalars.ctypes.data + 4
    args.beta_2_power_ptr = scalars.ctypes.data + 8
    args.skip_nonfinite = True
    args.norm_out = norm.ctypes.data
    args.tensor_norms = norms.ctypes.data
    args.weight_decay, args.one_minus_beta_1, args.one_minus_beta_2, args.epsilon = 0.004, 0.1, 0.001, 1e-7
    args.check_overlap = True
    calls = []
    if a["clip_first"]:
        x = np.ones(10, np.float32)
        cdescs = [(x.ctypes.data, x.ctypes.data, x.size, 2)]
        cneed = _core.cuda_workspace_bytes(cdescs)
        craw = np.zeros(cneed + 16, np.uint8)
        cnorm = np.zeros(1, np.float32)
        _core.clip_driver(cdescs, 2, True, 1.5, 0, None, 0, cnorm.ctypes.data,
                          craw.ctypes.data + (-craw.ctypes.data) % 16, cneed, a["streams"][0])
    for stream in a["streams"]:
        try:
            _core.update_driver(descs, args, ws, need, stream)
            calls.append(None)
        except Exception as e:
            calls.append([type(e).__name__, str(e)])
    states_at = (40 * n + 15) // 16 * 16
    out = {"calls": calls, "ws": ws, "need": need, "descs": descs, "n": n,
           "scalars": scalars.ctypes.data, "clip_unscale": clip_unscale.ctypes.data,
           "norm": norm.ctypes.data, "norms": norms.ctypes.data,
           "grads_table": raw[off:off + 40 * n].tobytes().hex(),
           "states_table": raw[off + states_at:off + states_at + 32 * n].tobytes().hex(),
           "written": bool(any(p_.any() for p_ in m))}
    f = ctypes.CDLL(a["cuda"])
    for name in ("fake_module_loads", "fake_copies", "fake_launches", "fake_update_launches",
                 "fake_ctx_depth", "fake_max_depth"):
        out[name] = ctypes.c_int.in_dll(f, name).value
    out["fake_grid"] = list((ctypes.c_uint * 3).in_dll(f, "fake_grid"))
    out["fake_block"] = list((ctypes.c_uint * 3).in_dll(f, "fake_block"))
    out["fake_launch_stream"] = ctypes.c_size_t.in_dll(f, "fake_launch_stream").value
    out["fake_launch_function"] = ctypes.c_size_t.in_dll(f, "fake_launch_function").value
    out["fake_update_params"] = bytes((ctypes.c_ubyte * 40).in_dll(f, "fake_update_params")).hex()
    out["fake_update_struct"] = bytes((ctypes.c_ubyte * 176).in_dll(f, "fake_update_struct")).hex()
    nv = ctypes.CDLL(a["nvrtc"])
    out["fake_nvrtc_compiles"] = ctypes.c_int.in_dll(nv, "fake_nvrtc_compiles").value
    print(json.dumps(out))
""")

STATE_ENTRY = struct.Struct("<QQQii")  # optim_math.h's StateEntry: 32 bytes
assert STATE_ENTRY.size == 32


def run_update_route(fakes, tmp_path, *, env=None, sizes=(5, CHUNK + 1, 0, 3 * CHUNK),
                     streams=(0x100,), with_v=True, clip_first=False) -> dict:
    args = {"nvrtc": fakes["libnvrtc"], "cuda": fakes["libcuda"], "include": headers_dir(tmp_path),
            "kernel_dir": str(_driver.kernel_dir()), "cache": str(tmp_path / "cache"),
            "sizes": list(sizes), "streams": list(streams), "with_v": with_v,
            "clip_first": clip_first}
    proc = subprocess.run([sys.executable, "-c", UPDATE_RUNNER, json.dumps(args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, f"the process crashed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_update_driver_is_one_cooperative_launch_with_the_tables_the_kernel_expects(fakes,
                                                                                      tmp_path):
    import numpy as np

    from clipops import _optim

    # 4 SMs: the clip kernel fits 2 blocks per SM, the update kernel 1 (its own occupancy);
    # items 1 + 2 + 0 + 3 = 6, so 4 blocks, not 6
    out = run_update_route(fakes, tmp_path, env={"FAKE_CUDA_SMS": "4",
                                                 "FAKE_CUDA_BLOCKS_PER_SM": "2",
                                                 "FAKE_CUDA_UPDATE_BLOCKS_PER_SM": "1"})
    assert out["calls"] == [None]
    assert out["fake_launches"] == 1 and out["fake_update_launches"] == 1
    assert out["fake_copies"] == 1  # both tables in one copy
    assert out["fake_launch_function"] == 0x5000 + 0x2000  # the module's update kernel
    assert out["fake_grid"] == [4, 1, 1] and out["fake_block"] == [_core.THREADS, 1, 1]
    assert out["fake_launch_stream"] == 0x100
    assert out["fake_ctx_depth"] == 0 and out["fake_max_depth"] == 1
    assert not out["written"]  # nothing ran: the host never touched the state

    # the gradients' table (norm only: no output) and the states' table after it, aligned
    n, ws = out["n"], out["ws"]
    grads = bytes.fromhex(out["grads_table"])
    states = bytes.fromhex(out["states_table"])
    first = 0
    for i, (param, grad, dtype, m, v, numel, decay) in enumerate(out["descs"]):
        assert ENTRY.unpack_from(grads, 40 * i) == (grad, 0, numel, first, dtype, 0)
        assert STATE_ENTRY.unpack_from(states, 32 * i) == (param, m, v, int(decay), 0)
        first += -(-numel // CHUNK)

    # the kernel's parameters, in clipops_update_kernel's order
    p = bytes.fromhex(out["fake_update_params"])
    states_at = (40 * n + 15) // 16 * 16
    partials_at = states_at + (32 * n + 15) // 16 * 16
    assert struct.unpack_from("<Q", p, 0)[0] == ws                   # grads table
    assert struct.unpack_from("<Q", p, 8)[0] == ws + states_at       # states table
    assert struct.unpack_from("<i", p, 16)[0] == n                   # num_tensors
    assert struct.unpack_from("<q", p, 24)[0] == 6                   # num_items
    assert struct.unpack_from("<Q", p, 32)[0] == ws + partials_at    # partials
    assert partials_at + 8 * (6 + n) <= out["need"]
    # UpdateParams by value: every scalar a device pointer (no host sync), Adam's attrs
    u = np.frombuffer(bytes.fromhex(out["fake_update_struct"]), _optim.UPDATE_PARAMS)[0]
    assert u["clip_ptr"] == out["clip_unscale"] and u["unscale_ptr"] == out["clip_unscale"] + 2
    assert u["lr_ptr"] == out["scalars"]
    assert u["beta_1_power_ptr"] == out["scalars"] + 4
    assert u["beta_2_power_ptr"] == out["scalars"] + 8
    assert u["iterations_ptr"] == 0
    assert u["norm_out"] == out["norm"] and u["tensor_norms"] == out["norms"]
    assert (u["rule"], u["clip_mode"], u["norm_dtype"], u["skip_nonfinite"]) == \
        (_core.UPDATE_RULES["adam"], _core.UPDATE_CLIPS["global_norm"], 0, 1)
    assert (u["power_source"], u["increment_iterations"], u["has_momentum"]) == (0, 0, 0)
    assert (u["weight_decay"], u["one_minus_beta_1"], u["one_minus_beta_2"], u["epsilon"]) == \
        tuple(np.float32(x) for x in (0.004, 0.1, 0.001, 1e-7))


def test_update_driver_shares_the_clip_s_module(fakes, tmp_path):
    # one program holds both kernels: a context compiles and loads once for the two
    out = run_update_route(fakes, tmp_path, streams=(0x100, 0x100, 0x200), clip_first=True)
    assert out["calls"] == [None] * 3
    assert out["fake_launches"] == 4 and out["fake_update_launches"] == 3
    assert out["fake_module_loads"] == 2  # contexts 0x100 and 0x200, once each
    assert out["fake_nvrtc_compiles"] == 1  # the second context reads the disk cache
    assert out["fake_launch_function"] == 0x5000 + 0x2000


def test_update_driver_refuses_bad_input_before_the_gpu(fakes, tmp_path):
    # Adam without velocities: the core's check, nothing loaded or launched
    out = run_update_route(fakes, tmp_path, with_v=False)
    [call] = out["calls"]
    assert call[0] == "ValueError" and "tensor 0: v (Adam's second moment) is missing" in call[1]
    assert out["fake_launches"] == 0 and out["fake_module_loads"] == 0


def test_update_driver_reports_a_failed_launch(fakes, tmp_path):
    out = run_update_route(fakes, tmp_path, env={"FAKE_CUDA_LAUNCH_ERROR": "719"})
    [call] = out["calls"]
    assert call == ["RuntimeError", "launching the update kernel: fake error 719 (CUDA error 719)"]
    assert out["fake_ctx_depth"] == 0  # the context was popped on the way out


def test_update_driver_of_an_empty_list_launches_one_block_that_writes_the_norm(fakes, tmp_path):
    out = run_update_route(fakes, tmp_path, sizes=())
    assert out["calls"] == [None] and out["fake_update_launches"] == 1
    assert out["fake_grid"] == [1, 1, 1] and out["fake_copies"] == 0


# ---- the TF op brings no CUDA of its own -----------------------------------------------

def elf_sections_and_needed(path: Path, tags=(1,)) -> tuple[set[str], list[str]]:
    """Section names and DT_NEEDED entries (or the string entries of other
    dynamic `tags`: 15 DT_RPATH, 29 DT_RUNPATH) of a 64-bit little-endian ELF."""
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
                if tag in tags:
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

def run_config(cwd: Path, env: dict, script: str | None = None) -> list:
    """_driver.config()'s NVRTC, include folders and cache folder, from a fresh
    process in `cwd` (with `script`: run as that file, else with -c)."""
    code = ("import json; from clipops import _driver; c = _driver.config(); "
            "print(json.dumps([c.nvrtc_library, c.include_dirs, _driver.cache_dir()]))")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CLIPOPS_NVRTC", "CLIPOPS_CUDA_INCLUDE", "CLIPOPS_CACHE_DIR", "CUDA_HOME",
                          "CUDA_PATH")}
    if script is not None:
        Path(script).write_text(code)
    argv = [sys.executable, script] if script is not None else [sys.executable, "-c", code]
    return json.loads(subprocess.run(argv, env={**clean, **env}, cwd=cwd, capture_output=True,
                                     text=True, check=True).stdout)


@needs_nvrtc12
def test_config_finds_tensorflow_s_cuda12_wheels(tmp_path):
    # The wheels as pip installs them into a package folder of the interpreter:
    # here the user site, made a link to the folder they were installed in.
    site_dir = cuda12_site()
    user_base = tmp_path / "userbase"
    user_site = subprocess.run(
        [sys.executable, "-c", "import site; print(site.getusersitepackages())"], check=True,
        env={**os.environ, "PYTHONUSERBASE": str(user_base)}, capture_output=True,
        text=True).stdout.strip()
    Path(user_site).parent.mkdir(parents=True)
    Path(user_site).symlink_to(site_dir)
    nvrtc, include, cache = run_config(tmp_path, {"PYTHONUSERBASE": str(user_base),
                                                  "XDG_CACHE_HOME": str(tmp_path)})
    assert Path(nvrtc).resolve() == (site_dir / "nvidia" / "cuda_nvrtc" / "lib" /
                                     "libnvrtc.so.12").resolve()
    assert [Path(d).resolve() for d in include[:2]] == [
        (site_dir / "nvidia" / "cuda_runtime" / "include").resolve(),
        (site_dir / "nvidia" / "cuda_cccl" / "include").resolve()]
    assert cache == str(tmp_path / "clipops")


def plant_wheels(root: Path) -> None:
    """What the CUDA 12 wheels install, as a stranger's files: libraries,
    headers and the distributions' metadata."""
    files = {"nvidia-cuda-nvrtc-cu12": "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
             "nvidia-cuda-runtime-cu12": "nvidia/cuda_runtime/include/cooperative_groups.h",
             "nvidia-cuda-cccl-cu12": "nvidia/cuda_cccl/include/nv/target"}
    for dist, rel in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("planted\n")
        info = root / f"{dist.replace('-', '_')}-12.9.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 12.9.0\n")
        (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n")


def test_wheels_in_the_working_directory_or_the_script_s_folder_are_not_used(tmp_path):
    # sys.path[0] is the current directory (python -c) or the script's folder:
    # a libnvrtc or header found there would become code in the CUDA context
    cwd, scripts = tmp_path / "cwd", tmp_path / "scripts"
    for d in (cwd, scripts):
        d.mkdir()
        plant_wheels(d)
    env = {"PYTHONNOUSERSITE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    for found in (run_config(cwd, env), run_config(cwd, env, script=str(scripts / "run.py"))):
        nvrtc, include, _ = found
        assert not nvrtc.startswith(str(tmp_path)), nvrtc
        assert not [d for d in include if d.startswith(str(tmp_path))], include


def test_wheels_are_found_as_installed_distributions(tmp_path, monkeypatch):
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    plant_wheels(site_dir)
    monkeypatch.delenv("CLIPOPS_NVRTC", raising=False)
    monkeypatch.delenv("CLIPOPS_CUDA_INCLUDE", raising=False)
    monkeypatch.setattr(_driver, "site_dirs", lambda: [str(site_dir)])
    assert _driver.nvrtc_library() == str(site_dir / "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
    assert _driver.include_dirs()[:2] == (str(site_dir / "nvidia/cuda_runtime/include"),
                                          str(site_dir / "nvidia/cuda_cccl/include"))
    # the files alone, without the distribution that installed them, are not used
    for info in site_dir.glob("*.dist-info"):
        shutil.rmtree(info)
    assert _driver.nvrtc_library() == "libnvrtc.so.12"
    assert not [d for d in _driver.include_dirs() if d.startswith(str(site_dir))]


def test_site_dirs_are_the_interpreter_s_package_folders():
    import site
    import sysconfig

    dirs = _driver.site_dirs()
    assert dirs and all(os.path.isabs(d) for d in dirs)
    assert os.getcwd() not in dirs and "" not in dirs
    expected = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"]}
    assert {d for d in expected if os.path.isdir(d)} <= set(dirs)


def test_the_tf_op_does_not_load_the_cuda13_core(tmp_path):
    # the op resolves its cache folder with its own copy of the core: importing
    # clipops.tensorflow loads no libclipops_core.so (CUDA 13 code) into TF's process
    if not clipops.build_info()["with_tf"]:
        pytest.skip("this build has no TensorFlow op")
    code = ("import clipops.tensorflow, sys; maps = open('/proc/self/maps').read(); "
            "print('_clipops_tf.so' in maps, 'libclipops_core.so' in maps, "
            "'clipops._core' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False"]


def test_no_library_that_opens_libcuda_searches_beside_itself():
    # dlopen("libcuda.so.1") from a library with RUNPATH $ORIGIN would look in
    # the package folder first; the driver route lives in libclipops_core.so
    # (the NumPy/CuPy core) and _clipops_tf.so (the TF op's own copy).
    pkg = Path(clipops.__file__).parent
    libs = [pkg / "libclipops_core.so"]
    if clipops.build_info()["with_tf"]:
        libs.append(pkg / "_clipops_tf.so")
    for lib in libs:
        _, paths = elf_sections_and_needed(lib, tags=(15, 29))
        assert paths == [], (lib.name, paths)
    # the check can fail: _core finds libclipops_core.so beside itself
    [core] = pkg.glob("_core*.so")
    assert elf_sections_and_needed(core, tags=(15, 29))[1] == ["$ORIGIN"]


PLANTED_LIBCUDA = textwrap.dedent("""
    import json, sys
    import numpy as np
    from clipops import _core

    _core.configure_driver("libnvrtc.so.12", sys.argv[1], [], "", "")
    x = np.ones(4, np.float32)
    descs = [(x.ctypes.data, x.ctypes.data, 4, 2)]
    need = _core.cuda_workspace_bytes(descs)
    ws = np.zeros(need + 16, np.uint8)
    try:
        _core.clip_driver(descs, 2, True, 1.0, 0, None, 0, 0,
                          ws.ctypes.data + (-ws.ctypes.data) % 16, need, 0x100)
        error = None
    except RuntimeError as e:
        error = str(e)
    maps = open("/proc/self/maps").read()
    print(json.dumps({"error": error, "loaded": [p for p in sys.argv[2:] if p in maps]}))
""")


def test_a_libcuda_beside_the_package_or_in_the_working_directory_is_not_loaded(fakes, tmp_path):
    # A copy of the installed package, with a libcuda.so.1 planted beside its
    # libraries and in the working directory: the route asks for the bare name
    # and must get the system's driver (on a machine without one: an error).
    pkg = Path(clipops.__file__).parent
    copy = tmp_path / "site" / "clipops"
    copy.mkdir(parents=True)
    for f in [*pkg.glob("*.py"), *pkg.glob("_core*.so"), pkg / "libclipops_core.so"]:
        shutil.copy2(f, copy / f.name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    planted = [copy / "libcuda.so.1", cwd / "libcuda.so.1"]
    for p in planted:
        build_fake(fakes["cc"], "libcuda", p, ["-DFAKE_MARKER=666"])
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PYTHONPATH"] = str(copy.parent)

    def run(extra_env: dict, name: str = "libcuda.so.1") -> dict:
        proc = subprocess.run([sys.executable, "-c", PLANTED_LIBCUDA, name, *map(str, planted)],
                              env={**env, **extra_env}, cwd=cwd, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def loaded(extra_env: dict, name: str = "libcuda.so.1") -> list[str]:
        return run(extra_env, name)["loaded"]

    assert loaded({}) == []
    # the check can fail: a folder the user names in LD_LIBRARY_PATH is searched
    assert loaded({"LD_LIBRARY_PATH": str(copy)}) == [str(planted[0])]
    # an empty or relative LD_LIBRARY_PATH entry is the current directory to the loader
    # (a trailing ':' makes one): nothing is loaded through it, and the error says why
    for unsafe in ("/nonexistent:", ":/nonexistent", "/nonexistent::/usr/lib", "relative/dir"):
        out = run({"LD_LIBRARY_PATH": unsafe})
        assert out["loaded"] == [], unsafe
        assert "LD_LIBRARY_PATH" in out["error"], out["error"]
    # an empty value is no search path at all (glibc), not the current directory
    assert run({"LD_LIBRARY_PATH": ""})["loaded"] == []
    assert "LD_LIBRARY_PATH" not in (run({"LD_LIBRARY_PATH": ""})["error"] or "")
    # an override relative to the current directory is refused, not resolved there
    out = run({}, "./libcuda.so.1")
    assert out["loaded"] == [] and "absolute path" in out["error"], out["error"]


def test_config_follows_the_environment(tmp_path, monkeypatch):
    inc = headers_dir(tmp_path)[0]
    monkeypatch.setenv("CLIPOPS_NVRTC", "/opt/x/libnvrtc.so.12")
    monkeypatch.setenv("CLIPOPS_CUDA_INCLUDE", inc)
    monkeypatch.setenv("CLIPOPS_CACHE_DIR", str(tmp_path / "c"))
    c = _driver.config()
    assert c.nvrtc_library == "/opt/x/libnvrtc.so.12"
    assert c.include_dirs == (inc,)  # both headers in one folder: listed once
    assert _driver.cache_dir() == str(tmp_path / "c")
    assert Path(c.kernel_dir, "clip_kernel.cuh").is_file()
    monkeypatch.delenv("CLIPOPS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert _driver.cache_dir() == str(tmp_path / "x" / "clipops")
    # a relative include folder is wherever the current directory is: skipped, with a warning
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(inc, tmp_path)
    assert not os.path.isabs(rel) and Path(rel, "cooperative_groups.h").is_file()
    monkeypatch.setenv("CLIPOPS_CUDA_INCLUDE", rel)
    with pytest.warns(RuntimeWarning, match="relative CUDA include folders"):
        assert rel not in _driver.config().include_dirs
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _driver.cache_dir() == str(tmp_path / "home" / ".cache" / "clipops")


# ---- on a GPU ---------------------------------------------------------------------------

def _driver_route_on_a_gpu(cache_dir):
    """CuPy, with the driver route configured to run on this machine's GPU
    (whichever NVRTC it has; the cache in cache_dir); skips without a GPU."""
    cupy = pytest.importorskip("cupy", reason="needs CuPy to hold the GPU arrays")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no device")
    except Exception:
        pytest.skip("needs a CUDA GPU")
    candidates = [os.environ.get("CLIPOPS_NVRTC"), _driver.nvrtc_library(), "libnvrtc.so.13",
                  "/usr/local/cuda/lib64/libnvrtc.so"]
    nvrtc = next((c for c in filter(None, candidates) if _loads(c)), None)
    if nvrtc is None:
        pytest.fail(f"no NVRTC could be loaded from {candidates}")
    _core.configure_driver(nvrtc, "libcuda.so.1", list(_driver.include_dirs()),
                           str(_driver.kernel_dir()), str(cache_dir))
    return cupy


def _loads(path: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(path)
        return True
    except OSError:
        return False


@pytest.mark.gpu
def test_the_driver_route_on_a_gpu_gives_the_cpu_kernel_s_bits(tmp_path):
    """The TF op's GPU route without TF (the device machines have none): the
    same launcher, here with whichever NVRTC the machine has."""
    import numpy as np

    cupy = _driver_route_on_a_gpu(tmp_path)
    from clipops import numpy as cnp

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


@pytest.mark.gpu
def test_update_driver_on_a_gpu_gives_the_cpu_kernel_s_bits(tmp_path):
    """The TF op's GPU route of the fused update (update_driver) without TF: AdamW with a
    global clip, every scalar a device pointer, against update_cpu on the same inputs."""
    import numpy as np

    cupy = _driver_route_on_a_gpu(tmp_path)
    rng = np.random.default_rng(11)
    sizes = (3, CHUNK + 1, 700, 5 * CHUNK - 1)
    host = {k: [rng.standard_normal(n).astype(np.float32) * s for n in sizes]
            for k, s in (("p", 1.0), ("m", 0.1), ("v", 0.01))}
    host["v"] = [np.abs(x) for x in host["v"]]
    host["g"] = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = {k: [cupy.asarray(x) for x in xs] for k, xs in host.items()}

    def addr(x):
        return x.data.ptr if isinstance(x, cupy.ndarray) else x.ctypes.data

    def descs(d):
        return [(addr(d["p"][i]), addr(d["g"][i]), FLOAT32, addr(d["m"][i]), addr(d["v"][i]),
                 sizes[i], i % 2 == 0) for i in range(len(sizes))]

    def args():
        a = _core.UpdateArgs()
        a.rule, a.clip_mode, a.norm_dtype = (_core.UPDATE_RULES["adam"],
                                             _core.UPDATE_CLIPS["global_norm"], FLOAT32)
        a.weight_decay, a.one_minus_beta_1, a.one_minus_beta_2, a.epsilon = 0.01, 0.1, 1e-3, 1e-7
        return a

    scalars = np.array([1e-3, 0.9 ** 3, 0.999 ** 3, 2.0, 1.0], np.float32)  # lr, powers, clip, 1
    cpu = args()
    cpu.learning_rate, cpu.beta_1_power, cpu.beta_2_power, cpu.clip = (float(x)
                                                                     for x in scalars[:4])
    norm_cpu = np.zeros((), np.float32)
    cpu.norm_out = norm_cpu.ctypes.data
    _core.update_cpu(descs(host), cpu)
    gpu = args()
    d_scalars = cupy.asarray(scalars)
    base = d_scalars.data.ptr
    gpu.learning_rate_ptr, gpu.beta_1_power_ptr, gpu.beta_2_power_ptr = base, base + 4, base + 8
    gpu.clip_ptr, gpu.unscale_ptr = base + 12, base + 16
    norm_gpu = cupy.zeros((), cupy.float32)
    gpu.norm_out = norm_gpu.data.ptr
    d = descs(dev)
    need = _core.update_cuda_workspace_bytes(d)
    ws = cupy.empty(need, cupy.uint8)
    stream = cupy.cuda.get_current_stream()
    _core.update_driver(d, gpu, ws.data.ptr, need, stream.ptr)
    stream.synchronize()
    assert norm_gpu.get().tobytes() == norm_cpu.tobytes()
    for k in ("p", "m", "v"):
        for i in range(len(sizes)):
            assert dev[k][i].get().tobytes() == host[k][i].tobytes(), (k, i)
