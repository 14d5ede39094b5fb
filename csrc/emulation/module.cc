// clipops._emulation's bindings: the CUDA kernel and its launcher (csrc/core, unchanged)
// run on the CPU by the CUDA emulation, for tests/test_emulation.py. Pointers
// are plain host addresses ("device memory" is host memory here).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "clipops.h"
#include "core_args.h"
#include "optim_args.h"
#include "emu.h"

namespace py = pybind11;

namespace clipops_emu {
void register_core_kernels();
void register_optim_kernels();
void register_probe_kernels();
const void* probe_kernel(const std::string& name);
std::vector<std::tuple<std::string, size_t, size_t>> tensor_entry_fields();
size_t tensor_entry_size();
std::vector<std::tuple<std::string, size_t, size_t>> state_entry_fields();
std::vector<std::tuple<std::string, size_t, size_t>> update_params_fields();
size_t state_entry_size();
size_t update_params_size();
}  // namespace clipops_emu

namespace {

using clipops_emu::Order;

using clipops_py::Desc;
using clipops_py::to_descs;

Order to_order(const std::string& name) {
  if (name == "forward") return Order::kForward;
  if (name == "reverse") return Order::kReverse;
  if (name == "random") return Order::kRandom;
  throw py::value_error("order must be 'forward', 'reverse' or 'random', not '" + name + "'");
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void sync_or_raise() {
  std::string error;
  {
    py::gil_scoped_release release;
    error = clipops_emu::synchronize();
  }
  if (!error.empty()) throw std::runtime_error("CUDA emulation: " + error);
}

}  // namespace

namespace clipops_emu {

// The module's contents; module_init.cc names the module (one per kernel variant).
void bind(py::module_& m) {
  m.doc() = "clipops' CUDA kernel and launcher run on the CPU by a CUDA emulation (for tests)";
  clipops_emu::register_core_kernels();
  clipops_emu::register_optim_kernels();
  clipops_emu::register_probe_kernels();

  m.def(
      "configure",
      [](const std::string& thread_order, const std::string& block_order, unsigned long long seed,
         unsigned int extra_blocks, double watchdog_s) {
        clipops_emu::configure({to_order(thread_order), to_order(block_order), seed, extra_blocks,
                                watchdog_s});
      },
      py::arg("thread_order") = "forward", py::arg("block_order") = "forward",
      py::arg("seed") = 0, py::arg("extra_blocks") = 0, py::arg("watchdog_s") = 120.0,
      "Orders of the threads within a block and of the blocks ('forward', 'reverse', 'random' "
      "with `seed`), blocks added to every grid, and the watchdog.");

  m.def(
      "device",
      [](int sms, int blocks_per_sm, bool cooperative) {
        if (sms < 1 || blocks_per_sm < 0) throw py::value_error("sms >= 1 and blocks_per_sm >= 0");
        return clipops_emu::device_for(sms, blocks_per_sm, cooperative);
      },
      py::arg("sms"), py::arg("blocks_per_sm"), py::arg("cooperative") = true,
      "The number of the fake device with this configuration (created on first use).");
  m.def("set_device", [](int device) { check(cudaSetDevice(device), "cudaSetDevice"); });
  m.def("stream_create", [] {
    cudaStream_t s;
    check(cudaStreamCreate(&s), "cudaStreamCreate");
    return reinterpret_cast<uintptr_t>(s);
  });
  m.def("synchronize", &sync_or_raise,
        "Runs the queued stream work; raises RuntimeError saying what the emulation detected.");

  m.def(
      "cuda_workspace_bytes",
      [](const std::vector<Desc>& descs) {
        const auto t = to_descs(descs);
        return clipops::cuda_workspace_bytes(t.data(), static_cast<int>(t.size()));
      },
      py::arg("descs"));

  m.def(
      "clip_cuda",
      [](const std::vector<Desc>& descs, int norm_dtype, bool scale, double clip_norm,
         uintptr_t clip_ptr, std::optional<double> use_norm, uintptr_t use_ptr, uintptr_t norm_out,
         uintptr_t workspace, size_t workspace_bytes, uintptr_t stream, uintptr_t tensor_norms,
         bool skip_nonfinite, int mode, double clip_min, uintptr_t clip_min_ptr, double clip_max,
         uintptr_t clip_max_ptr, double unscale, uintptr_t unscale_ptr) {
        const auto t = to_descs(descs);
        const auto a = clipops_py::to_args(norm_dtype, scale, clip_norm, clip_ptr, use_norm,
                                           use_ptr, norm_out, true, tensor_norms, skip_nonfinite,
                                           mode, clip_min, clip_min_ptr, clip_max, clip_max_ptr,
                                           unscale, unscale_ptr);
        clipops_py::raise_if_error(clipops::clip_by_global_norm_cuda(
            t.data(), static_cast<int>(t.size()), a, reinterpret_cast<void*>(workspace),
            workspace_bytes, reinterpret_cast<cudaStream_t>(stream)));
      },
      py::arg("descs"), py::arg("norm_dtype"), py::arg("scale"), py::arg("clip_norm"),
      py::arg("clip_ptr"), py::arg("use_norm"), py::arg("use_ptr"), py::arg("norm_out"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      py::arg("tensor_norms") = 0, py::arg("skip_nonfinite") = false, py::arg("mode") = 0,
      py::arg("clip_min") = 0.0, py::arg("clip_min_ptr") = 0, py::arg("clip_max") = 0.0,
      py::arg("clip_max_ptr") = 0, py::arg("unscale") = 1.0, py::arg("unscale_ptr") = 0,
      "clipops::clip_by_global_norm_cuda, the real launcher; queues its work (see synchronize).");

  m.def(
      "probe",
      [](const std::string& name, unsigned int grid, unsigned int block, bool cooperative,
         uintptr_t out) {
        const void* k = clipops_emu::probe_kernel(name);
        if (k == nullptr) throw py::value_error("no probe kernel '" + name + "'");
        int* p = reinterpret_cast<int*>(out);
        void* args[] = {&p};
        check(cooperative ? cudaLaunchCooperativeKernel(k, dim3(grid), dim3(block), args, 0, nullptr)
                          : cudaLaunchKernel(k, dim3(grid), dim3(block), args, 0, nullptr),
              "launching the probe kernel");
        sync_or_raise();
      },
      py::arg("name"), py::arg("grid"), py::arg("block"), py::arg("cooperative"), py::arg("out"),
      "Runs one of the emulation's own test kernels (probe_kernels.cc) and synchronizes.");

  m.def("launches", [] {
    py::list out;
    for (const auto& l : clipops_emu::stats().launches)
      out.append(py::dict(py::arg("kernel") = l.kernel, py::arg("grid") = l.grid.x,
                          py::arg("block") = l.block.x, py::arg("cooperative") = l.cooperative,
                          py::arg("device") = l.device));
    return out;
  });
  m.def("pageable_copies", [] { return clipops_emu::stats().pageable_copies; });
  m.def("pinned_buffers", [] { return clipops_emu::stats().pinned_buffers; });
  m.def("reset_stats", &clipops_emu::reset_stats);

  // ---- the fused update (optim_cuda.cu, the real launcher) ----
  clipops_py::bind_update_args(m);
  m.def(
      "update_cuda_workspace_bytes",
      [](const std::vector<clipops_py::ParamTuple>& params) {
        const auto d = clipops_py::to_param_descs(params);
        return clipops::update_cuda_workspace_bytes(d.data(), static_cast<int>(d.size()));
      },
      py::arg("params"));
  m.def(
      "update_cuda",
      [](const std::vector<clipops_py::ParamTuple>& params, const clipops::UpdateArgs& args,
         uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
        const auto d = clipops_py::to_param_descs(params);
        clipops_py::raise_if_error(clipops::update_cuda(
            d.data(), static_cast<int>(d.size()), args, reinterpret_cast<void*>(workspace),
            workspace_bytes, reinterpret_cast<cudaStream_t>(stream)));
      },
      py::arg("params"), py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"),
      "clipops::update_cuda, the real launcher; queues its work (see synchronize).");
  // The layouts phase 2's NVRTC route must mirror (StateEntry, UpdateParams).
  m.attr("STATE_ENTRY_SIZE") = clipops_emu::state_entry_size();
  m.attr("STATE_ENTRY_FIELDS") = clipops_emu::state_entry_fields();
  m.attr("UPDATE_PARAMS_SIZE") = clipops_emu::update_params_size();
  m.attr("UPDATE_PARAMS_FIELDS") = clipops_emu::update_params_fields();

  // The layout the NVRTC route's NumPy dtype (clipops/_nvrtc.py) must match.
  m.attr("TENSOR_ENTRY_SIZE") = clipops_emu::tensor_entry_size();
  m.attr("TENSOR_ENTRY_FIELDS") = clipops_emu::tensor_entry_fields();
}

}  // namespace clipops_emu
