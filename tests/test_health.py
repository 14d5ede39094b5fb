"""Gradient health in the same pass (README, "Gradient health"): per-tensor norms
from the partial sums of the global norm, and the non-finite policy
("nan" / "raise" / "skip"), in the NumPy and TensorFlow front ends (the CPU
kernel, and the TF op eagerly, in tf.function and under XLA). The CUDA kernel's
side runs in tests/test_emulation.py (CPU) and tests/test_cupy.py (GPU)."""

from __future__ import annotations

import numpy as np
import pytest

import clipops
import clipops.numpy as cn
from conftest import BF16, CHUNK, assert_close, random_array, ref_clip, ref_norm

DTYPES = [np.float16, np.float32, np.float64] + ([BF16] if BF16 is not None else [])
SIZES = [3, CHUNK - 1, 0, CHUNK + 1, 2 * CHUNK, 700, 1]


def make_list(rng, dtype, scale=3.0):
    dts = [np.float16, np.float32, np.float64] if dtype == "mixed" else [dtype]
    return [random_array(rng, (n,), dts[k % len(dts)], scale=scale) for k, n in enumerate(SIZES)]


# ---- per-tensor norms: NumPy (the CPU kernel) -------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_tensor_norms_are_each_tensor_s_global_norm(rng, dtype):
    arrays = make_list(rng, dtype)
    res = cn.clip_by_global_norm(arrays, 1.0, return_norms=True)
    plain, plain_norm = cn.clip_by_global_norm(arrays, 1.0)
    # asking for the norms changes nothing else
    assert np.asarray(res.global_norm).tobytes() == np.asarray(plain_norm).tobytes()
    assert [c.tobytes() for c in res.clipped] == [c.tobytes() for c in plain]
    assert res.skipped is None and res.tensor_norms.shape == (len(arrays),)
    ndt = np.asarray(plain_norm).dtype
    assert res.tensor_norms.dtype == ndt
    for a, n in zip(arrays, res.tensor_norms):
        if dtype != "mixed":  # the same partials in the same order: the same bits
            assert np.asarray(n).tobytes() == np.asarray(cn.global_norm([a])).tobytes()
        assert_close(np.asarray(n, np.float64), ref_norm([a]), ndt, "tensor norm")
    norm, norms = cn.global_norm(arrays, return_norms=True)
    assert norms.tobytes() == res.tensor_norms.tobytes()
    assert np.asarray(norm).tobytes() == np.asarray(plain_norm).tobytes()


def test_tensor_norms_for_none_entries_are_zero_and_use_norm_keeps_them(rng):
    a, b = rng.standard_normal(100).astype(np.float32), rng.standard_normal(CHUNK + 5).astype(np.float32)
    res = cn.clip_by_global_norm([None, a, None, b], 1.0, use_norm=123.0, return_norms=True)
    assert res.clipped[0] is None and res.clipped[2] is None
    assert float(res.global_norm) == 123.0
    assert res.tensor_norms[0] == 0 and res.tensor_norms[2] == 0
    assert res.tensor_norms[1] == cn.global_norm([a]) and res.tensor_norms[3] == cn.global_norm([b])
    empty = cn.clip_by_global_norm([None], 1.0, return_norms=True)
    assert empty.tensor_norms.tolist() == [0.0] and float(empty.global_norm) == 0.0


# ---- the non-finite policy: NumPy ---------------------------------------------------

def poisoned(rng, where: int, value: float):
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (10, CHUNK + 2, 33, 500)]
    arrays[where][min(5, arrays[where].size - 1)] = value
    return arrays


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_skip_returns_the_inputs_and_says_so(rng, value):
    arrays = poisoned(rng, 2, value)
    res = cn.clip_by_global_norm(arrays, 1.0, nonfinite="skip")
    assert bool(res.skipped) and not np.isfinite(res.global_norm) and res.tensor_norms is None
    for c, a in zip(res.clipped, arrays):
        assert c.tobytes() == a.tobytes()
    nan_out, _ = cn.clip_by_global_norm(arrays, 1.0)  # "nan": TF's behaviour
    assert all(np.isnan(c).all() for c in nan_out)
    # a finite step under "skip" is clipped exactly as without it
    fine = [rng.standard_normal(n).astype(np.float32) * 10 for n in (10, CHUNK + 2)]
    res = cn.clip_by_global_norm(fine, 1.0, nonfinite="skip")
    plain, norm = cn.clip_by_global_norm(fine, 1.0)
    assert not res.skipped and [c.tobytes() for c in res.clipped] == [c.tobytes() for c in plain]


