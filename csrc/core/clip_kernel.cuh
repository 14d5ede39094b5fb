// The CUDA kernel: global norm and scale of a whole tensor list in ONE
// cooperative launch. Compiled by nvcc (clip_cuda.cu) and, when the package
// was built without nvcc, by NVRTC through CuPy (clipops/_nvrtc.py).
//
// Work items are (tensor, chunk) pairs of kChunk elements. Blocks stride over
// the items: phase 1 writes one partial per item into its own slot, a grid-wide
// sync follows, every block then sums the partials in the same fixed order
// (no atomics, so the result is bitwise reproducible and equals the CPU's),
// and phase 2 scales the same items. The host never waits.
#pragma once

#include <cooperative_groups.h>

#include "clip_math.h"

// CLIPOPS_TEETH_* macros break the kernel on purpose, one way each, for the
// CUDA emulation's tests (csrc/emulation, CMake CLIPOPS_EMULATION_TEETH): they
// show the tests catch such a bug. No real build defines them.

namespace clipops {
namespace detail {

// The last tensor whose first item is <= w (empty tensors own no item).
__device__ __forceinline__ int find_tensor(const TensorEntry* t, int n, long long w) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
#ifndef CLIPOPS_TEETH_FIND_TENSOR_OFF_BY_ONE
    if (t[mid].first_item <= w) lo = mid; else hi = mid - 1;
#else
    if (t[mid].first_item < w) lo = mid; else hi = mid - 1;
#endif
  }
  return lo;
}

// The halving tree of clip_math.h over the block's threads; every thread gets v[0].
__device__ __forceinline__ double block_tree(double v, double* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
#ifndef CLIPOPS_TEETH_NO_SYNCTHREADS
  __syncthreads();
#endif
  for (int s = kThreads / 2; s >= 32; s >>= 1) {
    if (tid < s) red[tid] = add_d(red[tid], red[tid + s]);
    __syncthreads();
  }
  if (tid < 32) {
    v = red[tid];
    // shfl_down(s) gives lane t the value of lane t+s: the same halving tree
    for (int s = 16; s > 0; s >>= 1) v = add_d(v, __shfl_down_sync(0xffffffffu, v, s));
    if (tid == 0) red[0] = v;
  }
  __syncthreads();
  v = red[0];
  __syncthreads();  // red is reused by the next call
  return v;
}

// Four consecutive elements (lanes 4t..4t+3) as raw storage.
template <int DT> struct Quad { typename Storage<DT>::type v[4]; };

