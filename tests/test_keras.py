"""clipops.keras against Keras 3's own clip, inside model.fit.

The main check is teacher-forced: the model under test trains with ``model.fit`` and a fused
optimizer; before each step a callback copies its whole state (weights and optimizer variables)
into a reference model compiled with Keras' own optimizer, and after the step the reference
takes the same batch with ``train_on_batch``. Both steps start from the same state and compute
the same gradients (the same graph up to the clip), so the two new states must agree:
bit for bit when the step is not clipped, within the float32 rounding of the norm when it is
(``judge``, with the derivation). The model is the MNIST MLP of bench/mnist.py (784-512-256-10
ReLU, MSE on one-hot labels, SGD 0.1, batch 256) on fresh random data, every step checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="Keras is not installed")
tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
if keras.backend.backend() != "tensorflow":
    pytest.skip("clipops.keras needs KERAS_BACKEND=tensorflow", allow_module_level=True)

import clipops.keras as ck  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import agreement  # noqa: E402

U32 = 2.0 ** -24
CLIP = 1.0
CLIPNORM = 0.05  # per tensor: between the MLP's small and large gradients in data()
BATCH = 256
SIZES = (784, 512, 256, 10)
# |norm_keras - norm_clipops| / norm: Keras 3's global norm is sqrt(sum(stack(sum(square(g)))))
# in float32, the same Eigen reductions as TF's l2_loss sums, so bench/agreement.py's bound
# for TF (its docstring derives it) holds for Keras too.
NORM_RTOL = agreement.norm_rtol(SIZES[0] * SIZES[1], 2 * (len(SIZES) - 1))


def mlp(seed: int = 1):
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(n, activation="relu") for n in SIZES[1:-1]]
    return keras.Sequential([keras.Input((SIZES[0],)), *layers, keras.layers.Dense(SIZES[-1])])


def data(rng, steps: int, overflow_step: int | None = None, accumulation: int | None = None):
    """MNIST-shaped batches: pixels in [0, 1) and one-hot labels. Every other update's batches
    are dimmed to a tenth, so that with CLIP = 1 their gradient norm (~0.2) is not clipped
    while the others' (~4) are: both kinds of step occur in every run. ``overflow_step``'s
    batch is scaled to 1e5, which overflows float16 (a skipped step under a loss scale)."""
    x = rng.random((steps * BATCH, SIZES[0]), dtype=np.float32)
    for i in range(steps):
        if (i // (accumulation or 1)) % 2:
            x[i * BATCH:(i + 1) * BATCH] *= np.float32(0.1)
    if overflow_step is not None:
        x[overflow_step * BATCH:(overflow_step + 1) * BATCH] *= np.float32(1e5)
    y = np.eye(SIZES[-1], dtype=np.float32)[rng.integers(0, SIZES[-1], steps * BATCH)]
    return x, y


def copy_state(src, dst) -> None:
    # a fused optimizer's variables are Keras' own (its norms are kept out of them)
    for a, b in zip(src.weights, dst.weights, strict=True):
        b.assign(a)
    for a, b in zip(src.optimizer.variables, dst.optimizer.variables, strict=True):
        assert a.shape == b.shape, (a.path, b.path)
        b.assign(a)


def judge(before, fused_after, keras_after, clipped) -> str:
    """'' when one SGD step's new weights agree, else what is wrong. ``clipped``: whether the
    step was clipped, or a list with one such flag per weight (clipnorm).

    Not clipped: both scales are c * (1/c), the same float32 operations on the same gradients,
    so the new weights must have the same bits.
    Clipped: each update is fl(lr * fl(g * s)) with s = fl(c * fl(1/n)) from each side's own norm
    n. The norms differ by at most NORM_RTOL (relative); the two roundings of each scale and
    the two of each update add 4u per side (8u); the final w - update rounds each side by half
    an ulp of w, and the update measured as w0 - w1 carries another half: 2 ulp(w) in all.
    A wrong scale (a factor other than c/n, a per-replica norm) is off by far more.
    clipnorm's fl(fl(g * c) / n) has the same two roundings and a per-tensor norm (fewer terms
    than the global one), so the same bound holds weight by weight.
    """
    flags = list(clipped) if isinstance(clipped, (list, tuple)) else [clipped] * len(before)
    for i, (w0, wf, wk, clipped) in enumerate(zip(before, fused_after, keras_after, flags)):
        if not clipped:
            if wf.tobytes() != wk.tobytes():
                bad = int(np.sum(wf != wk))
                return f"not clipped, but weight {i} differs in {bad} elements"
            continue
        w0d, wfd, wkd = (np.asarray(a, np.float64) for a in (w0, wf, wk))
        tol = np.abs(w0d - wkd) * (NORM_RTOL + 8 * U32) \
            + 2 * np.spacing(np.maximum(np.abs(w0), np.abs(wk)))
        over = np.abs(wfd - wkd) / tol
        if not over.max(initial=0.0) <= 1.0:
            return f"clipped, weight {i} is off by {over.max():.3g} times the allowed rounding"
    return ""


class TeacherForced(keras.callbacks.Callback):
    """Runs the reference model on each batch from the fitted model's state (see the module
    docstring) and records each step's verdict."""

    def __init__(self, ref, x, y):
        super().__init__()
        self.ref, self.x, self.y = ref, x, y
        self.step = 0
        self.verdicts = []  # (step, norm, clipped, problem)
        self.tensor_norms = []  # clipnorm: each step's per-tensor norms

    def on_train_batch_begin(self, batch, logs=None):
        copy_state(self.model, self.ref)
        self.before = [w.numpy() for w in self.model.trainable_weights]

    def on_train_batch_end(self, batch, logs=None):
        sl = slice(self.step * BATCH, (self.step + 1) * BATCH)
        self.ref.train_on_batch(self.x[sl], self.y[sl])
        inner = self.model.optimizer
        inner = getattr(inner, "inner_optimizer", inner)
        norm = float(inner.last_global_norm.numpy())
        if inner.clipnorm:  # each tensor by its own norm
            clipped = [bool(n > inner.clipnorm) for n in inner.last_tensor_norms.numpy()]
            self.tensor_norms.append(inner.last_tensor_norms.numpy())
        elif inner.clipvalue:  # no norm: Keras' bits on every step
            clipped = False
        else:
            clipped = norm > CLIP
        problem = judge(self.before, [w.numpy() for w in self.model.trainable_weights],
                        [w.numpy() for w in self.ref.trainable_weights], clipped)
        for a, b in zip(self.model.optimizer.variables, self.ref.optimizer.variables):
            a, b = np.asarray(a.numpy()), np.asarray(b.numpy())
            if not problem and a.tobytes() != b.tobytes():  # SGD: no state the clip moves
                problem = f"optimizer variable differs: {a.ravel()[:3]} vs {b.ravel()[:3]}"
        self.verdicts.append((self.step, norm, clipped, problem))
        self.step += 1


