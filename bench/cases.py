"""The gradient lists the benchmarks time: the parameter shapes of real models.

One definition for every script (micro.py, health.py, gpu.py), so that a
"ResNet-50 list" means the same 161 tensors on the CPU and on a GPU. A script
picks its cases from these lists; what it does with them is its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Shape = tuple[int, ...]


def mnist_shapes() -> list[Shape]:
    """The MNIST MLP 784-512-256-10: kernels and biases, 6 tensors, 535,818 elements."""
    return [(784, 512), (512,), (512, 256), (256,), (256, 10), (10,)]


def _conv_bn(k: int, cin: int, cout: int) -> list[Shape]:
    """A bias-free conv kernel (TF's HWIO layout) and its BatchNorm gamma, beta."""
    return [(k, k, cin, cout), (cout,), (cout,)]


def _bottleneck(cin: int, mid: int, cout: int, downsample: bool) -> list[Shape]:
    shapes = _conv_bn(1, cin, mid) + _conv_bn(3, mid, mid) + _conv_bn(1, mid, cout)
    return shapes + (_conv_bn(1, cin, cout) if downsample else [])


def resnet50_shapes(width: int = 64, classes: int = 1000) -> list[Shape]:
    """torchvision's ResNet-50 parameters in model order: 161 tensors,
    25,557,032 elements at the default width (53 convs, 53 BatchNorms, fc)."""
    shapes = _conv_bn(7, 3, width)
    cin = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        mid = width * 2 ** stage
        for block in range(blocks):
            shapes += _bottleneck(cin, mid, 4 * mid, downsample=block == 0)
            cin = 4 * mid
    return shapes + [(cin, classes), (classes,)]


def _dense(n_in: int, n_out: int) -> list[Shape]:
    return [(n_in, n_out), (n_out,)]


def bert_shapes(vocab: int = 30522, hidden: int = 768, layers: int = 12,
                inner: int = 3072, positions: int = 512) -> list[Shape]:
    """BERT-base's parameters (with pooler): 199 tensors, 109,482,240 elements
    at the defaults: 3 embeddings and a LayerNorm, 16 tensors per layer."""
    layer_norm = [(hidden,), (hidden,)]
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden)] + layer_norm
    for _ in range(layers):
        shapes += _dense(hidden, hidden) * 4 + layer_norm  # q, k, v, attention output
        shapes += _dense(hidden, inner) + _dense(inner, hidden) + layer_norm
    return shapes + _dense(hidden, hidden)


def small_shapes(count: int = 10_000, max_size: int = 2048, seed: int = 1) -> list[Shape]:
    """`count` 1-D tensors with log-uniform sizes in [1, max_size)."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(0.0, math.log(max_size), count)).astype(np.int64)
    return [(int(s),) for s in sizes]


def mixed_dtypes(shapes: Sequence[Shape]) -> tuple[str, ...]:
    """float16 for kernels and weight matrices (rank >= 2), float32 otherwise:
    a mixed-precision model's gradients."""
    return tuple("float16" if len(s) >= 2 else "float32" for s in shapes)


@dataclass(frozen=True)
class Case:
    """One gradient list, and whether the benchmark's clip_norm makes it clip."""
    name: str
    description: str
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    clipping: bool = True

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * np.dtype(d).itemsize for s, d in zip(self.shapes, self.dtypes))

    @property
    def mixed(self) -> bool:
        return len(set(self.dtypes)) > 1


def case(name: str, description: str, shapes: Sequence[Shape], clipping: bool = True,
         dtypes: Sequence[str] | None = None) -> Case:
    """A Case, float32 unless `dtypes` says otherwise."""
    return Case(name, description, tuple(shapes), tuple(dtypes or ("float32",) * len(shapes)),
                clipping)
