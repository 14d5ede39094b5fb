// Op definitions of the TensorFlow adapter. The kernels are in
// clip_by_global_norm_kernels.cc; the Python wrapper is clipops/tensorflow.py.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// tensor_norms: one per tensor with with_norms, else empty
absl::Status SetNormsShape(InferenceContext* c, int n, int output) {
  bool with_norms = false;
  TF_RETURN_IF_ERROR(c->GetAttr("with_norms", &with_norms));
  c->set_output(output, c->Vector(with_norms ? n : 0));
  return absl::OkStatus();
}

absl::Status ClipShape(InferenceContext* c) {
  const int n = c->num_inputs() - 3;  // t_list..., clip_norm, use_norm, unscale
  ShapeHandle scalar;
  for (int k = 0; k < 3; ++k) TF_RETURN_IF_ERROR(c->WithRank(c->input(n + k), 0, &scalar));
  for (int i = 0; i < n; ++i) c->set_output(i, c->input(i));
  c->set_output(n, c->Scalar());
  return SetNormsShape(c, n, n + 1);
}

absl::Status NormShape(InferenceContext* c) {
  c->set_output(0, c->Scalar());
  return SetNormsShape(c, c->num_inputs(), 1);
}

// t_list..., then `scalars` scalar inputs; the tensors keep their shapes
absl::Status EachShape(InferenceContext* c, int scalars) {
  const int n = c->num_inputs() - scalars;
  ShapeHandle scalar;
  for (int k = 0; k < scalars; ++k) TF_RETURN_IF_ERROR(c->WithRank(c->input(n + k), 0, &scalar));
  for (int i = 0; i < n; ++i) c->set_output(i, c->input(i));
  return absl::OkStatus();
}

}  // namespace

// Tnorm is the list's dtype, or float32 when the list mixes dtypes.
REGISTER_OP("ClipopsClipByGlobalNorm")
    .Input("t_list: T")
    .Input("clip_norm: Tnorm")
    .Input("use_norm: Tnorm")
    .Input("unscale: Tnorm")
    .Output("clipped: T")
    .Output("global_norm: Tnorm")
    .Output("tensor_norms: Tnorm")
    .Attr("T: list({half, bfloat16, float, double}) >= 1")
    .Attr("Tnorm: {half, bfloat16, float, double}")
    .Attr("use_given: bool = false")
    .Attr("with_norms: bool = false")
    .Attr("skip_nonfinite: bool = false")
    .SetShapeFn(ClipShape)
    .Doc(R"doc(
Scales every tensor of t_list by clip_norm / max(global_norm, clip_norm) in one
fused pass, with TensorFlow's clip_by_global_norm formula. When use_given is
true, use_norm replaces the computed global norm and is returned. with_norms:
tensor_norms holds each tensor's own norm (else it is empty). skip_nonfinite:
an inf or NaN norm leaves the outputs equal to the inputs (else they are NaN).
unscale: the inputs are taken as t * unscale (a loss scale's inverse; 1 for
none): the norms and the outputs are those of that list, from the one pass.
)doc");

REGISTER_OP("ClipopsGlobalNorm")
    .Input("t_list: T")
    .Output("global_norm: Tnorm")
    .Output("tensor_norms: Tnorm")
    .Attr("T: list({half, bfloat16, float, double}) >= 1")
    .Attr("Tnorm: {half, bfloat16, float, double}")
    .Attr("with_norms: bool = false")
    .SetShapeFn(NormShape)
    .Doc("sqrt of the sum of squares of every element of t_list, accumulated in float32 or better; "
         "with with_norms, tensor_norms holds each tensor's own norm (else it is empty).");

REGISTER_OP("ClipopsClipByNorm")
    .Input("t_list: T")
    .Input("clip_norm: Tnorm")
    .Output("clipped: T")
    .Output("tensor_norms: Tnorm")
    .Attr("T: list({half, bfloat16, float, double}) >= 1")
    .Attr("Tnorm: {half, bfloat16, float, double}")
    .Attr("with_norms: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(EachShape(c, 1));
      return SetNormsShape(c, c->num_inputs() - 1, c->num_inputs() - 1);
    })
    .Doc(R"doc(
tf.clip_by_norm on every tensor of t_list in one fused pass pair (one CUDA
launch): (t * clip_norm) / maximum(norm(t), clip_norm) in each tensor's dtype,
the norm accumulated in float32 or better. with_norms: tensor_norms holds each
tensor's own norm in Tnorm (else it is empty).
)doc");

REGISTER_OP("ClipopsClipByValue")
    .Input("t_list: T")
    .Input("clip_value_min: Tnorm")
    .Input("clip_value_max: Tnorm")
    .Output("clipped: T")
    .Attr("T: list({half, bfloat16, float, double}) >= 1")
    .Attr("Tnorm: {half, bfloat16, float, double}")
    .SetShapeFn([](InferenceContext* c) { return EachShape(c, 2); })
    .Doc(R"doc(
tf.clip_by_value on every tensor of t_list in one fused pass (one CUDA launch):
maximum(minimum(t, clip_value_max), clip_value_min), the bounds cast to each
tensor's dtype; a NaN element stays NaN.
)doc");
