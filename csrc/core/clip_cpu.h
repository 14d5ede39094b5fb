// The CPU kernel's walk over work items and its norm pass, shared by the clip
// (clip_cpu.cc) and the fused optimizer update (optim_cpu.cc): one
// implementation, so both follow the reduction order of clip_math.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "clipops.h"

// AVX2 clones of the element loops, picked at load time where the CPU has it:
// the ops are IEEE ops without FMA, so every clone gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLIPOPS_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLIPOPS_SIMD_CLONES
#endif

namespace clipops {
namespace detail {

// Lists below this many elements run on the calling thread: handing shards to a
// pool whose workers are busy with the rest of a training step costs more than
// one core needs for them (bench/mnist.py: 0.3 ms in a 4 ms step, against
// 0.01 ms inline, for the 535,818-element MNIST gradients).
constexpr int64_t kParallelMinElements = int64_t(1) << 20;

// Asks for the first kPrefetchBytes of a work item's input to be loaded. A
// list of many small tensors is many short, scattered reads, each too short
// for the hardware prefetcher to ramp up on: without this the norm pass over
// 10,000 tensors of ~1 KB read at a tenth of the copy bandwidth.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch_input(const TensorDesc& t, int64_t offset, int64_t count) {
  const int64_t size = dtype_size(t.dtype);
  const char* p = static_cast<const char*>(t.in) + offset * size;
  const int64_t bytes = std::min(count * size, kPrefetchBytes);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// Calls fn(tensor, first element, count) for every work item in [begin, end),
// with the next item's input prefetched meanwhile.
template <typename Fn>
void for_items(const TensorDesc* tensors, const std::vector<int64_t>& first_item,
               int64_t begin, int64_t end, Fn&& fn) {
  // the last tensor whose first item is <= begin (empty tensors own no item)
  int t = static_cast<int>(std::upper_bound(first_item.begin(), first_item.end(), begin) -
                           first_item.begin()) - 1;
  for (int64_t w = begin; w < end; ++w) {
    while (w >= first_item[t + 1]) ++t;
    const int64_t offset = (w - first_item[t]) * kChunk;
    if (w + 1 < end) {
      int u = t;
      while (w + 1 >= first_item[u + 1]) ++u;
      const int64_t next = (w + 1 - first_item[u]) * kChunk;
      prefetch_input(tensors[u], next, std::min<int64_t>(kChunk, tensors[u].numel - next));
    }
    fn(tensors[t], offset, std::min<int64_t>(kChunk, tensors[t].numel - offset), w);
  }
}

template <typename Fn>
auto dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat16: return fn(std::integral_constant<int, kFloat16>());
    case kBFloat16: return fn(std::integral_constant<int, kBFloat16>());
    case kFloat32: return fn(std::integral_constant<int, kFloat32>());
    default: return fn(std::integral_constant<int, kFloat64>());
  }
}

// Sharding hint per work item for the thread pools, tuned on a 2-core machine:
// higher values made TF's adaptive ParallelFor split into so many shards that
// both the 0.5M- and the 25.6M-element lists got slower (bench/micro.py).
constexpr int64_t kCostPerItem = kChunk / 8;

// first_item[t]: the index of tensor t's first work item; first_item[n]: the
// number of work items of the list.
std::vector<int64_t> first_items(const TensorDesc* tensors, int num_tensors);

// `parallel_for`, or the calling thread alone for lists below kParallelMinElements.
const ParallelFor& pool_for(int64_t elements, const ParallelFor& parallel_for);

// partials[w] = the sum of squares of work item w (clip_math.h, steps 1 to 3),
// the items spread over `run`, with IEEE subnormals on every thread.
void norm_partials(const TensorDesc* tensors, const std::vector<int64_t>& first_item,
                   double* partials, const ParallelFor& run);

// The sum of partials[first, first + count) in the GPU's order (step 4: "thread"
// k sums partials k, k + kThreads, ..., then the halving tree).
double sum_partials(const double* partials, int64_t first, int64_t count);

}  // namespace detail
}  // namespace clipops
