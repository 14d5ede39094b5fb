"""The framework-free CPU path (clipops.numpy -> pybind11 -> core), without TF."""

from __future__ import annotations

import numpy as np
import pytest

import clipops.numpy as cn
from conftest import (BF16, BOUNDARY_SIZES, CHUNK, LANES, THREADS, assert_close, model_norm,
                      model_scale, random_array, ref_clip, ref_norm)

DTYPES = [np.float16, np.float32, np.float64] + ([BF16] if BF16 is not None else [])


def scaled_list(rng, sizes, dtype):
    # 16-bit lists are kept small in magnitude only so the float64 reference
    # comparison stays far from half's range; clipops itself does not need it.
    scale = 0.05 if np.dtype(dtype).itemsize == 2 else 1.0
    return [random_array(rng, (n,), dtype, scale) for n in sizes]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("clip_factor", [0.5, 2.0], ids=["clipped", "not-clipped"])
def test_boundary_sizes_against_float64(rng, dtype, clip_factor):
    arrays = scaled_list(rng, BOUNDARY_SIZES, dtype)
    norm64 = ref_norm(arrays)
    clip = float(np.asarray(norm64 * clip_factor).astype(dtype))
    out, norm = cn.clip_by_global_norm(arrays, clip)
    assert norm.dtype == np.dtype(dtype) and norm.shape == ()
    assert_close(norm, norm64, dtype, "norm")
    ref, _ = ref_clip(arrays, clip)
    for i, (o, r, a) in enumerate(zip(out, ref, arrays)):
        assert o.dtype == a.dtype and o.shape == a.shape
        assert_close(o, r, dtype, f"tensor {i} (size {a.size})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_bitwise_equal_to_documented_order(rng, dtype):
    """The kernel follows docs/design.md's reduction order exactly: an independent
    NumPy model of that order gives the same bits, for norm and outputs."""
    sizes = BOUNDARY_SIZES + list(rng.integers(1, 3 * CHUNK, size=20))
    arrays = scaled_list(rng, sizes, dtype)
    clip = float(np.asarray(ref_norm(arrays) * 0.3).astype(dtype))
    out, norm = cn.clip_by_global_norm(arrays, clip)
    want_norm = model_norm(arrays, dtype)
    assert norm.tobytes() == want_norm.tobytes(), (norm, want_norm)
    scale = model_scale(want_norm, clip, dtype)
    for o, a in zip(out, arrays):
        want = (a.astype(np.float32) * np.float32(scale)).astype(dtype) if a.dtype.itemsize == 2 \
            else a * a.dtype.type(scale)
        assert o.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: np.dtype(d).name)
def test_each_lane_adds_its_rows_in_order(dtype):
    """Random data hides the order of a lane's float additions: the final norm
    rounds their last bits away. Here lane 0 holds 1 and fifteen 2^-12 (squares
    1 and 2^-24: each a tie that rounds back to 1 after the 1, but that add up
    to more than an ulp when added first): the documented order (row after row)
    gives exactly 1, any other grouping of a lane's rows another norm. The
    second tensor (5 rows: one group of rows and one left over) ends in the 1."""
    lanes = LANES
    small = 2.0 ** -12
    full = np.zeros(CHUNK, dtype)
    full[0], full[lanes::lanes] = 1.0, small
    short = np.zeros(5 * lanes, dtype)
    short[:4 * lanes:lanes], short[4 * lanes] = small, 1.0
    # a float32 tensor makes the norm float32 for the 16-bit dtypes (a mixed list)
    for arrays in ([full, np.zeros(1, np.float32)], [short, np.zeros(1, np.float32)]):
        want = model_norm(arrays, np.float32)
        assert cn.global_norm(arrays).tobytes() == want.tobytes()
        # the input tells orders apart: with lane 0's rows reversed the model differs
        flipped = [arrays[0].reshape(-1, lanes)[::-1].ravel(), arrays[1]]
        assert model_norm(flipped, np.float32) != want
    assert model_norm([full, np.zeros(1, np.float32)], np.float32) == 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_lists_past_the_streaming_threshold_keep_their_bits(rng, dtype):
    """A list past kStreamBytes (clip_cpu.cc: 32 MiB of inputs; 68 MiB here, past
    the old 64 too) is scaled with streaming stores into fresh outputs: the
    same bits as the model, every element written, and the groups of 8 halves
    with a NaN product (redone by the software path, with ordinary stores)
    among streamed ones."""
    big = (68 << 20) // np.dtype(dtype).itemsize + 5  # not a whole number of groups
    arrays = [random_array(rng, (n,), dtype, 0.05) for n in (big, 1, 7, CHUNK + 3, 1000)]
    bad = rng.choice(big, 40, replace=False)
    arrays[0][bad[:20]] = np.nan
    arrays[0][bad[20:]] = np.inf
    arrays[0][-1] = np.nan  # in the tail after the last whole group
    # use_norm: a finite scale, so the NaN groups stay few and local
    out, _ = cn.clip_by_global_norm(arrays, 1.0, use_norm=3.0)
    scale = model_scale(np.asarray(3.0).astype(dtype), 1.0, dtype)
    assert 0 < scale < 1
    for i, (o, a) in enumerate(zip(out, arrays)):
        want = (a.astype(np.float32) * np.float32(scale)).astype(dtype)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(o), nan), i
        assert o[~nan].tobytes() == want[~nan].tobytes(), i  # NaN payloads aside


