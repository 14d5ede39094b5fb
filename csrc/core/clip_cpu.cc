// The CPU kernel: the reduction order of clip_math.h, spread over threads by
// work item. Built with -ffp-contract=off so no FMA changes the bits.
#include <algorithm>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "clip_cpu.h"
#include "clipops.h"

namespace clipops {
namespace {

using namespace detail;

// Adds the squares of `rows` full rows of kLanes elements into the lanes, a
// group of kRowGroup rows at a time: the input is read front to back, as
// kRowGroup streams a row apart, and the lanes (4 KiB of float, 8 KiB of
// double) stay in L1, loaded and stored once per group. The lanes are
// independent and each still takes its rows in order, so any vector width and
// any grouping give the same bits. The AVX2 clone is picked at load time where
// the CPU has it (no FMA: separate roundings). An earlier order kept 32 lanes
// in registers while all 16 rows went past, reading a chunk as 16 interleaved
// streams a row apart: the norm pass of the mixed float16/float32 list took
// 1.7x as long, of the ResNet-50 list 1.2x (bench/results/norm_order_ab, 2-core
// AMD EPYC). One row at a time, a lane's load and store per row made the norm
// pass of the ResNet-50 list take 1.4x as long as with groups of 4 (2-core
// Intel Xeon, bench/results/norm_row_groups_ab).
constexpr int kRowGroup = 4;
static_assert(kRowsPerChunk % kRowGroup == 0, "a full chunk is whole groups");

template <int DT>
inline void add_rows(const typename Storage<DT>::type* x, int64_t rows,
                     typename Storage<DT>::acc* lanes) {
  int64_t r = 0;
  for (; r + kRowGroup <= rows; r += kRowGroup) {
    const typename Storage<DT>::type* p = x + r * kLanes;
    for (int j = 0; j < kLanes; ++j) {
      typename Storage<DT>::acc lane = lanes[j];
      for (int k = 0; k < kRowGroup; ++k) lane = add_square(lane, to_acc<DT>(p[k * kLanes + j]));
      lanes[j] = lane;
    }
  }
  for (; r < rows; ++r) {  // a chunk cut short (a tensor's last) may end in a partial group
    const typename Storage<DT>::type* p = x + r * kLanes;
    for (int j = 0; j < kLanes; ++j) lanes[j] = add_square(lanes[j], to_acc<DT>(p[j]));
  }
}

CLIPOPS_SIMD_CLONES void add_rows_f32(const float* x, int64_t rows, float* lanes) {
  add_rows<kFloat32>(x, rows, lanes);
}
CLIPOPS_SIMD_CLONES void add_rows_f64(const double* x, int64_t rows, double* lanes) {
  add_rows<kFloat64>(x, rows, lanes);
}
CLIPOPS_SIMD_CLONES void add_rows_f16(const unsigned short* x, int64_t rows, float* lanes) {
  add_rows<kFloat16>(x, rows, lanes);
}
CLIPOPS_SIMD_CLONES void add_rows_bf16(const unsigned short* x, int64_t rows, float* lanes) {
  add_rows<kBFloat16>(x, rows, lanes);
}

// Whether a scale loop may write `out` with streaming stores: asked to (a large
// list), a fresh output (in place, the lines were just read), 16-byte aligned.
inline bool can_stream(bool stream, const void* in, const void* out) {
  return stream && out != in && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// float16 with F16C (every x86 CPU with AVX2 has it): the hardware conversions
// round to nearest even and keep subnormals (MXCSR's FTZ/DAZ are cleared by
// ScopedIeeeSubnormals), as half_to_float / float_to_half do, so the bits are
// the software path's. The one difference is a NaN's payload: F16C keeps it,
// float_to_half writes the canonical 0x7e00. A group of 8 with a NaN product
// is therefore redone by the software path. With `Streamed`, the groups go
// around the cache as in scale_chunk<kFloat32> (out 16-byte aligned, so is
// every group of 8 halves).
#define CLIPOPS_F16C 1
template <bool Streamed>
__attribute__((target("avx2,f16c"))) void scale_f16_f16c_loop(const unsigned short* in,
                                                               unsigned short* out,
                                                               int64_t count, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  const Scaler<kFloat16> scalar(s);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 y = _mm256_mul_ps(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))), vs);
    if (_mm256_movemask_ps(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)) != 0) {
      for (int k = 0; k < 8; ++k) out[i + k] = scalar(in[i + k]);
      continue;
    }
    const __m128i h = _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if constexpr (Streamed) _mm_stream_si128(reinterpret_cast<__m128i*>(out + i), h);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < count; ++i) out[i] = scalar(in[i]);
  if constexpr (Streamed) _mm_sfence();  // weakly ordered: publish before returning
}

