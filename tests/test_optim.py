"""The fused clip + optimizer update on the CPU (clipops.numpy.sgd_update,
adam_update, adamw_update -> clipops._core.update_cpu -> csrc/core/optim_cpu.cc):
against a float64 reference within bounds derived from the arithmetic, bit for
bit against Keras 3's own SGD, Adam and AdamW (TensorFlow backend, CPU, eager)
applied to clipops' clipped gradients, Adam's step powers against tf.pow, the
non-finite policies, and the error paths (nothing written on error)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import clipops.numpy as cn
from clipops import _common, _core
from conftest import BF16, BOUNDARY_SIZES, CHUNK, TOL, assert_close, random_array, ref_norm

U = 2.0 ** -24  # float32's unit roundoff: one rounding of a float32 op
GRAD_DTYPES = [np.float32, np.float16] + ([BF16] if BF16 is not None else [])

# The rules, with Keras' argument names. "sgd_wd" and "nesterov" exercise the
# weight decay that every Keras optimizer has (not only AdamW).
RULES = {
    "sgd": ("sgd", dict(learning_rate=0.05)),
    "sgd_wd": ("sgd", dict(learning_rate=0.05, weight_decay=0.02)),
    "momentum": ("sgd", dict(learning_rate=0.05, momentum=0.9)),
    "nesterov": ("sgd", dict(learning_rate=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    "adam": ("adam", dict(learning_rate=3e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7)),
    "adamw": ("adamw", dict(learning_rate=3e-3, weight_decay=0.02, beta_1=0.85, beta_2=0.99,
                            epsilon=1e-6)),
}


def has_m(rule):
    fn, kw = RULES[rule]
    return fn != "sgd" or kw.get("momentum", 0) != 0


def has_v(rule):
    return RULES[rule][0] != "sgd"


def decays(rule):
    return "weight_decay" in RULES[rule][1]


def fresh_state(rng, rule, params, zeros=False):
    """Keras' state arrays for the rule: m (momentums) and v (velocities) or None."""
    def make(positive):
        if zeros:
            return [np.zeros_like(p) for p in params]
        out = [(rng.standard_normal(p.shape) * 0.1).astype(np.float32) for p in params]
        return [np.abs(a) * 0.1 if positive else a for a in out]
    return (make(False) if has_m(rule) else None), (make(True) if has_v(rule) else None)


def update(rule, params, grads, ms, vs, step, mask=None, **extra):
    """Ours: the NumPy front end's call for `rule`, in place; returns its result."""
    fn, kw = RULES[rule]
    kw = dict(kw, **extra)
    if decays(rule):
        kw["decay_mask"] = mask
    if fn == "sgd":
        return cn.sgd_update(params, grads, ms, **kw)
    return getattr(cn, f"{fn}_update")(params, grads, ms, vs, step=step, **kw)


def copies(arrays):
    return None if arrays is None else [None if a is None else a.copy() for a in arrays]


def same_bits(a, b):
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# ---- against float64 -------------------------------------------------------------------------

def f32(x) -> float:
    return float(np.float32(x))


def hyper(rule, step):
    """The float32 hyperparameters as Keras casts them (the reference takes them
    as given: they are Keras' inputs, not rounding errors of the update)."""
    fn, kw = RULES[rule]
    h = dict(lr=f32(kw["learning_rate"]), wd=f32(kw.get("weight_decay", 0.0)),
             mu=f32(kw.get("momentum", 0.0)), nesterov=kw.get("nesterov", False))
    if fn != "sgd":
        b1, b2 = np.float32(kw["beta_1"]), np.float32(kw["beta_2"])
        h.update(c1=f32(1 - kw["beta_1"]), c2=f32(1 - kw["beta_2"]), eps=f32(kw["epsilon"]),
                 b1p=_core.keras_cpu_power(float(b1), step),
                 b2p=_core.keras_cpu_power(float(b2), step))
    return h


def ref_step(rule, p, g, dg, m, v, h, decay):
    """One step in float64 from the float32 state (p, m, v) and the float64
    clipped gradient g, known to within dg. Returns the results and a
    first-order bound of a float32 computation's error: each float32 op adds u
    times its result's magnitude, and errors of its operands propagate by the
    op's derivative."""
    a = np.abs
    p, m, v = (None if x is None else x.astype(np.float64) for x in (p, m, v))
    lr, wd = h["lr"], h["wd"]
    if decay:
        pwl = (p * wd) * lr
        q = p - pwl
        eq = 2 * U * a(pwl) + U * a(q)  # p*wd, *lr, then the subtraction
    else:
        q, eq = p, 0.0
    if RULES[rule][0] == "sgd":
        gl = g * lr
        egl = lr * dg + U * a(gl)
        if m is None:
            p1 = q - gl
            return (p1, None, None), (eq + egl + U * a(p1), None, None)
        mm = m * h["mu"]
        m1 = mm - gl
        em = U * a(mm) + egl + U * a(m1)
        if h["nesterov"]:
            t = m1 * h["mu"] - gl
            et = h["mu"] * em + U * a(m1 * h["mu"]) + egl + U * a(t)
            p1 = q + t
            return (p1, m1, None), (eq + et + U * a(p1), em, None)
        p1 = q + m1
        return (p1, m1, None), (eq + em + U * a(p1), em, None)
    # Adam: alpha from float32 inputs; its 5 roundings give at most 5u (the
    # sqrt halves its argument's): 6u.
    alpha = lr * np.sqrt(1 - np.float64(h["b2p"])) / (1 - np.float64(h["b1p"]))
    ealpha = 6 * U * abs(alpha)
    d1 = g - m
    e1 = h["c1"] * (dg + U * a(d1)) + U * a(d1 * h["c1"])
    m1 = m + d1 * h["c1"]
    em = e1 + U * a(m1)
    g2 = g * g
    d2 = g2 - v
    e2 = h["c2"] * (2 * a(g) * dg + U * g2 + U * a(d2)) + U * a(d2 * h["c2"])
    v1 = v + d2 * h["c2"]
    ev = e2 + U * a(v1)
    s = np.sqrt(v1)
    with np.errstate(divide="ignore", invalid="ignore"):
        es = np.where(s > 0, ev / (2 * s), np.sqrt(ev)) + U * s
    den = s + h["eps"]
    eden = es + U * den
    num = m1 * alpha
    enum = abs(alpha) * em + a(m1) * ealpha + U * a(num)
    delta = num / den
    edelta = enum / den + a(num) * eden / den ** 2 + U * a(delta)
    p1 = q - delta
    return (p1, m1, v1), (eq + edelta + U * a(p1), em, ev)


