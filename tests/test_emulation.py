"""The CUDA kernel and its launcher (csrc/core/clip_kernel.cuh, clip_cuda.cu),
unchanged, run on the CPU by the CUDA emulation (csrc/emulation,
clipops._emulation): bitwise equal to the CPU kernel and within tolerance of
float64, the same bits in every thread and block order, and the emulation's
own detectors and teeth. docs/testing.md: "Testing the CUDA kernel without a GPU"."""

from __future__ import annotations

import ctypes
import importlib
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

import clipops.numpy as cn
from clipops import _core
from conftest import BF16, CHUNK, THREADS, assert_close, random_array, ref_clip, ref_norm

emu = pytest.importorskip(
    "clipops._emulation",
    reason="clipops was built without its CUDA emulation (CLIPOPS_EMULATION=OFF, or not GCC/Clang "
           "on Linux)")

DTYPES = [np.float16, np.float32, np.float64] + ([BF16] if BF16 is not None else [])
CODES = {np.dtype(name): code for name, code in _core.DTYPE_CODES.items() if name != "bfloat16"}
if BF16 is not None:
    CODES[BF16] = _core.DTYPE_CODES["bfloat16"]
SIZES = [0, 1, 3, 4, 5, 1023, 1024, 16383, 16384, 16385, 40000]
GUARD = 64  # bytes of 0xff around every buffer: a NaN in every float dtype
RESIDENT = {1: (1, 1), 2: (1, 2), 3: (3, 1), 7: (7, 1), 64: (16, 4)}  # blocks: (SMs, per SM)


def code_of(dtype) -> int:
    return CODES[np.dtype(dtype)]


def norm_dtype(arrays) -> np.dtype:
    code = _core.norm_dtype_of([code_of(a.dtype) for a in arrays])
    return next(d for d, c in CODES.items() if c == code)


def place(a, offset, fill=False):
    """A copy of `a` (or, with fill, NaN poison) `offset` bytes past a 64-byte
    boundary, between guards of 0xff bytes: an over-read makes the norm NaN,
    an over-write shows in the guards (check_guards)."""
    raw = np.full(a.nbytes + offset + 2 * GUARD + 64, 0xFF, np.uint8)
    start = (-raw.ctypes.data) % 64 + GUARD + offset
    view = raw[start:start + a.nbytes].view(a.dtype)
    if not fill:
        view[...] = a.ravel()
    return view


def check_guards(views):
    for i, v in enumerate(views):
        raw = v.base
        start = v.ctypes.data - raw.ctypes.data
        assert (raw[:start] == 0xFF).all() and (raw[start + v.nbytes:] == 0xFF).all(), \
            f"buffer {i}: written outside its {v.size} elements"


def use_device(resident: int, mod=emu):
    sms, per_sm = RESIDENT[resident]
    mod.set_device(mod.device(sms, per_sm))


def run(arrays, clip, *, use_norm=None, scale=True, in_offset=0, out_offset=0, in_place=False,
        pointers=False, norm_out=True, exact=False, mod=emu, norms=None, skip=False):
    """The emulated launcher over copies of `arrays`; returns (outputs, norm,
    table bytes from the workspace). Outputs, norm and workspace start as NaN.
    exact: tensors in allocations of exactly their size instead of between
    guards, so that AddressSanitizer sees any access past their ends. norms:
    an array of one norm-dtype element per tensor for tensor_norms (guarded
    by the caller with place()), or None. skip: skip_nonfinite."""
    ndt = norm_dtype(arrays)
    clip_v = float(np.asarray(clip).astype(ndt))
    use_v = None if use_norm is None else float(np.asarray(use_norm).astype(ndt))
    if exact:
        ins = [np.array(a) for a in arrays]
        outs = ins if in_place else [np.full_like(a, np.nan) for a in arrays]
    else:
        ins = [place(a, in_offset) for a in arrays]
        outs = ins if in_place else [place(a, out_offset, fill=True) for a in arrays]
    norm = place(np.zeros((), ndt), 0, fill=True).reshape(())
    # scalars as device pointers: the host values passed beside them are NaN, so reading them shows
    clip_buf, use_buf = np.array(clip_v, ndt), np.array(np.nan if use_v is None else use_v, ndt)
    descs = [(i.ctypes.data, o.ctypes.data if scale else 0, i.size, code_of(i.dtype))
             for i, o in zip(ins, outs)]
    ws = place(np.zeros(mod.cuda_workspace_bytes(descs), np.uint8), 0, fill=True)
    mod.clip_cuda(descs, CODES[np.dtype(ndt)], scale,
                  np.nan if pointers else clip_v, clip_buf.ctypes.data if pointers else 0,
                  None if (pointers or use_v is None) else use_v,
                  use_buf.ctypes.data if (pointers and use_v is not None) else 0,
                  norm.ctypes.data if norm_out else 0, ws.ctypes.data, ws.nbytes, 0,
                  tensor_norms=0 if norms is None else norms.ctypes.data, skip_nonfinite=skip)
    mod.synchronize()
    check_guards(([] if exact else outs) + [norm, ws])
    return outs, norm, ws[:40 * len(arrays)].tobytes()