@pytest.fixture
def policy():
    """Restores Keras' dtype policy after a test that changes it."""
    old = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(old)


def fit_teacher_forced(rng, make_optimizer, jit_compile, accumulation=None, precision=None,
                       steps=8, overflow_step=None, set_policy=None, run_eagerly=False,
                       initial_scale=2.0 ** 15):
    if precision:
        set_policy(precision)
    x, y = data(rng, steps, overflow_step, accumulation)
    ref = mlp()
    ref_opt = make_optimizer(accumulation)
    if precision == "mixed_float16":
        ref_opt = keras.optimizers.LossScaleOptimizer(ref_opt, initial_scale=initial_scale)
    ref.compile(optimizer=ref_opt, loss="mse", jit_compile=jit_compile, run_eagerly=run_eagerly)
    model = mlp()
    opt = make_optimizer(accumulation)
    if precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=initial_scale)
    model.compile(optimizer=ck.fused(opt), loss="mse", jit_compile=jit_compile,
                  run_eagerly=run_eagerly)
    for m in (ref, model):
        m.optimizer.build(m.trainable_variables)
    tf_cb = TeacherForced(ref, x, y)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[tf_cb])
    assert tf_cb.step == steps
    model.teacher = tf_cb
    return model, ref, tf_cb.verdicts


def sgd(**clip):
    return lambda accumulation: keras.optimizers.SGD(
        0.1, gradient_accumulation_steps=accumulation, **clip)


def _check(verdicts, accumulation=None, skipped=()):
    k = accumulation or 1
    update_steps = [i for i in range(k - 1, len(verdicts), k) if i not in skipped]
    bad = [v for v in verdicts if v[3]]
    assert not bad, f"{len(bad)} of {len(verdicts)} steps disagree with Keras, first: {bad[0]}"
    norms = [v[1] for v in verdicts if v[0] in update_steps]
    clipped = [v[2] for v in verdicts if v[0] in update_steps]
    # a valid run has both kinds of step, and no norm so close to the clip that the two sides
    # could decide differently whether to clip
    assert any(clipped) and not all(clipped), f"norms {norms}: the data should clip some steps"
    assert min(abs(n - CLIP) for n in norms) > 1e-3 * CLIP, norms


@pytest.mark.parametrize("accumulation", [None, 2])
@pytest.mark.parametrize("jit_compile", [False, True, "auto"])
def test_fit_matches_keras_global_clipnorm(rng, jit_compile, accumulation):
    _, _, verdicts = fit_teacher_forced(rng, sgd(global_clipnorm=CLIP), jit_compile, accumulation)
    _check(verdicts, accumulation)


def test_fit_matches_keras_eagerly(rng):
    _, _, verdicts = fit_teacher_forced(rng, sgd(global_clipnorm=CLIP), False, steps=4,
                                        run_eagerly=True)
    _check(verdicts)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("accumulation", [None, 2])
