// The host side of a CUDA launch, shared by the two launchers of the one
// kernel (clip_kernel.cuh): clip_cuda.cu (nvcc build, CUDA runtime) and
// clip_driver.cc (NVRTC at first use, CUDA driver API: the TF op's GPU route).
// clipops/_nvrtc.py mirrors it for CuPy.
//
// The workspace holds the tensor table (16-byte aligned), then one double of
// partials per work item, then one double per tensor (kClipByNorm's norms). The grid has one block per work item, but no more
// than can be resident at once (a cooperative launch fails otherwise), and at
// least one block, which writes the norm of an empty list.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "clipops.h"

namespace clipops {
namespace detail {

constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Byte offset of the partials in the workspace.
inline size_t partials_offset(int num_tensors) {
  return align16(sizeof(TensorEntry) * static_cast<size_t>(num_tensors));
}

// Fills `table` for the list and returns the number of work items: a tensor's
// first item is the number of chunks of the tensors before it.
inline long long build_table(const TensorDesc* tensors, int num_tensors,
                             std::vector<TensorEntry>* table) {
  table->resize(num_tensors);
  long long items = 0;
  for (int i = 0; i < num_tensors; ++i) {
    (*table)[i] = TensorEntry{tensors[i].in, tensors[i].out, tensors[i].numel, items,
                              tensors[i].dtype, 0};
    items += (tensors[i].numel + kChunk - 1) / kChunk;
  }
  return items;
}

inline int grid_size(long long items, int resident_blocks) {
  return static_cast<int>(std::max<long long>(1, std::min<long long>(items, resident_blocks)));
}

// The kernel's parameters for a launch API that takes `void** params`
// (cudaLaunchCooperativeKernel, cuLaunchCooperativeKernel), in the order of
// clipops_clip_kernel's signature. Not copyable: params points into it.
struct KernelArgs {
  const TensorEntry* table;
  int num_tensors;
  long long items;
  double* partials;
  int norm_dtype;
  int do_scale;
  double clip_value;
  const void* clip_ptr;
  int has_use;
  double use_value;
  const void* use_ptr;
  void* norm_out;
  void* tensor_norms;
  int skip_nonfinite;
  int mode;
  double min_value;
  const void* min_ptr;
  double max_value;
  const void* max_ptr;
  double unscale_value;
  const void* unscale_ptr;
  void* params[21];

  KernelArgs(void* workspace, int n, long long num_items, const ClipArgs& a)
      : table(static_cast<const TensorEntry*>(workspace)),
        num_tensors(n),
        items(num_items),
        partials(reinterpret_cast<double*>(static_cast<char*>(workspace) + partials_offset(n))),
        norm_dtype(a.norm_dtype),
        do_scale(a.scale ? 1 : 0),
        clip_value(a.clip_norm.value),
        clip_ptr(a.clip_norm.device_ptr),
        has_use(a.has_use_norm ? 1 : 0),
        use_value(a.use_norm.value),
        use_ptr(a.use_norm.device_ptr),
        norm_out(a.norm_out),
        tensor_norms(a.tensor_norms),
        skip_nonfinite(a.skip_nonfinite ? 1 : 0),
        mode(a.mode),
        min_value(a.clip_min.value),
        min_ptr(a.clip_min.device_ptr),
        max_value(a.clip_max.value),
        max_ptr(a.clip_max.device_ptr),
        unscale_value(a.unscale.value),
        unscale_ptr(a.unscale.device_ptr),
        params{&table, &num_tensors, &items, &partials, &norm_dtype, &do_scale,
               &clip_value, &clip_ptr, &has_use, &use_value, &use_ptr, &norm_out,
               &tensor_norms, &skip_nonfinite, &mode, &min_value, &min_ptr, &max_value,
               &max_ptr, &unscale_value, &unscale_ptr} {}
  KernelArgs(const KernelArgs&) = delete;
  KernelArgs& operator=(const KernelArgs&) = delete;
};

// What both launchers do before touching the GPU: validate the input and the
// workspace, then fill `table` and `*items`. Nothing is written on failure.
inline Status prepare_launch(const TensorDesc* tensors, int num_tensors, const ClipArgs& args,
                             const void* workspace, size_t workspace_bytes,
                             std::vector<TensorEntry>* table, long long* items) {
  Status status = validate(tensors, num_tensors, args);
  if (!status.ok()) return status;
  if (workspace == nullptr || workspace_bytes < cuda_workspace_bytes(tensors, num_tensors))
    return Status::Error("the CUDA workspace is missing or smaller than cuda_workspace_bytes()");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::Error("the CUDA workspace must be 16-byte aligned");
  *items = build_table(tensors, num_tensors, table);
  return Status::Ok();
}

}  // namespace detail
}  // namespace clipops