def grad_error(gc, dtype):
    """How far clipops' clipped gradient may be from the float64 one: conftest's
    clip tolerance for the gradient's dtype (derived there: the norm, TF's scale
    formula and the product, each rounded)."""
    atol, rtol = TOL[np.dtype(dtype).name]
    return atol + rtol * np.abs(gc)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("gdt", GRAD_DTYPES + ["mixed"],
                         ids=lambda d: d if d == "mixed" else np.dtype(d).name)
@pytest.mark.parametrize("clip_factor", [0.5, 2.0], ids=["clipped", "not-clipped"])
def test_against_float64(rng, rule, gdt, clip_factor):
    """Three steps over the boundary sizes, each compared from the same float32
    state with a float64 step, within twice the first-order bound (the factor
    covers second-order terms, each below u times a first-order one)."""
    sizes = BOUNDARY_SIZES + [63]
    dts = GRAD_DTYPES if gdt == "mixed" else [gdt]
    params = [random_array(rng, (n,), np.float32) for n in sizes]
    ms, vs = fresh_state(rng, rule, params)
    mask = [i % 3 != 1 for i in range(len(params))] if decays(rule) else None
    deltas, bounds = [], []
    for step in (1, 2, 7):
        # 16-bit gradients stay small, so their squares keep float32 far from overflow
        grads = [random_array(rng, (n,), dts[i % len(dts)],
                              0.05 if np.dtype(dts[i % len(dts)]).itemsize == 2 else 1.0)
                 for i, n in enumerate(sizes)]
        norm64 = ref_norm(grads)
        clip = norm64 * clip_factor
        ndt = _common.np_dtype(_common.norm_dtype_code(
            [_common.DTYPE_CODES[np.dtype(g.dtype).name] for g in grads]))
        clip_r = float(np.asarray(clip).astype(ndt))  # the clip as the kernel takes it
        factor = clip_r / max(norm64, clip_r)
        before = (copies(params), copies(ms), copies(vs))
        norm = update(rule, params, grads, ms, vs, step, mask, global_clipnorm=clip)
        assert_close(norm, norm64, ndt, "global norm")
        h = hyper(rule, step)
        for i, g in enumerate(grads):
            gc = g.astype(np.float64) * factor
            # a mixed list's scale is a float32 value: float32-accurate at best
            coarse = g.dtype if gdt != "mixed" or g.dtype.itemsize == 2 else np.float32
            (p1, m1, v1), (ep, em, ev) = ref_step(
                rule, before[0][i], gc, grad_error(gc, coarse),
                None if ms is None else before[1][i], None if vs is None else before[2][i], h,
                decays(rule) and mask[i])
            for got, want, err, what in ((params[i], p1, ep, "param"),
                                         (None if ms is None else ms[i], m1, em, "m"),
                                         (None if vs is None else vs[i], v1, ev, "v")):
                if got is None:
                    continue
                bad = np.abs(got.astype(np.float64) - want) > 2 * err + 1e-37
                assert not bad.any(), (
                    f"step {step}, tensor {i} (size {g.size}) {what}: {int(bad.sum())} off, "
                    f"first got {got[bad][:3]}, want {want[bad][:3]}, bound {2 * err[bad][:3]}")
            if g.dtype == np.float32 and gdt != "mixed" and g.size > 1:
                deltas.append(np.median(np.abs(p1 - before[0][i])))
                bounds.append(np.median(ep))
    if deltas:  # the bound is far below the update itself: a wrong formula cannot hide in it
        assert np.median(deltas) > 1000 * np.median(bounds)


# ---- bit for bit against Keras 3 ---------------------------------------------------------------

def keras_optimizer(rule, variables, mask):
    """Keras' own optimizer for `rule`, without a clip (the clip is applied by the
    test with clipops' clip), built on `variables`, with `mask`'s exclusions."""
    keras = pytest.importorskip("keras")
    fn, kw = RULES[rule]
    cls = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam,
           "adamw": keras.optimizers.AdamW}[fn]
    opt = cls(**kw)
    if mask is not None:
        opt.exclude_from_weight_decay(var_list=[v for v, keep in zip(variables, mask) if not keep])
    opt.build(variables)
    return opt


