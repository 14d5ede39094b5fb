// Host launcher of the CUDA kernel: builds the tensor table, copies it into the
// caller's workspace on the caller's stream, and makes one cooperative launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include "clip_kernel.cuh"
#include "clipops.h"

namespace clipops {
namespace {

using detail::TensorEntry;

constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

Status cuda_error(const char* what, cudaError_t err) {
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
      if (err != cudaSuccess) return cuda_error("allocating pinned memory for the tensor table", err);
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

// Resident blocks per device (cooperative launches may not exceed it), cached:
// the query costs microseconds, the launch should not.
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
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, clipops_clip_kernel,
                                                      detail::kThreads, 0);
  if (err != cudaSuccess) return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
  *blocks = std::max(1, sms * per_sm);
  if (device < kMaxDevices) cache[device].store(*blocks, std::memory_order_relaxed);
  return Status::Ok();
}

}  // namespace

bool cuda_compiled() { return true; }

size_t cuda_workspace_bytes(const TensorDesc* tensors, int num_tensors) {
  const size_t table = align16(sizeof(TensorEntry) * static_cast<size_t>(num_tensors));
  const size_t partials = sizeof(double) * static_cast<size_t>(num_work_items(tensors, num_tensors));
  return std::max<size_t>(16, table + partials);
}

Status clip_by_global_norm_cuda(const TensorDesc* tensors, int num_tensors,
                                const ClipArgs& args, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  Status status = validate(tensors, num_tensors, args);
  if (!status.ok()) return status;
  if (workspace == nullptr || workspace_bytes < cuda_workspace_bytes(tensors, num_tensors))
    return Status::Error("the CUDA workspace is missing or smaller than cuda_workspace_bytes()");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::Error("the CUDA workspace must be 16-byte aligned");

  thread_local std::vector<TensorEntry> table;
  table.resize(num_tensors);
  long long items = 0;
  for (int i = 0; i < num_tensors; ++i) {
    table[i] = TensorEntry{tensors[i].in, tensors[i].out, tensors[i].numel, items, tensors[i].dtype, 0};
    items += (tensors[i].numel + detail::kChunk - 1) / detail::kChunk;
  }
  auto* d_table = static_cast<TensorEntry*>(workspace);
  auto* d_partials = reinterpret_cast<double*>(static_cast<char*>(workspace) +
                                               align16(sizeof(TensorEntry) * num_tensors));
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error("cudaGetDevice", err);
  if (num_tensors > 0) {
    static PinnedStaging staging;
    status = staging.copy(d_table, table.data(), sizeof(TensorEntry) * num_tensors, device, stream);
    if (!status.ok()) return status;
  }

  int resident = 0;
  status = max_resident_blocks(device, &resident);
  if (!status.ok()) return status;
  const int grid = static_cast<int>(std::max<long long>(1, std::min<long long>(items, resident)));

  int num = num_tensors;
  int norm_dtype = args.norm_dtype;
  int do_scale = args.scale ? 1 : 0;
  double clip_value = args.clip_norm.value;
  const void* clip_ptr = args.clip_norm.device_ptr;
  int has_use = args.has_use_norm ? 1 : 0;
  double use_value = args.use_norm.value;
  const void* use_ptr = args.use_norm.device_ptr;
  void* norm_out = args.norm_out;
  void* params[] = {&d_table, &num, &items, &d_partials, &norm_dtype, &do_scale,
                    &clip_value, &clip_ptr, &has_use, &use_value, &use_ptr, &norm_out};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(clipops_clip_kernel), dim3(grid),
                                    dim3(detail::kThreads), params, 0, stream);
  if (err != cudaSuccess) return cuda_error("launching the clip kernel", err);
  return Status::Ok();
}

}  // namespace clipops
