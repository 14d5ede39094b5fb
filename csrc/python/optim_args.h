// The fused update's arguments for the pybind11 modules (clipops._core and
// clipops._emulation): the parameter list as tuples of addresses, and
// clipops::UpdateArgs as a Python class whose fields the front ends set.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "clipops.h"

namespace clipops_py {

// (param, grad, grad dtype code, m or 0, v or 0, element count, decay)
using ParamTuple = std::tuple<uintptr_t, uintptr_t, int, uintptr_t, uintptr_t, int64_t, bool>;

inline std::vector<clipops::ParamDesc> to_param_descs(const std::vector<ParamTuple>& tuples) {
  std::vector<clipops::ParamDesc> out(tuples.size());
  for (size_t i = 0; i < tuples.size(); ++i) {
    const auto& t = tuples[i];
    out[i].param = reinterpret_cast<float*>(std::get<0>(t));
    out[i].grad = reinterpret_cast<const void*>(std::get<1>(t));
    out[i].grad_dtype = std::get<2>(t);
    out[i].m = reinterpret_cast<float*>(std::get<3>(t));
    out[i].v = reinterpret_cast<float*>(std::get<4>(t));
    out[i].numel = std::get<5>(t);
    out[i].decay = std::get<6>(t);
  }
  return out;
}

// A Scalar as two properties: `name` (the host value) and `name_ptr` (the
// device address, 0 for none).
template <typename Class>
void scalar_property(Class& cls, const char* name, const char* ptr_name,
                     clipops::Scalar clipops::UpdateArgs::*member) {
  cls.def_property(
      name, [member](const clipops::UpdateArgs& a) { return (a.*member).value; },
      [member](clipops::UpdateArgs& a, double v) { (a.*member).value = v; });
  cls.def_property(
      ptr_name,
      [member](const clipops::UpdateArgs& a) {
        return reinterpret_cast<uintptr_t>((a.*member).device_ptr);
      },
      [member](clipops::UpdateArgs& a, uintptr_t p) {
        (a.*member).device_ptr = reinterpret_cast<const void*>(p);
      });
}

// Binds clipops::UpdateArgs as `UpdateArgs` in module m (module-local: each
// module that holds a copy of the core binds its own).
inline void bind_update_args(pybind11::module_& m) {
  namespace py = pybind11;
  using clipops::UpdateArgs;
  py::class_<UpdateArgs> cls(m, "UpdateArgs", py::module_local(),
                             "clipops::UpdateArgs (clipops.h): the fused update's arguments. "
                             "Scalars X have X (a host value) and X_ptr (a device address).");
  cls.def(py::init<>())
      .def_readwrite("rule", &UpdateArgs::rule)
      .def_readwrite("clip_mode", &UpdateArgs::clip_mode)
      .def_readwrite("norm_dtype", &UpdateArgs::norm_dtype)
      .def_readwrite("skip_nonfinite", &UpdateArgs::skip_nonfinite)
      .def_readwrite("check_overlap", &UpdateArgs::check_overlap)
      .def_readwrite("weight_decay", &UpdateArgs::weight_decay)
      .def_readwrite("momentum", &UpdateArgs::momentum)
      .def_readwrite("nesterov", &UpdateArgs::nesterov)
      .def_readwrite("one_minus_beta_1", &UpdateArgs::one_minus_beta_1)
      .def_readwrite("one_minus_beta_2", &UpdateArgs::one_minus_beta_2)
      .def_readwrite("epsilon", &UpdateArgs::epsilon)
      .def_readwrite("power_source", &UpdateArgs::power_source)
      .def_readwrite("beta_1", &UpdateArgs::beta_1)
      .def_readwrite("beta_2", &UpdateArgs::beta_2);
  cls.def_property(
      "norm_out", [](const UpdateArgs& a) { return reinterpret_cast<uintptr_t>(a.norm_out); },
      [](UpdateArgs& a, uintptr_t p) { a.norm_out = reinterpret_cast<void*>(p); });
  cls.def_property(
      "tensor_norms",
      [](const UpdateArgs& a) { return reinterpret_cast<uintptr_t>(a.tensor_norms); },
      [](UpdateArgs& a, uintptr_t p) { a.tensor_norms = reinterpret_cast<void*>(p); });
  cls.def_property(
      "iterations", [](const UpdateArgs& a) { return a.iterations.value; },
      [](UpdateArgs& a, int64_t v) { a.iterations.value = v; });
  cls.def_property(
      "iterations_ptr",
      [](const UpdateArgs& a) { return reinterpret_cast<uintptr_t>(a.iterations.ptr); },
      [](UpdateArgs& a, uintptr_t p) { a.iterations.ptr = reinterpret_cast<int64_t*>(p); });
  cls.def_property(
      "increment_iterations", [](const UpdateArgs& a) { return a.iterations.increment; },
      [](UpdateArgs& a, bool v) { a.iterations.increment = v; });
  scalar_property(cls, "clip", "clip_ptr", &UpdateArgs::clip);
  scalar_property(cls, "unscale", "unscale_ptr", &UpdateArgs::unscale);
  scalar_property(cls, "learning_rate", "learning_rate_ptr", &UpdateArgs::learning_rate);
  scalar_property(cls, "beta_1_power", "beta_1_power_ptr", &UpdateArgs::beta_1_power);
  scalar_property(cls, "beta_2_power", "beta_2_power_ptr", &UpdateArgs::beta_2_power);

  m.attr("UPDATE_RULES") = py::dict(py::arg("sgd") = int(clipops::kSGD),
                                    py::arg("adam") = int(clipops::kAdam));
  m.attr("UPDATE_CLIPS") = py::dict(py::arg("global_norm") = int(clipops::kClipByGlobalNorm),
                                    py::arg("norm") = int(clipops::kClipByNorm),
                                    py::arg("value") = int(clipops::kClipByValue),
                                    py::arg("none") = clipops::kNoClip);
  m.attr("POWER_SOURCES") = py::dict(py::arg("given") = int(clipops::kPowersGiven),
                                     py::arg("from_step") = int(clipops::kPowersFromStep));
}

}  // namespace clipops_py
