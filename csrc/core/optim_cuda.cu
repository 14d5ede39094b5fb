// Host launcher of the fused update (optim_kernel.cuh), CUDA runtime API: builds
// the two tables, copies them into the caller's workspace on the caller's
// stream through pinned memory, and makes one cooperative launch.
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

// clip_cuda.cu defines the clip kernel; this TU takes only its device helpers
#define CLIPOPS_KERNEL_HELPERS_ONLY
#include "optim_kernel.cuh"
#include "clipops.h"
#include "cuda_launch.h"
#include "optim_launch.h"

namespace clipops {

using detail::StateEntry;
using detail::TensorEntry;

Status update_cuda(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Status status = validate_update(params, num_tensors, args);
  if (!status.ok()) return status;
  if (workspace == nullptr || workspace_bytes < update_cuda_workspace_bytes(params, num_tensors))
    return Status::Error(
        "the CUDA workspace is missing or smaller than update_cuda_workspace_bytes()");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::Error("the CUDA workspace must be 16-byte aligned");

  // One host image of both tables (their offsets as in the workspace), one copy.
  thread_local std::vector<TensorEntry> grads;
  thread_local std::vector<StateEntry> states;
  thread_local std::vector<char> image;
  const long long items = detail::build_update_tables(params, num_tensors, &grads, &states);
  const size_t states_at = detail::update_states_offset(num_tensors);
  const size_t table_bytes = states_at + sizeof(StateEntry) * static_cast<size_t>(num_tensors);
  image.assign(table_bytes, 0);
  if (num_tensors > 0) {
    std::memcpy(image.data(), grads.data(), sizeof(TensorEntry) * num_tensors);
    std::memcpy(image.data() + states_at, states.data(), sizeof(StateEntry) * num_tensors);
  }

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return detail::cuda_error("cudaGetDevice", err);
  if (num_tensors > 0) {
    status = detail::copy_to_device_async(workspace, image.data(), table_bytes, device, stream);
    if (!status.ok()) return status;
  }
  int resident = 0;
  status = detail::max_resident_blocks<clipops_update_kernel>(device, &resident);
  if (!status.ok()) return status;

  char* base = static_cast<char*>(workspace);
  const TensorEntry* grad_table = reinterpret_cast<const TensorEntry*>(base);
  const StateEntry* state_table = reinterpret_cast<const StateEntry*>(base + states_at);
  double* partials = reinterpret_cast<double*>(base + detail::update_partials_offset(num_tensors));
  detail::UpdateParams kernel_params = detail::update_params(args);
  void* launch_args[] = {&grad_table, &state_table, &num_tensors,
                         const_cast<long long*>(&items), &partials, &kernel_params};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(clipops_update_kernel),
                                    dim3(detail::grid_size(items, resident)),
                                    dim3(detail::kThreads), launch_args, 0, stream);
  if (err != cudaSuccess) return detail::cuda_error("launching the update kernel", err);
  return Status::Ok();
}

}  // namespace clipops
