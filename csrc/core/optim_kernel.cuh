// The fused clip + optimizer update as ONE cooperative launch over a whole
// list of variables. Compiled by nvcc (optim_cuda.cu) and, in phase 2, by NVRTC.
//
// Phase 1 is the clip kernel's own norm pass (clip_kernel.cuh: the same work
// items, partial slots and reduction order, so the norm has the clip's bits);
// a grid-wide sync; then each tensor's norm (kClipByNorm: another sync) and
// every block's copy of the global norm; then phase 2 updates the same work
// items, reading g, p, m, v once and writing p, m, v. The host never waits.
//
// A file that includes both this and clip_kernel.cuh gets both kernels; a TU
// that must not define the clip kernel again (optim_cuda.cu, linked beside
// clip_cuda.cu) defines CLIPOPS_KERNEL_HELPERS_ONLY first.
#pragma once

#include <cooperative_groups.h>

#include "clip_kernel.cuh"
#include "optim_math.h"

// CLIPOPS_TEETH_OPTIM_* macros break this kernel on purpose, one way each, for
// the CUDA emulation's tests (CMake CLIPOPS_EMULATION_TEETH); no real build
// defines them.

namespace clipops {
namespace detail {

// Rows of a chunk loaded before any is updated: four streams (g, p, m, v) of
// four rows, 16 vector loads in flight per thread. nvcc 13 for sm_90: 128
// registers, no spills (two rows spilled at 80, one row used 64); to be tuned
// on a GPU (phase 2's bench/optim.py).
constexpr int kUpdateRows = 4;

// This thread's share of one chunk (lanes 4t..4t+3 of every row): g clipped
// by `op` in its dtype, made float32, the rule applied, p, m, v stored.
// Elements past the end load as zeros, are computed harmlessly and never stored.
template <int DT, typename Op, typename Rule>
__device__ __forceinline__ void thread_update(const TensorEntry& ge, const StateEntry& se,
                                              long long begin, const Op& op, const Rule& rule) {
  typedef typename Storage<DT>::type T;
  const T* g = static_cast<const T*>(ge.in);
#ifndef CLIPOPS_TEETH_OPTIM_SWAP_MV
  float* mp = se.m;
  float* vp = se.v;
#else
  float* mp = Rule::kUsesV ? se.v : se.m;
  float* vp = Rule::kUsesV ? se.m : se.v;
#endif
  const bool vec = aligned16(g) && aligned16(se.param) && aligned16(mp) && aligned16(vp);
#ifndef CLIPOPS_TEETH_OPTIM_DECAY_IGNORED
  const bool decay = se.decay != 0;
#else
  const bool decay = true;
#endif
  const long long n = ge.numel;
  const long long e0 = begin + kLanesPerThread * threadIdx.x;
#pragma unroll 1
  for (int r0 = 0; r0 < kRowsPerChunk; r0 += kUpdateRows) {
    if (e0 + static_cast<long long>(r0) * kLanes >= n) break;  // no barriers below: may diverge
    Quad<DT> gq[kUpdateRows];
    Quad<kFloat32> pq[kUpdateRows], mq[kUpdateRows] = {}, vq[kUpdateRows] = {};  // unused by SGD
#pragma unroll
    for (int r = 0; r < kUpdateRows; ++r) {
      const long long e = e0 + static_cast<long long>(r0 + r) * kLanes;
      gq[r] = load_quad<DT>(g, e, n, vec);
      pq[r] = load_quad<kFloat32>(se.param, e, n, vec);
      if (Rule::kUsesM) mq[r] = load_quad<kFloat32>(mp, e, n, vec);
      if (Rule::kUsesV) vq[r] = load_quad<kFloat32>(vp, e, n, vec);
    }
#pragma unroll
    for (int r = 0; r < kUpdateRows; ++r) {
      const long long e = e0 + static_cast<long long>(r0 + r) * kLanes;
#pragma unroll
      for (int k = 0; k < 4; ++k)
        rule(to_acc<DT>(op(gq[r].v[k])), pq[r].v[k], mq[r].v[k], vq[r].v[k], decay);
      store_quad<kFloat32>(se.param, e, n, vec, pq[r]);
      if (Rule::kUsesM) store_quad<kFloat32>(mp, e, n, vec, mq[r]);
      if (Rule::kUsesV) store_quad<kFloat32>(vp, e, n, vec, vq[r]);
    }
  }
}

template <int DT, typename Op>
__device__ __forceinline__ void update_with_op(const UpdateParams& a, const StepScalars& s,
                                               const TensorEntry& ge, const StateEntry& se,
                                               long long begin, const Op& op) {
  switch (rule_kind(a)) {
    case kRuleAdam: thread_update<DT>(ge, se, begin, op, adam_rule(a, s)); break;
    case kRuleNesterov: thread_update<DT>(ge, se, begin, op, momentum_rule<true>(a, s)); break;
    case kRuleMomentum: thread_update<DT>(ge, se, begin, op, momentum_rule<false>(a, s)); break;
    default: thread_update<DT>(ge, se, begin, op, sgd_rule(a, s));
  }
}

template <int DT>
__device__ __forceinline__ void update_item(const UpdateParams& a, const StepScalars& s,
                                            const TensorEntry& ge, const StateEntry& se,
                                            long long begin, double scale, double clip,
                                            double own_norm) {
  switch (a.clip_mode) {
    case kClipByNorm: update_with_op<DT>(a, s, ge, se, begin, norm_op<DT>(clip, own_norm)); break;
    case kClipByValue: update_with_op<DT>(a, s, ge, se, begin, value_op<DT>(clip)); break;
    default: update_with_op<DT>(a, s, ge, se, begin, scale_op<DT>(scale));
  }
}

}  // namespace detail
}  // namespace clipops

