"""Tests of the CuPy front end (clipops.cupy) and its NVRTC route (clipops._nvrtc).

Two kinds:
  - error paths and host-side layout, which run without a GPU (CuPy imports
    without a driver; NVRTC compiles without a device);
  - GPU tests, marked `gpu` and skipped with the reason where there is no
    usable GPU: results against a float64 reference, bit-for-bit equality with
    the CPU core (clipops.numpy) and between the nvcc and NVRTC routes,
    determinism, streams, interoperability, a tensor of more than 2^31 elements.

On a GPU machine, after `pip install --no-deps --no-build-isolation .`, from
the repository root (`pytest`, not `python -m pytest`, as README says):
    pytest -m gpu tests/test_cupy.py            # add -m "gpu and not slow" to skip >2^31
"""

from __future__ import annotations

import ctypes
import inspect
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import clipops
import pytest

# JAX grabs 75% of GPU memory at its first use unless told otherwise; the
# >2^31-element test needs that memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from conftest import BF16, BOUNDARY_SIZES, CHUNK, assert_close, model_scale, ref_norm
from cupy_helpers import (HAVE_GPU, cupy, gpu, needs_cupy, nvrtc_skip_reason,
                          record_table_copies, spin)

if cupy is not None:
    import clipops.cupy as ccp
    from clipops import _nvrtc
    import clipops.numpy as cnp
    from clipops import _common
else:
    ccp = _nvrtc = cnp = _common = None


def _core():
    return _common.load_core()


# =============================================================================
# CPU-runnable: imports, argument errors, environment errors
# =============================================================================

def test_import_without_cupy_says_how_to_install(tmp_path):
    code = ("import sys\nsys.modules['cupy'] = None  # as if not installed\n"
            "try:\n    import clipops.cupy\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert "IMPORTERROR" in out.stdout, out.stdout + out.stderr
    assert "pip install cupy-cuda13x" in out.stdout


@needs_cupy
@pytest.mark.parametrize("bad", [1.0, "grads", b"grads", None, {"a": 1}])
def test_not_a_sequence_is_type_error(bad):
    """Checked before any device call, so it runs without a GPU; the error
    names this front end's parameter, `arrays`."""
    for call in (lambda: ccp.global_norm(bad), lambda: ccp.clip_by_global_norm(bad, 1.0)):
        with pytest.raises(TypeError, match="^`arrays` should be a sequence of tensors"):
            call()


@needs_cupy
@pytest.mark.parametrize("empty", [[], (), [None], [None, None]])
def test_empty_list_checks_its_scalars_before_any_device_call(empty, monkeypatch):
    """A list with no tensors still needs a scalar clip_norm (and use_norm),
    and says so before touching the device: the same error with or without a GPU."""
    def device_call():
        raise AssertionError("the device was queried before the scalars were checked")

    monkeypatch.setattr(ccp, "_current_device", device_call)
    with pytest.raises(ValueError, match="clip_norm must be a scalar"):
        ccp.clip_by_global_norm(empty, np.ones(2))
    with pytest.raises(TypeError, match="clip_norm must be a number"):
        ccp.clip_by_global_norm(empty, None)
    with pytest.raises(ValueError, match="use_norm must be a scalar"):
        ccp.clip_by_global_norm(empty, 1.0, use_norm=np.zeros((1, 1)))


@needs_cupy
@pytest.mark.skipif(HAVE_GPU, reason="a GPU is usable here; the no-GPU error cannot occur")
@pytest.mark.parametrize("arrays", [[np.ones(3, np.float32)], [], [None]])
def test_no_gpu_gives_clear_error(arrays):
    """CuPy installed but no driver/device: our error, naming the reason; also
    for a list with no tensors, whose 0-d norm still lives on a device."""
    for call in (lambda: ccp.clip_by_global_norm(arrays, 1.0), lambda: ccp.global_norm(arrays)):
        with pytest.raises(ccp.CudaUnavailableError, match="needs an NVIDIA GPU") as info:
            call()
        assert isinstance(info.value, RuntimeError)
        assert "CUDA runtime reports" in str(info.value)
        assert isinstance(info.value.__cause__, cupy.cuda.runtime.CUDARuntimeError)


@needs_cupy
def test_runtime_error_becomes_clear_error(monkeypatch):
    def fail():
        raise cupy.cuda.runtime.CUDARuntimeError(100)  # cudaErrorNoDevice

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", fail)
    with pytest.raises(ccp.CudaUnavailableError, match="cudaErrorNoDevice"):
        ccp.global_norm([object()])


@needs_cupy
def test_zero_devices_is_clear_error(monkeypatch):
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    with pytest.raises(ccp.CudaUnavailableError, match="no device"):
        ccp.global_norm([object()])


# ---- input validation, with stand-ins for device arrays ----------------------

class FakeDeviceArray:
    """What clipops.cupy reads from a CuPy array, without a GPU."""

    def __init__(self, n=4, dtype="float32", ptr=1 << 20, device=0, contiguous=True):
        self.dtype = np.dtype(dtype)
        self.shape = (n,)
        self.size = n
        self.nbytes = n * self.dtype.itemsize
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.data = SimpleNamespace(ptr=ptr, device_id=device)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Device 0 is current and FakeDeviceArray passes as a converted array:
    everything up to the allocation runs on the CPU."""
    monkeypatch.setattr(ccp, "_current_device", lambda: 0)
    real = ccp._as_device_array
    monkeypatch.setattr(ccp, "_as_device_array",
                        lambda x, what: x if isinstance(x, FakeDeviceArray) else real(x, what))


@needs_cupy
@pytest.mark.parametrize("dtype", ["int32", "complex64", "uint16", "bool"])
def test_bad_dtype_names_the_index(fake_gpu, dtype):
    arrays = [FakeDeviceArray(), None, FakeDeviceArray(dtype=dtype, ptr=1 << 30)]
    for call in (lambda: ccp.clip_by_global_norm(arrays, 1.0), lambda: ccp.global_norm(arrays)):
        with pytest.raises(TypeError, match=rf"^arrays\[2\] has dtype {dtype}; clipops clips"):
            call()


@needs_cupy
def test_host_arrays_are_refused_not_copied(fake_gpu):
    with pytest.raises(TypeError, match=r"arrays\[1\] is a host array.*clipops\.numpy"):
        ccp.global_norm([FakeDeviceArray(), np.ones(3, np.float32)])
    with pytest.raises(TypeError, match=r"arrays\[0\] is a list"):
        ccp.global_norm([[1.0, 2.0]])


@needs_cupy
def test_torch_cpu_tensor_is_a_host_array(fake_gpu):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"arrays\[0\] is a host array"):
        ccp.global_norm([torch.ones(3)])


@needs_cupy
def test_array_on_another_device(fake_gpu):
    arrays = [FakeDeviceArray(), FakeDeviceArray(device=1, ptr=1 << 30)]
    for call in (lambda: ccp.global_norm(arrays), lambda: ccp.clip_by_global_norm(arrays, 1.0)):
        with pytest.raises(ccp.UnsupportedArrayError, match=r"arrays\[1\] is on GPU 1.*GPU 0") as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


@needs_cupy
def test_in_place_needs_contiguous(fake_gpu):
    arrays = [FakeDeviceArray(contiguous=False)]
    with pytest.raises(ccp.UnsupportedArrayError, match=r"arrays\[0\] is not C-contiguous"):
        ccp.clip_by_global_norm(arrays, 1.0, in_place=True)


@needs_cupy
@pytest.mark.parametrize("layout, clash", [
    ([(0, 16), (8, 16)], (0, 1)),              # partial overlap
    ([(0, 16), (0, 16)], (0, 1)),              # the same buffer twice
    ([(0, 64), (100, 4), (8, 4)], (0, 2)),     # nested, listed out of order
    ([(0, 64), (8, 4), (32, 4)], None),        # reported: some overlapping pair
])
def test_in_place_refuses_shared_memory(fake_gpu, layout, clash):
    base = 1 << 20
    arrays = [FakeDeviceArray(n=n, ptr=base + 4 * start) for start, n in layout]
    with pytest.raises(ValueError, match="share memory") as info:
        ccp.clip_by_global_norm(arrays, 1.0, in_place=True)
    if clash is not None:
        assert f"arrays[{clash[0]}] and arrays[{clash[1]}]" in str(info.value)


@needs_cupy
def test_in_place_adjacent_and_empty_arrays_do_not_clash(fake_gpu):
    base = 1 << 20
    arrays = [FakeDeviceArray(n=4, ptr=base), FakeDeviceArray(n=4, ptr=base + 16),
              FakeDeviceArray(n=0, ptr=base), FakeDeviceArray(n=0, ptr=base)]
    prep = ccp._prepare(arrays, in_place=True)  # raises on a clash
    assert prep.positions == [0, 1, 2, 3]


@needs_cupy
@pytest.mark.parametrize("clip, err, msg", [
    (np.ones(2), ValueError, "clip_norm must be a scalar"),
    (None, TypeError, "clip_norm must be a number"),
    ("1.0", TypeError, "clip_norm must be a number"),
])
def test_bad_clip_norm(fake_gpu, clip, err, msg):
    with pytest.raises(err, match=msg):
        ccp.clip_by_global_norm([FakeDeviceArray()], clip)


@needs_cupy
def test_bad_use_norm(fake_gpu):
    with pytest.raises(ValueError, match="use_norm must be a scalar"):
        ccp.clip_by_global_norm([FakeDeviceArray()], 1.0, use_norm=np.zeros((1, 1)))


_needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed (bfloat16)")


@needs_cupy
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 70000 -> float16 inf
@pytest.mark.parametrize("code, value, want", [
    # Exact values of the nearest float16 / bfloat16 / float32 / float64 (ties to even),
    # written out rather than recomputed, so that a rounding bug cannot cancel out.
    (0, 0.1, 0.0999755859375),                          # float16 0x1.998p-4
    pytest.param(1, 0.1, 0.10009765625, marks=_needs_bf16),  # bfloat16 0x1.9ap-4
    (2, 0.1, 0.100000001490116119384765625),            # float32 0x1.99999ap-4
    (3, 0.1, 0.1),                                      # float64: unchanged
    (0, 70000.0, math.inf),                             # past float16's largest, 65504
    pytest.param(1, 70000.0, 70144.0, marks=_needs_bf16),  # bfloat16's step there is 512
    (2, 70000.0, 70000.0),
    (0, 2049, 2048.0),                                  # an int, half-way: to even
    (2, 2**24 + 1, 2.0**24),                            # half-way in float32: to even
    (3, 2**24 + 1, 2.0**24 + 1),
    (3, np.float32(0.1), 0.100000001490116119384765625),  # a NumPy scalar keeps its value
    (0, np.asarray(0.1), 0.0999755859375),              # a 0-d host array
])
def test_host_scalars_are_rounded_to_the_norm_dtype(code, value, want):
    """A host clip_norm reaches the launcher as a double holding the norm
    dtype's nearest value, as TF converts it (no device involved)."""
    prep = SimpleNamespace(norm_code=code, device=0)
    s = ccp._scalar(value, prep, "clip_norm", copy=False)
    assert s.ptr == 0 and s.array is None
    assert type(s.value) is float and s.value == want


@needs_cupy
def test_route_selection(monkeypatch):
    compiled = SimpleNamespace(cuda_compiled=lambda: True)
    without = SimpleNamespace(cuda_compiled=lambda: False)
    monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    assert not ccp._use_nvrtc(compiled)
    assert ccp._use_nvrtc(without)
    monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    assert ccp._use_nvrtc(compiled)


# ---- what reaches the launcher, recorded on the CPU ----------------------------

@pytest.fixture
def recorded(fake_gpu, monkeypatch):
    """Runs the front end down to the launcher without a GPU: allocations
    return stand-ins at known addresses, and both routes record their arguments."""
    calls, next_ptr = [], iter(range(1 << 32, 1 << 40, 1 << 24))

    def fake_empty(shape, dtype=np.float64):
        n = int(np.prod(shape))
        return FakeDeviceArray(n=n, dtype=dtype, ptr=next(next_ptr))

    monkeypatch.setattr(cupy, "empty", fake_empty)
    monkeypatch.setattr(ccp, "_empty_like_all",
                        lambda values: [fake_empty(a.size, a.dtype) for a in values])
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: SimpleNamespace(ptr=0xABC))
    # Both launchers share one signature; the front end passes every argument
    # positionally (keywords cost pybind11 3.1 memory: clipops/numpy.py, top).
    # Recorded: the first 11 as a tuple, the rest by name, defaults filled in.
    signature = inspect.signature(_nvrtc.clip_cuda)

    def recorder(who):
        def launch(*a, **k):
            assert not k, f"keywords reached the {who} launcher: {sorted(k)}"
            bound = signature.bind(*a)
            bound.apply_defaults()
            named = list(bound.arguments.items())
            calls.append((who, tuple(v for _, v in named[:11]), dict(named[11:])))
        return launch

    monkeypatch.setattr(_core(), "clip_cuda", recorder("core"))
    monkeypatch.setattr(_nvrtc, "clip_cuda", recorder("nvrtc"))
    return calls


