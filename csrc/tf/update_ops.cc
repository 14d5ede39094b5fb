// Op definition of the fused clip + optimizer update (the TensorFlow adapter of
// clipops.h's update_cpu / update_driver). The kernels are in update_kernels.cc;
// the Python wrappers are clipops/tensorflow.py's sgd_update, adam_update and
// adamw_update, and clipops/keras.py's fused optimizers.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

absl::Status UpdateShape(InferenceContext* c) {
  int n = 0, nm = 0, nv = 0;
  TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
  TF_RETURN_IF_ERROR(c->GetAttr("Nm", &nm));
  TF_RETURN_IF_ERROR(c->GetAttr("Nv", &nv));
  ShapeHandle scalar;
  // learning_rate, beta_1_power, beta_2_power, clip, unscale
  for (int k = 0; k < 5; ++k)
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2 * n + nm + nv + k), 0, &scalar));
  bool with_norms = false;
  TF_RETURN_IF_ERROR(c->GetAttr("with_norms", &with_norms));
  c->set_output(0, c->Scalar());
  c->set_output(1, c->Vector(with_norms ? n : 0));
  return absl::OkStatus();
}

}  // namespace

// One op for the whole list: grads[i] updates the float32 variable params[i]
// (and its state momentums[i], velocities[i]). Tnorm is the gradients' dtype,
// or float32 for a list of mixed dtypes; it types clip, unscale and the norms.
REGISTER_OP("ClipopsFusedUpdate")
    .Input("grads: T")
    .Input("params: N * resource")
    .Input("momentums: Nm * resource")
    .Input("velocities: Nv * resource")
    .Input("learning_rate: float")
    .Input("beta_1_power: float")
    .Input("beta_2_power: float")
    .Input("clip: Tnorm")
    .Input("unscale: Tnorm")
    .Output("global_norm: Tnorm")
    .Output("tensor_norms: Tnorm")
    .Attr("T: list({half, bfloat16, float}) >= 1")
    .Attr("N: int >= 1")
    .Attr("Nm: int >= 0")
    .Attr("Nv: int >= 0")
    .Attr("Tnorm: {half, bfloat16, float}")
    .Attr("rule: {'sgd', 'adam'}")
    .Attr("clip_mode: {'global_norm', 'norm', 'value', 'none'} = 'none'")
    .Attr("decay: list(bool)")
    .Attr("weight_decay: float = 0")
    .Attr("momentum: float = 0")
    .Attr("nesterov: bool = false")
    .Attr("one_minus_beta_1: float = 0")
    .Attr("one_minus_beta_2: float = 0")
    .Attr("epsilon: float = 0")
    .Attr("skip_nonfinite: bool = false")
    .Attr("with_norms: bool = false")
    .SetIsStateful()
    .SetShapeFn(UpdateShape)
    .Doc(R"doc(
The clip (clip_mode: clip_by_global_norm, clip_by_norm or clip_by_value(g,
-clip, clip) of clipops, or none) and Keras 3's weight decay and update_step in
one op over a list of float32 resource variables, in place: rule 'sgd' (with
momentum when Nm == N; nesterov) or 'adam' (Nm == Nv == N; AdamW is 'adam' with
weight decay). Every scalar is a float32 as Keras makes it: weight_decay,
momentum, epsilon and one_minus_beta_1/2 (float32(1 - beta) of the double) are
attrs; learning_rate and beta_1_power, beta_2_power (beta^t as Keras' tf.pow
gives it) are inputs, read on the device. decay[i]: weight decay applies to
params[i]. unscale (global_norm and none only): the gradients are taken as
g * unscale. skip_nonfinite: a non-finite global norm writes nothing.
global_norm: the norm of the gradients (times unscale) before the clip;
tensor_norms: each one's own with with_norms, else empty. The variables are
locked, and copied first if a read still holds their buffer, as TF's
ResourceApplyAdam does.
)doc");
