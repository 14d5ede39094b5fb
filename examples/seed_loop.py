"""The classic gradient-clipping training loop, with clipops' one-line swap.

The MNIST MLP of the tutorial clipops grew from (784-512-256-10, ReLU, MSE on one-hot labels,
SGD at learning rate 0.1, batch 256, the gradients clipped to a global norm of 15), printing
each gradient's norm before and after the clip, as people do to watch for vanishing and
exploding gradients. The one change from the tutorial is the clip:

    grads, norm = tf.clip_by_global_norm(grads, 15)          # before
    grads, norm = clipops.clip_by_global_norm(grads, 15)     # after

The tutorial downloads MNIST; to run anywhere (offline too) this example trains on random
MNIST-shaped data, whose first steps explode and get clipped just as the real digits' do. Pass
your own (x, y) to train() to use real data.

    python examples/seed_loop.py [--steps N]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import clipops  # noqa: E402


def random_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n MNIST-shaped samples: pixels in [0, 1) of shape (n, 784), one-hot labels (n, 10)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    return x, y


def train(x: np.ndarray, y: np.ndarray, steps: int) -> list[float]:
    """The tutorial's loop; returns each step's global gradient norm before clipping."""
    tf.random.set_seed(0)
    w1 = tf.Variable(tf.random.truncated_normal([784, 512], stddev=0.1))
    b1 = tf.Variable(tf.zeros([512]))
    w2 = tf.Variable(tf.random.truncated_normal([512, 256], stddev=0.1))
    b2 = tf.Variable(tf.zeros([256]))
    w3 = tf.Variable(tf.random.truncated_normal([256, 10], stddev=0.1))
    b3 = tf.Variable(tf.zeros([10]))
    variables = [w1, b1, w2, b2, w3, b3]
    optimizer = tf.keras.optimizers.SGD(learning_rate=0.1)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(256).repeat()

    norms = []
    for step, (xb, yb) in enumerate(batches.take(steps)):
        with tf.GradientTape() as tape:
            h1 = tf.nn.relu(xb @ w1 + b1)
            h2 = tf.nn.relu(h1 @ w2 + b2)
            out = h2 @ w3 + b3
            loss = tf.reduce_mean(tf.square(yb - out))
        grads = tape.gradient(loss, variables)
        before = [float(tf.norm(g)) for g in grads]

        grads, norm = clipops.clip_by_global_norm(grads, 15)  # the one-line swap

        after = [float(tf.norm(g)) for g in grads]
        optimizer.apply_gradients(zip(grads, variables))
        norms.append(float(norm))
        clipped = "clipped" if float(norm) > 15 else "not clipped"
        print(f"step {step}: loss {float(loss):.4f}, global norm {float(norm):.3f} ({clipped})")
        print("  before: " + " ".join(f"{n:8.4f}" for n in before))
        print("  after:  " + " ".join(f"{n:8.4f}" for n in after))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    args = parser.parse_args()
    x, y = random_mnist(256 * 8)
    train(x, y, args.steps)


if __name__ == "__main__":
    main()