def test_skip_in_place_leaves_the_arrays_untouched(rng):
    arrays = poisoned(rng, 1, np.nan)
    before = [a.copy() for a in arrays]
    res = cn.clip_by_global_norm(arrays, 1.0, in_place=True, nonfinite="skip")
    assert bool(res.skipped) and all(c is a for c, a in zip(res.clipped, arrays))
    assert [a.tobytes() for a in arrays] == [b.tobytes() for b in before]


@pytest.mark.parametrize("in_place", [False, True])
def test_raise_names_the_first_bad_tensor_and_writes_nothing(rng, in_place):
    arrays = poisoned(rng, 1, np.inf)
    arrays[3][0] = np.nan
    before = [a.copy() for a in arrays]
    with pytest.raises(clipops.NonFiniteError, match=r"arrays\[1\] is the first tensor whose own "
                       r"norm is not finite \(2 of 4 are\).*Nothing was clipped"):
        cn.clip_by_global_norm(arrays, 1.0, in_place=in_place, nonfinite="raise")
    assert [a.tobytes() for a in arrays] == [b.tobytes() for b in before]
    # positions count None entries, as the caller's list does
    with pytest.raises(clipops.NonFiniteError, match=r"arrays\[3\] is the first"):
        cn.clip_by_global_norm([None, arrays[0], None, arrays[1]], 1.0, nonfinite="raise")
    # finite: "raise" returns TF's pair, with the same bits
    fine = [a for a in before if np.isfinite(a).all()]
    got = cn.clip_by_global_norm(fine, 1.0, nonfinite="raise")
    want = cn.clip_by_global_norm(fine, 1.0)
    assert len(got) == 2 and np.asarray(got[1]).tobytes() == np.asarray(want[1]).tobytes()


def test_raise_explains_an_overflow_without_inf_elements():
    big = np.full(4, 1e30, np.float32)  # finite values whose squares overflow float32
    with pytest.raises(clipops.NonFiniteError, match=r"arrays\[0\].*squares beyond float32"):
        cn.clip_by_global_norm([big], 1.0, nonfinite="raise")
    with pytest.raises(clipops.NonFiniteError, match="every tensor's own norm is finite"):
        cn.clip_by_global_norm([np.ones(3, np.float32)], 1.0, use_norm=np.inf, nonfinite="raise")


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="nonfinite must be one of 'nan', 'raise', 'skip'"):
        cn.clip_by_global_norm([np.ones(2, np.float32)], 1.0, nonfinite="ignore")


def test_clip_result_unpacks_and_has_names(rng):
    a = rng.standard_normal(8).astype(np.float32)
    clipped, norm, norms, skipped = cn.clip_by_global_norm([a], 1.0, return_norms=True,
                                                           nonfinite="skip")
    assert isinstance(skipped, np.bool_) and not skipped and norms.shape == (1,)


# ---- unscale: a loss scale's inverse, folded into the same pass ------------------

def loss_scaled(rng, dtype, s):
    """A list as mixed precision makes it: gradients times the loss scale s (exact for
    a power of two), so that x * (1/s) gives the gradients back exactly."""
    small = 0.02 if dtype in (np.float16, "mixed") else 1.0  # float16: no overflow at s = 2^10
    return [np.asarray(a.astype(np.float64) * s).astype(a.dtype) for a in make_list(rng, dtype, small)]


