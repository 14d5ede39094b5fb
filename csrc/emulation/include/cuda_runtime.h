// The CUDA emulation's <cuda_runtime.h>: the runtime API the clipops launcher
// (csrc/core/clip_cuda.cu) calls, implemented by a fake runtime on the host
// (csrc/emulation/runtime.cc), and no more. "Device memory" is host memory;
// work queued on a stream runs when the host synchronizes (clipops_emu::
// synchronize), so a launcher that reused a staging buffer before its copy
// ran would be caught.
#pragma once

#include <cstddef>

#include "emu_device.h"

typedef struct CUstream_st* cudaStream_t;  // as in clipops.h and the real runtime
typedef struct CUevent_st* cudaEvent_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
  cudaErrorInvalidDeviceFunction = 98,
};

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrCooperativeLaunch = 95,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

#define cudaHostAllocDefault 0x00u
#define cudaEventDisableTiming 0x02u

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int flags);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);

cudaError_t cudaStreamCreate(cudaStream_t* stream);

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventQuery(cudaEvent_t event);

cudaError_t cudaLaunchKernel(const void* func, dim3 grid, dim3 block, void** args,
                             size_t shared_mem, cudaStream_t stream);
cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args,
                                        size_t shared_mem, cudaStream_t stream);

namespace clipops_emu {
cudaError_t max_active_blocks(int* blocks, const void* func, int block_size, size_t shared_mem);
}
// A template in the real runtime too: it takes the kernel itself.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel func, int block_size,
                                                          size_t shared_mem) {
  return clipops_emu::max_active_blocks(blocks, reinterpret_cast<const void*>(func), block_size,
                                        shared_mem);
}
