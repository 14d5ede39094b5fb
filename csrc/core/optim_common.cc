// Host-side pieces of the fused update shared by its CPU kernel and its CUDA
// launcher: validation and the workspace size (built with and without CUDA).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "clipops.h"
#include "optim_launch.h"
#include "overlap.h"

namespace clipops {

namespace {

using detail::MemRange;
using detail::mem_range;

// A tensor's buffers (MemRange::part), and the scalars' owners (negative).
enum Part { kParam = 0, kGrad = 1, kM = 2, kV = 3 };
constexpr int kClipOwner = -1, kUnscaleOwner = -2, kLrOwner = -3, kPow1Owner = -4,
              kPow2Owner = -5, kIterOwner = -6, kNormOutOwner = -7, kTensorNormsOwner = -8;

std::string label(const MemRange& r) {
  switch (r.owner) {
    case kClipOwner: return "clip";
    case kUnscaleOwner: return "unscale";
    case kLrOwner: return "learning_rate";
    case kPow1Owner: return "beta_1_power";
    case kPow2Owner: return "beta_2_power";
    case kIterOwner: return "iterations";
    case kNormOutOwner: return "norm_out";
    case kTensorNormsOwner: return "tensor_norms";
    default: break;
  }
  static const char* const parts[] = {"param", "grad", "m", "v"};
  return "tensor " + std::to_string(r.owner) + "'s " + parts[r.part];
}

std::string where(int i) { return "tensor " + std::to_string(i) + ": "; }

bool finite_positive(double x) {
  return x > 0.0 && x < std::numeric_limits<double>::infinity();
}

bool misaligned(const void* p, size_t size) { return reinterpret_cast<uintptr_t>(p) % size != 0; }

}  // namespace

Status validate_update(const ParamDesc* params, int num_tensors, const UpdateArgs& args) {
  if (num_tensors < 0) return Status::Error("the number of tensors is negative");
  if (num_tensors > 0 && params == nullptr) return Status::Error("the parameter list is null");
  if (args.rule != kSGD && args.rule != kAdam)
    return Status::Error("unknown update rule " + std::to_string(args.rule));
  if (args.clip_mode != kClipByGlobalNorm && args.clip_mode != kClipByNorm &&
      args.clip_mode != kClipByValue && args.clip_mode != kNoClip)
    return Status::Error("unknown clip mode " + std::to_string(args.clip_mode));
  if (args.power_source != kPowersGiven && args.power_source != kPowersFromStep)
    return Status::Error("unknown power source " + std::to_string(args.power_source));

  // ---- host scalars: the ranges Keras allows ----
  const bool clips = args.clip_mode != kNoClip;
  if (clips && args.clip.device_ptr == nullptr && !finite_positive(args.clip.value))
    return Status::Error("the clip threshold must be a finite number > 0 (Keras clips only then), "
                         "got " + std::to_string(args.clip.value));
  const bool unscales = args.unscale.device_ptr != nullptr || args.unscale.value != 1.0;
  if (unscales && args.clip_mode != kClipByGlobalNorm && args.clip_mode != kNoClip)
    return Status::Error("unscale is for the global-norm clip and for no clip only (it must be 1 "
                         "with clipnorm and clipvalue)");
  if (args.unscale.device_ptr == nullptr && !finite_positive(args.unscale.value))
    return Status::Error("unscale must be a finite number > 0, got " +
                         std::to_string(args.unscale.value));
  const bool adam = args.rule == kAdam;
  const bool from_step = adam && args.power_source == kPowersFromStep;
  if (args.iterations.ptr == nullptr && args.iterations.value < 0)
    return Status::Error("iterations must be >= 0 (this step is iterations + 1), got " +
                         std::to_string(args.iterations.value));
  if (args.iterations.increment && args.iterations.ptr == nullptr)
    return Status::Error("incrementing the step counter needs its pointer (StepCounter::ptr)");

  // ---- the list ----
  const bool needs_m = adam || args.momentum != 0.0f;
  for (int i = 0; i < num_tensors; ++i) {
    const ParamDesc& p = params[i];
    if (p.grad_dtype != kFloat32 && p.grad_dtype != kFloat16 && p.grad_dtype != kBFloat16)
      return Status::Error(where(i) + "unsupported gradient dtype code " +
                           std::to_string(p.grad_dtype) +
                           " (float32, float16 and bfloat16 gradients of float32 variables are "
                           "supported)");
    if (p.numel < 0) return Status::Error(where(i) + "negative element count");
    if (needs_m != (p.m != nullptr) && (p.numel > 0 || !needs_m))
      return Status::Error(where(i) + (needs_m
                                           ? "m (the first moment or momentum) is missing"
                                           : "m is given, but SGD without momentum keeps none"));
    if (adam != (p.v != nullptr) && (p.numel > 0 || !adam))
      return Status::Error(where(i) + (adam ? "v (Adam's second moment) is missing"
                                            : "v is given, but SGD keeps none"));
    if (p.numel == 0) continue;
    if (p.param == nullptr) return Status::Error(where(i) + "null parameter pointer");
    if (p.grad == nullptr) return Status::Error(where(i) + "null gradient pointer");
    // Element-aligned data only: a GPU faults on a misaligned access (ending its
    // context), and C++ gives such access no meaning.
    if (misaligned(p.param, 4) || misaligned(p.m, 4) || misaligned(p.v, 4) ||
        misaligned(p.grad, static_cast<size_t>(detail::dtype_size(p.grad_dtype))))
      return Status::Error(where(i) + "a buffer is not aligned to its elements; copy it to an "
                           "aligned array first");
  }

  std::vector<TensorDesc> grads = detail::grad_descs(params, num_tensors);
  if (args.norm_dtype != norm_dtype_of(grads.data(), num_tensors))
    return Status::Error(
        "the norm dtype must be the gradients' dtype, or float32 for a mixed list");

  // ---- overlaps: nothing written may share memory with anything else ----
  const size_t norm_bytes = static_cast<size_t>(detail::dtype_size(args.norm_dtype));
  std::vector<MemRange> ranges;
  auto scalar = [&](const void* p, size_t bytes, int owner, bool written) {
    if (p != nullptr) ranges.push_back(mem_range(p, bytes, owner, 0, written));
  };
  if (clips) scalar(args.clip.device_ptr, norm_bytes, kClipOwner, false);
  scalar(args.unscale.device_ptr, norm_bytes, kUnscaleOwner, false);
  scalar(args.learning_rate.device_ptr, 4, kLrOwner, false);
  if (adam && !from_step) {
    scalar(args.beta_1_power.device_ptr, 4, kPow1Owner, false);
    scalar(args.beta_2_power.device_ptr, 4, kPow2Owner, false);
  }
  scalar(args.iterations.ptr, 8, kIterOwner, args.iterations.increment);
  scalar(args.norm_out, norm_bytes, kNormOutOwner, true);
  scalar(args.tensor_norms, norm_bytes * static_cast<size_t>(num_tensors), kTensorNormsOwner, true);
  if (args.check_overlap) {
    for (int i = 0; i < num_tensors; ++i) {
      const ParamDesc& p = params[i];
      const size_t n = static_cast<size_t>(p.numel);
      ranges.push_back(mem_range(p.param, 4 * n, i, kParam, true));
      ranges.push_back(mem_range(p.grad, n * detail::dtype_size(p.grad_dtype), i, kGrad, false));
      if (p.m != nullptr) ranges.push_back(mem_range(p.m, 4 * n, i, kM, true));
      if (p.v != nullptr) ranges.push_back(mem_range(p.v, 4 * n, i, kV, true));
    }
  }
  MemRange a, b;
  if (detail::find_written_overlap(std::move(ranges), &a, &b))
    return Status::Error(label(a) + " and " + label(b) +
                         " share memory that the update writes; pass each buffer once");
  return Status::Ok();
}

size_t update_cuda_workspace_bytes(const ParamDesc* params, int num_tensors) {
  int64_t items = 0;
  for (int i = 0; i < num_tensors; ++i)
    items += (params[i].numel + detail::kChunk - 1) / detail::kChunk;
  const size_t doubles = static_cast<size_t>(items) + static_cast<size_t>(num_tensors);
  return std::max<size_t>(16,
                          detail::update_partials_offset(num_tensors) + sizeof(double) * doubles);
}

#if !defined(CLIPOPS_WITH_CUDA)
Status update_cuda(const ParamDesc* params, int num_tensors, const UpdateArgs& args, void*, size_t,
                   cudaStream_t) {
  // bad input is reported as such on every build, as by the real launcher
  Status status = validate_update(params, num_tensors, args);
  if (!status.ok()) return status;
  return Status::Runtime("clipops was built without CUDA (nvcc was not found at build time)");
}
#endif

}  // namespace clipops