void scale_f16_f16c(const unsigned short* in, unsigned short* out, int64_t count, float s,
                    bool stream) {
  if (can_stream(stream, in, out))
    scale_f16_f16c_loop<true>(in, out, count, s);
  else
    scale_f16_f16c_loop<false>(in, out, count, s);
}

// add_rows<kFloat16> with F16C: the same order, the same row groups and the
// same two roundings per element (the square, then the sum; no FMA). A half NaN
// converts to a float NaN whose square is the software path's (the product
// quiets either one).
__attribute__((target("avx2,f16c"))) void add_rows_f16_f16c(const unsigned short* x,
                                                            int64_t rows, float* lanes) {
#define CLIPOPS_HALF8(p) _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
  int64_t r = 0;
  for (; r + kRowGroup <= rows; r += kRowGroup) {
    const unsigned short* p = x + r * kLanes;
    for (int j = 0; j < kLanes; j += 8) {
      __m256 lane = _mm256_loadu_ps(lanes + j);
      for (int k = 0; k < kRowGroup; ++k) {
        const __m256 v = CLIPOPS_HALF8(p + k * kLanes + j);
        lane = _mm256_add_ps(lane, _mm256_mul_ps(v, v));
      }
      _mm256_storeu_ps(lanes + j, lane);
    }
  }
  for (; r < rows; ++r) {
    const unsigned short* p = x + r * kLanes;
    for (int j = 0; j < kLanes; j += 8) {
      const __m256 v = CLIPOPS_HALF8(p + j);
      _mm256_storeu_ps(lanes + j, _mm256_add_ps(_mm256_loadu_ps(lanes + j), _mm256_mul_ps(v, v)));
    }
  }
#undef CLIPOPS_HALF8
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

template <int DT>
inline void add_rows_dt(const typename Storage<DT>::type* x, int64_t rows, typename Storage<DT>::acc* lanes) {
#if defined(CLIPOPS_F16C)
  if constexpr (DT == kFloat16)
    if (has_f16c()) return add_rows_f16_f16c(x, rows, lanes);
#endif
  if constexpr (DT == kFloat16) add_rows_f16(x, rows, lanes);
  else if constexpr (DT == kBFloat16) add_rows_bf16(x, rows, lanes);
  else if constexpr (DT == kFloat32) add_rows_f32(x, rows, lanes);
  else add_rows_f64(x, rows, lanes);
}

// Sum of squares of one chunk (count <= kChunk elements), lane by lane.
template <int DT>
double chunk_sumsq(const typename Storage<DT>::type* x, int64_t count) {
  using Acc = typename Storage<DT>::acc;
  const int used = static_cast<int>(std::min<int64_t>(count, kLanes));
  const int active = (used + kLanesPerThread - 1) / kLanesPerThread;  // threads with data
  Acc lanes[kLanes];
  std::fill(lanes, lanes + kLanesPerThread * active, Acc(0));
  const int64_t full_rows = count / kLanes;
  // A chunk shorter than a row (a small tensor) has no full row: the row
  // loops would still copy all kLanes accumulators in and out, most of them
  // unset, which was most of the norm pass on a list of 10,000 small tensors.
  if (full_rows > 0) add_rows_dt<DT>(x, full_rows, lanes);
  // the last, partial row comes last in every lane's order, as on the GPU
  const typename Storage<DT>::type* tail = x + full_rows * kLanes;
  const int rem = static_cast<int>(count - full_rows * kLanes);
  for (int j = 0; j < rem; ++j) lanes[j] = add_square(lanes[j], to_acc<DT>(tail[j]));
  double v[kThreads];
  for (int t = 0; t < active; ++t) {
    const Acc* l = lanes + kLanesPerThread * t;
    v[t] = add_d(add_d(static_cast<double>(l[0]), static_cast<double>(l[1])),
                 add_d(static_cast<double>(l[2]), static_cast<double>(l[3])));
  }
  // The tree's remaining steps read below 2*active; those slots hold +0.0, and
  // adding +0.0 is exact: the same bits as the GPU's full tree.
  std::fill(v + active, v + std::min(kThreads, 2 * active), 0.0);
  return halving_tree(v, active);
}

template <int DT>
inline void scale_loop(const typename Storage<DT>::type* in, typename Storage<DT>::type* out,
                       int64_t count, const Scaler<DT>& scaler) {
  for (int64_t i = 0; i < count; ++i) out[i] = scaler(in[i]);
}

// The 16-bit scale loops convert to float and back: AVX2 clones as for add_rows.
CLIPOPS_SIMD_CLONES void scale_f16(const unsigned short* in, unsigned short* out, int64_t count,
                                   float s) {
  scale_loop<kFloat16>(in, out, count, Scaler<kFloat16>(s));
}
CLIPOPS_SIMD_CLONES void scale_bf16(const unsigned short* in, unsigned short* out, int64_t count,
                                    float s) {
  scale_loop<kBFloat16>(in, out, count, Scaler<kBFloat16>(s));
}

template <int DT>
void scale_chunk(const typename Storage<DT>::type* in, typename Storage<DT>::type* out,
                 int64_t count, const Scaler<DT>& scaler, [[maybe_unused]] bool stream) {
#if defined(CLIPOPS_F16C)
  if constexpr (DT == kFloat16)
    if (has_f16c()) return scale_f16_f16c(in, out, count, scaler.s, stream);
#endif
  if constexpr (DT == kFloat16) scale_f16(in, out, count, scaler.s);  // s is already a half value
  else if constexpr (DT == kBFloat16) scale_bf16(in, out, count, scaler.s);
  else scale_loop<DT>(in, out, count, scaler);
}

// The per-tensor clips' element loops (clip_by_value, clip_by_norm): AVX2
// clones as for add_rows; the ops are branch-free, so the loops vectorize.
template <int DT, typename Op>
inline void map_loop(const typename Storage<DT>::type* in, typename Storage<DT>::type* out,
                     int64_t count, const Op& op_ref) {
  const Op op = op_ref;  // a local copy: stores to out cannot alias its constants
  for (int64_t i = 0; i < count; ++i) out[i] = op(in[i]);
}
template <int DT>
struct FiniteBounds {  // ValueClipper when neither bound is NaN (the usual case)
  ValueClipper<DT> op;
  typename Storage<DT>::type operator()(typename Storage<DT>::type x) const {
    return op.finite_bounds(x);
  }
};
#define CLIPOPS_MAP_CLONE(DT, T)                                                        \
  CLIPOPS_SIMD_CLONES void map_chunk(const T* in, T* out, int64_t count,                \
                                     const NormClipper<DT>& op) {                       \
    map_loop<DT>(in, out, count, op);                                                   \
  }                                                                                     \
  CLIPOPS_SIMD_CLONES void map_chunk(const T* in, T* out, int64_t count,                \
                                     const ValueClipper<DT>& op) {                      \
    if (op.nan_bound()) map_loop<DT>(in, out, count, op);                               \
    else map_loop<DT>(in, out, count, FiniteBounds<DT>{op});                            \
  }
CLIPOPS_MAP_CLONE(kFloat32, float)
CLIPOPS_MAP_CLONE(kFloat64, double)
// 16-bit: one storage type for both, so the op's type tells them apart
CLIPOPS_MAP_CLONE(kFloat16, unsigned short)
CLIPOPS_MAP_CLONE(kBFloat16, unsigned short)
#undef CLIPOPS_MAP_CLONE

#if defined(__SSE2__)
// float32, list far larger than the caches: streaming stores skip reading each
// output line before overwriting it (a third of the traffic). The product is
// the same IEEE multiply, so the bits are too.
template <>
void scale_chunk<kFloat32>(const float* in, float* out, int64_t count,
                           const Scaler<kFloat32>& scaler, bool stream) {
  int64_t i = 0;
  if (can_stream(stream, in, out)) {
    const __m128 s = _mm_set1_ps(scaler.s);
    for (; i + 4 <= count; i += 4) _mm_stream_ps(out + i, _mm_mul_ps(_mm_loadu_ps(in + i), s));
    _mm_sfence();  // streamed stores are weakly ordered: publish before returning
  }
  for (; i < count; ++i) out[i] = scaler(in[i]);
}
#endif

// Outputs beyond this many bytes go around the cache (see scale_chunk): the
// list's inputs and outputs together are then at least twice a 32 MiB L3. At
// 64 MiB the mixed float16/float32 list of bench/micro.py (51 MB) did not
// stream; its copying scale pass now takes 0.86 of its old time
// (bench/results/stream_f16_ab, 2-core AMD EPYC).
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// A fresh output (TF's allocator hands large ones out unfaulted) costs a page
// fault per 4 KiB page when the scale pass first writes it: where transparent
// huge pages are in "madvise" mode, a common default, that was 23,000 faults
// and ~60 ms for a 94 MB output on a 2-core AMD EPYC, 3x the pass itself.
// Asking for huge pages on the output's 2 MiB-aligned interior makes it ~50.
// Advice only: where THP is off, or the pages are already there, nothing changes.
void advise_huge_pages(void* out, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < static_cast<int64_t>(2 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)out;
  (void)bytes;
#endif
}

}  // namespace

