"""The benchmarks' own judges: they must pass what is right and fail what is wrong."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import agreement  # noqa: E402

import clipops.numpy as cn  # noqa: E402

SIZES = [784 * 512, 512, 512 * 256, 256, 2560, 10]  # the classic MLP's gradients


def tf_like_clip(grads, clip):
    """TF's clip_by_global_norm in NumPy float32: a float32 sum of squares per
    tensor (a different order from clipops'), then clip * min(1/n, 1/clip)."""
    n = np.float32(np.sqrt(np.float32(sum(np.float32(np.sum(g * g, dtype=np.float32))
                                          for g in grads))))
    one, c = np.float32(1), np.float32(clip)
    scale = c * min(one / n, one / c)
    return [g * scale for g in grads], float(n)


def grads_with_norm(rng, target):
    g = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    factor = target / np.sqrt(sum(float(np.dot(x.astype(np.float64), x)) for x in g))
    return [(x * factor).astype(np.float32) for x in g]


@pytest.mark.parametrize("norm", [3.0, 40.0], ids=["not-clipped", "clipped"])
def test_two_correct_clips_agree(rng, norm):
    grads = grads_with_norm(rng, norm)
    tf_out, tf_norm = tf_like_clip(grads, 15.0)
    co_out, co_norm = cn.clip_by_global_norm(grads, 15.0)
    v = agreement.compare_step(0, 15.0, grads, tf_out, tf_norm, co_out, float(co_norm))
    assert v.ok, v
    assert v.clipped == (norm > 15)


def test_a_wrong_scale_on_one_step_fails(rng):
    grads = grads_with_norm(rng, 40.0)
    tf_out, tf_norm = tf_like_clip(grads, 15.0)
    co_out, co_norm = cn.clip_by_global_norm(grads, 15.0)
    # one tensor scaled 1e-5 too much: far below what a loss curve would show
    bad = [o.copy() for o in co_out]
    bad[2] = (bad[2] * np.float32(1 + 1e-5)).astype(np.float32)
    v = agreement.compare_step(7, 15.0, grads, tf_out, tf_norm, bad, float(co_norm))
    assert not v.ok and v.step == 7 and "off its scale" in v.why
    # a norm that is wrong, though consistent with the outputs, fails too
    wrong_norm = float(co_norm) * (1 + 1e-3)
    scaled = [(g * np.float32(15.0 / wrong_norm)).astype(np.float32) for g in grads]
    v = agreement.compare_step(8, 15.0, grads, tf_out, tf_norm, scaled, wrong_norm)
    assert not v.ok and "norms differ" in v.why


def test_an_unclipped_step_must_be_bit_identical(rng):
    grads = grads_with_norm(rng, 3.0)
    tf_out, tf_norm = tf_like_clip(grads, 15.0)
    co_out, co_norm = cn.clip_by_global_norm(grads, 15.0)
    co_out[1] = co_out[1].copy()
    co_out[1][5] = np.nextafter(co_out[1][5], np.float32(np.inf))  # one bit
    v = agreement.compare_step(0, 15.0, grads, tf_out, tf_norm, co_out, float(co_norm))
    assert not v.ok and not v.clipped and "bits" in v.why


def test_the_norm_bound_covers_float32_summation(rng):
    # The bound must hold for a plainly linear float32 sum (the worst order a
    # reduction may use within a leaf of 1,024), on the MLP's largest tensor.
    g = grads_with_norm(rng, 40.0)[0]
    acc = np.float32(0)
    for x in (g[:1024] * g[:1024]).astype(np.float32):  # one leaf, strictly linear
        acc = np.float32(acc + x)
    leaf_exact = float(np.dot(g[:1024].astype(np.float64), g[:1024]))
    # a sum of squares' relative error is twice its square root's
    assert abs(float(acc) - leaf_exact) / leaf_exact <= 2 * agreement.norm_rtol(g.size, 6)
    assert agreement.norm_rtol(g.size, 6) < 1e-4  # still tight enough to catch a wrong norm


@pytest.mark.slow
def test_no_front_end_leaks(tmp_path):
    # 100,000 calls of each front end; RSS may not grow by 1% (bench/leaks.py).
    import leaks

    rows = {r["front_end"]: r for r in [leaks.measure(name, call, 100_000)
                                         for name, call in leaks.front_ends().items()]}
    assert {"numpy clip", "numpy in place", "numpy global_norm"} <= set(rows)
    for name, r in rows.items():
        assert r["growth_fraction"] < 0.01, (name, r)