def test_more_partials_than_threads_and_many_tensors(rng):
    # 5,000 tensors, and more work items than one block has threads (256), so
    # the final fold wraps around several times.
    sizes = list(rng.integers(0, 300, size=5000)) + [CHUNK * (THREADS + 7) + 11]
    arrays = scaled_list(rng, sizes, np.float32)
    out, norm = cn.clip_by_global_norm(arrays, 1.0)
    assert norm.tobytes() == model_norm(arrays, np.float32).tobytes()
    ref, _ = ref_clip(arrays, 1.0)
    for i in rng.choice(len(arrays), 50, replace=False).tolist() + [len(arrays) - 1]:
        assert_close(out[i], ref[i], np.float32, f"tensor {i}")


def test_mixed_dtypes_one_call(rng):
    dts = [np.float16, np.float32, np.float64, np.float32] + ([BF16] if BF16 is not None else [])
    arrays = [random_array(rng, (CHUNK + 5,), dt, 0.05) for dt in dts]
    out, norm = cn.clip_by_global_norm(arrays, 1.0)
    assert norm.dtype == np.float32  # a mixed list's norm is float32
    assert_close(norm, ref_norm(arrays), np.float32, "norm")
    ref, _ = ref_clip(arrays, float(np.float32(1.0)))
    for o, r, a in zip(out, ref, arrays):
        assert o.dtype == a.dtype
        # the scale is float32 (the norm's dtype), so float64 outputs are float32-accurate
        coarser = a.dtype if a.dtype.itemsize <= 4 else np.float32
        assert_close(o, r, coarser, str(a.dtype))


def test_float16_sum_does_not_overflow():
    # TF sums float16 in float16 and gets inf here; clipops accumulates in float.
    ones = np.ones(100_000, np.float16)
    norm = cn.global_norm([ones])
    assert norm.dtype == np.float16
    assert float(norm) == float(np.float16(np.sqrt(100_000)))  # 316.2 -> 316.25 in half
    out, _ = cn.clip_by_global_norm([ones], 100.0)
    assert_close(out[0], np.full(100_000, 100.0 / 316.25), np.float16, "clipped ones")


def test_float32_accuracy_at_1e8_elements():
    """Norm within 1e-6 relative of float64 at 10^8 float32 elements."""
    rng = np.random.default_rng(7)
    parts = [rng.standard_normal(25_000_000, dtype=np.float32) + np.float32(0.5) for _ in range(4)]
    norm = cn.global_norm(parts)
    ref = ref_norm(parts)
    assert abs(float(norm) - ref) <= 1e-6 * ref, (float(norm), ref)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_makes_every_output_nan(rng, bad):
    arrays = [random_array(rng, (100,), np.float32), random_array(rng, (CHUNK + 1,), np.float32)]
    arrays[1][CHUNK] = bad
    out, norm = cn.clip_by_global_norm(arrays, 5.0)
    assert np.isinf(norm) if np.isinf(bad) else np.isnan(norm)
    assert all(np.isnan(o).all() for o in out)


