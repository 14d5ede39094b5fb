// The CUDA device language as host C++: what the clipops kernels use, so that
// their unchanged sources compile with g++ and run in the emulation's
// scheduler (csrc/emulation/runtime.cc). Included through <cuda_runtime.h>,
// as nvcc makes the device language implicit.
//
// A block runs on its own OS thread and its threads are fibers of that OS
// thread, switched only at barriers and warp operations. So `__shared__` is
// `static thread_local` (one copy per block, shared by its fibers), and
// threadIdx and friends read the fiber that is running.
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "the CUDA emulation headers are for host compilers; nvcc has the real ones"
#endif

#include <cstring>
#include <type_traits>

// ---- qualifiers --------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

// ---- vector types (CUDA's alignments, which the kernels' casts rely on) ----------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 { unsigned int x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }

namespace clipops_emu {

// Where a barrier or warp operation was called: errors name the source line.
struct Site {
  const char* file;
  int line;
};
// As default arguments, __builtin_FILE/LINE give the caller's position (GCC
// and Clang); inside a braced initializer GCC gives the callee's, hence two.
#define CLIPOPS_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

// The running fiber's coordinates (valid only inside a kernel).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Barriers: the calling fiber waits until its group arrives, or the launch
// fails with a message naming the site.
void syncthreads(Site site);
void syncwarp(unsigned int mask, Site site);
void grid_sync(Site site);

enum class Shuffle { kIdx, kUp, kDown, kXor };
// Exchanges 8 bytes between the lanes of `mask`; returns the source lane's value.
unsigned long long shuffle(Shuffle kind, unsigned int mask, unsigned long long value, int arg,
                           int width, Site site);

template <typename T>
T shuffle_as(Shuffle kind, unsigned int mask, T var, int arg, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "__shfl_*_sync moves 4- and 8-byte values");
  unsigned long long bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(kind, mask, bits, arg, width, site);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

}  // namespace clipops_emu

// ---- built-in variables ---------------------------------------------------------
#define threadIdx (::clipops_emu::thread_idx())
#define blockIdx (::clipops_emu::block_idx())
#define blockDim (::clipops_emu::block_dim())
#define gridDim (::clipops_emu::grid_dim())
constexpr int warpSize = 32;

// ---- barriers and warp operations (the site defaults to the caller's line) -------
inline void __syncthreads(CLIPOPS_EMU_SITE) { clipops_emu::syncthreads({file, line}); }
inline void __syncwarp(unsigned int mask = 0xffffffffu, CLIPOPS_EMU_SITE) {
  clipops_emu::syncwarp(mask, {file, line});
}
template <typename T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize,
              CLIPOPS_EMU_SITE) {
  return clipops_emu::shuffle_as(clipops_emu::Shuffle::kIdx, mask, var, src_lane, width, {file, line});
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                 CLIPOPS_EMU_SITE) {
  return clipops_emu::shuffle_as(clipops_emu::Shuffle::kUp, mask, var, static_cast<int>(delta), width, {file, line});
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                   CLIPOPS_EMU_SITE) {
  return clipops_emu::shuffle_as(clipops_emu::Shuffle::kDown, mask, var, static_cast<int>(delta), width, {file, line});
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize,
                  CLIPOPS_EMU_SITE) {
  return clipops_emu::shuffle_as(clipops_emu::Shuffle::kXor, mask, var, lane_mask, width, {file, line});
}

// ---- loads -------------------------------------------------------------------------
// Cache hints change nothing on one coherent host memory.
template <typename T>
T __ldcg(const T* p) { return *p; }
