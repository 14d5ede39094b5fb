"""The fused clip + optimizer update on the GPU front end: clipops.cupy's
sgd_update, adam_update and adamw_update, through both routes (the
nvcc-compiled launcher _core.update_cuda, and clipops._nvrtc.update_cuda).

Three kinds:
  - without a GPU: argument checks (made before any device call), the errors
    that name the caller's lists, what each route receives, the NVRTC route's
    launch (tables, kernel parameters, grid, stream) decoded against
    clipops._optim's mirrors of the C++ structs, the kernel's signature in the
    program that CUDA 13's and CUDA 12's NVRTC build, and bench/gpu.py's
    optimizer rows on a fabricated payload;
  - without a GPU, on the CUDA emulation: the front end end to end, with the
    compiled route's launcher being the same C++ launcher built against the
    emulation's fake runtime (clipops._emulation): bit for bit clipops.numpy and
    the CPU kernel, the device learning rate and step counter, the policies;
  - GPU tests, marked `gpu` and skipped with the reason where there is no GPU:
    both routes on a device against clipops.numpy (bit for bit) and float64,
    device scalars over several steps with no host sync, torch tensors.

On a GPU machine, after `pip install --no-deps --no-build-isolation .`:
    pytest -m gpu tests/test_cupy_optim.py
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import BF16, CHUNK, random_array
from cupy_helpers import (HAVE_GPU, cupy, gpu, needs_cupy, nvrtc_skip_reason,
                          record_table_copies, spin)

if cupy is not None:
    import clipops.cupy as ccp
    import clipops.numpy as cnp
    from clipops import _common, _nvrtc, _optim
else:
    ccp = cnp = _common = _nvrtc = _optim = None


def _core():
    return _common.load_core()


GRAD_DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else [])
# Keras' argument names; "nesterov" and "adamw" decay with exclusions (decay_mask)
RULES = {
    "sgd": ("sgd", dict(learning_rate=0.05)),
    "momentum": ("sgd", dict(learning_rate=0.05, momentum=0.9)),
    "nesterov": ("sgd", dict(learning_rate=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    "adam": ("adam", dict(learning_rate=3e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7)),
    "adamw": ("adamw", dict(learning_rate=3e-3, weight_decay=0.02, beta_1=0.85, beta_2=0.99,
                            epsilon=1e-6)),
}
CLIPS = {"global_norm": ("global_clipnorm", 1.5), "norm": ("clipnorm", 0.7),
         "value": ("clipvalue", 0.3), "none": (None, None)}


def _has_m(rule):
    fn, kw = RULES[rule]
    return fn != "sgd" or kw.get("momentum", 0) != 0


def _call(mod, rule, params, grads, ms, vs, step=None, clip="global_norm", mask=True, **extra):
    """mod's (clipops.numpy or clipops.cupy) update for `rule`; returns its result."""
    fn, kw = RULES[rule]
    kw = dict(kw, **extra)
    name, value = CLIPS[clip]
    if name is not None:
        kw[name] = value
    if "weight_decay" in kw and mask:
        kw["decay_mask"] = [i % 3 != 1 for i in range(len(params))]
    if fn == "sgd":
        return mod.sgd_update(params, grads, ms, **kw)
    return getattr(mod, f"{fn}_update")(params, grads, ms, vs, step=step, **kw)


def _problem(rng, rule, sizes, dtypes=(np.float32,), scale16=0.05):
    """Fresh float32 variables, gradients of `dtypes` (in turn) and the rule's state."""
    params = [random_array(rng, (n,), np.float32) for n in sizes]
    grads = [random_array(rng, (n,), dtypes[i % len(dtypes)],
                          scale16 if np.dtype(dtypes[i % len(dtypes)]).itemsize == 2 else 1.0)
             for i, n in enumerate(sizes)]
    ms = [random_array(rng, (n,), np.float32, 0.1) for n in sizes] if _has_m(rule) else None
    vs = ([np.abs(random_array(rng, (n,), np.float32, 0.01)) for n in sizes]
          if RULES[rule][0] != "sgd" else None)
    return params, grads, ms, vs


def _copies(arrays):
    return None if arrays is None else [None if a is None else np.array(a) for a in arrays]


# =================================================================================================
# Without a GPU: stand-ins for device arrays
# =================================================================================================

class FakeDeviceArray:
    """What clipops.cupy reads of a GPU array, at a made-up address."""

    def __init__(self, n=4, dtype="float32", ptr=1 << 20, device=0, contiguous=True, shape=None):
        self.dtype = np.dtype(dtype)
        self.shape = (n,) if shape is None else tuple(shape)
        self.size = math.prod(self.shape)
        self.ndim = len(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.data = SimpleNamespace(ptr=ptr, device_id=device)

    @property
    def __cuda_array_interface__(self):  # so that the front end takes it for a GPU array
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False),
                "version": 3}

    def astype(self, dtype, copy=True):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return FakeDeviceArray(shape=self.shape, dtype=dtype, ptr=self.data.ptr + (1 << 36))


class _Addresses:
    """Distinct, 256-byte aligned made-up addresses."""

    def __init__(self, start: int = 1 << 32):
        self.next = start

    def __call__(self, nbytes: int) -> int:
        ptr = self.next
        self.next += (nbytes + 4096) // 256 * 256 + 256
        return ptr