namespace detail {

std::vector<int64_t> first_items(const TensorDesc* tensors, int num_tensors) {
  std::vector<int64_t> first_item(num_tensors + 1, 0);
  for (int t = 0; t < num_tensors; ++t)
    first_item[t + 1] = first_item[t] + (tensors[t].numel + kChunk - 1) / kChunk;
  return first_item;
}

const ParallelFor& pool_for(int64_t elements, const ParallelFor& parallel_for) {
  static const ParallelFor inline_for =
      [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
        if (n > 0) fn(0, n);
      };
  return elements < kParallelMinElements ? inline_for : parallel_for;
}

void norm_partials(const TensorDesc* tensors, const std::vector<int64_t>& first_item,
                   double* partials, const ParallelFor& run) {
  run(first_item.back(), kCostPerItem, [&](int64_t begin, int64_t end) {
    const ScopedIeeeSubnormals ieee;
    for_items(tensors, first_item, begin, end,
              [&](const TensorDesc& t, int64_t offset, int64_t count, int64_t w) {
                partials[w] = dispatch(t.dtype, [&](auto dt) {
                  using T = typename Storage<decltype(dt)::value>::type;
                  return chunk_sumsq<decltype(dt)::value>(static_cast<const T*>(t.in) + offset,
                                                          count);
                });
              });
  });
}

double sum_partials(const double* partials, int64_t first, int64_t count) {
  double u[kThreads] = {};
  for (int64_t k = 0; k < count; ++k) u[k % kThreads] = add_d(u[k % kThreads], partials[first + k]);
  return halving_tree(u);
}

}  // namespace detail

