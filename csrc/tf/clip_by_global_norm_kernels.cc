// TensorFlow kernels of the clip ops: turn the op's tensors into core
// descriptors and call the core (csrc/core/clipops.h). The fused update's
// kernel is in update_kernels.cc; what both share, in adapter.h. CPU and GPU share everything but the last call.
// The GPU kernel takes the core's driver route (csrc/core/clip_driver.cc): the
// kernel compiled at first use by the NVRTC of TensorFlow's CUDA 12, launched
// through the driver API on TF's stream. It is registered on every build.
#include "tensorflow/core/framework/allocation_description.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

#include "adapter.h"
#include "clipops.h"
#include "kernel_cache.h"

namespace {

using tensorflow::DataType;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

using clipops_tf::DTypeCode;
using clipops_tf::kDTypeNames;
using clipops_tf::ScalarValue;

enum class Device { kCpu, kGpu };

// Large CPU outputs come from clipops' host block cache (clipops.h), as the
// NumPy front end's do. Where TF allocates with malloc (no oneDNN allocator:
// the default on CPUs without AVX-512, such as AMD EPYCs), every large output
// was a fresh mapping faulted page by page, 3,353 faults per call inside
// tf.function on a 2-core AMD EPYC (bench/results/micro_amd_epyc/README.md). A cached block is
// faulted once and reused by the next step's outputs.

// A TensorBuffer over one cached host block: returned to the cache when the
// last tensor that holds it goes.
class HostBlockBuffer : public tensorflow::TensorBuffer {
 public:
  HostBlockBuffer(void* data, size_t bytes) : TensorBuffer(data), bytes_(bytes) {}
  size_t size() const override { return bytes_; }
  TensorBuffer* root_buffer() override { return this; }
  void FillAllocationDescription(tensorflow::AllocationDescription* proto) const override {
    proto->set_requested_bytes(static_cast<int64_t>(bytes_));
    proto->set_allocated_bytes(static_cast<int64_t>(clipops::host_block_size(bytes_)));
    proto->set_allocator_name("clipops_host_cache");
  }

 private:
  ~HostBlockBuffer() override { clipops::host_block_free(data(), bytes_); }
  const size_t bytes_;
};

// Output i of the CPU kernel, shaped like input i: the input's own buffer when
// nothing else holds it, a cached host block when large, else TF's allocator.
absl::Status CpuOutputLike(OpKernelContext* ctx, const Tensor& in, int i, Tensor** out) {
  if (ctx->forward_input_to_output_with_shape(i, i, in.shape(), out)) return absl::OkStatus();
  const size_t bytes = in.TotalBytes();
  if (bytes >= clipops::kCachedOutputBytes) {
    if (void* block = clipops::host_block_alloc(bytes)) {
      ctx->set_output(i, Tensor(in.dtype(), in.shape(),
                                tensorflow::core::RefCountPtr<tensorflow::TensorBuffer>(
                                    new HostBlockBuffer(block, bytes))));
      *out = ctx->mutable_output(i);
      return absl::OkStatus();
    }
  }
  return ctx->allocate_output(i, in.shape(), out);
}

// The four ops: ClipopsClipByGlobalNorm, ClipopsGlobalNorm, ClipopsClipByNorm
// and ClipopsClipByValue. One kernel class, one core call each.
enum class Kind { kClipByGlobalNorm, kGlobalNorm, kClipByNorm, kClipByValue };

template <Device kDevice, Kind kKind>
class ClipOp : public OpKernel {
  static constexpr bool kWrites = kKind != Kind::kGlobalNorm;  // outputs 0..n-1 are tensors
  static constexpr bool kHasNorms = kKind != Kind::kClipByValue;