template <int DT>
__device__ __forceinline__ Quad<DT> load_quad(const typename Storage<DT>::type* p, long long e,
                                              long long n, bool vec) {
  Quad<DT> q;
#ifndef CLIPOPS_TEETH_VECTOR_OVERRUN
  if (vec && e + 3 < n) {
#else
  if (vec && e < n) {
#endif
    if (DT == kFloat64) {
      const double2 a = *reinterpret_cast<const double2*>(p + e);
      const double2 b = *reinterpret_cast<const double2*>(p + e + 2);
      const double tmp[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
      for (int k = 0; k < 4; ++k) q.v[k] = static_cast<typename Storage<DT>::type>(tmp[k]);
    } else if (DT == kFloat32) {
      const float4 a = *reinterpret_cast<const float4*>(p + e);
      const float tmp[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) q.v[k] = static_cast<typename Storage<DT>::type>(tmp[k]);
    } else {
      const uint2 a = *reinterpret_cast<const uint2*>(p + e);
      const unsigned int tmp[2] = {a.x, a.y};
#pragma unroll
      for (int k = 0; k < 4; ++k)
        q.v[k] = static_cast<typename Storage<DT>::type>((tmp[k >> 1] >> (16 * (k & 1))) & 0xffffu);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      q.v[k] = e + k < n ? p[e + k] : static_cast<typename Storage<DT>::type>(0);
  }
  return q;
}

template <int DT>
__device__ __forceinline__ void store_quad(typename Storage<DT>::type* p, long long e,
                                           long long n, bool vec, const Quad<DT>& q) {
  if (vec && e + 3 < n) {
    if (DT == kFloat64) {
      double2* d = reinterpret_cast<double2*>(p + e);
      d[0] = make_double2(static_cast<double>(q.v[0]), static_cast<double>(q.v[1]));
      d[1] = make_double2(static_cast<double>(q.v[2]), static_cast<double>(q.v[3]));
    } else if (DT == kFloat32) {
      *reinterpret_cast<float4*>(p + e) =
          make_float4(static_cast<float>(q.v[0]), static_cast<float>(q.v[1]),
                      static_cast<float>(q.v[2]), static_cast<float>(q.v[3]));
    } else {
      unsigned int lo = static_cast<unsigned int>(q.v[0]) | (static_cast<unsigned int>(q.v[1]) << 16);
      unsigned int hi = static_cast<unsigned int>(q.v[2]) | (static_cast<unsigned int>(q.v[3]) << 16);
      *reinterpret_cast<uint2*>(p + e) = make_uint2(lo, hi);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (e + k < n) p[e + k] = q.v[k];
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Rows loaded before any is summed: enough bytes in flight to cover latency,
// few enough registers to keep several blocks per SM.
template <int DT> struct Batch { static constexpr int rows = DT == kFloat64 ? 4 : 8; };

// This thread's share of one chunk: lanes 4t..4t+3, combined as (l0+l1)+(l2+l3).
template <int DT>
__device__ __forceinline__ double thread_sumsq(const TensorEntry& te, long long begin) {
  typedef typename Storage<DT>::type T;
  typedef typename Storage<DT>::acc Acc;
  const T* p = static_cast<const T*>(te.in);
  const bool vec = aligned16(te.in);
  const long long e0 = begin + kLanesPerThread * threadIdx.x;
  Acc l[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  constexpr int B = Batch<DT>::rows;
#pragma unroll 1
  for (int r0 = 0; r0 < kRowsPerChunk; r0 += B) {
    Quad<DT> q[B];
#pragma unroll
    for (int r = 0; r < B; ++r) q[r] = load_quad<DT>(p, e0 + (long long)(r0 + r) * kLanes, te.numel, vec);
#pragma unroll
    for (int r = 0; r < B; ++r)
#pragma unroll
      for (int k = 0; k < 4; ++k) l[k] = add_square(l[k], to_acc<DT>(q[r].v[k]));
  }
  // out-of-range elements were loaded as zero: lane + 0*0 is exact, as skipping is
  return add_d(add_d(static_cast<double>(l[0]), static_cast<double>(l[1])),
               add_d(static_cast<double>(l[2]), static_cast<double>(l[3])));
}

// This thread's share of one chunk, element by element: out = op(in).
template <int DT, typename Op>
__device__ __forceinline__ void thread_map(const TensorEntry& te, long long begin, const Op& op) {
  typedef typename Storage<DT>::type T;
  const T* in = static_cast<const T*>(te.in);
  T* out = static_cast<T*>(te.out);
  const bool vec = aligned16(te.in) && aligned16(te.out);
  const long long e0 = begin + kLanesPerThread * threadIdx.x;
  constexpr int B = Batch<DT>::rows;
#pragma unroll 1
  for (int r0 = 0; r0 < kRowsPerChunk; r0 += B) {
    Quad<DT> q[B];
#pragma unroll
    for (int r = 0; r < B; ++r) q[r] = load_quad<DT>(in, e0 + (long long)(r0 + r) * kLanes, te.numel, vec);
#pragma unroll
    for (int r = 0; r < B; ++r) {
#pragma unroll
      for (int k = 0; k < 4; ++k) q[r].v[k] = op(q[r].v[k]);
      store_quad<DT>(out, e0 + (long long)(r0 + r) * kLanes, te.numel, vec, q[r]);
    }
  }
}

template <int DT>
__device__ __forceinline__ void thread_scale(const TensorEntry& te, long long begin, double scale) {
  const Scaler<DT> scaler(scale);
  // a forwarded buffer that needs no clipping is left untouched
  if (te.out == te.in && scaler.is_one()) return;
  thread_map<DT>(te, begin, scaler);
}

__device__ __forceinline__ double read_scalar(const void* ptr, double value, int dtype) {
  if (ptr == nullptr) return value;
  switch (dtype) {
    case kFloat16: return half_to_float(*static_cast<const unsigned short*>(ptr));
    case kBFloat16: return bf16_to_float(*static_cast<const unsigned short*>(ptr));
    case kFloat32: return *static_cast<const float*>(ptr);
    default: return *static_cast<const double*>(ptr);
  }
}

// Phase 1 of every norm (the clip's and the fused update's, optim_kernel.cuh):
// the partial of each work item, written to its own slot (no atomics).
__device__ __forceinline__ void write_partials(const TensorEntry* tensors, int num_tensors,
                                               long long num_items, double* partials, double* red) {
  for (long long w = blockIdx.x; w < num_items; w += gridDim.x) {
    const TensorEntry te = tensors[find_tensor(tensors, num_tensors, w)];
    const long long begin = (w - te.first_item) * kChunk;
    double v;
    switch (te.dtype) {
      case kFloat16: v = thread_sumsq<kFloat16>(te, begin); break;
      case kBFloat16: v = thread_sumsq<kBFloat16>(te, begin); break;
      case kFloat32: v = thread_sumsq<kFloat32>(te, begin); break;
      default: v = thread_sumsq<kFloat64>(te, begin);
    }
    v = block_tree(v, red);
    if (threadIdx.x == 0) partials[w] = v;
  }
}

// Each tensor's sum of squares, after the grid sync that follows write_partials:
// its own partials in the global order (thread t sums partials t, t + kThreads,
// ... of the tensor, then the tree), one block per tensor; on_tensor(t, sumsq)
// runs on thread 0. Blocks loop uniformly, so every thread reaches block_tree's
// barriers.
template <typename Fn>
__device__ __forceinline__ void each_tensor_sumsq(const TensorEntry* tensors, int num_tensors,
                                                  const double* partials, double* red,
                                                  const Fn& on_tensor) {
  for (int t = blockIdx.x; t < num_tensors; t += gridDim.x) {
    const TensorEntry te = tensors[t];
    const long long count = (te.numel + kChunk - 1) / kChunk;
    double u = 0.0;
    for (long long k = threadIdx.x; k < count; k += kThreads)
      u = add_d(u, __ldcg(partials + te.first_item + k));
    u = block_tree(u, red);
    if (threadIdx.x == 0) on_tensor(t, u);
  }
}

// The list's sum of squares, after the grid sync that follows write_partials:
// every block sums all partials in the one fixed order, so no second sync is needed.
__device__ __forceinline__ double list_sumsq(const double* partials, long long num_items,
                                             double* red) {
  double u = 0.0;
  for (long long w = threadIdx.x; w < num_items; w += kThreads) u = add_d(u, __ldcg(partials + w));
  return block_tree(u, red);
}

}  // namespace detail
}  // namespace clipops

#ifndef CLIPOPS_KERNEL_HELPERS_ONLY  // set by a TU that wants the helpers above without this kernel
// Must be launched cooperatively (all blocks resident) with kThreads threads.
// Plain scalar parameters, so CuPy's RawKernel can pass them too. mode: a
// ClipMode (clipops.h). tensor_norms: null, or num_tensors values of
// norm_dtype. The workspace's partials are followed by num_tensors doubles,
// each tensor's own norm for kClipByNorm.
extern "C" __global__ void __launch_bounds__(clipops::detail::kThreads)
clipops_clip_kernel(const clipops::detail::TensorEntry* tensors, int num_tensors,
                    long long num_items, double* partials, int norm_dtype, int do_scale,
                    double clip_value, const void* clip_ptr, int has_use_norm,
                    double use_value, const void* use_ptr, void* norm_out,
                    void* tensor_norms, int skip_nonfinite, int mode, double min_value,
                    const void* min_ptr, double max_value, const void* max_ptr,
                    double unscale_value, const void* unscale_ptr) {
  using namespace clipops;
  using namespace clipops::detail;
  __shared__ double red[kThreads];

  if (mode == kClipByValue) {  // no norm: one pass, no grid sync
    const double lo = read_scalar(min_ptr, min_value, norm_dtype);
    const double hi = read_scalar(max_ptr, max_value, norm_dtype);
    for (long long w = blockIdx.x; w < num_items; w += gridDim.x) {
      const TensorEntry te = tensors[find_tensor(tensors, num_tensors, w)];
      const long long begin = (w - te.first_item) * kChunk;
      switch (te.dtype) {
        case kFloat16: thread_map<kFloat16>(te, begin, ValueClipper<kFloat16>(lo, hi)); break;
        case kBFloat16: thread_map<kBFloat16>(te, begin, ValueClipper<kBFloat16>(lo, hi)); break;
        case kFloat32: thread_map<kFloat32>(te, begin, ValueClipper<kFloat32>(lo, hi)); break;
        default: thread_map<kFloat64>(te, begin, ValueClipper<kFloat64>(lo, hi));
      }
    }
    return;
  }
  const bool by_norm = mode == kClipByNorm;
  if (by_norm || !has_use_norm || tensor_norms != nullptr) {
    write_partials(tensors, num_tensors, num_items, partials, red);
#ifndef CLIPOPS_TEETH_NO_GRID_SYNC
    cooperative_groups::this_grid().sync();
#endif
  }
  // Each tensor's norm, from its own partials (each_tensor_sumsq).
  double* own_norms = partials + num_items;
  const double unscale = read_scalar(unscale_ptr, unscale_value, norm_dtype);  // 1: by_norm
  if (tensor_norms != nullptr || by_norm) {
    each_tensor_sumsq(tensors, num_tensors, partials, red, [&](int t, double u) {
      if (tensor_norms != nullptr)
        store_norm_at(tensor_norms, t, norm_from_sumsq(u, norm_dtype, unscale), norm_dtype);
      if (by_norm) own_norms[t] = norm_from_sumsq(u, tensors[t].dtype);  // in the tensor's dtype, as TF
    });
  }
  if (by_norm) {
#ifndef CLIPOPS_TEETH_NO_GRID_SYNC
    cooperative_groups::this_grid().sync();  // every tensor's norm is written
#endif
    const double clip = read_scalar(clip_ptr, clip_value, norm_dtype);
    for (long long w = blockIdx.x; w < num_items; w += gridDim.x) {
      const int t = find_tensor(tensors, num_tensors, w);
      const TensorEntry te = tensors[t];
      const long long begin = (w - te.first_item) * kChunk;
      const double n = __ldcg(own_norms + t);
      switch (te.dtype) {
        case kFloat16: thread_map<kFloat16>(te, begin, NormClipper<kFloat16>(clip, n)); break;
        case kBFloat16: thread_map<kBFloat16>(te, begin, NormClipper<kBFloat16>(clip, n)); break;
        case kFloat32: thread_map<kFloat32>(te, begin, NormClipper<kFloat32>(clip, n)); break;
        default: thread_map<kFloat64>(te, begin, NormClipper<kFloat64>(clip, n));
      }
    }
    return;
  }
  double norm;
  if (has_use_norm) {
    norm = read_scalar(use_ptr, use_value, norm_dtype);
  } else {
    norm = norm_from_sumsq(list_sumsq(partials, num_items, red), norm_dtype, unscale);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && norm_out != nullptr) store_norm(norm_out, norm, norm_dtype);
  if (!do_scale) return;

  const double scale = step_scale(norm, read_scalar(clip_ptr, clip_value, norm_dtype), norm_dtype,
                                  skip_nonfinite != 0, unscale);
  for (long long w = blockIdx.x; w < num_items; w += gridDim.x) {
    const TensorEntry te = tensors[find_tensor(tensors, num_tensors, w)];
    const long long begin = (w - te.first_item) * kChunk;
    switch (te.dtype) {
      case kFloat16: thread_scale<kFloat16>(te, begin, scale); break;
      case kBFloat16: thread_scale<kBFloat16>(te, begin, scale); break;
      case kFloat32: thread_scale<kFloat32>(te, begin, scale); break;
      default: thread_scale<kFloat64>(te, begin, scale);
    }
  }
}
#endif  // CLIPOPS_KERNEL_HELPERS_ONLY