#if defined(__SSE2__)
namespace {
constexpr unsigned kFtz = 1u << 15, kDaz = 1u << 6;  // MXCSR flags
}  // namespace
ScopedIeeeSubnormals::ScopedIeeeSubnormals() : saved_(_mm_getcsr()) {
  _mm_setcsr(saved_ & ~(kFtz | kDaz));
}
ScopedIeeeSubnormals::~ScopedIeeeSubnormals() { _mm_setcsr(saved_); }
#else
ScopedIeeeSubnormals::ScopedIeeeSubnormals() = default;
ScopedIeeeSubnormals::~ScopedIeeeSubnormals() = default;
#endif

Status clip_by_global_norm_cpu(const TensorDesc* tensors, int num_tensors,
                               const ClipArgs& args, const ParallelFor& parallel_for) {
  Status status = validate(tensors, num_tensors, args);
  if (!status.ok()) return status;
  const ScopedIeeeSubnormals ieee;  // for the norm and the scale, computed on this thread
  if (args.clip_norm.device_ptr != nullptr || args.use_norm.device_ptr != nullptr ||
      args.clip_min.device_ptr != nullptr || args.clip_max.device_ptr != nullptr ||
      args.unscale.device_ptr != nullptr)
    return Status::Error("the CPU kernel takes its scalar arguments as host values");

  const std::vector<int64_t> first_item = first_items(tensors, num_tensors);
  int64_t elements = 0, bytes = 0;
  for (int t = 0; t < num_tensors; ++t) {
    elements += tensors[t].numel;
    bytes += tensors[t].numel * dtype_size(tensors[t].dtype);
  }
  const int64_t items = first_item[num_tensors];
  const ParallelFor& run = pool_for(elements, parallel_for);

  // fn(dt, t, in, out, count) for every chunk of every tensor, spread over the
  // pool, after asking for huge pages on the fresh outputs
  auto each_chunk = [&](auto fn) {
    for (int t = 0; t < num_tensors; ++t)
      if (tensors[t].out != tensors[t].in)
        advise_huge_pages(tensors[t].out, tensors[t].numel * dtype_size(tensors[t].dtype));
    run(items, kCostPerItem, [&](int64_t begin, int64_t end) {
      const ScopedIeeeSubnormals ieee;
      for_items(tensors, first_item, begin, end,
                [&](const TensorDesc& t, int64_t offset, int64_t count, int64_t) {
                  dispatch(t.dtype, [&](auto dt) {
                    using T = typename Storage<decltype(dt)::value>::type;
                    fn(dt, t, static_cast<const T*>(t.in) + offset,
                       static_cast<T*>(t.out) + offset, count);
                  });
                });
    });
  };
  // out = op(in) for every element; make_op(dt, tensor index) gives the op
  auto map_all = [&](auto make_op) {
    each_chunk([&](auto dt, const TensorDesc& t, const auto* in, auto* out, int64_t count) {
      map_chunk(in, out, count, make_op(dt, static_cast<int>(&t - tensors)));
    });
  };
  if (args.mode == kClipByValue) {  // no norm: one pass
    const double lo = args.clip_min.value, hi = args.clip_max.value;
    map_all([&](auto dt, int) { return ValueClipper<decltype(dt)::value>(lo, hi); });
    return Status::Ok();
  }
  const bool by_norm = args.mode == kClipByNorm;

  // partials are summed in a fixed order, so the norms are bitwise reproducible
  std::vector<double> partials;
  if (by_norm || !args.has_use_norm || args.tensor_norms != nullptr) {
    partials.resize(items);
    norm_partials(tensors, first_item, partials.data(), run);
  }
  auto sumsq_of = [&](int64_t first, int64_t count) {
    return sum_partials(partials.data(), first, count);
  };
  std::vector<double> own_norms(by_norm ? num_tensors : 0);  // in each tensor's dtype, as TF
  if (args.tensor_norms != nullptr || by_norm)
    for (int t = 0; t < num_tensors; ++t) {
      const double u = sumsq_of(first_item[t], first_item[t + 1] - first_item[t]);
      if (args.tensor_norms != nullptr)
        store_norm_at(args.tensor_norms, t, norm_from_sumsq(u, args.norm_dtype, args.unscale.value),
                      args.norm_dtype);
      if (by_norm) own_norms[t] = norm_from_sumsq(u, tensors[t].dtype);
    }
  if (by_norm) {
    const double clip = args.clip_norm.value;
    map_all([&](auto dt, int t) { return NormClipper<decltype(dt)::value>(clip, own_norms[t]); });
    return Status::Ok();
  }
  const double norm = args.has_use_norm
                          ? args.use_norm.value
                          : norm_from_sumsq(sumsq_of(0, items), args.norm_dtype, args.unscale.value);
  if (args.norm_out != nullptr) store_norm(args.norm_out, norm, args.norm_dtype);
  if (!args.scale) return Status::Ok();

  const double scale = step_scale(norm, args.clip_norm.value, args.norm_dtype, args.skip_nonfinite,
                                  args.unscale.value);
  const bool stream = bytes > kStreamBytes;  // outputs are as large as inputs
  each_chunk([&](auto dt, const TensorDesc& t, const auto* in, auto* out, int64_t count) {
    constexpr int DT = decltype(dt)::value;
    const Scaler<DT> scaler(scale);
    // a forwarded buffer that needs no clipping is left untouched
    if (t.out == t.in && scaler.is_one()) return;
    scale_chunk<DT>(in, out, count, scaler, stream);
  });
  return Status::Ok();
}

}  // namespace clipops