def test_fit_mixed_float16_matches_keras(rng, policy, jit_compile, accumulation):
    # step 2 overflows float16: both must skip it (weights unchanged, scale halved)
    model, ref, verdicts = fit_teacher_forced(rng, sgd(global_clipnorm=CLIP), jit_compile,
                                              accumulation, precision="mixed_float16",
                                              steps=8, overflow_step=2, set_policy=policy)
    assert isinstance(model.optimizer, ck.FusedLossScaleOptimizer)
    assert isinstance(ref.optimizer, keras.optimizers.LossScaleOptimizer)
    _check(verdicts, accumulation, skipped={2, 3} if accumulation else {2})
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 14  # halved once


def test_fit_mixed_float16_scale_below_one(rng, policy):
    # a loss scale below 1 (unscale 4): the same single op; still Keras' bits on unclipped steps
    model, _, verdicts = fit_teacher_forced(rng, sgd(global_clipnorm=CLIP), False,
                                            precision="mixed_float16", steps=4,
                                            set_policy=policy, initial_scale=0.25)
    assert float(model.optimizer.dynamic_scale.numpy()) == 0.25
    _check(verdicts)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_clipnorm_matches_keras(rng, jit_compile):
    # clipops.tensorflow.clip_by_norm, one op for the list: Keras' bits on every tensor that
    # is not clipped, within its norm's rounding on those that are (judge, per weight)
    model, _, verdicts = fit_teacher_forced(rng, sgd(clipnorm=CLIPNORM), jit_compile, steps=4)
    assert not [v for v in verdicts if v[3]], verdicts
    norms = np.array(model.teacher.tensor_norms)
    # a valid run has both kinds of tensor, none so close to the clip that the two sides
    # could decide differently
    assert (norms > CLIPNORM).any() and (norms < CLIPNORM).any(), norms
    assert np.abs(norms / CLIPNORM - 1).min() > 1e-3, norms
    counts = _op_counts(model, *(tf.constant(a[:BATCH]) for a in data(rng, 1)))
    # SGD's clip and update are one op (tests/test_keras_optim.py)
    assert counts.get("ClipopsFusedUpdate") == 1, counts
    assert not {"ClipopsClipByNorm", "ClipopsClipByGlobalNorm"} & set(counts), counts


def test_fit_clipvalue_matches_keras(rng):
    # clipops.tensorflow.clip_by_value, one op for the list: Keras' bits on every step
    model, _, verdicts = fit_teacher_forced(rng, sgd(clipvalue=1e-3), False, steps=4)
    assert not [v for v in verdicts if v[3]], verdicts
    counts = _op_counts(model, *(tf.constant(a[:BATCH]) for a in data(rng, 1)))
    assert counts.get("ClipopsFusedUpdate") == 1 and "ClipopsClipByValue" not in counts, counts


def test_judge_can_fail(rng):
    w0 = rng.standard_normal(1000).astype(np.float32)
    w1 = (w0 - np.float32(0.1) * rng.standard_normal(1000).astype(np.float32)).astype(np.float32)
    assert judge([w0], [w1], [w1], clipped=True) == ""
    assert judge([w0], [w1], [w1.copy()], clipped=False) == ""
    one_ulp = np.nextafter(w1, np.float32(np.inf)).astype(np.float32)
    assert "not clipped" in judge([w0], [one_ulp], [w1], clipped=False)
    # an update 1e-3 too large (a scale off by 1e-3) is far outside the clipped tolerance
    wrong = (w0 - (w0 - w1) * np.float32(1.001)).astype(np.float32)
    assert "off by" in judge([w0], [wrong], [w1], clipped=True)
    # per weight (clipnorm): each weight is judged by its own flag
    assert judge([w0, w0], [wrong, w1], [w1, w1], clipped=[True, False]) != ""
    assert "weight 1" in judge([w0, w0], [w1, one_ulp], [w1, w1], clipped=[True, False])


def test_saving_and_loading(rng, tmp_path):
    x, y = data(rng, 2)
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.Adam(1e-3, global_clipnorm=CLIP)),
                  loss="mse")
    model.fit(x, y, batch_size=BATCH, verbose=0)
    path = tmp_path / "fused.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer).__name__ == "FusedAdam" and ck.is_fused(loaded.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(model.weights + model.optimizer.variables,
                    loaded.weights + loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # the loaded one trains on exactly as the original
    model.train_on_batch(x[:BATCH], y[:BATCH])
    loaded.train_on_batch(x[:BATCH], y[:BATCH])
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # and it loads in a fresh process after `import clipops.keras` alone
    script = textwrap.dedent(f"""
        import keras, clipops.keras
        m = keras.saving.load_model({str(path)!r})
        print(type(m.optimizer).__name__, m.optimizer.global_clipnorm)
    """)
    out = _run_python(script, tmp_path)
    assert out.split()[-2:] == ["FusedAdam", str(CLIP)], out