def test_zeros_give_zeros_and_norm_zero():
    arrays = [np.zeros((3, 4), np.float32), np.zeros(0, np.float32), np.zeros(7, np.float32)]
    out, norm = cn.clip_by_global_norm(arrays, 1.0)
    assert float(norm) == 0.0
    assert all((o == 0).all() for o in out)


def test_use_norm_replaces_and_is_returned(rng):
    arrays = [random_array(rng, (50,), np.float64)]
    out, norm = cn.clip_by_global_norm(arrays, 2.0, use_norm=8.0)
    assert float(norm) == 8.0
    np.testing.assert_array_equal(out[0], arrays[0] * (2.0 * (1.0 / 8.0)))


def test_none_entries_stay_none(rng):
    arrays = [None, random_array(rng, (4,), np.float32), None]
    out, _ = cn.clip_by_global_norm(arrays, 1.0)
    assert out[0] is None and out[2] is None and out[1].shape == (4,)


def test_in_place_writes_every_element_and_leaves_copy_mode_inputs_alone(rng):
    arrays = [random_array(rng, (n,), np.float32) for n in (1, CHUNK - 1, CHUNK + 1)]
    originals = [a.copy() for a in arrays]
    out, _ = cn.clip_by_global_norm(arrays, 0.1)  # copy mode: inputs untouched
    for a, o in zip(arrays, originals):
        np.testing.assert_array_equal(a, o)
    out_ip, _ = cn.clip_by_global_norm(arrays, 0.1, in_place=True)
    for a, o, o_ip in zip(arrays, out, out_ip):
        assert o_ip is a  # the caller's array, every element rewritten
        np.testing.assert_array_equal(a, o)


def test_in_place_identity_scale_leaves_buffer_untouched(rng):
    a = random_array(rng, (CHUNK * 2,), np.float32)
    before = a.copy()
    out, _ = cn.clip_by_global_norm([a], 1e9, in_place=True)  # scale is exactly 1
    assert out[0] is a
    assert a.tobytes() == before.tobytes()


def test_bitwise_reproducible_across_runs(rng):
    # large enough that the CPU kernel runs on several threads
    arrays = [random_array(rng, (n,), np.float32) for n in (3_000_000, 17, 1_234_567)]
    first = cn.clip_by_global_norm(arrays, 1.0)
    for _ in range(5):
        again = cn.clip_by_global_norm(arrays, 1.0)
        assert again[1].tobytes() == first[1].tobytes()
        assert all(x.tobytes() == y.tobytes() for x, y in zip(again[0], first[0]))


def test_non_contiguous_inputs_are_copied_in_copy_mode(rng):
    base = random_array(rng, (64, 64), np.float32)
    view = base[:, ::2]
    out, norm = cn.clip_by_global_norm([view], 1.0)
    assert_close(norm, ref_norm([view]), np.float32, "norm")
    assert_close(out[0], ref_clip([view], 1.0)[0][0], np.float32, "out")


