"""clipops inside XLA (tf.function(jit_compile=True)): the same math in TF ops,
checked on the CPU against the op outside XLA, tf.clip_by_global_norm and float64."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the TensorFlow front end needs tensorflow")

import clipops  # noqa: E402
from conftest import BF16, CHUNK, TOL, assert_close, ref_clip, ref_norm  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]
SIZES = (1, 0, 15, 16, 17, 33, CHUNK + 9, 700)  # around the 16-term groups and a chunk


def arrays_of(rng, dtype, sizes=SIZES, scale=0.05):
    if dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes is not installed")
    np_dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    return [(rng.standard_normal(n) * scale).astype(np_dt) for n in sizes]


def both(f, *args):
    """f traced as a plain tf.function (the custom op) and with jit_compile=True."""
    return tf.function(f)(*args), tf.function(f, jit_compile=True)(*args)


def same_bits(a, b):
    return a.numpy().tobytes() == b.numpy().tobytes()


def norm_rtol(dtype, arrays):
    # XLA may add float64 terms in any order: a sum of n positive terms is then
    # within (n - 1) u of exact (u = 2^-53), the norm within half that. Smaller
    # dtypes: squares and 16-term groups in float32 are within 16 u32 of exact,
    # the norm within 8 u32 plus its final rounding: inside TOL's float32 2e-6.
    n = sum(a.size for a in arrays)
    return max(TOL[dtype][1], n * 2.0**-53 / 2) if dtype == "float64" else TOL[dtype][1]


def test_xla_graph_has_no_custom_op_and_plain_graph_has_it():
    spec = [tf.TensorSpec((3,)), tf.TensorSpec((4, 2))]
    f = lambda t: clipops.clip_by_global_norm(t, 1.0)  # noqa: E731
    plain = tf.function(f).get_concrete_function(spec).graph
    xla = tf.function(f, jit_compile=True).get_concrete_function(spec).graph
    assert "ClipopsClipByGlobalNorm" in {op.type for op in plain.get_operations()}
    assert not any(op.type.startswith("Clipops") for op in xla.get_operations())


def test_function_nested_in_a_jit_function_is_detected(rng):
    # the inner tf.function is traced in its own graph; its outer graph is the XLA one
    inner = tf.function(lambda t: clipops.clip_by_global_norm(t, 0.1))
    outer = tf.function(lambda t: inner(t), jit_compile=True)
    x = [tf.constant(rng.standard_normal(10).astype(np.float32))]
    out, norm = outer(x)  # would raise "unsupported operations" with the custom op
    ref, norm64 = ref_clip([x[0].numpy()], 0.1)
    assert_close(norm.numpy(), norm64, "float32", "norm")
    assert_close(out[0].numpy(), ref[0], "float32", "output")


@pytest.mark.parametrize("dtype", DTYPES)
def test_not_clipped_is_bit_identical_to_the_op(rng, dtype):
    arrays = arrays_of(rng, dtype)
    clip = float(ref_norm(arrays) * 4)
    (ours, n_op), (xla, n_xla) = both(lambda t: clipops.clip_by_global_norm(t, clip),
                                      [tf.constant(a) for a in arrays])
    for i, (o, x) in enumerate(zip(ours, xla)):
        assert o.dtype == x.dtype and same_bits(o, x), f"tensor {i}"
    assert n_xla.dtype == n_op.dtype
    np.testing.assert_allclose(np.float64(n_xla.numpy()), ref_norm(arrays),
                               rtol=norm_rtol(dtype, arrays))


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_within_tolerance(rng, dtype):
    arrays = arrays_of(rng, dtype)
    clip = float(np.asarray(ref_norm(arrays) * 0.3).astype(arrays[0].dtype))
    (ours, _), (xla, n_xla) = both(lambda t: clipops.clip_by_global_norm(t, clip),
                                   [tf.constant(a) for a in arrays])
    ref, norm64 = ref_clip(arrays, clip)
    rtol = norm_rtol(dtype, arrays)
    np.testing.assert_allclose(np.float64(n_xla.numpy()), norm64, rtol=rtol)
    for i, (o, x, r) in enumerate(zip(ours, xla, ref)):
        assert x.dtype == o.dtype
        # the scale c / n carries the norm's error plus TF's formula's roundings (TOL)
        np.testing.assert_allclose(np.float64(x.numpy()), r, rtol=rtol + TOL[dtype][1],
                                   atol=TOL[dtype][0], err_msg=f"tensor {i}")


@pytest.mark.parametrize("clip", [0.5, 100.0], ids=["clipped", "not-clipped"])
def test_float32_matches_tf_clip_by_global_norm(rng, clip):
    tensors = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in [(40, 3), (), (7,)]]
    xla, _ = tf.function(lambda t: clipops.clip_by_global_norm(t, clip), jit_compile=True)(tensors)
    theirs, _ = tf.clip_by_global_norm(tensors, clip)
    for x, t in zip(xla, theirs):
        if clip == 100.0:
            assert same_bits(x, t)  # TF's formula takes clip * (1/clip) in both
        else:  # the norms differ only in summation order (test_tf.VS_TF_RTOL)
            np.testing.assert_allclose(x.numpy(), t.numpy(), rtol=1e-5)


def test_mixed_dtypes_none_indexed_slices_and_use_norm(rng):
    a16 = rng.standard_normal(50).astype(np.float16)
    a32 = rng.standard_normal((4, 3)).astype(np.float32)
    a64 = rng.standard_normal(30)

    def f(v16, v32, v64, use):
        slices = tf.IndexedSlices(v32, tf.constant([0, 2, 5, 6]), tf.constant([8, 3]))
        return (clipops.clip_by_global_norm([None, v16, slices, v64], 1.0),
                clipops.clip_by_global_norm([v16, v32], 2.0, use_norm=use))

    args = [tf.constant(a16), tf.constant(a32), tf.constant(a64), tf.constant(3.0, tf.float64)]
    ((out, norm), (used, unorm)), ((xout, xnorm), (xused, xunorm)) = both(f, *args)
    assert out[0] is None and xout[0] is None
    assert isinstance(xout[2], tf.IndexedSlices)
    np.testing.assert_array_equal(xout[2].indices.numpy(), [0, 2, 5, 6])
    np.testing.assert_array_equal(xout[2].dense_shape.numpy(), [8, 3])
    assert xnorm.dtype == norm.dtype == tf.float32
    ref, norm64 = ref_clip([a16, a32, a64], 1.0)
    assert_close(xnorm.numpy(), norm64, "float32", "mixed norm")
    for x, r, a in zip([xout[1], xout[2].values, xout[3]], ref, [a16, a32, a64]):
        assert x.dtype.name == a.dtype.name
        assert_close(np.float64(x.numpy()), r, a.dtype if a.dtype.itemsize <= 4 else "float32")
    # use_norm (cast to the float32 norm) replaces the norm, as in the op
    assert xunorm.numpy() == unorm.numpy() == 3.0
    for u, x in zip(used, xused):
        assert same_bits(u, x)


def test_float16_sum_does_not_overflow_in_xla():
    ones = tf.ones((100_000,), tf.float16)
    norm = tf.function(clipops.global_norm, jit_compile=True)([ones])
    assert norm.dtype == tf.float16 and float(norm.numpy()) == 316.25  # TF's own: inf


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_global_norm_in_xla(rng, dtype):
    arrays = arrays_of(rng, dtype, sizes=(3, CHUNK + 1, 1))
    norm, xnorm = both(clipops.global_norm, [tf.constant(a) for a in arrays])
    assert xnorm.dtype == norm.dtype
    np.testing.assert_allclose(xnorm.numpy(), ref_norm(arrays), rtol=norm_rtol(dtype, arrays))


def test_unknown_shapes(rng):
    f = tf.function(lambda t: clipops.clip_by_global_norm(t, 0.5), jit_compile=True,
                    input_signature=[[tf.TensorSpec(None, tf.float32)] * 2])
    arrays = [rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(17).astype(np.float32)]
    out, norm = f([tf.constant(a) for a in arrays])
    ref, norm64 = ref_clip(arrays, 0.5)
    assert_close(norm.numpy(), norm64, "float32", "norm")
    for o, r in zip(out, ref):
        assert_close(o.numpy(), r, "float32", "output")


@pytest.mark.parametrize("clip", [0.5, 100.0], ids=["clipped", "not-clipped"])
@pytest.mark.parametrize("use_norm", [None, 3.0], ids=["computed", "use_norm"])
def test_gradients_match_the_op_and_tf(rng, clip, use_norm):
    values = [tf.constant(rng.standard_normal(s)) for s in [(4, 3), (5,), ()]]
    weights = [tf.constant(rng.standard_normal(v.shape)) for v in values]

    def grads(fn, vs):
        with tf.GradientTape() as tape:
            tape.watch(vs)
            use = None if use_norm is None else tf.constant(use_norm, tf.float64)
            out, norm = fn(vs, clip, use_norm=use)
            loss = tf.add_n([tf.reduce_sum(w * o) for w, o in zip(weights, out)]) + 0.3 * norm
        return tape.gradient(loss, vs)

    xla = tf.function(lambda vs: grads(clipops.clip_by_global_norm, vs), jit_compile=True)(values)
    op = tf.function(lambda vs: grads(clipops.clip_by_global_norm, vs))(values)
    theirs = grads(tf.clip_by_global_norm, values)
    # float64 throughout; a dozen roundings separate the three chain rules
    for x, o, t in zip(xla, op, theirs):
        np.testing.assert_allclose(x.numpy(), o.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(x.numpy(), t.numpy(), rtol=1e-10, atol=1e-12)


def test_keras_style_train_step_compiles(rng):
    # Keras' jit_compile wraps the train step in tf.function(jit_compile=True)
    w = tf.Variable(rng.standard_normal((8, 4)).astype(np.float32))
    x = tf.constant(rng.standard_normal((16, 8)).astype(np.float32))
    before = w.numpy().copy()

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(x, w) ** 2)
        (g,), norm = clipops.clip_by_global_norm(tape.gradient(loss, [w]), 1.0)
        w.assign_sub(0.1 * g)
        return g, norm

    g, norm = step()
    assert norm.numpy() > 1.0  # clipped: the step has norm 1
    np.testing.assert_allclose(np.linalg.norm(g.numpy()), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), before - 0.1 * g.numpy(), rtol=1e-6, atol=1e-7)


def test_keras_fit_with_jit_compile():
    # Keras 3's model.fit under XLA, as jit_compile="auto" gives on a GPU
    keras = pytest.importorskip("keras", reason="Keras is not installed")

    def trained(clip_fn):
        keras.utils.set_random_seed(7)

        class Model(keras.Sequential):
            def train_step(self, data):
                x, y = data
                with tf.GradientTape() as tape:
                    loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
                grads = tape.gradient(loss, self.trainable_variables)
                grads, _ = clip_fn(grads, 0.1)
                self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
                return {"loss": loss}

        model = Model([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                       keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
        assert model.jit_compile is True
        x = rng_data.standard_normal((32, 6)).astype(np.float32)
        model.fit(x, x.sum(axis=1, keepdims=True), batch_size=8, epochs=2, verbose=0)
        return [w.numpy() for w in model.trainable_variables]

    rng_data = np.random.default_rng(0)
    ours = trained(clipops.clip_by_global_norm)
    rng_data = np.random.default_rng(0)
    theirs = trained(tf.clip_by_global_norm)
    # 8 clipped steps; each scale differs from TF's by the norms' float32 rounding
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)