def test_saving_loss_scale_optimizer(rng, tmp_path, policy):
    policy("mixed_float16")
    x, y = data(rng, 1)
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, global_clipnorm=CLIP))), loss="mse")
    model.fit(x, y, batch_size=BATCH, verbose=0)
    model.save(tmp_path / "lso.keras")
    loaded = keras.saving.load_model(tmp_path / "lso.keras")
    assert isinstance(loaded.optimizer, ck.FusedLossScaleOptimizer)
    assert type(loaded.optimizer.inner_optimizer).__name__ == "FusedSGD"
    assert float(loaded.optimizer.dynamic_scale.numpy()) == \
        float(model.optimizer.dynamic_scale.numpy())


def _fit(x, y, make_optimizer, fuse: bool):
    """The MLP from its usual initial weights, compiled with make_optimizer(model) (made fused
    or not) and fitted on (x, y)."""
    m = mlp()
    for v in m.trainable_variables:  # biases start at 0, where weight decay changes nothing
        if "bias" in v.name:
            v.assign(np.full(v.shape, 0.5, np.float32))
    opt = make_optimizer(m)
    m.compile(optimizer=ck.fused(opt) if fuse else opt, loss="mse")
    m.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return m


@pytest.mark.parametrize("exclude", ["var_names", "var_list"])
@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_fused_keeps_state_that_is_not_in_the_config(rng, policy, exclude, precision):
    # exclude_from_weight_decay is held by the optimizer, not its config: fused() must keep it
    # (also for a LossScaleOptimizer's inner optimizer). The clip is far above the norms, so
    # every step is unclipped and the fused run must have Keras' bits.
    policy(precision)
    x, y = data(rng, 3)

    def adamw(model, exclude=exclude):
        opt = keras.optimizers.AdamW(1e-2, weight_decay=0.5, global_clipnorm=1e3)
        if exclude == "var_names":
            opt.exclude_from_weight_decay(var_names=["bias"])
        elif exclude == "var_list":  # the first layer's kernel, by variable
            opt.exclude_from_weight_decay(var_list=[model.trainable_variables[0]])
        if precision == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        return opt

    fused, plain = _fit(x, y, adamw, True), _fit(x, y, adamw, False)
    assert ck.is_fused(fused.optimizer) and not ck.is_fused(plain.optimizer)
    for a, b in zip(fused.trainable_weights, plain.trainable_weights, strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes(), a.path
    # the exclusion matters: without it, those variables are decayed too
    decayed = _fit(x, y, lambda m: adamw(m, exclude=None), False)
    excluded = [i for i, v in enumerate(fused.trainable_variables)
                if (exclude == "var_names" and "bias" in v.name)
                or (exclude == "var_list" and i == 0)]
    assert excluded
    for i in excluded:
        assert (decayed.trainable_weights[i].numpy()
                != fused.trainable_weights[i].numpy()).any(), i


def trained_and_fresh(x, y, make_optimizer, save_fused: bool):
    """(src, dst): an mlp() trained on x, y with make_optimizer() (fused when
    save_fused), and a fresh one with the other kind of optimizer, built, to
    load src's checkpoint into."""
    def model(fuse):
        m = mlp()
        opt = make_optimizer()
        m.compile(optimizer=ck.fused(opt) if fuse else opt, loss="mse")
        return m

    src = model(save_fused)
    src.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    dst = model(not save_fused)
    dst.optimizer.build(dst.trainable_variables)
    return src, dst


def _checkpoint_roundtrip(rng, tmp_path, save_fused: bool, kind: str):
    """Trains 6 steps with Adam (fused or not), saves, loads into the other kind of model."""
    steps = 6
    x, y = data(rng, steps)
    src, dst = trained_and_fresh(x, y, lambda: keras.optimizers.Adam(1e-3, global_clipnorm=CLIP),
                                 save_fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "weights.h5":
            path = tmp_path / "w.weights.h5"
            src.save_weights(path)
            dst.load_weights(path)
        else:
            path = tf.train.Checkpoint(model=src, optimizer=src.optimizer).save(
                str(tmp_path / "ckpt"))
            status = tf.train.Checkpoint(model=dst, optimizer=dst.optimizer).restore(path)
            status.assert_consumed()  # every value found a variable and every variable a value
    # Keras only warns when it skips an optimizer's state (variable counts that differ)
    assert not [w for w in caught if "Skipping" in str(w.message)], [str(w.message) for w in caught]
    assert int(dst.optimizer.iterations.numpy()) == steps
    for a, b in zip(src.weights + src.optimizer.variables,
                    dst.weights + dst.optimizer.variables, strict=True):
        assert a.shape == b.shape, (a.path, b.path)
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.parametrize("kind", ["weights.h5", "tf.train.Checkpoint"])
@pytest.mark.parametrize("save_fused", [False, True], ids=["plain-to-fused", "fused-to-plain"])
def test_checkpoints_interchange(rng, tmp_path, save_fused, kind):
    _checkpoint_roundtrip(rng, tmp_path, save_fused, kind)


def test_fused_optimizer_variables_are_keras_own(rng):
    model = mlp()
    opt = ck.fused(keras.optimizers.Adam(1e-3, global_clipnorm=CLIP))
    ref = keras.optimizers.Adam(1e-3, global_clipnorm=CLIP)
    opt.build(model.trainable_variables)
    ref.build(model.trainable_variables)
    assert [v.path.split("/", 1)[1] for v in opt.variables] == \
        [v.path.split("/", 1)[1] for v in ref.variables]
    # the norms exist, outside the variables
    assert opt.last_tensor_norms.shape == (len(model.trainable_variables),)


MultiOptimizer = getattr(keras.optimizers, "MultiOptimizer", None)


@pytest.mark.skipif(MultiOptimizer is None, reason="this Keras has no MultiOptimizer (3.15+)")
def test_multi_optimizer_has_fused_sub_optimizers(rng):
    # a MultiOptimizer clips nothing itself: fused() and fused_class() refuse it, and no
    # FusedMultiOptimizer is registered; fused sub-optimizers are the way, and train as Keras
    plain = MultiOptimizer(keras.optimizers.OptimizerMap(keras.optimizers.SGD(0.1)))
    with pytest.raises(TypeError, match="sub-optimizers"):
        ck.fused(plain)
    with pytest.raises(TypeError, match="sub-optimizers"):
        ck.fused_class(MultiOptimizer)
    assert keras.saving.get_registered_object("clipops>FusedMultiOptimizer") is None
    assert type(plain) is MultiOptimizer

    def multi(model, fuse):
        f = ck.fused if fuse else (lambda o: o)
        # the last layer's kernel and bias with Adam, the rest with SGD; clips above the norms
        last = model.layers[-1].name
        mapping = keras.optimizers.OptimizerMap(f(keras.optimizers.SGD(0.1, global_clipnorm=1e3)))
        mapping[f"{model.name}/{last}/.*"] = f(keras.optimizers.Adam(1e-3, global_clipnorm=1e3))
        return MultiOptimizer(mapping)

    x, y = data(rng, 2)
    models = []
    for fuse in (True, False):
        m = mlp()
        m.compile(optimizer=multi(m, fuse), loss="mse")
        m.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
        models.append(m)
    for a, b in zip(models[0].trainable_weights, models[1].trainable_weights, strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes(), a.path
    subs = models[0].optimizer.optimizers
    assert len(subs) == 2 and all(ck.is_fused(o) for o in subs)
    # each sub-optimizer clipped its own gradients: its norms, one per variable it holds
    assert sorted(len(o.last_tensor_norms.numpy()) for o in subs) == [2, 4]
    assert all((o.last_tensor_norms.numpy() > 0).all() for o in subs)


def test_fit_mixed_float16_with_clipnorm_matches_keras(rng, policy):
    # the loss-scale op only unscales (clipnorm is the inner optimizer's, fused clip_by_norm
    # after it): Keras' bits on tensors under clipnorm, its norm's rounding on those over
    model, _, verdicts = fit_teacher_forced(rng, sgd(clipnorm=CLIPNORM), False,
                                            precision="mixed_float16", steps=4,
                                            overflow_step=2, set_policy=policy)
    assert not [v for v in verdicts if v[3]], verdicts
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 14  # step 2 overflowed
    assert (np.array(model.teacher.tensor_norms) > CLIPNORM).any()


def test_errors():
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        ck.fused("adam")
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        ck.fused(tf.Variable(1.0))
    with pytest.raises(TypeError, match="class"):
        ck.fused(keras.optimizers.Adam)
    with pytest.raises(ValueError, match="global_clipnorm, clipnorm or clipvalue"):
        ck.fused(keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match="global_clipnorm, clipnorm or clipvalue"):
        ck.fused(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    with pytest.raises(ValueError, match="global_clipnorm, clipnorm or clipvalue"):
        ck.fused_class(keras.optimizers.SGD)(0.1)
    built = keras.optimizers.SGD(0.1, global_clipnorm=1.0)
    built.build([keras.Variable(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match="already built"):
        ck.fused(built)
    inner = keras.optimizers.SGD(0.1, global_clipnorm=1.0)
    inner.build([keras.Variable(np.zeros(3, np.float32))])
    lso = keras.optimizers.LossScaleOptimizer(inner)
    with pytest.raises(ValueError, match="already built"):
        ck.fused(lso)
    # a refused optimizer is left as it was
    assert type(built) is keras.optimizers.SGD and type(lso) is keras.optimizers.LossScaleOptimizer
    assert type(inner) is keras.optimizers.SGD
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="global_clipnorm, clipnorm or clipvalue"):
        ck.fused(lso)
    assert type(lso) is keras.optimizers.LossScaleOptimizer
    assert type(lso.inner_optimizer) is keras.optimizers.SGD
    with pytest.raises(TypeError, match="Optimizer subclass"):
        ck.fused_class(int)
    with pytest.raises(TypeError, match="LossScaleOptimizer"):
        ck.fused_class(keras.optimizers.LossScaleOptimizer)
    with pytest.raises(ValueError, match="update_freq"):
        ck.GlobalNormLogger("/tmp", update_freq=0)
    # the optimizer itself changes class (everything it holds is kept); fused twice is once
    opt = keras.optimizers.Adam(1e-3, global_clipnorm=1.0)
    assert ck.fused(opt) is opt and type(opt) is ck.fused_class(keras.optimizers.Adam)
    assert ck.fused(opt) is opt and type(opt).__name__ == "FusedAdam"
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, clipvalue=1.0))
    inner = lso.inner_optimizer
    assert ck.fused(lso) is lso and type(lso) is ck.FusedLossScaleOptimizer
    assert lso.inner_optimizer is inner and type(inner).__name__ == "FusedSGD"

    class MyLossScale(keras.optimizers.LossScaleOptimizer):
        pass

    with pytest.raises(TypeError, match="subclass"):
        ck.fused(MyLossScale(keras.optimizers.SGD(0.1, global_clipnorm=1.0)))


def test_logger_needs_a_fused_optimizer(rng, tmp_path):
    x, y = data(rng, 1)
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=CLIP), loss="mse")
    with pytest.raises(TypeError, match="clipops.keras.fused"):
        model.fit(x, y, batch_size=BATCH, verbose=0,
                  callbacks=[ck.GlobalNormLogger(tmp_path)])


def _events(log_dir, tag="global_gradient_norm") -> list:
    from tensorflow.core.util import event_pb2
    values = []
    for name in sorted(os.listdir(log_dir)):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            for v in event.summary.value:
                if v.tag == tag:
                    values.append((event.step, float(tf.make_ndarray(v.tensor))))
    return values


def test_global_norm_logger_writes_the_norm(rng, tmp_path):
    steps = 4
    x, y = data(rng, steps)
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.SGD(0.1, global_clipnorm=CLIP)),
                  loss="mse")
    # the first step's norm, independently: float64 norm of the gradients at the initial weights
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.mean_squared_error(y[:BATCH], model(x[:BATCH])))
    grads = tape.gradient(loss, model.trainable_variables)
    squares = [float(np.sum(np.square(g.numpy().astype(np.float64)))) for g in grads]
    first = float(np.sqrt(sum(squares)))
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[ck.GlobalNormLogger(tmp_path)])
    logged = _events(tmp_path / "train")
    assert [s for s, _ in logged] == list(range(1, steps + 1))
    # eager and traced gradients may differ in their last bits: a float32-sum tolerance
    assert abs(logged[0][1] - first) <= NORM_RTOL * first, (logged[0], first)
    assert logged[-1][1] == float(model.optimizer.last_global_norm.numpy())
    assert logged[0][1] > CLIP and logged[1][1] < CLIP  # a bright and a dim batch
    # per-layer norms: one series per variable, the first step's against float64
    last = model.optimizer.last_tensor_norms.numpy()
    for v, sq, n_last in zip(model.trainable_variables, squares, last, strict=True):
        series = _events(tmp_path / "train", f"gradient_norm/{v.path}")
        assert [s for s, _ in series] == list(range(1, steps + 1)), v.path
        assert abs(series[0][1] - np.sqrt(sq)) <= NORM_RTOL * np.sqrt(sq), (v.path, series[0])
        assert series[-1][1] == float(n_last)
    assert abs(np.sqrt(np.sum(last.astype(np.float64) ** 2)) / logged[-1][1] - 1) <= NORM_RTOL


