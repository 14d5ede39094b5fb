"""The TensorFlow front end of the fused clip + optimizer update (the ClipopsFusedUpdate op;
clipops.sgd_update, adam_update, adamw_update): bit for bit against Keras 3's own SGD, Adam
and AdamW (TensorFlow backend, CPU, eager) applied to clipops' clipped gradients and against
the NumPy front end (the same core); its XLA route against float64 (test_optim.ref_step's
derived bound) and bit for bit against Keras' own update under XLA; the variables' semantics
(locking, copy on write, None and IndexedSlices gradients); the non-finite policies; the
errors; and the kernels' registration (every CPU kernel has its GPU twin)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the TensorFlow front end needs tensorflow")
keras = pytest.importorskip("keras", reason="the reference is Keras 3's own optimizer")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the reference needs KERAS_BACKEND=tensorflow", allow_module_level=True)

import clipops  # noqa: E402
import clipops.numpy as cn  # noqa: E402
import clipops.tensorflow as ct  # noqa: E402
from conftest import BF16, CHUNK, random_array, ref_norm  # noqa: E402
from test_optim import (RULES, decays, grad_error, has_m, has_v, hyper,  # noqa: E402
                        keras_state, keras_twin, ref_step, step_grads)  # the rules, float64 reference

GRAD_DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else [])
SHAPES = [(3, 4), (1,), (5,), (1023,), (CHUNK + 1,), (2, 3, 7), ()]


def same_bits(a, b) -> bool:
    a, b = (np.asarray(x.numpy() if hasattr(x, "numpy") else x) for x in (a, b))
    return a.shape == b.shape and a.tobytes() == b.tobytes()


class State:
    """The float32 tf.Variables of one fused update: params and Keras' m and v (or None)."""

    def __init__(self, rule, params, m=None, v=None):
        self.params = [tf.Variable(p) for p in params]
        zeros = [np.zeros_like(p) for p in params]
        self.m = [tf.Variable(x) for x in (m or zeros)] if has_m(rule) else None
        self.v = [tf.Variable(x) for x in (v or zeros)] if has_v(rule) else None

    def arrays(self):
        return [[x.numpy() for x in group] if group is not None else None
                for group in (self.params, self.m, self.v)]


def fused(rule, state, grads, step, mask=None, **extra):
    """Ours: the TF front end's call for `rule` over `state`'s variables."""
    fn, kw = RULES[rule]
    kw = dict(kw, **extra)
    if decays(rule):
        kw["decay_mask"] = mask
    if fn == "sgd":
        return clipops.sgd_update(state.params, grads, state.m, **kw)
    return getattr(clipops, f"{fn}_update")(state.params, grads, state.m, state.v, step=step,
                                            **kw)


def clipped_by_clipops(grads, clip, unscale=None):
    """The gradients Keras is given: clipops' own clip of them (TF front end)."""
    kind, value = clip
    if unscale is not None:
        if kind == "none":  # g * 2^k in g's dtype: exact
            return [None if g is None else g * tf.cast(unscale, g.dtype) for g in grads]
        return clipops.clip_by_global_norm(grads, value, unscale=unscale)[0]
    if kind == "global_clipnorm":
        return clipops.clip_by_global_norm(grads, value)[0]
    if kind == "clipnorm":
        return clipops.clip_by_norm(grads, value)
    if kind == "clipvalue":
        return clipops.clip_by_value(grads, -value, value)
    return grads


