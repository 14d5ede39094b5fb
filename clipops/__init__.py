"""clipops: fused global-norm gradient clipping.

One pass (one CUDA launch on a GPU) computes the global norm of a whole list of
tensors and scales every tensor, with TensorFlow's formula::

    import clipops
    grads, norm = clipops.clip_by_global_norm(grads, 15.0)  # tf.clip_by_global_norm
    norm = clipops.global_norm(grads)                        # tf.linalg.global_norm

Front ends, one core (csrc/core):
  - clipops.clip_by_global_norm / clipops.global_norm: TensorFlow op (clipops.tensorflow)
  - clipops.numpy: NumPy arrays on the CPU
  - clipops.cupy: CuPy (and any __cuda_array_interface__ / DLPack) arrays on a GPU

TensorFlow and CuPy are imported only when their front end is used; but once
both clipops and TensorFlow are imported, in either order, clipops' op is
registered with TensorFlow, so that SavedModels and graphs holding it load.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["clip_by_global_norm", "global_norm", "build_info", "__version__"]


def clip_by_global_norm(t_list, clip_norm, use_norm=None, name=None):
    """Drop-in for ``tf.clip_by_global_norm``; see clipops.tensorflow."""
    from . import tensorflow as _tf

    return _tf.clip_by_global_norm(t_list, clip_norm, use_norm=use_norm, name=name)


def global_norm(t_list, name=None):
    """Drop-in for ``tf.linalg.global_norm``; see clipops.tensorflow."""
    from . import tensorflow as _tf

    return _tf.global_norm(t_list, name=name)


def build_info() -> dict:
    """What this installation was built with, and its GPU route.

    gpu_route "nvcc": the kernel was compiled by nvcc (CUDA `cuda_version`, whose
    runtime is linked in statically) for `cuda_architectures`; the TF op's GPU
    kernel and clipops.cupy launch it. "nvrtc": nothing was compiled for the
    GPU; clipops.cupy compiles the shipped kernel source at first use with the
    NVRTC that CuPy loads, for the GPU present (so the CUDA version and the
    architecture are known only then), and the TF op has only its CPU kernel.
    """
    from . import _build_info as b

    return {"gpu_route": "nvcc" if b.WITH_CUDA else "nvrtc",
            "with_cuda": b.WITH_CUDA, "cuda_version": b.CUDA_VERSION,
            "cuda_architectures": b.CUDA_ARCHITECTURES,
            "with_tf": b.WITH_TF, "tf_version": b.TF_VERSION}


def __getattr__(name: str):
    # `clipops.numpy`, `clipops.cupy`, `clipops.tensorflow` load on first use, so
    # `import clipops` needs neither TensorFlow nor CuPy.
    if name in ("numpy", "cupy", "tensorflow"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_tf_op() -> None:
    try:
        from . import tensorflow  # noqa: F401  (loading it registers the op with TF)
    except ImportError:
        # built without the op, or for another TF: clipops' own calls raise that clearly,
        # and importing TensorFlow must not fail because of clipops
        pass


class _RegisterOpAfterTensorFlow(importlib.abc.MetaPathFinder):
    """Registers the op as soon as `import tensorflow` has run: tf.saved_model.load
    needs every op of a model registered, and `import clipops` may come first."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once only, and the search below must not find us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_tf_op()

            spec.loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


if "tensorflow" in sys.modules:
    _register_tf_op()
else:
    sys.meta_path.insert(0, _RegisterOpAfterTensorFlow())
