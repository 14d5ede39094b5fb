"""The TensorFlow op against tf.clip_by_global_norm and a float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the TensorFlow op needs tensorflow")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import clipops  # noqa: E402
from conftest import BF16, CHUNK, LANES, assert_close, ref_clip, ref_norm  # noqa: E402

TF_DTYPES = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32,
             "float64": tf.float64}

# Against tf.clip_by_global_norm when clipping: both scale by clip/norm, and the
# norms differ only in summation order. TF sums float32 per tensor, then across
# tensors, in float32 (~1e-6 relative for these sizes); clipops to ~1e-7. So
# float32 outputs agree to rtol 1e-5; float64 ones to 1e-12.
VS_TF_RTOL = {"float32": 1e-5, "float64": 1e-12}


def np_of(t):
    return None if t is None else np.asarray(t.numpy(), dtype=np.float64)


def eager_and_function(fn):
    """fn itself and fn inside a tf.function: every check runs in both modes."""
    return pytest.mark.parametrize("mode", ["eager", "function"])(fn)


def run(mode, f, *args):
    return f(*args) if mode == "eager" else tf.function(f)(*args)


# ---- random lists against tf.clip_by_global_norm (hypothesis) ----------------

SIZES = st.one_of(st.sampled_from([0, 1, LANES - 1, LANES + 1, CHUNK - 1, CHUNK, CHUNK + 1]),
                  st.integers(0, 3000))
SHAPES = st.one_of(st.just(()), SIZES.map(lambda n: (n,)),
                   st.tuples(st.integers(0, 40), st.integers(0, 40)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(SHAPES, min_size=1, max_size=300),
       dtype=st.sampled_from(["float32", "float64"]),
       clip_factor=st.sampled_from([0.01, 0.7, 1.5, 100.0]),
       seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["eager", "function"]))
def test_random_lists_match_tf(shapes, dtype, clip_factor, seed, mode):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    norm64 = ref_norm(arrays)
    clip = float(np.asarray(max(norm64, 1e-3) * clip_factor).astype(dtype))
    tensors = [tf.constant(a) for a in arrays]
    (ours, n_ours) = run(mode, lambda t: clipops.clip_by_global_norm(t, clip), tensors)
    (theirs, n_tf) = tf.clip_by_global_norm(tensors, clip)
    assert n_ours.dtype == n_tf.dtype
    assert_close(n_ours.numpy(), norm64, dtype, "norm vs float64")
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert o.shape == t.shape and o.dtype == t.dtype
        if clip_factor >= 1.5:
            # not clipped: TF's own formula gives the same scale: bit-identical
            assert o.numpy().tobytes() == t.numpy().tobytes(), f"tensor {i}"
        else:
            np.testing.assert_allclose(np_of(o), np_of(t), rtol=VS_TF_RTOL[dtype], atol=1e-30,
                                       err_msg=f"tensor {i}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@eager_and_function
def test_every_dtype_against_float64(rng, dtype, mode):
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes is not installed")
    np_dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    arrays = [(rng.standard_normal(n) * 0.05).astype(np_dt) for n in (1, 33, CHUNK + 9, 700)]
    clip = float(np.asarray(ref_norm(arrays) * 0.5).astype(np_dt))
    ours, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, clip),
                     [tf.constant(a) for a in arrays])
    assert norm.dtype == TF_DTYPES[dtype]
    ref, norm64 = ref_clip(arrays, clip)
    assert_close(np_of(norm), norm64, dtype, "norm")
    for o, r in zip(ours, ref):
        assert o.dtype == TF_DTYPES[dtype]
        assert_close(np_of(o), r, dtype, "output")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_lists_not_clipped_are_bit_identical_to_tf(rng, dtype):
    # TF computes the scale in the 16-bit type too; far below clip_norm both take
    # clip * (1/clip), so the outputs must agree to the bit.
    tensors = [tf.constant(rng.standard_normal(n) * 0.01, TF_DTYPES[dtype]) for n in (7, 300, 5)]
    ours, _ = clipops.clip_by_global_norm(tensors, 50.0)
    theirs, _ = tf.clip_by_global_norm(tensors, 50.0)
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype
        assert o.numpy().tobytes() == t.numpy().tobytes()


# ---- TensorFlow's own cases ----------------------------------------------------

def classic():
    # norm sqrt(4 + 16 + 1 + 4) = 5
    return [tf.constant([[-2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]), tf.constant([1.0, -2.0])]


@eager_and_function
def test_classic_clipped_at_4(mode):
    out, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, 4.0), classic())
    assert norm.numpy() == 5.0
    np.testing.assert_allclose(out[0].numpy(), [[-1.6, 0, 0], [3.2, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), [0.8, -1.6], rtol=1e-6)


@eager_and_function
def test_classic_not_clipped_at_6(mode):
    out, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, 6.0), classic())
    tf_out, _ = tf.clip_by_global_norm(classic(), 6.0)
    assert norm.numpy() == 5.0
    for o, t in zip(out, tf_out):
        assert o.numpy().tobytes() == t.numpy().tobytes()


@eager_and_function
def test_none_entries_and_indexed_slices(mode):
    def f(values):
        slices = tf.IndexedSlices(values, tf.constant([0, 2]), tf.constant([4, 3]))
        return clipops.clip_by_global_norm([None, slices, tf.constant([1.0, -2.0]), None], 4.0)

    out, norm = run(mode, f, tf.constant([[-2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]))
    assert out[0] is None and out[3] is None
    assert isinstance(out[1], tf.IndexedSlices)
    np.testing.assert_array_equal(out[1].indices.numpy(), [0, 2])
    np.testing.assert_array_equal(out[1].dense_shape.numpy(), [4, 3])
    np.testing.assert_allclose(out[1].values.numpy(), [[-1.6, 0, 0], [3.2, 0, 0]], rtol=1e-6)
    assert norm.numpy() == 5.0


@eager_and_function
def test_zeros(mode):
    out, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, 1.0),
                    [tf.zeros((2, 3)), tf.zeros((5,))])
    assert norm.numpy() == 0.0
    assert all((o.numpy() == 0).all() for o in out)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@eager_and_function
def test_inf_and_nan_make_every_output_nan(mode, bad):
    values = [tf.constant([1.0, bad]), tf.constant([3.0, 4.0])]
    out, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, 1.0), values)
    tf_out, tf_norm = tf.clip_by_global_norm(values, 1.0)
    assert np.isinf(norm.numpy()) == np.isinf(tf_norm.numpy())
    assert np.isnan(norm.numpy()) == np.isnan(tf_norm.numpy())
    assert all(np.isnan(o.numpy()).all() for o in out)
    assert all(np.isnan(t.numpy()).all() for t in tf_out)


# ---- beyond TF ----------------------------------------------------------------

@eager_and_function
def test_use_norm_replaces_the_norm(mode, rng):
    values = [tf.constant(rng.standard_normal(10).astype(np.float32))]
    out, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, 2.0, use_norm=tf.constant(8.0)),
                    values)
    tf_out, tf_norm = tf.clip_by_global_norm(values, 2.0, use_norm=tf.constant(8.0))
    assert norm.numpy() == tf_norm.numpy() == 8.0
    assert out[0].numpy().tobytes() == tf_out[0].numpy().tobytes()


@eager_and_function
def test_mixed_dtypes_in_one_call(mode, rng):
    arrays = [rng.standard_normal(50).astype(np.float16), rng.standard_normal(70).astype(np.float32),
              rng.standard_normal(30).astype(np.float64)]
    out, norm = run(mode, lambda t: clipops.clip_by_global_norm(t, 1.0),
                    [tf.constant(a) for a in arrays])
    assert norm.dtype == tf.float32
    ref, norm64 = ref_clip(arrays, 1.0)
    assert_close(norm.numpy(), norm64, "float32", "norm")
    for o, r, a in zip(out, ref, arrays):
        assert o.dtype.name == a.dtype.name
        assert_close(np_of(o), r, a.dtype if a.dtype.itemsize <= 4 else "float32", a.dtype.name)
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        tf.clip_by_global_norm([tf.constant(a) for a in arrays], 1.0)  # TF itself refuses


def test_float16_overflow_where_tf_overflows():
    ones = tf.ones((100_000,), tf.float16)
    assert np.isinf(tf.linalg.global_norm([ones]).numpy())  # TF sums in half
    norm = clipops.global_norm([ones])
    assert norm.dtype == tf.float16 and float(norm.numpy()) == 316.25


@eager_and_function
def test_global_norm_matches(mode, rng):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (), (CHUNK + 1,)]]
    norm = run(mode, clipops.global_norm, [tf.constant(a) for a in arrays])
    assert_close(norm.numpy(), ref_norm(arrays), "float32", "global_norm")


# Gradients, against TF's own gradient of tf.clip_by_global_norm. Both are the
# chain rule of one formula, evaluated with a few roundings per element in the
# dtype, plus dot products over at most 15 elements here: float64 agrees to
# ~20 * 2^-53, float32 to ~20 * 2^-24 = 1.2e-6 relative to the largest gradient
# (terms of opposite sign cancel, so the bound is on the scale of the largest).
GRAD_RTOL = {"float32": 5e-6, "float64": 1e-12}


def _assert_grads_close(ours, theirs, dtype):
    """Within GRAD_RTOL of the largest gradient element of the call: a scalar
    gradient that cancels to ~0 (clip_norm's, when not clipped) carries the
    rounding of the terms that cancelled, not of its own tiny value."""
    assert [o is None for o in ours] == [t is None for t in theirs]
    pairs = [(tf.convert_to_tensor(o).numpy(), tf.convert_to_tensor(t).numpy())
             for o, t in zip(ours, theirs) if o is not None]
    scale = max(max(float(np.max(np.abs(t), initial=0.0)) for _, t in pairs), 1e-30)
    for o, t in pairs:
        np.testing.assert_allclose(o, t, rtol=0, atol=GRAD_RTOL[dtype] * scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("clip", [0.5, 100.0], ids=["clipped", "not-clipped"])
@pytest.mark.parametrize("use_norm", [None, 3.0], ids=["computed", "use_norm"])
@eager_and_function
def test_gradients_match_tf(mode, rng, clip, use_norm, dtype):
    # d/d tensors, d/d clip_norm and d/d use_norm, all watched
    values = [tf.constant(rng.standard_normal(s).astype(dtype)) for s in [(4, 3), (5,), ()]]
    weights = [tf.constant(rng.standard_normal(v.shape).astype(dtype)) for v in values]
    scalars = [tf.constant(clip, dtype), tf.constant(use_norm or 0.0, dtype)]

    def grads(fn, vs, c, u):
        with tf.GradientTape() as tape:
            tape.watch([vs, c, u])
            out, norm = fn(vs, c, use_norm=None if use_norm is None else u)
            loss = tf.add_n([tf.reduce_sum(w * o) for w, o in zip(weights, out)]) + 0.3 * norm
        return tape.gradient(loss, [*vs, c, u])

    ours = run(mode, lambda vs, c, u: grads(clipops.clip_by_global_norm, vs, c, u), values,
               *scalars)
    theirs = grads(tf.clip_by_global_norm, values, *scalars)
    if use_norm is None:  # the norm is computed: use_norm has no gradient in either
        assert ours[-1] is None and theirs[-1] is None
    else:
        assert ours[-1] is not None
    assert ours[-2] is not None  # clip_norm's gradient (0 when not clipped)
    _assert_grads_close(ours, theirs, dtype)


@eager_and_function
def test_gradients_of_a_mixed_list(mode, rng):
    # TF refuses mixed lists, so the reference is TF's gradient of the same
    # formula written in float64; each tensor's gradient is then rounded to its
    # dtype (float16: u = 2^-11 at a few roundings: 4e-3 of the largest).
    dtypes = ["float16", "float32", "float64"]
    values = [tf.constant(rng.standard_normal(6).astype(d)) for d in dtypes]
    # the loss weights as each output's dtype holds them, so both sides use the same
    weights = [rng.standard_normal(6).astype(d).astype(np.float64) for d in dtypes]
    clip = tf.constant(0.5, tf.float32)

    def loss_of(out, norm):  # summed in float64 so the dtypes can meet
        return tf.add_n([tf.cast(tf.reduce_sum(tf.constant(w, o.dtype) * o), tf.float64)
                         for w, o in zip(weights, out)]) + 0.3 * tf.cast(norm, tf.float64)

    def ours_fn(vs, c):
        with tf.GradientTape() as tape:
            tape.watch([vs, c])
            loss = loss_of(*clipops.clip_by_global_norm(vs, c))
        return tape.gradient(loss, [*vs, c])

    ours = run(mode, ours_fn, values, clip)
    v64 = [tf.cast(v, tf.float64) for v in values]
    c64 = tf.cast(clip, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([v64, c64])
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(v * v) for v in v64]))
        scale = c64 * tf.minimum(1.0 / norm, 1.0 / c64)
        loss = tf.add_n([tf.reduce_sum(tf.constant(w) * v * scale) for w, v in zip(weights, v64)]
                        ) + 0.3 * norm
    ref = tape.gradient(loss, [*v64, c64])
    tol = {"float16": 4e-3, "float32": 5e-6, "float64": 5e-6}  # float64's share a float32 norm
    for o, r, d in zip(ours, ref, dtypes + ["float32"]):
        assert o.dtype.name == d
        scale = float(np.max(np.abs(r.numpy())))
        np.testing.assert_allclose(o.numpy().astype(np.float64), r.numpy(), rtol=0,
                                   atol=tol[d] * scale, err_msg=d)


@eager_and_function
def test_gradients_through_indexed_slices(mode, rng):
    # Embedding-style gradients: the variable's gradient arrives as IndexedSlices.
    table = tf.Variable(rng.standard_normal((10, 4)).astype(np.float32))
    dense = tf.Variable(rng.standard_normal((4, 3)).astype(np.float32))
    ids = tf.constant([1, 7, 7, 2])

    def grads_of(clip_fn):
        def f():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.matmul(tf.gather(table, ids), dense) ** 2)
            g = tape.gradient(loss, [table, dense])
            with tf.GradientTape() as tape2:  # differentiate through the clip too
                tape2.watch(g[0].values)
                clipped, norm = clip_fn(g, 1.0)
                second = tf.reduce_sum(clipped[0].values ** 3) + norm
            return clipped, norm, tape2.gradient(second, g[0].values)
        return run(mode, f)

    ours, n_ours, d_ours = grads_of(clipops.clip_by_global_norm)
    theirs, n_tf, d_tf = grads_of(tf.clip_by_global_norm)
    assert isinstance(ours[0], tf.IndexedSlices)
    np.testing.assert_array_equal(ours[0].indices.numpy(), theirs[0].indices.numpy())
    np.testing.assert_allclose(n_ours.numpy(), n_tf.numpy(), rtol=VS_TF_RTOL["float32"])
    for o, t in zip([ours[0].values, ours[1]], [theirs[0].values, theirs[1]]):
        np.testing.assert_allclose(o.numpy(), t.numpy(), rtol=VS_TF_RTOL["float32"], atol=1e-30)
    _assert_grads_close([d_ours], [d_tf], "float32")


def test_global_norm_gradient_matches_tf(rng):
    values = [tf.constant(rng.standard_normal(s)) for s in [(4, 3), (5,)]]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(values)
        ours, theirs = clipops.global_norm(values), tf.linalg.global_norm(values)
    for o, t in zip(tape.gradient(ours, values), tape.gradient(theirs, values)):
        np.testing.assert_allclose(o.numpy(), t.numpy(), rtol=1e-12)


def test_eager_fast_path_takes_plain_lists_only_and_changes_no_bits(rng):
    """Eagerly, a list of plain eager tensors (one device, supported dtypes) is
    read without the general path's checks; anything else falls back to them.
    Both give the same values, positions, norm dtype and output bits."""
    from clipops import tensorflow as ct
    arrays = [rng.standard_normal(n).astype(d) for n, d in
              [(1000, np.float32), (3, np.float16), (70_000, np.float32), (1, np.float64)]]
    plain = [tf.constant(a) for a in arrays]
    fast = ct._eager_values(plain)
    assert fast is not None
    general = ct._values(plain + [None])  # None: the general path
    assert [v is p for v, p in zip(fast[0], plain)] == [True] * 4
    assert fast[1] == general[1] == [0, 1, 2, 3] and fast[2] == general[2]
    assert ct._rebuild(plain, fast[1], plain) == plain
    for other in ([None], [tf.IndexedSlices(plain[0], tf.constant([0]), tf.constant([1000]))],
                  [tf.Variable(arrays[0])], [arrays[0]], [tf.constant([1, 2])]):
        assert ct._eager_values(plain + other) is None
    with pytest.raises(TypeError, match="int32"):
        clipops.clip_by_global_norm(plain + [tf.constant([1, 2])], 1.0)
    out_fast, norm_fast = clipops.clip_by_global_norm(plain, 0.5)
    out_general, norm_general = clipops.clip_by_global_norm(plain + [None], 0.5)
    assert out_general[4] is None and float(norm_fast) == float(norm_general)
    for x, y in zip(out_fast, out_general):
        assert x.numpy().tobytes() == y.numpy().tobytes()


def test_eager_scalar_cache_tells_minus_zero_from_zero():
    # Found by tests/test_fuzz.py: the cache of eager scalar tensors was keyed by
    # the Python value, and -0.0 == 0.0, so a clip_norm of -0.0 reused 0.0's tensor.
    # (TF's own tf.constant(-0.0) has the same flaw, hence the 0-d arrays here.)
    # TF's formula gives NaN for -0.0 (-0 * min(1/n, -inf)) and 0 for +0.0.
    x = [tf.constant([0.125, -3.0])]
    for clip in (0.0, -0.0, 0.0):
        out, _ = clipops.clip_by_global_norm(x, clip)
        want, _ = tf.clip_by_global_norm(x, tf.constant(np.asarray(clip, np.float32)))
        assert np.isnan(want[0].numpy()).all() == bool(np.signbit(clip))
        assert out[0].numpy().tobytes() == want[0].numpy().tobytes(), clip
    _, norm = clipops.clip_by_global_norm([], 1.0, use_norm=-0.0)
    assert np.signbit(norm.numpy())


@eager_and_function
def test_subnormals_are_kept_as_on_every_other_front_end(mode):
    # TF runs CPU kernels with denormals flushed to zero; clipops' kernel clears
    # FTZ/DAZ for its work, so it gives the NumPy front end's (and the GPU's)
    # bits. Found by tests/test_fuzz.py: a subnormal negative scale became +0.
    import clipops.numpy as cn

    cases = [([np.array([1e-40, 3.0], np.float32)], 1.5, None),  # subnormal output 5e-41
             ([np.array([0.1257], np.float16), np.zeros(0, np.float32)], 0.001,
              np.float32(-8.507060567439122e34)),                 # scale -1.2e-38, then -0 in half
             ([np.array([0.1257], np.float16), np.zeros(0, np.float32)], -4.75e-43, None),
             ([np.zeros(0, np.float32)], 1.0, np.float32(4.75e-43))]  # subnormal scalars
    for arrays, clip, use in cases:
        want, want_norm = cn.clip_by_global_norm(arrays, clip, use_norm=use)
        if arrays[0].dtype == np.float16 and use is not None:
            assert want[0][0] == 0 and np.signbit(want[0][0])
        out, norm = run(mode, lambda t: clipops.clip_by_global_norm(
            t, clip, use_norm=None if use is None else tf.constant(use)),
            [tf.constant(a) for a in arrays])
        assert norm.numpy().tobytes() == want_norm.tobytes()
        for o, w in zip(out, want):
            assert o.numpy().tobytes() == w.tobytes(), (o.numpy(), w)


def test_clip_norm_as_tensor_and_variable(rng):
    values = [tf.constant(rng.standard_normal(20).astype(np.float32))]
    for clip in (tf.constant(0.5), tf.Variable(0.5), tf.constant(0.5, tf.float64), np.float32(0.5)):
        out, _ = clipops.clip_by_global_norm(values, clip)
        tf_out, _ = tf.clip_by_global_norm(values, 0.5)
        np.testing.assert_allclose(out[0].numpy(), tf_out[0].numpy(), rtol=1e-6)


def test_variables_are_not_modified(rng):
    v = tf.Variable(rng.standard_normal(100).astype(np.float32))
    before = v.numpy().copy()
    out, _ = clipops.clip_by_global_norm([v], 0.01)
    np.testing.assert_array_equal(v.numpy(), before)
    assert not np.array_equal(out[0].numpy(), before)


def test_no_input_is_modified_inside_a_function(rng):
    # Inside a graph TF forwards an input's buffer to the op's output when
    # nothing else holds it. That must never reach a buffer someone else still
    # reads: the function's argument, a tensor listed twice, a variable's read
    # value, an intermediate that is also returned. The intermediate that only
    # the op consumes may be forwarded: its output must still be right.
    v = tf.Variable(rng.standard_normal(300).astype(np.float32))
    x = tf.constant(rng.standard_normal(300).astype(np.float32))
    v0, x0 = v.numpy().copy(), x.numpy().copy()

    @tf.function
    def step(x):
        kept = x * 2.0     # returned too: not forwardable
        private = x + 1.0  # consumed by the op alone: forwardable
        r = v.read_value()
        want, want_norm = tf.clip_by_global_norm([kept, private, x, x, r, v], 0.01)
        got, norm = clipops.clip_by_global_norm([kept, private, x, x, r, v], 0.01)
        return got, norm, want, want_norm, kept, x

    got, norm, want, want_norm, kept, x_after = step(x)
    np.testing.assert_array_equal(v.numpy(), v0)
    np.testing.assert_array_equal(x.numpy(), x0)
    np.testing.assert_array_equal(x_after.numpy(), x0)
    np.testing.assert_array_equal(kept.numpy(), x0 * np.float32(2.0))
    assert not np.array_equal(got[0].numpy(), kept.numpy())  # the call did clip
    np.testing.assert_allclose(norm.numpy(), want_norm.numpy(), rtol=VS_TF_RTOL["float32"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=VS_TF_RTOL["float32"], atol=1e-30)


# ---- a list with no tensors: TF's answer ------------------------------------------

@pytest.mark.parametrize("empty", [[], [None, None]], ids=["empty", "only-None"])
@eager_and_function
def test_a_list_without_tensors_gives_tf_s_answer(mode, empty):
    out, norm = run(mode, lambda: clipops.clip_by_global_norm(empty, 1.0))
    tf_out, tf_norm = tf.clip_by_global_norm(empty, 1.0)
    assert out == tf_out == [None] * len(empty)
    assert norm.dtype == tf_norm.dtype == tf.float32 and norm.numpy() == tf_norm.numpy() == 0.0
    gn = run(mode, lambda: clipops.global_norm(empty))
    assert gn.dtype == tf.float32 and gn.numpy() == tf.linalg.global_norm(empty).numpy() == 0.0
    _, given = run(mode, lambda: clipops.clip_by_global_norm(empty, 1.0, use_norm=tf.constant(2.5)))
    assert given.dtype == tf.float32 and given.numpy() == 2.5


# ---- the raw ops check their attrs against their inputs -------------------------------

@pytest.mark.parametrize("tnorm", [tf.float16, tf.float64])
def test_raw_ops_refuse_a_tnorm_other_than_the_list_s(tnorm):
    # Tnorm sizes the norm output: float64 data with a float16 Tnorm once wrote
    # 8 bytes into a 2-byte output, float32 with float64 returned garbage.
    from clipops.tensorflow import _ops

    x = tf.constant([1.0, 1.0, 1.0], tf.float64 if tnorm == tf.float16 else tf.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Tnorm must be the dtype of t_list"):
        _ops.clipops_global_norm(t_list=[x], Tnorm=tnorm)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Tnorm must be the dtype of t_list"):
        _ops.clipops_clip_by_global_norm(t_list=[x], clip_norm=tf.constant(1.0, tnorm),
                                         use_norm=tf.constant(0.0, tnorm),
                                         unscale=tf.constant(1.0, tnorm))
    mixed = [tf.constant([1.0], tf.float16), tf.constant([2.0], tf.float64)]
    with pytest.raises(tf.errors.InvalidArgumentError, match="float32 for a list of mixed"):
        _ops.clipops_global_norm(t_list=mixed, Tnorm=tf.float64)
    assert _ops.clipops_global_norm(t_list=mixed, Tnorm=tf.float32)[0].numpy() == np.float32(np.sqrt(5))


# ---- documentation ------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["clip_by_global_norm", "global_norm"])
def test_help_shows_the_full_docstring(fn):
    import clipops.tensorflow as ctf

    for f in (getattr(clipops, fn), getattr(ctf, fn)):
        doc = f.__doc__
        for section in ("Args:", "Returns:", "Raises:", "t_list:"):
            assert section in doc, (f, section)
    assert "Differences from TensorFlow" in clipops.clip_by_global_norm.__doc__
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "### Differences from TensorFlow" in readme  # the section the docstrings point to


# ---- the op and its kernels ----------------------------------------------------

def test_every_dtype_has_cpu_and_gpu_kernels():
    from tensorflow.python.framework import kernels

    for op in ("ClipopsClipByGlobalNorm", "ClipopsGlobalNorm"):
        found = {}
        for k in kernels.get_registered_kernels_for_op(op).kernel:
            for c in k.constraint:
                if c.name == "Tnorm":
                    for t in c.allowed_values.list.type:
                        found.setdefault(k.device_type, set()).add(tf.dtypes.as_dtype(t).name)
        want = {"float16", "bfloat16", "float32", "float64"}
        assert found.get("CPU") == want, (op, found)
        # the driver route's GPU kernels: on every build, nvcc or not
        assert found.get("GPU") == want, (op, found)


def test_gpu_kernels_keep_clip_norm_and_use_norm_on_the_device():
    # a host-memory input would cost a device-to-host copy that waits for the stream
    from tensorflow.python.framework import kernels

    found = set()
    for k in kernels.get_registered_kernels_for_op("ClipopsClipByGlobalNorm").kernel:
        if k.device_type == "GPU":
            assert not k.host_memory_arg, (k.host_memory_arg, k.constraint)
            found |= {tf.dtypes.as_dtype(t).name for c in k.constraint if c.name == "Tnorm"
                      for t in c.allowed_values.list.type}
    assert found == {"float16", "bfloat16", "float32", "float64"}


@pytest.mark.gpu
@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"),
                    reason="needs a GPU that TensorFlow sees")
@pytest.mark.parametrize("given", [False, True], ids=["computed", "use_norm"])
def test_gpu_kernel_reads_clip_norm_and_use_norm_on_the_device(rng, given):
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (3, CHUNK + 1, 700)]

    def clip_on(device, clip, use):
        with tf.device(device):
            f = tf.function(lambda t: clipops.clip_by_global_norm(t, clip, use if given else None))
            return f([tf.constant(a) for a in arrays])

    with tf.device("/GPU:0"):
        clip, use = tf.Variable(0.5), tf.Variable(40.0)
    for value in (0.5, 0.25):  # a new value in the variable is read at the next step
        clip.assign(value)
        out, norm = clip_on("/GPU:0", clip, use)
        cpu_out, cpu_norm = clip_on("/CPU:0", tf.constant(value), tf.constant(40.0))
        assert "GPU" in out[0].device and "GPU" in clip.device
        assert norm.numpy() == cpu_norm.numpy()  # one reduction order on both devices
        for o, c in zip(out, cpu_out):
            assert o.numpy().tobytes() == c.numpy().tobytes()


def test_one_fused_op_in_the_graph():
    f = tf.function(lambda t: clipops.clip_by_global_norm(t, 1.0))
    graph = f.get_concrete_function([tf.TensorSpec((3,)), tf.TensorSpec((4, 2))]).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ClipopsClipByGlobalNorm") == 1
    assert not {"L2Loss", "Sqrt", "Mul", "Minimum"} & set(types), types


# ---- bad input: clear exceptions -------------------------------------------------

def test_bad_input_raises_clearly():
    x = tf.constant([1.0, 2.0])
    with pytest.raises(TypeError, match="sequence"):
        clipops.clip_by_global_norm(x, 1.0)
    with pytest.raises(TypeError, match=r"t_list\[1\] has dtype int32"):
        clipops.clip_by_global_norm([x, tf.constant([1, 2])], 1.0)
    with pytest.raises(ValueError, match="clip_norm must be a scalar"):
        clipops.clip_by_global_norm([x], tf.constant([1.0, 2.0]))
    with pytest.raises(TypeError, match="clip_norm must be a float"):
        clipops.clip_by_global_norm([x], tf.constant(1))


def test_non_scalar_clip_norm_inside_function_raises():
    f = tf.function(lambda t, c: clipops.clip_by_global_norm(t, c),
                    input_signature=[[tf.TensorSpec((2,))], tf.TensorSpec(None)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="clip_norm must be a scalar"):
        f([tf.constant([1.0, 2.0])], tf.constant([1.0, 2.0]))


def test_tensors_on_different_devices_raise():
    # Two logical CPUs must be configured before TF starts: use a fresh process.
    code = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import clipops
        with tf.device("/CPU:0"):
            a = tf.constant([1.0])
        with tf.device("/CPU:1"):
            b = tf.constant([2.0])
        try:
            clipops.clip_by_global_norm([a, b], 1.0)
        except ValueError as e:
            print("RAISED", e)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=os.path.dirname(__file__))
    assert "RAISED t_list[1] is on" in out.stdout, out.stdout + out.stderr


def test_op_refuses_another_tensorflow_version():
    # The op is compiled against one TF's C++ ABI; loading it under another must fail clearly.
    code = textwrap.dedent("""
        import tensorflow as tf
        tf.__version__ = "0.0.1"
        try:
            import clipops.tensorflow
        except ImportError as e:
            print("RAISED", e)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=os.path.dirname(__file__))
    assert "RAISED clipops' TensorFlow op was compiled against TensorFlow" in out.stdout, \
        out.stdout + out.stderr
    assert "0.0.1 is installed" in out.stdout