@needs_cupy
def test_launch_arguments_of_the_per_tensor_clips(recorded):
    a = FakeDeviceArray(n=5, dtype="float32", ptr=1 << 20)
    b = FakeDeviceArray(n=7, dtype="float32", ptr=1 << 30)
    out = ccp.clip_by_norm([a, None, b], 0.1)
    out_v = ccp.clip_by_value([a, b], -0.5, 0.25)
    (who, args, kwargs), (who_v, args_v, kwargs_v) = recorded
    assert out[1] is None and len(out_v) == 2
    assert args[3] == float(np.float32(0.1)) and args[7] == 0  # clip_norm; no norm output
    assert kwargs["mode"] == _core().MODES["norm"] and kwargs["tensor_norms"] == 0
    assert (kwargs["clip_min"], kwargs["clip_max"], kwargs["clip_min_ptr"]) == (0.0, 0.0, 0)
    assert kwargs_v["mode"] == _core().MODES["value"]
    assert (kwargs_v["clip_min"], kwargs_v["clip_max"]) == (-0.5, 0.25)
    assert kwargs_v["clip_min_ptr"] == kwargs_v["clip_max_ptr"] == 0
    assert args_v[0] == [(a.data.ptr, out_v[0].data.ptr, 5, 2), (b.data.ptr, out_v[1].data.ptr, 7, 2)]
    with pytest.raises(ValueError, match="clip_value_max must be a scalar"):
        ccp.clip_by_value([a], 0.0, np.zeros(2))


@needs_cupy
def test_launch_arguments_of_unscale(recorded):
    a = FakeDeviceArray(n=5, dtype="float32", ptr=1 << 20)
    ccp.clip_by_global_norm([a], 1.0, unscale=2.0 ** -15)
    (_, _, kwargs), = recorded
    assert kwargs["unscale"] == 2.0 ** -15 and kwargs["unscale_ptr"] == 0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="unscale must be a finite number > 0"):
            ccp.clip_by_global_norm([a], 1.0, unscale=bad)
    assert len(recorded) == 1  # refused before any launch


@needs_cupy
@pytest.mark.parametrize("force_nvrtc", [False, True])
def test_launch_arguments(recorded, monkeypatch, force_nvrtc):
    if force_nvrtc:
        monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    else:
        monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    route = "nvrtc" if force_nvrtc or not _core().cuda_compiled() else "core"
    a = FakeDeviceArray(n=5, dtype="float32", ptr=1 << 20)
    b = FakeDeviceArray(n=16385, dtype="float16", ptr=1 << 30)

    out, norm = ccp.clip_by_global_norm([a, None, b], 0.1)
    (who, args, kwargs), = recorded
    descs, norm_code, scale, clip, clip_ptr, use, use_ptr, norm_ptr, ws, ws_bytes, stream = args
    rest = {"check_overlap": who != "core",  # the compiled route: fresh outputs, checked above
            "tensor_norms": 0, "skip_nonfinite": False,  # gradient health: not asked for
            "mode": 0, "clip_min": 0.0, "clip_min_ptr": 0, "clip_max": 0.0, "clip_max_ptr": 0,
            "unscale": 1.0, "unscale_ptr": 0}
    assert who == route and kwargs == rest
    assert descs == [(a.data.ptr, out[0].data.ptr, 5, 2), (b.data.ptr, out[2].data.ptr, 16385, 0)]
    assert norm_code == 2 and scale is True  # mixed list: float32 norm
    assert clip == float(np.float32(0.1)) and clip_ptr == 0
    assert use is None and use_ptr == 0
    assert norm_ptr == norm.data.ptr and norm.dtype == np.float32
    assert ws_bytes == _nvrtc.cuda_workspace_bytes(descs) and ws not in (0, norm_ptr)
    assert stream == 0xABC
    assert out[1] is None

    recorded.clear()
    ccp.clip_by_global_norm([a, b], 2.0, use_norm=3, in_place=True)
    (_, args, _), = recorded
    assert args[0] == [(a.data.ptr, a.data.ptr, 5, 2), (b.data.ptr, b.data.ptr, 16385, 0)]
    assert args[5] == 3.0 and args[6] == 0

    recorded.clear()
    g = ccp.global_norm([b])
    (_, args, _), = recorded
    assert args[0] == [(b.data.ptr, 0, 16385, 0)] and args[1] == 0 and args[2] is False
    assert args[7] == g.data.ptr and g.dtype == np.float16


