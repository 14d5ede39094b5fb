// Turning the pybind11 modules' plain arguments into the core's descriptors, and
// the core's Status into Python exceptions. Shared by clipops._core
// (csrc/python/module.cc) and clipops._emulation (csrc/emulation/module.cc).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "clipops.h"

namespace clipops_py {

// (input address, output address or 0, element count, dtype code)
using Desc = std::tuple<uintptr_t, uintptr_t, int64_t, int>;

inline std::vector<clipops::TensorDesc> to_descs(const std::vector<Desc>& descs) {
  std::vector<clipops::TensorDesc> out(descs.size());
  for (size_t i = 0; i < descs.size(); ++i) {
    out[i].in = reinterpret_cast<const void*>(std::get<0>(descs[i]));
    out[i].out = reinterpret_cast<void*>(std::get<1>(descs[i]));
    out[i].numel = std::get<2>(descs[i]);
    out[i].dtype = std::get<3>(descs[i]);
  }
  return out;
}

inline clipops::ClipArgs to_args(int norm_dtype, bool scale, double clip, uintptr_t clip_ptr,
                                 std::optional<double> use_norm, uintptr_t use_ptr,
                                 uintptr_t norm_out, bool check_overlap,
                                 uintptr_t tensor_norms = 0, bool skip_nonfinite = false,
                                 int mode = 0, double clip_min = 0.0, uintptr_t clip_min_ptr = 0,
                                 double clip_max = 0.0, uintptr_t clip_max_ptr = 0,
                                 double unscale = 1.0, uintptr_t unscale_ptr = 0) {
  clipops::ClipArgs a;
  a.norm_dtype = norm_dtype;
  a.scale = scale;
  a.clip_norm = {clip, reinterpret_cast<const void*>(clip_ptr)};
  a.has_use_norm = use_norm.has_value() || use_ptr != 0;
  a.use_norm = {use_norm.value_or(0.0), reinterpret_cast<const void*>(use_ptr)};
  a.norm_out = reinterpret_cast<void*>(norm_out);
  a.check_overlap = check_overlap;
  a.tensor_norms = reinterpret_cast<void*>(tensor_norms);
  a.skip_nonfinite = skip_nonfinite;
  a.mode = mode;
  a.clip_min = {clip_min, reinterpret_cast<const void*>(clip_min_ptr)};
  a.clip_max = {clip_max, reinterpret_cast<const void*>(clip_max_ptr)};
  a.unscale = {unscale, reinterpret_cast<const void*>(unscale_ptr)};
  return a;
}

// Bad input: ValueError; a CUDA failure: RuntimeError.
inline void raise_if_error(const clipops::Status& s) {
  if (s.code == clipops::Status::kInvalidArgument) throw pybind11::value_error(s.message);
  if (!s.ok()) throw std::runtime_error(s.message);
}

}  // namespace clipops_py