# ---- large CPU outputs from the op library's host block cache ------------------

@eager_and_function
def test_large_outputs_come_from_the_host_cache_and_go_back(mode, rng):
    import gc
    from clipops import tensorflow as ct
    import clipops.numpy as cn
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1 << 20, 300, 70_000)]
    ts = [tf.constant(a) for a in arrays]
    gc.collect()
    gc.disable()  # no other test's tensors may be collected (and their blocks freed) meanwhile
    try:
        _check_outputs_go_back(mode, arrays, ts, ct, cn)
    finally:
        gc.enable()


def _check_outputs_go_back(mode, arrays, ts, ct, cn):
    before = ct._host_cache_stats()
    out, norm = run(mode, lambda l: clipops.clip_by_global_norm(l, 1.0), ts)
    held = ct._host_cache_stats()
    # the 4 MiB and 280 KB outputs are cached blocks; the 300-element one is TF's
    assert held["in_use_bytes"] - before["in_use_bytes"] >= (4 << 20) + 280_000
    want, want_norm = cn.clip_by_global_norm(arrays, 1.0)
    assert norm.numpy().tobytes() == want_norm.tobytes()
    for o, w in zip(out, want):
        assert o.numpy().tobytes() == w.tobytes()
    view = np.asarray(out[0])  # no copy (.numpy() copies): it must keep the block alive
    del out, ts, o
    assert view.tobytes() == want[0].tobytes()
    assert ct._host_cache_stats()["in_use_bytes"] > before["in_use_bytes"]
    del view
    after = ct._host_cache_stats()
    assert after["in_use_bytes"] == before["in_use_bytes"]  # every block went back
    assert after["cached_bytes"] >= before["cached_bytes"]


