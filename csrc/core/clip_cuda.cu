// Host launcher of the CUDA kernel: builds the tensor table, copies it into the
// caller's workspace on the caller's stream, and makes one cooperative launch.
#include <cuda_runtime.h>

#include <vector>

#include "clip_kernel.cuh"
#include "clip_launch.h"
#include "clipops.h"
#include "cuda_launch.h"

namespace clipops {

using detail::TensorEntry;

bool cuda_compiled() { return true; }

Status clip_by_global_norm_cuda(const TensorDesc* tensors, int num_tensors,
                                const ClipArgs& args, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  thread_local std::vector<TensorEntry> table;
  long long items = 0;
  Status status = detail::prepare_launch(tensors, num_tensors, args, workspace, workspace_bytes,
                                         &table, &items);
  if (!status.ok()) return status;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return detail::cuda_error("cudaGetDevice", err);
  if (num_tensors > 0) {
    status = detail::copy_to_device_async(workspace, table.data(), sizeof(TensorEntry) * num_tensors,
                                          device, stream);
    if (!status.ok()) return status;
  }

  int resident = 0;
  status = detail::max_resident_blocks<clipops_clip_kernel>(device, &resident);
  if (!status.ok()) return status;
  detail::KernelArgs kernel_args(workspace, num_tensors, items, args);
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(clipops_clip_kernel),
                                    dim3(detail::grid_size(items, resident)),
                                    dim3(detail::kThreads), kernel_args.params, 0, stream);
  if (err != cudaSuccess) return detail::cuda_error("launching the clip kernel", err);
  return Status::Ok();
}

}  // namespace clipops