def _fake_list(sizes, dtype="float32", addr=None):
    addr = addr or _Addresses()
    return [FakeDeviceArray(n, dtype, ptr=addr(n * np.dtype(dtype).itemsize)) for n in sizes]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Device 0 is current and FakeDeviceArray passes as a converted array: the
    front end runs down to its first allocation on the CPU."""
    monkeypatch.setattr(ccp, "_current_device", lambda: 0)
    real = ccp._as_device_array
    monkeypatch.setattr(ccp, "_as_device_array",
                        lambda x, what: x if isinstance(x, FakeDeviceArray) else real(x, what))


@pytest.fixture
def fake_alloc(fake_gpu, monkeypatch):
    """cupy.empty / cupy.zeros give FakeDeviceArrays at fresh addresses; the
    current stream is 0xABC. Returns the list of allocations made."""
    addr, made = _Addresses(1 << 46), []  # away from the inputs' addresses

    def empty(shape, dtype=np.float64):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        a = FakeDeviceArray(shape=shape, dtype=dtype,
                            ptr=addr(math.prod(shape) * np.dtype(dtype).itemsize))
        made.append(a)
        return a

    monkeypatch.setattr(cupy, "empty", empty)
    monkeypatch.setattr(cupy, "zeros", empty)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: SimpleNamespace(ptr=0xABC))
    return made


def _adamw_fakes(sizes=(5, CHUNK + 1), grad_dtype="float32"):
    addr = _Addresses()
    return (_fake_list(sizes, addr=addr), _fake_list(sizes, grad_dtype, addr=addr),
            _fake_list(sizes, addr=addr), _fake_list(sizes, addr=addr))


# ---- imports and the public names ---------------------------------------------------------------

@needs_cupy
def test_public_names_and_docstrings():
    for name in ("sgd_update", "adam_update", "adamw_update"):
        assert name in ccp.__all__
        doc = getattr(ccp, name).__doc__
        assert "Args:" in doc and "Returns:" in doc and "Raises:" in doc
        assert "DLPack" in doc
    assert "step counter on the GPU" in ccp.adam_update.__doc__


# ---- host checks: made before any device call ---------------------------------------------------

def _bad_host_calls():
    p, g, m, v = _adamw_fakes()
    adamw = lambda **k: ccp.adamw_update(p, g, m, v, **{"step": 1, **k})  # noqa: E731
    adam = lambda **k: ccp.adam_update(p, g, m, v, **{"step": 1, **k})  # noqa: E731
    sgd = lambda *a, **k: ccp.sgd_update(p, g, *a, **k)  # noqa: E731
    return [
        ("nonfinite", lambda: adamw(nonfinite="ignore"), ValueError, "nonfinite must be one of"),
        ("params not a list", lambda: ccp.adamw_update(p[0], g, m, v, step=1), TypeError,
         "`params` should be a sequence"),
        ("grads length", lambda: ccp.adamw_update(p, g[:1], m, v, step=1), ValueError,
         "grads has 1 entries for 2 params"),
        ("velocities length", lambda: ccp.adamw_update(p, g, m, v + v, step=1), ValueError,
         "velocities has 4 entries for 2 params"),
        ("two clips", lambda: adamw(clipnorm=1.0, global_clipnorm=1.0), ValueError,
         "Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"),
        ("infinite clip", lambda: adamw(global_clipnorm=math.inf), ValueError,
         "global_clipnorm must be finite"),
        ("clip not a scalar", lambda: adamw(clipvalue=np.ones(2)), ValueError,
         "clipvalue must be a scalar"),
        ("unscale with clipnorm", lambda: adamw(clipnorm=1.0, unscale=0.5), ValueError,
         "unscale goes with global_clipnorm or no clip"),
        ("unscale 0", lambda: adamw(global_clipnorm=1.0, unscale=0.0), ValueError,
         "unscale must be a finite number > 0"),
        ("mask without decay", lambda: adam(decay_mask=[True, True]), ValueError,
         "decay_mask is given, but weight_decay is None"),
        ("mask length", lambda: adamw(decay_mask=[True]), ValueError,
         "decay_mask has 1 entries for 2 variables"),
        ("mask entries", lambda: adamw(decay_mask=[1, 0]), TypeError,
         r"decay_mask\[0\] must be a bool"),
        ("lr a string", lambda: adamw(learning_rate="0.1"), TypeError,
         "learning_rate must be a number"),
        ("lr an array", lambda: adamw(learning_rate=np.ones(2)), ValueError,
         "learning_rate must be a scalar"),
        ("lr a device vector", lambda: adamw(learning_rate=FakeDeviceArray(2)), ValueError,
         "learning_rate must be a scalar"),
        ("step 0", lambda: adamw(step=0), ValueError, r"step must be >= 1 \(the first update"),
        ("step a float", lambda: adamw(step=1.0), TypeError, "step must be an int .* or a "
         "one-element int64 GPU array"),
        ("step a bool", lambda: adamw(step=True), TypeError, "step must be an int"),
        ("step None", lambda: adamw(step=None), TypeError, "step must be an int"),
        ("step a host array", lambda: adamw(step=np.zeros((), np.int64)), TypeError,
         "step must be an int"),
        ("beta_1 a string", lambda: adamw(beta_1="0.9"), TypeError, "beta_1 must be a number"),
        ("epsilon an array", lambda: adamw(epsilon=np.ones(3)), ValueError,
         "epsilon must be a scalar"),
        ("momentum without momentums", lambda: sgd(momentum=0.9), ValueError,
         "momentum is not 0: pass momentums"),
        ("momentums without momentum", lambda: sgd(m), ValueError,
         "momentums are given, but momentum is 0"),
        ("adam without velocities", lambda: ccp.adam_update(p, g, m, None, step=1), ValueError,
         "Adam needs momentums and velocities"),
        ("adamw without decay", lambda: adamw(weight_decay=None), ValueError,
         "weight_decay must be a number for AdamW"),
    ]


@needs_cupy
@pytest.mark.parametrize("case", range(len(_bad_host_calls())),
                         ids=[c[0] for c in _bad_host_calls()] if cupy is not None else None)
def test_bad_arguments_are_refused_before_any_device_call(case, monkeypatch):
    """The same error with or without a GPU: the device is never asked."""
    def device_call():
        raise AssertionError("the device was queried before the arguments were checked")

    monkeypatch.setattr(ccp, "_current_device", device_call)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", device_call)
    _, call, error, message = _bad_host_calls()[case]
    with pytest.raises(error, match=message):
        call()


@needs_cupy
@pytest.mark.skipif(HAVE_GPU, reason="a GPU is usable here; the no-GPU error cannot occur")
@pytest.mark.parametrize("name", ["sgd_update", "adam_update", "adamw_update"])
def test_no_gpu_gives_clear_error(name):
    """CuPy installed, no driver or device: the front end's error, naming why,
    also for a list with no tensors (its norm and step still live on a device)."""
    args = {"sgd_update": ([], []), "adam_update": ([], [], [], []),
            "adamw_update": ([], [], [], [])}[name]
    kw = {} if name == "sgd_update" else {"step": 1}
    for lists in (args, tuple([np.ones(3, np.float32)] for _ in args)):
        with pytest.raises(ccp.CudaUnavailableError, match="needs an NVIDIA GPU") as info:
            getattr(ccp, name)(*lists, **kw)
        assert isinstance(info.value, RuntimeError)
        assert isinstance(info.value.__cause__, cupy.cuda.runtime.CUDARuntimeError)


# ---- array checks (stand-in device arrays) ----------------------------------------------------

def _bad_array_calls():
    def adamw(p=None, g=None, m=None, v=None, **k):
        P, G, M, V = _adamw_fakes()
        return lambda: ccp.adamw_update(p or P, g or G, m or M, v or V, **{"step": 1, **k})

    a = _Addresses()
    at = lambda n=5, dt="float32", **k: FakeDeviceArray(n, dt, ptr=a(64 * n), **k)  # noqa: E731
    P, G, M, V = _adamw_fakes()
    return [
        ("float16 variable", adamw(p=[at(5, "float16"), P[1]]), TypeError,
         r"params\[0\] has dtype float16; variables and optimizer state are float32"),
        ("float64 gradient", adamw(g=[G[0], at(CHUNK + 1, "float64")]), TypeError,
         r"grads\[1\] has dtype float64; gradients of float32 variables are float32, float16"),
        ("int gradient", adamw(g=[at(5, "int32"), G[1]]), TypeError, r"grads\[0\] has dtype int32"),
        ("gradient shape", adamw(g=[at(6), G[1]]), ValueError,
         r"grads\[0\] has shape \(6,\), but its variable has shape \(5,\)"),
        ("velocity shape", adamw(v=[V[0], at(3)]), ValueError,
         r"velocities\[1\] has shape \(3,\), but params\[1\] has \(16385,\)"),
        ("float16 momentum", adamw(m=[at(5, "float16"), M[1]]), TypeError,
         r"momentums\[0\] has dtype float16"),
        ("variable not contiguous", adamw(p=[at(5, contiguous=False), P[1]]),
         ccp.UnsupportedArrayError, r"params\[0\] is not C-contiguous; the update writes it"),
        ("state not contiguous", adamw(v=[V[0], at(CHUNK + 1, contiguous=False)]),
         ccp.UnsupportedArrayError, r"velocities\[1\] is not C-contiguous"),
        ("state on another GPU", adamw(m=[at(5, device=1), M[1]]), ccp.UnsupportedArrayError,
         r"momentums\[0\] is on GPU 1 but the current device is GPU 0"),
        ("misaligned variable", adamw(p=[FakeDeviceArray(5, ptr=(1 << 40) + 2), P[1]]),
         ccp.UnsupportedArrayError, r"params\[0\] is not aligned to its 4-byte elements"),
        ("host variable", adamw(p=[np.ones(5, np.float32), P[1]]), TypeError,
         r"params\[0\] is a host array"),
        ("missing state", adamw(m=[None, M[1]]), TypeError, r"momentums\[0\] is a NoneType"),
        ("counter int32", adamw(step=at(1, "int32", shape=())), TypeError,
         "step, a GPU step counter, has dtype int32; it must be int64"),
        ("counter of 2", adamw(step=at(2, "int64")), ValueError,
         r"step, a GPU step counter, must hold one element; got shape \(2,\)"),
        ("counter on another GPU", adamw(step=at(1, "int64", shape=(), device=1)),
         ccp.UnsupportedArrayError, "step is on GPU 1"),
        ("lr an int array", adamw(learning_rate=at(1, "int32", shape=())), TypeError,
         "learning_rate must be a float, got a int32 array"),
        ("unscale an int array", adamw(global_clipnorm=1.0, unscale=at(1, "int64", shape=())),
         TypeError, "unscale must be a float"),
    ]


@needs_cupy  # without CuPy: one case, skipped (the table needs clipops.cupy to be built)
@pytest.mark.parametrize("case", range(len(_bad_array_calls())) if cupy is not None else [0],
                         ids=[c[0] for c in _bad_array_calls()] if cupy is not None else None)
def test_bad_arrays_are_refused_before_anything_is_queued(case, fake_alloc):
    _, call, error, message = _bad_array_calls()[case]
    with pytest.raises(error, match=message):
        call()
    assert fake_alloc == [], "allocated before every array was checked"


# ---- what reaches each route --------------------------------------------------------------------

_ARGS_FIELDS = sorted(n for n in dir(_common.load_core().UpdateArgs) if not n.startswith("_")) \
    if cupy is not None else []


def _snapshot(args) -> dict:
    return {n: getattr(args, n) for n in _ARGS_FIELDS}


class _Calls(list):
    """The recorded launches, and the allocations made (`allocations`)."""


@pytest.fixture
def recorded(fake_alloc, monkeypatch):
    """Both routes' launchers replaced by recorders of (route, descs, UpdateArgs
    fields, workspace, workspace bytes, stream)."""
    calls = _Calls()

    def recorder(who):
        def launch(*a, **k):
            assert not k, f"keywords reached the {who} launcher: {sorted(k)}"
            descs, args, ws, nbytes, stream = a
            calls.append(SimpleNamespace(who=who, descs=descs, args=_snapshot(args), ws=ws,
                                         nbytes=nbytes, stream=stream))
        return launch

    monkeypatch.setattr(_core(), "update_cuda", recorder("core"))
    monkeypatch.setattr(_nvrtc, "update_cuda", recorder("nvrtc"))
    calls.allocations = fake_alloc
    return calls


@pytest.fixture
def route_env(request, monkeypatch):
    force = request.param
    if force:
        monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    else:
        monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    return "nvrtc" if force or not _core().cuda_compiled() else "core"


@needs_cupy
@pytest.mark.parametrize("route_env", [False, True], indirect=True, ids=["default", "forced-nvrtc"])
def test_launch_arguments_with_host_scalars(recorded, route_env):
    """AdamW, a global clip, an int step: the host values as Keras converts
    them (and as clipops.numpy passes them to the CPU kernel)."""
    core = _core()
    p, g, m, v = _adamw_fakes(grad_dtype="float16")
    g[1] = None  # no gradient: the variable is left out
    norm = ccp.adamw_update(p, g, m, v, step=7, learning_rate=3e-3, weight_decay=0.02,
                            beta_1=0.85, beta_2=0.99, epsilon=1e-6, decay_mask=[False, True],
                            global_clipnorm=0.1, unscale=2.0 ** -10)
    (call,) = recorded
    assert call.who == route_env and call.stream == 0xABC
    assert call.descs == [(p[0].data.ptr, g[0].data.ptr, 0, m[0].data.ptr, v[0].data.ptr, 5, False)]
    a = call.args
    assert a["rule"] == core.UPDATE_RULES["adam"] and a["clip_mode"] == core.UPDATE_CLIPS["global_norm"]
    assert a["norm_dtype"] == 0 and norm.dtype == np.float16  # the gradients' dtype
    assert a["clip"] == float(np.float16(0.1)) and a["clip_ptr"] == 0  # rounded to the norm dtype
    assert a["unscale"] == 2.0 ** -10 and a["unscale_ptr"] == 0
    assert a["learning_rate"] == float(np.float32(3e-3)) and a["learning_rate_ptr"] == 0
    assert a["weight_decay"] == float(np.float32(0.02))
    assert a["one_minus_beta_1"] == float(np.float32(1 - 0.85))  # in double, then float32
    assert a["one_minus_beta_2"] == float(np.float32(1 - 0.99))
    assert a["epsilon"] == float(np.float32(1e-6))
    assert a["power_source"] == core.POWER_SOURCES["given"]
    assert a["beta_1_power"] == core.keras_cpu_power(float(np.float32(0.85)), 7)
    assert a["beta_2_power"] == core.keras_cpu_power(float(np.float32(0.99)), 7)
    assert a["iterations"] == 6 and a["iterations_ptr"] == 0 and not a["increment_iterations"]
    assert a["norm_out"] == norm.data.ptr and a["tensor_norms"] == 0
    assert not a["skip_nonfinite"] and a["check_overlap"]
    assert call.nbytes == core.update_cuda_workspace_bytes(call.descs)
    assert call.ws == recorded.allocations[-1].data.ptr and call.ws % 16 == 0


@needs_cupy
@pytest.mark.parametrize("route_env", [False, True], indirect=True, ids=["default", "forced-nvrtc"])
def test_launch_arguments_with_device_scalars(recorded, route_env):
    """A device step counter (powers from the step, advanced by the kernel), a
    device learning rate, a device unscale, norms wanted, 'skip'."""
    core = _core()
    p, g, m, v = _adamw_fakes()
    counter = FakeDeviceArray(shape=(), dtype="int64", ptr=1 << 44)
    lr = FakeDeviceArray(shape=(), dtype="float32", ptr=(1 << 44) + 4096)
    lr64 = FakeDeviceArray(shape=(), dtype="float64", ptr=(1 << 44) + 8192)
    u = FakeDeviceArray(shape=(), dtype="float32", ptr=(1 << 44) + 12288)
    norm, norms = ccp.adam_update(p, g, m, v, step=counter, learning_rate=lr, unscale=u,
                                  nonfinite="skip", return_norms=True)
    (call,) = recorded
    a = call.args
    assert call.who == route_env
    assert a["power_source"] == core.POWER_SOURCES["from_step"]
    assert a["iterations_ptr"] == counter.data.ptr and a["increment_iterations"]
    assert a["beta_1"] == float(np.float32(0.9)) and a["beta_2"] == float(np.float32(0.999))
    assert a["learning_rate_ptr"] == lr.data.ptr  # float32 already: read in place, no cast
    assert a["unscale_ptr"] == u.data.ptr
    assert a["clip_mode"] == core.UPDATE_CLIPS["none"] and a["skip_nonfinite"]
    assert a["tensor_norms"] == norms.data.ptr and norms.shape == (2,)
    assert a["weight_decay"] == 0.0 and all(d[6] is False for d in call.descs)
    recorded.clear()
    ccp.adam_update(p, g, m, v, step=counter, learning_rate=lr64)
    (call,) = recorded
    cast = call.args["learning_rate_ptr"]
    assert cast not in (0, lr64.data.ptr)  # a float32 copy, made on the stream


@needs_cupy
def test_launch_arguments_of_sgd_and_the_clips(recorded):
    core = _core()
    p, g, m, _ = _adamw_fakes()
    ccp.sgd_update(p, g, m, learning_rate=0.05, momentum=0.9, nesterov=True, clipvalue=0.25,
                   weight_decay=0.01)
    ccp.sgd_update(p, g, learning_rate=0.05, clipnorm=0.5)
    ccp.sgd_update(p, g, learning_rate=0.05)
    (a, b, c) = (r.args for r in recorded)
    assert a["rule"] == core.UPDATE_RULES["sgd"] and a["momentum"] == float(np.float32(0.9))
    assert a["nesterov"] and a["clip_mode"] == core.UPDATE_CLIPS["value"] and a["clip"] == 0.25
    assert [d[3] != 0 for d in recorded[0].descs] == [True, True]  # momentums
    assert [d[4] for d in recorded[0].descs] == [0, 0] and [d[6] for d in recorded[0].descs] == [True] * 2
    assert b["clip_mode"] == core.UPDATE_CLIPS["norm"] and b["clip"] == 0.5
    assert [d[3] for d in recorded[1].descs] == [0, 0]
    assert c["clip_mode"] == core.UPDATE_CLIPS["none"] and c["iterations_ptr"] == 0


@needs_cupy
@pytest.mark.parametrize("lists", [([], [], [], []), ([None], [None], [None], [None])])
def test_a_list_without_gradients_still_launches_once(recorded, lists):
    """The step still counts (the kernel writes the norm 0.0 and advances the
    counter): one launch for any number of tensors, none included."""
    counter = FakeDeviceArray(shape=(), dtype="int64", ptr=1 << 44)
    norm = ccp.adamw_update(*lists, step=counter, global_clipnorm=1.0)
    (call,) = recorded
    assert call.descs == [] and norm.dtype == np.float32
    assert call.args["iterations_ptr"] == counter.data.ptr


@needs_cupy
@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_compiled_route_errors(recorded, monkeypatch, error):
    """A refusal by the core's checks is a ValueError naming the caller's lists;
    a CUDA failure is a LaunchError."""
    monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    monkeypatch.setattr(_core(), "cuda_compiled", lambda: True)

    def fail(*a):
        raise error("tensor 1's m and tensor 0's param share memory that the update writes"
                    if error is ValueError else "launching the update kernel: too many blocks")

    monkeypatch.setattr(_core(), "update_cuda", fail)
    p, g, m, v = _adamw_fakes()
    if error is ValueError:
        with pytest.raises(ValueError, match=r"^momentums\[1\] and params\[0\] share memory"):
            ccp.adamw_update(p, g, m, v, step=1)
    else:
        with pytest.raises(ccp.LaunchError, match="update kernel could not run.*too many"):
            ccp.adamw_update(p, g, m, v, step=1)


# ---- the core's checks on both routes (real validation, made-up addresses) --------------------

@pytest.fixture
def validating(fake_alloc, monkeypatch):
    """The real checks of both routes (validate_update in _core.update_cuda and
    in _core.update_launch_layout); whatever passes them is stopped right after,
    before anything is queued."""
    passed = []

    class Passed(Exception):
        pass

    def stop(device):
        passed.append(device)
        raise Passed

    monkeypatch.setattr(_nvrtc, "get_update_kernel", stop)
    monkeypatch.setattr(_nvrtc.runtime, "getDevice", lambda: 0)
    monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    return SimpleNamespace(passed=passed, Passed=Passed)


def _shared(kind):
    """A list where two buffers share memory (kind) and the message's names."""
    p, g, m, v = _adamw_fakes()
    kw = {"step": 1}
    if kind == "m is p":
        m[0] = p[0]
        return (p, g, m, v, kw), r"params\[0\]", r"momentums\[0\]"
    if kind == "grad inside a variable":  # read while the variable is written
        g[1] = FakeDeviceArray(CHUNK + 1, ptr=p[1].data.ptr + 8)
        return (p, g, m, v, kw), r"params\[1\]", r"grads\[1\]"
    if kind == "lr inside a velocity":
        kw["learning_rate"] = FakeDeviceArray(shape=(), ptr=v[1].data.ptr + 400)
        return (p, g, m, v, kw), "learning_rate", r"velocities\[1\]"
    if kind == "counter inside a variable":
        kw["step"] = FakeDeviceArray(shape=(), dtype="int64", ptr=p[1].data.ptr + 8)
        return (p, g, m, v, kw), "step", r"params\[1\]"
    raise AssertionError(kind)