def test_0d_entries_keep_their_shape(rng):
    """Outputs have their inputs' shapes: a NumPy scalar, a Python float and a
    0-d array all come back 0-d (np.ascontiguousarray made the first two (1,)),
    beside 1-d and 2-d arrays, in every function, copying and in place."""
    v = rng.standard_normal(5) * 3.0  # fresh values; the scalars are clipped by the global norm
    vec = random_array(rng, (7,), np.float32, 3.0)
    mat = random_array(rng, (3, 4), np.float64, 3.0)
    entries = [np.float32(v[0]), float(v[1]), np.array(v[2], np.float32), np.float16(v[3]),
               np.float64(v[4]), vec, mat]
    shapes = [np.shape(e) for e in entries]
    dtypes = [np.float32, np.float64, np.float32, np.float16, np.float64, np.float32, np.float64]
    as_arrays = [np.asarray(e, d) for e, d in zip(entries, dtypes)]
    clip = 0.5 * ref_norm(as_arrays)  # below the norm: every output is scaled
    out, norm = cn.clip_by_global_norm(entries, clip)
    ref, ref_n = ref_clip(as_arrays, clip)
    assert_close(norm, ref_n, np.float32, "norm")  # a mixed list: a float32 norm
    for o, r, shape, d in zip(out, ref, shapes, dtypes):
        assert type(o) is np.ndarray and o.shape == shape and o.dtype == d
        assert_close(o, r, d, "0-d output")
    for clipped in (cn.clip_by_norm(entries, 0.5), cn.clip_by_value(entries, -0.5, 0.5),
                    cn.clip_by_global_norm(entries, clip, return_norms=True).clipped):
        assert [o.shape for o in clipped] == shapes
    # in place: a 0-d array is written and returned as itself
    zero_d = np.array(v[0], np.float64)
    before = float(zero_d)
    out, norm = cn.clip_by_global_norm([zero_d, mat.copy()], 1e-3, in_place=True)
    assert out[0] is zero_d and zero_d.shape == ()
    assert_close(zero_d, before * 1e-3 / ref_norm([np.asarray(before), mat]), np.float64, "in place")
    with pytest.raises(TypeError, match=r"arrays\[0\] is a float32; in_place=True needs NumPy"):
        cn.clip_by_global_norm([np.float32(1.0)], 1.0, in_place=True)


# ---- bad input: a clear exception, nothing written -------------------------------

def test_errors_name_the_problem(rng):
    a = random_array(rng, (5,), np.float32)
    with pytest.raises(TypeError, match="`arrays` should be a sequence"):
        cn.clip_by_global_norm(a, 1.0)
    with pytest.raises(TypeError, match="`arrays` should be a sequence"):
        cn.global_norm("abc")
    with pytest.raises(TypeError, match=r"^arrays\[1\] has dtype int32"):
        cn.clip_by_global_norm([a, np.arange(3, dtype=np.int32)], 1.0)
    with pytest.raises(ValueError, match="clip_norm must be a scalar"):
        cn.clip_by_global_norm([a], np.ones(2))
    with pytest.raises(ValueError, match="use_norm must be a scalar"):
        cn.clip_by_global_norm([a], 1.0, use_norm=np.ones((1, 1)))


@pytest.mark.parametrize("empty", [[], [None, None]], ids=["empty", "only-None"])
def test_a_list_without_arrays_gives_tf_s_answer(empty):
    # tf.clip_by_global_norm([], 1.0) == ([], 0.0); [None, None] -> ([None, None], 0.0);
    # tf.linalg.global_norm([]) == 0.0, all float32
    out, norm = cn.clip_by_global_norm(empty, 1.0)
    assert out == [None] * len(empty)
    assert norm.dtype == np.float32 and norm.shape == () and norm == 0.0
    norm = cn.global_norm(empty)
    assert norm.dtype == np.float32 and norm == 0.0
    _, norm = cn.clip_by_global_norm(empty, 1.0, use_norm=2.5)
    assert norm.dtype == np.float32 and norm == 2.5
    with pytest.raises(ValueError, match="clip_norm must be a scalar"):
        cn.clip_by_global_norm(empty, np.ones(2))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_non_native_byte_order_is_read_correctly(rng, dtype):
    native = scaled_list(rng, [CHUNK + 5, 7], dtype)
    swapped = [a.astype(a.dtype.newbyteorder("S")) for a in native]  # ">f4" on x86
    assert not swapped[0].dtype.isnative
    clip = float(np.asarray(ref_norm(native) * 0.5).astype(dtype))
    want, want_norm = cn.clip_by_global_norm(native, clip)
    got, got_norm = cn.clip_by_global_norm(swapped, clip)
    assert got_norm.tobytes() == want_norm.tobytes()
    for g, w in zip(got, want):
        assert g.dtype.isnative and g.tobytes() == w.tobytes()
    assert cn.global_norm(swapped).tobytes() == want_norm.tobytes()
    before = [a.copy() for a in swapped]
    with pytest.raises(ValueError, match=r"arrays\[0\] has non-native byte order"):
        cn.clip_by_global_norm(swapped, clip, in_place=True)
    for a, b in zip(swapped, before):
        assert a.tobytes() == b.tobytes()  # nothing written


