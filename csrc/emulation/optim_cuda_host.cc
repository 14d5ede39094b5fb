// The fused update's CUDA kernel and launcher (csrc/core/optim_cuda.cu,
// optim_kernel.cuh), UNCHANGED, compiled as host C++ against the CUDA
// emulation, as clip_cuda_host.cc does for the clip.
#include "optim_cuda.cu"

#include <cstddef>
#include <string>
#include <tuple>
#include <vector>

#include "emu.h"

namespace clipops_emu {

void register_optim_kernels() { register_kernel(clipops_update_kernel, "clipops_update_kernel"); }

#define CLIPOPS_EMU_FIELD(S, f) std::make_tuple(std::string(#f), offsetof(S, f), sizeof(S::f))

std::vector<std::tuple<std::string, size_t, size_t>> state_entry_fields() {
  using clipops::detail::StateEntry;
  return {CLIPOPS_EMU_FIELD(StateEntry, param), CLIPOPS_EMU_FIELD(StateEntry, m),
          CLIPOPS_EMU_FIELD(StateEntry, v), CLIPOPS_EMU_FIELD(StateEntry, decay),
          CLIPOPS_EMU_FIELD(StateEntry, pad)};
}
size_t state_entry_size() { return sizeof(clipops::detail::StateEntry); }

std::vector<std::tuple<std::string, size_t, size_t>> update_params_fields() {
  using clipops::detail::UpdateParams;
  return {
      CLIPOPS_EMU_FIELD(UpdateParams, clip_ptr),
      CLIPOPS_EMU_FIELD(UpdateParams, unscale_ptr),
      CLIPOPS_EMU_FIELD(UpdateParams, lr_ptr),
      CLIPOPS_EMU_FIELD(UpdateParams, beta_1_power_ptr),
      CLIPOPS_EMU_FIELD(UpdateParams, beta_2_power_ptr),
      CLIPOPS_EMU_FIELD(UpdateParams, iterations_ptr),
      CLIPOPS_EMU_FIELD(UpdateParams, norm_out),
      CLIPOPS_EMU_FIELD(UpdateParams, tensor_norms),
      CLIPOPS_EMU_FIELD(UpdateParams, clip_value),
      CLIPOPS_EMU_FIELD(UpdateParams, unscale_value),
      CLIPOPS_EMU_FIELD(UpdateParams, lr_value),
      CLIPOPS_EMU_FIELD(UpdateParams, beta_1_power_value),
      CLIPOPS_EMU_FIELD(UpdateParams, beta_2_power_value),
      CLIPOPS_EMU_FIELD(UpdateParams, iterations_value),
      CLIPOPS_EMU_FIELD(UpdateParams, momentum),
      CLIPOPS_EMU_FIELD(UpdateParams, one_minus_beta_1),
      CLIPOPS_EMU_FIELD(UpdateParams, one_minus_beta_2),
      CLIPOPS_EMU_FIELD(UpdateParams, epsilon),
      CLIPOPS_EMU_FIELD(UpdateParams, weight_decay),
      CLIPOPS_EMU_FIELD(UpdateParams, beta_1),
      CLIPOPS_EMU_FIELD(UpdateParams, beta_2),
      CLIPOPS_EMU_FIELD(UpdateParams, pad_f),
      CLIPOPS_EMU_FIELD(UpdateParams, rule),
      CLIPOPS_EMU_FIELD(UpdateParams, clip_mode),
      CLIPOPS_EMU_FIELD(UpdateParams, norm_dtype),
      CLIPOPS_EMU_FIELD(UpdateParams, skip_nonfinite),
      CLIPOPS_EMU_FIELD(UpdateParams, nesterov),
      CLIPOPS_EMU_FIELD(UpdateParams, power_source),
      CLIPOPS_EMU_FIELD(UpdateParams, increment_iterations),
      CLIPOPS_EMU_FIELD(UpdateParams, has_momentum)};
}
size_t update_params_size() { return sizeof(clipops::detail::UpdateParams); }

#undef CLIPOPS_EMU_FIELD

}  // namespace clipops_emu
