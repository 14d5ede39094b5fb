"""The TensorFlow front end's route for GPU tensors when its op has no GPU
kernel (clipops built without nvcc): the op would then run on the CPU and TF
would silently copy the tensors to the host and back. DLPack shares the
memory with clipops.cupy instead. Used by clipops/tensorflow.py only.
"""

from __future__ import annotations

import cupy
import tensorflow as tf

from .cupy import clip_by_global_norm, global_norm


def _tf_inputs(values: list) -> list[cupy.ndarray]:
    """The tensors as CuPy arrays, zero-copy. Waits for TF's
    pending GPU work first: TF computes on its own stream, which CuPy's
    stream knows nothing of."""
    if not tf.executing_eagerly():
        raise RuntimeError(
            "clipops was built without CUDA, so its TensorFlow op has no GPU kernel, and GPU "
            "tensors inside a tf.function cannot be handed to CuPy. Call it eagerly, or rebuild "
            "clipops with nvcc available (`pip install --no-build-isolation .`).")
    arrays = []
    for i, v in enumerate(values):
        if isinstance(v, tf.Variable):
            v = tf.convert_to_tensor(v)
        if "GPU" not in v.device.upper():
            raise ValueError(f"t_list[{i}] is on {v.device or 'the CPU'}; this path is for GPU tensors")
        arrays.append(v)
    tf.test.experimental.sync_devices()  # TF's producers have finished writing
    return [cupy.from_dlpack(tf.experimental.dlpack.to_dlpack(v)) for v in arrays]


def _tf_scalar(value, what: str):
    """A TF scalar tensor as a host NumPy value (the caller already waited for
    TF's GPU work, so reading it costs no extra synchronisation)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        if not value.dtype.is_floating:
            raise TypeError(f"{what} must be a float, got a {value.dtype.name} tensor")
        return value.numpy()
    return value


def _to_tf(x: cupy.ndarray):
    return tf.experimental.dlpack.from_dlpack(x.__dlpack__())


def clip_tf_tensors(values: list, clip_norm, use_norm=None):
    """clip_by_global_norm on eager TF GPU tensors through CuPy, zero-copy.

    Returns (clipped tensors in the order of `values`, the norm tensor). Both
    host waits here are deliberate: TF's stream and CuPy's are unrelated, so
    the inputs must be complete before the launch, and the results before TF
    reads them on its own stream. Not differentiable (no TF gradient is
    recorded through CuPy)."""
    arrays = _tf_inputs(values)
    with cupy.cuda.Device(arrays[0].data.device_id):
        clipped, norm = clip_by_global_norm(
            arrays, _tf_scalar(clip_norm, "clip_norm"),
            None if use_norm is None else _tf_scalar(use_norm, "use_norm"))
        cupy.cuda.get_current_stream().synchronize()
    return [_to_tf(c) for c in clipped], _to_tf(norm)


def global_norm_tf_tensors(values: list):
    """global_norm on eager TF GPU tensors through CuPy; see clip_tf_tensors."""
    arrays = _tf_inputs(values)
    with cupy.cuda.Device(arrays[0].data.device_id):
        norm = global_norm(arrays)
        cupy.cuda.get_current_stream().synchronize()
    return _to_tf(norm)