def test_in_place_rejects_aliasing_without_touching_data(rng):
    a = random_array(rng, (100,), np.float32)
    before = a.copy()
    with pytest.raises(ValueError, match="share memory"):
        cn.clip_by_global_norm([a, a], 0.01, in_place=True)  # would be scaled twice
    with pytest.raises(ValueError, match="share memory"):
        cn.clip_by_global_norm([a[10:60], a[50:]], 0.01, in_place=True)  # overlapping views
    np.testing.assert_array_equal(a, before)
    # reading the same buffer twice is fine when nothing is written in place
    out, norm = cn.clip_by_global_norm([a, a], 0.01)
    assert_close(norm, ref_norm([a, a]), np.float32, "norm")


def test_in_place_rejects_non_contiguous_and_read_only(rng):
    a = random_array(rng, (10, 10), np.float32)
    with pytest.raises(ValueError, match="not C-contiguous"):
        cn.clip_by_global_norm([a[:, ::2]], 1.0, in_place=True)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cn.clip_by_global_norm([a], 1.0, in_place=True)


def test_misaligned_views_are_copied_or_refused(rng):
    # A view at an odd byte offset holds float64 data that is not 8-byte
    # aligned: copy mode clips an aligned copy, in place refuses it untouched,
    # and the core itself refuses misaligned pointers (a GPU would fault on them)
    a = random_array(rng, (CHUNK + 5,), np.float64, scale=10.0)
    raw = np.zeros(a.nbytes + 4, np.uint8)
    view = raw[4:4 + a.nbytes].view(np.float64)
    view[...] = a
    assert not view.flags.aligned
    got, norm = cn.clip_by_global_norm([view], 1.0)
    want, want_norm = cn.clip_by_global_norm([a], 1.0)
    assert got[0].tobytes() == want[0].tobytes() and norm == want_norm
    before = raw.tobytes()
    with pytest.raises(ValueError, match=r"arrays\[0\] is not aligned to its 8-byte elements"):
        cn.clip_by_global_norm([view], 1.0, in_place=True)
    assert raw.tobytes() == before
    core = cn._common.load_core()
    out = np.empty_like(a)
    for desc in ((view.ctypes.data, out.ctypes.data), (a.ctypes.data, out.ctypes.data + 4)):
        with pytest.raises(ValueError, match="tensor 0: the data is not aligned to its 8-byte"):
            core.clip_cpu([(*desc, a.size, 3)], 3, True, 1.0, None, 0)


def test_every_finite_half_and_bfloat16_value_round_trips():
    # Scale exactly 1 (use_norm = clip = 1): each output is the input converted
    # to float and rounded back, so this checks both conversions on every value,
    # subnormals and the largest finite ones included.
    dts = [np.float16] + ([BF16] if BF16 is not None else [])
    for dt in dts:
        values = np.arange(65536, dtype=np.uint16).view(dt)
        values = values[np.isfinite(values.astype(np.float32))]
        out, _ = cn.clip_by_global_norm([values], 1.0, use_norm=1.0)
        assert out[0].tobytes() == values.tobytes(), np.dtype(dt).name


def test_python_and_core_agree_on_dtype_codes():
    # The codes are written twice (clipops/_common.py and csrc/core/clip_math.h).
    from clipops import _common

    assert _common.DTYPE_CODES == _common.load_core().DTYPE_CODES


# ---- the core's own checks (clipops.h), through the pybind11 adapter ---------------

