// Scalar arithmetic and the reduction order shared by every clipops kernel.
//
// This one file is compiled by g++ (the CPU kernel), by nvcc (the CUDA kernel)
// and by NVRTC at run time (the CuPy fallback), so the three produce the same
// bits. It therefore includes nothing: NVRTC has no standard library.
//
// THE REDUCTION ORDER (identical on every device; see docs/design.md "Reduction order")
//   1. Each tensor is cut into work items ("chunks") of kChunk elements.
//   2. Within a chunk, lane j (0 <= j < kLanes) sums the squares of elements
//      j, j + kLanes, j + 2*kLanes, ... in increasing order. A lane accumulates
//      in float for half/bfloat16/float inputs (at most kChunk/kLanes = 16 terms,
//      so the relative error stays below 1e-6) and in double for double inputs.
//      Squares and sums are separately rounded: no fused multiply-add.
//   3. Lanes 4t..4t+3 become the value of "thread" t in double:
//      (l0 + l1) + (l2 + l3). The kThreads values are then folded by a halving
//      tree: for s = kThreads/2 .. 1, v[t] += v[t + s] for t < s. The chunk's
//      partial is v[0].
//   4. The partials, numbered tensor by tensor and chunk by chunk, are summed
//      in double the same way: thread t sums partials t, t + kThreads, ... in
//      increasing order, then the halving tree. The global norm is the
//      correctly rounded sqrt of that sum, rounded to float and then, for a
//      half or bfloat16 norm, to that type.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CLIPOPS_HD __host__ __device__ __forceinline__
#else
#define CLIPOPS_HD inline
#endif

