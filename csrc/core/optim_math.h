// The fused optimizer update's arithmetic, element by element: Keras 3's
// update_step for SGD (momentum, nesterov), Adam and AdamW, op for op.
//
// Shared by the CPU kernel (optim_cpu.cc) and the CUDA kernel
// (optim_kernel.cuh, also compiled by NVRTC), so both give the same bits. It
// includes nothing but clip_math.h (NVRTC has no standard library).
//
// KERAS' ORDER OF OPERATIONS (keras/src/optimizers/{sgd,adam}.py and
// backend/tensorflow/optimizer.py, Keras 3.15), every op a float32 op with one
// rounding, nothing contracted (the kernels are built with -ffp-contract=off /
// --fmad=false, and device code spells each rounding: __fmul_rn, ...):
//   g = float32(clipped gradient)  (exact from float16 / bfloat16)
//   weight decay, first, for a tensor not excluded (TFOptimizer._apply_weight_decay):
//       p = p - (p * wd) * lr
//   SGD:      p = p - g * lr
//   momentum: m = m * mu - g * lr;  p = p + m
//   nesterov: m = m * mu - g * lr;  p = p + (m * mu - g * lr)
//   Adam:     m = m + (g - m) * c1;  v = v + (g * g - v) * c2
//             p = p - (m * alpha) / (sqrt(v) + eps)
//   with alpha = (lr * sqrt(1 - beta_2^t)) / (1 - beta_1^t) once per step,
//   c1 = float32(1 - beta_1) and c2 = float32(1 - beta_2) of the Python double
//   (Keras writes `1 - self.beta_1`), eps = float32(epsilon), mu =
//   float32(momentum), wd = float32(weight_decay), lr the float32 learning rate.
#pragma once

#include "clip_math.h"

