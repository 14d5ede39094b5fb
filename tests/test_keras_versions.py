"""clipops.keras and the installed Keras release.

clipops.keras overrides private Keras methods, so a Keras release can break it without removing
a name. This module checks behaviour: ``check_keras()`` (a tiny step of each fused path against
Keras' own optimizer) and a small ``model.fit`` against Keras', plus that the checks fail on a
Keras that behaves otherwise, the warning for an untested release, the import-time name check,
and that pyproject's ``keras`` extra pins the tested range. .ci/run runs this module under every
Keras release it tests (clipops.keras.TESTED_KERAS), each installed into a folder of its own.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="Keras is not installed")
tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
if keras.backend.backend() != "tensorflow":
    pytest.skip("clipops.keras needs KERAS_BACKEND=tensorflow", allow_module_level=True)

import clipops.keras as ck  # noqa: E402
from keras.src.backend.tensorflow.optimizer import TFOptimizer  # noqa: E402
from keras.src.optimizers.base_optimizer import BaseOptimizer  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_installed_keras(rng):
    print("Keras", keras.__version__, "from", os.path.dirname(keras.__file__))
    assert ck.check_keras(int(rng.integers(2 ** 31))) == []


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_steps_match_keras(rng, jit_compile):
    # model.fit's train step around the optimizer, on a small model: a step under the clip
    # must give Keras' bits, a step over it Keras' update within the norm's rounding
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = rng.standard_normal((64, 3)).astype(np.float32)
    models = []
    for fuse in (True, False):
        keras.utils.set_random_seed(5)
        m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
        opt = keras.optimizers.SGD(0.05, global_clipnorm=1.0)
        m.compile(optimizer=ck.fused(opt) if fuse else opt, loss="mse", jit_compile=jit_compile)
        models.append(m)
    fused, plain = models
    # dim inputs first (norm < 1, not clipped), then bright ones (clipped)
    for step, scale in enumerate((0.02, 20.0)):
        before = [w.numpy() for w in plain.trainable_weights]
        for m in models:
            m.train_on_batch(x * np.float32(scale), y)
        norm = float(fused.optimizer.last_global_norm.numpy())
        assert (norm > 1.0) == (step == 1), (step, norm)
        problem = ck._keras_step_differs(before, [w.numpy() for w in fused.trainable_weights],
                                         [w.numpy() for w in plain.trainable_weights],
                                         clipped=norm > 1.0, terms=sum(w.size for w in before))
        assert not problem, (step, problem)


def _keras_update_step_renamed(clip_with_keras: bool):
    """A Keras 3 _backend_apply_gradients (no accumulation, no EMA) whose update step has
    another name, so that the fused override is bypassed; with clip_with_keras, its clip too."""

    def apply(self, grads, trainable_variables):
        grads = (BaseOptimizer._clip_gradients(self, grads) if clip_with_keras
                 else self._clip_gradients(grads))
        self._apply_weight_decay(trainable_variables)
        TFOptimizer._backend_update_step(self, grads, trainable_variables, self.learning_rate)

    return apply


def _fused_from_config(optimizer):
    """clipops.keras.fused as it was before it kept the object: a new one from the config."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return ck.FusedLossScaleOptimizer(
            _fused_from_config(optimizer.inner_optimizer), initial_scale=optimizer.initial_scale,
            name=optimizer.name)
    return ck.fused_class(type(optimizer)).from_config(optimizer.get_config())


def _norms_among_the_variables(self, shape, name):
    return self.add_variable(shape=shape, dtype="float32", initializer="zeros",
                             aggregation="only_first_replica", name=name)