def test_logger_with_clipnorm_and_without_per_tensor(rng, tmp_path):
    x, y = data(rng, 2)
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.SGD(0.1, clipnorm=CLIPNORM)), loss="mse")
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[ck.GlobalNormLogger(tmp_path / "a")])
    norms = model.optimizer.last_tensor_norms.numpy()
    assert norms.shape == (len(model.trainable_variables),) and (norms > 0).all()
    v = model.trainable_variables[0]
    assert _events(tmp_path / "a" / "train", f"gradient_norm/{v.path}")[-1][1] == norms[0]
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[ck.GlobalNormLogger(tmp_path / "b", per_tensor=False)])
    assert _events(tmp_path / "b" / "train", f"gradient_norm/{v.path}") == []
    assert len(_events(tmp_path / "b" / "train")) == 2
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.SGD(0.1, clipvalue=1.0)), loss="mse")
    with pytest.raises(ValueError, match="clipvalue"):
        model.fit(x, y, batch_size=BATCH, verbose=0,
                  callbacks=[ck.GlobalNormLogger(tmp_path / "c")])


def _run_python(script: str, cwd) -> str:
    """Runs `script` in a fresh Python (started outside the repository, so that the installed
    clipops is found) and returns its output; fails the test with it on an error."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


MIRRORED_SETUP = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import clipops.keras as ck

rng = np.random.default_rng(SEED)
x = rng.random((256, 784), dtype=np.float32)
y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 256)]

def update(make_optimizer, strategy, precision="float32", batch_size=256):
    keras.mixed_precision.set_global_policy(precision)
    with strategy.scope():
        keras.utils.set_random_seed(3)
        m = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
        m.compile(optimizer=make_optimizer(), loss="mse")
    w0 = [w.numpy().astype(np.float64) for w in m.trainable_weights]
    m.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    return np.concatenate([(a - w.numpy()).ravel() for a, w in zip(w0, m.trainable_weights)])

def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = tf.distribute.get_strategy()
"""