def keras_twin(rng, rule, shapes):
    """Fresh float32 variables of `shapes` and Keras' own optimizer for `rule` on
    keras.Variable copies of them, every third variable from the second on
    excluded from weight decay: (params, variables, mask, opt)."""
    keras = pytest.importorskip("keras")
    # np.array: a 0-d shape gives a 0-d array (random_array gives a NumPy scalar then)
    params = [np.array(random_array(rng, s, np.float32)) for s in shapes]
    variables = [keras.Variable(p.copy(), name=f"w{i}") for i, p in enumerate(params)]
    mask = [i % 3 != 1 for i in range(len(params))] if decays(rule) else None
    return params, variables, mask, keras_optimizer(rule, variables, mask)


def step_grads(rng, shapes, grad_dtypes, clip, none_at=None) -> list:
    """One step's fresh gradients of `shapes` (grad_dtypes in turn), None at
    none_at; larger where `clip` is clipvalue, so that it binds."""
    grads = [np.array(random_array(rng, s, grad_dtypes[i % len(grad_dtypes)],
                                   0.5 if clip[0] != "clipvalue" else 2.0))
             for i, s in enumerate(shapes)]
    if none_at is not None:
        grads[none_at] = None
    return grads


def keras_state(opt, rule, i):
    """Keras' m and v of variable i (None where the rule keeps none)."""
    if RULES[rule][0] == "sgd":
        return (opt.momentums[i].numpy() if has_m(rule) else None), None
    return opt._momentums[i].numpy(), opt._velocities[i].numpy()


def clipops_clip(grads, clip):
    """The gradients Keras is given: clipops' own clip of them (NumPy front end)."""
    grads = copies(grads)
    kind, value = clip
    if kind == "global_clipnorm":
        return cn.clip_by_global_norm(grads, value)[0]
    if kind == "clipnorm":
        return cn.clip_by_norm(grads, value)
    if kind == "clipvalue":
        return cn.clip_by_value(grads, -value, value)
    return grads


def keras_check(rng, rule, grad_dtypes, clip, shapes, steps=3, none_at=None, unscale=None):
    """`steps` updates of fresh gradients by ours and by Keras (clipops' clip,
    then Keras' optimizer on its own variables); params, m and v must be equal
    bit for bit after every step."""
    tf = pytest.importorskip("tensorflow")
    params, variables, mask, opt = keras_twin(rng, rule, shapes)
    ms, vs = fresh_state(rng, rule, params, zeros=True)  # Keras' state starts at zero
    for step in range(1, steps + 1):
        grads = step_grads(rng, shapes, grad_dtypes, clip, none_at)
        clip_kw = {clip[0]: clip[1]} if clip[0] != "none" else {}
        if unscale is not None:
            clip_kw["unscale"] = unscale
            if clip[0] == "none":
                # g * 2^k in g's dtype: exact
                given = [None if g is None else (g.astype(np.float64) * unscale).astype(g.dtype)
                         for g in grads]
            else:
                given = cn.clip_by_global_norm(copies(grads), clip[1], unscale=unscale)[0]
        else:
            given = clipops_clip(grads, clip)
        update(rule, params, grads, ms, vs, step, mask, **clip_kw)
        opt.apply_gradients([(None if g is None else tf.constant(g), v)
                             for g, v in zip(given, variables)])
        for i, var in enumerate(variables):
            assert same_bits(var.numpy(), params[i]), f"step {step}: param {i} differs from Keras'"
            km, kv = keras_state(opt, rule, i)
            if km is not None:
                assert same_bits(km, ms[i]), f"step {step}: m {i} differs from Keras'"
            if kv is not None:
                assert same_bits(kv, vs[i]), f"step {step}: v {i} differs from Keras'"
    assert int(opt.iterations.numpy()) == steps
    return params


KERAS_SHAPES = [(3, 4), (1,), (5,), (1023,), (CHUNK + 1,), (2, 3, 7), ()]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("clip", [("global_clipnorm", 1.5), ("clipnorm", 0.7), ("clipvalue", 0.3),
                                  ("none", 0.0)], ids=lambda c: c[0])