 public:
  explicit ClipOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    if (kKind == Kind::kClipByGlobalNorm) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("use_given", &use_given_));
      OP_REQUIRES_OK(ctx, ctx->GetAttr("skip_nonfinite", &skip_nonfinite_));
    }
    if (kHasNorms) OP_REQUIRES_OK(ctx, ctx->GetAttr("with_norms", &with_norms_));
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
    args.mode = kKind == Kind::kClipByNorm    ? clipops::kClipByNorm
                : kKind == Kind::kClipByValue ? clipops::kClipByValue
                                              : clipops::kClipByGlobalNorm;
    args.norm_dtype = clipops::norm_dtype_of(descs.data(), n);
    // The attr sizes the norm output (and types the scalars): a raw op call
    // with another Tnorm would write past a 2-byte output or misread it.
    OP_REQUIRES(ctx, tnorm_ == args.norm_dtype,
                absl::InvalidArgumentError(
                    "Tnorm must be the dtype of t_list (float32 for a list of mixed dtypes): "
                    "got Tnorm " + std::string(kDTypeNames[tnorm_]) + " for a list whose norm is " +
                    kDTypeNames[args.norm_dtype]));
    args.scale = kWrites;
    args.check_overlap = false;  // TF allocated (or forwarded) every output itself
    // the scalar inputs after t_list, and where the core takes each
    std::vector<std::pair<const char*, clipops::Scalar*>> scalars;
    if (kKind == Kind::kClipByGlobalNorm)
      scalars = {{"clip_norm", &args.clip_norm}, {"use_norm", &args.use_norm},
                 {"unscale", &args.unscale}};
    else if (kKind == Kind::kClipByNorm)
      scalars = {{"clip_norm", &args.clip_norm}};
    else if (kKind == Kind::kClipByValue)
      scalars = {{"clip_value_min", &args.clip_min}, {"clip_value_max", &args.clip_max}};
    for (size_t k = 0; k < scalars.size(); ++k) {
      const Tensor& v = ctx->input(n + static_cast<int>(k));
      OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsScalar(v.shape()),
                  absl::InvalidArgumentError(std::string(scalars[k].first) +
                                             " must be a scalar, got shape " +
                                             v.shape().DebugString()));
      if constexpr (kDevice == Device::kCpu) {
        scalars[k].second->value = ScalarValue(v);  // TF's DAZ aside (adapter.h)
      } else {
        // in device memory, read by the kernel: the host never waits for the stream
        scalars[k].second->device_ptr = v.data();
      }
    }
    args.has_use_norm = use_given_;
    if (kWrites) {
      for (int i = 0; i < n; ++i) {
        Tensor* out = nullptr;
        // reuse the gradient's buffer when nothing else holds it
        if constexpr (kDevice == Device::kCpu)
          OP_REQUIRES_OK(ctx, CpuOutputLike(ctx, inputs[i], i, &out));
        else
          OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({i}, i, inputs[i].shape(), &out));
        descs[i].out = out->data();
      }
    }
    int next = kWrites ? n : 0;  // the outputs after the tensors
    if (kKind == Kind::kClipByGlobalNorm || kKind == Kind::kGlobalNorm) {
      Tensor* norm = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(next++, {}, &norm));
      args.norm_out = norm->data();
    }
    if (kHasNorms) {
      Tensor* norms = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(next++, {with_norms_ ? n : 0}, &norms));
      args.tensor_norms = with_norms_ ? norms->data() : nullptr;
    }
    args.skip_nonfinite = skip_nonfinite_;

    clipops::Status status;
    if constexpr (kDevice == Device::kCpu) {
      status = clipops::clip_by_global_norm_cpu(descs.data(), n, args,
                                                clipops_tf::CpuParallelFor(ctx));
    } else {
      const size_t bytes = clipops::cuda_workspace_bytes(descs.data(), n);
      Tensor workspace;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8,
                                             {static_cast<int64_t>(bytes)}, &workspace));
      status = clipops::clip_by_global_norm_driver(descs.data(), n, args, workspace.data(),
                                                   bytes, clipops_tf::GpuStream(ctx));
    }
    OP_REQUIRES_OK(ctx, clipops_tf::ToTfStatus(status));
  }

 private:
  bool use_given_ = false;
  bool with_norms_ = false;
  bool skip_nonfinite_ = false;
  int tnorm_ = clipops::kFloat32;
};

// clip_norm, use_norm and the bounds stay in device memory on the GPU (a
// variable, a schedule's output): as host memory they would cost a copy that
// waits for the stream at every step.
#define CLIPOPS_REGISTER(DEVICE, DEV, T)                                                    \
  REGISTER_KERNEL_BUILDER(Name("ClipopsClipByGlobalNorm").Device(DEVICE).TypeConstraint<T>("Tnorm"), \
                          (ClipOp<DEV, Kind::kClipByGlobalNorm>));                          \
  REGISTER_KERNEL_BUILDER(Name("ClipopsGlobalNorm").Device(DEVICE).TypeConstraint<T>("Tnorm"),       \
                          (ClipOp<DEV, Kind::kGlobalNorm>));                                \
  REGISTER_KERNEL_BUILDER(Name("ClipopsClipByNorm").Device(DEVICE).TypeConstraint<T>("Tnorm"),       \
                          (ClipOp<DEV, Kind::kClipByNorm>));                                \
  REGISTER_KERNEL_BUILDER(Name("ClipopsClipByValue").Device(DEVICE).TypeConstraint<T>("Tnorm"),      \
                          (ClipOp<DEV, Kind::kClipByValue>));
#define CLIPOPS_REGISTER_BOTH(T)                                 \
  CLIPOPS_REGISTER(tensorflow::DEVICE_CPU, Device::kCpu, T)      \
  CLIPOPS_REGISTER(tensorflow::DEVICE_GPU, Device::kGpu, T)
CLIPOPS_REGISTER_BOTH(Eigen::half)
CLIPOPS_REGISTER_BOTH(Eigen::bfloat16)
CLIPOPS_REGISTER_BOTH(float)
CLIPOPS_REGISTER_BOTH(double)

}  // namespace

// Called once by clipops/tensorflow.py (ctypes) when it loads the op: where the
// GPU route finds NVRTC, the driver, the CUDA headers (include_dirs: one per
// line), the kernel sources and its disk cache (null: the default folder,
// kernel_cache::default_dir()).
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
  c.cache_dir = cache_dir != nullptr ? cache_dir : clipops::kernel_cache::default_dir();
  clipops::configure_driver_route(c);
}

// The op library's own host block cache (its copy of the core is separate from
// libclipops_core's, so it is bounded on its own, by the same
// CLIPOPS_HOST_CACHE_MB): cached, in-use and limit bytes, hits, misses.
extern "C" __attribute__((visibility("default"))) void clipops_tf_host_cache_stats(
    unsigned long long* out5) {
  const clipops::HostCacheStats s = clipops::host_cache_stats();
  out5[0] = s.cached_bytes;
  out5[1] = s.in_use_bytes;
  out5[2] = s.limit_bytes;
  out5[3] = s.hits;
  out5[4] = s.misses;
}

extern "C" __attribute__((visibility("default"))) void clipops_tf_set_host_cache_limit(
    unsigned long long bytes) {
  clipops::set_host_cache_limit(static_cast<size_t>(bytes));
}