@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
@pytest.mark.parametrize("s", [2.0 ** 10, 2.0 ** -3])
def test_unscale_by_a_power_of_two_is_unscaling_first(rng, dtype, s):
    # x * 2^-k is exact, so the fused op must give the bits of unscaling first and
    # clipping after: outputs, global norm and per-tensor norms, clipped or not
    arrays = loss_scaled(rng, dtype, s)
    unscaled = [np.asarray(a.astype(np.float64) / s).astype(a.dtype) for a in arrays]
    n = ref_norm(unscaled)
    for clip in (0.5 * n, 2.0 * n):
        got = cn.clip_by_global_norm(arrays, clip, unscale=1.0 / s, return_norms=True)
        want = cn.clip_by_global_norm(unscaled, clip, return_norms=True)
        assert [g.tobytes() for g in got.clipped] == [w.tobytes() for w in want.clipped]
        assert got.global_norm.tobytes() == want.global_norm.tobytes()
        assert got.tensor_norms.tobytes() == want.tensor_norms.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unscale_of_any_value_is_close_to_float64(rng, dtype):
    # u = 0.3 is not a power of two: the norm sqrt(sum) * u is rounded once, each output
    # x * fl(scale * u) twice (the scale, then the product): the dtype's tolerance
    arrays = make_list(rng, dtype)
    u = 0.3
    u_used = float(np.asarray(u).astype(dtype))  # rounded to the norm dtype, as clip_norm is
    ref, ref_n = ref_clip([a.astype(np.float64) * u_used for a in arrays], 1.0)
    got, norm = cn.clip_by_global_norm(arrays, 1.0, unscale=u)
    assert_close(norm, ref_n, dtype, "norm")
    for g, r in zip(got, ref):
        assert_close(g, r, dtype, "unscaled and clipped")


def test_unscale_with_skip_use_norm_and_bad_values(rng):
    arrays = poisoned(rng, 1, np.inf)
    res = cn.clip_by_global_norm(arrays, 1.0, unscale=0.25, nonfinite="skip")
    assert bool(res.skipped)  # a skipped step is neither clipped nor unscaled
    assert [c.tobytes() for c in res.clipped] == [a.tobytes() for a in arrays]
    fine = [a for a in arrays if np.isfinite(a).all()]
    # use_norm is the norm of the unscaled list: scale = clip / use_norm, then times u
    got, norm = cn.clip_by_global_norm(fine, 1.0, use_norm=4.0, unscale=0.5)
    assert norm == 4.0
    assert [g.tobytes() for g in got] == [(a * np.float32(0.125)).tobytes() for a in fine]
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="unscale must be a finite number > 0"):
            cn.clip_by_global_norm(fine, 1.0, unscale=bad)
    core = cn._common.load_core()  # the core's own check
    a = fine[0]
    out = np.empty_like(a)
    with pytest.raises(ValueError, match="unscale must be a finite number > 0"):
        core.clip_cpu([(a.ctypes.data, out.ctypes.data, a.size, 2)], 2, True, 1.0, None, 0,
                      unscale=-2.0)
    with pytest.raises(ValueError, match="unscale is for clip_by_global_norm only"):
        core.clip_cpu([(a.ctypes.data, out.ctypes.data, a.size, 2)], 2, True, 1.0, None, 0,
                      mode=1, unscale=0.5)


# ---- TensorFlow: the op (eager, tf.function) and the XLA route -------------------

tf = pytest.importorskip("tensorflow")


def tf_modes():
    return pytest.mark.parametrize("mode", ["eager", "function", "xla"])


def call(mode, fn):
    if mode == "eager":
        return fn()
    return tf.function(fn, jit_compile=mode == "xla")()


@tf_modes()
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "mixed"])
def test_tf_tensor_norms_match_the_cpu_kernel(rng, mode, dtype):
    arrays = make_list(rng, dtype)
    tensors = [tf.constant(a) for a in arrays]
    res = call(mode, lambda: clipops.clip_by_global_norm(tensors, 1.0, return_norms=True))
    want = cn.clip_by_global_norm(arrays, 1.0, return_norms=True)
    got = res.tensor_norms.numpy()
    if mode == "xla":  # XLA's own summation order: within the tolerance of the norm dtype
        for g, a in zip(got, arrays):
            assert_close(np.asarray(g, np.float64), ref_norm([a]), got.dtype, "XLA tensor norm")
    else:
        assert got.tobytes() == want.tensor_norms.tobytes()
        assert res.global_norm.numpy().tobytes() == np.asarray(want.global_norm).tobytes()
    norm, norms = call(mode, lambda: clipops.global_norm([None] + tensors, return_norms=True))
    assert norms.shape == (len(arrays) + 1,) and norms.numpy()[0] == 0
    if mode != "xla":
        assert norms.numpy()[1:].tobytes() == want.tensor_norms.tobytes()