@needs_cupy
@pytest.mark.parametrize("forced", [False, True], ids=["compiled", "nvrtc"])
@pytest.mark.parametrize("kind", ["m is p", "grad inside a variable", "lr inside a velocity",
                                  "counter inside a variable"])
def test_shared_memory_is_refused_naming_both(validating, monkeypatch, kind, forced):
    if not forced:
        if not _core().cuda_compiled():
            pytest.skip("this build has no nvcc-compiled CUDA kernel")
        monkeypatch.delenv("CLIPOPS_FORCE_NVRTC")
    (p, g, m, v, kw), one, other = _shared(kind)
    with pytest.raises(ValueError, match="share memory that the update writes") as info:
        ccp.adamw_update(p, g, m, v, **kw)
    msg = str(info.value)
    assert re.search(rf"^({one} and {other}|{other} and {one}) share", msg), msg
    assert "tensor " not in msg and "iterations" not in msg  # the caller's names only
    assert validating.passed == []


@needs_cupy
def test_a_gradient_shared_by_two_variables_passes_the_checks(validating):
    """Gradients are only read: two variables may take the same one."""
    p, g, m, v = _adamw_fakes(sizes=(5, 5))
    with pytest.raises(validating.Passed):
        ccp.adamw_update(p, [g[0], g[0]], m, v, step=1)
    assert validating.passed == [0]


# ---- the NVRTC route's launch, decoded --------------------------------------------------------

@pytest.fixture
def nvrtc_launch(monkeypatch):
    """_nvrtc.update_cuda with the device calls recorded: the table copy as
    bytes, the launch with its kernel parameters read as the kernel declares
    them (5 scalars, then the UpdateParams struct by value)."""
    rec = SimpleNamespace(copies=[], launches=[])
    kernel = _nvrtc.Kernel(module=None, function=SimpleNamespace(ptr=0xF00), resident_blocks=264,
                           num_regs=128)
    monkeypatch.setattr(_nvrtc, "get_update_kernel", lambda device: kernel)
    monkeypatch.setattr(_nvrtc.runtime, "getDevice", lambda: 0)
    record_table_copies(monkeypatch, rec.copies)
    c = ctypes
    scalars = [c.c_uint64, c.c_uint64, c.c_int, c.c_longlong, c.c_uint64]

    def launch(f, gx, gy, gz, bx, by, bz, smem, stream, params):
        p = (c.c_void_p * 6).from_address(params)
        values = [t.from_address(p[k]).value for k, t in enumerate(scalars)]
        values.append(ctypes.string_at(p[5], _optim.UPDATE_PARAMS.itemsize))
        rec.launches.append(SimpleNamespace(f=f, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem,
                                            stream=stream, values=values))

    monkeypatch.setattr(_nvrtc.driver, "launchCooperativeKernel", launch)
    return rec


def _align16(n):
    return (n + 15) // 16 * 16


def _descs(sizes, codes, momentum=True, velocity=True):
    base = 0x7F00_0000_0000
    return [(base + (4 * i + 0 << 24), base + (4 * i + 1 << 24), codes[i % len(codes)],
             base + (4 * i + 2 << 24) if momentum else 0, base + (4 * i + 3 << 24) if velocity else 0,
             n, i % 3 != 1) for i, n in enumerate(sizes)]


def _adam_args(core, **over):
    a = _optim.update_args(core, rule="adam", clip_mode="global_norm", clip_value=1.25,
                           norm_code=2, unscale=0.5, skip=True, learning_rate=3e-3,
                           weight_decay=0.02, beta_1=0.85, beta_2=0.99, epsilon=1e-6, step=9)
    for k, val in over.items():
        setattr(a, k, val)
    return a


@needs_cupy
@pytest.mark.parametrize("sizes, grid", [([5, CHUNK + 1, 0, 2 * CHUNK], 5), ([0], 1), ([], 1),
                                         ([CHUNK] * 1000, 264)])
