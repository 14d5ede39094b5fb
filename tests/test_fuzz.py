"""Fuzzing: random lists, random scalars and garbage, through every front end a
CPU can run: NumPy, the TF op, and the CUDA kernel under the CUDA emulation.

Every valid input must give exactly the bits of the independent NumPy model of
the documented reduction order and TF's scale formula (tests/conftest.py), or
of the NumPy front end, which is held to that model; every invalid one a
TypeError or ValueError that names it; nothing may crash.

Budgets: CI runs the "ci" profile (a few hundred examples); the full run,

    CLIPOPS_FUZZ=full pytest tests/test_fuzz.py

draws 4,000 examples per test (20,000 in all; docs/reliability.md).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipops.numpy as cn
from conftest import BF16, CHUNK, LANES, model_norm, model_scale

PROFILE = os.environ.get("CLIPOPS_FUZZ", "ci")
EXAMPLES = {"ci": 120, "full": 4000}[PROFILE]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=PROFILE == "ci",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)] + \
    ([BF16] if BF16 is not None else [])
BOUNDARIES = [0, 1, 3, 4, 5, LANES - 1, LANES, LANES + 1, CHUNK - 1, CHUNK, CHUNK + 1]
# Many small tensors and a few large ones: lists of up to 300 tensors and sizes
# up to 70,000 without drawing 300 large ones (the model would take minutes).
SMALL = st.one_of(st.integers(0, 64), st.sampled_from(BOUNDARIES))
LARGE = st.integers(0, 70_000)
SCALARS = st.one_of(st.floats(1e-3, 1e3), st.sampled_from([0.0, -1.0, np.inf, -np.inf, np.nan]),
                    st.floats(allow_nan=True, allow_infinity=True, width=32))
VALUES = st.sampled_from(["normal", "tiny", "huge", "zeros", "special"])


def _draw_values(rng, n, dtype, kind):
    if kind == "zeros":
        a = np.zeros(n) * rng.choice([1.0, -1.0])  # -0 included
    elif kind == "special":
        a = rng.choice([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -2.5], size=n)
    else:
        scale = {"normal": 1.0, "tiny": 1e-30, "huge": 1e30}[kind]
        a = rng.standard_normal(n) * scale
    with np.errstate(over="ignore"):
        return a.astype(dtype)


@st.composite
def gradient_lists(draw, allow_none=True):
    sizes = draw(st.lists(SMALL, max_size=297)) + draw(st.lists(LARGE, max_size=3))
    sizes = draw(st.permutations(sizes))
    mixed = draw(st.booleans())
    one = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = []
    for n in sizes:
        if allow_none and draw(st.integers(0, 9)) == 0:
            out.append(None)
            continue
        dtype = draw(st.sampled_from(DTYPES)) if mixed else one
        kind = draw(VALUES) if draw(st.integers(0, 19)) == 0 else "normal"
        out.append(_draw_values(rng, n, dtype, kind))
    return out


def _norm_dtype(arrays):
    dts = {a.dtype for a in arrays if a is not None}
    return dts.pop() if len(dts) == 1 else np.dtype(np.float32)


def _model_clip(arrays, clip, use_norm=None):
    """The expected bits: the model's norm, TF's scale in the norm dtype, the scale
    cast to each array's dtype and one product (16-bit: in float, rounded once)."""
    nd = _norm_dtype(arrays)
    present = [a for a in arrays if a is not None]
    with np.errstate(all="ignore"):
        norm = model_norm(present, nd) if use_norm is None else np.asarray(use_norm).astype(nd)
        clip_nd = np.asarray(clip).astype(nd)
        scale = model_scale(norm, clip_nd, nd)
        out = []
        for a in arrays:
            if a is None:
                out.append(None)
            elif a.dtype.itemsize == 2:  # the scale rounded to the 16-bit type, the product in float
                s = np.float32(np.asarray(np.float32(scale)).astype(a.dtype))
                out.append((a.astype(np.float32) * s).astype(a.dtype))
            else:
                out.append(a * a.dtype.type(scale))
    return out, np.asarray(norm).astype(nd)


def _same_bits(got, want):
    # NaN payloads may differ between the model's NumPy arithmetic and the kernel's
    g, w = np.asarray(got), np.asarray(want)
    if g.dtype != w.dtype or g.shape != w.shape:
        return False
    g, w = g.reshape(-1), w.reshape(-1)
    nan = np.isnan(g.astype(np.float64)) & np.isnan(w.astype(np.float64))
    size = g.dtype.itemsize
    same = (g.view(np.uint8).reshape(g.size, size) == w.view(np.uint8).reshape(w.size, size)).all(axis=1)
    return bool(np.all(nan | same))


@FUZZ
@given(arrays=gradient_lists(), clip=SCALARS, use=st.one_of(st.none(), SCALARS),
       in_place=st.booleans())
def test_numpy_front_end_gives_the_model_s_bits(arrays, clip, use, in_place):
    want, want_norm = _model_clip(arrays, clip, use)
    inputs = [None if a is None else a.copy() for a in arrays]
    out, norm = cn.clip_by_global_norm(inputs, clip, use_norm=use, in_place=in_place)
    assert _same_bits(norm, want_norm), (norm, want_norm)
    for i, (o, w) in enumerate(zip(out, want)):
        assert (o is None) == (w is None)
        if o is not None:
            assert _same_bits(o, w), f"arrays[{i}] ({o.dtype}, {o.size})"
            if in_place:
                assert o is inputs[i]
    if not in_place:  # the caller's arrays are untouched
        assert all(a is None or a.tobytes() == b.tobytes() for a, b in zip(inputs, arrays))
    if use is None:
        assert _same_bits(cn.global_norm(arrays), want_norm)