def reference(arrays, clip, *, use_norm=None, scale=True):
    """The CPU kernel (clipops.numpy) on aligned copies."""
    copies = [np.array(a) for a in arrays]
    if not scale:
        return None, cn.global_norm(copies)
    return cn.clip_by_global_norm(copies, clip, use_norm=use_norm)


def assert_same_bits(arrays, clip, mod=emu, **kw):
    """Runs the emulated kernel; asserts its norm and outputs are the CPU
    kernel's, bit for bit. Returns (outputs, norm)."""
    scale = kw.get("scale", True)
    outs, norm, _ = run(arrays, clip, mod=mod, **kw)
    ref_outs, ref_n = reference(arrays, clip, use_norm=kw.get("use_norm"), scale=scale)
    if kw.get("norm_out", True):
        assert norm.tobytes() == ref_n.tobytes(), f"norm {norm} != CPU {ref_n}"
    if scale:
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert o.tobytes() == r.tobytes(), f"tensor {i} (size {r.size}) differs from the CPU's"
    return outs, norm


def sized_list(rng, count, dtypes, sizes=SIZES):
    """`count` tensors cycling through the sizes (empty ones between others) and dtypes."""
    out = []
    for k in range(count):
        dt = dtypes[k % len(dtypes)]
        # 16-bit values stay small so the float64 comparison is far from half's range
        out.append(random_array(rng, (sizes[(k * 7) % len(sizes)],), dt,
                                0.05 if np.dtype(dt).itemsize == 2 else 1.0))
    return out


