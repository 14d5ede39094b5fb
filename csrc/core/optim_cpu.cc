// The fused update's CPU kernel: the clip's norm pass (clip_cpu.h), then one
// pass that reads g, p, m, v once and writes p, m, v, both spread over threads
// by work item. Built with -ffp-contract=off (no FMA changes the bits) and
// -fno-math-errno (sqrtf is the sqrtss instruction, so the loops vectorize; no
// value changes).
#include <cmath>
#include <vector>

#include "clip_cpu.h"
#include "clipops.h"
#include "optim_launch.h"

namespace clipops {
namespace {

using namespace detail;

// One chunk of one tensor, element by element: g clipped in its own dtype (the
// clip's output bits), made float32, then the rule. The local copies of op and
// rule, and restrict (validate_update rejects overlaps), let the loop vectorize.
template <int DT, typename Op, typename Rule>
inline void update_loop(const typename Storage<DT>::type* __restrict g, float* __restrict p,
                        float* __restrict m, float* __restrict v, int64_t count,
                        const Op& op_ref, const Rule& rule_ref, bool decay) {
  const Op op = op_ref;
  const Rule rule = rule_ref;
  for (int64_t i = 0; i < count; ++i) {
    float pi = p[i], mi = 0.0f, vi = 0.0f;
    if constexpr (Rule::kUsesM) mi = m[i];
    if constexpr (Rule::kUsesV) vi = v[i];
    rule(to_acc<DT>(op(g[i])), pi, mi, vi, decay);
    p[i] = pi;
    if constexpr (Rule::kUsesM) m[i] = mi;
    if constexpr (Rule::kUsesV) v[i] = vi;
  }
}

// AVX2 clones of every (gradient dtype, clip op, rule) loop. Overloads: the
// 16-bit dtypes share a storage type, so the op's type tells them apart.
#define CLIPOPS_UPDATE_CLONE(DT, T, OP, RULE)                                              \
  CLIPOPS_SIMD_CLONES void update_chunk(const T* g, float* p, float* m, float* v,          \
                                        int64_t count, const OP& op, const RULE& rule,     \
                                        bool decay) {                                      \
    update_loop<DT>(g, p, m, v, count, op, rule, decay);                                   \
  }
#define CLIPOPS_UPDATE_RULES(DT, T, OP)                \
  CLIPOPS_UPDATE_CLONE(DT, T, OP, SgdRule)             \
  CLIPOPS_UPDATE_CLONE(DT, T, OP, SgdMomentumRule)     \
  CLIPOPS_UPDATE_CLONE(DT, T, OP, SgdNesterovRule)     \
  CLIPOPS_UPDATE_CLONE(DT, T, OP, AdamRule)
#define CLIPOPS_UPDATE_OPS(DT, T, SCALER, NORM, VALUE) \
  CLIPOPS_UPDATE_RULES(DT, T, SCALER)                  \
  CLIPOPS_UPDATE_RULES(DT, T, NORM)                    \
  CLIPOPS_UPDATE_RULES(DT, T, VALUE)
typedef Scaler<kFloat32> ScalerF32;
typedef Scaler<kFloat16> ScalerF16;
typedef Scaler<kBFloat16> ScalerBF16;
typedef NormClipper<kFloat32> NormF32;
typedef NormClipper<kFloat16> NormF16;
typedef NormClipper<kBFloat16> NormBF16;
typedef ValueClipper<kFloat32> ValueF32;
typedef ValueClipper<kFloat16> ValueF16;
typedef ValueClipper<kBFloat16> ValueBF16;
CLIPOPS_UPDATE_OPS(kFloat32, float, ScalerF32, NormF32, ValueF32)
CLIPOPS_UPDATE_OPS(kFloat16, unsigned short, ScalerF16, NormF16, ValueF16)
CLIPOPS_UPDATE_OPS(kBFloat16, unsigned short, ScalerBF16, NormBF16, ValueBF16)
#undef CLIPOPS_UPDATE_OPS
#undef CLIPOPS_UPDATE_RULES
#undef CLIPOPS_UPDATE_CLONE

}  // namespace

float keras_cpu_power(float beta, int64_t t) {
  // std::pow(float, float) is the C library's powf, which TensorFlow's CPU Pow
  // kernel calls on 0-d tensors (Eigen's scalar path): the same function in
  // one process, so the same bits.
  return std::pow(beta, static_cast<float>(t));
}

Status update_cpu(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                  const ParallelFor& parallel_for) {
  Status status = validate_update(params, num_tensors, args);
  if (!status.ok()) return status;
  if (args.clip.device_ptr != nullptr || args.unscale.device_ptr != nullptr ||
      args.learning_rate.device_ptr != nullptr || args.beta_1_power.device_ptr != nullptr ||
      args.beta_2_power.device_ptr != nullptr)
    return Status::Error("the CPU kernel takes its scalar arguments as host values");
  const ScopedIeeeSubnormals ieee;  // for the norm and the step's scalars, on this thread
  const UpdateParams a = update_params(args);
  const UpdatePlan plan = plan_of(a);
  const long long iterations = a.iterations_ptr != nullptr ? *a.iterations_ptr : a.iterations_value;

  const std::vector<TensorDesc> grads = grad_descs(params, num_tensors);
  const std::vector<int64_t> first_item = first_items(grads.data(), num_tensors);
  const int64_t items = first_item[num_tensors];
  int64_t elements = 0;
  for (int t = 0; t < num_tensors; ++t) elements += params[t].numel;
  const ParallelFor& run = pool_for(elements, parallel_for);

  // the norm pass: the clip's partials, sums and roundings (clip_cpu.h)
  std::vector<double> partials(plan.partials ? items : 0);
  if (plan.partials) norm_partials(grads.data(), first_item, partials.data(), run);
  std::vector<double> own_norms(a.clip_mode == kClipByNorm ? num_tensors : 0);
  if (plan.tensor_sumsq)
    for (int t = 0; t < num_tensors; ++t) {
      const double u =
          sum_partials(partials.data(), first_item[t], first_item[t + 1] - first_item[t]);
      if (a.tensor_norms != nullptr)
        store_norm_at(a.tensor_norms, t, norm_from_sumsq(u, a.norm_dtype, a.unscale_value),
                      a.norm_dtype);
      if (a.clip_mode == kClipByNorm) own_norms[t] = norm_from_sumsq(u, grads[t].dtype);  // as TF
    }
  const double norm = plan.global_norm ? norm_from_sumsq(sum_partials(partials.data(), 0, items),
                                                         a.norm_dtype, a.unscale_value)
                                       : 0.0;
  if (a.norm_out != nullptr) store_norm(a.norm_out, norm, a.norm_dtype);
  if (a.skip_nonfinite && !is_finite_d(norm)) return Status::Ok();  // nothing written

  const StepScalars s = step_scalars(a, a.lr_value, a.beta_1_power_value, a.beta_2_power_value,
                                     iterations);
  const double scale = gradient_scale(a, norm, a.clip_value, a.unscale_value);
  run(items, kCostPerItem, [&](int64_t begin, int64_t end) {
    const ScopedIeeeSubnormals ieee_worker;
    for_items(grads.data(), first_item, begin, end,
              [&](const TensorDesc& g, int64_t offset, int64_t count, int64_t) {
                const int t = static_cast<int>(&g - grads.data());
                const ParamDesc& pd = params[t];
                float* p = pd.param + offset;
                float* m = pd.m == nullptr ? nullptr : pd.m + offset;
                float* v = pd.v == nullptr ? nullptr : pd.v + offset;
                const double own = a.clip_mode == kClipByNorm ? own_norms[t] : 0.0;
                dispatch(g.dtype, [&](auto dt) {
                  constexpr int DT = decltype(dt)::value;
                  if constexpr (DT != kFloat64) {  // validate_update rejects float64 gradients
                    using T = typename Storage<DT>::type;
                    const T* gp = static_cast<const T*>(g.in) + offset;
                    auto with_op = [&](const auto& op) {
                      auto run_rule = [&](const auto& rule) {
                        update_chunk(gp, p, m, v, count, op, rule, pd.decay);
                      };
                      switch (rule_kind(a)) {
                        case kRuleAdam: return run_rule(adam_rule(a, s));
                        case kRuleNesterov: return run_rule(momentum_rule<true>(a, s));
                        case kRuleMomentum: return run_rule(momentum_rule<false>(a, s));
                        default: return run_rule(sgd_rule(a, s));
                      }
                    };
                    switch (a.clip_mode) {
                      case kClipByNorm: return with_op(norm_op<DT>(a.clip_value, own));
                      case kClipByValue: return with_op(value_op<DT>(a.clip_value));
                      default: return with_op(scale_op<DT>(scale));
                    }
                  }
                });
              });
  });
  if (a.increment_iterations) *a.iterations_ptr = iterations + 1;
  return Status::Ok();
}

}  // namespace clipops