def test_nvrtc_update_launch_marshalling(nvrtc_launch, sizes, grid):
    """The table image, the kernel's parameters and the grid: decoded with
    clipops._optim's NumPy mirrors of StateEntry and UpdateParams and
    _nvrtc.TENSOR_ENTRY (tests/test_emulation_optim.py checks those mirrors
    against the C++ layouts), against values computed here from the inputs."""
    core = _core()
    descs = _descs(sizes, [2, 0, 1])
    a = _adam_args(core, norm_out=0xA000, tensor_norms=0xB000, iterations_ptr=0xC000,
                   increment_iterations=True, learning_rate_ptr=0xD000,
                   power_source=core.POWER_SOURCES["from_step"])
    ws_bytes = _nvrtc.update_cuda_workspace_bytes(descs)
    ws = 1 << 40
    _nvrtc.update_cuda(descs, a, ws, ws_bytes, 0x5)

    n = len(sizes)
    chunks = [-(-s // CHUNK) for s in sizes]
    items = sum(chunks)
    states_at = _align16(40 * n)
    partials_at = states_at + _align16(32 * n)
    assert ws_bytes == max(16, partials_at + 8 * (items + n))
    if n:
        (dst, image, kind, stream), = nvrtc_launch.copies
        assert (dst, kind, stream) == (ws, cupy.cuda.runtime.memcpyHostToDevice, 5)
        grads = np.frombuffer(image[:40 * n], _nvrtc.TENSOR_ENTRY)
        states = np.frombuffer(image[states_at:states_at + 32 * n], _optim.STATE_ENTRY)
        assert len(image) == states_at + 32 * n and not any(image[40 * n:states_at])
        assert grads["in"].tolist() == [d[1] for d in descs] and not grads["out"].any()
        assert grads["numel"].tolist() == sizes and grads["dtype"].tolist() == [d[2] for d in descs]
        assert grads["first_item"].tolist() == [sum(chunks[:i]) for i in range(n)]
        assert states["param"].tolist() == [d[0] for d in descs]
        assert states["m"].tolist() == [d[3] for d in descs]
        assert states["v"].tolist() == [d[4] for d in descs]
        assert states["decay"].tolist() == [int(d[6]) for d in descs] and not states["pad"].any()
    else:
        assert nvrtc_launch.copies == []  # nothing to copy: the kernel reads no table
    (launch,) = nvrtc_launch.launches
    assert launch.f == 0xF00 and launch.grid == (grid, 1, 1) and launch.stream == 5
    assert launch.block == (int(core.THREADS), 1, 1) and launch.smem == 0
    assert launch.values[:5] == [ws, ws + states_at, n, items, ws + partials_at]
    (kp,) = np.frombuffer(launch.values[5], _optim.UPDATE_PARAMS)
    want = dict(clip_ptr=0, unscale_ptr=0, lr_ptr=0xD000, beta_1_power_ptr=0, beta_2_power_ptr=0,
                iterations_ptr=0xC000, norm_out=0xA000, tensor_norms=0xB000,
                clip_value=1.25, unscale_value=0.5, lr_value=float(np.float32(3e-3)),
                beta_1_power_value=core.keras_cpu_power(float(np.float32(0.85)), 9),
                beta_2_power_value=core.keras_cpu_power(float(np.float32(0.99)), 9),
                iterations_value=8, momentum=0.0, one_minus_beta_1=np.float32(1 - 0.85),
                one_minus_beta_2=np.float32(1 - 0.99), epsilon=np.float32(1e-6),
                weight_decay=np.float32(0.02), beta_1=np.float32(0.85), beta_2=np.float32(0.99),
                pad_f=0.0, rule=core.UPDATE_RULES["adam"], clip_mode=core.UPDATE_CLIPS["global_norm"],
                norm_dtype=2, skip_nonfinite=1, nesterov=0, power_source=core.POWER_SOURCES["from_step"],
                increment_iterations=1, has_momentum=0)
    assert set(want) == set(_optim.UPDATE_PARAMS.names)
    for name, value in want.items():
        assert kp[name] == value, name
    assert len(_nvrtc._in_flight) == (1 if n else 0)  # the pinned source lives until its copy ran


@needs_cupy
def test_nvrtc_update_params_derived_fields(nvrtc_launch):
    """SGD with momentum: has_momentum; a counter without increment stays put;
    an increment is dropped without a counter (the core's rule)."""
    core = _core()
    a = _optim.update_args(core, rule="sgd", clip_mode="value", clip_value=0.5, norm_code=0,
                           unscale=1.0, skip=False, learning_rate=0.05, momentum=0.9,
                           nesterov=True)
    a.iterations_ptr = 0xC000
    descs = _descs([7], [0], velocity=False)
    _nvrtc.update_cuda(descs, a, 1 << 40, _nvrtc.update_cuda_workspace_bytes(descs), 0)
    (kp,) = np.frombuffer(nvrtc_launch.launches[-1].values[5], _optim.UPDATE_PARAMS)
    assert (kp["rule"], kp["has_momentum"], kp["nesterov"]) == (core.UPDATE_RULES["sgd"], 1, 1)
    assert (kp["clip_mode"], kp["clip_value"], kp["norm_dtype"]) == (core.UPDATE_CLIPS["value"], 0.5, 0)
    assert kp["momentum"] == np.float32(0.9) and kp["increment_iterations"] == 0
    assert kp["iterations_ptr"] == 0xC000


@needs_cupy
def test_nvrtc_update_refusals(nvrtc_launch):
    core = _core()
    descs = _descs([100, 5], [2])
    a = _adam_args(core)
    n = _nvrtc.update_cuda_workspace_bytes(descs)
    with pytest.raises(ValueError, match="smaller than update_cuda_workspace_bytes"):
        _nvrtc.update_cuda(descs, a, 1 << 40, n - 1, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _nvrtc.update_cuda(descs, a, (1 << 40) + 8, n, 0)
    bad = [descs[0], descs[0]]  # the same variable twice
    with pytest.raises(ValueError, match="tensor [01]'s (param|grad|m|v) and tensor [01]'s "
                                         "(param|grad|m|v) share memory"):
        _nvrtc.update_cuda(bad, a, 1 << 40, n, 0)
    missing_v = [d[:4] + (0,) + d[5:] for d in descs]
    with pytest.raises(ValueError, match="tensor 0: v .* is missing"):
        _nvrtc.update_cuda(missing_v, a, 1 << 40, n, 0)
    assert nvrtc_launch.copies == [] and nvrtc_launch.launches == []


@needs_cupy
def test_nvrtc_update_launch_failure_is_clear(nvrtc_launch, monkeypatch):
    def fail(*args):
        raise cupy.cuda.driver.CUDADriverError.__new__(cupy.cuda.driver.CUDADriverError)

    monkeypatch.setattr(_nvrtc.driver, "launchCooperativeKernel", fail)
    descs = _descs([10 ** 6], [2])
    with pytest.raises(ccp.LaunchError, match=r"update kernel \(62 blocks of 256 threads, 264 "
                                              r"resident at most\)"):
        _nvrtc.update_cuda(descs, _adam_args(_core()), 1 << 40,
                           _nvrtc.update_cuda_workspace_bytes(descs), 0)


@needs_cupy
def test_nvrtc_update_kernel_comes_from_the_clip_kernel_s_module(monkeypatch):
    """One program, one compilation, one module per device: the update kernel
    is looked up by _core.UPDATE_KERNEL_NAME in the clip kernel's module, and
    gets a grid limit of its own (its occupancy, not the clip kernel's)."""
    looked_up = []

    class Module:
        def get_function(self, name):
            looked_up.append(name)
            return SimpleNamespace(ptr=0xF00D)

    clip = _nvrtc.Kernel(module=Module(), function=SimpleNamespace(ptr=0xC11), resident_blocks=999,
                         num_regs=70)
    loads = []
    monkeypatch.setattr(_nvrtc, "get_kernel", lambda device: loads.append(device) or clip)
    monkeypatch.setattr(_nvrtc, "_update_kernels", {})
    occupancy = {0xF00D: 2}
    monkeypatch.setattr(_nvrtc.driver, "occupancyMaxActiveBlocksPerMultiprocessor",
                        lambda fn, threads, smem: occupancy[fn])
    monkeypatch.setattr(_nvrtc.driver, "funcGetAttribute", lambda attr, fn: 128)
    monkeypatch.setattr(_nvrtc.runtime, "deviceGetAttribute", lambda attr, dev: 132)
    k = _nvrtc.get_update_kernel(3)
    assert looked_up == [_core().UPDATE_KERNEL_NAME] == ["clipops_update_kernel"]
    assert k.module is clip.module and k.function.ptr == 0xF00D
    assert k.resident_blocks == 264 and k.num_regs == 128
    assert _nvrtc.get_update_kernel(3) is k and looked_up == ["clipops_update_kernel"]  # kept
    occupancy[0xF00D] = 0
    with pytest.raises(_nvrtc.CudaUnavailableError, match="update kernel .*128 registers.*does not "
                                                           "fit"):
        _nvrtc.get_update_kernel(4)


# ---- the compiled program: the kernel's parameters as the NVRTC route passes them ---------------

def _ptx_params(ptx: str, entry: str) -> list[int]:
    """Byte sizes of an entry's parameters, read from its PTX declaration."""
    m = re.search(rf"\.entry {entry}\s*\((.*?)\)", ptx, re.S)
    assert m, f"no .entry {entry} in the PTX"
    sizes = []
    for decl in m.group(1).split(","):
        arr = re.search(r"\.b8 \w+\[(\d+)\]", decl)
        if arr:
            sizes.append(int(arr.group(1)))
        else:
            kind = re.search(r"\.param \.([usbf])(\d+)", decl)
            sizes.append(int(kind.group(2)) // 8)
    return sizes


def _route_arg_sizes() -> list[int]:
    values = _nvrtc.update_kernel_args(1 << 40, 64, 3, 10, 160, bytes(_optim.UPDATE_PARAMS.itemsize))
    return [ctypes.sizeof(v) for v in values]


@needs_cupy
def test_route_passes_the_kernel_s_parameter_sizes():
    assert _route_arg_sizes() == [8, 8, 4, 8, 8, 176]


@pytest.mark.skipif(nvrtc_skip_reason() is not None, reason=str(nvrtc_skip_reason()))
def test_the_route_s_program_declares_what_the_route_passes(tmp_path, monkeypatch):
    """CuPy's NVRTC (CUDA 13) builds the route's own program (the one cached
    and loaded: _core.KERNEL_PROGRAM) with the route's options; its update
    kernel takes the parameters update_kernel_args passes, with IEEE float ops."""
    monkeypatch.setenv("CLIPOPS_CACHE_DIR", str(tmp_path))
    ptx = _nvrtc.compile_kernel("-arch=compute_75", "ptx").decode(errors="replace")
    assert _ptx_params(ptx, _core().UPDATE_KERNEL_NAME) == _route_arg_sizes()
    assert ".entry clipops_clip_kernel" in ptx  # both kernels in the one module
    body = ptx[ptx.index(".entry clipops_update_kernel"):]
    ops = [ln.split()[0] for ln in body.splitlines() if ln.startswith("\t") and ln.split()]
    assert any(op.startswith(("sqrt.rn.f32", "div.rn.f32")) for op in ops)
    assert not [op for op in ops if ".ftz" in op or op.startswith("fma")]


def _cuda12():
    try:
        import test_nvrtc12 as t
    except Exception as exc:  # noqa: BLE001 - a skip with the reason
        return None, f"tests/test_nvrtc12.py cannot be imported: {exc}"
    if t.SITE is None:
        return None, ("CUDA 12's NVRTC wheels are not installed (CLIPOPS_CUDA12_SITE; see "
                      "tests/test_nvrtc12.py)")
    return t, None


@pytest.mark.skipif(_cuda12()[0] is None, reason=str(_cuda12()[1]))
@pytest.mark.parametrize("arch", ["compute_60", "compute_90"])
def test_cuda12_nvrtc_builds_the_route_s_program_with_the_same_signature(arch):
    """TensorFlow's CUDA 12 NVRTC (nvidia-cuda-nvrtc-cu12): the route's own
    program, the update kernel's parameters as update_kernel_args passes them,
    and the cubin for sm_90 holds both kernels."""
    t, _ = _cuda12()
    lib = t.Nvrtc12(t.SITE / t.NVRTC)
    program = _core().KERNEL_PROGRAM
    ptx = lib.compile(program, t.options(f"-arch={arch}"), "PTX").decode(errors="replace")
    assert _ptx_params(ptx, "clipops_update_kernel") == _route_arg_sizes()
    if arch == "compute_90":
        cubin = lib.compile(program, t.options("-arch=sm_90"), "CUBIN")
        assert b"clipops_update_kernel" in cubin and b"clipops_clip_kernel" in cubin


# =================================================================================================
# Without a GPU, on the CUDA emulation: the front end end to end
# =================================================================================================

_GUARD = 64


class EmuArray:
    """A device array of the CUDA emulation (its device memory is host memory):
    a 64-byte aligned copy between guards of 0xFF bytes, with what clipops.cupy
    reads of a CuPy array. get() synchronises the emulation first, as CuPy's
    get() waits for the stream."""

    emu = None

    def __init__(self, values: np.ndarray, poison: bool = False):
        values = np.asarray(values)
        nbytes = values.nbytes
        self._raw = np.full(nbytes + 2 * _GUARD + 64, 0xFF, np.uint8)
        start = (-self._raw.ctypes.data) % 64 + _GUARD
        self.host = self._raw[start:start + nbytes].view(values.dtype).reshape(values.shape)
        if not poison:
            self.host[...] = values
        self.dtype, self.shape, self.size = values.dtype, values.shape, values.size
        self.ndim, self.nbytes = values.ndim, nbytes
        self.flags = SimpleNamespace(c_contiguous=True)
        self.data = SimpleNamespace(ptr=self.host.ctypes.data, device_id=0)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False),
                "version": 3}

    def astype(self, dtype, copy=True):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return EmuArray(self.host.astype(dtype))

    def get(self):
        EmuArray.emu.synchronize()
        return np.array(self.host)

    def guards_intact(self) -> bool:
        start = self.host.ctypes.data - self._raw.ctypes.data if self.nbytes else None
        if start is None:
            return bool((self._raw == 0xFF).all())
        return bool((self._raw[:start] == 0xFF).all() and
                    (self._raw[start + self.nbytes:] == 0xFF).all())


def _emulation():
    try:
        import clipops._emulation as emu
    except ImportError:
        return None
    return emu


EMU = _emulation() if cupy is not None else None
needs_emulation = pytest.mark.skipif(
    EMU is None, reason="clipops was built without its CUDA emulation (CLIPOPS_EMULATION=OFF, or "
                        "not GCC/Clang on Linux), or CuPy is not installed")


def _to_emu_args(args):
    out = EMU.UpdateArgs()
    for name in _ARGS_FIELDS:
        setattr(out, name, getattr(args, name))
    return out


@pytest.fixture
def emulated(monkeypatch):
    """clipops.cupy on the CUDA emulation: EmuArrays pass as GPU arrays, CuPy's
    allocations are NaN-poisoned EmuArrays (0xFF bytes), the stream is the
    emulation's default one, and the compiled route's launcher is the same C++
    launcher (optim_cuda.cu) built against the emulation (_emulation.update_cuda).
    Every launch is recorded; the emulation runs the queued work at get() and
    at the end of the test."""
    EmuArray.emu = EMU
    EMU.configure()
    EMU.set_device(EMU.device(16, 4))  # 64 resident blocks
    EMU.reset_stats()
    monkeypatch.setattr(ccp, "_current_device", lambda: 0)
    real = ccp._as_device_array
    monkeypatch.setattr(ccp, "_as_device_array",
                        lambda x, what: x if isinstance(x, EmuArray) else real(x, what))
    made = []

    def empty(shape, dtype=np.float64):
        a = EmuArray(np.zeros(shape, dtype), poison=True)
        made.append(a)
        return a

    monkeypatch.setattr(cupy, "empty", empty)
    monkeypatch.setattr(cupy, "zeros", lambda shape, dtype=np.float64: EmuArray(np.zeros(shape, dtype)))
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: SimpleNamespace(ptr=0))
    monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    monkeypatch.setattr(_core(), "cuda_compiled", lambda: True)
    monkeypatch.setattr(_core(), "update_cuda", lambda descs, args, ws, nbytes, stream:
                        EMU.update_cuda(descs, _to_emu_args(args), ws, nbytes, stream))
    yield SimpleNamespace(emu=EMU, allocations=made)
    EMU.synchronize()
    assert all(a.guards_intact() for a in made), "written outside an allocation"
    EMU.configure()


def _emu(arrays):
    return None if arrays is None else [None if a is None else EmuArray(a) for a in arrays]


def _host(arrays):
    return None if arrays is None else [None if a is None else a.get() for a in arrays]


def _assert_same_bits(got, want, what):
    if got is None or want is None:  # a state list the rule does not keep
        assert got is None and want is None, what
        return
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None and b is None:
            continue
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{what}[{i}] differs"


SIZES = [5, 0, 1, 1023, CHUNK - 1, CHUNK + 1, 40000]


@needs_cupy
@needs_emulation
def test_update_args_fields_are_the_emulation_s():
    """The conversion to the emulation's UpdateArgs copies every field."""
    assert _ARGS_FIELDS == sorted(n for n in dir(EMU.UpdateArgs) if not n.startswith("_"))


@needs_cupy
@needs_emulation
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("rule", list(RULES))
def test_emulated_front_end_is_clipops_numpy_bit_for_bit(emulated, rng, rule, clip):
    """Mixed gradient dtypes, sizes around the chunk, a None gradient, decay
    exclusions, an int step: every variable, state array and the norm have
    clipops.numpy's bits, and the variable without a gradient is untouched."""
    params, grads, ms, vs = _problem(rng, rule, SIZES, GRAD_DTYPES)
    grads[3] = None
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_emu(params), _emu(grads), _emu(ms), _emu(vs))
    want = _call(cnp, rule, *host, step=4, clip=clip)
    got = _call(ccp, rule, *dev, step=4, clip=clip)
    assert got.get().tobytes() == want.tobytes() and got.dtype == want.dtype
    _assert_same_bits(_host(dev[0]), host[0], "params")
    _assert_same_bits(_host(dev[2]), host[2], "momentums")
    _assert_same_bits(_host(dev[3]), host[3], "velocities")
    assert dev[0][3].get().tobytes() == params[3].tobytes()
    (launch,) = emulated.emu.launches()
    assert launch["kernel"] == "clipops_update_kernel" and launch["cooperative"]