namespace clipops {

// dtype codes shared by the C++ API, the kernels and the Python adapters.
enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Which clip: the global norm's (tf.clip_by_global_norm), each tensor's own
// norm's (tf.clip_by_norm on every tensor), or element values
// (tf.clip_by_value on every tensor). One pass, or one CUDA launch, each.
enum ClipMode : int { kClipByGlobalNorm = 0, kClipByNorm = 1, kClipByValue = 2 };

namespace detail {

constexpr long long kChunk = 16384;   // elements per work item
constexpr int kLanes = 1024;          // accumulators per chunk
constexpr int kThreads = 256;         // CUDA block size; thread t owns lanes 4t..4t+3
constexpr int kLanesPerThread = kLanes / kThreads;
constexpr int kRowsPerChunk = static_cast<int>(kChunk / kLanes);
static_assert(kLanesPerThread == 4, "the kernels load four lanes per thread");

// One row of the tensor table the CUDA kernel reads, built on the host by both
// launchers (clip_launch.h). 40 bytes; clipops/_nvrtc.py mirrors this layout
// with a NumPy structured dtype.
struct TensorEntry {
  const void* in;
  void* out;
  long long numel;
  long long first_item;  // index of this tensor's first work item
  int dtype;
  int pad;
};

CLIPOPS_HD int dtype_size(int dtype) {
  return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
}

// ---- bit casts ---------------------------------------------------------------
CLIPOPS_HD unsigned int float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  unsigned int u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

CLIPOPS_HD float bits_float(unsigned int u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- IEEE operations with an explicit rounding (never contracted to FMA) ------
CLIPOPS_HD float mul_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the CPU kernel is built with -ffp-contract=off
#endif
}
CLIPOPS_HD float add_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
CLIPOPS_HD float div_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
CLIPOPS_HD double mul_d(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
CLIPOPS_HD double add_d(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
CLIPOPS_HD double div_d(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
CLIPOPS_HD double sqrt_d(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return __builtin_sqrt(a);  // IEEE correctly rounded
#endif
}
CLIPOPS_HD float double_to_float(double a) {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(a);
#else
  return static_cast<float>(a);
#endif
}

// ---- half and bfloat16, in integer arithmetic so every compiler agrees ---------
// The conversions below are branch-free (selects written as bit masks, which
// compilers do not turn back into branches), so the CPU kernel's loops over
// them vectorize; every path still gives the exact IEEE result.
CLIPOPS_HD unsigned int mask_if(bool c) { return 0u - static_cast<unsigned int>(c); }
CLIPOPS_HD unsigned int select(unsigned int mask, unsigned int a, unsigned int b) {
  return (a & mask) | (b & ~mask);
}

CLIPOPS_HD float half_to_float(unsigned short h) {
  const unsigned int sign = (static_cast<unsigned int>(h) & 0x8000u) << 16;
  const unsigned int em = h & 0x7fffu;  // exponent and mantissa
  // normal: rebias the exponent by 127 - 15 = 112; inf and nan: by 112 more
  const unsigned int normal = (em << 13) + 0x38000000u + (0x38000000u & mask_if(em >= 0x7c00u));
  // zero or subnormal: em * 2^-24, exact in float
  const float sub = static_cast<float>(static_cast<int>(em)) * 5.9604644775390625e-8f;
  return bits_float(select(mask_if(em < 0x0400u), float_bits(sub), normal) | sign);
}

// float -> half, round to nearest even; overflow gives inf, nan stays nan.
CLIPOPS_HD unsigned short float_to_half(float f) {
  const unsigned int x = float_bits(f);
  const unsigned int sign = (x >> 16) & 0x8000u;
  const unsigned int ax = x & 0x7fffffffu;
  // normal: rebias the exponent by -112 and round the 13 dropped bits to even
  const unsigned int normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
  // below 2^-14, a half subnormal: adding 0.5f rounds |f| to a multiple of
  // 2^-24 (the ulp of [0.5, 1)), which is exactly the half subnormal step
  const unsigned int sub = float_bits(add_f(bits_float(ax), 0.5f)) - 0x3f000000u;
  unsigned int r = select(mask_if(ax < 0x38800000u), sub, normal);
  r = select(mask_if(ax >= 0x477ff000u), 0x7c00u, r);  // >= 65520 rounds to inf
  r = select(mask_if(ax > 0x7f800000u), 0x7e00u, r);   // nan
  return static_cast<unsigned short>(sign | r);
}

CLIPOPS_HD float bf16_to_float(unsigned short b) {
  return bits_float(static_cast<unsigned int>(b) << 16);
}

CLIPOPS_HD unsigned short float_to_bf16(float f) {
  const unsigned int x = float_bits(f);
  const unsigned int rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;  // nearest even
  const unsigned int nan = 0x7fc0u | ((x >> 16) & 0x8000u);               // quiet, keeps the sign
  return static_cast<unsigned short>(select(mask_if((x & 0x7fffffffu) > 0x7f800000u), nan, rounded));
}

// Round a float to the precision of a 16-bit norm dtype (identity for float).
CLIPOPS_HD float round_to(float x, int dtype) {
  if (dtype == kFloat16) return half_to_float(float_to_half(x));
  if (dtype == kBFloat16) return bf16_to_float(float_to_bf16(x));
  return x;
}

// ---- TensorFlow's clip scale, op for op ----------------------------------------
// TF computes  clip * min(1/norm, 1/clip) + (norm - norm)  in the norm's dtype.
// A half or bfloat16 op is a float op rounded to that type (float has more than
// twice their precision, so the double rounding is exact). min is Eigen's
// `b < a ? b : a`. A non-finite norm makes the scale NaN.
CLIPOPS_HD float tf_scale_f(float norm, float clip, int norm_dtype) {
  const float a = round_to(div_f(1.0f, norm), norm_dtype);
  const float b = round_to(div_f(1.0f, clip), norm_dtype);
  const float m = (b < a) ? b : a;
  const float s = round_to(mul_f(clip, m), norm_dtype);
  const float z = round_to(add_f(norm, -norm), norm_dtype);
  return round_to(add_f(s, z), norm_dtype);
}

CLIPOPS_HD double tf_scale_d(double norm, double clip) {
  const double a = div_d(1.0, norm);
  const double b = div_d(1.0, clip);
  const double m = (b < a) ? b : a;
  return add_d(mul_d(clip, m), add_d(norm, -norm));
}

// The global norm from the sum of squares, in the norm dtype (held in a double).
CLIPOPS_HD double norm_from_sumsq(double sumsq, int norm_dtype, double unscale = 1.0) {
  const double n = mul_d(sqrt_d(sumsq), unscale);  // exact for unscale 1 (and powers of two)
  if (norm_dtype == kFloat64) return n;
  return static_cast<double>(round_to(double_to_float(n), norm_dtype));
}

// The scale in the norm dtype (held in a double), from values of that dtype.
CLIPOPS_HD double clip_scale(double norm, double clip, int norm_dtype) {
  if (norm_dtype == kFloat64) return tf_scale_d(norm, clip);
  return static_cast<double>(
      tf_scale_f(double_to_float(norm), double_to_float(clip), norm_dtype));
}

// Stores the norm (a value of norm_dtype, held in a double) as that dtype.
CLIPOPS_HD void store_norm(void* out, double norm, int norm_dtype) {
  switch (norm_dtype) {
    case kFloat16: *static_cast<unsigned short*>(out) = float_to_half(double_to_float(norm)); break;
    case kBFloat16: *static_cast<unsigned short*>(out) = float_to_bf16(double_to_float(norm)); break;
    case kFloat32: *static_cast<float*>(out) = double_to_float(norm); break;
    default: *static_cast<double*>(out) = norm;
  }
}

// Element i of an array of norm_dtype values.
CLIPOPS_HD void store_norm_at(void* array, long long i, double norm, int norm_dtype) {
  store_norm(static_cast<char*>(array) + i * dtype_size(norm_dtype), norm, norm_dtype);
}

// x - x is 0 for every finite x, NaN for inf and NaN: no <cmath> (NVRTC).
CLIPOPS_HD bool is_finite_d(double x) { return x - x == 0.0; }

// The scale of a step: clip_scale, or 1 (the outputs equal the inputs) when
// skip_nonfinite and the norm is inf or NaN.
// With an unscale factor (ClipArgs::unscale) the clip scale is multiplied by
// it in double; a skipped step is not unscaled either.
CLIPOPS_HD double step_scale(double norm, double clip, int norm_dtype, bool skip_nonfinite,
                             double unscale = 1.0) {
  if (skip_nonfinite && !is_finite_d(norm)) return 1.0;
  return mul_d(clip_scale(norm, clip, norm_dtype), unscale);
}

// ---- one element ---------------------------------------------------------------
// Every kernel moves elements as raw bits of their storage type.
template <int DT> struct Storage;
template <> struct Storage<kFloat16> { typedef unsigned short type; typedef float acc; };
template <> struct Storage<kBFloat16> { typedef unsigned short type; typedef float acc; };
template <> struct Storage<kFloat32> { typedef float type; typedef float acc; };
template <> struct Storage<kFloat64> { typedef double type; typedef double acc; };

template <int DT> CLIPOPS_HD typename Storage<DT>::acc to_acc(typename Storage<DT>::type v);
template <> CLIPOPS_HD float to_acc<kFloat16>(unsigned short v) { return half_to_float(v); }
template <> CLIPOPS_HD float to_acc<kBFloat16>(unsigned short v) { return bf16_to_float(v); }
template <> CLIPOPS_HD float to_acc<kFloat32>(float v) { return v; }
template <> CLIPOPS_HD double to_acc<kFloat64>(double v) { return v; }

// lane += v*v, rounded twice (the order every device follows)
CLIPOPS_HD float add_square(float lane, float v) { return add_f(lane, mul_f(v, v)); }
CLIPOPS_HD double add_square(double lane, double v) { return add_d(lane, mul_d(v, v)); }

// The scale cast to a tensor's dtype, as TF's `math_ops.cast(scale, v.dtype)`.
template <int DT> struct Scaler;
template <> struct Scaler<kFloat16> {
  float s;
  CLIPOPS_HD explicit Scaler(double scale) : s(half_to_float(float_to_half(double_to_float(scale)))) {}
  CLIPOPS_HD unsigned short operator()(unsigned short v) const {
    return float_to_half(mul_f(half_to_float(v), s));  // exact product, one rounding
  }
  CLIPOPS_HD bool is_one() const { return s == 1.0f; }
};
template <> struct Scaler<kBFloat16> {
  float s;
  CLIPOPS_HD explicit Scaler(double scale) : s(bf16_to_float(float_to_bf16(double_to_float(scale)))) {}
  CLIPOPS_HD unsigned short operator()(unsigned short v) const {
    return float_to_bf16(mul_f(bf16_to_float(v), s));
  }
  CLIPOPS_HD bool is_one() const { return s == 1.0f; }
};
template <> struct Scaler<kFloat32> {
  float s;
  CLIPOPS_HD explicit Scaler(double scale) : s(double_to_float(scale)) {}
  CLIPOPS_HD float operator()(float v) const { return mul_f(v, s); }
  CLIPOPS_HD bool is_one() const { return s == 1.0f; }
};
template <> struct Scaler<kFloat64> {
  double s;
  CLIPOPS_HD explicit Scaler(double scale) : s(scale) {}
  CLIPOPS_HD double operator()(double v) const { return mul_d(v, s); }
  CLIPOPS_HD bool is_one() const { return s == 1.0; }
};

// ---- the per-tensor clips: tf.clip_by_norm and tf.clip_by_value, element-wise ----
template <int DT> CLIPOPS_HD typename Storage<DT>::type from_acc(typename Storage<DT>::acc v);
template <> CLIPOPS_HD unsigned short from_acc<kFloat16>(float v) { return float_to_half(v); }
template <> CLIPOPS_HD unsigned short from_acc<kBFloat16>(float v) { return float_to_bf16(v); }
template <> CLIPOPS_HD float from_acc<kFloat32>(float v) { return v; }
template <> CLIPOPS_HD double from_acc<kFloat64>(double v) { return v; }

// A scalar (a double) as a value of DT: through float for the 32- and 16-bit
// types, as every scalar argument is converted.
template <int DT> CLIPOPS_HD typename Storage<DT>::type to_storage(double v) {
  if constexpr (DT == kFloat64) return v;
  else return from_acc<DT>(double_to_float(v));
}

CLIPOPS_HD float mul_a(float a, float b) { return mul_f(a, b); }
CLIPOPS_HD double mul_a(double a, double b) { return mul_d(a, b); }
CLIPOPS_HD float div_a(float a, float b) { return div_f(a, b); }
CLIPOPS_HD double div_a(double a, double b) { return div_d(a, b); }

// tf.clip_by_norm's formula in the tensor's dtype: (x * clip) / max(norm, clip),
// each operation rounded to the dtype (16-bit types: computed in float and
// rounded after each operation, as Eigen's half and bfloat16 do). norm is the
// tensor's own norm, a value of DT; max is Eigen's maxi(norm, clip), which
// keeps a NaN norm. clip (a value of the norm dtype) is first TF's
// maximum(clip_norm, 0), before its cast to DT: a negative clip (-inf too)
// is +0, while -0 and NaN stay.
template <int DT> struct NormClipper {
  typedef typename Storage<DT>::type T;
  typedef typename Storage<DT>::acc A;
  A c, m;
  CLIPOPS_HD NormClipper(double clip, double norm)
      : c(to_acc<DT>(to_storage<DT>(clip < 0.0 ? 0.0 : clip))),
        m(to_acc<DT>(to_storage<DT>(norm))) {
    if (m < c) m = c;
  }
  CLIPOPS_HD T operator()(T x) const {
    return from_acc<DT>(div_a(to_acc<DT>(from_acc<DT>(mul_a(to_acc<DT>(x), c))), m));
  }
};

// tf.clip_by_value's formula: maximum(minimum(x, hi), lo) with Eigen's
// NaN-propagating min and max as TensorFlow's CPU kernels use them: a NaN
// element or a NaN bound gives NaN, and otherwise mini(a, b) = b < a ? b : a,
// maxi(a, b) = a < b ? b : a, so an element that is not clipped keeps its
// bits, ties included. (TF's vectorized float32/float64 loop returns +0.0 on a
// tie of zeros, -0.0 against a bound of 0.0, where its scalar loop returns the
// element: TF's own result there depends on the element's position.)
template <int DT> struct ValueClipper {
  typedef typename Storage<DT>::type T;
  typedef typename Storage<DT>::acc A;
  T lo_bits, hi_bits;
  A lo, hi;
  CLIPOPS_HD ValueClipper(double lo_v, double hi_v)
      : lo_bits(to_storage<DT>(lo_v)), hi_bits(to_storage<DT>(hi_v)),
        lo(to_acc<DT>(lo_bits)), hi(to_acc<DT>(hi_bits)) {}
  CLIPOPS_HD bool nan_bound() const { return (lo != lo) | (hi != hi); }
  // operator() for bounds that are not NaN: fewer selects, and CPU loops vectorize.
  CLIPOPS_HD T finite_bounds(T x) const {
    const A v = to_acc<DT>(x);
    const bool above = hi < v;  // false for a NaN v, which stays
    const A t = above ? hi : v;
    return t < lo ? lo_bits : (above ? hi_bits : x);
  }
  CLIPOPS_HD T operator()(T x) const {
    const A v = to_acc<DT>(x);
    const bool take_hi = (hi < v) | ((hi != hi) & (v == v));  // mini(v, hi); a NaN v stays
    const A t = take_hi ? hi : v;
    const bool take_lo = (t < lo) | ((lo != lo) & (t == t));  // maxi(t, lo); a NaN t stays
    return take_lo ? lo_bits : (take_hi ? hi_bits : x);
  }
};

// Fold kThreads values in place with the halving tree of step 3/4 (host side;
// the CUDA kernel does the same folds across its threads). Values from
// `active` on must be +0.0: the steps that would only add those zeros
// (exact no-ops) are skipped.
CLIPOPS_HD double halving_tree(double* v, int active = kThreads) {
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (s >= active) continue;  // v[t + s] is zero for every t < s
    for (int t = 0; t < s; ++t) v[t] = add_d(v[t], v[t + s]);
  }
  return v[0];
}

}  // namespace detail
}  // namespace clipops