@pytest.mark.parametrize("drift, expected", [
    # Keras stops calling _backend_update_step: the fused clip never runs (nothing is clipped)
    ("update_step_renamed", r"clipped|did not run"),
    # ... and clips with its own code under another name: Keras' numbers, but not clipops' op
    ("update_step_and_clip_renamed", r"did not run|has no Clipops"),
    # state outside the config lost (the old fused()): AdamW decays the excluded weight
    ("fused_from_config", r"AdamW exclude_from_weight_decay"),
    # the norms among the optimizer's variables (the old layout): checkpoints do not load
    ("norms_among_the_variables", r"checkpoints would not load"),
])
def test_the_check_fails_on_a_keras_that_behaves_otherwise(monkeypatch, drift, expected):
    if drift == "update_step_renamed":
        monkeypatch.setattr(BaseOptimizer, "_backend_apply_gradients",
                            _keras_update_step_renamed(clip_with_keras=False))
    elif drift == "update_step_and_clip_renamed":
        monkeypatch.setattr(BaseOptimizer, "_backend_apply_gradients",
                            _keras_update_step_renamed(clip_with_keras=True))
    elif drift == "fused_from_config":
        monkeypatch.setattr(ck, "fused", _fused_from_config)
    else:
        monkeypatch.setattr(ck._FusedClip, "_clipops_variable", _norms_among_the_variables)
    problems = ck.check_keras()
    assert problems, drift
    assert any(re.search(expected, p) for p in problems), problems


def test_an_untested_keras_warns_and_is_checked_before_training(monkeypatch):
    monkeypatch.setitem(ck._VERSION_CHECK, "needed", False)
    monkeypatch.setitem(ck._VERSION_CHECK, "problems", None)
    tested = ", ".join(ck.TESTED_KERAS).replace(".", r"\.")
    with pytest.warns(UserWarning, match=rf"tested with Keras {tested}, not 3\.99\.0"):
        ck._check_keras_version("3.99.0")
    variables = [keras.Variable(np.ones(3, np.float32))]
    # the first fused optimizer to be built runs check_keras(): this Keras passes it
    ck.fused(keras.optimizers.SGD(0.1, global_clipnorm=1.0)).build(variables)
    assert ck._VERSION_CHECK["problems"] == []
    # a Keras that behaves otherwise is refused before a fused optimizer trains on it
    monkeypatch.setitem(ck._VERSION_CHECK, "problems", None)
    monkeypatch.setattr(BaseOptimizer, "_backend_apply_gradients",
                        _keras_update_step_renamed(clip_with_keras=False))
    opt = ck.fused(keras.optimizers.SGD(0.1, global_clipnorm=1.0))
    with pytest.raises(RuntimeError, match=r"Keras .* differs from Keras' own: global_clipnorm"):
        opt.build(variables)
    assert not opt.built


@pytest.mark.parametrize("version", ["3.12.0", "3.15.1", "3.14.0rc1", "3.13.0.dev2025"])
def test_a_tested_keras_does_not_warn(monkeypatch, version):
    monkeypatch.setitem(ck._VERSION_CHECK, "needed", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck._check_keras_version(version)
    assert not ck._VERSION_CHECK["needed"]


@pytest.mark.parametrize("version", ["3.11.3", "3.16.0", "4.0.0"])
def test_versions_outside_the_range_warn(monkeypatch, version):
    monkeypatch.setitem(ck._VERSION_CHECK, "needed", False)
    with pytest.warns(UserWarning, match="tested with Keras"):
        ck._check_keras_version(version)


def test_a_keras_without_a_needed_internal_is_refused_by_name(monkeypatch):
    # a release that renamed an overridden method fails at import, by name (behaviour that
    # changed under a kept name is what the tests above catch)
    monkeypatch.delattr(keras.optimizers.LossScaleOptimizer, "_stateful_handle_non_finite_grads")
    tested = ", ".join(ck.TESTED_KERAS).replace(".", r"\.")
    with pytest.raises(ImportError, match=r"LossScaleOptimizer\._stateful_handle_non_finite_grads"
                                          rf".*tested with Keras {tested}"):
        ck._check_keras_internals()


@pytest.mark.skipif(not PYPROJECT.exists(), reason="pyproject.toml is not beside tests/ "
                                                   "(an installed copy of the tests)")
def test_the_keras_extra_pins_the_tested_range():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomli")
    with open(PYPROJECT, "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    minors = [tuple(int(p) for p in v.split(".")) for v in ck.TESTED_KERAS]
    # one contiguous range of minors, oldest first: what a >=,< pin can say
    assert minors == [(minors[0][0], minors[0][1] + i) for i in range(len(minors))], minors
    low, high = minors[0], (minors[-1][0], minors[-1][1] + 1)
    assert extras["keras"] == [f"keras>={low[0]}.{low[1]},<{high[0]}.{high[1]}"], extras["keras"]