GARBAGE = st.one_of(st.text(max_size=3), st.integers(), st.binary(max_size=3), st.just(object()),
                    st.just(np.arange(3)), st.just(np.array(["a"])),
                    st.just(np.zeros(2, np.complex64)), st.just({"a": 1}))


@FUZZ
@given(arrays=gradient_lists(), garbage=GARBAGE, where=st.integers(0, 300), clip=SCALARS)
def test_garbage_gets_a_clear_exception(arrays, garbage, where, clip):
    bad = list(arrays)
    bad.insert(min(where, len(bad)), garbage)
    snapshot = [None if a is None else a.copy() for a in arrays]
    with pytest.raises((TypeError, ValueError)) as info:
        cn.clip_by_global_norm(bad, clip, in_place=bool(where % 2))
    assert "arrays" in str(info.value)
    # a bad entry anywhere means nothing was written
    assert all(a is None or a.tobytes() == s.tobytes() for a, s in zip(arrays, snapshot))
    with pytest.raises((TypeError, ValueError)):
        cn.clip_by_global_norm(arrays, np.ones(2) * clip)  # a non-scalar clip_norm
    with pytest.raises(TypeError):
        cn.clip_by_global_norm(garbage if not isinstance(garbage, (np.ndarray, dict)) else 5, clip)


@FUZZ
@given(arrays=gradient_lists(allow_none=False), cut=st.integers(0, 100), clip=SCALARS)
def test_aliased_buffers_in_place_are_refused_untouched(arrays, cut, clip):
    big = [a for a in arrays if a is not None and a.size > 1]
    if not big:
        return
    a = big[0]
    views = [a, a[cut % a.size:]]  # the same memory twice, or overlapping
    before = a.copy()
    with pytest.raises(ValueError, match="share memory"):
        cn.clip_by_global_norm(views, clip, in_place=True)
    assert a.tobytes() == before.tobytes()


@FUZZ
@given(arrays=gradient_lists(), clip=SCALARS, use=st.one_of(st.none(), SCALARS),
       slices=st.booleans(), mode=st.sampled_from(["eager", "function"]))
def test_tf_op_gives_the_numpy_front_end_s_bits(arrays, clip, use, slices, mode):
    tf = pytest.importorskip("tensorflow", reason="the TensorFlow op needs tensorflow")
    import clipops

    if BF16 is not None and any(a is not None and a.dtype == BF16 for a in arrays):
        arrays = [a if a is None or a.dtype != BF16 else a.astype(np.float32) for a in arrays]
    want, want_norm = cn.clip_by_global_norm(arrays, clip, use_norm=use)
    t_list = []
    for a in arrays:
        if a is None:
            t_list.append(None)
        elif slices and a.ndim == 1 and a.size:
            t_list.append(tf.IndexedSlices(tf.constant(a.reshape(-1, 1)),
                                           tf.range(a.size, dtype=tf.int64),
                                           tf.constant([a.size, 1], tf.int64)))
        else:
            t_list.append(tf.constant(a))
    # 0-d arrays, not Python floats: TF's eager tf.constant(-0.0) may return a cached +0.0
    clip_t = tf.constant(np.asarray(clip).astype(want_norm.dtype))
    use_t = None if use is None else tf.constant(np.asarray(use).astype(want_norm.dtype))

    def f(t):
        return clipops.clip_by_global_norm(t, clip_t, use_norm=use_t)

    out, norm = f(t_list) if mode == "eager" else tf.function(f)(t_list)
    assert _same_bits(norm.numpy(), want_norm)
    for o, w in zip(out, want):
        assert (o is None) == (w is None)
        if o is not None:
            o = o.values if isinstance(o, tf.IndexedSlices) else o
            assert _same_bits(o.numpy().reshape(w.shape), w)


@FUZZ
@given(arrays=gradient_lists(allow_none=False), clip=SCALARS, use=st.one_of(st.none(), SCALARS),
       resident=st.sampled_from([1, 2, 3, 7, 64]), pointers=st.booleans(),
       order=st.sampled_from(["forward", "reverse", "random"]), seed=st.integers(0, 2**32 - 1))
def test_emulated_cuda_kernel_gives_the_cpu_kernel_s_bits(arrays, clip, use, resident, pointers,
                                                          order, seed):
    # the CUDA kernel and its launcher, unchanged, run on the CPU (tests/test_emulation.py)
    pytest.importorskip("clipops._emulation", reason="built without the CUDA emulation")
    import test_emulation as te

    te.emu.configure(order, order, seed)
    try:
        te.use_device(resident)
        outs, norm, _ = te.run(arrays, clip, use_norm=use, pointers=pointers)
    finally:
        te.emu.configure()
    want, want_norm = te.reference(arrays, clip, use_norm=use)
    # Same bits, NaNs aside: which operand's NaN a product passes on depends on
    # the instruction (the CPU's AVX2 loops vs scalar code; a GPU makes one
    # canonical NaN), so only NaN-ness is compared for them.
    assert _same_bits(norm, want_norm), (norm, want_norm)
    for i, (o, w) in enumerate(zip(outs, want)):
        assert _same_bits(o, w), f"arrays[{i}] ({o.dtype}, {o.size})"
