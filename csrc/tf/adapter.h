// What the TensorFlow kernels of clipops share (the clip's,
// clip_by_global_norm_kernels.cc, and the fused update's, update_kernels.cc):
// dtype codes, scalar inputs, TF's CPU thread pool as the core's ParallelFor,
// TF's stream for the driver route, and the core's Status as TF's.
#pragma once

#include <functional>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "xla/stream_executor/stream.h"

#include "clipops.h"

namespace clipops_tf {

inline int DTypeCode(tensorflow::DataType dt) {
  switch (dt) {
    case tensorflow::DT_HALF: return clipops::kFloat16;
    case tensorflow::DT_BFLOAT16: return clipops::kBFloat16;
    case tensorflow::DT_FLOAT: return clipops::kFloat32;
    default: return clipops::kFloat64;  // the ops' attrs admit nothing else
  }
}

constexpr const char* kDTypeNames[] = {"half", "bfloat16", "float", "double"};

// A 0-d tensor's value. Holds IEEE subnormals while converting: TF runs its
// CPU kernels with DAZ set, which would read a subnormal as 0 (clipops.h).
inline double ScalarValue(const tensorflow::Tensor& t) {
  const clipops::ScopedIeeeSubnormals ieee;
  switch (t.dtype()) {
    case tensorflow::DT_HALF: return static_cast<float>(t.scalar<Eigen::half>()());
    case tensorflow::DT_BFLOAT16: return static_cast<float>(t.scalar<Eigen::bfloat16>()());
    case tensorflow::DT_FLOAT: return t.scalar<float>()();
    default: return t.scalar<double>()();
  }
}

// TF's CPU worker pool, as the core's ParallelFor.
inline clipops::ParallelFor CpuParallelFor(tensorflow::OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t items, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
    pool->ParallelFor(items, tsl::thread::ThreadPool::SchedulingParams::Adaptive(cost), fn);
  };
}

// The GPU kernel's stream (TF's compute stream of this device), for the driver route.
inline CUstream GpuStream(tensorflow::OpKernelContext* ctx) {
  return static_cast<CUstream>(
      ctx->op_device_context()->stream()->platform_specific_handle().stream);
}

// The core's Status as TF's: bad input, a GPU route that cannot run here (the
// message names the cause and the fix), or an internal failure.
inline absl::Status ToTfStatus(const clipops::Status& s) {
  switch (s.code) {
    case clipops::Status::kOk: return absl::OkStatus();
    case clipops::Status::kInvalidArgument: return absl::InvalidArgumentError(s.message);
    case clipops::Status::kUnavailable: return absl::FailedPreconditionError(s.message);
    default: return absl::InternalError(s.message);
  }
}

}  // namespace clipops_tf
