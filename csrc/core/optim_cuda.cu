// Host launcher of the fused update (optim_kernel.cuh), CUDA runtime API: builds
// the two tables, copies them into the caller's workspace on the caller's
// stream through pinned memory, and makes one cooperative launch.
#include <cuda_runtime.h>

#include <vector>

// clip_cuda.cu defines the clip kernel; this TU takes only its device helpers
#define CLIPOPS_KERNEL_HELPERS_ONLY
#include "optim_kernel.cuh"
#include "clipops.h"
#include "cuda_launch.h"
#include "optim_launch.h"

namespace clipops {

Status update_cuda(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  // One host image of both tables (their offsets as in the workspace), one copy.
  thread_local std::vector<char> image;
  long long items = 0;
  Status status = detail::prepare_update_launch(params, num_tensors, args, workspace,
                                                workspace_bytes, &image, &items);
  if (!status.ok()) return status;

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return detail::cuda_error("cudaGetDevice", err);
  if (num_tensors > 0) {
    status = detail::copy_to_device_async(workspace, image.data(), image.size(), device, stream);
    if (!status.ok()) return status;
  }
  int resident = 0;
  status = detail::max_resident_blocks<clipops_update_kernel>(device, &resident);
  if (!status.ok()) return status;

  detail::UpdateKernelArgs kernel_args(workspace, num_tensors, items, args);
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(clipops_update_kernel),
                                    dim3(detail::grid_size(items, resident)),
                                    dim3(detail::kThreads), kernel_args.params, 0, stream);
  if (err != cudaSuccess) return detail::cuda_error("launching the update kernel", err);
  return Status::Ok();
}

}  // namespace clipops