def keras_check(rng, rule, grad_dtypes, clip, shapes=SHAPES, steps=3, none_at=None,
                unscale=None):
    """`steps` updates of fresh gradients by ours (tf.Variables) and by Keras (clipops' clip,
    then Keras' optimizer, eagerly, on its own variables): params, m and v equal bit for bit
    after every step, and the returned norm clipops.global_norm's."""
    params, variables, mask, opt = keras_twin(rng, rule, shapes)
    state = State(rule, params)
    for step in range(1, steps + 1):
        grads = [None if g is None else tf.constant(g)
                 for g in step_grads(rng, shapes, grad_dtypes, clip, none_at)]
        clip_kw = {clip[0]: clip[1]} if clip[0] != "none" else {}
        if unscale is not None:
            clip_kw["unscale"] = unscale
        norm = fused(rule, state, grads, step, mask, **clip_kw)
        assert same_bits(norm, clipops.global_norm(
            [None if g is None else g * tf.cast(unscale or 1.0, g.dtype) for g in grads])
            if unscale else clipops.global_norm(grads)), "the norm is not clipops' global norm"
        given = clipped_by_clipops(grads, clip, unscale)
        opt.apply_gradients([(g, v) for g, v in zip(given, variables)])
        for i, var in enumerate(variables):
            assert same_bits(var.numpy(), state.params[i].numpy()), \
                f"step {step}: param {i} differs from Keras'"
            km, kv = keras_state(opt, rule, i)
            if km is not None:
                assert same_bits(km, state.m[i].numpy()), f"step {step}: m {i} differs"
            if kv is not None:
                assert same_bits(kv, state.v[i].numpy()), f"step {step}: v {i} differs"
    return state


# ---- the kernels --------------------------------------------------------------------------

def test_every_cpu_kernel_has_its_gpu_kernel():
    # The GPU kernels are registered on every build (the driver route needs no CUDA at build
    # time), for each norm dtype, with the variables' handles in host memory as TF's own
    # training ops have them; the scalars stay on the device (no host sync).
    from tensorflow.python.framework import kernels

    found = {}
    for k in kernels.get_registered_kernels_for_op("ClipopsFusedUpdate").kernel:
        [c] = k.constraint
        assert c.name == "Tnorm"
        for t in c.allowed_values.list.type:
            found.setdefault(k.device_type, set()).add(tf.dtypes.as_dtype(t).name)
            if k.device_type == "GPU":
                assert set(k.host_memory_arg) == {"params", "momentums", "velocities"}
    assert found == {"CPU": {"float16", "bfloat16", "float32"},
                     "GPU": {"float16", "bfloat16", "float32"}}