@tf_modes()
def test_tf_skip_passes_the_inputs_through(rng, mode):
    arrays = poisoned(rng, 2, np.nan)
    tensors = [tf.constant(a) for a in arrays]
    res = call(mode, lambda: clipops.clip_by_global_norm(tensors, 1.0, nonfinite="skip"))
    assert bool(res.skipped.numpy())
    for c, a in zip(res.clipped, arrays):
        assert c.numpy().tobytes() == a.tobytes()
    fine = [tf.constant(rng.standard_normal(n).astype(np.float32) * 10) for n in (10, 300)]
    res = call(mode, lambda: clipops.clip_by_global_norm(fine, 1.0, nonfinite="skip"))
    plain, _ = call(mode, lambda: clipops.clip_by_global_norm(fine, 1.0))
    assert not bool(res.skipped.numpy())
    assert [c.numpy().tobytes() for c in res.clipped] == [p.numpy().tobytes() for p in plain]


def test_tf_raise_eagerly_and_in_a_function(rng):
    arrays = poisoned(rng, 1, np.inf)
    tensors = [tf.constant(a) for a in arrays]
    with pytest.raises(clipops.NonFiniteError, match=r"t_list\[1\] is the first"):
        clipops.clip_by_global_norm(tensors, 1.0, nonfinite="raise")
    f = tf.function(lambda ts: clipops.clip_by_global_norm(ts, 1.0, nonfinite="raise"))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"global norm is not finite.*i =\] \[1\]"):
        f(tensors)
    ok = [tf.constant(a) for a in arrays if np.isfinite(a).all()]
    clipped, norm = f(ok)  # a finite step passes the assertion
    assert np.isfinite(norm.numpy())
    with pytest.raises(ValueError, match="XLA"):
        tf.function(lambda: clipops.clip_by_global_norm(ok, 1.0, nonfinite="raise"),
                    jit_compile=True)()


def test_tf_gradients_through_tensor_norms_and_a_skipped_step(rng):
    x = [tf.Variable(rng.standard_normal(n)) for n in (5, 40)]  # float64
    with tf.GradientTape(persistent=True) as tape:
        res = clipops.clip_by_global_norm(x, 1.0, return_norms=True)
        y = tf.reduce_sum(res.tensor_norms * tf.constant([2.0, 3.0], tf.float64))
        y_tf = 2.0 * tf.norm(x[0]) + 3.0 * tf.norm(x[1])
    for g, g_tf in zip(tape.gradient(y, x), tape.gradient(y_tf, x)):
        np.testing.assert_allclose(g.numpy(), g_tf.numpy(), rtol=1e-12)
    bad = [tf.Variable([1.0, np.inf]), tf.Variable([2.0, 3.0])]

    def skipped_step_grads(mode, **kw):
        def grads():
            with tf.GradientTape() as tape:
                res = clipops.clip_by_global_norm(bad, 1.0, nonfinite="skip", **kw)
                y = tf.reduce_sum(res.clipped[1] * tf.constant([5.0, 7.0]))
            return res.skipped, tape.gradient(y, bad)
        return call(mode, grads)

    # A skipped step is the identity, with or without unscale (its outputs are
    # its inputs, not unscaled): so is its gradient, on the op and XLA routes.
    # The op's route used to multiply it by unscale: [2.5, 3.5] for u = 0.5.
    for mode in ("eager", "function", "xla"):
        for kw in ({}, {"unscale": 0.5}, {"unscale": tf.constant(0.5)}):
            skipped, g = skipped_step_grads(mode, **kw)
            assert bool(skipped), (mode, kw)
            assert g[1].numpy().tolist() == [5.0, 7.0], (mode, kw, g[1].numpy())
            # The op's gradient function gives x[0] zeros; TF's differentiation of
            # the XLA route's ops gives NaN at the inf element itself (0 * inf in
            # the square's gradient), as TF's own clip does: only its finite one.
            g0 = g[0].numpy().tolist()
            assert (g0[:1] if mode == "xla" else g0) == ([0.0] if mode == "xla" else [0.0, 0.0])


