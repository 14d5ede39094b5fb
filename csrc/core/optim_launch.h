// The host side of the fused update shared by its CPU kernel (optim_cpu.cc) and
// its CUDA launcher (optim_cuda.cu): the kernel's parameters from UpdateArgs,
// the workspace layout, and the launch preparation both launchers share.
//
// Workspace: the gradients' TensorEntry table (clip_math.h), then the
// StateEntry table (optim_math.h), 16-byte aligned, then one double of
// partials per work item, then one double per tensor (each tensor's own norm,
// kClipByNorm).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "clip_launch.h"
#include "clipops.h"

namespace clipops {
namespace detail {

inline UpdateParams update_params(const UpdateArgs& a) {
  UpdateParams p{};
  p.clip_ptr = a.clip.device_ptr;
  p.unscale_ptr = a.unscale.device_ptr;
  p.lr_ptr = a.learning_rate.device_ptr;
  p.beta_1_power_ptr = a.beta_1_power.device_ptr;
  p.beta_2_power_ptr = a.beta_2_power.device_ptr;
  p.iterations_ptr = reinterpret_cast<long long*>(a.iterations.ptr);
  p.norm_out = a.norm_out;
  p.tensor_norms = a.tensor_norms;
  p.clip_value = a.clip.value;
  p.unscale_value = a.unscale.value;
  p.lr_value = a.learning_rate.value;
  p.beta_1_power_value = a.beta_1_power.value;
  p.beta_2_power_value = a.beta_2_power.value;
  p.iterations_value = a.iterations.value;
  p.momentum = a.momentum;
  p.one_minus_beta_1 = a.one_minus_beta_1;
  p.one_minus_beta_2 = a.one_minus_beta_2;
  p.epsilon = a.epsilon;
  p.weight_decay = a.weight_decay;
  p.beta_1 = a.beta_1;
  p.beta_2 = a.beta_2;
  p.rule = a.rule;
  p.clip_mode = a.clip_mode;
  p.norm_dtype = a.norm_dtype;
  p.skip_nonfinite = a.skip_nonfinite ? 1 : 0;
  p.nesterov = a.nesterov ? 1 : 0;
  p.power_source = a.power_source;
  p.increment_iterations = a.iterations.increment && a.iterations.ptr != nullptr ? 1 : 0;
  p.has_momentum = a.rule == kSGD && a.momentum != 0.0f ? 1 : 0;
  return p;
}

// The gradients as the clip's descriptors (norm only: no output).
inline std::vector<TensorDesc> grad_descs(const ParamDesc* params, int num_tensors) {
  std::vector<TensorDesc> d(num_tensors);
  for (int i = 0; i < num_tensors; ++i)
    d[i] = TensorDesc{params[i].grad, nullptr, params[i].numel, params[i].grad_dtype};
  return d;
}

inline size_t update_states_offset(int num_tensors) {
  return align16(sizeof(TensorEntry) * static_cast<size_t>(num_tensors));
}
inline size_t update_partials_offset(int num_tensors) {
  return update_states_offset(num_tensors) +
         align16(sizeof(StateEntry) * static_cast<size_t>(num_tensors));
}

// Fills the two tables and returns the number of work items.
inline long long build_update_tables(const ParamDesc* params, int num_tensors,
                                     std::vector<TensorEntry>* grads,
                                     std::vector<StateEntry>* states) {
  const std::vector<TensorDesc> d = grad_descs(params, num_tensors);
  const long long items = build_table(d.data(), num_tensors, grads);
  states->resize(num_tensors);
  for (int i = 0; i < num_tensors; ++i)
    (*states)[i] =
        StateEntry{params[i].param, params[i].m, params[i].v, params[i].decay ? 1 : 0, 0};
  return items;
}

// clipops_update_kernel's parameters for a launch API that takes `void**
// params` (cudaLaunchCooperativeKernel, cuLaunchCooperativeKernel), in the
// kernel's order, the tables and partials placed in the workspace as above.
// Not copyable: params points into it.
struct UpdateKernelArgs {
  const TensorEntry* grads;
  const StateEntry* states;
  int num_tensors;
  long long items;
  double* partials;
  UpdateParams a;  // by value: no second copy to the device
  void* params[6];

  UpdateKernelArgs(void* workspace, int n, long long num_items, const UpdateArgs& args)
      : grads(static_cast<const TensorEntry*>(workspace)),
        states(reinterpret_cast<const StateEntry*>(static_cast<char*>(workspace) +
                                                   update_states_offset(n))),
        num_tensors(n),
        items(num_items),
        partials(reinterpret_cast<double*>(static_cast<char*>(workspace) +
                                           update_partials_offset(n))),
        a(update_params(args)),
        params{&grads, &states, &num_tensors, &items, &partials, &a} {}
  UpdateKernelArgs(const UpdateKernelArgs&) = delete;
  UpdateKernelArgs& operator=(const UpdateKernelArgs&) = delete;
};

// What both launchers of the update kernel (optim_cuda.cu, runtime API; and
// clip_driver.cc's update_driver, driver API) do before touching the GPU:
// validate the input and the workspace, then build the host image of both
// tables, laid out as in the workspace (one copy to the device), and count the
// work items. Nothing is written on failure.
inline Status prepare_update_launch(const ParamDesc* params, int num_tensors,
                                    const UpdateArgs& args, const void* workspace,
                                    size_t workspace_bytes, std::vector<char>* image,
                                    long long* items) {
  Status status = validate_update(params, num_tensors, args);
  if (!status.ok()) return status;
  if (workspace == nullptr || workspace_bytes < update_cuda_workspace_bytes(params, num_tensors))
    return Status::Error(
        "the CUDA workspace is missing or smaller than update_cuda_workspace_bytes()");
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::Error("the CUDA workspace must be 16-byte aligned");
  thread_local std::vector<TensorEntry> grads;
  thread_local std::vector<StateEntry> states;
  *items = build_update_tables(params, num_tensors, &grads, &states);
  const size_t states_at = update_states_offset(num_tensors);
  image->assign(states_at + sizeof(StateEntry) * static_cast<size_t>(num_tensors), 0);
  if (num_tensors > 0) {
    std::memcpy(image->data(), grads.data(), sizeof(TensorEntry) * num_tensors);
    std::memcpy(image->data() + states_at, states.data(), sizeof(StateEntry) * num_tensors);
  }
  return Status::Ok();
}

}  // namespace detail
}  // namespace clipops
