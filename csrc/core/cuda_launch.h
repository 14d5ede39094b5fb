// Runtime-API helpers of the CUDA launchers (clip_cuda.cu, optim_cuda.cu): the
// table's copy through pinned memory, and the resident blocks per device that
// bound a cooperative grid. Included only by files that nvcc (or the CUDA
// emulation) compiles.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "clip_math.h"
#include "clipops.h"

namespace clipops {
namespace detail {

inline Status cuda_error(const char* what, cudaError_t err) {
  return Status::Runtime(std::string(what) + ": " + cudaGetErrorString(err));
}

// Pinned buffers for the tensor table. A copy from pageable memory may wait for
// the stream, so the table is staged in pinned memory instead, and a buffer is
// reused only once an event says its last copy is done: cudaEventQuery never
// blocks, so the host never waits. The pool grows with the calls in flight.
class PinnedStaging {
 public:
  // Copies `bytes` from `src` to device `dst` on `stream` through a free buffer.
  Status copy(void* dst, const void* src, size_t bytes, int device, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    Block* block = nullptr;
    for (Block& b : blocks_)
      if (b.device == device && b.bytes >= bytes && cudaEventQuery(b.done) == cudaSuccess) {
        block = &b;
        break;
      }
    if (block == nullptr) {
      Block b{nullptr, std::max<size_t>(bytes, 64 << 10), nullptr, device};
      cudaError_t err = cudaHostAlloc(&b.ptr, b.bytes, cudaHostAllocDefault);
      if (err != cudaSuccess)
        return cuda_error("allocating pinned memory for the tensor table", err);
      err = cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming);
      if (err != cudaSuccess) {
        cudaFreeHost(b.ptr);
        return cuda_error("creating an event", err);
      }
      blocks_.push_back(b);
      block = &blocks_.back();
    }
    std::memcpy(block->ptr, src, bytes);
    cudaError_t err = cudaMemcpyAsync(dst, block->ptr, bytes, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return cuda_error("copying the tensor table", err);
    err = cudaEventRecord(block->done, stream);
    if (err != cudaSuccess) return cuda_error("recording the table copy", err);
    return Status::Ok();
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
    cudaEvent_t done;
    int device;
  };
  std::mutex mu_;
  std::vector<Block> blocks_;  // never freed: reused for the life of the process
};

// Copies a host table to the device on `stream` through the one process-wide
// pool of pinned buffers (an inline function's static: one pool for every launcher).
inline Status copy_to_device_async(void* dst, const void* src, size_t bytes, int device,
                                   cudaStream_t stream) {
  static PinnedStaging staging;
  return staging.copy(dst, src, bytes, device, stream);
}

// Resident blocks of `Kernel` (kThreads threads each) per device: cooperative
// launches may not exceed it. Cached per kernel and device: the query costs
// microseconds, the launch should not.
template <auto Kernel>
Status max_resident_blocks(int device, int* blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not yet known
  cudaError_t err;
  if (device < kMaxDevices && (*blocks = cache[device].load(std::memory_order_relaxed)) > 0)
    return Status::Ok();
  int sms = 0, per_sm = 0, coop = 0;
  if ((err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device)) != cudaSuccess)
    return cuda_error("cudaDeviceGetAttribute", err);
  if (!coop) return Status::Runtime("this GPU does not support cooperative launches");
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return cuda_error("cudaDeviceGetAttribute", err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0);
  if (err != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
  *blocks = std::max(1, sms * per_sm);
  if (device < kMaxDevices) cache[device].store(*blocks, std::memory_order_relaxed);
  return Status::Ok();
}

}  // namespace detail
}  // namespace clipops