def test_the_op_is_stateful_and_has_no_gradient(rng):
    from tensorflow.python.framework import op_def_registry

    assert op_def_registry.get("ClipopsFusedUpdate").is_stateful
    state = State("adam", [np.ones(3, np.float32)])
    g = tf.constant(rng.standard_normal(3).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(g)
        norm = clipops.adam_update(state.params, [g], state.m, state.v, step=1)
    with pytest.raises(LookupError, match="has no gradient.*clipops.global_norm"):
        tape.gradient(norm, g)


# ---- bit for bit against Keras 3 -------------------------------------------------------------

@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("clip", [("global_clipnorm", 1.5), ("clipnorm", 0.7), ("clipvalue", 0.3),
                                  ("none", 0.0)], ids=lambda c: c[0])
def test_bitwise_equal_to_keras(rng, rule, clip):
    keras_check(rng, rule, [np.float32], clip)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("gdt", GRAD_DTYPES[1:] + ["mixed"],
                         ids=lambda d: d if d == "mixed" else np.dtype(d).name)
def test_bitwise_equal_to_keras_16_bit_and_mixed_gradients(rng, rule, gdt):
    """float16 and bfloat16 gradients (the norm and clip in their dtype), and a list mixing
    them with float32 (the norm and the scale float32, cast to each gradient's dtype)."""
    keras_check(rng, rule, GRAD_DTYPES if gdt == "mixed" else [gdt], ("global_clipnorm", 1.0))


@pytest.mark.parametrize("clip", [("global_clipnorm", 4.0), ("none", 0.0)], ids=lambda c: c[0])
def test_bitwise_equal_to_keras_with_unscale(rng, clip):
    """unscale = 2^-10 (a loss scale's inverse), as a tensor: the gradients are g * unscale."""
    keras_check(rng, "adamw", [np.float32, np.float16], clip, unscale=tf.constant(2.0 ** -10))


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")  # Keras says so
def test_a_none_gradient_leaves_its_variable_alone(rng):
    state = keras_check(rng, "adamw", [np.float32], ("global_clipnorm", 1.0), none_at=2)
    g = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    g[4] = None
    before = state.arrays()
    norm, norms = clipops.adamw_update(state.params, g, state.m, state.v, step=4,
                                       return_norms=True)
    after = state.arrays()
    for group_before, group_after in zip(before, after):
        assert same_bits(group_before[4], group_after[4])
    assert norms.shape == (len(SHAPES),) and norms.numpy()[4] == 0
    ref_norms = clipops.global_norm(g, return_norms=True)[1]
    assert same_bits(norms, ref_norms) and same_bits(norm, clipops.global_norm(g))


def test_the_tf_op_gives_the_numpy_front_end_s_bits_past_the_parallel_threshold(rng):
    """1.2 million elements: the TF kernel runs the core on TF's thread pool, the NumPy
    front end on clipops' own; the same bits (the reduction order is fixed)."""
    shapes = [(1100, 1000), (CHUNK * 3 + 5,), (7,)]
    params = [random_array(rng, s, np.float32) for s in shapes]
    m = [np.abs(random_array(rng, s, np.float32)) * 0.1 for s in shapes]
    v = [np.abs(random_array(rng, s, np.float32)) * 0.01 for s in shapes]
    state = State("adamw", params, m, v)
    numpy_side = [[x.copy() for x in group] for group in (params, m, v)]
    for step in (1, 2):
        grads = [random_array(rng, s, np.float32) for s in shapes]
        kw = dict(step=step, learning_rate=3e-3, weight_decay=0.02, decay_mask=[True, False, True],
                  global_clipnorm=500.0, return_norms=True)
        n_tf, ns_tf = clipops.adamw_update(state.params, [tf.constant(g) for g in grads],
                                           state.m, state.v, **kw)
        n_np, ns_np = cn.adamw_update(*numpy_side[:1], grads, *numpy_side[1:], **kw)
        assert n_np > 500 if step == 1 else True  # the first step is clipped
        assert same_bits(n_tf, n_np) and same_bits(ns_tf, ns_np)
        for ours, theirs in zip(state.arrays(), numpy_side):
            for a, b in zip(ours, theirs):
                assert same_bits(a, b)


def test_indexed_slices_are_made_dense_as_keras_makes_them(rng):
    # Keras' update_step (and its global norm) take an IndexedSlices gradient dense, its
    # duplicate indices summed: so does the fused update
    p = rng.standard_normal((6, 3)).astype(np.float32)
    values = tf.constant(rng.standard_normal((4, 3)).astype(np.float32))
    slices = tf.IndexedSlices(values, tf.constant([0, 4, 0, 2]), tf.constant([6, 3]))
    a, b = State("adam", [p]), State("adam", [p])
    n1 = clipops.adam_update(a.params, [slices], a.m, a.v, step=1, global_clipnorm=1.0)
    n2 = clipops.adam_update(b.params, [tf.convert_to_tensor(slices)], b.m, b.v, step=1,
                             global_clipnorm=1.0)
    assert same_bits(n1, n2)
    for x, y in zip(a.arrays(), b.arrays()):
        assert same_bits(x[0], y[0])
    assert same_bits(a.params[0].numpy()[1], p[1])  # row 1 has no gradient: Adam leaves it


def test_in_a_tf_function_a_new_step_and_learning_rate_need_no_retrace(rng):
    # step from Keras-like counters and a learning-rate variable: read on the device at run
    # time, so one trace serves every step, with the eager call's bits
    shapes = [(5, 7), (CHUNK + 3,)]
    params = [random_array(rng, s, np.float32) for s in shapes]
    traced, eager = State("adamw", params), State("adamw", params)
    iterations = tf.Variable(0, dtype=tf.int64)
    lr = tf.Variable(1e-3)
    traces = []

    @tf.function
    def step_fn(grads):
        traces.append(1)
        norm = clipops.adamw_update(traced.params, grads, traced.m, traced.v,
                                    step=iterations + 1, learning_rate=lr, global_clipnorm=1.0)
        iterations.assign_add(1)
        return norm

    for t in range(1, 4):
        lr.assign(1e-3 * t)
        grads = [tf.constant(random_array(rng, s, np.float32)) for s in shapes]
        n1 = step_fn(grads)
        n2 = clipops.adamw_update(eager.params, grads, eager.m, eager.v, step=t,
                                  learning_rate=np.float32(1e-3 * t), global_clipnorm=1.0)
        assert same_bits(n1, n2)
        for x, y in zip(traced.arrays(), eager.arrays()):
            for a, b in zip(x, y):
                assert same_bits(a, b), t
    assert len(traces) == 1
    ops = {op.type for op in step_fn.get_concrete_function(grads).graph.get_operations()}
    assert "ClipopsFusedUpdate" in ops


def test_an_eager_call_takes_tf_s_fast_path(rng, monkeypatch):
    # TF's generated wrapper falls back to a path that converts every input in Python (~20x
    # the dispatch time on 161 variables) when an attr has the wrong Python type, e.g. an int
    # for a float attr: the front end passes each one as its type
    globs = ct._ops.clipops_fused_update.__globals__

    def no_fallback(*args, **kwargs):
        raise AssertionError("the eager call left TF's fast path")

    monkeypatch.setitem(globs, "clipops_fused_update_eager_fallback", no_fallback)
    for rule in RULES:
        state = State(rule, [random_array(rng, (4,), np.float32)])
        fused(rule, state, [tf.ones(4)], 1)


# ---- the variables ------------------------------------------------------------------------

def test_a_read_that_holds_the_buffer_keeps_the_old_values(rng):
    # ReadVariableOp aliases the variable's buffer; the op copies before writing in place
    # (TF's copy-on-write for resource variables), so the read tensor keeps its values
    p = rng.standard_normal(1000).astype(np.float32)
    state = State("momentum", [p], m=[np.ones(1000, np.float32)])
    held_p, held_m = state.params[0].read_value(), state.m[0].read_value()
    clipops.sgd_update(state.params, [tf.constant(np.ones(1000, np.float32))], state.m,
                       learning_rate=0.5, momentum=0.9)
    assert same_bits(held_p, p) and same_bits(held_m, np.ones(1000, np.float32))
    assert not np.array_equal(state.params[0].numpy(), p)
    # p + (m * mu - g * lr) with m = 1, g = 1: p + 0.4 (one float32 op each)
    m1 = np.float32(1) * np.float32(0.9) - np.float32(1) * np.float32(0.5)
    assert same_bits(state.m[0].numpy(), np.full(1000, m1, np.float32))
    assert same_bits(state.params[0].numpy(), (p + m1).astype(np.float32))


def test_concurrent_updates_of_the_same_variables_are_not_lost(rng):
    # The op locks its variables (in address order, as TF's training ops): updates from
    # threads at once are applied one after another. SGD with the same gradient: each update
    # subtracts the same float32 g * lr, so the result is the sequential one bit for bit.
    n, threads, each = 1 << 18, 4, 25
    p = rng.standard_normal(n).astype(np.float32)
    state = State("sgd", [p])
    g = [tf.constant(np.full(n, 2.0 ** -8, np.float32))]

    def work():
        for _ in range(each):
            clipops.sgd_update(state.params, g, learning_rate=0.5)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    want = p.copy()
    step = np.float32(2.0 ** -8) * np.float32(0.5)
    for _ in range(threads * each):
        want = (want - step).astype(np.float32)
    assert same_bits(state.params[0].numpy(), want)


def test_keras_variables_are_taken_as_their_tf_variables(rng):
    p = rng.standard_normal(10).astype(np.float32)
    kv = [keras.Variable(p)]
    m = [keras.Variable(np.zeros(10, np.float32))]
    clipops.sgd_update(kv, [tf.ones(10)], m, learning_rate=0.5, momentum=0.9)
    assert same_bits(kv[0].numpy(), (p + np.float32(-0.5)).astype(np.float32))


# ---- non-finite gradients -----------------------------------------------------------------

def _inf_step(rng, nonfinite, traced=False):
    params = [random_array(rng, (5,), np.float32), random_array(rng, (CHUNK + 1,), np.float32)]
    state = State("adamw", params)
    grads = [tf.constant(random_array(rng, (5,), np.float32)),
             tf.constant(np.where(np.arange(CHUNK + 1) == 7, np.inf, 1.0).astype(np.float32))]
    before = state.arrays()
    call = lambda: clipops.adamw_update(state.params, grads, state.m, state.v,  # noqa: E731
                                        step=1, global_clipnorm=1.0, nonfinite=nonfinite)
    return state, before, (tf.function(call) if traced else call)


def test_nonfinite_skip_writes_nothing(rng):
    state, before, call = _inf_step(rng, "skip")
    norm = call()
    assert np.isinf(norm.numpy())
    for x, y in zip(before, state.arrays()):
        for a, b in zip(x, y):
            assert same_bits(a, b)


def test_nonfinite_nan_reaches_the_variables_as_in_keras(rng):
    state, _, call = _inf_step(rng, "nan")
    call()
    assert np.isnan(state.params[1].numpy()).all()  # the scale is NaN, as Keras' clip makes it


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
def test_nonfinite_raise_names_the_gradient_and_writes_nothing(rng, traced):
    state, before, call = _inf_step(rng, "raise", traced)
    if traced:
        with pytest.raises(tf.errors.InvalidArgumentError, match="not finite.*nothing was upd"):
            call()
    else:
        with pytest.raises(clipops.NonFiniteError, match=r"grads\[1\] is the first.*Nothing "
                                                          "was updated"):
            call()
    for x, y in zip(before, state.arrays()):
        for a, b in zip(x, y):
            assert same_bits(a, b)


# ---- errors -------------------------------------------------------------------------------

def test_errors_name_the_problem_and_write_nothing(rng):
    p = [rng.standard_normal(s).astype(np.float32) for s in ((3,), (4,))]
    st = State("adam", p)
    g = [tf.ones(3), tf.ones(4)]
    adam = lambda **kw: clipops.adam_update(  # noqa: E731
        kw.pop("params", st.params), kw.pop("grads", g), kw.pop("m", st.m), kw.pop("v", st.v),
        step=kw.pop("step", 1), **kw)
    with pytest.raises(ValueError, match="grads has 1 entries for 2 params"):
        adam(grads=g[:1])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(3,\), but params\[1\] has"):
        adam(grads=[g[0], tf.ones(3)])
    with pytest.raises(ValueError, match=r"velocities\[0\] has shape"):
        adam(v=[tf.Variable(tf.zeros(5)), st.v[1]])
    with pytest.raises(TypeError, match=r"params\[0\] is a float64 variable"):
        adam(params=[tf.Variable(np.zeros(3)), st.params[1]])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float64"):
        adam(grads=[tf.ones(3, tf.float64), g[1]])
    with pytest.raises(TypeError, match=r"params\[0\] must be a tf.Variable"):
        adam(params=[np.zeros(3, np.float32), st.params[1]])
    with pytest.raises(ValueError, match=r"step must be >= 1"):
        adam(step=0)
    with pytest.raises(ValueError, match="unscale goes with global_clipnorm"):
        adam(clipnorm=1.0, unscale=0.5)
    with pytest.raises(ValueError, match="Only one of"):
        adam(clipnorm=1.0, global_clipnorm=1.0)
    with pytest.raises(ValueError, match="decay_mask has 1 entries"):
        adam(weight_decay=0.1, decay_mask=[True])
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        adam(nonfinite="ignore")
    # the op's own checks, after the front end's: a variable passed twice, named by position
    with pytest.raises(ValueError, match=r"params\[1\] and momentums\[1\] are the same variable"):
        adam(m=[st.m[0], st.params[1]])
    with pytest.raises(ValueError, match="momentum is not 0: pass momentums"):
        clipops.sgd_update(st.params, g, momentum=0.9)
    with pytest.raises(ValueError, match="momentums are given, but momentum is 0"):
        clipops.sgd_update(st.params, g, st.m)
    with pytest.raises(ValueError, match="weight_decay must be a number for AdamW"):
        clipops.adamw_update(st.params, g, st.m, st.v, step=1, weight_decay=None)
    # nothing written by any of them
    assert all(same_bits(a.numpy(), b) for a, b in zip(st.params, p))
    assert not any(x.numpy().any() for x in st.m + st.v)


def test_the_op_checks_what_a_raw_call_could_get_wrong():
    ops = ct._ops
    v = [tf.Variable(tf.zeros(3))]
    args = dict(grads=[tf.ones(3)], params=[v[0].handle], momentums=[], velocities=[],
                learning_rate=0.1, beta_1_power=1.0, beta_2_power=1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="decay has 2 entries for 1 var"):
        ops.clipops_fused_update(**args, clip=1.0, unscale=1.0, rule="sgd", decay=[True, False])
    with pytest.raises(tf.errors.InvalidArgumentError, match="Tnorm must be the gradients' dtype"):
        ops.clipops_fused_update(**args, clip=tf.constant(1.0, tf.float16),
                                 unscale=tf.constant(1.0, tf.float16), rule="sgd", decay=[False])
    with pytest.raises(tf.errors.InvalidArgumentError, match="Adam takes one momentum and one"):
        ops.clipops_fused_update(**args, clip=1.0, unscale=1.0, rule="adam", decay=[False])
    with pytest.raises(tf.errors.InvalidArgumentError, match="m \\(the first moment or momentum"):
        ops.clipops_fused_update(**args, clip=1.0, unscale=1.0, rule="sgd", decay=[False],
                                 momentum=0.9)
    with pytest.raises(tf.errors.InvalidArgumentError, match="learning_rate must be a scalar"):
        ops.clipops_fused_update(**dict(args, learning_rate=tf.ones(2)), clip=1.0, unscale=1.0,
                                 rule="sgd", decay=[False])
    assert not v[0].numpy().any()


# ---- inside XLA ---------------------------------------------------------------------------

def test_the_xla_route_holds_no_custom_op():
    st = State("adam", [np.ones(3, np.float32)])
    f = lambda g: clipops.adam_update(st.params, g, st.m, st.v, step=1,  # noqa: E731
                                      global_clipnorm=1.0)
    spec = [tf.TensorSpec((3,))]
    plain = tf.function(f).get_concrete_function(spec).graph
    xla = tf.function(f, jit_compile=True).get_concrete_function(spec).graph
    assert "ClipopsFusedUpdate" in {op.type for op in plain.get_operations()}
    assert not any(op.type.startswith("Clipops") for op in xla.get_operations())


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("clip_factor", [0.5, 2.0], ids=["clipped", "not-clipped"])
def test_xla_route_against_float64(rng, rule, clip_factor):
    """The XLA route's float32 arithmetic, each step from the same state against a float64
    step, within test_optim.ref_step's first-order bound (x2). XLA on the CPU contracts a
    product and the sum it feeds into one FMA, skipping the product's rounding: still within
    the bound, which charges every product its rounding. (So not bit for bit the op's: the
    op rounds each product, as Keras' non-XLA code does.)"""
    sizes = [1, 15, 17, 1023, CHUNK + 1]
    params = [random_array(rng, (n,), np.float32) for n in sizes]
    m = [random_array(rng, (n,), np.float32) * np.float32(0.1) for n in sizes]
    v = [np.abs(random_array(rng, (n,), np.float32)) * np.float32(0.01) for n in sizes]
    state = State(rule, params, m if has_m(rule) else None, v if has_v(rule) else None)
    mask = [i % 2 == 0 for i in range(len(sizes))] if decays(rule) else None
    fn = tf.function(lambda g, t, c: fused(rule, state, g, t, mask, global_clipnorm=c),
                     jit_compile=True)
    for step in (1, 2, 7):
        grads = [random_array(rng, (n,), np.float32) for n in sizes]
        norm64 = ref_norm(grads)
        clip = float(np.float32(norm64 * clip_factor))
        factor = clip / max(norm64, clip)
        before = state.arrays()
        fn([tf.constant(g) for g in grads], tf.constant(step), tf.constant(clip))
        h = hyper(rule, step)  # a 0-d Pow under XLA is the C library's powf, as on TF's CPU
        after = state.arrays()
        for i, g in enumerate(grads):
            gc = g.astype(np.float64) * factor
            (p1, m1, v1), (ep, em, ev) = ref_step(
                rule, before[0][i], gc, grad_error(gc, np.float32),
                None if before[1] is None else before[1][i],
                None if before[2] is None else before[2][i], h, decays(rule) and mask[i])
            for k, (want, err, what) in enumerate(((p1, ep, "param"), (m1, em, "m"),
                                                   (v1, ev, "v"))):
                if after[k] is None:
                    continue
                got = after[k][i].astype(np.float64)
                bad = np.abs(got - want) > 2 * err + 1e-37
                assert not bad.any(), (f"step {step}, tensor {i} {what}: {int(bad.sum())} off, "
                                       f"got {got[bad][:3]}, want {want[bad][:3]}")


@pytest.mark.parametrize("rule", list(RULES))
def test_xla_route_gives_keras_own_xla_bits(rng, rule):
    """Inside a jit-compiled function, the route emits Keras' own formula in TF ops, so XLA
    compiles both alike (FMA contractions included): bit for bit equal to Keras' optimizer
    under XLA applied to clipops' clipped gradients, unclipped and clipped steps."""
    shapes = [(3, 4), (1023,), (CHUNK + 1,), ()]
    params, variables, mask, opt = keras_twin(rng, rule, shapes)
    state = State(rule, params)
    iterations = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=True)
    def ours(grads, clip):
        norm = fused(rule, state, grads, iterations + 1, mask, global_clipnorm=clip)
        iterations.assign_add(1)
        return norm

    @tf.function(jit_compile=True)
    def theirs(grads, clip):
        opt.apply(clipops.clip_by_global_norm(grads, clip)[0], variables)

    for step in range(1, 4):
        grads = [tf.constant(random_array(rng, s, np.float32)) for s in shapes]
        clip = tf.constant(np.float32(ref_norm([g.numpy() for g in grads]) *
                                      (0.5 if step == 2 else 2.0)))
        ours(grads, clip)
        theirs(grads, clip)
        for i, var in enumerate(variables):
            assert same_bits(var.numpy(), state.params[i].numpy()), f"step {step}: param {i}"
            km, kv = keras_state(opt, rule, i)
            if km is not None:
                assert same_bits(km, state.m[i].numpy()), f"step {step}: m {i}"
            if kv is not None:
                assert same_bits(kv, state.v[i].numpy()), f"step {step}: v {i}"