@pytest.mark.parametrize("skip", [False, True], ids=["finite", "skipped"])
def test_tf_unscale_gradients_agree_between_the_op_and_xla(rng, skip):
    """The op's gradient function against TF's own differentiation of the XLA
    route's ops, with unscale, a weighted tensor norm and clip_norm as
    variables, in a finite and in a skipped step (an inf in x[0])."""
    x = [tf.Variable(rng.standard_normal(n) * 8.0) for n in (5, 40)]  # float64
    if skip:
        x[0].assign(tf.tensor_scatter_nd_update(x[0], [[2]], [np.inf]))
    w = [tf.constant(rng.standard_normal(n)) for n in (5, 40)]
    clip = tf.Variable(1.5, dtype=tf.float64)

    def grads():
        with tf.GradientTape() as tape:
            res = clipops.clip_by_global_norm(x, clip, unscale=0.25, return_norms=True,
                                              nonfinite="skip")
            y = tf.reduce_sum(res.clipped[0] * w[0]) + tf.reduce_sum(res.clipped[1] * w[1]) \
                + 3.0 * res.tensor_norms[1]
        return res.skipped, tape.gradient(y, x + [clip])

    (skipped, g_op), (skipped_xla, g_xla) = call("function", grads), call("xla", grads)
    assert bool(skipped) == bool(skipped_xla) == skip
    # float64 throughout; the two routes round the same formulas in other orders
    # (XLA's own sum order, the norm's float64 product with u): a few ulps, 1e-12.
    for a, b in zip(g_op, g_xla):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-300)
    if skip:  # the outputs are the identity; tensor_norms[1] still depends on x[1]
        # (x[0]'s own norm is inf: d n_0 / d x_0 = x_0 / n_0 is NaN at the inf element)
        finite = np.isfinite(x[0].numpy())
        assert g_op[0].numpy()[finite].tolist() == w[0].numpy()[finite].tolist()
        assert float(g_op[2]) == 0.0


@tf_modes()
@pytest.mark.parametrize("dtype", [np.float32, np.float16, "mixed"])
def test_tf_unscale_matches_the_cpu_kernel(rng, mode, dtype):
    s = 2.0 ** 10
    arrays = loss_scaled(rng, dtype, s)
    tensors = [tf.constant(a) for a in arrays]
    # a variable, as Keras' loss scale is: its inverse is computed in the graph
    scale = tf.Variable(s, dtype=tf.float32)
    res = call(mode, lambda: clipops.clip_by_global_norm(
        tensors, 1.0, unscale=1.0 / scale, return_norms=True, nonfinite="skip"))
    want = cn.clip_by_global_norm(arrays, 1.0, unscale=1.0 / s, return_norms=True)
    if mode == "xla":  # XLA's own summation order: the outputs within the dtype's tolerance
        assert_close(res.global_norm.numpy(), float(want.global_norm), want.global_norm.dtype,
                     "XLA norm")
        for g, w in zip(res.clipped, want.clipped):
            assert_close(g.numpy(), w, w.dtype, "XLA output")
    else:
        assert [g.numpy().tobytes() for g in res.clipped] == [w.tobytes() for w in want.clipped]
        assert res.global_norm.numpy().tobytes() == want.global_norm.tobytes()
        assert res.tensor_norms.numpy().tobytes() == want.tensor_norms.tobytes()
    assert not bool(res.skipped.numpy())
    with pytest.raises(ValueError, match="unscale must be a finite number > 0"):
        clipops.clip_by_global_norm(tensors, 1.0, unscale=0.0)


def test_tf_unscale_gradients_are_the_chain_rule(rng):
    # d/dx of clip(x * u) is u times the clip's gradient at x * u: the same as
    # differentiating the plain op applied to the product
    x = [tf.Variable(rng.standard_normal(n) * 8.0) for n in (5, 40)]  # float64
    w = [tf.constant(rng.standard_normal(n)) for n in (5, 40)]
    u = 0.125
    with tf.GradientTape(persistent=True) as tape:
        res = clipops.clip_by_global_norm(x, 1.0, unscale=u, return_norms=True)
        y = sum(tf.reduce_sum(c * wi) for c, wi in zip(res.clipped, w)) \
            + res.global_norm + 3.0 * res.tensor_norms[1]
        ref = clipops.clip_by_global_norm([xi * u for xi in x], 1.0, return_norms=True)
        y_ref = sum(tf.reduce_sum(c * wi) for c, wi in zip(ref.clipped, w)) \
            + ref.global_norm + 3.0 * ref.tensor_norms[1]
    assert abs(float(y) - float(y_ref)) <= 1e-12 * abs(float(y_ref))
    for g, g_ref in zip(tape.gradient(y, x), tape.gradient(y_ref, x)):
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-12)