def test_core_rejects_norm_out_aliasing_a_scalar_pointer(rng):
    # Block 0 stores the norm while other blocks still read clip_norm/use_norm
    # through their pointers: the core must refuse the aliasing before any CUDA
    # call (validate() runs first, so this needs no GPU).
    core = cn._common.load_core()
    a = random_array(rng, (CHUNK + 3,), np.float32)
    out = np.empty_like(a)
    scalar = np.full(4, 7.0, np.float32)  # stands in for device memory: never dereferenced
    p = scalar.ctypes.data
    descs = [(a.ctypes.data, out.ctypes.data, a.size, 2)]
    cases = {"clip_norm": dict(clip_ptr=p, use_norm=None, use_ptr=0, norm_out=p),
             "use_norm": dict(clip_ptr=0, use_norm=None, use_ptr=p, norm_out=p),
             "partly": dict(clip_ptr=p + 2, use_norm=None, use_ptr=0, norm_out=p)}
    for name, kw in cases.items():
        with pytest.raises(ValueError, match="norm_out and|and norm_out"):
            core.clip_cuda(descs, 2, True, 1.0, workspace=16, workspace_bytes=1 << 20, stream=0,
                           check_overlap=False, **kw)
    # norm_out inside a tensor that the call writes is refused too (check_overlap)
    with pytest.raises(ValueError, match="share memory"):
        core.clip_cpu(descs, 2, True, 1.0, None, out.ctypes.data + 8)
    np.testing.assert_array_equal(scalar, 7.0)


# ---- the source folder shadowing the installed package -----------------------------

def test_the_source_folder_explains_itself():
    # `python -m pytest` or `python` in the repository root imports ./clipops,
    # which has no compiled parts: one clear ImportError saying so, from every
    # front end, and pytest stops with that one message instead of 70 errors.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "clipops", "_build_info.py")):
        pytest.skip("this checkout was built in place: its clipops/ is a complete package")
    for module in ("clipops", "clipops.numpy", "clipops.tensorflow", "clipops.cupy"):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert "ImportError: `import clipops` found the source folder" in out.stderr, module
        assert "not `python -m pytest`" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_numpy.py"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    assert "cannot test clipops: `import clipops` found the source folder" in out.stdout + out.stderr


# ---- the list walked in C++ (NumpyBatch), and the host block cache ------------

def test_fast_and_checking_paths_give_the_same_bits(rng):
    """Plain contiguous arrays are described in C++ at once; one view among
    them sends the whole list through the Python checks. Same bits either way,
    for every mode, with None entries and mixed dtypes."""
    sizes = [0, 1, 1023, CHUNK + 1, 70_000, 300_000]  # both sides of the cache's 256 KiB
    plain = [random_array(rng, (n,), d) for n, d in zip(sizes, [np.float32, np.float16] * 3)]
    plain.insert(2, None)
    core = cn._common.load_core()
    assert core.NumpyBatch.from_list(plain, False) is not None  # the fast path takes it
    twice = [None if a is None else np.repeat(a, 2)[::2] for a in plain]  # non-contiguous views
    assert core.NumpyBatch.from_list(twice, False) is None  # ... and not this
    for fn in (lambda l: cn.clip_by_global_norm(l, 3.0, return_norms=True),
               lambda l: cn.clip_by_norm(l, 0.5, return_norms=True),
               lambda l: cn.clip_by_value(l, -0.1, 0.2),
               lambda l: cn.global_norm(l, return_norms=True)):
        fast, checked = fn(plain), fn(twice)
        for x, y in zip(_leaves(fast), _leaves(checked)):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _leaves(result):
    out = []
    for item in (result if isinstance(result, (tuple, list)) else [result]):
        if isinstance(item, list):
            out.extend(item)
        else:
            out.append(item)
    return out


def test_subclasses_take_the_checking_path_and_give_plain_arrays(rng):
    m = np.asmatrix(random_array(rng, (3, 4), np.float64))
    (out,), norm = cn.clip_by_global_norm([m], 0.1)
    assert type(out) is np.ndarray and out.shape == (3, 4)
    assert np.allclose(out, np.asarray(m) * 0.1 / np.linalg.norm(np.asarray(m)), rtol=1e-12)
    (same,), _ = cn.clip_by_global_norm([m], 0.1, in_place=True)
    assert same is m  # in place: the caller's own object, subclass and all