MIRRORED = MIRRORED_SETUP + """
keras_opt = lambda: keras.optimizers.SGD(0.1, global_clipnorm=1.0)
fused_opt = lambda: ck.fused(keras_opt())
fused_lso = lambda: ck.fused(keras.optimizers.LossScaleOptimizer(keras_opt()))
single = update(keras_opt, one)
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "update_norm": float(np.linalg.norm(single)),
    "fused_mirrored": rel(update(fused_opt, mirrored), single),
    "keras_mirrored": rel(update(keras_opt, mirrored), single),
    "fused_single": rel(update(fused_opt, one), single),
    "fused_lso_mirrored": rel(update(fused_lso, mirrored, "mixed_float16"),
                              update(keras_opt, one, "mixed_float16")),
}))
"""


def test_mirrored_strategy_sums_then_clips(rng, tmp_path):
    out = _run_python(MIRRORED.replace("SEED", str(int(rng.integers(2 ** 31)))), tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["replicas"] == 2
    # Each replica's gradient is the sum over its 128 rows, added across the replicas: the
    # same terms as the single device's 256-row sums in another order, so the summed gradient
    # differs from the single device's by float32 summation error only (measured ~1e-7
    # normwise; 1e-4 leaves room for cancellation), and the clip of it by the norm's rounding.
    assert r["fused_single"] <= 1e-4, r
    assert r["fused_mirrored"] <= 1e-4, r
    assert r["fused_lso_mirrored"] <= 1e-3, r  # float16 forward pass on both sides
    # Keras 3 clips each replica's half before the sum: two clipped halves of norm <= 1 each
    # add up to an update of another size; the difference is O(1), not rounding
    assert r["keras_mirrored"] > 0.05, r


MIRRORED_ACCUMULATION = MIRRORED_SETUP + """
def sgd():
    return lambda: keras.optimizers.SGD(0.1, global_clipnorm=1.0, gradient_accumulation_steps=2)
def adamw():
    return keras.optimizers.AdamW(1e-3, weight_decay=0.1, global_clipnorm=1.0,
                                  gradient_accumulation_steps=2)
fused = lambda make: (lambda: ck.fused(make()))
lso = lambda make: (lambda: keras.optimizers.LossScaleOptimizer(make()))
# two micro-batches of 128 rows (64 per replica), one update
print(json.dumps({
    "update_norm": float(np.linalg.norm(update(sgd(), one, batch_size=128))),
    "fused_sgd_mirrored": rel(update(fused(sgd()), mirrored, batch_size=128),
                              update(sgd(), one, batch_size=128)),
    "fused_adamw_mirrored": rel(update(fused(adamw), mirrored, batch_size=128),
                                update(adamw, one, batch_size=128)),
    "fused_lso_mirrored": rel(update(fused(lso(sgd())), mirrored, "mixed_float16", 128),
                              update(lso(sgd()), one, "mixed_float16", 128)),
    # four micro-batches of 64, two updates: the accumulators reset and fill again
    "fused_sgd_mirrored_2": rel(update(fused(sgd()), mirrored, batch_size=64),
                                update(sgd(), one, batch_size=64)),
    "fused_adamw_mirrored_2": rel(update(fused(adamw), mirrored, batch_size=64),
                                  update(adamw, one, batch_size=64)),
}))
"""


def test_mirrored_strategy_with_gradient_accumulation(rng, tmp_path):
    # Keras' own optimizer fails to trace here (merge_call inside its accumulation cond); a
    # fused one takes the cond to the cross-replica context. Against Keras on one device with
    # the same two micro-batches: float32 summation order only, as in the test above
    # (measured ~1e-6 for SGD and AdamW, ~2e-4 with float16's forward pass).
    out = _run_python(MIRRORED_ACCUMULATION.replace("SEED", str(int(rng.integers(2 ** 31)))),
                      tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    # the accumulated gradient's norm is ~4: the SGD update is clipped to lr * 1.0
    assert abs(r["update_norm"] - 0.1) <= 1e-3, r
    assert r["fused_sgd_mirrored"] <= 1e-4, r
    assert r["fused_adamw_mirrored"] <= 1e-4, r
    assert r["fused_lso_mirrored"] <= 1e-3, r  # float16 forward pass on both sides
    assert r["fused_sgd_mirrored_2"] <= 1e-4 and r["fused_adamw_mirrored_2"] <= 1e-4, r


def _op_counts(model, x, y) -> dict:
    """Op types in one traced train_step, its branch and loop bodies included."""
    fn = tf.function(lambda x, y: model.train_step((x, y)))
    graph_def = fn.get_concrete_function(x, y).graph.as_graph_def()
    counts: dict = {}
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    for n in nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def test_the_fused_ops_are_what_runs(rng, policy):
    # what the teacher-forced tests cannot see: which ops do the clip
    x, y = (tf.constant(a[:BATCH]) for a in data(rng, 1))
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.SGD(0.1, global_clipnorm=CLIP)), loss="mse")
    model.optimizer.build(model.trainable_variables)
    counts = _op_counts(model, x, y)
    # SGD fuses its update: the clip and the update are one op (tests/test_keras_optim.py)
    assert counts.get("ClipopsFusedUpdate") == 1 and "ClipopsClipByGlobalNorm" not in counts, \
        counts
    assert "Sqrt" not in counts, counts  # Keras' own global norm is gone
    policy("mixed_float16")
    model = mlp()
    model.compile(optimizer=ck.fused(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, global_clipnorm=CLIP))), loss="mse")
    model.optimizer.build(model.trainable_variables)
    counts = _op_counts(model, x, y)
    ref = mlp()
    ref.compile(optimizer=keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, global_clipnorm=CLIP)), loss="mse")
    ref.optimizer.build(ref.trainable_variables)
    keras_counts = _op_counts(ref, x, y)
    # ONE fused op: the non-finite check, the unscale, the clip and (SGD) the update. No
    # per-tensor isfinite, no per-tensor divide by the loss scale (Keras has one per gradient),
    # no norm pass.
    assert counts.get("ClipopsFusedUpdate") == 1 and "ClipopsClipByGlobalNorm" not in counts, \
        counts
    assert "ClipopsGlobalNorm" not in counts, counts
    assert counts.get("IsFinite") == 1, counts  # of the norm alone
    grads = len(model.trainable_variables)
    assert keras_counts.get("IsFinite", 0) >= grads, keras_counts
    assert counts.get("RealDiv", 0) <= keras_counts.get("RealDiv", 0) - grads, (counts, keras_counts)