def test_cached_outputs_do_not_fault_where_tf_s_allocator_does():
    """Without oneDNN's allocator (TF's default on CPUs without AVX-512, such
    as AMD EPYCs; forced here with TF_ENABLE_ONEDNN_OPTS=0), TF allocates CPU
    tensors with malloc, and every large one is faulted page by page when first
    written: the control (TF's own multiply) shows it. The op's outputs come
    from its cache and are faulted once. Counts of minor faults, not times."""
    code = textwrap.dedent("""
        import resource, numpy as np, tensorflow as tf, clipops
        xs = [tf.constant(np.random.default_rng(0).standard_normal(n).astype(np.float32))
              for n in (4_000_000, 1_000_000)]
        pages = sum(int(x.shape[0]) * 4 for x in xs) // 4096
        def faults(f):
            f(); f()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                f()
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
        clip = tf.function(lambda l: clipops.clip_by_global_norm(l, 1.0))
        print("PAGES", pages)
        print("TF", faults(lambda: [x * 0.5 for x in xs]))
        print("EAGER", faults(lambda: clipops.clip_by_global_norm(xs, 1.0)))
        print("FUNCTION", faults(lambda: clip(xs)))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env.pop("CLIPOPS_HOST_CACHE_MB", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(__file__))
    got = dict(line.split() for line in out.stdout.splitlines() if line[:1].isupper())
    assert set(got) >= {"PAGES", "TF", "EAGER", "FUNCTION"}, out.stdout + out.stderr
    pages = float(got["PAGES"])
    # the control: fresh pages fault here (most calls fault every page; glibc
    # sometimes reuses the smaller output, so the bound leaves room for that)
    assert float(got["TF"]) > pages / 10, got
    assert float(got["EAGER"]) < pages / 100, got
    assert float(got["FUNCTION"]) < pages / 100, got


def test_the_numpy_and_tf_op_host_caches_are_two_each_bounded():
    """libclipops_core (NumPy) and the TF op library (its own CPU-only copy of
    the core) each hold a host cache, each bounded by CLIPOPS_HOST_CACHE_MB: a
    process that uses both keeps up to twice that, the total the docs state
    (csrc/core/clipops.h). Four 4 MiB outputs of each are freed at once under
    an 8 MiB limit: each cache keeps two of them."""
    code = textwrap.dedent("""
        import gc, json, numpy as np, tensorflow as tf, clipops, clipops.numpy as cn
        from clipops import _core, tensorflow as ct
        x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MiB
        held = [cn.clip_by_global_norm([x], 1.0)[0] for _ in range(4)]
        t = tf.constant(x)
        held += [clipops.clip_by_global_norm([t], 1.0)[0] for _ in range(4)]
        del held
        gc.collect()
        print(json.dumps({"numpy": _core.host_cache_stats(), "tf": ct._host_cache_stats()}))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CLIPOPS_HOST_CACHE_MB="8")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(__file__))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    got = json.loads(lines[-1])
    limit = 8 << 20
    for side in ("numpy", "tf"):
        s = got[side]
        assert s["limit_bytes"] == limit and s["in_use_bytes"] == 0, got
        assert s["cached_bytes"] == limit, got  # two 4 MiB blocks each, the rest unmapped
    assert got["numpy"]["cached_bytes"] + got["tf"]["cached_bytes"] == 2 * limit