@needs_cupy
@needs_emulation
@pytest.mark.parametrize("rule", ["adamw", "nesterov"])
def test_emulated_return_norms_and_unscale(emulated, rng, rule):
    params, grads, ms, vs = _problem(rng, rule, SIZES, GRAD_DTYPES)
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_emu(params), _emu(grads), _emu(ms), _emu(vs))
    want = _call(cnp, rule, *host, step=2, return_norms=True, unscale=2.0 ** -3)
    got = _call(ccp, rule, *dev, step=2, return_norms=True, unscale=EmuArray(np.float32(2.0 ** -3)))
    assert got[0].get().tobytes() == want[0].tobytes()
    assert got[1].get().tobytes() == want[1].tobytes()
    _assert_same_bits(_host(dev[0]), host[0], "params")


def _cpu_kernel_steps(rule, params, grads, ms, vs, steps, start, lr, clip="global_norm",
                      skip=False):
    """The reference for a device step counter: the CPU kernel with the powers
    derived from the counter (kPowersFromStep), advanced by the kernel."""
    core = _core()
    fn, kw = RULES[rule]
    codes = [_common.DTYPE_CODES[np.dtype(g.dtype).name] for g in grads]
    norm_code = _common.norm_dtype_code(codes)
    ndt = _common.np_dtype(norm_code)
    counter = np.array([start], np.int64)
    norm = np.zeros((), ndt)
    flags = [("weight_decay" in kw) and i % 3 != 1 for i in range(len(params))]
    name, value = CLIPS[clip]
    for _ in range(steps):
        a = _optim.update_args(core, rule="sgd" if fn == "sgd" else "adam", clip_mode=clip,
                               clip_value=value or 0.0, norm_code=norm_code, unscale=1.0,
                               skip=skip, learning_rate=lr, weight_decay=kw.get("weight_decay"),
                               step=1 if fn != "sgd" else None,
                               **{k: v for k, v in kw.items()
                                  if k not in ("learning_rate", "weight_decay")})
        a.power_source = core.POWER_SOURCES["from_step"]
        a.iterations_ptr, a.increment_iterations = counter.ctypes.data, True
        a.norm_out = norm.ctypes.data
        descs = [(p.ctypes.data, g.ctypes.data, c, 0 if ms is None else ms[i].ctypes.data,
                  0 if vs is None else vs[i].ctypes.data, p.size, flags[i])
                 for i, (p, g, c) in enumerate(zip(params, grads, codes))]
        core.update_cpu(descs, a)
    return norm, int(counter[0])


@needs_cupy
@needs_emulation
@pytest.mark.parametrize("lr_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", ["adamw", "adam"])
def test_emulated_device_step_and_learning_rate_over_three_steps(emulated, rng, rule, lr_dtype):
    """Three calls in a row with no host sync between them: the kernel derives
    beta**t from the device counter and advances it; the learning rate is read
    on the device (a float64 one is cast on the stream first). The CPU kernel
    with the same counter gives the same bits."""
    params, grads, ms, vs = _problem(rng, rule, SIZES, GRAD_DTYPES)
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_emu(params), _emu(grads), _emu(ms), _emu(vs))
    counter = EmuArray(np.array(41, np.int64))  # 41 updates done: these are steps 42..44
    lr = EmuArray(np.asarray(2e-3, lr_dtype))
    for _ in range(3):
        norm = _call(ccp, rule, *dev, step=counter, learning_rate=lr)
    want_norm, want_counter = _cpu_kernel_steps(rule, *host, 3, 41, 2e-3)
    assert counter.get() == 44 == want_counter
    assert norm.get().tobytes() == want_norm.tobytes()
    _assert_same_bits(_host(dev[0]), host[0], "params")
    _assert_same_bits(_host(dev[2]), host[2], "momentums")
    _assert_same_bits(_host(dev[3]), host[3], "velocities")
    assert len(emulated.emu.launches()) == 3  # one launch per call (a cast is CuPy's own kernel)


@needs_cupy
@needs_emulation
@pytest.mark.parametrize("clip", ["global_norm", "none"])
def test_emulated_skipped_step_writes_nothing_and_keeps_the_count(emulated, rng, clip):
    params, grads, ms, vs = _problem(rng, "adamw", SIZES, GRAD_DTYPES)
    grads[5][17] = np.inf
    dev = (_emu(params), _emu(grads), _emu(ms), _emu(vs))
    counter = EmuArray(np.array(3, np.int64))
    norm = _call(ccp, "adamw", *dev, step=counter, clip=clip, nonfinite="skip")
    assert np.isinf(norm.get()) and counter.get() == 3
    _assert_same_bits(_host(dev[0]), params, "params")
    _assert_same_bits(_host(dev[2]), ms, "momentums")
    _assert_same_bits(_host(dev[3]), vs, "velocities")


@needs_cupy
@needs_emulation
def test_emulated_raise_names_the_gradient_and_writes_nothing(emulated, rng):
    params, grads, ms, vs = _problem(rng, "adamw", SIZES, [np.float32])
    grads[4][3] = np.nan
    dev = (_emu(params), _emu(grads), _emu(ms), _emu(vs))
    counter = EmuArray(np.array(0, np.int64))
    with pytest.raises(_common.NonFiniteError, match=r"grads\[4\] is the first tensor whose own "
                                                     r"norm is not finite.*Nothing was updated"):
        _call(ccp, "adamw", *dev, step=counter, nonfinite="raise")
    assert counter.get() == 0
    _assert_same_bits(_host(dev[0]), params, "params")
    _assert_same_bits(_host(dev[3]), vs, "velocities")