def items_of(arrays) -> int:
    return sum(-(-a.size // CHUNK) for a in arrays)


@pytest.fixture(autouse=True)
def default_emulation():
    emu.configure()
    use_device(64)
    yield
    emu.configure()


# ---- bitwise equal to the CPU kernel, and within tolerance of float64 ------------------

@pytest.mark.parametrize("count, resident", [(1, 1), (7, 2), (110, 3), (111, 7), (300, 64)])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"], ids=lambda d: d if d == "mixed" else np.dtype(d).name)
def test_lists_bitwise_equal_to_cpu_and_close_to_float64(rng, dtype, count, resident):
    use_device(resident, emu)
    dts = DTYPES if dtype == "mixed" else [dtype]
    arrays = sized_list(rng, count, dts)
    if count == 1:
        arrays = [random_array(rng, (40000,), dts[0])]
    for factor in (0.5, 2.0):  # clipped, then not clipped
        clip = ref_norm(arrays) * factor
        outs, norm = assert_same_bits(arrays, clip)
        ndt = norm_dtype(arrays)
        # tolerances from conftest.TOL: the norm in its dtype; outputs of a mixed
        # list take a float32 scale, so float64 outputs are float32-accurate
        assert_close(norm, ref_norm(arrays), ndt, "norm")
        ref, _ = ref_clip(arrays, float(np.asarray(clip).astype(ndt)))
        for i, (o, r, a) in enumerate(zip(outs, ref, arrays)):
            coarser = a.dtype if a.dtype.itemsize <= np.dtype(ndt).itemsize else ndt
            assert_close(o, r, coarser, f"tensor {i} (size {a.size})")
    launch = emu.launches()[-1]
    assert launch["cooperative"] and launch["block"] == THREADS
    assert launch["grid"] == max(1, min(items_of(arrays), resident))


@pytest.mark.parametrize("resident", sorted(RESIDENT))
def test_grid_and_table(rng, resident):
    """The launcher's grid (one block per item, at most the resident blocks)
    and its table, field for field as the NVRTC route builds it."""
    nv = pytest.importorskip("clipops._nvrtc", reason="CuPy is not installed")
    use_device(resident)
    arrays = sized_list(rng, 23, [np.float32])
    outs, norm, table = run(arrays, 1.0)
    ref_outs, ref_n = reference(arrays, 1.0)
    assert norm.tobytes() == ref_n.tobytes()
    assert all(o.tobytes() == r.tobytes() for o, r in zip(outs, ref_outs))
    assert emu.launches()[-1]["grid"] == min(items_of(arrays), resident)
    want, items = nv.build_table([(1, 2, a.size, code_of(a.dtype)) for a in arrays])
    got = np.frombuffer(table, dtype=nv.TENSOR_ENTRY)
    assert items == items_of(arrays)
    for field in ("numel", "first_item", "dtype", "pad"):
        np.testing.assert_array_equal(got[field], want[field], err_msg=field)


@pytest.mark.parametrize("extra", [1, 10])
def test_grids_larger_than_the_items(rng, extra):
    # blocks beyond the last item only take part in the grid sync
    emu.configure(extra_blocks=extra)
    arrays = sized_list(rng, 4, [np.float64, np.float32])
    assert_same_bits(arrays, ref_norm(arrays) * 0.5)
    assert emu.launches()[-1]["grid"] == items_of(arrays) + extra


def test_empty_list_and_empty_tensors_only(rng):
    # no work item: one block still writes the norm (0)
    arrays = [np.zeros(0, np.float32), np.zeros(0, np.float32)]
    _, norm = assert_same_bits(arrays, 1.0)
    assert float(norm) == 0.0 and emu.launches()[-1]["grid"] == 1


# Offsets from a 16-byte boundary, in whole elements (as a GPU needs): inputs
# and outputs misaligned alone and together, so the vector and scalar paths run.
MISALIGNED = [(dt, i, o) for dt in DTYPES
              for i, o in [(2, 0), (4, 4), (6, 12), (8, 2), (12, 8), (0, 6), (0, 4), (8, 0)]
              if i % np.dtype(dt).itemsize == 0 and o % np.dtype(dt).itemsize == 0]


@pytest.mark.parametrize("dtype, in_offset, out_offset", MISALIGNED,
                         ids=[f"{np.dtype(d).name}-{i}-{o}" for d, i, o in MISALIGNED])
def test_misaligned_inputs_and_outputs(rng, dtype, in_offset, out_offset):
    arrays = sized_list(rng, 11, [dtype])
    assert_same_bits(arrays, ref_norm(arrays) * 0.5, in_offset=in_offset, out_offset=out_offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_exact_allocations(rng, dtype):
    """Tensors whose ends are their allocations' ends: under the sanitizer build
    (CI), a vector load past an end is a heap-buffer-overflow report."""
    arrays = sized_list(rng, 11, [dtype], sizes=[1, 3, 5, 7, 1023, 16385, 2, 0, 6])
    assert_same_bits(arrays, ref_norm(arrays) * 0.5, exact=True)


def _readonly_copies(arrays):
    """The arrays copied into one anonymous mapping, made read-only by mprotect."""
    size = sum(-(-a.nbytes // 64) * 64 for a in arrays) + mmap.PAGESIZE
    m = mmap.mmap(-1, size)
    views, at = [], 0
    for a in arrays:
        v = np.frombuffer(m, dtype=a.dtype, count=a.size, offset=at)
        v[...] = a
        views.append(v)
        at += -(-a.nbytes // 64) * 64
    return m, views


def test_forwarded_buffers_with_scale_one_are_not_written(rng):
    """Outputs that are the inputs (forwarded buffers) and a scale of exactly 1:
    the buffers are made read-only, so a single write would fault."""
    arrays = sized_list(rng, 12, [np.float32, np.float16])
    m, views = _readonly_copies(arrays)
    libc = ctypes.CDLL(None, use_errno=True)
    base = np.frombuffer(m, np.uint8).ctypes.data  # the mapping's first page
    assert libc.mprotect(ctypes.c_void_p(base), ctypes.c_size_t(len(m)), 1) == 0  # PROT_READ
    try:
        ndt = norm_dtype(views)
        norm = np.full((), np.nan, ndt)
        descs = [(v.ctypes.data, v.ctypes.data, v.size, code_of(v.dtype)) for v in views]
        ws = np.zeros(emu.cuda_workspace_bytes(descs) // 8 + 2, np.float64)
        emu.clip_cuda(descs, CODES[np.dtype(ndt)], True, 1e30, 0, None, 0, norm.ctypes.data,
                      ws.ctypes.data, ws.nbytes, 0)
        emu.synchronize()
    finally:
        assert libc.mprotect(ctypes.c_void_p(base), ctypes.c_size_t(len(m)), 3) == 0
    assert norm.tobytes() == reference(arrays, 1e30)[1].tobytes()
    for v, a in zip(views, arrays):
        assert v.tobytes() == a.tobytes()


def test_in_place_with_clipping(rng):
    arrays = sized_list(rng, 12, [np.float32, np.float64, np.float16])
    assert_same_bits(arrays, ref_norm(arrays) * 0.25, in_place=True)


@pytest.mark.parametrize("pointers", [False, True], ids=["values", "device-pointers"])
@pytest.mark.parametrize("use_norm", [None, 3.0], ids=["computed", "use_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_scalars_norm_out_and_scale_off(rng, dtype, use_norm, pointers):
    arrays = sized_list(rng, 9, [dtype])
    clip = ref_norm(arrays) * 0.5
    assert_same_bits(arrays, clip, use_norm=use_norm, pointers=pointers)
    assert_same_bits(arrays, clip, use_norm=use_norm, pointers=pointers, norm_out=False)
    if use_norm is None:
        assert_same_bits(arrays, clip, scale=False, pointers=pointers)


SPECIAL = {
    "inf": np.inf, "-inf": -np.inf, "nan": np.nan, "zeros": 0.0, "-0": -0.0,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", ["inf", "-inf", "nan", "zeros", "-0", "tiny", "huge"])
def test_special_values(rng, dtype, case):
    arrays = sized_list(rng, 7, [dtype])
    info = (np.finfo if np.dtype(dtype) != BF16 else importlib.import_module("ml_dtypes").finfo)(dtype)
    if case in ("zeros", "-0"):
        arrays = [np.full(a.shape, SPECIAL[case], dtype) for a in arrays]
    elif case in SPECIAL:
        arrays[2][len(arrays[2]) // 2] = SPECIAL[case]
    elif case == "tiny":  # subnormals: squares underflow
        arrays = [(a * 0 + np.asarray(info.smallest_subnormal, dtype) * (1 + (a > 0))).astype(dtype)
                  for a in arrays]
    else:  # squares overflow the float accumulator
        arrays = [(a * 0 + np.asarray(info.max, dtype) * np.asarray(0.5, dtype)).astype(dtype)
                  for a in arrays]
    for clip in (1.0, float(info.max)):
        assert_same_bits(arrays, clip)


# ---- thread and block order ---------------------------------------------------------------

def test_thread_and_block_orders_give_the_same_bits(rng):
    arrays = sized_list(rng, 40, DTYPES)
    use_device(7)
    results = []
    for threads, blocks, seed in [("forward", "forward", 0), ("reverse", "reverse", 0),
                                  ("random", "random", 1), ("random", "forward", 2),
                                  ("forward", "random", 3)]:
        emu.configure(thread_order=threads, block_order=blocks, seed=seed)
        outs, norm, _ = run(arrays, ref_norm(arrays) * 0.5)
        results.append([norm.tobytes()] + [o.tobytes() for o in outs])
    assert all(r == results[0] for r in results[1:])


# ---- what the launcher asks of the runtime ----------------------------------------------------

def test_launcher_never_waits_and_stages_through_pinned_memory(rng):
    """Two calls on two streams, queued before any work runs: the second must
    not reuse the first's staging buffer (its copy has not run), and no copy is
    pageable."""
    emu.reset_stats()
    a = sized_list(rng, 5, [np.float32])
    b = sized_list(rng, 8, [np.float64])
    runs = []
    for arrays, stream in ((a, 0), (b, emu.stream_create())):
        outs = [place(x, 0, fill=True) for x in arrays]
        norm = np.full((), np.nan, arrays[0].dtype)
        descs = [(x.ctypes.data, o.ctypes.data, x.size, code_of(x.dtype)) for x, o in zip(arrays, outs)]
        ws = np.zeros(emu.cuda_workspace_bytes(descs) // 8 + 2, np.float64)
        emu.clip_cuda(descs, code_of(arrays[0].dtype), True, 1.0, 0, None, 0, norm.ctypes.data,
                      ws.ctypes.data, ws.nbytes, stream)
        runs.append((arrays, outs, norm, ws))
    before = emu.pinned_buffers()
    emu.synchronize()
    for arrays, outs, norm, _ in runs:
        ref_outs, ref_n = reference(arrays, 1.0)
        assert norm.tobytes() == ref_n.tobytes()
        assert all(o.tobytes() == r.tobytes() for o, r in zip(outs, ref_outs))
    assert before >= 2 and emu.pageable_copies() == 0


def test_a_cooperative_grid_beyond_residency_is_refused(rng):
    use_device(2)
    emu.configure(extra_blocks=1)  # 2 blocks for 2+ items, plus one: not all resident
    with pytest.raises(RuntimeError, match="too many blocks in cooperative launch"):
        run(sized_list(rng, 5, [np.float32], sizes=[40000]), 1.0)


def test_a_device_without_cooperative_launch_is_refused(rng):
    emu.set_device(emu.device(4, 2, cooperative=False))
    with pytest.raises(RuntimeError, match="cooperative launches"):
        run([random_array(rng, (10,), np.float32)], 1.0)


def test_norm_out_aliasing_the_clip_pointer_is_rejected(rng):
    # issue 8 item 12: run, block 0 stores the norm over clip_norm before the other
    # blocks read it (this emulation showed outputs scaled by the wrong clip);
    # validate() refuses the call before anything runs, and nothing is written
    arrays = sized_list(rng, 30, [np.float32])
    use_device(7)
    clip = np.array(np.float32(ref_norm(arrays) * 0.5))
    outs = [place(a, 0, fill=True) for a in arrays]
    before = [o.tobytes() for o in outs]
    descs = [(a.ctypes.data, o.ctypes.data, a.size, 2) for a, o in zip(arrays, outs)]
    ws = np.zeros(emu.cuda_workspace_bytes(descs) // 8 + 2, np.float64)
    with pytest.raises(ValueError, match="clip_norm and norm_out"):
        emu.clip_cuda(descs, 2, True, np.nan, clip.ctypes.data, None, 0, clip.ctypes.data,
                      ws.ctypes.data, ws.nbytes, 0)
    emu.synchronize()
    assert [o.tobytes() for o in outs] == before
    assert clip == np.float32(ref_norm(arrays) * 0.5)


def test_every_half_bit_pattern_scales_to_the_software_path_s_bits():
    # The CPU kernel converts float16 with F16C where the CPU has it, the CUDA kernel
    # (emulated here) with clip_math.h's software conversions: every one of the 65,536
    # half values (subnormals, infs, NaNs with any payload), summed and scaled by
    # clipping scales that round, overflow, underflow and are NaN, gives the same bits
    use_device(3)
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    # (a product of two NaNs may carry either one's payload, by the compiler's operand
    # order, and a GPU writes a canonical NaN: lists with NaNs get a finite use_norm)
    small = finite[np.abs(finite) < 1]  # a list whose float16 norm (~90) does not overflow
    cases = [([small], 1.0, None), ([small], 3.0, None), ([small], 1e-3, None),
             ([every], 2.5e-4, 7.0), ([every], 0.3, 0.7), ([finite], 1.0, np.nan)]
    for arrays, clip, use in cases:
        outs, _ = assert_same_bits(arrays, clip, use_norm=use)
        assert np.isnan(outs[0]).sum() == (np.isnan(arrays[0]).sum() if use == use
                                           else arrays[0].size)


def test_misaligned_tensors_are_rejected_before_the_launch(rng):
    # A GPU faults on a float64 access that is not 8-byte aligned (and the fault
    # ends the CUDA context): validate() refuses such pointers and writes nothing
    use_device(3)
    a = random_array(rng, (CHUNK + 3,), np.float64)
    for in_offset, out_offset in ((4, 0), (0, 4)):
        ins, outs = place(a, in_offset), place(a, out_offset, fill=True)
        before = outs.base.tobytes()
        descs = [(ins.ctypes.data, outs.ctypes.data, a.size, 3)]
        ws = place(np.zeros(emu.cuda_workspace_bytes(descs), np.uint8), 0, fill=True)
        with pytest.raises(ValueError, match="tensor 0: the data is not aligned to its 8-byte"):
            emu.clip_cuda(descs, 3, True, 1.0, 0, None, 0, 0, ws.ctypes.data, ws.nbytes, 0)
        emu.synchronize()
        assert outs.base.tobytes() == before


# ---- the emulation's detectors ------------------------------------------------------------------

def test_shuffles_move_the_right_values():
    out = np.full(64 * 8, -1, np.int32)
    emu.probe("shuffles", 1, 64, False, out.ctypes.data)
    lane = np.arange(64) % 32
    got = out.reshape(64, 8)
    np.testing.assert_array_equal(got[:, 0], 30)  # __shfl_sync from lane 3
    np.testing.assert_array_equal(got[:, 1], np.where(lane >= 2, lane - 2, lane) * 10)
    np.testing.assert_array_equal(got[:, 2], np.where(lane + 5 < 32, lane + 5, lane) * 10)
    np.testing.assert_array_equal(got[:, 3], (lane ^ 6) * 10)
    np.testing.assert_array_equal(got[:, 4], np.where(lane % 8 + 3 < 8, lane + 3, lane) * 10)
    np.testing.assert_array_equal(got[:, 5], np.where(lane < 31, lane + 1, lane))
    np.testing.assert_array_equal(got[:, 6], np.where(lane < 16, (lane ^ 1) * 10, -1))
    np.testing.assert_array_equal(got[:, 7], 0)  # blockIdx.x


@pytest.mark.parametrize("probe, grid, cooperative, message", [
    ("barrier_not_reached", 1, False, "a barrier that not every thread of the block reaches: "
                                      "threads 0-31 exited; threads 32-255 wait at __syncthreads"),
    ("divergent_barriers", 2, False, "threads wait at different barriers"),
    ("deadlock", 1, False, "deadlock, no thread can proceed: threads 0-15 wait at __shfl_down_sync"),
    ("shuffle_outside_mask", 1, False, "lane 15 reads lane 16, which is not in the mask"),
    ("lane_not_in_mask", 1, False, "is called by lane 16, which its mask does not include"),
    ("grid_sync", 2, False, "this_grid\\(\\).sync\\(\\) at probe_kernels.cc:\\d+ in a kernel not launched "
                            "with cudaLaunchCooperativeKernel"),
    ("grid_sync_skipped", 4, True, "reached by blocks 0, 2-3, but blocks 1 exited without it"),
])
def test_detects_rather_than_hangs(probe, grid, cooperative, message):
    out = np.zeros(4096, np.int32)
    with pytest.raises(RuntimeError, match=message):
        emu.probe(probe, grid, THREADS, cooperative, out.ctypes.data)
    # the emulation is usable again afterwards
    emu.probe("grid_sync", 4, THREADS, True, out.ctypes.data)
    assert (out[:4 * THREADS] == 1).all()


def test_detects_a_cooperative_grid_beyond_residency():
    out = np.zeros(4096, np.int32)
    use_device(7)
    with pytest.raises(RuntimeError, match="too many blocks in cooperative launch"):
        emu.probe("grid_sync", 8, THREADS, True, out.ctypes.data)


# ---- the layout of the NVRTC route's table --------------------------------------------------------

def test_nvrtc_table_dtype_matches_the_c_struct():
    nv = pytest.importorskip("clipops._nvrtc", reason="CuPy is not installed")
    assert nv.TENSOR_ENTRY.itemsize == emu.TENSOR_ENTRY_SIZE
    assert list(nv.TENSOR_ENTRY.names) == [f for f, _, _ in emu.TENSOR_ENTRY_FIELDS]
    for field, offset, size in emu.TENSOR_ENTRY_FIELDS:
        dt, at = nv.TENSOR_ENTRY.fields[field][:2]
        assert (at, dt.itemsize) == (offset, size), field


# ---- teeth: broken kernels must fail ----------------------------------------------------------------

TEETH = ["no_grid_sync", "no_syncthreads", "find_tensor_off_by_one", "vector_overrun"]


def teeth_module(variant: str):
    """The emulation built with a broken kernel (clipops._emulation_teeth_<variant>),
    on a 3-block device; skips where the variants were not built."""
    try:
        mod = importlib.import_module(f"clipops._emulation_teeth_{variant}")
    except ImportError:
        pytest.skip("the teeth variants are built with CLIPOPS_EMULATION_TEETH=ON (CI does)")
    sms, per_sm = RESIDENT[3]
    mod.set_device(mod.device(sms, per_sm))
    return mod


def failures_in_each_order(mod, check) -> list[str]:
    """check() under forward, reverse and random thread and block orders; the
    first line of each failure (an AssertionError or the launch's RuntimeError)."""
    failures = []
    for threads, blocks in [("forward", "forward"), ("reverse", "reverse"), ("random", "random")]:
        mod.configure(thread_order=threads, block_order=blocks, seed=5)
        try:
            check()
        except (AssertionError, RuntimeError) as exc:
            failures.append(f"{threads}/{blocks}: {str(exc).splitlines()[0]}")
    return failures


def assert_address_sanitizer_stops(script: str) -> None:
    """In the sanitizer build (.ci/run: LD_PRELOAD of libasan), `script` (run
    from tests/ with the vector_overrun variant) ends in AddressSanitizer's
    heap-buffer-overflow report; skips elsewhere."""
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("needs the AddressSanitizer build, run by .ci/run")
    try:
        importlib.import_module("clipops._emulation_teeth_vector_overrun")
    except ImportError:
        pytest.skip("the teeth variants are built with CLIPOPS_EMULATION_TEETH=ON (CI does)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), timeout=300)
    assert proc.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.parametrize("variant", TEETH)
def test_teeth_a_broken_kernel_fails(rng, variant):
    """Each variant (CMake CLIPOPS_EMULATION_TEETH=ON) breaks the kernel one
    way; the checks above must catch it in some thread or block order."""
    mod = teeth_module(variant)
    arrays = sized_list(rng, 13, [np.float32, np.float16])
    failures = failures_in_each_order(
        mod, lambda: assert_same_bits(arrays, ref_norm(arrays) * 0.5, mod=mod))
    assert failures, f"the {variant} kernel passed every check"


def test_teeth_vector_overrun_is_an_address_sanitizer_report():
    """In the sanitizer build (CI: LD_PRELOAD of libasan), the over-reading
    variant on exactly sized tensors is stopped by AddressSanitizer."""
    assert_address_sanitizer_stops(
        "import numpy as np, test_emulation as T\n"
        "from clipops import _emulation_teeth_vector_overrun as mod\n"
        "arrays = [np.ones(1027, np.float32), np.ones(5, np.float32)]\n"
        "T.run(arrays, 1.0, exact=True, mod=mod)\n")


# ---- gradient health: per-tensor norms and the non-finite policy -----------------

@pytest.mark.parametrize("resident", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_tensor_norms_are_the_cpu_kernel_s_bits(rng, dtype, resident):
    # fewer blocks than tensors (1, 3) makes blocks loop over the tensors
    use_device(resident)
    dts = [np.float16, np.float32, np.float64] if dtype == "mixed" else [dtype]
    sizes = [3, CHUNK + 1, 0, 2 * CHUNK, 1024, 5 * CHUNK - 7, 1]
    arrays = [random_array(rng, (n,), dts[k % len(dts)], scale=3.0) for k, n in enumerate(sizes)]
    ndt = norm_dtype(arrays)
    for use_norm in (None, 7.0):  # computed even when use_norm replaces the global norm
        norms = place(np.zeros(len(arrays), ndt), 0, fill=True)
        outs, norm, _ = run(arrays, 1.0, use_norm=use_norm, norms=norms)
        check_guards([norms])
        want = cn.clip_by_global_norm([np.array(a) for a in arrays], 1.0, use_norm=use_norm,
                                      return_norms=True)
        assert norms.tobytes() == want.tensor_norms.tobytes()
        assert norm.tobytes() == np.asarray(want.global_norm).tobytes()
        for o, w in zip(outs, want.clipped):
            assert o.tobytes() == w.tobytes()
        for a, n in zip(arrays, norms):  # and each is a norm: float64 reference
            assert_close(np.asarray(n, np.float64), ref_norm([a]), ndt, "tensor norm")


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_skip_nonfinite_leaves_the_inputs_and_nan_policy_scales_by_nan(rng, bad):
    use_device(3)
    arrays = [random_array(rng, (n,), np.float32) for n in (5, CHUNK + 3, 40)]
    arrays[1][7] = bad
    outs, norm, _ = run(arrays, 1.0, skip=True)
    assert not np.isfinite(norm)
    for o, a in zip(outs, arrays):
        assert o.tobytes() == a.tobytes()
    outs, _, _ = run(arrays, 1.0, skip=False)  # TF's behaviour: NaN everywhere
    assert all(np.isnan(o).all() for o in outs)
    finite = [random_array(rng, (n,), np.float32, scale=10.0) for n in (5, CHUNK + 3)]
    skipped, _, _ = run(finite, 1.0, skip=True)  # a finite norm clips as always
    plain, _, _ = run(finite, 1.0)
    assert [o.tobytes() for o in skipped] == [o.tobytes() for o in plain]


def run_mode(arrays, mode, clip=0.0, lo=0.0, hi=0.0):
    """The emulated launcher in clip_by_norm (1) or clip_by_value (2) mode."""
    ndt = norm_dtype(arrays)
    ins = [place(a, 0) for a in arrays]
    outs = [place(a, 8, fill=True) for a in arrays]  # element-aligned, not 16-byte aligned
    descs = [(i.ctypes.data, o.ctypes.data, i.size, code_of(i.dtype)) for i, o in zip(ins, outs)]
    ws = place(np.zeros(emu.cuda_workspace_bytes(descs), np.uint8), 0, fill=True)
    emu.clip_cuda(descs, CODES[np.dtype(ndt)], True, float(np.asarray(clip).astype(ndt)), 0, None, 0,
                  0, ws.ctypes.data, ws.nbytes, 0, mode=mode, clip_min=float(np.asarray(lo).astype(ndt)),
                  clip_max=float(np.asarray(hi).astype(ndt)))
    emu.synchronize()
    check_guards(outs + [ws])
    return outs


@pytest.mark.parametrize("pointer", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_unscale_is_the_cpu_kernel_s_bits(rng, dtype, pointer):
    # the loss-scale inverse folded into the one launch: outputs, norm and per-tensor norms
    # equal the CPU kernel's, with unscale a host value or a device pointer (Keras' variable)
    use_device(3)
    dts = [np.float16, np.float32, np.float64] if dtype == "mixed" else [dtype]
    sizes = [3, CHUNK + 1, 0, 2 * CHUNK, 1024, 5 * CHUNK - 7, 1]
    arrays = [random_array(rng, (n,), dts[k % len(dts)], scale=0.05) * 64
              for k, n in enumerate(sizes)]
    ndt = norm_dtype(arrays)
    u = 2.0 ** -6
    for clip in (0.5, 1e4):  # clipped, and not
        want = cn.clip_by_global_norm([np.array(a) for a in arrays], clip, unscale=u,
                                      return_norms=True)
        ins = [place(a, 0) for a in arrays]
        outs = [place(a, 0, fill=True) for a in arrays]
        norm = place(np.zeros((), ndt), 0, fill=True).reshape(())
        norms = place(np.zeros(len(arrays), ndt), 0, fill=True)
        u_buf = np.array(u, ndt)
        descs = [(i.ctypes.data, o.ctypes.data, i.size, code_of(i.dtype)) for i, o in zip(ins, outs)]
        ws = place(np.zeros(emu.cuda_workspace_bytes(descs), np.uint8), 0, fill=True)
        emu.clip_cuda(descs, CODES[np.dtype(ndt)], True, float(np.asarray(clip).astype(ndt)), 0,
                      None, 0, norm.ctypes.data, ws.ctypes.data, ws.nbytes, 0,
                      tensor_norms=norms.ctypes.data, unscale=np.nan if pointer else u,
                      unscale_ptr=u_buf.ctypes.data if pointer else 0)
        emu.synchronize()
        check_guards(outs + [norm, norms, ws])
        assert [o.tobytes() for o in outs] == [w.tobytes() for w in want.clipped]
        assert norm.tobytes() == np.asarray(want.global_norm).tobytes()
        assert norms.tobytes() == want.tensor_norms.tobytes()


@pytest.mark.parametrize("resident", [1, 3, 64])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_clip_by_norm_and_by_value_are_the_cpu_kernel_s_bits(rng, dtype, resident):
    use_device(resident)  # 1 and 3 blocks: blocks loop over tensors between the two grid syncs
    dts = [np.float16, np.float32, np.float64] if dtype == "mixed" else [dtype]
    sizes = [3, CHUNK + 1, 0, 2 * CHUNK, 1024, 5 * CHUNK - 7, 1]
    arrays = [random_array(rng, (n,), dts[k % len(dts)], scale=0.05) for k, n in enumerate(sizes)]
    arrays[0][1] = np.nan
    for clip in (0.5, 100.0):
        got = run_mode(arrays, _core.MODES["norm"], clip=clip)
        want = cn.clip_by_norm([np.array(a) for a in arrays], clip)
        assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
    got = run_mode(arrays, _core.MODES["value"], lo=-0.01, hi=0.02)
    want = cn.clip_by_value([np.array(a) for a in arrays], -0.01, 0.02)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
