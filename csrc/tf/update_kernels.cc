// TensorFlow kernels of ClipopsFusedUpdate (update_ops.cc): lock the list's
// resource variables, make their buffers the op's own, and call the core once:
// update_cpu on TF's thread pool, or update_driver on TF's stream (the clip's
// driver route, clip_driver.cc), with the learning rate, the powers, the clip
// and unscale read by the GPU kernel from device memory (no host sync).
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

#include "adapter.h"
#include "clipops.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::Var;
using tensorflow::core::RefCountPtr;

enum class Device { kCpu, kGpu };

// The resource inputs' names, for messages ("momentums[3] ...").
constexpr const char* kStateNames[] = {"params", "momentums", "velocities"};

template <Device kDevice>
class FusedUpdateOp : public OpKernel {
 public:
  explicit FusedUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string rule, clip_mode;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rule", &rule));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("clip_mode", &clip_mode));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("N", &n_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Nm", &nm_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Nv", &nv_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("decay", &decay_));
    tensorflow::DataType tnorm;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tnorm", &tnorm));
    tnorm_ = clipops_tf::DTypeCode(tnorm);
    bool with_norms = false, skip = false, nesterov = false;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("with_norms", &with_norms));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("skip_nonfinite", &skip));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov));
    with_norms_ = with_norms;
    // the float attrs are float32 already: Keras' casts of the Python doubles
    OP_REQUIRES_OK(ctx, ctx->GetAttr("weight_decay", &args_.weight_decay));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("momentum", &args_.momentum));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("one_minus_beta_1", &args_.one_minus_beta_1));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("one_minus_beta_2", &args_.one_minus_beta_2));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &args_.epsilon));
    args_.rule = rule == "adam" ? clipops::kAdam : clipops::kSGD;
    args_.clip_mode = clip_mode == "global_norm" ? clipops::kClipByGlobalNorm
                      : clip_mode == "norm"      ? clipops::kClipByNorm
                      : clip_mode == "value"     ? clipops::kClipByValue
                                                 : clipops::kNoClip;
    args_.nesterov = nesterov;
    args_.skip_nonfinite = skip;
    args_.power_source = clipops::kPowersGiven;
    // TF made (or forwarded) nothing that the update writes but the norms; the
    // variables are distinct and their buffers the op's own (Compute).
    args_.check_overlap = false;
    OP_REQUIRES(ctx, static_cast<int>(decay_.size()) == n_,
                absl::InvalidArgumentError("decay has " + std::to_string(decay_.size()) +
                                           " entries for " + std::to_string(n_) + " variables"));
    const bool adam = args_.rule == clipops::kAdam;
    OP_REQUIRES(ctx, adam ? nm_ == n_ && nv_ == n_ : nv_ == 0 && (nm_ == 0 || nm_ == n_),
                absl::InvalidArgumentError(
                    adam ? "Adam takes one momentum and one velocity per variable"
                         : "SGD takes one momentum per variable (with momentum) or none, "
                           "and no velocities"));
  }

  void Compute(OpKernelContext* ctx) override {
    tensorflow::OpInputList grads;
    OP_REQUIRES_OK(ctx, ctx->input_list("grads", &grads));
    const int n = n_;
    const int num_vars = n + nm_ + nv_;

    // The variables, in input order: params, momentums, velocities.
    std::vector<RefCountPtr<Var>> vars(num_vars);
    std::vector<std::pair<Var*, int>> seen(num_vars);
    for (int k = 0; k < num_vars; ++k) {
      OP_REQUIRES_OK(ctx, tensorflow::LookupResource(
                              ctx, tensorflow::HandleFromInput(ctx, n + k), &vars[k]));
      seen[k] = {vars[k].get(), k};
    }
    // A variable passed twice would be updated twice over, in one buffer.
    std::sort(seen.begin(), seen.end());
    for (int k = 1; k < num_vars; ++k)
      OP_REQUIRES(ctx, seen[k].first != seen[k - 1].first,
                  absl::InvalidArgumentError(VarName(std::min(seen[k].second, seen[k - 1].second)) +
                                             " and " +
                                             VarName(std::max(seen[k].second, seen[k - 1].second)) +
                                             " are the same variable; pass each variable once"));
    // Locked in address order (seen is sorted by Var*, each Var owns its mutex),
    // as TF's training ops lock theirs, so that no two ops deadlock.
    std::vector<tensorflow::mutex_lock> locks;
    locks.reserve(num_vars);
    for (const auto& s : seen) locks.emplace_back(*s.first->mu());

    std::vector<clipops::ParamDesc> descs(n);
    for (int k = 0; k < num_vars; ++k) {
      const int i = k < n ? k : k < n + nm_ ? k - n : k - n - nm_;
      Var* var = vars[k].get();
      Tensor* t = var->tensor();
      OP_REQUIRES(ctx, var->is_initialized && t->IsInitialized(),
                  absl::FailedPreconditionError(VarName(k) + " is not initialized"));
      OP_REQUIRES(ctx, t->dtype() == tensorflow::DT_FLOAT,
                  absl::InvalidArgumentError(
                      VarName(k) + " is a " + tensorflow::DataTypeString(t->dtype()) +
                      " variable; the fused update takes float32 variables (Keras' "
                      "mixed-precision policies keep them float32)"));
      OP_REQUIRES(ctx, t->shape() == grads[i].shape(),
                  absl::InvalidArgumentError(VarName(k) + " has shape " +
                                             t->shape().DebugString() + ", but grads[" +
                                             std::to_string(i) + "] has " +
                                             grads[i].shape().DebugString()));
      OP_REQUIRES_OK(ctx, MakeExclusive(ctx, var));
      float* data = t->NumElements() > 0 ? t->flat<float>().data() : nullptr;
      clipops::ParamDesc& d = descs[i];
      if (k < n) {
        d.param = data;
        d.grad = grads[i].data();
        d.grad_dtype = clipops_tf::DTypeCode(grads[i].dtype());
        d.numel = grads[i].NumElements();
        d.decay = decay_[i];
      } else if (k < n + nm_) {
        d.m = data;
      } else {
        d.v = data;
      }
    }

    clipops::UpdateArgs args = args_;
    std::vector<clipops::TensorDesc> grad_dtypes(n);  // the norm dtype is the clip's
    for (int i = 0; i < n; ++i) grad_dtypes[i].dtype = descs[i].grad_dtype;
    args.norm_dtype = clipops::norm_dtype_of(grad_dtypes.data(), n);
    // The attr sizes the norm outputs and types clip and unscale.
    OP_REQUIRES(ctx, tnorm_ == args.norm_dtype,
                absl::InvalidArgumentError(
                    std::string("Tnorm must be the gradients' dtype (float32 for a list of mixed "
                                "dtypes): got Tnorm ") +
                    clipops_tf::kDTypeNames[tnorm_] + " for gradients whose norm is " +
                    clipops_tf::kDTypeNames[args.norm_dtype]));
    const int first_scalar = n + num_vars;
    clipops::Scalar* scalars[] = {&args.learning_rate, &args.beta_1_power, &args.beta_2_power,
                                  &args.clip, &args.unscale};
    static constexpr const char* kScalarNames[] = {"learning_rate", "beta_1_power",
                                                   "beta_2_power", "clip", "unscale"};
    for (int k = 0; k < 5; ++k) {
      const Tensor& v = ctx->input(first_scalar + k);
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(v.shape()),
                  absl::InvalidArgumentError(std::string(kScalarNames[k]) +
                                             " must be a scalar, got shape " +
                                             v.shape().DebugString()));
      if constexpr (kDevice == Device::kCpu)
        scalars[k]->value = clipops_tf::ScalarValue(v);
      else  // in device memory, read by the kernel: the host never waits for the stream
        scalars[k]->device_ptr = v.data();
    }

    Tensor* norm = nullptr;
    Tensor* norms = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {}, &norm));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, {with_norms_ ? n : 0}, &norms));
    args.norm_out = norm->data();
    args.tensor_norms = with_norms_ ? norms->data() : nullptr;

    clipops::Status status;
    if constexpr (kDevice == Device::kCpu) {
      status = clipops::update_cpu(descs.data(), n, args, clipops_tf::CpuParallelFor(ctx));
    } else {
      const size_t bytes = clipops::update_cuda_workspace_bytes(descs.data(), n);
      Tensor workspace;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8,
                                             {static_cast<int64_t>(bytes)}, &workspace));
      status = clipops::update_driver(descs.data(), n, args, workspace.data(), bytes,
                                      clipops_tf::GpuStream(ctx));
    }
    OP_REQUIRES_OK(ctx, clipops_tf::ToTfStatus(status));
  }

 private:
  // "params[3]" for resource input k (params, then momentums, then velocities).
  std::string VarName(int k) const {
    const int part = k < n_ ? 0 : k < n_ + nm_ ? 1 : 2;
    const int i = part == 0 ? k : part == 1 ? k - n_ : k - n_ - nm_;
    return std::string(kStateNames[part]) + "[" + std::to_string(i) + "]";
  }

  // Makes the variable's buffer this op's alone before it is written in place,
  // as TF's PrepareToUpdateVariable does: a read that aliases it (a tensor
  // still alive) keeps the old values, and the variable gets a copy. The lock
  // is held. A copy on the GPU is queued on TF's stream, before the kernel.
  static absl::Status MakeExclusive(OpKernelContext* ctx, Var* var) {
    Tensor* t = var->tensor();
    if (!var->copy_on_read_mode.load() && t->RefCountIsOne()) return absl::OkStatus();
    Tensor copy;
    tsl::AllocatorAttributes attr;
    attr.set_gpu_compatible(true);
    attr.set_nic_compatible(true);
    TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &copy, attr));
    const size_t bytes = t->TotalBytes();
    if (bytes > 0) {
      if constexpr (kDevice == Device::kCpu) {
        std::memcpy(copy.data(), t->data(), bytes);
      } else {
        stream_executor::DeviceAddressBase dst(copy.data(), bytes);
        const stream_executor::DeviceAddressBase src(t->data(), bytes);
        TF_RETURN_IF_ERROR(ctx->op_device_context()->stream()->Memcpy(&dst, src, bytes));
      }
    }
    *t = copy;
    return absl::OkStatus();
  }

  int n_ = 0, nm_ = 0, nv_ = 0;
  std::vector<bool> decay_;
  bool with_norms_ = false;
  int tnorm_ = clipops::kFloat32;
  clipops::UpdateArgs args_;  // everything from attrs; Compute adds the rest
};

// The variables' handles live in host memory on the GPU, as for TF's own
// training ops; the scalars stay on the device (read by the kernel).
#define CLIPOPS_REGISTER_UPDATE(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("ClipopsFusedUpdate").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tnorm"), \
      FusedUpdateOp<Device::kCpu>);                                                         \
  REGISTER_KERNEL_BUILDER(Name("ClipopsFusedUpdate")                                        \
                              .Device(tensorflow::DEVICE_GPU)                               \
                              .TypeConstraint<T>("Tnorm")                                   \
                              .HostMemory("params")                                         \
                              .HostMemory("momentums")                                      \
                              .HostMemory("velocities"),                                    \
                          FusedUpdateOp<Device::kGpu>);
CLIPOPS_REGISTER_UPDATE(Eigen::half)
CLIPOPS_REGISTER_UPDATE(Eigen::bfloat16)
CLIPOPS_REGISTER_UPDATE(float)

}  // namespace