def _every_keras_optimizer():
    for name in sorted(dir(keras.optimizers)):
        cls = getattr(keras.optimizers, name)
        if (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)
                and cls is not keras.optimizers.Optimizer
                and not issubclass(cls, (keras.optimizers.LossScaleOptimizer,
                                         keras.optimizers.MultiOptimizer))):
            yield cls


@pytest.mark.parametrize("cls", list(_every_keras_optimizer()), ids=lambda c: c.__name__)
def test_every_keras_optimizer_fused_steps_as_keras_own(cls, rng):
    # Unclipped steps (a power-of-two clip far above the norms) must be Keras' own, bit for
    # bit, whatever the optimizer keeps in its own update step: Nadam's u_product lives in
    # its _backend_update_step, which the fused class once replaced (the weights went inf/NaN).
    w0 = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    grads = [[(rng.standard_normal(w.shape) * 0.1).astype(np.float32) for w in w0]
             for _ in range(3)]
    out = []
    for fuse in (False, True):
        variables = [keras.Variable(w.copy()) for w in w0]
        opt = cls(0.01, global_clipnorm=1024.0)
        if fuse:
            opt = ck.fused(opt)
        for g in grads:
            opt.apply([tf.constant(x) for x in g], variables)
        out.append([v.numpy() for v in variables])
    for keras_w, fused_w in zip(*out):
        assert np.isfinite(fused_w).all()
        np.testing.assert_array_equal(fused_w, keras_w)


def test_a_class_overriding_what_clipops_replaces_is_refused():
    class OwnClip(keras.optimizers.SGD):
        def _clip_gradients(self, grads):
            return [g * 0.5 for g in grads]

    with pytest.raises(TypeError, match="overrides _clip_gradients"):
        ck.fused_class(OwnClip)
    opt = OwnClip(0.1, global_clipnorm=1.0)
    with pytest.raises(TypeError, match="overrides _clip_gradients"):
        ck.fused(opt)
    assert type(opt) is OwnClip  # refused before anything changed


def test_a_fused_optimizer_pickles():
    import pickle

    opt = ck.fused(keras.optimizers.Adam(1e-3, global_clipnorm=1.0))
    back = pickle.loads(pickle.dumps(opt))
    assert type(back) is type(opt) and type(back).__name__ == "FusedAdam"
    assert back.get_config() == opt.get_config()
