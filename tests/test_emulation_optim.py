"""The fused update's CUDA kernel and launcher (csrc/core/optim_kernel.cuh,
optim_cuda.cu), unchanged, run on the CPU by the CUDA emulation: bit for bit
the CPU kernel's results (params, m, v, norms, the step counter) for every
rule and clip, list shape, scalar route, grid size and thread and block order;
and the deliberately broken variants (CLIPOPS_EMULATION_TEETH) fail."""

from __future__ import annotations

import numpy as np
import pytest

from clipops import _common, _core, _optim
from conftest import BF16, CHUNK, random_array
from test_emulation import (RESIDENT, assert_address_sanitizer_stops, check_guards,
                            default_emulation, failures_in_each_order, place, teeth_module,
                            use_device)

assert default_emulation  # an autouse fixture (imported so that it applies here too)

emu = pytest.importorskip(
    "clipops._emulation",
    reason="clipops was built without its CUDA emulation (CLIPOPS_EMULATION=OFF, or not GCC/Clang "
           "on Linux)")

GRAD_DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else [])
SIZES = [0, 1, 3, 4, 5, 1023, 1024, 16383, 16384, 16385, 40000]
RULES = {  # rule, hyperparameters (Keras' names), decays
    "sgd": ("sgd", dict(learning_rate=0.05), False),
    "momentum": ("sgd", dict(learning_rate=0.05, momentum=0.9), False),
    "nesterov": ("sgd", dict(learning_rate=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
                 True),
    "adam": ("adam", dict(learning_rate=3e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7), False),
    "adamw": ("adam", dict(learning_rate=3e-3, beta_1=0.85, beta_2=0.99, epsilon=1e-6,
                           weight_decay=0.02), True),
}
CLIPS = {"global_norm": 1.5, "norm": 0.7, "value": 0.3, "none": 0.0}


class Case:
    """A list and an update of it: float32 params, gradients of `dtypes`, the
    rule's m and v, a decay mask with exclusions."""

    def __init__(self, rng, rule="adamw", clip="global_norm", dtypes=(np.float32,), sizes=SIZES,
                 step=5, unscale=1.0, skip=False, from_step=False, bad=None):
        self.rule, self.clip, self.step = rule, clip, step
        kind, self.hyper, decays = RULES[rule]
        self.kind = kind
        self.params = [random_array(rng, (n,), np.float32) for n in sizes]
        self.grads = [random_array(rng, (n,), dtypes[i % len(dtypes)],
                                   0.05 if np.dtype(dtypes[i % len(dtypes)]).itemsize == 2 else 1.0)
                      for i, n in enumerate(sizes)]
        if bad is not None:
            self.grads[bad[0]][bad[1]] = np.inf
        uses_m = kind == "adam" or self.hyper.get("momentum", 0) != 0
        self.ms = [random_array(rng, (n,), np.float32, 0.1) for n in sizes] if uses_m else None
        self.vs = ([np.abs(random_array(rng, (n,), np.float32, 0.01)) for n in sizes]
                   if kind == "adam" else None)
        self.decay = [decays and i % 3 != 1 for i in range(len(sizes))]
        self.codes = [_common.DTYPE_CODES[np.dtype(g.dtype).name] for g in self.grads]
        self.norm_code = _common.norm_dtype_code(self.codes)
        self.unscale, self.skip, self.from_step = unscale, skip, from_step

    def args(self, mod):
        hyper = {k: v for k, v in self.hyper.items() if k != "learning_rate"}
        a = _optim.update_args(mod, rule=self.kind, clip_mode=self.clip,
                               clip_value=CLIPS[self.clip], norm_code=self.norm_code,
                               unscale=self.unscale, skip=self.skip,
                               learning_rate=self.hyper["learning_rate"],
                               step=self.step if self.kind == "adam" else None, **hyper)
        if self.from_step:
            a.power_source = mod.POWER_SOURCES["from_step"]
            a.beta_1_power = a.beta_2_power = np.nan  # not to be read
        return a

    def buffers(self, alloc):
        """Copies of the state (by `alloc`) and the descriptors over them."""
        ps = [alloc(p) for p in self.params]
        gs = [alloc(g) for g in self.grads]
        ms = None if self.ms is None else [alloc(m) for m in self.ms]
        vs = None if self.vs is None else [alloc(v) for v in self.vs]
        descs = [(p.ctypes.data, g.ctypes.data, c, 0 if ms is None else ms[i].ctypes.data,
                  0 if vs is None else vs[i].ctypes.data, p.size, d)
                 for i, (p, g, c, d) in enumerate(zip(ps, gs, self.codes, self.decay))]
        return ps, gs, ms, vs, descs

    def results(self, ps, ms, vs, norm, norms, counter):
        return ([p.tobytes() for p in ps] + [m.tobytes() for m in ms or []] +
                [v.tobytes() for v in vs or []] + [norm.tobytes(), norms.tobytes(),
                                                    counter.tobytes()])


def run_cpu(case, increment=False, norms_out=True):
    """The CPU kernel (clipops._core) on aligned copies. norms_out: ask for the
    global and per-tensor norms."""
    ps, gs, ms, vs, descs = case.buffers(np.array)
    ndt = _common.np_dtype(case.norm_code)
    norm, norms = np.zeros((), ndt), np.zeros(len(descs), ndt)
    counter = np.array([case.step - 1], np.int64)
    a = case.args(_core)
    if norms_out:
        a.norm_out, a.tensor_norms = norm.ctypes.data, norms.ctypes.data
    if case.from_step:
        a.iterations_ptr, a.increment_iterations = counter.ctypes.data, increment
    _core.update_cpu(descs, a)
    if not norms_out:
        norm, norms = np.zeros(()), np.zeros(0)  # none asked for: nothing to compare
    return case.results(ps, ms, vs, norm, norms, counter)


def run_emulated(case, mod=emu, pointers=False, increment=False, offset=0, norms_out=True,
                 exact=False):
    """The emulated launcher over guarded copies (`offset` bytes past a 64-byte
    boundary: 0 takes the vector path, others the element path), or with exact
    in allocations of exactly their size, so that AddressSanitizer sees any
    access past their ends. pointers: the scalars as device pointers, their
    host values NaN so that reading them shows. Checks that nothing outside the
    buffers is written."""
    ps, gs, ms, vs, descs = case.buffers(np.array if exact else lambda a: place(a, offset))
    ndt = _common.np_dtype(case.norm_code)
    norm = place(np.zeros((), ndt), 0, fill=True).reshape(())
    norms = place(np.zeros(len(descs), ndt), 0, fill=True)
    counter = place(np.array([case.step - 1], np.int64), 0)
    a = case.args(mod)
    if norms_out:
        a.norm_out, a.tensor_norms = norm.ctypes.data, norms.ctypes.data
    keep = []
    if pointers:
        def device(value, dtype):
            buf = place(np.array(value, dtype).reshape(1), 0)
            keep.append(buf)
            return buf.ctypes.data
        a.learning_rate_ptr, a.learning_rate = device(a.learning_rate, np.float32), np.nan
        if not case.from_step and case.kind == "adam":
            a.beta_1_power_ptr, a.beta_1_power = device(a.beta_1_power, np.float32), np.nan
            a.beta_2_power_ptr, a.beta_2_power = device(a.beta_2_power, np.float32), np.nan
        if case.clip != "none":
            a.clip_ptr, a.clip = device(a.clip, ndt), np.nan
        a.unscale_ptr, a.unscale = device(a.unscale, ndt), np.nan
    if case.from_step:
        a.iterations_ptr, a.iterations, a.increment_iterations = counter.ctypes.data, -7, increment
    ws = place(np.zeros(mod.update_cuda_workspace_bytes(descs), np.uint8), 0, fill=True)
    mod.update_cuda(descs, a, ws.ctypes.data, ws.nbytes, 0)
    mod.synchronize()
    check_guards(([] if exact else ps + gs + (ms or []) + (vs or [])) +
                 [norm, norms, counter, ws] + keep)
    if not norms_out:
        norm, norms = np.zeros(()), np.zeros(0)
    return case.results(ps, ms, vs, norm, norms, counter)


def assert_same_bits(case, mod=emu, **kw):
    got = run_emulated(case, mod, **kw)
    want = run_cpu(case, increment=kw.get("increment", False),
                   norms_out=kw.get("norms_out", True))
    names = ([f"param {i}" for i in range(len(case.params))] +
             [f"m {i}" for i in range(len(case.ms or []))] +
             [f"v {i}" for i in range(len(case.vs or []))] + ["norm", "tensor norms", "counter"])
    for name, g, w in zip(names, got, want):
        assert g == w, f"{name} differs from the CPU kernel's"


# ---- bit for bit the CPU kernel's ------------------------------------------------------------

@pytest.mark.parametrize("resident", [1, 3, 64])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("rule", list(RULES))
def test_bitwise_equal_to_cpu(rng, rule, clip, resident):
    use_device(resident)
    case = Case(rng, rule, clip, GRAD_DTYPES)
    assert_same_bits(case)
    launch = emu.launches()[-1]
    assert launch["kernel"] == "clipops_update_kernel" and launch["cooperative"]
    items = sum(-(-n // CHUNK) for n in SIZES)
    assert launch["grid"] == min(items, resident)


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("offset", [0, 4, 8], ids=["vector", "off4", "off8"])
def test_unaligned_buffers_take_the_element_path(rng, dtype, offset):
    assert_same_bits(Case(rng, "adamw", "global_norm", [dtype], sizes=[5, 1027, CHUNK + 7]),
                     offset=offset)


@pytest.mark.parametrize("rule", ["adamw", "nesterov", "sgd"])
def test_exact_allocations(rng, rule):
    """Every buffer exactly its size (odd sizes: a partial last quad): in the
    sanitizer build (.ci/run) an access past an end is an ASan report."""
    assert_same_bits(Case(rng, rule, "global_norm", GRAD_DTYPES, sizes=[1, 3, 5, 1027, CHUNK + 3]),
                     exact=True)


def test_more_tensors_than_threads_and_blocks(rng):
    """300 small tensors (and a large one): more partials and tensors than a
    block has threads, more tensors than blocks, per-tensor norms by block."""
    use_device(7)
    sizes = [int(n) for n in rng.integers(0, 600, size=300)] + [3 * CHUNK + 1]
    for clip in ("global_norm", "norm"):
        assert_same_bits(Case(rng, "adamw", clip, GRAD_DTYPES, sizes=sizes))


@pytest.mark.parametrize("resident", sorted(RESIDENT))
def test_every_resident_grid_from_1_to_64_blocks(rng, resident):
    use_device(resident)
    assert_same_bits(Case(rng, "nesterov", "norm", GRAD_DTYPES))


@pytest.mark.parametrize("extra", [1, 9])
def test_grids_larger_than_the_items(rng, extra):
    emu.configure(extra_blocks=extra)  # idle blocks take part in the grid syncs only
    assert_same_bits(Case(rng, "adam", "global_norm", [np.float32], sizes=[5, CHUNK + 1]))


def test_thread_and_block_orders_give_the_same_bits(rng):
    use_device(3)
    case = Case(rng, "adamw", "norm", GRAD_DTYPES)
    want = run_cpu(case)
    for threads, blocks, seed in [("forward", "forward", 0), ("reverse", "reverse", 0),
                                  ("random", "random", 1), ("random", "forward", 2),
                                  ("forward", "random", 3)]:
        emu.configure(thread_order=threads, block_order=blocks, seed=seed)
        assert run_emulated(case) == want, f"{threads}/{blocks}"


@pytest.mark.parametrize("rule", ["adam", "nesterov"])
def test_device_scalars_and_the_step_counter(rng, rule):
    """Learning rate, powers, clip and unscale read through device pointers
    (host values NaN); Adam's powers derived from a device step counter that
    the kernel increments: all the CPU kernel's bits."""
    for clip in ("global_norm", "none"):
        assert_same_bits(Case(rng, rule, clip, GRAD_DTYPES, unscale=0.25), pointers=True)
    case = Case(rng, rule, "global_norm", [np.float32, np.float16], from_step=True, step=12)
    assert_same_bits(case, pointers=True, increment=True)
    got = run_emulated(case, pointers=True, increment=True)
    assert np.frombuffer(got[-1], np.int64)[0] == 12  # iterations 11 -> 12
    # no partials to sync on (no norm wanted: no clip, no skip, no norm_out):
    # the kernel syncs before it stores the counter
    case = Case(rng, rule, "value", [np.float32], from_step=True, step=3, sizes=[5, 2 * CHUNK])
    assert_same_bits(case, increment=True, norms_out=False)
    assert np.frombuffer(run_emulated(case, increment=True, norms_out=False)[-1], np.int64)[0] == 3


@pytest.mark.parametrize("clip", ["global_norm", "none", "value"])
def test_a_skipped_step_writes_nothing(rng, clip):
    case = Case(rng, "adamw", clip, GRAD_DTYPES, skip=True, from_step=True, bad=(8, 100))
    got = run_emulated(case, increment=True)
    assert got == run_cpu(case, increment=True)
    unchanged = case.results(case.params, case.ms, case.vs, np.zeros(()), np.zeros(0),
                             np.array([case.step - 1], np.int64))
    n = len(case.params) * 3
    assert got[:n] == unchanged[:n] and got[-1] == unchanged[-1]
    assert np.isinf(np.frombuffer(got[n], _common.np_dtype(case.norm_code))[0])


def test_invalid_input_is_rejected_before_the_launch(rng):
    case = Case(rng, "adam", "global_norm", [np.float32], sizes=[8, 8])
    ps, gs, ms, vs, descs = case.buffers(np.array)
    ws = np.zeros(emu.update_cuda_workspace_bytes(descs), np.uint8)
    emu.reset_stats()
    a = case.args(emu)
    with pytest.raises(ValueError, match="workspace is missing or smaller"):
        emu.update_cuda(descs, a, ws.ctypes.data, ws.nbytes - 8, 0)
    bad = [descs[0], (descs[1][0], descs[1][1], 2, descs[0][3], descs[1][4], 8, True)]
    with pytest.raises(ValueError, match="tensor [01]'s m and tensor [01]'s m share memory"):
        emu.update_cuda(bad, a, ws.ctypes.data, ws.nbytes, 0)
    assert emu.launches() == []


def test_layouts_match_the_numpy_mirrors():
    """StateEntry and UpdateParams as the C++ compiler lays them out, against
    clipops._optim's NumPy dtypes (which a route launching the kernel itself
    fills)."""
    for size, fields, dtype in ((emu.STATE_ENTRY_SIZE, emu.STATE_ENTRY_FIELDS, _optim.STATE_ENTRY),
                                (emu.UPDATE_PARAMS_SIZE, emu.UPDATE_PARAMS_FIELDS,
                                 _optim.UPDATE_PARAMS)):
        assert size == dtype.itemsize
        assert [f[0] for f in fields] == list(dtype.names)
        for name, offset, nbytes in fields:
            dt, at = dtype.fields[name][:2]
            assert (at, dt.itemsize) == (offset, nbytes), name


# ---- teeth: broken kernels must fail ----------------------------------------------------------

# Each breaks the fused update one way (optim_kernel.cuh); the shared ones break
# the norm pass the update shares with the clip (clip_kernel.cuh).
TEETH = ["optim_no_grid_sync", "optim_decay_ignored", "optim_swap_mv", "optim_step_off_by_one",
         "no_syncthreads", "find_tensor_off_by_one", "vector_overrun"]


@pytest.mark.parametrize("variant", TEETH)
def test_teeth_a_broken_kernel_fails(rng, variant):
    mod = teeth_module(variant)
    # the checks above in one case: a norm to sync on, exclusions from the
    # decay, Adam's m and v, powers from the step counter
    case = Case(rng, "adamw", "global_norm", [np.float32, np.float16],
                sizes=[5, 1027, CHUNK + 3, 13, 2 * CHUNK], from_step=True)
    failures = failures_in_each_order(mod, lambda: assert_same_bits(case, mod=mod))
    assert failures, f"the {variant} kernel passed every check"


def test_teeth_vector_overrun_in_the_update_is_an_address_sanitizer_report():
    """In the sanitizer build (.ci/run: LD_PRELOAD of libasan), the over-reading
    variant on exactly sized buffers is stopped by AddressSanitizer."""
    assert_address_sanitizer_stops(
        "import numpy as np, test_emulation_optim as T\n"
        "from clipops import _emulation_teeth_vector_overrun as mod\n"
        "mod.set_device(mod.device(3, 1))\n"
        "case = T.Case(np.random.default_rng(0), 'adamw', 'global_norm', [np.float32],\n"
        "              sizes=[1027, 5])\n"
        "T.run_emulated(case, mod=mod, exact=True)\n")