@pytest.mark.parametrize("gdt", GRAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_bitwise_equal_to_keras(rng, rule, clip, gdt):
    keras_check(rng, rule, [gdt], clip, KERAS_SHAPES)


@pytest.mark.parametrize("rule", ["adamw", "nesterov"])
def test_bitwise_equal_to_keras_mixed_gradient_dtypes(rng, rule):
    """A list of float32, float16 and bfloat16 gradients: the norm and the clip
    scale are float32, cast to each gradient's dtype as TF's clip does."""
    keras_check(rng, rule, GRAD_DTYPES, ("global_clipnorm", 1.0), KERAS_SHAPES)


@pytest.mark.parametrize("clip", [("global_clipnorm", 4.0), ("none", 0.0)], ids=lambda c: c[0])
def test_bitwise_equal_to_keras_with_unscale(rng, clip):
    """unscale = 2^-10 (a loss scale's inverse): the gradients are g * unscale,
    as clipops' clip unscales them (exact for a power of two)."""
    keras_check(rng, "adam", [np.float32, np.float16], clip, KERAS_SHAPES, unscale=2.0 ** -10)


def test_bitwise_equal_to_keras_on_a_list_past_the_parallel_threshold(rng):
    """1.2 million elements: the norm and update passes run on the worker pool
    (clip_cpu.h, kParallelMinElements), with the same bits."""
    keras_check(rng, "adamw", [np.float32], ("global_clipnorm", 2.0),
                [(1100, 1000), (CHUNK * 3 + 5,), (7,)], steps=2)


@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")  # Keras says so
def test_a_none_gradient_leaves_its_variable_alone_as_keras_does(rng):
    """Keras drops a variable without a gradient before its weight decay and its
    update; so does the fused update (and its norm is 0 in tensor_norms)."""
    params = keras_check(rng, "adamw", [np.float32], ("global_clipnorm", 1.0), KERAS_SHAPES,
                         none_at=2)
    assert params[2].shape == KERAS_SHAPES[2]


def test_keras_own_clip_options_end_to_end(rng):
    """Keras' optimizer with its own clip option against ours with the same
    option, on raw gradients. clipvalue: Keras' tf.clip_by_value, bit for bit.
    A clipnorm or global_clipnorm that does not bind, a power of two (so
    Keras' c * (1/c), 1/c in double then float32, and TF's, both give exactly
    1): bit for bit too. One that binds differs from Keras by its norm's
    rounding (Keras sums squares in TF's reduction order, clipops in its own):
    within float32 roundoff of it."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    for option, value, exact in (("clipvalue", 0.3, True), ("clipnorm", 1024.0, True),
                                 ("global_clipnorm", 1024.0, True),
                                 ("global_clipnorm", 0.5, False)):
        shapes = [(300,), (CHUNK + 3,), (4, 5)]
        params = [random_array(rng, s, np.float32) for s in shapes]
        variables = [keras.Variable(p.copy()) for p in params]
        opt = keras.optimizers.Adam(learning_rate=1e-2, **{option: value})
        opt.build(variables)
        ms, vs = fresh_state(rng, "adam", params, zeros=True)
        for step in (1, 2, 3):
            grads = [random_array(rng, s, np.float32) for s in shapes]
            cn.adam_update(params, grads, ms, vs, step=step, learning_rate=1e-2, **{option: value})
            opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
            for p, var in zip(params, variables):
                if exact:
                    assert same_bits(var.numpy(), p), (option, value, step)
                else:
                    # The clipped gradients differ by the norm's rounding, a relative
                    # 2e-6 at most (conftest.TOL, float32). Adam's step lr * m / sqrt(v)
                    # takes m and v from the same gradients, so it moves by at most
                    # lr * 2 * 2e-6 per step; over 3 steps, with p's own roundings
                    # (u |p| each), 1e-7 bounds it: 3e-7 leaves room.
                    np.testing.assert_allclose(var.numpy(), p, rtol=4 * U, atol=3e-7)


# ---- Adam's step powers -------------------------------------------------------------------------

BETAS = [0.9, 0.95, 0.98, 0.99, 0.999, 0.9999]


@pytest.mark.parametrize("beta", BETAS)
def test_keras_cpu_power_is_tf_pow(beta):
    """beta^t for t = 1..10,000 as Keras computes it on TF's CPU (tf.pow of 0-d
    float32 tensors): keras_cpu_power gives the same bits wherever the result
    is a normal float. TF flushes subnormal results to zero (its CPU kernels
    run with FTZ); clipops keeps them, and 1 - beta^t is 1 either way."""
    tf = pytest.importorskip("tensorflow")
    b = np.float32(beta)
    ts = np.arange(1, 10001)
    want = np.array([tf.pow(tf.constant(b), tf.constant(np.float32(t))).numpy() for t in ts])
    got = np.array([_core.keras_cpu_power(float(b), int(t)) for t in ts], dtype=np.float32)
    normal = want >= np.finfo(np.float32).tiny
    assert same_bits(got[normal], want[normal])
    assert (got[~normal] < np.finfo(np.float32).tiny).all()
    assert (np.float32(1) - got[~normal] == 1).all() and (np.float32(1) - want[~normal] == 1).all()


@pytest.mark.parametrize("beta", BETAS)
def test_power_by_squaring_is_within_one_ulp_of_tf_pow(beta):
    """The kernels' own powers (kPowersFromStep, for routes that must not run
    tf.pow): the correctly rounded float32 of beta^t (exactly: Python's
    fractions), and within 1 ulp of TF's powf, which is not always correctly
    rounded (how often they differ is printed: `pytest -s`)."""
    from fractions import Fraction

    b = np.float32(beta)
    ts = range(1, 3001)
    exact = Fraction(float(b))
    power, rounded = Fraction(1), []
    for _ in ts:
        power *= exact
        rounded.append(float(power))  # correctly rounded to double, then to float32 below
    want = np.array(rounded).astype(np.float32)
    got = np.array([_core.power_by_squaring(float(b), t) for t in ts], dtype=np.float32)
    keras = np.array([_core.keras_cpu_power(float(b), t) for t in ts], dtype=np.float32)
    # double rounding (exact -> double -> float) could differ from one rounding
    # only within 2^-53 of a float midpoint; the squaring's own bound is wider
    # (1.4e-14), so equality is what both promise away from midpoints
    assert same_bits(got, want), f"{np.sum(got != want)} powers differ from the exact ones"
    ulps = np.abs(got.view(np.int32).astype(np.int64) - keras.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    print(f"beta {beta}: power_by_squaring != powf for {int((ulps > 0).sum())} of "
          f"{len(ulps)} steps")


def test_powers_from_the_step_counter_on_the_cpu(rng):
    """kPowersFromStep with a host counter: the same bits as the given powers
    power_by_squaring computes; the counter is incremented, and not on a
    skipped step."""
    params = [random_array(rng, (n,), np.float32) for n in (5, CHUNK + 9)]
    grads = [random_array(rng, p.shape, np.float32) for p in params]
    results = []
    counter = np.array([41], dtype=np.int64)
    for source in ("given", "from_step"):
        ps, (ms, vs) = copies(params), fresh_state(np.random.default_rng(1), "adam", params)
        a = _core.UpdateArgs()
        a.rule = _core.UPDATE_RULES["adam"]
        a.clip_mode = _core.UPDATE_CLIPS["global_norm"]
        a.clip = 1.0
        a.learning_rate, a.one_minus_beta_1, a.one_minus_beta_2 = f32(1e-3), f32(0.1), f32(0.001)
        a.epsilon = f32(1e-7)
        a.beta_1, a.beta_2 = f32(0.9), f32(0.999)
        if source == "given":
            a.beta_1_power = _core.power_by_squaring(a.beta_1, 42)
            a.beta_2_power = _core.power_by_squaring(a.beta_2, 42)
        else:
            a.power_source = _core.POWER_SOURCES["from_step"]
            a.iterations_ptr = counter.ctypes.data
            a.increment_iterations = True
        descs = [(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, v.ctypes.data, p.size, True)
                 for p, g, m, v in zip(ps, grads, ms, vs)]
        _core.update_cpu(descs, a)
        results.append([x.tobytes() for x in ps + ms + vs])
    bad = [i for i, (x, y) in enumerate(zip(*results)) if x != y]
    assert not bad, f"buffers {bad} differ (params, m, v, then norm, norms, counter)"
    assert counter[0] == 42
    # a skipped step: nothing written, the counter kept
    bad = [g.copy() for g in grads]
    bad[1][3] = np.inf
    a.skip_nonfinite = True
    descs = [(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, v.ctypes.data, p.size, True)
             for p, g, m, v in zip(ps, bad, ms, vs)]
    kept = [x.copy() for x in ps + ms + vs]
    _core.update_cpu(descs, a)
    assert counter[0] == 42 and all(same_bits(x, y) for x, y in zip(ps + ms + vs, kept))


# ---- the non-finite policies ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("clip", [{"global_clipnorm": 1.0}, {}, {"clipvalue": 0.5}],
                         ids=["global", "none", "value"])
def test_nonfinite_policies(rng, bad, clip):
    params = [random_array(rng, (n,), np.float32) for n in (10, CHUNK + 2, 3)]
    ms, vs = fresh_state(rng, "adamw", params)
    grads = [random_array(rng, p.shape, np.float32) for p in params]
    grads[1][CHUNK] = bad
    kept = copies(params) + copies(ms) + copies(vs)
    # skip: nothing written, the norm says why
    norm, norms = cn.adamw_update(params, grads, ms, vs, step=3, nonfinite="skip",
                                  return_norms=True, **clip)
    assert not np.isfinite(norm) and np.isfinite(norms[[0, 2]]).all() and not np.isfinite(norms[1])
    assert all(same_bits(x, y) for x, y in zip(params + ms + vs, kept))
    # raise: the same, and an error naming the gradient
    with pytest.raises(_common.NonFiniteError,
                       match=r"grads\[1\] is the first .*Nothing was updated"):
        cn.adamw_update(params, grads, ms, vs, step=3, nonfinite="raise", **clip)
    assert all(same_bits(x, y) for x, y in zip(params + ms + vs, kept))
    # nan (Keras' behaviour): the NaN reaches the variables as in Keras
    cn.adamw_update(params, grads, ms, vs, step=3, **clip)
    if "global_clipnorm" in clip:  # the scale is NaN: every variable
        assert all(np.isnan(p).all() for p in params)
    elif "clipvalue" in clip and bad == np.inf:  # clipped to the bound, as tf.clip_by_value does
        assert all(np.isfinite(p).all() for p in params)
    else:  # only the bad element's own variable element (inf / inf in Adam's step)
        assert np.isnan(params[1][CHUNK]) and np.isfinite(params[0]).all()
        assert np.isfinite(np.delete(params[1], CHUNK)).all()


# ---- results and arguments -----------------------------------------------------------------------

def test_returns_the_norms_of_the_gradients(rng):
    grads = [random_array(rng, (n,), np.float16, 0.05) for n in (7, CHUNK + 1)]
    params = [random_array(rng, g.shape, np.float32) for g in grads]
    ms, vs = fresh_state(rng, "adam", params)
    norm, norms = cn.adam_update(params, [None] + grads[1:], ms, vs, step=1, return_norms=True)
    assert norm.dtype == np.float16 and norms.dtype == np.float16 and norms[0] == 0
    want_norm, want_norms = cn.global_norm(grads[1:], return_norms=True)
    assert same_bits(norm, want_norm) and same_bits(norms[1:], want_norms)
    assert norm.shape == () and norms.shape == (2,)


def test_empty_lists_and_empty_tensors(rng):
    assert float(cn.sgd_update([], [], learning_rate=0.1)) == 0.0
    params = [np.zeros(0, np.float32), random_array(rng, (3,), np.float32)]
    grads = [np.zeros(0, np.float32), random_array(rng, (3,), np.float32)]
    before = params[1].copy()
    cn.sgd_update(params, grads, learning_rate=0.5)
    assert same_bits(params[1], (before - grads[1] * np.float32(0.5)).astype(np.float32))


def test_gradients_are_read_through_any_layout(rng):
    """Views, byte-swapped and Fortran-order gradients are copied for the
    kernel, and give the bits of their contiguous copies."""
    params = [random_array(rng, (40, 30), np.float32) for _ in range(3)]
    base = random_array(rng, (40, 60), np.float32)
    grads = [base[:, ::2], np.asfortranarray(random_array(rng, (40, 30), np.float32)),
             random_array(rng, (40, 30), np.float32).astype(">f4")]
    plain = [np.ascontiguousarray(g).astype(np.float32) for g in grads]
    a, b = copies(params), copies(params)
    cn.sgd_update(a, grads, learning_rate=0.1, global_clipnorm=2.0)
    cn.sgd_update(b, plain, learning_rate=0.1, global_clipnorm=2.0)
    assert all(same_bits(x, y) for x, y in zip(a, b))


def test_hyperparameters_are_cast_as_keras_casts_them(rng):
    """1 - beta_1 is taken in double and then rounded (Keras' `1 - self.beta_1`):
    for beta_1 = 0.9 that is float32(0.09999999999999998), not float32(1) -
    float32(0.9) = 0.100000024: a different c1, a different m."""
    p = [random_array(rng, (64,), np.float32)]
    g = [random_array(rng, (64,), np.float32)]
    m, v = [np.zeros(64, np.float32)], [np.zeros(64, np.float32)]
    cn.adam_update(copies(p), g, m, v, step=1, beta_1=0.9)
    assert same_bits(m[0], (g[0] * np.float32(1 - 0.9)).astype(np.float32))
    assert not same_bits(m[0], g[0] * (np.float32(1) - np.float32(0.9)))


BAD_CALLS = [
    # (what, how to break the call, error, message)
    ("shapes", lambda c: c["grads"].__setitem__(1, np.zeros(4, np.float32)), ValueError,
     r"grads\[1\] has shape \(4,\), but its variable has shape"),
    ("float64 param", lambda c: c["params"].__setitem__(0, np.zeros(5, np.float64)), TypeError,
     r"params\[0\] has dtype float64"),
    ("float64 grad", lambda c: c["grads"].__setitem__(0, np.zeros(5, np.float64)), TypeError,
     r"grads\[0\] has dtype float64"),
    ("int grad", lambda c: c["grads"].__setitem__(0, np.zeros(5, np.int32)), TypeError,
     r"grads\[0\] has dtype int32"),
    ("read-only", lambda c: c["params"][1].setflags(write=False), ValueError,
     r"params\[1\] is read-only"),
    ("non-contiguous m", lambda c: c["momentums"].__setitem__(0, np.zeros(10, np.float32)[::2]),
     ValueError, r"momentums\[0\] is not C-contiguous"),
    ("misaligned v", lambda c: c["velocities"].__setitem__(
        0, np.zeros(24, np.uint8)[1:21].view(np.float32)), ValueError,
     r"velocities\[0\] is not aligned"),
    ("list param", lambda c: c["params"].__setitem__(0, [0.0] * 5), TypeError,
     r"params\[0\] is a list"),
    ("lengths", lambda c: c["grads"].pop(), ValueError, r"grads has 1 entries for 2 params"),
    ("m shape", lambda c: c["momentums"].__setitem__(1, np.zeros(3, np.float32)), ValueError,
     r"momentums\[1\] has shape"),
    ("param twice", lambda c: c.update(params=[c["params"][0]] * 2,
                                       grads=[c["grads"][0], c["grads"][0].copy()],
                                       momentums=[c["momentums"][0], c["momentums"][0].copy() + 1],
                                       velocities=[c["velocities"][0], c["velocities"][0].copy()]),
     ValueError, r"params\[0\] and params\[1\] share memory"),
    ("m is v", lambda c: c["velocities"].__setitem__(0, c["momentums"][0]), ValueError,
     r"momentums\[0\] and velocities\[0\] share memory"),
    ("grad is a param", lambda c: c["grads"].__setitem__(1, c["params"][1]), ValueError,
     r"params\[1\] and grads\[1\] share memory|grads\[1\] and params\[1\] share memory"),
    ("overlapping views", lambda c: c.update(shared=np.zeros(16, np.float32)) or (
        c["momentums"].__setitem__(0, c["shared"][:5]),
        c["velocities"].__setitem__(0, c["shared"][4:9])), ValueError,
     r"momentums\[0\] and velocities\[0\] share memory"),
    ("two clips", lambda c: c["kw"].update(clipnorm=1.0, clipvalue=1.0), ValueError,
     r"Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"),
    ("step 0", lambda c: c["kw"].update(step=0), ValueError, r"step must be >= 1"),
    ("float step", lambda c: c["kw"].update(step=1.0), TypeError, r"step must be an int"),
    ("mask length", lambda c: c["kw"].update(decay_mask=[True]), ValueError,
     r"decay_mask has 1 entries for 2 variables"),
    ("unscale with clipnorm", lambda c: c["kw"].update(unscale=0.5, clipnorm=1.0), ValueError,
     r"unscale goes with global_clipnorm or no clip"),
    ("negative unscale", lambda c: c["kw"].update(unscale=-1.0), ValueError, r"unscale must be"),
    ("policy", lambda c: c["kw"].update(nonfinite="ignore"), ValueError, r"nonfinite must be"),
    ("infinite clip", lambda c: c["kw"].update(global_clipnorm=np.inf), ValueError,
     r"global_clipnorm must be finite"),
    ("no weight decay", lambda c: c["kw"].update(weight_decay=None), ValueError,
     r"weight_decay must be a number for AdamW"),
    ("vector lr", lambda c: c["kw"].update(learning_rate=np.ones(2)), ValueError,
     r"learning_rate must be a scalar"),
]


@pytest.mark.parametrize("what, breaks, error, message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_is_a_clear_error_and_writes_nothing(rng, what, breaks, error, message):
    call = dict(params=[random_array(rng, (n,), np.float32) for n in (5, CHUNK + 1)],
                kw=dict(step=2, weight_decay=0.01))
    call["grads"] = [random_array(rng, p.shape, np.float32) for p in call["params"]]
    call["momentums"], call["velocities"] = fresh_state(rng, "adam", call["params"])
    breaks(call)
    everything = [a for k in ("params", "grads", "momentums", "velocities") for a in call[k]
                  if isinstance(a, np.ndarray)]
    kept = [a.copy() for a in everything]
    with pytest.raises(error, match=message):
        cn.adamw_update(call["params"], call["grads"], call["momentums"], call["velocities"],
                        **call["kw"])
    assert all(same_bits(a, b) for a, b in zip(everything, kept)), "an error wrote data"


def test_sgd_momentum_arguments_must_agree(rng):
    p = [random_array(rng, (4,), np.float32)]
    g = [random_array(rng, (4,), np.float32)]
    with pytest.raises(ValueError, match="momentum is not 0: pass momentums"):
        cn.sgd_update(p, g, momentum=0.9)
    with pytest.raises(ValueError, match="momentums are given, but momentum is 0"):
        cn.sgd_update(p, g, [np.zeros(4, np.float32)])
    with pytest.raises(ValueError, match="Adam needs momentums and velocities"):
        cn.adam_update(p, g, None, None, step=1)


def test_core_rejects_bad_descriptors_naming_the_tensor(rng):
    """The core's own checks (validate_update), for adapters that bypass the
    front end: each names the tensor and writes nothing."""
    p, g, m = (random_array(rng, (8,), np.float32) for _ in range(3))
    a = _core.UpdateArgs()
    a.rule, a.learning_rate = _core.UPDATE_RULES["sgd"], 0.1
    a.momentum = f32(0.9)
    cases = [
        ([(p.ctypes.data, g.ctypes.data, 2, 0, 0, 8, False)], "tensor 0: m .* is missing"),
        ([(p.ctypes.data, g.ctypes.data, 3, m.ctypes.data, 0, 8, False)],
         "tensor 0: unsupported gradient dtype code 3"),
        ([(p.ctypes.data + 2, g.ctypes.data, 2, m.ctypes.data, 0, 3, False)], "not aligned"),
        ([(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, m.ctypes.data, 8, False)],
         "tensor 0: v is given, but SGD keeps none"),
        ([(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, 0, 8, False),
          (m.ctypes.data + 4, g.ctypes.data, 2, p.ctypes.data + 16, 0, 2, False)],
         "share memory"),
    ]
    kept = [x.copy() for x in (p, g, m)]
    for descs, message in cases:
        with pytest.raises(ValueError, match=message):
            _core.update_cpu(descs, a)
    assert all(same_bits(x, y) for x, y in zip((p, g, m), kept))
    a.clip_mode, a.clip = _core.UPDATE_CLIPS["norm"], -1.0
    with pytest.raises(ValueError, match="clip threshold must be a finite number > 0"):
        _core.update_cpu([(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, 0, 8, False)], a)
    lr = np.array([0.1], np.float32)
    a.clip, a.learning_rate_ptr = 1.0, lr.ctypes.data
    with pytest.raises(ValueError, match="host values"):
        _core.update_cpu([(p.ctypes.data, g.ctypes.data, 2, m.ctypes.data, 0, 8, False)], a)


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
                    reason="Keras' TensorFlow backend is the reference")
def test_keras_internals_the_reference_relies_on():
    """The Keras attributes these tests read (state lists) exist in the tested
    Keras (3.15); a rename fails here by name rather than as a mismatch."""
    keras = pytest.importorskip("keras")
    v = [keras.Variable(np.zeros(3, np.float32))]
    adam = keras.optimizers.Adam()
    adam.build(v)
    sgd = keras.optimizers.SGD(momentum=0.5)
    sgd.build(v)
    assert len(adam._momentums) == len(adam._velocities) == len(sgd.momentums) == 1


# ---- the CUDA kernel's sources under NVRTC (phase 2's route; no GPU needed) --------------------

@pytest.mark.parametrize("sm", [60, 70, 80, 90])
def test_update_kernel_compiles_with_cuda12_nvrtc_keeping_ieee_rounding(sm):
    """optim_kernel.cuh, as installed in clipops/kernels, compiles with CUDA 12's
    NVRTC (TensorFlow's) beside the clip kernel, with the NVRTC route's options:
    no FMA and no flush-to-zero in the code, the condition for the CPU's bits."""
    t = pytest.importorskip("test_nvrtc12", reason="the NVRTC route's options need CuPy")
    if t.SITE is None:
        pytest.skip("CUDA 12's NVRTC wheels are not installed (see tests/test_nvrtc12.py; "
                    "CLIPOPS_CUDA12_SITE=DIR)")
    assert all((t._nvrtc.kernel_dir() / f).is_file() for f in ("optim_kernel.cuh", "optim_math.h"))
    lib = t.Nvrtc12(t.SITE / t.NVRTC)
    source = '#include "clip_kernel.cuh"\n#include "optim_kernel.cuh"\n'
    cubin = lib.compile(source, t.options(f"-arch=sm_{sm}"), "CUBIN")
    assert cubin.startswith(b"\x7fELF")
    assert b"clipops_update_kernel" in cubin and b"clipops_clip_kernel" in cubin
    if sm == 60:
        ptx = lib.compile(source, t.options("-arch=compute_60"), "PTX").decode(errors="replace")
        ops = [ln.split()[0] for ln in ptx.splitlines() if ln.startswith("\t") and ln.split()]
        assert any(op.startswith(("sqrt.rn.f32", "div.rn.f32")) for op in ops)
        assert not [op for op in ops if ".ftz" in op or op.startswith("fma")]


# ---- the nvcc-compiled CUDA kernel on a GPU (no front end yet: phase 2's CuPy one) -------------

def _gpu_reason():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # no CuPy, no driver, no device
        return f"no usable GPU through CuPy: {exc}"
    if not _core.cuda_compiled():
        return "this build has no CUDA kernel (nvcc was not found at build time)"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("rule, clip", [("adamw", "global_norm"), ("nesterov", "norm"),
                                        ("adam", "value"), ("sgd", "none")])
def test_update_cuda_on_a_gpu_is_the_cpu_kernel_s_bits(rng, rule, clip):
    """_core.update_cuda (one cooperative launch) on device copies, with the
    learning rate and (Adam) a step counter on the device that the kernel
    increments: params, m, v, the norms and the counter equal the CPU kernel's."""
    import cupy

    from clipops import _optim

    fn, kw = RULES[rule]
    sizes = BOUNDARY_SIZES + [300_001]
    dts = GRAD_DTYPES
    params = [random_array(rng, (n,), np.float32) for n in sizes]
    grads = [random_array(rng, (n,), dts[i % len(dts)], 0.05) for i, n in enumerate(sizes)]
    ms, vs = fresh_state(rng, rule, params)
    codes = [_common.DTYPE_CODES[np.dtype(g.dtype).name] for g in grads]
    norm_code = _common.norm_dtype_code(codes)
    ndt = _common.np_dtype(norm_code)
    hyper = {k: v for k, v in kw.items() if k not in ("learning_rate", "weight_decay")}
    results = []
    for device in (False, True):
        xp = cupy if device else np
        copy = cupy.asarray if device else np.array  # fresh copies: the CPU run writes its own
        ps = [copy(p) for p in params]
        gs = [copy(g) for g in grads]
        m_ = None if ms is None else [copy(m) for m in ms]
        v_ = None if vs is None else [copy(v) for v in vs]
        norm, norms = xp.zeros((), ndt), xp.zeros(len(sizes), ndt)
        counter = copy(np.array([6], np.int64))
        a = _optim.update_args(_core, rule="adam" if fn != "sgd" else "sgd", clip_mode=clip,
                               clip_value={"global_norm": 1.0, "norm": 0.3, "value": 0.01,
                                           "none": 0.0}[clip],
                               norm_code=norm_code, unscale=1.0, skip=False,
                               learning_rate=kw["learning_rate"],
                               weight_decay=kw.get("weight_decay"),
                               step=7 if fn != "sgd" else None, **hyper)
        a.norm_out, a.tensor_norms = norm.data.ptr if device else norm.ctypes.data, \
            norms.data.ptr if device else norms.ctypes.data
        if fn != "sgd":
            a.power_source = _core.POWER_SOURCES["from_step"]
            a.iterations_ptr = counter.data.ptr if device else counter.ctypes.data
            a.increment_iterations = True
        lr = copy(np.array([a.learning_rate], np.float32))
        if device:
            a.learning_rate_ptr, a.learning_rate = lr.data.ptr, float("nan")
        addr = (lambda x: x.data.ptr) if device else (lambda x: x.ctypes.data)
        descs = [(addr(p), addr(g), c, 0 if m_ is None else addr(m_[i]),
                  0 if v_ is None else addr(v_[i]), p.size,
                  kw.get("weight_decay") is not None and i % 3 != 1)  # with exclusions
                 for i, (p, g, c) in enumerate(zip(ps, gs, codes))]
        if device:
            ws = cupy.empty(_core.update_cuda_workspace_bytes(descs), np.uint8)
            stream = cupy.cuda.get_current_stream()
            _core.update_cuda(descs, a, ws.data.ptr, ws.nbytes, stream.ptr)
            stream.synchronize()
        else:
            _core.update_cpu(descs, a)
        host = (lambda x: cupy.asnumpy(x)) if device else (lambda x: x)
        results.append([host(x).tobytes() for x in ps + (m_ or []) + (v_ or [])
                        + [norm, norms, counter]])
    bad = [i for i, (x, y) in enumerate(zip(*results)) if x != y]
    assert not bad, f"buffers {bad} differ (params, m, v, then norm, norms, counter)"