@needs_cupy
@pytest.mark.parametrize("empty", [[], (None, None)])
def test_empty_list_launches_nothing(recorded, monkeypatch, empty):
    """No tensors, as TF: ([None, ...], 0.0 float32) or use_norm as the norm;
    neither route is called (`recorded` stays empty). The norm is copied from
    a host float32 (stand-in: cupy.asarray returns what it is given)."""
    monkeypatch.setattr(cupy, "asarray", lambda x: x)
    for in_place in (False, True):
        out, norm = ccp.clip_by_global_norm(empty, 1.0, in_place=in_place)
        assert out == [None] * len(empty) and type(out) is list
        assert type(norm) is np.float32 and norm == 0.0
    out, norm = ccp.clip_by_global_norm(empty, 1.0, use_norm=0.1)
    assert type(norm) is np.float32 and norm == np.float32(0.1)
    norm = ccp.global_norm(empty)
    assert type(norm) is np.float32 and norm == 0.0
    assert recorded == []


@needs_cupy
def test_separate_allocations_give_each_output_its_own(monkeypatch):
    """CLIPOPS_SEPARATE_ALLOCATIONS=1 (gpu_checks.sh's memcheck runs): one
    allocation per output, of exactly its shape and dtype, no padding."""
    made = []

    def fake_empty(shape, dtype):
        made.append((shape, np.dtype(dtype)))
        return FakeDeviceArray(n=int(np.prod(shape)), dtype=dtype, ptr=len(made) << 20)

    monkeypatch.setattr(cupy, "empty", fake_empty)
    values = [FakeDeviceArray(n=5), FakeDeviceArray(n=0, dtype="float16"),
              FakeDeviceArray(n=CHUNK + 1, dtype="float64")]
    monkeypatch.setenv("CLIPOPS_SEPARATE_ALLOCATIONS", "1")
    outs = ccp._empty_like_all(values)
    assert made == [((5,), np.dtype("float32")), ((0,), np.dtype("float16")),
                    ((CHUNK + 1,), np.dtype("float64"))]
    assert [o.data.ptr for o in outs] == [1 << 20, 2 << 20, 3 << 20]
    monkeypatch.setenv("CLIPOPS_SEPARATE_ALLOCATIONS", "0")
    assert not ccp._separate_allocations()


@needs_cupy
@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_core_failure_becomes_launch_error(recorded, monkeypatch, error):
    if not _core().cuda_compiled():
        pytest.skip("this build has no nvcc-compiled CUDA kernel")
    monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)

    def fail(*a, **k):
        raise error("launching the clip kernel: too many blocks in cooperative launch")

    monkeypatch.setattr(_core(), "clip_cuda", fail)
    with pytest.raises(ccp.LaunchError, match="could not run.*cooperative") as info:
        ccp.global_norm([FakeDeviceArray()])
    assert isinstance(info.value, RuntimeError)


@pytest.fixture
def nvrtc_launch(monkeypatch):
    """_nvrtc.clip_cuda with the device calls recorded: the table copy as bytes,
    the launch with its kernel parameters decoded as the kernel declares them."""
    rec = {"copies": [], "launches": []}
    kernel = _nvrtc.Kernel(module=None, function=SimpleNamespace(ptr=0xF00), resident_blocks=396,
                           num_regs=70)
    monkeypatch.setattr(_nvrtc, "get_kernel", lambda device: kernel)
    monkeypatch.setattr(_nvrtc.runtime, "getDevice", lambda: 0)
    record_table_copies(monkeypatch, rec["copies"])
    c = ctypes
    types = [c.c_uint64, c.c_int, c.c_longlong, c.c_uint64, c.c_int, c.c_int, c.c_double, c.c_uint64,
             c.c_int, c.c_double, c.c_uint64, c.c_uint64]  # clipops_clip_kernel's parameters

    def launch(f, gx, gy, gz, bx, by, bz, smem, stream, params):
        p = (c.c_void_p * len(types)).from_address(params)
        values = [t.from_address(p[k]).value for k, t in enumerate(types)]
        rec["launches"].append((f, (gx, gy, gz), (bx, by, bz), smem, stream, values))

    monkeypatch.setattr(_nvrtc.driver, "launchCooperativeKernel", launch)
    return rec


@needs_cupy
@pytest.mark.parametrize("sizes, grid", [([5, 16385], 3), ([0], 1), ([16384] * 1000, 396)])
def test_nvrtc_launch_marshalling(nvrtc_launch, sizes, grid):
    descs = [(4096 * (i + 1), 8192 * (i + 1), n, i % 4) for i, n in enumerate(sizes)]
    table, items = _nvrtc.build_table(descs)
    ws_bytes = _nvrtc.cuda_workspace_bytes(descs)
    ws = 1 << 32
    _nvrtc.clip_cuda(descs, 2, True, 1.5, 0, None, 0xBEEF, 0xCAFE, ws, ws_bytes, 0x5)
    (dst, data, kind, stream), = nvrtc_launch["copies"]
    assert (dst, data, kind, stream) == (ws, table.tobytes(), cupy.cuda.runtime.memcpyHostToDevice, 5)
    assert len(_nvrtc._in_flight) == 1  # the pinned copy source stays alive until its event
    (f, g, block, smem, stream, values), = nvrtc_launch["launches"]
    assert f == 0xF00 and g == (grid, 1, 1) and block == (int(_core().THREADS), 1, 1)
    assert smem == 0 and stream == 5
    partials = ws + (40 * len(sizes) + 15) // 16 * 16
    # (tensors, num_tensors, num_items, partials, norm_dtype, do_scale, clip_value, clip_ptr,
    #  has_use_norm, use_value, use_ptr, norm_out): use_ptr alone sets has_use_norm
    assert values == [ws, len(sizes), items, partials, 2, 1, 1.5, 0, 1, 0.0, 0xBEEF, 0xCAFE]


@needs_cupy
def test_nvrtc_launch_scalars_and_errors(nvrtc_launch):
    descs = [(4096, 0, 100, 3)]
    n = _nvrtc.cuda_workspace_bytes(descs)
    _nvrtc.clip_cuda(descs, 3, False, 0.0, 0, 2.5, 0, 0xCAFE, 1 << 32, n, 0)
    values = nvrtc_launch["launches"][-1][-1]
    assert values[4:] == [3, 0, 0.0, 0, 1, 2.5, 0, 0xCAFE]
    with pytest.raises(ValueError, match="smaller"):
        _nvrtc.clip_cuda(descs, 3, False, 0.0, 0, None, 0, 0, 1 << 32, n - 1, 0)
    with pytest.raises(ValueError, match="aligned"):
        _nvrtc.clip_cuda(descs, 3, False, 0.0, 0, None, 0, 0, (1 << 32) + 8, n, 0)


@needs_cupy
def test_pinned_tables_are_released_only_after_their_copy(nvrtc_launch, monkeypatch):
    events = []

    def record(stream):
        events.append(SimpleNamespace(done=False))
        return events[-1]

    monkeypatch.setattr(_nvrtc, "_record_event", record)
    descs = [(4096, 0, 100, 2)]
    args = (descs, 2, False, 0.0, 0, None, 0, 0, 1 << 32, _nvrtc.cuda_workspace_bytes(descs), 0)
    _nvrtc.clip_cuda(*args)
    _nvrtc.clip_cuda(*args)
    assert len(_nvrtc._in_flight) == 2  # neither copy has run: both sources kept
    events[0].done = True
    _nvrtc.clip_cuda(*args)
    assert [e for e, _ in _nvrtc._in_flight] == events[1:]


@needs_cupy
def test_nvrtc_launch_failure_is_clear(nvrtc_launch, monkeypatch):
    def fail(*args):
        raise cupy.cuda.driver.CUDADriverError.__new__(cupy.cuda.driver.CUDADriverError)

    monkeypatch.setattr(_nvrtc.driver, "launchCooperativeKernel", fail)
    descs = [(4096, 0, 10**7, 2)]
    with pytest.raises(ccp.LaunchError, match="396 resident at most"):
        _nvrtc.clip_cuda(descs, 2, False, 0.0, 0, None, 0, 0, 1 << 32,
                         _nvrtc.cuda_workspace_bytes(descs), 0)


