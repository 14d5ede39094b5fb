"""clip_norm at 0, -0, a negative number, -inf, NaN and inf, and clip_by_value's
bounds at NaN, inf and crossed: clipops does what TensorFlow does, on every
route (the TF op eagerly, with a Python number or a tensor, and in a
tf.function; the XLA route; the NumPy front end; the CUDA kernel, run on the
CPU by the emulation). Nothing refuses these values; the docstrings say what
each gives (clipops/__init__.py).

TensorFlow's answers (TF 2.21), n the global norm (finite, > 0 unless said):
  clip_by_global_norm, scale = clip * min(1/n, 1/clip) + (n - n):
    +0: every output is +-0 (NaN where n is 0); -0: NaN (min picks -inf);
    < 0 (and not -inf): min picks 1/clip, so the scale is clip * (1/clip),
    1 to within an ulp: the list passes through (0s for a list of zeros);
    NaN, inf, -inf: NaN.
  clip_by_norm, x * c / max(||x||, c) with c = maximum(clip, 0):
    +0 and any negative number (-inf too): +-0 (NaN for a tensor of zeros);
    -0 stays -0 (zeros of the other sign); NaN, inf: NaN.
  clip_by_value: maximum(minimum(x, hi), lo): lo > hi gives lo everywhere,
    a NaN bound NaN everywhere, (-inf, inf) the input.

TF's references run in a tf.function with the clip as a tensor argument: its
eager cache of Python scalars keys -0.0 and 0.0 alike, so that eagerly
tf.clip_by_global_norm(x, -0.0) may use +0.0 (tests/test_tf.py,
test_eager_scalar_cache_tells_minus_zero_from_zero). Each result depends only
on special values and on products with 0, so the comparisons are exact: equal
values, the same sign for every zero, NaN where TF has NaN (its payload
aside)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is the reference")

import clipops  # noqa: E402
import clipops.numpy as cn  # noqa: E402
from conftest import BF16, CHUNK, random_array  # noqa: E402

EDGE_CLIPS = [0.0, -0.0, -1.5, -np.inf, np.nan, np.inf]
DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])
CROSSED_AND_NAN_BOUNDS = [(0.5, -0.5), (np.nan, 1.0), (-1.0, np.nan), (-np.inf, np.inf),
                          (np.inf, -np.inf)]


def clip_id(c) -> str:
    return {0.0: "-0" if np.signbit(c) else "+0"}.get(c, str(c))


def make_list(rng, dtype, zeros: bool):
    """Fresh random tensors across a chunk boundary plus a tensor of zeros (its
    own norm is 0: clip_by_norm's 0/0); or, with zeros, a list of zeros only
    (the global norm is 0). 16-bit values are small enough that TF's float16
    sum of squares (~0.25 * 16,400) stays finite, as clipops' float32 one does."""
    if zeros:
        return [np.zeros(n, dtype) for n in (5, CHUNK + 3)]
    scale = 0.5 if np.dtype(dtype).itemsize == 2 else 3.0
    return [random_array(rng, (n,), dtype, scale=scale) for n in (5, 40, CHUNK + 3)] + \
        [np.zeros(3, dtype)]


def assert_same(got, want, what):
    """Equal values, the same sign for every zero, NaN exactly where want has it."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g, np.float64)
        w = np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{what}[{i}]: shape {g.shape} != {w.shape}"
        nan = np.isnan(w)
        assert (np.isnan(g) == nan).all(), f"{what}[{i}]: NaN at {np.isnan(g)} != TF's {nan}"
        assert (g[~nan] == w[~nan]).all(), f"{what}[{i}]: {g[~nan][:4]} != TF's {w[~nan][:4]}"
        assert (np.signbit(g[~nan]) == np.signbit(w[~nan])).all(), \
            f"{what}[{i}]: signs of zeros differ from TF's: {g[~nan][:4]} vs {w[~nan][:4]}"


def tf_numpy(ts):
    return [t.numpy() for t in ts]


@tf.function(reduce_retracing=True)
def tf_global(ts, c):
    return tf.clip_by_global_norm(ts, c)[0]


@tf.function(reduce_retracing=True)
def tf_each(ts, c):
    return [tf.clip_by_norm(t, c) for t in ts]


@tf.function(reduce_retracing=True)
def tf_value(ts, lo, hi):
    return [tf.clip_by_value(t, lo, hi) for t in ts]


def check_every_route(fn, tf_fn, arrays, numpy_fn, *scalars):
    """clipops' fn(t_list, *scalars) on every route against TF's tf_fn: TF's
    kernels (in a tf.function), and for the XLA route TF's ops under XLA, which
    can differ (XLA's min and max ignore a NaN second operand: see
    test_clip_by_value_gives_tf_s_result)."""
    dtype = arrays[0].dtype
    tensors = [tf.constant(a) for a in arrays]
    as_tensors = [tf.constant(np.asarray(s, dtype)) for s in scalars]
    want = tf_numpy(tf.function(tf_fn)(tensors, *as_tensors))
    want_xla = tf_numpy(tf.function(tf_fn, jit_compile=True)(tensors, *as_tensors))
    routes = {
        "op eager, Python numbers": (fn(tensors, *[float(s) for s in scalars]), want),
        "op eager, tensors": (fn(tensors, *as_tensors), want),
        "op tf.function": (tf.function(fn)(tensors, *as_tensors), want),
        "XLA route": (tf.function(fn, jit_compile=True)(tensors, *as_tensors), want_xla),
        "numpy, Python numbers": (numpy_fn(arrays, *[float(s) for s in scalars]), want),
        "numpy, NumPy scalars": (numpy_fn(arrays, *[np.asarray(s, dtype)[()] for s in scalars]),
                                 want),
    }
    for route, (got, w) in routes.items():
        assert_same([np.asarray(g) for g in got], w, route)
    return want, want_xla


@pytest.mark.parametrize("zeros", [False, True], ids=["random", "all-zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("clip", EDGE_CLIPS, ids=clip_id)
def test_clip_by_global_norm_gives_tf_s_result(rng, clip, dtype, zeros):
    want, want_xla = check_every_route(
        lambda t, c: clipops.clip_by_global_norm(t, c)[0],
        lambda t, c: tf.clip_by_global_norm(t, c)[0],
        make_list(rng, dtype, zeros), lambda a, c: cn.clip_by_global_norm(a, c)[0], clip)
    assert_same(want_xla, want, "TF under XLA")  # here TF's two answers agree


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("clip", EDGE_CLIPS, ids=clip_id)
def test_clip_by_norm_gives_tf_s_result(rng, clip, dtype):
    # A negative clip was used as it is (x * c / max(n, c) = x * c / n); TF
    # raises it to 0 first.
    want, want_xla = check_every_route(
        clipops.clip_by_norm, lambda ts, c: [tf.clip_by_norm(t, c) for t in ts],
        make_list(rng, dtype, zeros=False), cn.clip_by_norm, clip)
    assert_same(want_xla, want, "TF under XLA")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bounds", CROSSED_AND_NAN_BOUNDS, ids=str)
def test_clip_by_value_gives_tf_s_result(rng, bounds, dtype):
    want, want_xla = check_every_route(
        clipops.clip_by_value, lambda ts, lo, hi: [tf.clip_by_value(t, lo, hi) for t in ts],
        make_list(rng, dtype, zeros=False), cn.clip_by_value, *bounds)
    # TF's kernels give NaN everywhere for a NaN bound; under XLA, TF's ops
    # ignore it (min(x, NaN) and max(x, NaN) are x): the XLA route follows.
    if np.isnan(bounds).any():
        assert all(np.isnan(w).all() for w in want)
        assert not any(np.isnan(w).any() for w in want_xla)
    else:
        assert_same(want_xla, want, "TF under XLA")


@pytest.mark.parametrize("clip", [-1.5, -np.inf, 2.0], ids=clip_id)
def test_gradients_with_an_edge_clip_are_tf_s(rng, clip):
    """The op's gradient functions against TF's own differentiation of
    tf.clip_by_global_norm and tf.clip_by_norm, clip_norm a variable: for a
    negative clip_norm, clip_by_norm's outputs are 0 and nothing flows to it
    (TF's maximum(clip_norm, 0)); 2.0 is a control that clips. (At clip_norm
    +0, TF's d/d clip_norm of the global clip is NaN, 0 * d(1/c)/dc; clipops
    gives the one-sided derivative <g, t> / n there.)"""
    x = [tf.Variable(rng.standard_normal(n)) for n in (5, 40)]  # float64, norms ~2 and ~6
    w = [tf.constant(rng.standard_normal(n)) for n in (5, 40)]
    c = tf.Variable(clip, dtype=tf.float64)

    def loss(outs):
        return sum(tf.reduce_sum(o * wi) for o, wi in zip(outs, w))

    with tf.GradientTape(persistent=True) as tape:
        ys = {"global": loss(clipops.clip_by_global_norm(x, c)[0]),
              "global TF": loss(tf.clip_by_global_norm(x, c)[0]),
              "each": loss(clipops.clip_by_norm(x, c)),
              "each TF": loss([tf.clip_by_norm(t, c) for t in x])}
    # (At -inf the global clip's outputs are NaN, and so are TF's gradients;
    # clipops' d/d clip_norm is 0 there: only the per-tensor clip is compared.)
    for name in ("global", "each") if np.isfinite(clip) else ("each",):
        got, want = tape.gradient(ys[name], x + [c]), tape.gradient(ys[name + " TF"], x + [c])
        # float64; the norms are summed in other orders (clipops' fixed order,
        # TF's reduce_sum): a few ulps of the norm, within 1e-12 relative
        for g, t in zip(got, want):
            np.testing.assert_allclose(g.numpy(), t.numpy(), rtol=1e-12, atol=1e-300,
                                       err_msg=f"{name}, clip {clip}")


# ---- the CUDA kernel, run on the CPU by the emulation ---------------------------

def emulated(arrays, mode: int, clip=0.0, lo=0.0, hi=0.0, pointers: bool = False):
    """The CUDA launcher (clip_cuda.cu) on the emulation, in `mode`; the scalars
    as host values or, with pointers, read by the kernel from memory (as CuPy's
    0-d GPU arrays are). One dtype per list: the norm dtype is the list's."""
    emu = pytest.importorskip("clipops._emulation", reason="built without the CUDA emulation")
    from clipops import _core

    dtype = arrays[0].dtype
    code = _core.DTYPE_CODES[dtype.name]
    emu.set_device(emu.device(3, 1))
    outs = [np.full_like(a, np.nan) for a in arrays]  # poisoned: an unwritten element shows
    descs = [(a.ctypes.data, o.ctypes.data, a.size, code) for a, o in zip(arrays, outs)]
    ws = np.zeros(emu.cuda_workspace_bytes(descs), np.uint8)
    norm = np.zeros((), dtype)
    bufs = [np.asarray(v, dtype).reshape(1) for v in (clip, lo, hi)]  # kept alive until synchronize

    def host(k):  # NaN where the kernel must read the pointer instead
        return np.nan if pointers else float(bufs[k][0])

    def ptr(k):
        return bufs[k].ctypes.data if pointers else 0

    emu.clip_cuda(descs, code, True, host(0), ptr(0), None, 0,
                  norm.ctypes.data if mode == 0 else 0, ws.ctypes.data, ws.nbytes, 0,
                  mode=mode, clip_min=host(1), clip_min_ptr=ptr(1) if mode == 2 else 0,
                  clip_max=host(2), clip_max_ptr=ptr(2) if mode == 2 else 0)
    emu.synchronize()
    return outs


@pytest.mark.parametrize("pointers", [False, True], ids=["host-scalars", "device-scalars"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_the_cuda_kernel_gives_tf_s_results(rng, dtype, pointers):
    from clipops import _core

    arrays = make_list(rng, dtype, zeros=False)
    tensors = [tf.constant(a) for a in arrays]
    for clip in EDGE_CLIPS:
        c = tf.constant(np.asarray(clip, dtype))
        assert_same(emulated(arrays, _core.MODES["global_norm"], clip=clip, pointers=pointers),
                    tf_numpy(tf_global(tensors, c)), f"global norm, clip {clip}")
        assert_same(emulated(arrays, _core.MODES["norm"], clip=clip, pointers=pointers),
                    tf_numpy(tf_each(tensors, c)), f"per-tensor norm, clip {clip}")
    for lo, hi in CROSSED_AND_NAN_BOUNDS:
        want = tf_numpy(tf_value(tensors, *(tf.constant(np.asarray(b, dtype)) for b in (lo, hi))))
        assert_same(emulated(arrays, _core.MODES["value"], lo=lo, hi=hi, pointers=pointers),
                    want, f"value, bounds {lo, hi}")


def test_nonfinite_looks_at_the_norm_only(rng):
    """A NaN or inf clip_norm with a finite norm: NaN outputs under every
    policy, as with TF's; the step is not 'skipped' and nothing raises."""
    arrays = make_list(rng, np.float32, zeros=False)
    for clip in (np.nan, np.inf):
        for policy in ("skip", "raise"):
            res = cn.clip_by_global_norm(arrays, clip, nonfinite=policy, return_norms=True)
            assert np.isfinite(res.global_norm)
            assert all(np.isnan(c).all() for c in res.clipped)
            assert res.skipped is None or not bool(res.skipped)


def test_the_keras_route_refuses_a_clip_that_keras_ignores():
    """Keras 3 clips only when the option is > 0 (``if self.clipnorm and
    self.clipnorm > 0``): 0, -0.0, a negative number and NaN silently mean no
    clipping. clipops.keras.fused refuses them when the optimizer is made."""
    keras = pytest.importorskip("keras", reason="the Keras route needs keras")
    import clipops.keras as ck

    for option in ("global_clipnorm", "clipnorm", "clipvalue"):
        for bad in (-1.0, 0.0, -0.0, np.nan):
            v = keras.Variable(np.array([3.0, 4.0], np.float32))
            keras.optimizers.SGD(1.0, **{option: bad}).apply_gradients(
                [(tf.constant([3.0, 4.0]), v)])
            assert v.numpy().tolist() == [0.0, 0.0], (option, bad)  # Keras: the whole step
            with pytest.raises(ValueError, match="sets none of global_clipnorm, clipnorm or "
                                                 "clipvalue"):
                ck.fused(keras.optimizers.SGD(1.0, **{option: bad}))
            with pytest.raises(ValueError, match="none of global_clipnorm, clipnorm or clipvalue"):
                ck.fused_class(keras.optimizers.SGD)(1.0, **{option: bad})


def _gpu_reason():
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no CuPy, no driver, no device
        return f"needs CuPy and a GPU: {exc}"
    return None if count else "needs a GPU: the CUDA runtime sees none"


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_the_cupy_front_end_gives_the_numpy_results(rng):
    """On a GPU: the edge clips give clipops.numpy's results (TF's, above), and
    0-d arrays stay 0-d (copying and in place)."""
    import cupy

    import clipops.cupy as ccp

    arrays = make_list(rng, np.float32, zeros=False)
    on_gpu = [cupy.asarray(a) for a in arrays]
    for clip in EDGE_CLIPS:
        for device_scalar in (False, True):
            c = cupy.asarray(np.float32(clip)) if device_scalar else clip
            assert_same([g.get() for g in ccp.clip_by_global_norm(on_gpu, c)[0]],
                        cn.clip_by_global_norm(arrays, clip)[0], f"global, clip {clip}")
            assert_same([g.get() for g in ccp.clip_by_norm(on_gpu, c)],
                        cn.clip_by_norm(arrays, clip), f"per-tensor, clip {clip}")
    zero_d = cupy.asarray(np.float32(rng.standard_normal()))
    out, _ = ccp.clip_by_global_norm([zero_d, on_gpu[1]], 0.5)
    assert out[0].shape == ()
    out, _ = ccp.clip_by_global_norm([zero_d], 0.5, in_place=True)
    assert out[0] is zero_d and zero_d.shape == ()