def test_large_outputs_come_from_the_bounded_host_cache(rng):
    import gc
    core = cn._common.load_core()
    old_limit = core.host_cache_stats()["limit_bytes"]
    gc.collect()
    gc.disable()  # no other test's outputs may be collected (and their blocks freed) meanwhile
    try:
        core.set_host_cache_limit(1 << 30)
        # a size no other test asks for: a freed block of it, cached by an earlier
        # test, would serve this call and the counts below would be off
        big_n = (1 << 20) + 3 * 1024
        arrays = [random_array(rng, (n,), np.float32) for n in (big_n, 300, 1 << 16)]
        before = core.host_cache_stats()
        out, _ = cn.clip_by_global_norm(arrays, 1.0)
        big = out[0]
        assert big.flags.writeable and big.flags.c_contiguous and big.base is not None
        assert type(out[1].base) is not type(big.base)  # the small one is NumPy's own
        held = core.host_cache_stats()
        assert held["in_use_bytes"] >= before["in_use_bytes"] + (4 << 20)
        first_address = big.ctypes.data
        values = big.copy()
        del arrays  # the outputs own their memory, not the inputs'
        assert big.tobytes() == values.tobytes()
        del out, big
        freed = core.host_cache_stats()
        assert freed["in_use_bytes"] == before["in_use_bytes"]
        assert freed["cached_bytes"] >= before["cached_bytes"] + (4 << 20)
        again, _ = cn.clip_by_global_norm([random_array(rng, (big_n,), np.float32)], 1.0)
        assert again[0].ctypes.data == first_address  # the freed block, reused
        assert core.host_cache_stats()["hits"] == freed["hits"] + 1
        del again
        core.set_host_cache_limit(0)  # the bound: nothing kept, and what was kept is unmapped
        assert core.host_cache_stats()["cached_bytes"] == 0
        out, _ = cn.clip_by_global_norm([random_array(rng, (1 << 20,), np.float32)], 1.0)
        del out
        assert core.host_cache_stats()["cached_bytes"] == 0
    finally:
        gc.enable()
        core.set_host_cache_limit(old_limit)


def test_small_outputs_share_one_cached_block_and_stay_apart(rng):
    """Outputs under 256 KiB of one call are views into one host block, one per
    64-byte boundary: every value right, writing one touches no other, and the
    block goes back to the cache only when the last of them is freed."""
    import gc
    core = cn._common.load_core()
    below = (256 << 10) // 4 - 1  # float32 elements: the largest small output, and one more
    sizes = [0, 1, 3, 17, 1023, CHUNK + 1, below, below + 1, 5]
    dtypes = [np.float32, np.float16, np.float64, np.float32, np.float16, np.float32,
              np.float32, np.float32, np.float64]
    arrays = [random_array(rng, (n,), d) for n, d in zip(sizes, dtypes)]
    arrays[3] = arrays[3].reshape(1, 17)
    norm64 = ref_norm(arrays)
    gc.collect()
    gc.disable()
    try:
        before = core.host_cache_stats()
        out, norm = cn.clip_by_global_norm(arrays, float(norm64) / 3)
        ref, _ = ref_clip(arrays, float(norm64) / 3)
        small = [o for o, a in zip(out, arrays) if a.nbytes < 256 << 10]
        assert len(small) == 8 and out[7].base is not small[0].base  # the 256 KiB one: its own
        for o, a, r in zip(out, arrays, ref):
            assert o.dtype == a.dtype and o.shape == a.shape and o.flags.c_contiguous
            assert o.flags.writeable and o.ctypes.data % 64 == 0
            # a mixed list's scale is float32: float64 outputs are float32-accurate
            assert_close(o, r, o.dtype if o.dtype.itemsize <= 4 else np.float32, f"size {a.size}")
        assert all(o.base is small[0].base for o in small)  # one block, one owner
        ends = sorted((o.ctypes.data, o.ctypes.data + o.nbytes) for o in small if o.size)
        assert all(e <= b for (_, e), (b, _) in zip(ends, ends[1:]))  # disjoint
        large = out[7].tobytes()
        before_fill = [o.copy() for o in small]
        for i, o in enumerate(small):  # fill each view to its last byte: the others keep theirs
            o[...] = 7
            for j, other in enumerate(small):
                want = np.full_like(other, 7) if j <= i else before_fill[j]
                assert other.tobytes() == want.tobytes(), (i, j)
        assert out[7].tobytes() == large
        held = core.host_cache_stats()["in_use_bytes"]
        keep = small[4]
        del out, small, o, other
        assert core.host_cache_stats()["in_use_bytes"] < held  # the large output's block
        still = core.host_cache_stats()["in_use_bytes"]
        assert still > before["in_use_bytes"]  # the shared block lives on in `keep`
        assert np.array_equal(keep, np.full_like(keep, 7))
        del keep
        assert core.host_cache_stats()["in_use_bytes"] == before["in_use_bytes"]
    finally:
        gc.enable()