@needs_cupy
@needs_emulation
def test_emulated_empty_list_counts_the_step(emulated):
    counter = EmuArray(np.array(9, np.int64))
    norm = ccp.adamw_update([None], [None], [None], [None], step=counter, global_clipnorm=1.0)
    assert counter.get() == 10 and norm.get() == 0.0 and norm.dtype == np.float32
    (launch,) = emulated.emu.launches()
    assert launch["grid"] == 1


@needs_cupy
@needs_emulation
def test_emulated_many_tensors_one_launch(emulated, rng):
    """5,000 tensors (more than a block has threads, more than the grid has
    blocks): one launch, clipops.numpy's bits."""
    sizes = [int(n) for n in rng.integers(0, 40, size=5000)]
    params, grads, ms, vs = _problem(rng, "adamw", sizes, [np.float32, np.float16])
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_emu(params), _emu(grads), _emu(ms), _emu(vs))
    want = _call(cnp, "adamw", *host, step=3)
    got = _call(ccp, "adamw", *dev, step=3)
    assert got.get().tobytes() == want.tobytes()
    _assert_same_bits(_host(dev[0]), host[0], "params")
    _assert_same_bits(_host(dev[3]), host[3], "velocities")
    assert len(emulated.emu.launches()) == 1


# =================================================================================================
# bench/gpu.py: the optimizer rows, without a GPU
# =================================================================================================

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_gpu(monkeypatch):
    """bench/gpu.py imported as a module (its cases and report helpers beside it)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu
    return gpu


def _fake_payload(gpu, smoke=False) -> dict:
    """What a run on a GPU writes, made up: the clip's rows and the optimizer's."""
    def res(device_us, pipelined_us, launches=None):
        r = {"device_us": device_us, "pipelined_us": pipelined_us, "reps": 50,
             "validation": {"ok": True}}
        if launches is not None:
            r["launches"] = launches
        return r

    clip_cases = [{"case": "resnet50", "note": "", "tensors": 161, "elements": 25_557_032,
                   "bytes_moved": 3 * 4 * 25_557_032, "dtypes": ["float32"], "results": {
                       "clipops (nvcc)": res(110.0, 120.0),
                       "torch clip_grad_norm_ foreach": res(400.0, 420.0),
                       "optax clip_by_global_norm (jit)": {"skipped": "not installed"}}}]
    n_res, n_mnist = 25_557_032, 535_818
    optim_cases = []
    for name, n, ours, torch_t, optax_t in (("mnist_mlp", n_mnist, 9.0, 60.0, 80.0),
                                            ("resnet50", n_res, 300.0, 520.0, 700.0)):
        optim_cases.append({
            "case": name, "note": "", "tensors": 6 if name == "mnist_mlp" else 161, "elements": n,
            "bytes_moved": 32 * n, "dtypes": ["float32"], "results": {
                "clipops adamw_update (nvcc)": res(ours, ours + 5, 1),
                "clipops adamw_update (nvrtc)": res(ours * 1.01, ours + 6, 1),
                "torch clip_grad_norm_ + AdamW(fused)": res(torch_t, torch_t + 30, 7),
                "optax chain(clip_by_global_norm, adamw) (jit)": {
                    "pipelined_us": optax_t, "reps": 50, "validation": {"ok": True},
                    "launches": 4}}})
    bw = {"gbs": 3000.0, "memcpy_gbs": 2900.0, "copy_kernel_gbs": 3000.0, "bytes": 1 << 30}
    payload = {"benchmark": "gpu", "smoke": smoke, "device": {"name": "Fake GPU"},
               "machine": {"date": "2025-01-01"}, "copy_bandwidth": bw, "cases": clip_cases,
               "optim_cases": optim_cases}
    payload["targets"] = gpu.judge(clip_cases, bw["gbs"], smoke) + \
        gpu.judge_optim(optim_cases, bw["gbs"], smoke)
    return payload


@needs_cupy
def test_bench_optim_bytes_and_judge(monkeypatch):
    """32 B per parameter (g read twice, p, m, v read and written); the
    targets met and missed as the numbers say, never relaxed."""
    gpu = _bench_gpu(monkeypatch)
    from cases import case as make_case, mnist_shapes
    c = make_case("mnist_mlp", "", mnist_shapes())
    assert gpu.optim_bytes_moved(c) == 32 * 535_818
    payload = _fake_payload(gpu)
    t = {(r["target"], r["case"]): r for r in payload["targets"]}
    bw = t[(">= 85% of copy bandwidth (32 B per parameter)", "resnet50")]
    assert bw["value"] == pytest.approx(32 * 25_557_032 / 300e-6 / 1e9 / 3000.0, rel=1e-3)
    assert bw["met"] is (bw["value"] >= 0.85)
    torch_rn = t[(">= 1.5x faster than torch clip_grad_norm_(foreach) + AdamW(fused)", "resnet50")]
    assert torch_rn["value"] == pytest.approx(520 / 300, rel=1e-3) and torch_rn["met"] is True
    torch_mn = t[(">= 1.5x faster than torch clip_grad_norm_(foreach) + AdamW(fused)", "mnist_mlp")]
    assert torch_mn["met"] is True
    one = t[("1 launch per call, any number of tensors", "resnet50")]
    assert one["value"] == 1 and one["met"] is True
    optax = t[("faster than optax chain(clip_by_global_norm, adamw) under jit (pipelined)",
               "resnet50")]
    assert optax["met"] is True and optax["value"] == pytest.approx(700 / 305, rel=1e-3)
    stretch = t[("stretch: 28 B per parameter (time x copy bandwidth / parameters)", "mnist_mlp")]
    assert stretch["threshold"] == 28 and stretch["value"] == pytest.approx(
        9e-6 * 3000e9 / 535_818, rel=1e-3)
    # a slower run misses
    slow = json.loads(json.dumps(payload["optim_cases"]))
    slow[1]["results"]["clipops adamw_update (nvcc)"].update(device_us=400.0, launches=2)
    t2 = {(r["target"], r["case"]): r for r in gpu.judge_optim(slow, 3000.0, False)}
    assert t2[(">= 1.5x faster than torch clip_grad_norm_(foreach) + AdamW(fused)",
               "resnet50")]["met"] is False
    assert t2[("1 launch per call, any number of tensors", "resnet50")]["met"] is False
    assert all(r["met"] is None for r in gpu.judge_optim(slow, 3000.0, True))  # smoke: not judged


@needs_cupy
def test_bench_tables_and_plot_with_optimizer_rows(monkeypatch, tmp_path):
    gpu = _bench_gpu(monkeypatch)
    payload = _fake_payload(gpu)
    md = tmp_path / "gpu.md"
    gpu.write_markdown(md, payload)
    text = md.read_text()
    assert "## Global-norm clipping" in text and "## Fused clip + AdamW" in text
    assert "32 B per parameter" in text
    assert text.index("## Fused clip + AdamW") < text.index("## Targets")
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): ln for ln in text.splitlines()
            if ln.startswith("| resnet50") or ln.startswith("| mnist_mlp")}
    ours = rows[("resnet50", "clipops adamw_update (nvcc)")]
    # 32 B x 25,557,032 in 300 us: 2726 GB/s, 90.9% of 3000 GB/s; 300 us at 3000 GB/s is
    # 35.2 B per parameter; one launch
    assert [c.strip() for c in ours.strip("|").split("|")][2:] == \
        ["300.0", "305.0", "2726", "90.9%", "35.2", "1"]
    optax = [c.strip() for c in rows[("resnet50", "optax chain(clip_by_global_norm, adamw) (jit)")]
             .strip("|").split("|")]
    assert optax[2:4] == ["n/a", "700.0"] and optax[-1] == "4"
    assert "resnet50: torch / clipops 1.73x (device time)" in text
    assert "resnet50: optax / clipops 2.30x (pipelined)" in text
    assert re.search(r"\| 1 launch per call, any number of tensors \| resnet50 \| 1 \| 1 \| met",
                     text)
    why = gpu.write_plot(tmp_path / "gpu.png", payload)
    if why is None:
        assert (tmp_path / "gpu.png").stat().st_size > 1000
        assert (tmp_path / "gpu_optim.png").stat().st_size > 1000
    else:
        assert "matplotlib" in why
    # a payload from before the optimizer rows still renders, without them
    old = {k: v for k, v in payload.items() if k != "optim_cases"}
    gpu.write_markdown(tmp_path / "old.md", old)
    assert "## Fused clip + AdamW" not in (tmp_path / "old.md").read_text()
    # --suite optim: no clip rows, no clip table, no clip figure
    only = dict(payload, cases=[], targets=gpu.judge_optim(payload["optim_cases"], 3000.0, False))
    gpu.write_markdown(tmp_path / "optim.md", only)
    assert "## Global-norm clipping" not in (tmp_path / "optim.md").read_text()
    if gpu.write_plot(tmp_path / "o.png", only) is None:
        assert not (tmp_path / "o.png").exists() and (tmp_path / "o_optim.png").exists()


@needs_cupy
def test_bench_references_follow_each_implementation_s_formula():
    """The float64 references of bench/gpu.py: Keras' AdamW (clipops), torch's
    and optax's (epsilon after the bias correction), one step by hand."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    g = [np.array([3.0, 4.0], np.float32)]  # norm 5, clipped to 2.5
    p0 = [np.array([1.0, -2.0], np.float32)]
    h = dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-3, wd=0.5, clip=2.5)
    f32 = lambda x: float(np.float32(x))  # noqa: E731 - Keras' float32 constants
    for conv in ("keras", "torch", "optax"):
        (p,), (m,), (v,), bounds = gpu.adamw_reference(p0, g, steps=1, conv=conv, **h)
        gc = np.array([3.0, 4.0]) * (2.5 / (5 + 1e-6) if conv == "torch" else 0.5)
        c1, c2 = (f32(1 - 0.9), f32(1 - 0.999)) if conv == "keras" else (1 - 0.9, 1 - 0.999)
        assert np.allclose(m, c1 * gc, rtol=1e-15) and np.allclose(v, c2 * gc ** 2, rtol=1e-15)
        p64 = p0[0].astype(np.float64)
        if conv == "keras":
            q = p64 - p64 * f32(0.5) * f32(0.1)
            alpha = f32(0.1) * math.sqrt(1 - f32(0.999)) / (1 - f32(0.9))  # beta^1 = float32 beta
            want = q - m * alpha / (np.sqrt(v) + f32(1e-3))
        else:
            q = p64 * (1 - 0.1 * 0.5)
            want = q - 0.1 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-3)
        assert np.allclose(p, want, rtol=1e-14), conv
        assert all((b[0] > 0).all() for b in bounds)
    # torch's clip: max_norm / (norm + 1e-6), not max_norm / norm; and in place: the
    # second step clips the clipped gradient again
    (m_t,) = gpu.adamw_reference(p0, g, steps=2, conv="torch", **h)[1]
    s1 = 2.5 / (5 + 1e-6)
    s2 = min(1.0, 2.5 / (5 * s1 + 1e-6))
    g1, g2 = 3.0 * s1, 3.0 * s1 * s2
    assert m_t[0] == pytest.approx(0.9 * 0.1 * g1 + 0.1 * g2, rel=1e-12)


