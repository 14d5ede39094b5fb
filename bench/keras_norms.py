#!/usr/bin/env python
"""What clipops.keras.GlobalNormLogger draws: the gradient norms of each model.fit step.

Trains bench/mnist.py's Keras recipe (Dense 512-256-10 ReLU, softmax cross-entropy, Adam 1e-3,
batch 256) with clipops.keras.fused(Adam(global_clipnorm=1.0)) and the logger, reads the
TensorBoard event file back (no tensorboard package needed), and writes the series (the global
norm and each layer's, gradient_norm/<variable path>) to keras_norms.json and the plot, drawn
from that file, to keras_norms.png (bench/out/, or --out).

    python bench/keras_norms.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import OUT, import_tensorflow, machine_info, wants_verbose, write_json
from report import pyplot, save

tf, _ = import_tensorflow(verbose=wants_verbose(__name__))
import keras  # noqa: E402
from tensorflow.core.util import event_pb2  # noqa: E402

import clipops.keras as ck  # noqa: E402
import mnist_data  # noqa: E402

CLIP = 1.0
TAG = "global_gradient_norm"
LAYER_TAG = "gradient_norm/"


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files under log_dir."""
    out: dict[str, list] = {}
    for name in sorted(os.listdir(log_dir)):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
    return out


def train(data: mnist_data.MnistData, epochs: int, seed: int, log_dir: str) -> None:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=ck.fused(keras.optimizers.Adam(1e-3, global_clipnorm=CLIP)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.x_train, data.y_train, batch_size=256, epochs=epochs, verbose=0,
              callbacks=[ck.GlobalNormLogger(log_dir)])


def plot(result: dict, path: Path) -> Path:
    """The global norm over the steps with the clip line, and each layer's norm."""
    steps, norms = zip(*result["series"])
    fig, (ax, bx) = pyplot().subplots(2, 1, figsize=(7, 6), sharex=True)
    ax.semilogy(steps, norms, lw=1, label=f"{TAG} (GlobalNormLogger)")
    ax.axhline(result["clip"], color="k", ls="--", lw=1, label=f"global_clipnorm = {result['clip']:g}")
    ax.set_ylabel("global gradient norm")
    ax.set_title("model.fit, clipops.keras.fused(Adam(1e-3, global_clipnorm=1.0))", fontsize=9)
    ax.legend(fontsize=8)
    for tag, series in result["layers"].items():
        s, v = zip(*series)
        bx.semilogy(s, v, lw=0.8, label=tag[len(LAYER_TAG):])
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("per-layer gradient norm")
    bx.legend(fontsize=7, ncol=2)
    return save(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=mnist_data.SOURCES, default="auto")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log")
    args = ap.parse_args(argv)
    try:
        data = mnist_data.load(args.data, seed=args.seed)
    except mnist_data.DataUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as log_dir:
        train(data, args.epochs, args.seed, log_dir)
        scalars = read_scalars(os.path.join(log_dir, "train"))
    series = scalars.get(TAG, [])
    layers = {t: v for t, v in sorted(scalars.items()) if t.startswith(LAYER_TAG)}
    steps = list(range(1, len(series) + 1))
    if not steps or any([s for s, _ in v] != steps for v in [series, *layers.values()]) \
            or len(layers) != 6:
        print("error: the logger did not write one global and 6 layer norms per step",
              file=sys.stderr)
        return 1
    # the layers' norms are parts of the global one: their root sum of squares is it
    per_layer = np.array([[v for _, v in s] for s in layers.values()], np.float64)
    rss = np.sqrt(np.sum(np.square(per_layer), axis=0))
    worst = float(np.max(np.abs(rss / np.array([v for _, v in series]) - 1)))
    # The kernel sums the same chunk partials into each layer's norm and the global one, in
    # float64, and rounds each norm once to float32: they agree to a few u = 6e-8 (1e-5 is loose)
    if worst > 1e-5:
        print(f"error: the layer norms do not add up to the global one ({worst:.2g})",
              file=sys.stderr)
        return 1
    out_dir = args.out or OUT
    result = {**machine_info(), "data": data.summary(), "clip": CLIP, "epochs": args.epochs,
              "clipped_steps": sum(v > CLIP for _, v in series), "series": series,
              "layers": layers, "layers_vs_global_max_rel": worst}
    path = write_json("keras_norms", result, out_dir)
    print(f"{len(series)} steps, {result['clipped_steps']} over the clip; {path}, "
          f"{plot(json.loads(path.read_text()), out_dir / 'keras_norms.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