def test_copying_takes_aliased_inputs(rng):
    """Copying reads the inputs only, so the same memory twice is allowed (in
    place it is refused: test_in_place_rejects_aliasing_without_touching_data)."""
    a = random_array(rng, (1000,), np.float32)
    arrays = [a, a[10:600], a]
    out, norm = cn.clip_by_global_norm(arrays, 0.5)
    ref, ref_n = ref_clip([x.copy() for x in arrays], 0.5)
    assert_close(norm, ref_n, np.float32, "norm")
    for o, r in zip(out, ref):
        assert_close(o, r, np.float32, "output")
    assert out[0].ctypes.data != out[2].ctypes.data


_GROWTH_SCRIPT = """
import gc, sys, tracemalloc
import numpy as np
import clipops.numpy as cn
rng = np.random.default_rng(0)
arrays = [rng.standard_normal(n).astype(np.float32) for n in (512, 40_000, 10, 100_000)]
calls = {
    "copy": lambda: cn.clip_by_global_norm(arrays, 1.0),
    "copy_norms": lambda: cn.clip_by_global_norm(arrays, 1.0, return_norms=True,
                                                 nonfinite="raise", unscale=0.5),
    "in_place": lambda: cn.clip_by_global_norm(arrays, 1.0, use_norm=1.0, in_place=True),
    "global_norm": lambda: cn.global_norm(arrays, return_norms=True),
    "clip_by_norm": lambda: cn.clip_by_norm(arrays, 0.5, return_norms=True),
    "clip_by_value": lambda: cn.clip_by_value(arrays, -0.1, 0.2),
}
for name, call in calls.items():
    for _ in range(2000):
        call()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(20_000):
        call()
    gc.collect()
    print(name, tracemalloc.get_traced_memory()[0] - before)
    tracemalloc.stop()
"""


def test_repeated_calls_do_not_grow_python_memory():
    """Python's traced memory over 20,000 calls of each NumPy entry point, after
    warm-up, in a fresh interpreter (other imports can hide the effect below).
    A pointer kept per call would show as 160 KB. Calling the pybind11 module
    with keywords for defaulted arguments showed ~966 KB here for 4 of the 6
    (pybind11 3.1 interns the parameter names on every such call; most likely
    the interpreter's table of interned strings grew: clipops/numpy.py, top).
    The bound, 64 KB, leaves room for the interpreter's own caches."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _GROWTH_SCRIPT], capture_output=True, text=True,
                         timeout=600, cwd="/")
    assert out.returncode == 0, out.stderr
    grown = {name: int(v) for name, v in (line.split() for line in out.stdout.splitlines())}
    assert len(grown) == 6 and all(v < 64 << 10 for v in grown.values()), grown


def test_copy_mode_stops_faulting_fresh_pages(rng):
    """A training loop's second and later steps reuse the first step's output
    blocks: minor page faults per call fall from one per page (or huge page)
    to about none. Counts, not times."""
    import resource
    arrays = [random_array(rng, (n,), np.float32) for n in [6_000_000] + [300_000] * 10]
    pages = sum(a.nbytes for a in arrays) // 4096

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out, _ = cn.clip_by_global_norm(arrays, 1.0)
        del out
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    core = cn._common.load_core()
    old_limit = core.host_cache_stats()["limit_bytes"]
    try:
        core.set_host_cache_limit(1 << 30)  # as by default (CLIPOPS_HOST_CACHE_MB=0 fails this)
        faults()
        assert max(faults() for _ in range(3)) < pages // 100, pages
    finally:
        core.set_host_cache_limit(old_limit)