def _float32_adamw(p0, grads, *, steps, conv, clip, lr, b1, b2, eps, wd, decay=True):
    """torch's or optax's AdamW in NumPy float32, with every constant in
    float32 too (the worst case the references allow for)."""
    f = np.float32
    p = [x.copy() for x in p0]
    g = [x.copy() for x in grads]
    m = [np.zeros_like(x) for x in p0]
    v = [np.zeros_like(x) for x in p0]
    b1f, b2f = f(b1), f(b2)
    for t in range(1, steps + 1):
        norm = np.sqrt(f(sum(np.sum(x * x, dtype=np.float32) for x in g)))
        if conv == "torch":
            scale = min(f(1), f(clip) / (norm + f(1e-6)))
        else:
            scale = f(1) if norm < f(clip) else f(clip) / norm
        gc = [x * scale for x in g]
        if conv == "torch":
            g = gc
        bc1, bc2 = f(1) - b1f ** f(t), f(1) - b2f ** f(t)
        for i in range(len(p)):
            m[i] = b1f * m[i] + (f(1) - b1f) * gc[i]
            v[i] = b2f * v[i] + (f(1) - b2f) * gc[i] * gc[i]
            upd = (m[i] / bc1) / (np.sqrt(v[i] / bc2) + f(eps))
            p[i] = p[i] * f(1 - lr * wd) - f(lr) * upd if decay else p[i] - f(lr) * upd
    return p, m, v


@needs_cupy
def test_bench_validation_passes_right_and_fails_wrong_implementations(monkeypatch, rng):
    """bench/gpu.py's check before timing: float32 runs of each formula pass
    against their float64 references (clipops' own CPU kernel with the device
    counter's powers; torch's and optax's formulas with float32 constants),
    and runs that leave something out fail."""
    gpu = _bench_gpu(monkeypatch)
    core = _core()
    h = gpu.ADAMW
    sizes = [5, 1000, CHUNK + 3, 40000]
    p0 = [random_array(rng, (n,), np.float32) for n in sizes]
    grads = [random_array(rng, (n,), np.float32, 1e-2) for n in sizes]
    clip = float(np.float32(math.sqrt(sum(float(np.dot(x.astype(np.float64), x)) for x in grads))
                            / 2))
    refs = {conv: gpu.adamw_reference(p0, grads, steps=gpu.OPTIM_STEPS, conv=conv, clip=clip, **h)
            for conv in ("keras", "torch", "optax")}

    def clipops_cpu(steps):
        ps = [x.copy() for x in p0]
        ms, vs = [np.zeros_like(x) for x in p0], [np.zeros_like(x) for x in p0]
        counter = np.zeros(1, np.int64)
        for _ in range(steps):
            a = _optim.update_args(core, rule="adam", clip_mode="global_norm", clip_value=clip,
                                   norm_code=2, unscale=1.0, skip=False, learning_rate=h["lr"],
                                   weight_decay=h["wd"], beta_1=h["b1"], beta_2=h["b2"],
                                   epsilon=h["eps"], step=1)
            a.power_source = core.POWER_SOURCES["from_step"]
            a.iterations_ptr, a.increment_iterations = counter.ctypes.data, True
            core.update_cpu([(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, v.ctypes.data,
                              p.size, True) for p, g, m, v in zip(ps, grads, ms, vs)], a)
        return SimpleNamespace(conv="keras", params=lambda: ps, m=lambda: ms, v=lambda: vs)

    def formula(conv, **kw):
        ps, ms, vs = _float32_adamw(p0, grads, steps=gpu.OPTIM_STEPS, conv=conv,
                                    **{**h, "clip": clip, **kw})
        return SimpleNamespace(conv=conv, params=lambda: ps, m=lambda: ms, v=lambda: vs)

    def ok(impl):
        return gpu.validate_optim(impl, refs)["ok"]

    assert ok(clipops_cpu(gpu.OPTIM_STEPS))
    assert ok(formula("torch")) and ok(formula("optax"))
    assert not ok(clipops_cpu(gpu.OPTIM_STEPS - 1))  # a step short
    assert not ok(formula("torch", decay=False))  # no weight decay (1e-5 of p per step)
    assert not ok(formula("optax", clip=clip * 4))  # clipped to another norm
    assert not ok(formula("torch", b2=0.99))  # another beta_2
    wrong_eps = formula("torch")
    wrong_eps.conv = "keras"  # torch's epsilon placement checked against Keras' formula
    assert not ok(wrong_eps)


@needs_cupy
def test_bench_runs_each_implementation_of_a_case_into_its_row(monkeypatch, capsys):
    """bench/gpu.py's loop over a case's implementations (run_impls) and its
    timing (time_impl, here through measure_optim), with stand-ins for the
    device: a timed row, a row timed by wall clock only, an invalid one, a
    missing peer and one whose setup fails are each reported in their row and
    line, and the timed rows get their bandwidths (add_gbs)."""
    gpu = _bench_gpu(monkeypatch)
    monkeypatch.setattr(gpu, "device_times", lambda run, stream, reps: ([2e-6] * reps, True))
    monkeypatch.setattr(gpu, "count_launches", lambda impl: (1, None))
    monkeypatch.setattr(gpu, "validate_optim", lambda impl, refs: (
        {"ok": True} if impl.good else {"ok": False, "why": "3x the tolerance"}))
    monkeypatch.setattr(gpu, "peer_missing", lambda module: "not installed" if module == "absent"
                        else None)
    freed = []
    monkeypatch.setattr(gpu.cupy, "get_default_memory_pool",
                        lambda: SimpleNamespace(free_all_blocks=lambda: freed.append(1)))
    runs = []

    def impl(good=True, on_cupy_stream=True):
        return SimpleNamespace(run=lambda: runs.append(1), sync=lambda last: None,
                               restore=lambda: None, on_cupy_stream=on_cupy_stream,
                               context=contextlib.nullcontext, info={"route": "stand-in"},
                               good=good)

    def setup_fails():
        raise RuntimeError("no such device")

    args = SimpleNamespace(warmup=2, reps=7, rounds=3)
    record = {"results": {}}
    gpu.run_impls(record, [("ours", impl)],
                  [("wall", "present", lambda: impl(on_cupy_stream=False)),
                   ("gone", "absent", None), ("broken", "present", setup_fails),
                   ("wrong", "present", lambda: impl(good=False))], 10,
                  lambda maker: maker(),
                  lambda i: gpu.measure_optim(i, {}, contextlib.nullcontext(), args),
                  lambda res: f"   launches {res['launches']}")
    gpu.add_gbs(record, 3200)
    rows = record["results"]
    assert list(rows) == ["gone", "ours", "wall", "broken", "wrong"]
    ours = rows["ours"]
    assert ours["device_us"] == pytest.approx(2.0) and ours["reps"] == 7
    assert ours["device_gbs"] == pytest.approx(3200 / 2e-6 / 1e9) and ours["primed"] is True
    assert ours["launches"] == 1 and ours["route"] == "stand-in" and ours["validation"]["ok"]
    assert ours["pipelined_us"] > 0 and ours["pipelined_gbs"] > 0
    assert "device_us" not in rows["wall"] and rows["wall"]["pipelined_us"] > 0
    assert rows["gone"] == {"skipped": "not installed"}
    assert rows["broken"]["skipped"].startswith("setup failed: RuntimeError('no such device'")
    assert rows["wrong"]["invalid"] == "3x the tolerance" and "pipelined_us" not in rows["wrong"]
    # per timed run: the optimizer's steps, the warm-up, one timed call, reps x rounds pipelined
    assert len(runs) == 2 * (gpu.OPTIM_STEPS + 2 + 1 + 7 * 3) + gpu.OPTIM_STEPS
    assert len(freed) == 3  # after every implementation that was set up
    out = capsys.readouterr().out
    assert re.search(r"ours\s+device\s+2\.0 us\s+pipelined\s+[\d.]+ us\s+launches 1", out), out
    assert "gone       skipped: not installed" in out and "wrong      3x the tolerance" in out


@needs_cupy
@pytest.mark.skipif(HAVE_GPU, reason="a GPU is usable here: bench/gpu.py would run")
def test_bench_gpu_without_a_gpu_exits_with_its_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and
                                                       Path(p).resolve() != BENCH.parent))
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bench/gpu.py needs a GPU" in proc.stderr and "Traceback" not in proc.stderr


# =================================================================================================
# On a GPU
# =================================================================================================

@pytest.fixture(params=["compiled", "nvrtc"])
def route(request, monkeypatch):
    if request.param == "nvrtc":
        monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", "1")
    else:
        if not _core().cuda_compiled():
            pytest.skip("this build has no nvcc-compiled CUDA kernel")
        monkeypatch.delenv("CLIPOPS_FORCE_NVRTC", raising=False)
    return request.param


def _gpu(arrays):
    return None if arrays is None else [None if a is None else cupy.asarray(a) for a in arrays]


def _gpu_host(arrays):
    return None if arrays is None else [None if a is None else cupy.asnumpy(a) for a in arrays]


def _list_sizes(count):
    if count == 1:
        return [3 * CHUNK + 5]
    base = [0, 1, 5, 1023, CHUNK - 1, CHUNK, CHUNK + 1, 40000]
    return [base[i % len(base)] if count < 1000 else int(i % 300) for i in range(count)]


@gpu
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("rule", list(RULES))
def test_gpu_bitwise_equal_to_numpy(route, rng, rule, clip):
    params, grads, ms, vs = _problem(rng, rule, SIZES, GRAD_DTYPES)
    grads[3] = None
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
    want = _call(cnp, rule, *host, step=4, clip=clip, return_norms=True)
    got = _call(ccp, rule, *dev, step=4, clip=clip, return_norms=True)
    assert cupy.asnumpy(got[0]).tobytes() == want[0].tobytes()
    assert cupy.asnumpy(got[1]).tobytes() == want[1].tobytes()
    _assert_same_bits(_gpu_host(dev[0]), host[0], "params")
    _assert_same_bits(_gpu_host(dev[2]), host[2], "momentums")
    _assert_same_bits(_gpu_host(dev[3]), host[3], "velocities")


@gpu
@pytest.mark.parametrize("count", [1, 7, 110, 5000])
def test_gpu_list_lengths(route, rng, count):
    params, grads, ms, vs = _problem(rng, "adamw", _list_sizes(count), GRAD_DTYPES)
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
    want = _call(cnp, "adamw", *host, step=11)
    got = _call(ccp, "adamw", *dev, step=11)
    assert cupy.asnumpy(got).tobytes() == want.tobytes()
    _assert_same_bits(_gpu_host(dev[0]), host[0], "params")
    _assert_same_bits(_gpu_host(dev[3]), host[3], "velocities")


