"""clipops.keras under tf.distribute.MultiWorkerMirroredStrategy: two worker processes on
localhost (TF_CONFIG on 127.0.0.1 ports, CPU ring collectives), against the same steps in one
process, with MirroredStrategy over two logical CPUs and on one device.

Keras 3's ``model.fit`` does not run under MultiWorkerMirroredStrategy (its first step reduces
the distributed batch eagerly and fails: keras-team/keras#20585, open), so the workers train
with a custom loop, ``strategy.run`` and ``optimizer.apply_gradients``, the path that works.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="Keras is not installed")
pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
if keras.backend.backend() != "tensorflow":
    pytest.skip("clipops.keras needs KERAS_BACKEND=tensorflow", allow_module_level=True)

TIMEOUT_S = 300  # each process; a step takes well under a second, start-up ~10 s

# One script, three roles: "worker" (MultiWorkerMirroredStrategy from TF_CONFIG), "mirrored"
# (MirroredStrategy over two logical CPUs) and "single" (one device, the global batch). Each
# trains the same models on the same global batches and saves their weights.
SCRIPT = r"""
import json, os, sys
import numpy as np
import tensorflow as tf

role, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# one thread per kernel in every process: the same reduction order in each replica's matmuls,
# whether the replica is a process of its own or a thread beside another
tf.config.threading.set_intra_op_parallelism_threads(1)
if role == "worker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING))
elif role == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    strategy = tf.distribute.get_strategy()
import keras
import clipops.keras as ck

GLOBAL, STEPS = 256, 4
rng = np.random.default_rng(seed)
x = rng.random((STEPS * GLOBAL, 784), dtype=np.float32)
for i in range(STEPS):  # dim every other batch pair: clipped (norm ~3) and unclipped (~0.3) steps
    if (i // 2) % 2:
        x[i * GLOBAL:(i + 1) * GLOBAL] *= np.float32(0.1)
y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, STEPS * GLOBAL)]

VARIANTS = {
    "fused": lambda: ck.fused(keras.optimizers.SGD(0.1, global_clipnorm=1.0)),
    "keras": lambda: keras.optimizers.SGD(0.1, global_clipnorm=1.0),
    "fused_accumulation": lambda: ck.fused(keras.optimizers.SGD(
        0.1, global_clipnorm=1.0, gradient_accumulation_steps=2)),
}

def train(make_optimizer):
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"),
                                  keras.layers.Dense(10)])
        opt = make_optimizer()
        opt.build(model.trainable_variables)
    initial = [w.numpy() for w in model.trainable_weights]

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            # each replica's share of the global batch's mean loss
            err = tf.reduce_mean(tf.square(model(xb, training=True) - yb), axis=-1)
            loss = tf.reduce_sum(err) / GLOBAL
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def step(xb, yb):
        strategy.run(replica_step, args=(xb, yb))

    norms = []
    for i in range(STEPS):
        xb, yb = x[i * GLOBAL:(i + 1) * GLOBAL], y[i * GLOBAL:(i + 1) * GLOBAL]
        if strategy.num_replicas_in_sync > 1:
            n = GLOBAL // strategy.num_replicas_in_sync
            xb, yb = (strategy.experimental_distribute_values_from_function(
                lambda ctx, a=a: tf.constant(a[ctx.replica_id_in_sync_group * n:
                                               (ctx.replica_id_in_sync_group + 1) * n]))
                for a in (xb, yb))
        step(xb, yb)
        norms.append(float(opt.last_global_norm.numpy()) if ck.is_fused(opt) else 0.0)
    # the change the steps made, in float64 (the initial weights are the same in every role)
    change = [w.numpy().astype(np.float64) - w0 for w, w0 in zip(model.trainable_weights, initial)]
    return change, norms

result = {"replicas": strategy.num_replicas_in_sync}
arrays = {}
for name, make in VARIANTS.items():
    weights, result[name + "_norms"] = train(make)
    for i, w in enumerate(weights):
        arrays[f"{name}_{i}"] = w
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(result, f)
"""


def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start(role, seed, out, tmp_path, tf_config=None):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    # started outside the repository, so that the installed clipops is imported
    return subprocess.Popen([sys.executable, str(script), role, str(seed), str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs) -> None:
    """Waits for all, each within TIMEOUT_S; kills the rest and fails with their output when
    one fails or hangs (a worker whose peer died waits on its collective)."""
    outputs, failed = [], False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            out = f"(killed after {TIMEOUT_S} s)\n{out}"
        failed |= p.returncode != 0
        outputs.append(out)
    if failed:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pytest.fail("\n---\n".join(o[-4000:] for o in outputs))


def _load(out):
    with open(str(out) + ".json") as f:
        meta = json.load(f)
    return meta, dict(np.load(str(out) + ".npz"))


def _weights(arrays, name):
    return [arrays[k] for k in sorted((k for k in arrays if k.rsplit("_", 1)[0] == name),
                                      key=lambda k: int(k.rsplit("_", 1)[1]))]


def _rel(a, b) -> float:
    a = np.concatenate([w.ravel() for w in a]).astype(np.float64)
    b = np.concatenate([w.ravel() for w in b]).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_two_workers_sum_then_clip(rng, tmp_path):
    seed = int(rng.integers(2 ** 31))
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [_start("worker", seed, tmp_path / f"worker{i}", tmp_path,
                    {"cluster": cluster, "task": {"type": "worker", "index": i}})
             for i in range(2)]
    procs.append(_start("mirrored", seed, tmp_path / "mirrored", tmp_path))
    procs.append(_start("single", seed, tmp_path / "single", tmp_path))
    _finish(procs)
    (m0, w0), (m1, w1), (mm, wm), (ms, wsingle) = (
        _load(tmp_path / n) for n in ("worker0", "worker1", "mirrored", "single"))
    assert m0["replicas"] == m1["replicas"] == mm["replicas"] == 2 and ms["replicas"] == 1
    for name in ("fused", "keras", "fused_accumulation"):
        # both workers apply the same all-reduced gradients to the same weights: the same bits
        for a, b in zip(_weights(w0, name), _weights(w1, name), strict=True):
            assert a.tobytes() == b.tobytes(), name
    norms = m0["fused_norms"]
    assert norms == m1["fused_norms"], (norms, m1["fused_norms"])
    # a valid run clips some steps and not others (global_clipnorm=1)
    assert min(norms) < 1.0 < max(norms), norms
    for name in ("fused", "fused_accumulation"):
        # Two workers of one replica each are two replicas: the same per-replica gradients
        # (one thread per kernel everywhere), and a sum of two terms is the same whichever
        # adds it (the ring's or MirroredStrategy's), so the clip after the cross-worker sum
        # gives MirroredStrategy's bits.
        for a, b in zip(_weights(w0, name), _weights(wm, name), strict=True):
            assert a.tobytes() == b.tobytes(), name
        # Against one device on the global batch: each replica's gradient sums its 128 rows
        # and the two sums are added, where one device sums 256 rows: the same terms in another
        # order, so the weights' change differs by float32 rounding only (measured ~1e-6
        # normwise over the 4 steps; 1e-4 leaves room for cancellation), where a clip before
        # the sum is off by O(1) (below).
        assert _rel(_weights(w0, name), _weights(wsingle, name)) <= 1e-4, name
    # Keras' own optimizer clips each worker's half before the sum: another update altogether
    assert _rel(_weights(w0, "keras"), _weights(wsingle, "keras")) > 0.05