// Must be launched cooperatively (all blocks resident) with kThreads threads.
// grads, states: the tables of optim_launch.h (num_tensors rows each);
// partials: one double per work item, then one per tensor; a: the update's
// scalars and pointers (UpdateParams, by value).
extern "C" __global__ void __launch_bounds__(clipops::detail::kThreads)
clipops_update_kernel(const clipops::detail::TensorEntry* grads,
                      const clipops::detail::StateEntry* states, int num_tensors,
                      long long num_items, double* partials, clipops::detail::UpdateParams a) {
  using namespace clipops;
  using namespace clipops::detail;
  __shared__ double red[kThreads];
  const UpdatePlan plan = plan_of(a);

  // Every scalar is read before the first grid sync: block 0 may store the
  // counter after it (StepCounter::increment).
  const long long iterations = a.iterations_ptr != nullptr ? *a.iterations_ptr : a.iterations_value;
#ifndef CLIPOPS_TEETH_OPTIM_STEP_OFF_BY_ONE
  const long long counted = iterations;
#else
  const long long counted = iterations - 1;
#endif
  const StepScalars s =
      step_scalars(a, read_scalar(a.lr_ptr, a.lr_value, kFloat32),
                   read_scalar(a.beta_1_power_ptr, a.beta_1_power_value, kFloat32),
                   read_scalar(a.beta_2_power_ptr, a.beta_2_power_value, kFloat32), counted);
  const double clip = read_scalar(a.clip_ptr, a.clip_value, a.norm_dtype);
  const double unscale = read_scalar(a.unscale_ptr, a.unscale_value, a.norm_dtype);

  if (plan.partials) {
    write_partials(grads, num_tensors, num_items, partials, red);
#ifndef CLIPOPS_TEETH_OPTIM_NO_GRID_SYNC
    cooperative_groups::this_grid().sync();
#endif
  }
  double* own_norms = partials + num_items;
  if (plan.tensor_sumsq) {
    each_tensor_sumsq(grads, num_tensors, partials, red, [&](int t, double u) {
      if (a.tensor_norms != nullptr)
        store_norm_at(a.tensor_norms, t, norm_from_sumsq(u, a.norm_dtype, unscale), a.norm_dtype);
      if (a.clip_mode == kClipByNorm) own_norms[t] = norm_from_sumsq(u, grads[t].dtype);  // as TF
    });
    if (a.clip_mode == kClipByNorm)
      cooperative_groups::this_grid().sync();  // every tensor's own norm is written
  }
  const double norm =
      plan.global_norm
          ? norm_from_sumsq(list_sumsq(partials, num_items, red), a.norm_dtype, unscale)
          : 0.0;
  if (blockIdx.x == 0 && threadIdx.x == 0 && a.norm_out != nullptr)
    store_norm(a.norm_out, norm, a.norm_dtype);
  // every block has the same norm: all return here, or none does
  if (a.skip_nonfinite && !is_finite_d(norm)) return;
  if (a.increment_iterations) {
    if (!plan.partials) cooperative_groups::this_grid().sync();  // every block has read the counter
    if (blockIdx.x == 0 && threadIdx.x == 0) *a.iterations_ptr = iterations + 1;
  }

  const double scale = gradient_scale(a, norm, clip, unscale);
  for (long long w = blockIdx.x; w < num_items; w += gridDim.x) {
    const int t = find_tensor(grads, num_tensors, w);
    const TensorEntry ge = grads[t];
    const StateEntry se = states[t];
    const long long begin = (w - ge.first_item) * kChunk;
    const double own = a.clip_mode == kClipByNorm ? __ldcg(own_norms + t) : 0.0;
    switch (ge.dtype) {
      case kFloat16: update_item<kFloat16>(a, s, ge, se, begin, scale, clip, own); break;
      case kBFloat16: update_item<kBFloat16>(a, s, ge, se, begin, scale, clip, own); break;
      default: update_item<kFloat32>(a, s, ge, se, begin, scale, clip, own);
    }
  }
}