@gpu
@pytest.mark.parametrize("rule", ["adamw", "nesterov"])
def test_gpu_against_float64(route, rng, rule):
    """Three steps with a device step counter and learning rate, each compared
    from the same float32 state with a float64 step (tests/test_optim.py's
    ref_step and its first-order bounds, doubled as there), powers as the
    kernel derives them from the counter."""
    import test_optim as T

    fn, kw = T.RULES[rule]
    sizes = SIZES + [300_001]
    params, _, ms, vs = _problem(rng, rule, sizes)
    dev = (_gpu(params), None, _gpu(ms), _gpu(vs))
    counter = cupy.zeros((), cupy.int64)
    lr = cupy.asarray(np.float32(kw["learning_rate"]))
    mask = [i % 3 != 1 for i in range(len(sizes))]
    core = _core()
    for step in (1, 2, 3):
        grads = [random_array(rng, (n,), GRAD_DTYPES[i % len(GRAD_DTYPES)],
                              0.05 if i % len(GRAD_DTYPES) else 1.0) for i, n in enumerate(sizes)]
        before = (_gpu_host(dev[0]), _gpu_host(dev[2]), _gpu_host(dev[3]))
        norm64 = math.sqrt(sum(float(np.dot(g.astype(np.float64), g.astype(np.float64)))
                               for g in grads))
        clip = norm64 / 2
        extra = {k: v for k, v in kw.items() if k not in ("learning_rate", "weight_decay")}
        if fn == "sgd":
            ccp.sgd_update(dev[0], _gpu(grads), dev[2], learning_rate=lr, global_clipnorm=clip,
                           weight_decay=kw.get("weight_decay"), decay_mask=mask, **extra)
        else:
            ccp.adamw_update(dev[0], _gpu(grads), dev[2], dev[3], step=counter, learning_rate=lr,
                             global_clipnorm=clip, weight_decay=kw["weight_decay"],
                             decay_mask=mask, **extra)
        h = T.hyper(rule, step)
        if fn != "sgd":
            h["b1p"] = core.power_by_squaring(float(np.float32(kw["beta_1"])), step)
            h["b2p"] = core.power_by_squaring(float(np.float32(kw["beta_2"])), step)
        ndt = np.float32  # a mixed list
        clip_r = float(np.float32(clip))
        factor = clip_r / max(norm64, clip_r)
        after = (_gpu_host(dev[0]), _gpu_host(dev[2]), _gpu_host(dev[3]))
        for i, g in enumerate(grads):
            gc = g.astype(np.float64) * factor
            coarse = g.dtype if g.dtype.itemsize == 2 else ndt
            (p1, m1, v1), (ep, em, ev) = T.ref_step(
                rule, before[0][i], gc, T.grad_error(gc, coarse),
                None if ms is None else before[1][i], None if vs is None else before[2][i], h,
                mask[i] and "weight_decay" in kw)
            for got, want, err, what in ((after[0][i], p1, ep, "param"),
                                         (None if ms is None else after[1][i], m1, em, "m"),
                                         (None if vs is None else after[2][i], v1, ev, "v")):
                if got is None:
                    continue
                bad = np.abs(got.astype(np.float64) - want) > 2 * err + 1e-37
                assert not bad.any(), f"step {step}, tensor {i} {what}: {int(bad.sum())} off"
    if fn != "sgd":
        assert int(counter) == 3


@gpu
@pytest.mark.parametrize("rule", ["adamw", "adam"])
def test_gpu_device_step_and_learning_rate(route, rng, rule):
    params, grads, ms, vs = _problem(rng, rule, SIZES, GRAD_DTYPES)
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
    counter = cupy.asarray(np.array(41, np.int64))
    lr = cupy.asarray(np.float32(2e-3))
    for _ in range(3):
        norm = _call(ccp, rule, *dev, step=counter, learning_rate=lr)
    want_norm, want_counter = _cpu_kernel_steps(rule, *host, 3, 41, 2e-3)
    assert int(counter) == 44 == want_counter
    assert cupy.asnumpy(norm).tobytes() == want_norm.tobytes()
    _assert_same_bits(_gpu_host(dev[0]), host[0], "params")
    _assert_same_bits(_gpu_host(dev[3]), host[3], "velocities")


@gpu
def test_gpu_routes_are_bitwise_identical(rng, monkeypatch):
    if not _core().cuda_compiled():
        pytest.skip("this build has no nvcc-compiled CUDA kernel")
    params, grads, ms, vs = _problem(rng, "adamw", _list_sizes(110), GRAD_DTYPES)
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv("CLIPOPS_FORCE_NVRTC", force)
        dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
        counter = cupy.zeros((), cupy.int64)
        for _ in range(3):
            norm, norms = _call(ccp, "adamw", *dev, step=counter, return_norms=True)
        results.append([cupy.asnumpy(norm).tobytes(), cupy.asnumpy(norms).tobytes()] +
                       [a.tobytes() for a in _gpu_host(dev[0]) + _gpu_host(dev[2]) +
                        _gpu_host(dev[3])])
    assert results[0] == results[1]


@gpu
def test_gpu_skip_and_raise(route, rng):
    params, grads, ms, vs = _problem(rng, "adamw", SIZES, GRAD_DTYPES)
    grads[5][17] = np.inf
    dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
    counter = cupy.asarray(np.array(3, np.int64))
    norm = _call(ccp, "adamw", *dev, step=counter, nonfinite="skip")
    assert not bool(cupy.isfinite(norm)) and int(counter) == 3
    with pytest.raises(_common.NonFiniteError, match=r"grads\[5\] is the first tensor"):
        _call(ccp, "adamw", *dev, step=counter, nonfinite="raise")
    assert int(counter) == 3
    _assert_same_bits(_gpu_host(dev[0]), params, "params")
    _assert_same_bits(_gpu_host(dev[3]), vs, "velocities")


@gpu
def test_gpu_shared_memory_and_wrong_device_are_refused(route, rng):
    params, grads, ms, vs = _problem(rng, "adamw", [8, 8])
    dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
    with pytest.raises(ValueError, match=r"params\[1\] and momentums\[1\]|momentums\[1\] and "
                                         r"params\[1\]"):
        ccp.adamw_update(dev[0], dev[1], [dev[2][0], dev[0][1]], dev[3], step=1)
    lr_inside = dev[3][0][2:3].reshape(())
    with pytest.raises(ValueError, match="learning_rate and velocities\\[0\\]|velocities\\[0\\] "
                                         "and learning_rate"):
        ccp.adamw_update(*dev, step=1, learning_rate=lr_inside)
    _assert_same_bits(_gpu_host(dev[0]), params, "params")  # nothing written
    if cupy.cuda.runtime.getDeviceCount() > 1:
        with cupy.cuda.Device(1):
            other = cupy.zeros(8, cupy.float32)
        with pytest.raises(ccp.UnsupportedArrayError, match=r"params\[0\] is on GPU 1"):
            ccp.adamw_update([other, dev[0][1]], dev[1], dev[2], dev[3], step=1)


@gpu
@pytest.mark.parametrize("count", [1, 5000])
def test_gpu_call_does_not_wait_for_the_gpu(route, rng, count):
    """Behind a 2 s kernel on a non-blocking stream, three updates with a device
    step and learning rate return at once; the results, read after the stream
    is synchronised, are clipops.numpy's only if each ran on that stream."""
    params, grads, ms, vs = _problem(rng, "adamw", _list_sizes(count), [np.float32])
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dev = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
        counter = cupy.zeros((), cupy.int64)
        lr = cupy.asarray(np.float32(1e-3))
        warm = (_gpu(params), _gpu(grads), _gpu(ms), _gpu(vs))
        _call(ccp, "adamw", *warm, step=cupy.zeros((), cupy.int64), learning_rate=lr)  # loads
        stream.synchronize()
        spin(2.0)
        spun = cupy.cuda.Event()
        spun.record()
        t0 = time.perf_counter()
        for _ in range(3):
            _call(ccp, "adamw", *dev, step=counter, learning_rate=lr)
        elapsed = time.perf_counter() - t0
        still_spinning = not spun.done
        stream.synchronize()
    assert still_spinning and elapsed < 1.0, f"the calls waited ({elapsed:.3f} s)"
    _cpu_kernel_steps("adamw", *host, 3, 0, 1e-3)
    assert int(counter) == 3
    _assert_same_bits(_gpu_host(dev[0]), host[0], "params")


@gpu
def test_gpu_torch_tensors_in_place(route, rng):
    """torch's p.data, p.grad, state tensors, an int64 step tensor and a 0-d lr
    tensor, on a non-default torch stream under cupy.cuda.ExternalStream:
    clipops.numpy's bits, written into torch's own storage."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    params, grads, ms, vs = _problem(rng, "adamw", SIZES, [np.float32, np.float16])
    host = (_copies(params), grads, _copies(ms), _copies(vs))
    want = _call(cnp, "adamw", *host, step=1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ps = [torch.nn.Parameter(torch.from_numpy(p).cuda()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.astype(np.float32)).cuda().to(torch.from_numpy(g).dtype)
        m_t = [torch.from_numpy(m).cuda() for m in ms]
        v_t = [torch.from_numpy(v).cuda() for v in vs]
        step = torch.zeros((), dtype=torch.int64, device="cuda")
        storage = [p.data.data_ptr() for p in ps]
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            norm = _call(ccp, "adamw", [p.data for p in ps], [p.grad for p in ps], m_t, v_t,
                         step=step)
    s.synchronize()
    assert cupy.asnumpy(norm).tobytes() == want.tobytes() and int(step) == 1
    assert [p.data.data_ptr() for p in ps] == storage
    _assert_same_bits([p.detach().cpu().numpy() for p in ps], host[0], "params")
    _assert_same_bits([v.cpu().numpy() for v in v_t], host[3], "velocities")


README_TORCH_EXAMPLE = '''
import torch
import clipops.cupy as ccp

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 10)).cuda()
params = list(model.parameters())
ms = [torch.zeros_like(p) for p in params]      # AdamW's first moments
vs = [torch.zeros_like(p) for p in params]      # and second moments
step = torch.zeros((), dtype=torch.int64, device="cuda")  # updates done; the kernel advances it
lr = torch.tensor(1e-3, device="cuda")          # on the device: a schedule changes it without a sync

x = torch.randn(256, 784, device="cuda")
y = torch.randint(0, 10, (256,), device="cuda")
for _ in range(20):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    model.zero_grad(set_to_none=False)
    loss.backward()
    # one launch: global-norm clip + AdamW over every parameter, in place, no host sync
    norm = ccp.adamw_update([p.data for p in params], [p.grad for p in params], ms, vs,
                            step=step, learning_rate=lr, weight_decay=0.01,
                            global_clipnorm=1.0)
print(f"step {int(step)}, loss {loss.item():.3f}, gradient norm {float(norm):.3f}")
'''


@gpu
def test_gpu_readme_torch_example_runs_and_learns(tmp_path):
    """The README's torch example (given to the lead), as a program: it runs,
    counts 20 steps and the loss falls."""
    pytest.importorskip("torch")
    script = tmp_path / "example.py"
    script.write_text(README_TORCH_EXAMPLE + "\nassert int(step) == 20\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loss = float(re.search(r"loss ([0-9.]+)", proc.stdout).group(1))
    assert loss < math.log(10), proc.stdout  # below chance after 20 steps on a fixed batch
