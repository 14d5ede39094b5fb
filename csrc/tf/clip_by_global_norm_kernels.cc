// TensorFlow kernels: turn the op's tensors into core descriptors and call the
// core (csrc/core/clipops.h). CPU and GPU share everything but the last call.
// The GPU kernel takes the core's driver route (csrc/core/clip_driver.cc): the
// kernel compiled at first use by the NVRTC of TensorFlow's CUDA 12, launched
// through the driver API on TF's stream. It is registered on every build.
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

#include "xla/stream_executor/stream.h"

#include "clipops.h"

namespace {

using tensorflow::DataType;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

int DTypeCode(DataType dt) {
  switch (dt) {
    case tensorflow::DT_HALF: return clipops::kFloat16;
    case tensorflow::DT_BFLOAT16: return clipops::kBFloat16;
    case tensorflow::DT_FLOAT: return clipops::kFloat32;
    default: return clipops::kFloat64;  // the op's attrs admit nothing else
  }
}

constexpr const char* kDTypeNames[] = {"half", "bfloat16", "float", "double"};

double ScalarValue(const Tensor& t) {
  switch (t.dtype()) {
    case tensorflow::DT_HALF: return static_cast<float>(t.scalar<Eigen::half>()());
    case tensorflow::DT_BFLOAT16: return static_cast<float>(t.scalar<Eigen::bfloat16>()());
    case tensorflow::DT_FLOAT: return t.scalar<float>()();
    default: return t.scalar<double>()();
  }
}

enum class Device { kCpu, kGpu };

// kClip: ClipopsClipByGlobalNorm; otherwise ClipopsGlobalNorm.
template <Device kDevice, bool kClip>
class ClipByGlobalNormOp : public OpKernel {
 public:
  explicit ClipByGlobalNormOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    if (kClip) OP_REQUIRES_OK(ctx, ctx->GetAttr("use_given", &use_given_));
    if (kClip) OP_REQUIRES_OK(ctx, ctx->GetAttr("skip_nonfinite", &skip_nonfinite_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("with_norms", &with_norms_));
    DataType tnorm;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tnorm", &tnorm));
    tnorm_ = DTypeCode(tnorm);
  }

  void Compute(OpKernelContext* ctx) override {
    tensorflow::OpInputList inputs;
    OP_REQUIRES_OK(ctx, ctx->input_list("t_list", &inputs));
    const int n = inputs.size();
    std::vector<clipops::TensorDesc> descs(n);
    for (int i = 0; i < n; ++i) {
      const Tensor& t = inputs[i];
      descs[i].in = t.data();
      descs[i].numel = t.NumElements();
      descs[i].dtype = DTypeCode(t.dtype());
    }

    clipops::ClipArgs args;
    args.norm_dtype = clipops::norm_dtype_of(descs.data(), n);
    // The attr sizes the norm output (and types clip_norm/use_norm): a raw op
    // call with another Tnorm would write past a 2-byte output or misread it.
    OP_REQUIRES(ctx, tnorm_ == args.norm_dtype,
                absl::InvalidArgumentError(
                    "Tnorm must be the dtype of t_list (float32 for a list of mixed dtypes): "
                    "got Tnorm " + std::string(kDTypeNames[tnorm_]) + " for a list whose norm is " +
                    kDTypeNames[args.norm_dtype]));
    args.scale = kClip;
    args.check_overlap = false;  // TF allocated (or forwarded) every output itself
    if (kClip) {
      const Tensor& clip = ctx->input(n);
      const Tensor& use = ctx->input(n + 1);
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(clip.shape()),
                  absl::InvalidArgumentError("clip_norm must be a scalar, got shape " +
                                             clip.shape().DebugString()));
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(use.shape()),
                  absl::InvalidArgumentError("use_norm must be a scalar, got shape " +
                                             use.shape().DebugString()));
      args.has_use_norm = use_given_;
      if constexpr (kDevice == Device::kCpu) {
        const clipops::ScopedIeeeSubnormals ieee;  // TF's DAZ would read a subnormal as 0
        args.clip_norm.value = ScalarValue(clip);
        args.use_norm.value = ScalarValue(use);
      } else {
        // in device memory, read by the kernel: the host never waits for the stream
        args.clip_norm.device_ptr = clip.data();
        args.use_norm.device_ptr = use.data();
      }
      for (int i = 0; i < n; ++i) {
        Tensor* out = nullptr;
        // reuse the gradient's buffer when nothing else holds it
        OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({i}, i, inputs[i].shape(), &out));
        descs[i].out = out->data();
      }
    }
    Tensor* norm = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(kClip ? n : 0, {}, &norm));
    args.norm_out = norm->data();
    Tensor* norms = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(kClip ? n + 1 : 1, {with_norms_ ? n : 0}, &norms));
    args.tensor_norms = with_norms_ ? norms->data() : nullptr;
    args.skip_nonfinite = skip_nonfinite_;

    clipops::Status status;
    if constexpr (kDevice == Device::kCpu) {
      auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
      clipops::ParallelFor parallel_for =
          [pool](int64_t items, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
            pool->ParallelFor(items, tsl::thread::ThreadPool::SchedulingParams::Adaptive(cost), fn);
          };
      status = clipops::clip_by_global_norm_cpu(descs.data(), n, args, parallel_for);
    } else {
      const size_t bytes = clipops::cuda_workspace_bytes(descs.data(), n);
      Tensor workspace;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8,
                                             {static_cast<int64_t>(bytes)}, &workspace));
      auto* stream = static_cast<CUstream>(
          ctx->op_device_context()->stream()->platform_specific_handle().stream);
      status = clipops::clip_by_global_norm_driver(descs.data(), n, args, workspace.data(),
                                                   bytes, stream);
    }
    OP_REQUIRES(ctx, status.code != clipops::Status::kInvalidArgument,
                absl::InvalidArgumentError(status.message));
    // the GPU route cannot run here: the message names the cause and the fix
    OP_REQUIRES(ctx, status.code != clipops::Status::kUnavailable,
                absl::FailedPreconditionError(status.message));
    OP_REQUIRES(ctx, status.ok(), absl::InternalError(status.message));
  }

 private:
  bool use_given_ = false;
  bool with_norms_ = false;
  bool skip_nonfinite_ = false;
  int tnorm_ = clipops::kFloat32;
};