namespace clipops {

// The update rules. AdamW is kAdam with weight decay: Keras' AdamW is Adam plus
// the decoupled weight decay every Keras optimizer applies before update_step.
enum UpdateRule : int { kSGD = 0, kAdam = 1 };

// The fused update's clip: a ClipMode (clip_math.h), or none.
constexpr int kNoClip = 3;

// Where Adam's bias-correction powers beta^t come from.
enum PowerSource : int {
  kPowersGiven = 0,     // beta_1^t, beta_2^t passed in (host values or device scalars)
  kPowersFromStep = 1,  // derived in the kernel from the step counter (power_by_squaring)
};

namespace detail {

CLIPOPS_HD float sub_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

CLIPOPS_HD float sqrt_f(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);  // IEEE correctly rounded (sqrtss), as Eigen's psqrt
#endif
}

// beta^t as the correctly rounded float32 of the exact power, but for a power
// within ~1.4e-14 (relative) of a midpoint between two floats: exponentiation
// by squaring in double (at most 2*63 products, each within 2^-53), rounded
// once to float. Plain IEEE double products: the same bits on every device.
// Keras on TensorFlow's CPU computes tf.pow, the C library's powf, which is not
// always correctly rounded: the two agree within 1 ulp (tests/test_optim.py
// measures how often they differ).
CLIPOPS_HD float power_by_squaring(float beta, long long t) {
  double r = 1.0, x = static_cast<double>(beta);
  while (t > 0) {
    if (t & 1) r = mul_d(r, x);
    x = mul_d(x, x);
    t >>= 1;
  }
  return double_to_float(r);
}

// Keras' Adam step size, op for op: (lr * sqrt(1 - beta_2^t)) / (1 - beta_1^t).
CLIPOPS_HD float adam_alpha(float lr, float beta_1_power, float beta_2_power) {
  return div_f(mul_f(lr, sqrt_f(sub_f(1.0f, beta_2_power))), sub_f(1.0f, beta_1_power));
}

// Weight decay as the TF backend applies it: p - (p * wd) * lr.
CLIPOPS_HD float decayed(float p, float wd, float lr) { return sub_f(p, mul_f(mul_f(p, wd), lr)); }

// ---- the rules, one element each ----------------------------------------------
// One signature for all: the float32 gradient (already clipped), the element's
// param and state (m, v: unused by the rules that have none), and the tensor's
// weight-decay flag (a select, so the CPU loops vectorize). kUsesM / kUsesV
// say which state the kernels load and store.
struct SgdRule {  // no momentum: no state
  static constexpr bool kUsesM = false, kUsesV = false;
  float lr, wd;
  CLIPOPS_HD void operator()(float g, float& p, float&, float&, bool decay) const {
    const float q = decay ? decayed(p, wd, lr) : p;
    p = sub_f(q, mul_f(g, lr));
  }
};

template <bool Nesterov>
struct MomentumRule {
  static constexpr bool kUsesM = true, kUsesV = false;
  float lr, wd, mu;
  CLIPOPS_HD void operator()(float g, float& p, float& m, float&, bool decay) const {
    const float q = decay ? decayed(p, wd, lr) : p;
    const float gl = mul_f(g, lr);
    m = sub_f(mul_f(m, mu), gl);
    p = Nesterov ? add_f(q, sub_f(mul_f(m, mu), gl)) : add_f(q, m);
  }
};
typedef MomentumRule<false> SgdMomentumRule;
typedef MomentumRule<true> SgdNesterovRule;

struct AdamRule {
  static constexpr bool kUsesM = true, kUsesV = true;
  float lr, wd, alpha, c1, c2, eps;
  CLIPOPS_HD void operator()(float g, float& p, float& m, float& v, bool decay) const {
    const float q = decay ? decayed(p, wd, lr) : p;
    m = add_f(m, mul_f(sub_f(g, m), c1));
    v = add_f(v, mul_f(sub_f(mul_f(g, g), v), c2));
    p = sub_f(q, div_f(mul_f(m, alpha), add_f(sqrt_f(v), eps)));
  }
};

// ---- what the kernels are handed ---------------------------------------------------
// Per tensor, beside the gradient's TensorEntry (clip_math.h; its `in` is the
// gradient, `out` unused): the float32 state the update writes. 32 bytes;
// phase 2's NVRTC route mirrors it (csrc/emulation exposes the layout).
struct StateEntry {
  float* param;
  float* m;  // null: SGD without momentum
  float* v;  // null: SGD
  int decay;  // 1: apply weight decay to this tensor
  int pad;
};

// Everything else of one update, passed to the CUDA kernel by value (so no
// second copy to the device) and used by the CPU kernel as is: one plan for
// both. Scalars with a pointer are read through it when it is not null (device
// memory for CUDA, host memory for the CPU); clip and unscale are of
// norm_dtype, learning_rate and the powers float32, iterations int64. 176
// bytes, every field naturally aligned.
struct UpdateParams {
  const void* clip_ptr;
  const void* unscale_ptr;
  const void* lr_ptr;
  const void* beta_1_power_ptr;
  const void* beta_2_power_ptr;
  long long* iterations_ptr;
  void* norm_out;
  void* tensor_norms;
  double clip_value;  // global_clipnorm, clipnorm, or clipvalue v (bounds -v, v)
  double unscale_value;
  double lr_value;
  double beta_1_power_value;
  double beta_2_power_value;
  long long iterations_value;  // Keras' `iterations`: this step is t = iterations + 1
  float momentum, one_minus_beta_1, one_minus_beta_2, epsilon;
  float weight_decay, beta_1, beta_2, pad_f;
  int rule, clip_mode, norm_dtype, skip_nonfinite;
  int nesterov, power_source, increment_iterations, has_momentum;
};

// Which passes an update needs, decided the same way by both kernels.
struct UpdatePlan {
  bool tensor_sumsq;  // each tensor's sum of squares: tensor_norms, or clip by norm
  bool global_norm;   // the list's norm: the global clip, the non-finite skip, norm_out
  bool partials;      // a norm pass over the gradients before the update
};

CLIPOPS_HD UpdatePlan plan_of(const UpdateParams& a) {
  UpdatePlan p;
  p.tensor_sumsq = a.clip_mode == kClipByNorm || a.tensor_norms != nullptr;
  p.global_norm =
      a.clip_mode == kClipByGlobalNorm || a.skip_nonfinite != 0 || a.norm_out != nullptr;
  p.partials = p.tensor_sumsq || p.global_norm;
  return p;
}

// The step's float32 scalars from their float32 inputs: the same IEEE ops on
// every device, so every block (and the CPU) gets the same bits.
struct StepScalars {
  float lr, beta_1_power, beta_2_power, alpha;
};

CLIPOPS_HD StepScalars step_scalars(const UpdateParams& a, double lr, double b1p, double b2p,
                                    long long iterations) {
  StepScalars s;
  s.lr = double_to_float(lr);
  if (a.power_source == kPowersFromStep) {
    s.beta_1_power = power_by_squaring(a.beta_1, iterations + 1);
    s.beta_2_power = power_by_squaring(a.beta_2, iterations + 1);
  } else {
    s.beta_1_power = double_to_float(b1p);
    s.beta_2_power = double_to_float(b2p);
  }
  s.alpha = adam_alpha(s.lr, s.beta_1_power, s.beta_2_power);
  return s;
}

// The scale of the step's gradients for kClipByGlobalNorm and kNoClip: the
// clip's own (step_scale, so the gradients are clip_by_global_norm's outputs,
// bit for bit), or the unscale factor alone. A skipped step writes nothing, so
// the skip is decided by the caller, not here.
CLIPOPS_HD double gradient_scale(const UpdateParams& a, double norm, double clip, double unscale) {
  if (a.clip_mode == kClipByGlobalNorm) return step_scale(norm, clip, a.norm_dtype, false, unscale);
  return unscale;
}

// The rule a step applies, and its object: both kernels dispatch on these
// (a switch each: NVRTC takes no lambdas in device functions).
enum RuleKind : int { kRuleSgd = 0, kRuleMomentum = 1, kRuleNesterov = 2, kRuleAdam = 3 };

CLIPOPS_HD int rule_kind(const UpdateParams& a) {
  if (a.rule == kAdam) return kRuleAdam;
  if (!a.has_momentum) return kRuleSgd;
  return a.nesterov ? kRuleNesterov : kRuleMomentum;
}
CLIPOPS_HD SgdRule sgd_rule(const UpdateParams& a, const StepScalars& s) {
  return SgdRule{s.lr, a.weight_decay};
}
template <bool Nesterov>
CLIPOPS_HD MomentumRule<Nesterov> momentum_rule(const UpdateParams& a, const StepScalars& s) {
  return MomentumRule<Nesterov>{s.lr, a.weight_decay, a.momentum};
}
CLIPOPS_HD AdamRule adam_rule(const UpdateParams& a, const StepScalars& s) {
  return AdamRule{s.lr, a.weight_decay, s.alpha, a.one_minus_beta_1, a.one_minus_beta_2, a.epsilon};
}

// The ops that clip a gradient element of dtype DT in DT, as the clip kernels
// do (their outputs' bits): by the step's scale (the global clip, or none), by
// the tensor's own norm (a value of DT), or to [-clip, clip]. Which one:
// a.clip_mode.
template <int DT> CLIPOPS_HD Scaler<DT> scale_op(double scale) { return Scaler<DT>(scale); }
template <int DT> CLIPOPS_HD NormClipper<DT> norm_op(double clip, double own_norm) {
  return NormClipper<DT>(clip, own_norm);
}
template <int DT> CLIPOPS_HD ValueClipper<DT> value_op(double clip) {
  return ValueClipper<DT>(-clip, clip);
}

}  // namespace detail
}  // namespace clipops