# ---- fused list clip_by_norm and clip_by_value ------------------------------------

def tf_formula_with(norms, arrays, clip):
    """tf.clip_by_norm's own ops, (t * c) / maximum(l2norm, c), in each array's
    dtype, with l2norm given: the formula clipops must follow bit for bit."""
    out = []
    for a, n in zip(arrays, norms):
        c = tf.constant(clip, a.dtype)
        out.append(((tf.constant(a) * c) / tf.maximum(tf.constant(n, a.dtype), c)).numpy())
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64] + ([BF16] if BF16 else []))
def test_clip_by_norm_is_tf_s_formula_and_close_to_float64(rng, dtype):
    arrays = make_list(rng, dtype, scale=0.02 if dtype == np.float16 else 3.0)
    arrays[1] *= 0  # a zero tensor: TF's where(l2sum > 0, ...) branch
    for clip in (2.0, 0.05, 1e4):  # clips some tensors, all, none
        got, norms = cn.clip_by_norm(arrays, clip, return_norms=True)
        own = [cn.global_norm([a]) for a in arrays]  # each tensor's norm in its dtype
        assert norms.tobytes() == np.array(own, norms.dtype).tobytes()
        for g, w in zip(got, tf_formula_with(own, arrays, clip)):
            assert g.tobytes() == w.tobytes()
        for a, g in zip(arrays, got):  # and it is a clip: float64 reference
            n = ref_norm([a])
            c = float(np.asarray(clip, dtype))
            assert_close(g, np.asarray(a, np.float64) * c / max(n, c), dtype, "clip_by_norm")
        if dtype != BF16:  # TF's own op: its norm sums in the dtype, so last-bit differences
            for a, g in zip(arrays, got):
                want = tf.clip_by_norm(tf.constant(a), tf.constant(clip, a.dtype)).numpy()
                assert_close(g, want, dtype, "vs tf.clip_by_norm")


def test_clip_by_norm_in_place_and_mixed(rng):
    arrays = make_list(rng, "mixed")
    want = cn.clip_by_norm(arrays, 1.5)
    copies = [a.copy() for a in arrays]
    out = cn.clip_by_norm(copies, 1.5, in_place=True)
    assert all(o is c for o, c in zip(out, copies))
    assert [c.tobytes() for c in copies] == [w.tobytes() for w in want]
    assert cn.clip_by_norm([None, arrays[0]], 1.5)[0] is None


EDGES = [np.nan, -np.inf, np.inf, -0.0, 0.0, 0.1, -0.1, 1.0, -1.0, 1e-8, 3e4, -7.5]


def same_bits_but_zero_ties(got, want) -> bool:
    """Bitwise equal, except that where both are zeros the sign may differ: on a
    tie of zeros TF's vectorized loop returns +0.0 and its scalar loop the
    element (clip_math.h, ValueClipper), so TF itself gives either there."""
    g, w = np.asarray(got), np.asarray(want)
    same = (np.frombuffer(g.tobytes(), np.uint8).reshape(g.size, -1) ==
            np.frombuffer(w.tobytes(), np.uint8).reshape(w.size, -1)).all(axis=1)
    both_zero = (g.astype(np.float64) == 0) & (w.astype(np.float64) == 0)
    return bool(np.all(same | both_zero))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64] + ([BF16] if BF16 else []))
def test_clip_by_value_is_tf_s_bits(rng, dtype):
    arrays = [a for a in make_list(rng, dtype) if a.size] + [np.array(EDGES, dtype)]
    for lo, hi in ((-0.5, 1.25), (-0.1, -0.1), (0.0, 0.0), (-np.inf, 0.3), (2.0, 1.0),
                   (np.nan, 1.0), (-1.0, np.nan)):
        got = cn.clip_by_value(arrays, lo, hi)
        for a, g in zip(arrays, got):
            want = tf.clip_by_value(tf.constant(a), tf.constant(lo, a.dtype),
                                    tf.constant(hi, a.dtype)).numpy()
            assert same_bits_but_zero_ties(g, want), (lo, hi, a[:12], g[:12], want[:12])
        # element by element through TF's scalar loop (one-element tensors): every bit, zeros too
        for x in np.array(EDGES, dtype):
            want = tf.clip_by_value(tf.constant(np.array([x])), tf.constant(lo, dtype),
                                    tf.constant(hi, dtype)).numpy()
            got = cn.clip_by_value([np.array([x])], lo, hi)[0]
            assert got.tobytes() == want.tobytes(), (x, lo, hi, got, want)