#define CLIPOPS_REGISTER_CPU(T)                                                         \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("ClipopsClipByGlobalNorm").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tnorm"), \
      (ClipByGlobalNormOp<Device::kCpu, true>));                                        \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("ClipopsGlobalNorm").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("Tnorm"), \
      (ClipByGlobalNormOp<Device::kCpu, false>));
CLIPOPS_REGISTER_CPU(Eigen::half)
CLIPOPS_REGISTER_CPU(Eigen::bfloat16)
CLIPOPS_REGISTER_CPU(float)
CLIPOPS_REGISTER_CPU(double)

// clip_norm and use_norm stay in device memory (a variable, a schedule's output):
// as host memory they would cost a copy that waits for the stream at every step.
#define CLIPOPS_REGISTER_GPU(T)                                                         \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("ClipopsClipByGlobalNorm").Device(tensorflow::DEVICE_GPU).TypeConstraint<T>("Tnorm"), \
      (ClipByGlobalNormOp<Device::kGpu, true>));                                        \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("ClipopsGlobalNorm").Device(tensorflow::DEVICE_GPU).TypeConstraint<T>("Tnorm"), \
      (ClipByGlobalNormOp<Device::kGpu, false>));
CLIPOPS_REGISTER_GPU(Eigen::half)
CLIPOPS_REGISTER_GPU(Eigen::bfloat16)
CLIPOPS_REGISTER_GPU(float)
CLIPOPS_REGISTER_GPU(double)

}  // namespace

// Called once by clipops/tensorflow.py (ctypes) when it loads the op: where the
// GPU route finds NVRTC, the driver, the CUDA headers (include_dirs: one per
// line), the kernel sources and its disk cache.
extern "C" __attribute__((visibility("default"))) void clipops_tf_configure_driver(
    const char* nvrtc_library, const char* cuda_library, const char* include_dirs,
    const char* kernel_dir, const char* cache_dir) {
  clipops::DriverConfig c;
  c.nvrtc_library = nvrtc_library;
  c.cuda_library = cuda_library;
  std::string dirs = include_dirs;
  for (size_t start = 0; start < dirs.size();) {
    size_t end = dirs.find('\n', start);
    if (end == std::string::npos) end = dirs.size();
    if (end > start) c.include_dirs.push_back(dirs.substr(start, end - start));
    start = end + 1;
  }
  c.kernel_dir = kernel_dir;
  c.cache_dir = cache_dir;
  clipops::configure_driver_route(c);
}
