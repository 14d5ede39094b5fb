"""A SavedModel whose traced function holds clipops' op, reloaded in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="SavedModels need tensorflow")

import clipops  # noqa: E402

A = np.array([3.0, 4.0, 1.5], np.float32)
B = np.array([[0.25, -2.0], [1.0, 0.5]], np.float32)


class Clipper(tf.Module):
    def __init__(self):
        super().__init__()
        self.clip = tf.Variable(2.0)  # a variable threshold, as a schedule would set it

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.float32),
                                  tf.TensorSpec((2, 2), tf.float32)])
    def __call__(self, a, b):
        (ca, cb), norm = clipops.clip_by_global_norm([a, b], self.clip)
        return ca, cb, norm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("savedmodel") / "clipper")
    module = Clipper()
    graph = module.__call__.get_concrete_function().graph
    assert "ClipopsClipByGlobalNorm" in {op.type for op in graph.get_operations()}
    tf.saved_model.save(module, path)
    return path, [t.numpy() for t in module(tf.constant(A), tf.constant(B))]


def load_in_fresh_process(path, prelude):
    code = prelude + textwrap.dedent(f"""
        import numpy as np
        import tensorflow as tf
        try:
            m = tf.saved_model.load({path!r})
        except Exception as e:
            print("RAISED", type(e).__name__, e)
        else:
            out = m(tf.constant({A.tolist()!r}), tf.constant({B.tolist()!r}))
            np.save({path!r} + ".out.npy", np.concatenate([np.ravel(t.numpy()) for t in out]))
            print("LOADED")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=180, cwd=os.path.dirname(__file__))
    return out.stdout + out.stderr


@pytest.mark.parametrize("prelude", ["import clipops\n", ""], ids=["clipops-first", "tf-first"])
def test_reload_with_import_clipops(saved, prelude):
    path, want = saved
    # the op is registered whichever comes first: `import clipops` or `import tensorflow`
    prelude = prelude or "import tensorflow\nimport clipops\n"
    out = load_in_fresh_process(path, prelude)
    assert "LOADED" in out, out
    got = np.load(path + ".out.npy")
    want = np.concatenate([np.ravel(w) for w in want])
    assert want[-1] > 2.0  # the norm: clipped, so the scale path ran
    assert got.tobytes() == want.tobytes()  # the same op on the same inputs: the same bits


def test_reload_without_clipops_names_the_op(saved):
    path, _ = saved
    out = load_in_fresh_process(path, "")
    # TensorFlow's own message; docs/frontends.md ("SavedModel") says this one means `import clipops`
    assert "RAISED" in out and "Op type not registered 'ClipopsClipByGlobalNorm'" in out, out


def test_import_clipops_alone_does_not_import_tensorflow():
    code = "import sys, clipops\nprint('TF', 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(__file__))
    assert "TF False" in out.stdout, out.stdout + out.stderr
