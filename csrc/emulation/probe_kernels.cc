// Small kernels that test the emulation itself: one that uses every shuffle
// correctly (its results are checked), and broken ones that the scheduler
// must report (tests/test_emulation.py, test_detects_*). Written in the CUDA
// dialect, as the real kernels are.
#include <cooperative_groups.h>

#include "emu.h"

namespace {

// out[8 * t + k]: lane values after each kind of shuffle, for checking.
__global__ void probe_shuffles(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + 8 * t;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, 3);
  o[1] = __shfl_up_sync(0xffffffffu, lane * 10, 2);
  o[2] = __shfl_down_sync(0xffffffffu, lane * 10, 5);
  o[3] = __shfl_xor_sync(0xffffffffu, lane * 10, 6);
  o[4] = __shfl_down_sync(0xffffffffu, lane * 10, 3, 8);  // within groups of 8
  o[5] = static_cast<int>(__shfl_down_sync(0xffffffffu, 0.5 + lane, 1));  // a double
  if (lane < 16) o[6] = __shfl_xor_sync(0x0000ffffu, lane * 10, 1);  // half the warp
  __syncwarp();
  o[7] = blockIdx.x;
}

// Threads 0-31 leave; the others wait at a __syncthreads they never reach.
__global__ void probe_barrier_not_reached(int*) {
  if (threadIdx.x < 32) return;
  __syncthreads();
}

// Two halves of the block wait at two different __syncthreads.
__global__ void probe_divergent_barriers(int*) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Lanes 0-15 shuffle with the whole warp's mask while lanes 16-31 wait at
// __syncthreads: neither can complete.
__global__ void probe_deadlock(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
  __syncthreads();
}

// Lanes 0-15 shuffle with a mask of lanes 0-15, but lane 15 reads lane 16.
__global__ void probe_shuffle_outside_mask(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, lane, 1);
}

// Every lane shuffles, but the mask names lanes 0-15 only.
__global__ void probe_lane_not_in_mask(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1, 1);
}

// A grid sync: fine in a cooperative launch, an error in any other.
__global__ void probe_grid_sync(int* out) {
  cooperative_groups::this_grid().sync();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Block 1 leaves before the grid sync the others wait at.
__global__ void probe_grid_sync_skipped(int*) {
  if (blockIdx.x == 1) return;
  cooperative_groups::this_grid().sync();
}

}  // namespace

namespace clipops_emu {

struct Probe {
  const char* name;
  void (*kernel)(int*);
};

const Probe kProbes[] = {
    {"shuffles", probe_shuffles},
    {"barrier_not_reached", probe_barrier_not_reached},
    {"divergent_barriers", probe_divergent_barriers},
    {"deadlock", probe_deadlock},
    {"shuffle_outside_mask", probe_shuffle_outside_mask},
    {"lane_not_in_mask", probe_lane_not_in_mask},
    {"grid_sync", probe_grid_sync},
    {"grid_sync_skipped", probe_grid_sync_skipped},
};

void register_probe_kernels() {
  for (const Probe& p : kProbes) register_kernel(p.kernel, p.name);
}

// The probe kernel called `name`, or nullptr.
const void* probe_kernel(const std::string& name) {
  for (const Probe& p : kProbes)
    if (name == p.name) return reinterpret_cast<const void*>(p.kernel);
  return nullptr;
}

}  // namespace clipops_emu