def test_clip_by_value_rejects_non_scalar_bounds():
    with pytest.raises(ValueError, match="clip_value_min must be a scalar"):
        cn.clip_by_value([np.ones(2, np.float32)], np.zeros(2), 1.0)


@tf_modes()
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "mixed"])
def test_tf_clip_by_norm_and_by_value_match_the_cpu_kernel(rng, mode, dtype):
    arrays = make_list(rng, dtype, scale=0.02 if dtype == np.float16 else 3.0)
    tensors = [None] + [tf.constant(a) for a in arrays]
    got, norms = call(mode, lambda: clipops.clip_by_norm(tensors, 1.5, return_norms=True))
    want, want_norms = cn.clip_by_norm(arrays, 1.5, return_norms=True)
    assert got[0] is None and norms.numpy()[0] == 0
    values = call(mode, lambda: clipops.clip_by_value(tensors, -0.5, 0.75))
    want_values = cn.clip_by_value(arrays, -0.5, 0.75)
    for g, w in zip(values[1:], want_values):  # XLA's clip_by_value is TF's too: exact
        assert g.numpy().tobytes() == w.tobytes()
    if mode == "xla":  # XLA sums the norm in its own order: within tolerance
        for g, w in zip(got[1:], want):
            assert_close(g.numpy(), w, w.dtype, "XLA clip_by_norm")
        return
    assert norms.numpy()[1:].tobytes() == want_norms.tobytes()
    for g, w in zip(got[1:], want):
        assert g.numpy().tobytes() == w.tobytes()


def test_tf_clip_by_norm_and_value_gradients_match_tf(rng):
    x = [tf.Variable(rng.standard_normal(n) * 2) for n in (5, 300)]  # float64
    c = tf.Variable(1.5, dtype=tf.float64)
    up = [tf.constant(rng.standard_normal(v.shape)) for v in x]
    with tf.GradientTape(persistent=True) as tape:
        ours = clipops.clip_by_norm(x, c)
        theirs = [tf.clip_by_norm(v, c) for v in x]
        y = tf.add_n([tf.reduce_sum(o * u) for o, u in zip(ours, up)])
        y_tf = tf.add_n([tf.reduce_sum(o * u) for o, u in zip(theirs, up)])
    for g, g_tf in zip(tape.gradient(y, x + [c]), tape.gradient(y_tf, x + [c])):
        np.testing.assert_allclose(g.numpy(), g_tf.numpy(), rtol=1e-10, atol=1e-14)
    lo, hi = tf.Variable(-0.5, dtype=tf.float64), tf.Variable(0.7, dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        ours = clipops.clip_by_value(x, lo, hi)
        theirs = [tf.clip_by_value(v, lo, hi) for v in x]
        y = tf.add_n([tf.reduce_sum(o * u) for o, u in zip(ours, up)])
        y_tf = tf.add_n([tf.reduce_sum(o * u) for o, u in zip(theirs, up)])
    for g, g_tf in zip(tape.gradient(y, x + [lo, hi]), tape.gradient(y_tf, x + [lo, hi])):
        np.testing.assert_allclose(g.numpy(), g_tf.numpy(), rtol=1e-12, atol=1e-15)


def test_tf_one_fused_op_per_list():
    spec = [tf.TensorSpec((3,)), tf.TensorSpec((4, 2))]
    for fn, op in ((lambda t: clipops.clip_by_norm(t, 1.0), "ClipopsClipByNorm"),
                   (lambda t: clipops.clip_by_value(t, -1.0, 1.0), "ClipopsClipByValue")):
        types = [o.type for o in tf.function(fn).get_concrete_function(spec).graph.get_operations()]
        assert types.count(op) == 1 and not {"Maximum", "Minimum", "Sqrt"} & set(types), types