def test_xla_route_skips_a_nonfinite_step(rng):
    state, before, _ = _inf_step(rng, "skip")
    grads = [tf.constant(random_array(rng, (5,), np.float32)),
             tf.constant(np.full(CHUNK + 1, np.nan, np.float32))]
    norm = tf.function(lambda g: clipops.adamw_update(state.params, g, state.m, state.v, step=1,
                                                      global_clipnorm=1.0, nonfinite="skip"),
                       jit_compile=True)(grads)
    assert np.isnan(norm.numpy())
    for x, y in zip(before, state.arrays()):
        for a, b in zip(x, y):
            assert same_bits(a, b)
    with pytest.raises(ValueError, match="not under XLA|XLA compiles"):
        tf.function(lambda g: clipops.adamw_update(state.params, g, state.m, state.v, step=1,
                                                   nonfinite="raise"), jit_compile=True)(grads)


# ---- on a GPU -----------------------------------------------------------------------------

@pytest.mark.gpu
def test_on_a_gpu_bitwise_equal_to_keras(rng):
    """The GPU kernel (driver route on TF's stream, the scalars read on the device) against
    Keras' own AdamW on the same GPU (its beta^t is the GPU's tf.pow too)."""
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("needs TensorFlow with a CUDA GPU")
    with tf.device("/GPU:0"):
        state = keras_check(rng, "adamw", [np.float32, np.float16], ("global_clipnorm", 1.0),
                            shapes=SHAPES + [(5 * CHUNK - 1,)])
    assert "GPU" in state.params[0].device