# ---- the NVRTC route's host side ----------------------------------------------

class _CTensorEntry(ctypes.Structure):
    """struct TensorEntry of csrc/core/clip_kernel.cuh, laid out by the C ABI."""

    _fields_ = [("in", ctypes.c_void_p), ("out", ctypes.c_void_p), ("numel", ctypes.c_longlong),
                ("first_item", ctypes.c_longlong), ("dtype", ctypes.c_int), ("pad", ctypes.c_int)]


@needs_cupy
def test_table_dtype_matches_the_c_struct():
    assert _nvrtc.TENSOR_ENTRY.itemsize == ctypes.sizeof(_CTensorEntry) == 40
    for name, _ in _CTensorEntry._fields_:
        assert _nvrtc.TENSOR_ENTRY.fields[name][1] == getattr(_CTensorEntry, name).offset, name


@needs_cupy
def test_table_contents():
    chunk = int(_core().CHUNK)
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 0, 2**31 + 5, 3]
    descs = [(0x7F00_0000_0000 + 4096 * i, 0x7E00_0000_0000 + 8 * i if i % 2 else 0, n, i % 4)
             for i, n in enumerate(sizes)]
    table, items = _nvrtc.build_table(descs)
    chunks = [-(-n // chunk) for n in sizes]
    assert items == sum(chunks)
    assert table["first_item"].tolist() == [sum(chunks[:i]) for i in range(len(sizes))]
    assert table["in"].tolist() == [d[0] for d in descs]
    assert table["out"].tolist() == [d[1] for d in descs]
    assert table["numel"].tolist() == sizes
    assert table["dtype"].tolist() == [d[3] for d in descs]
    assert not table["pad"].any()
    # the bytes as the C struct reads them
    raw = (_CTensorEntry * len(descs)).from_buffer_copy(table.tobytes())
    assert [e.numel for e in raw] == sizes and raw[6].first_item == sum(chunks[:6])


@needs_cupy
@pytest.mark.parametrize("sizes", [[], [0], [1], [16384], [16385, 0, 7], list(range(0, 200000, 997))])
def test_workspace_bytes_match_the_core(sizes):
    descs = [(4096 * (i + 1), 0, n, 2) for i, n in enumerate(sizes)]
    ours = _nvrtc.cuda_workspace_bytes(descs)
    chunk = int(_core().CHUNK)
    table = (40 * len(sizes) + 15) // 16 * 16
    # the table, one double per work item, one per tensor (clip_by_norm's norms)
    assert ours == max(16, table + 8 * (sum(-(-n // chunk) for n in sizes) + len(sizes)))
    assert ours == _core().cuda_workspace_bytes(descs)


@needs_cupy
def test_grid_rule():
    assert _nvrtc.grid_size(0, 396) == 1   # an empty list still writes its norm
    assert _nvrtc.grid_size(5, 396) == 5
    assert _nvrtc.grid_size(10**6, 396) == 396


@needs_cupy
def test_target_selection():
    archs = (75, 80, 86, 90, 100, 120)
    assert _nvrtc.select_target(90, archs) == ("-arch=sm_90", "cubin")
    assert _nvrtc.select_target(89, archs) == ("-arch=compute_86", "ptx")  # driver JIT
    assert _nvrtc.select_target(130, archs) == ("-arch=compute_120", "ptx")
    with pytest.raises(_nvrtc.CudaUnavailableError, match="older than"):
        _nvrtc.select_target(70, archs)


@needs_cupy
def test_kernel_sources_are_found():
    d = _nvrtc.kernel_dir()
    assert (d / "clip_kernel.cuh").is_file() and (d / "clip_math.h").is_file()


@needs_cupy
def test_missing_cuda_headers_is_clear(monkeypatch):
    monkeypatch.setattr(_nvrtc, "_header_candidates", lambda lib: [])
    with pytest.raises(_nvrtc.CudaUnavailableError, match="cooperative_groups.h"):
        _nvrtc.cuda_include_dirs()


@needs_cupy
def test_relative_header_folders_are_not_searched(monkeypatch, tmp_path):
    # headers are compiled into code: a relative folder is wherever the current directory is
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "cooperative_groups.h").write_text("#error planted\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPOPS_CUDA_INCLUDE", "inc")
    with pytest.warns(RuntimeWarning, match="relative CUDA include folders"):
        found = _nvrtc._header_candidates("cudart")
    assert Path("inc") not in found and all(d.is_absolute() for d in found)


@needs_cupy
def test_missing_nvrtc_is_clear(monkeypatch):
    from cupy.cuda import nvrtc

    def fail():
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(nvrtc, "getVersion", fail)
    with pytest.raises(_nvrtc.CudaUnavailableError, match="nvidia-cuda-nvrtc"):
        _nvrtc.compile_kernel("-arch=sm_90", "cubin")


NVRTC_SKIP = nvrtc_skip_reason()


@pytest.mark.skipif(NVRTC_SKIP is not None, reason=str(NVRTC_SKIP))
def test_nvrtc_options_keep_ieee_rounding():
    opts = _nvrtc.nvrtc_options("-arch=sm_90")
    assert "--fmad=false" in opts and "-ftz=false" in opts
    assert "-ftz=true" not in opts and "-use_fast_math" not in opts
    assert f"-I{_nvrtc.kernel_dir()}" in opts


@pytest.mark.skipif(NVRTC_SKIP is not None, reason=str(NVRTC_SKIP))
def test_nvrtc_compiles_without_flush_to_zero_or_fma(tmp_path, monkeypatch):
    """The guard for bit-equality with the nvcc build and the CPU: no
    flush-to-zero and no fused multiply-add in the generated code (CuPy's own
    RawModule would add -ftz=true). Also checks the disk cache."""
    monkeypatch.setenv("CLIPOPS_CACHE_DIR", str(tmp_path))
    ptx = _nvrtc.compile_kernel("-arch=compute_75", "ptx").decode(errors="replace")
    assert ".entry clipops_clip_kernel" in ptx
    ops = [ln.split()[0] for ln in ptx.splitlines() if ln.startswith("\t") and ln.split()]
    assert any(op.startswith(("mul.rn.f32", "add.rn.f32")) for op in ops), "no IEEE float ops found"
    assert not [op for op in ops if ".ftz" in op]
    assert not [op for op in ops if op.startswith("fma")]
    cached = list(tmp_path.glob("clipops_*.ptx"))
    assert len(cached) == 1

    def no_compile(*a, **k):
        raise AssertionError("compiled again instead of reading the cache")

    monkeypatch.setattr(_nvrtc, "_compile", no_compile)
    assert _nvrtc.compile_kernel("-arch=compute_75", "ptx").decode(errors="replace") == ptx


@pytest.mark.skipif(NVRTC_SKIP is not None, reason=str(NVRTC_SKIP))
def test_nvrtc_cubin(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPOPS_CACHE_DIR", str(tmp_path))
    assert _nvrtc.compile_kernel("-arch=sm_90", "cubin")[:4] == b"\x7fELF"


# The NVRTC route's disk cache is the driver route's (csrc/core/kernel_cache.h,
# tested in full in tests/test_driver.py): these check that the route uses it,
# with CuPy's NVRTC and module loading replaced, so they run without a GPU.

@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """_nvrtc with a stand-in NVRTC 13.0 (each compilation returns a new
    'fresh' ELF image) and stand-in headers; the cache in tmp_path/cache."""
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "cooperative_groups.h").write_text("// stand-in\n")
    compiled = []

    def compile_(nvrtc, options, kind):
        compiled.append(options)
        return b"\x7fELF fresh %d" % len(compiled)

    monkeypatch.setattr(_nvrtc, "_nvrtc", lambda: SimpleNamespace(getVersion=lambda: (13, 0)))
    monkeypatch.setattr(_nvrtc, "cuda_include_dirs", lambda: [str(inc)])
    monkeypatch.setattr(_nvrtc, "_compile", compile_)
    monkeypatch.setenv("CLIPOPS_CACHE_DIR", str(tmp_path / "cache"))
    return SimpleNamespace(compiled=compiled, cache=tmp_path / "cache")


def _entry(arch: str, kind: str):
    core = _core()
    key = core.kernel_cache_key(core.KERNEL_PROGRAM, list(_nvrtc.nvrtc_options(arch)), (13, 0))
    return core.kernel_cache_entry(key, kind)


@needs_cupy
def test_nvrtc_route_caches_in_the_driver_route_s_folder_under_its_key(fake_compiler):
    first = _nvrtc.compile_kernel("-arch=sm_90", "cubin")
    assert _nvrtc.compile_kernel("-arch=sm_90", "cubin") == first == b"\x7fELF fresh 1"
    assert len(fake_compiler.compiled) == 1
    entry = fake_compiler.cache / _entry("-arch=sm_90", "cubin")
    assert entry.read_bytes() == first
    assert os.stat(entry).st_mode & 0o777 == 0o600
    assert os.stat(fake_compiler.cache).st_mode & 0o777 == 0o700
    assert [p.name for p in fake_compiler.cache.iterdir()] == [entry.name]


@needs_cupy
def test_nvrtc_route_ignores_a_kernel_planted_in_a_shared_folder(fake_compiler):
    cache = fake_compiler.cache
    cache.mkdir()
    planted = cache / _entry("-arch=sm_90", "cubin")
    planted.write_bytes(b"\x7fELF planted")
    os.chmod(planted, 0o600)
    os.chmod(cache, 0o777)  # anyone may have written it
    assert _nvrtc.compile_kernel("-arch=sm_90", "cubin") == b"\x7fELF fresh 1"
    assert planted.read_bytes() == b"\x7fELF planted"  # and nothing written there


class _FakeDriverError(Exception):
    pass


@pytest.fixture
def fake_modules(monkeypatch):
    """cupy.cuda.function.Module replaced: load() refuses anything but a fresh
    image (or everything, with refuse_all), as the driver refuses a damaged one."""
    state = SimpleNamespace(refuse_all=False, loads=[])

    class Module:
        def load(self, binary):
            state.loads.append(bytes(binary))
            if state.refuse_all or not bytes(binary).startswith(b"\x7fELF fresh"):
                raise _FakeDriverError("CUDA_ERROR_INVALID_IMAGE")
            self.binary = bytes(binary)

    monkeypatch.setattr(_nvrtc, "function", SimpleNamespace(Module=Module))
    monkeypatch.setattr(_nvrtc, "driver", SimpleNamespace(CUDADriverError=_FakeDriverError))
    return state


@needs_cupy
def test_nvrtc_route_compiles_a_refused_cached_kernel_again_once(fake_compiler, fake_modules):
    fake_compiler.cache.mkdir(mode=0o700)
    entry = fake_compiler.cache / _entry("-arch=sm_90", "cubin")
    entry.write_bytes(b"\0damaged")
    os.chmod(entry, 0o600)
    module = _nvrtc._load_module("-arch=sm_90", "cubin")
    assert module.binary == b"\x7fELF fresh 1" and len(fake_compiler.compiled) == 1
    assert fake_modules.loads == [b"\0damaged", b"\x7fELF fresh 1"]
    assert entry.read_bytes() == b"\x7fELF fresh 1"  # rewritten


@needs_cupy
def test_nvrtc_route_reports_a_fresh_kernel_the_driver_refuses(fake_compiler, fake_modules):
    fake_modules.refuse_all = True
    with pytest.raises(_nvrtc.CudaUnavailableError, match="the driver cannot load.*update it"):
        _nvrtc._load_module("-arch=sm_90", "cubin")
    assert len(fake_compiler.compiled) == 1
    assert not fake_compiler.cache.exists() or list(fake_compiler.cache.iterdir()) == []


# =============================================================================
# GPU tests
# =============================================================================

# Tolerances (atol + rtol * |ref| against float64, explained per dtype), the
# float64 references and the boundary sizes are conftest.py's, shared with the
# CPU and TF tests: the GPU computes the same bits as the CPU core.
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32),
          "float64": np.dtype(np.float64)}


def _bf16_skip_reason() -> str | None:
    if BF16 is None:
        return "ml_dtypes is not installed (bfloat16)"
    try:
        cupy.zeros(2, dtype=BF16).sum()
    except Exception as exc:
        return f"this CuPy has no bfloat16 arrays ({exc}); CuPy >= 14 with ml_dtypes has them"
    return None


def _dtypes_or_skip(names):
    if "bfloat16" in names:
        reason = _bf16_skip_reason()
        if reason:
            pytest.skip(reason)


def _host_list(sizes, dtypes, seed=0, spread=False):
    """Random normal arrays; with spread, magnitudes over many decades
    (including ones whose squares are subnormal in float) to exercise rounding."""
    rng = np.random.default_rng(seed)
    mixed = len(set(dtypes)) > 1
    out = []
    for i, (n, dt) in enumerate(zip(sizes, dtypes)):
        x = rng.standard_normal(n)
        if spread:  # decades that keep the norm finite in the norm dtype (float32 if mixed)
            lo, hi = {"float16": (-7, 2), "bfloat16": (-30, 8), "float32": (-24, 8),
                      "float64": (-30, 8) if mixed else (-160, 100)}[dt]
            x *= 10.0 ** rng.uniform(lo, hi, n)
        shape = (n,) if i % 3 else (1, n)  # some 2-d, as real gradients are
        out.append(x.astype(DTYPES[dt]).reshape(shape))
    return out


def _to_gpu(host):
    return [cupy.asarray(h) for h in host]


def _norm_dtype(dtypes) -> str:
    return dtypes[0] if len(set(dtypes)) == 1 else "float32"


def _bits(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _assert_same_bits(a, b, what=""):
    """Bit-for-bit equal, except that any NaN equals any NaN (the CPU's
    default NaN is negative, the GPU's positive)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    nan_a = np.isnan(a.astype(np.float64))
    nan_b = np.isnan(b.astype(np.float64))
    assert (nan_a == nan_b).all(), f"{what}: NaNs differ"
    diff = (_bits(a) != _bits(b)) & ~nan_a
    assert not diff.any(), (f"{what}: {int(diff.sum())} elements differ, first at "
                            f"{int(np.flatnonzero(diff.ravel())[0])}")


def _assert_gpu_clip_matches_cpu(gpu_arrays, host: list) -> None:
    """clipops.cupy on foreign GPU arrays returns CuPy arrays with the CPU core's bits."""
    out, norm = ccp.clip_by_global_norm(gpu_arrays, 1.0)
    want, want_norm = cnp.clip_by_global_norm(host, 1.0)
    _assert_same_bits(cupy.asnumpy(norm), want_norm)
    for g, w in zip(out, want):
        assert isinstance(g, cupy.ndarray)
        _assert_same_bits(cupy.asnumpy(g), w)


def _poison_pool(nbytes: int) -> None:
    """Leaves NaN bytes in CuPy's pool, where the next outputs will be carved
    from: an element the kernel forgot to write then shows up as NaN."""
    x = cupy.full(nbytes // 4 + 1024, np.nan, dtype=cupy.float32)
    del x


@pytest.fixture(params=["compiled", "nvrtc"])
def route(request, monkeypatch):
    """Runs a test through the nvcc-compiled kernel and through NVRTC."""
    if request.param == "compiled":
        if not _core().cuda_compiled():
            pytest.skip("this build has no nvcc-compiled CUDA kernel")
        monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    else:
        if NVRTC_SKIP:
            pytest.skip(NVRTC_SKIP)
        monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    return request.param


def _list_sizes(count: int) -> list[int]:
    if count <= len(BOUNDARY_SIZES):
        return BOUNDARY_SIZES[-count:] if count > 1 else [CHUNK + 1]
    return [BOUNDARY_SIZES[i % len(BOUNDARY_SIZES)] if count < 1000 else (0, 1, 7, 1025, 130)[i % 5]
            for i in range(count)]


def _run_and_check(host, dtypes, in_place: bool):
    """Clip `host` on the GPU at a third of its norm; check every element and
    the norm against float64."""
    norm_dt = _norm_dtype(dtypes)
    ref = ref_norm(host)
    clip = float(np.asarray(ref / 3).astype(DTYPES[norm_dt]))  # as the kernel sees it
    dev = _to_gpu(host)
    if not in_place:
        _poison_pool(sum(h.nbytes for h in host) + 256 * len(host))
    out, norm = ccp.clip_by_global_norm(dev, clip, in_place=in_place)
    assert norm.shape == () and norm.dtype == DTYPES[norm_dt]
    assert_close(cupy.asnumpy(norm), ref, DTYPES[norm_dt], "norm")
    nrm = float(cupy.asnumpy(norm).astype(np.float64))
    scale = clip / max(nrm, clip)  # the reference scale from the returned norm
    for i, (h, o, dt) in enumerate(zip(host, out, dtypes)):
        if in_place:
            assert o is dev[i]
        assert isinstance(o, cupy.ndarray) and o.shape == h.shape and o.dtype == h.dtype
        assert_close(cupy.asnumpy(o), h.astype(np.float64) * scale, DTYPES[dt], f"arrays[{i}]")
    # global_norm of the original data is the norm the clip used
    _assert_same_bits(cupy.asnumpy(ccp.global_norm(_to_gpu(host))), cupy.asnumpy(norm), "global_norm")


@gpu
@pytest.mark.parametrize("count", [1, 7, 110, 111, 5000])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("in_place", [False, True])
def test_against_float64_reference(route, count, dtype, in_place):
    _dtypes_or_skip([dtype])
    sizes = _list_sizes(count)
    dtypes = [dtype] * count
    _run_and_check(_host_list(sizes, dtypes, seed=count), dtypes, in_place)


@gpu
@pytest.mark.parametrize("count", [2, 7, 110, 111, 5000])
@pytest.mark.parametrize("in_place", [False, True])
def test_mixed_dtypes_against_float64_reference(route, count, in_place):
    names = ["float16", "float32", "float64"] + ([] if _bf16_skip_reason() else ["bfloat16"])
    dtypes = [names[i % len(names)] for i in range(count)]
    _run_and_check(_host_list(_list_sizes(count), dtypes, seed=count + 1), dtypes, in_place)


@gpu
@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_single_tensor_around_the_chunk(route, size):
    dtypes = ["float32"]
    host = _host_list([size], dtypes, seed=size)
    if size == 0:  # norm 0: TF's scale is clip * min(1/0, 1/clip) = 1
        out, norm = ccp.clip_by_global_norm(_to_gpu(host), 1.0)
        assert float(norm) == 0.0 and out[0].shape == (1, 0)
        return
    _run_and_check(host, dtypes, in_place=False)
    _run_and_check(host, dtypes, in_place=True)


# ---- bit-for-bit equality with the CPU core -----------------------------------

# one tensor per boundary size
_N = len(BOUNDARY_SIZES)
BITWISE_CASES = {name: [name] * _N for name in ("float16", "bfloat16", "float32", "float64")}
BITWISE_CASES["mixed"] = [("float16", "float32", "float64")[i % 3] for i in range(_N)]
BITWISE_CASES["mixed_bf16"] = [("bfloat16", "float16", "float32", "float64")[i % 4] for i in range(_N)]


@gpu
@pytest.mark.parametrize("case", sorted(BITWISE_CASES))
@pytest.mark.parametrize("spread", [False, True])
def test_bitwise_equal_to_numpy_front_end(route, case, spread):
    """The key property: the GPU follows the CPU's reduction order and
    rounding, so norms and outputs are the same bits (NaN payloads aside)."""
    dtypes = BITWISE_CASES[case]
    _dtypes_or_skip(dtypes)
    host = _host_list(BOUNDARY_SIZES, dtypes, seed=7, spread=spread)
    clip = ref_norm(host) / 3
    for in_place in (False, True):
        for use in (None, 2.0 * clip):
            want, want_norm = cnp.clip_by_global_norm([h.copy() for h in host], clip, use_norm=use,
                                                      in_place=in_place)
            dev = _to_gpu(host)
            got, got_norm = ccp.clip_by_global_norm(dev, clip, use_norm=use, in_place=in_place)
            what = f"{case} in_place={in_place} use_norm={use}"
            _assert_same_bits(cupy.asnumpy(got_norm), want_norm, what + " norm")
            for i, (g, w) in enumerate(zip(got, want)):
                _assert_same_bits(cupy.asnumpy(g), w, f"{what} arrays[{i}]")
    _assert_same_bits(cupy.asnumpy(ccp.global_norm(_to_gpu(host))), cnp.global_norm(host),
                      f"{case} global_norm")


@gpu
@pytest.mark.parametrize("special", ["inf", "nan", "huge"])
def test_non_finite_norm_matches_cpu(route, special):
    """A non-finite norm makes every output NaN, as in TF; same on both devices."""
    host = _host_list([100, 20000, 5], ["float32", "float16", "float32"], seed=3)
    host[1].reshape(-1)[7] = {"inf": np.inf, "nan": np.nan, "huge": 60000.0}[special]
    want, want_norm = cnp.clip_by_global_norm(host, 1.0)
    got, got_norm = ccp.clip_by_global_norm(_to_gpu(host), 1.0)
    _assert_same_bits(cupy.asnumpy(got_norm), want_norm, "norm")
    for g, w in zip(got, want):
        _assert_same_bits(cupy.asnumpy(g), w)
    if special != "huge":
        assert all(np.isnan(cupy.asnumpy(g).astype(np.float64)).all() for g in got)


@gpu
@pytest.mark.parametrize("case", sorted(BITWISE_CASES))
def test_gradient_health_is_the_cpu_kernel_s_bits(route, case):
    """Per-tensor norms, nonfinite="skip"/"raise", and the fused list
    clip_by_norm / clip_by_value: one launch each, the CPU kernel's bits."""
    dtypes = BITWISE_CASES[case]
    _dtypes_or_skip(dtypes)
    host = _host_list(BOUNDARY_SIZES, dtypes, seed=11, spread=False)
    clip = ref_norm(host) / 3
    want = cnp.clip_by_global_norm([h.copy() for h in host], clip, return_norms=True)
    got = ccp.clip_by_global_norm(_to_gpu(host), clip, return_norms=True)
    _assert_same_bits(cupy.asnumpy(got.tensor_norms), want.tensor_norms, f"{case} tensor norms")
    want_n, want_norms = cnp.clip_by_norm([h.copy() for h in host], 0.5, return_norms=True)
    got_n, got_norms = ccp.clip_by_norm(_to_gpu(host), 0.5, return_norms=True)
    _assert_same_bits(cupy.asnumpy(got_norms), want_norms, f"{case} clip_by_norm norms")
    for i, (g, w) in enumerate(zip(got_n, want_n)):
        _assert_same_bits(cupy.asnumpy(g), w, f"{case} clip_by_norm arrays[{i}]")
    want_v = cnp.clip_by_value([h.copy() for h in host], -0.25, 0.5)
    for i, (g, w) in enumerate(zip(ccp.clip_by_value(_to_gpu(host), -0.25, 0.5), want_v)):
        _assert_same_bits(cupy.asnumpy(g), w, f"{case} clip_by_value arrays[{i}]")
    bad = [h.copy() for h in host]
    bad[1].reshape(-1)[0] = np.nan
    dev = _to_gpu(bad)
    res = ccp.clip_by_global_norm(dev, clip, nonfinite="skip")
    assert bool(res.skipped)
    for g, b in zip(res.clipped, bad):
        _assert_same_bits(cupy.asnumpy(g), b, f"{case} skipped step")
    with pytest.raises(clipops.NonFiniteError, match=r"arrays\[1\] is the first"):
        ccp.clip_by_global_norm(_to_gpu(bad), clip, nonfinite="raise", in_place=True)
    # unscale (a loss scale's inverse), as a host number and as a GPU scalar
    want = cnp.clip_by_global_norm([h.copy() for h in host], clip, unscale=0.25,
                                   return_norms=True)
    for u in (0.25, cupy.asarray(np.float32(0.25))):
        got = ccp.clip_by_global_norm(_to_gpu(host), clip, unscale=u, return_norms=True)
        _assert_same_bits(cupy.asnumpy(got.global_norm), want.global_norm, f"{case} unscaled norm")
        _assert_same_bits(cupy.asnumpy(got.tensor_norms), want.tensor_norms, f"{case} unscaled norms")
        for i, (g, w) in enumerate(zip(got.clipped, want.clipped)):
            _assert_same_bits(cupy.asnumpy(g), w, f"{case} unscaled arrays[{i}]")


def _resnet_like_sizes() -> list[int]:
    """Element counts of a ResNet-50-like parameter list, scaled down 16x."""
    sizes = [64 * 3 * 49 // 16, 64, 64]
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            sizes += [width * width * 9 // 16, width, width, width * 4 * width // 16, 4 * width]
    return sizes + [1000 * 2048 // 16, 1000]


@gpu
def test_compiled_and_nvrtc_routes_are_bitwise_identical(monkeypatch):
    if not _core().cuda_compiled():
        pytest.skip("this build has no nvcc-compiled CUDA kernel to compare with")
    if NVRTC_SKIP:
        pytest.skip(NVRTC_SKIP)
    sizes = _resnet_like_sizes()
    dtypes = ["float16" if i % 4 == 0 else "float32" for i in range(len(sizes))]
    host = _host_list(sizes, dtypes, seed=11, spread=True)
    results = {}
    for route in ("compiled", "nvrtc"):
        if route == "nvrtc":
            monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
        else:
            monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
        out, norm = ccp.clip_by_global_norm(_to_gpu(host), 0.25)
        results[route] = [cupy.asnumpy(norm)] + [cupy.asnumpy(o) for o in out]
    for i, (a, b) in enumerate(zip(results["compiled"], results["nvrtc"])):
        _assert_same_bits(a, b, f"result {i}")


@gpu
def test_bitwise_identical_over_100_runs(route):
    sizes = [(i * 7919) % 90000 for i in range(111)]  # ~5M elements: every SM busy
    host = _host_list(sizes, ["float32"] * len(sizes), seed=5)
    dev = _to_gpu(host)
    first, first_norm = ccp.clip_by_global_norm(dev, 1.0)
    first_bits = [o.view(cupy.uint32) for o in first]
    for run in range(100):
        out, norm = ccp.clip_by_global_norm(dev, 1.0)
        assert int(norm.view(cupy.uint32)) == int(first_norm.view(cupy.uint32)), f"run {run}: norm"
        assert all(bool((o.view(cupy.uint32) == f).all()) for o, f in zip(out, first_bits)), \
            f"run {run}: outputs"


# ---- streams --------------------------------------------------------------------

def _clip_on_a_busy_stream(host, clip, seconds: float):
    """Clips `host` on a non-blocking stream whose inputs are written ON that
    stream, behind a `seconds`-long kernel, and returns
    (clipped, norm, global_norm, host seconds of the two calls, whether the
    stream was still busy when they returned).

    Why this catches a launch on any other stream: until the spin ends, the
    input buffers hold 0xFF bytes (NaN in every float dtype); the real values
    are copied in by the stream itself after the spin. A kernel queued on
    CuPy's null stream (the legacy default stream, which does not wait for a
    non-blocking stream) or on any other stream starts at once, while the spin
    (one thread) leaves the GPU free, reads the NaNs and returns a NaN norm.
    Only a kernel ordered after the copy on this stream sees the data.
    (Inputs written before the spin would be right on every stream.)"""
    offsets, total = [], 0
    for h in host:  # one buffer, so that one copy writes every input
        offsets.append(total)
        total += -(-h.nbytes // 256) * 256  # 256-byte aligned, as real allocations
    packed = np.zeros(max(total, 1), np.uint8)
    for h, off in zip(host, offsets):
        packed[off:off + h.nbytes] = np.ascontiguousarray(h).view(np.uint8).ravel()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        source = cupy.asarray(packed)
        inputs = cupy.empty_like(source)
        dev = [cupy.ndarray(h.shape, h.dtype, memptr=inputs.data + off)
               for h, off in zip(host, offsets)]
        inputs.data.copy_from_device_async(source.data, source.nbytes)
        ccp.clip_by_global_norm(dev, clip)  # warm: kernel loaded, pool filled
        ccp.global_norm(dev)
        inputs.fill(0xFF)
        stream.synchronize()
        spin(seconds)
        spun = cupy.cuda.Event()
        spun.record()
        # a device-to-device copy: queued without waiting, unlike one from pageable host memory
        inputs.data.copy_from_device_async(source.data, source.nbytes)
        t0 = time.perf_counter()
        out, norm = ccp.clip_by_global_norm(dev, clip)
        norm_only = ccp.global_norm(dev)
        elapsed = time.perf_counter() - t0
        still_spinning = not spun.done
        stream.synchronize()
    return out, norm, norm_only, elapsed, still_spinning


@gpu
@pytest.mark.parametrize("count", [1, 5000])
def test_call_does_not_wait_for_the_gpu(route, count):
    """Queued behind a 2 s kernel on a non-blocking stream, the call returns at
    once; the results, read after the stream is synchronised, are right only
    if the kernel ran on that stream, after its inputs were written there."""
    host = _host_list(_list_sizes(count), ["float32"] * count, seed=count)
    want, want_norm = cnp.clip_by_global_norm(host, 0.5)
    out, norm, norm_only, elapsed, still_spinning = _clip_on_a_busy_stream(host, 0.5, 2.0)
    assert still_spinning, "the spin kernel ended before the call returned: the call waited"
    assert elapsed < 1.0, f"the call took {elapsed:.3f} s behind a 2 s kernel"
    _assert_same_bits(cupy.asnumpy(norm), want_norm, "norm")
    _assert_same_bits(cupy.asnumpy(norm_only), want_norm, "global_norm")
    for g, w in zip(out, want):
        _assert_same_bits(cupy.asnumpy(g), w)


@gpu
def test_non_default_stream_matches_default(route):
    host = _host_list(BOUNDARY_SIZES, ["float16"] * len(BOUNDARY_SIZES), seed=2)
    out0, norm0 = ccp.clip_by_global_norm(_to_gpu(host), 2.0)
    out1, norm1, norm_only, _, _ = _clip_on_a_busy_stream(host, 2.0, 0.2)
    _assert_same_bits(cupy.asnumpy(norm1), cupy.asnumpy(norm0))
    _assert_same_bits(cupy.asnumpy(norm_only), cupy.asnumpy(norm0))
    for a, b in zip(out1, out0):
        _assert_same_bits(cupy.asnumpy(a), cupy.asnumpy(b))


@gpu
def test_busy_stream_check_catches_a_launch_on_another_stream(route, monkeypatch):
    """The two tests above can fail the way they claim: with clipops sent to
    CuPy's null stream instead of the current one, the same check reads the
    poisoned inputs and gets a NaN norm."""
    host = _host_list([CHUNK + 1, 5], ["float32", "float32"], seed=12)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: cupy.cuda.Stream.null)
    _, norm, norm_only, _, _ = _clip_on_a_busy_stream(host, 0.5, 1.0)
    cupy.cuda.runtime.deviceSynchronize()  # the null-stream kernels are not on the stream synchronised
    assert math.isnan(float(norm)) and math.isnan(float(norm_only))


# ---- API details ----------------------------------------------------------------

@gpu
@pytest.mark.parametrize("empty", [[], (), [None], [None, None]])
def test_empty_list_as_tf(empty, monkeypatch):
    """TF: clip_by_global_norm([], 1.0) is ([], 0.0), [None, None] gives
    ([None, None], 0.0), global_norm([]) is 0.0, all float32; use_norm is
    returned as the norm. Real device arrays, and no launch on either route."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a list with no tensors launched the kernel")

    monkeypatch.setattr(_core(), "clip_cuda", no_launch)
    monkeypatch.setattr(_nvrtc, "clip_cuda", no_launch)

    def check(norm, want):
        assert isinstance(norm, cupy.ndarray) and norm.shape == () and norm.dtype == np.float32
        assert float(norm) == want

    for in_place in (False, True):
        out, norm = ccp.clip_by_global_norm(empty, 1.0, in_place=in_place)
        assert out == [None] * len(empty) and type(out) is list
        check(norm, 0.0)
        _, norm = ccp.clip_by_global_norm(empty, cupy.asarray(1.0), use_norm=0.1, in_place=in_place)
        check(norm, float(np.float32(0.1)))
    check(ccp.global_norm(empty), 0.0)
    use = cupy.asarray(2.5, dtype=cupy.float32)
    _, norm = ccp.clip_by_global_norm(empty, 1.0, use_norm=use)
    check(norm, 2.5)
    norm += 1  # a new array, as the kernel's norm: the caller's use_norm is not it
    assert float(use) == 2.5
    _, norm = ccp.clip_by_global_norm(empty, 1.0, use_norm=cupy.asarray(0.1))  # float64 on the device
    check(norm, float(np.float32(0.1)))
    with pytest.raises(TypeError, match="clip_norm must be a float"):
        ccp.clip_by_global_norm(empty, cupy.asarray(2))


@gpu
def test_separate_allocations_same_bits(route, monkeypatch):
    """CLIPOPS_SEPARATE_ALLOCATIONS=1, with CuPy's pool off as in gpu_checks.sh:
    every output is one allocation of exactly its size (so memcheck sees its
    bounds), and the results are the bits of the shared-buffer default."""
    dtypes = ["float32", "float16", "float64", "float32"]
    host = _host_list([5, 0, CHUNK + 1, 3], dtypes, seed=13)
    shared, shared_norm = ccp.clip_by_global_norm(_to_gpu(host), 0.5)
    assert all(o.data.mem is shared[0].data.mem for o in shared)
    monkeypatch.setenv("CLIPOPS_SEPARATE_ALLOCATIONS", "1")
    pool = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(None)  # plain cudaMalloc: an allocation's size is the one asked for
    try:
        dev = _to_gpu(host)
        out, norm = ccp.clip_by_global_norm(dev, 0.5)
        cupy.cuda.get_current_stream().synchronize()
        assert len({id(o.data.mem) for o in out}) == len(out)
        assert [o.data.mem.size for o in out] == [h.nbytes for h in host]
        _assert_same_bits(cupy.asnumpy(norm), cupy.asnumpy(shared_norm), "norm")
        for i, (a, b) in enumerate(zip(out, shared)):
            _assert_same_bits(cupy.asnumpy(a), cupy.asnumpy(b), f"arrays[{i}]")
    finally:
        cupy.cuda.set_allocator(pool)


@gpu
def test_none_entries_shapes_and_identity(route):
    a = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    b = cupy.ones((2, 2, 2), dtype=cupy.float32)
    out, norm = ccp.clip_by_global_norm([None, a, None, b], 1.0)
    assert out[0] is None and out[2] is None
    assert out[1].shape == (3, 4) and out[3].shape == (2, 2, 2)
    assert out[1].data.ptr != a.data.ptr
    assert out[1].flags.c_contiguous and out[3].flags.c_contiguous
    out, _ = ccp.clip_by_global_norm([None, a, b], 1.0, in_place=True)
    assert out[1] is a and out[2] is b and out[0] is None


@gpu
def test_device_scalars(route):
    host = _host_list([5000, 17], ["float32", "float32"], seed=4)
    want, want_norm = ccp.clip_by_global_norm(_to_gpu(host), 1.5)
    for clip in (cupy.asarray(1.5), cupy.asarray(1.5, dtype=cupy.float16)):
        got, got_norm = ccp.clip_by_global_norm(_to_gpu(host), clip)
        _assert_same_bits(cupy.asnumpy(got_norm), cupy.asnumpy(want_norm))
        for g, w in zip(got, want):
            _assert_same_bits(cupy.asnumpy(g), cupy.asnumpy(w))
    # use_norm on the device replaces the norm, and is returned
    got, got_norm = ccp.clip_by_global_norm(_to_gpu(host), 1.5, use_norm=cupy.asarray(3.0))
    assert float(got_norm) == 3.0
    assert_close(cupy.asnumpy(got[0]), host[0].astype(np.float64) * 0.5, np.float32, "use_norm")
    with pytest.raises(TypeError, match="must be a float"):
        ccp.clip_by_global_norm(_to_gpu(host), cupy.asarray(2))


@gpu
def test_device_scalar_inside_an_in_place_array(route):
    """In place, clip_norm may be an element of a clipped array: it is copied
    before the kernel overwrites it."""
    x = cupy.full(4 * CHUNK, 2.0, dtype=cupy.float32)  # norm 2 * 256 = 512
    out, norm = ccp.clip_by_global_norm([x], x[0], in_place=True)  # clip 2
    assert float(norm) == 512.0
    assert bool((x == 2.0 * (2.0 / 512.0)).all())


@gpu
def test_non_contiguous(route):
    base = cupy.asarray(_host_list([64 * 48], ["float32"], seed=9)[0].reshape(64, 48))
    view = base.T
    out, norm = ccp.clip_by_global_norm([view], 1.0)
    want, want_norm = ccp.clip_by_global_norm([cupy.ascontiguousarray(view)], 1.0)
    _assert_same_bits(cupy.asnumpy(out[0]), cupy.asnumpy(want[0]))
    _assert_same_bits(cupy.asnumpy(norm), cupy.asnumpy(want_norm))
    with pytest.raises(ccp.UnsupportedArrayError, match="C-contiguous"):
        ccp.clip_by_global_norm([view], 1.0, in_place=True)


@gpu
def test_launch_failure_is_clear(monkeypatch):
    if NVRTC_SKIP:
        pytest.skip(NVRTC_SKIP)
    monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    x = cupy.ones(10**7, dtype=cupy.float32)
    kernel = _nvrtc.get_kernel(cupy.cuda.runtime.getDevice())
    monkeypatch.setattr(_nvrtc, "grid_size", lambda items, resident: resident + 1)
    with pytest.raises(ccp.LaunchError, match="resident") as info:
        ccp.global_norm([x])
    assert isinstance(info.value, RuntimeError)
    assert str(kernel.resident_blocks) in str(info.value)
    monkeypatch.undo()
    cupy.cuda.get_current_stream().synchronize()  # the device is still healthy


@gpu
def test_wrong_device():
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cupy.cuda.Device(1):
        x = cupy.ones(10, dtype=cupy.float32)
    with cupy.cuda.Device(0):
        with pytest.raises(ccp.UnsupportedArrayError, match="is on GPU 1"):
            ccp.global_norm([x])
    with cupy.cuda.Device(1):
        assert float(ccp.global_norm([x])) == pytest.approx(math.sqrt(10))


# ---- other frameworks, zero-copy ------------------------------------------------

@gpu
def test_torch_tensors_in_place_zero_copy(route):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    host = _host_list([1000, CHUNK + 3], ["float32", "float32"], seed=6)
    ts = [torch.from_numpy(h.copy()).cuda() for h in host]
    ptrs = [t.data_ptr() for t in ts]
    torch.cuda.synchronize()
    out, norm = ccp.clip_by_global_norm(ts, 1.0, in_place=True)
    cupy.cuda.get_current_stream().synchronize()
    assert out[0] is ts[0] and [t.data_ptr() for t in ts] == ptrs
    want, want_norm = cnp.clip_by_global_norm(host, 1.0)
    _assert_same_bits(cupy.asnumpy(norm), want_norm)
    for t, w in zip(ts, want):
        _assert_same_bits(t.cpu().numpy(), w)
    torch.cuda.empty_cache()


@gpu
def test_torch_bfloat16_via_dlpack(route):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    reason = _bf16_skip_reason()
    if reason:
        pytest.skip(reason)
    host = _host_list([777, CHUNK + 1], ["bfloat16", "bfloat16"], seed=8)
    ts = [torch.from_numpy(h.view(np.uint16).astype(np.int16)).cuda().view(torch.bfloat16)
          for h in host]
    torch.cuda.synchronize()
    _assert_gpu_clip_matches_cpu(ts, host)


@gpu
def test_jax_arrays(route):
    jax = pytest.importorskip("jax")
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("this JAX has no GPU backend")
    host = _host_list([300, CHUNK * 2], ["float32", "float32"], seed=10)
    xs = [jax.device_put(h, dev) for h in host]
    for x in xs:
        x.block_until_ready()
    _assert_gpu_clip_matches_cpu(xs, host)


# ---- more than 2^31 elements ----------------------------------------------------

_PATTERN = 2003  # x[i] = ((i % 2003) - 1001) / 2^14, exactly representable in float16


@gpu
@pytest.mark.slow
def test_tensor_of_more_than_2_pow_31_elements(route):
    """One float16 tensor of 2^31 + 3 chunks + 5 elements. With x as above,
    every square and every partial sum is exact in float, so the kernel's
    norm is exactly round(sqrt(exact sum)) and the outputs are exactly
    round(x * scale): any element the 32-bit index arithmetic loses shows."""
    n = 2**31 + 3 * CHUNK + 5
    free = cupy.cuda.runtime.memGetInfo()[0]
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    fill = cupy.ElementwiseKernel("", "T x", "x = (T)((float)((i % 2003) - 1001) * 6.103515625e-05f)",
                                  "clipops_test_pattern")
    x = cupy.empty(n, dtype=cupy.float16)
    fill(x)
    full, rem = divmod(n, _PATTERN)
    ks = np.arange(_PATTERN, dtype=np.int64) - 1001
    exact = (full * int((ks * ks).sum()) + int((ks[:rem] * ks[:rem]).sum())) / 2.0**28  # exact in double
    want_norm = np.float16(np.float32(math.sqrt(exact)))
    clip = 500.0
    out, norm = ccp.clip_by_global_norm([x], clip)
    assert cupy.asnumpy(norm).view(np.uint16) == np.asarray(want_norm).view(np.uint16)
    f32, f16 = np.float32, np.float16
    scale = f32(model_scale(want_norm, clip, f16))  # TF's formula in float16, as clip_math.h
    # x takes 2003 values, so the outputs do too: their exact bits, by NumPy
    values = ((np.arange(_PATTERN) - 1001).astype(np.float32) * f32(2.0**-14)).astype(f16)
    table = cupy.asarray((values.astype(f32) * scale).astype(f16).view(np.uint16))
    step = 1 << 26
    for start in range(0, n, step):
        stop = min(n, start + step)
        want = table[cupy.arange(start, stop, dtype=cupy.int64) % _PATTERN]
        bad = int((want != out[0][start:stop].view(cupy.uint16)).sum())
        assert bad == 0, f"{bad} wrong elements in [{start}, {stop})"
    del x, out, want
    cupy.get_default_memory_pool().free_all_blocks()
