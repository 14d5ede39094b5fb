// pybind11 adapter: exposes the core to the NumPy and CuPy front ends
// (clipops/numpy.py, clipops/cupy.py). It takes raw pointers so that it needs
// neither NumPy's nor CuPy's headers; the Python side keeps the arrays alive.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>
#include <vector>

#include "clipops.h"
#include "core_args.h"

namespace py = pybind11;

using clipops_py::Desc;
using clipops_py::raise_if_error;
using clipops_py::to_args;
using clipops_py::to_descs;

// clip_cuda and clip_driver: one launcher's call over device buffers. The GIL
// is released: the driver route's first call compiles for seconds.
template <auto kLauncher, typename Stream>
void launch(const std::vector<Desc>& descs, int norm_dtype, bool scale, double clip_norm,
            uintptr_t clip_ptr, std::optional<double> use_norm, uintptr_t use_ptr,
            uintptr_t norm_out, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream,
            bool check_overlap, uintptr_t tensor_norms, bool skip_nonfinite, int mode,
            double clip_min, uintptr_t clip_min_ptr, double clip_max, uintptr_t clip_max_ptr,
            double unscale, uintptr_t unscale_ptr) {
  const auto t = to_descs(descs);
  const auto args = to_args(norm_dtype, scale, clip_norm, clip_ptr, use_norm, use_ptr, norm_out,
                            check_overlap, tensor_norms, skip_nonfinite, mode, clip_min,
                            clip_min_ptr, clip_max, clip_max_ptr, unscale, unscale_ptr);
  clipops::Status s;
  {
    py::gil_scoped_release release;
    s = kLauncher(t.data(), static_cast<int>(t.size()), args, reinterpret_cast<void*>(workspace),
                  workspace_bytes, reinterpret_cast<Stream>(stream));
  }
  raise_if_error(s);
}

#define LAUNCH_ARGS                                                                            \
  py::arg("descs"), py::arg("norm_dtype"), py::arg("scale"), py::arg("clip_norm"),             \
      py::arg("clip_ptr"), py::arg("use_norm"), py::arg("use_ptr"), py::arg("norm_out"),       \
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),                     \
      py::arg("check_overlap") = true, py::arg("tensor_norms") = 0,                            \
      py::arg("skip_nonfinite") = false, py::arg("mode") = 0, py::arg("clip_min") = 0.0,      \
      py::arg("clip_min_ptr") = 0, py::arg("clip_max") = 0.0, py::arg("clip_max_ptr") = 0,    \
      py::arg("unscale") = 1.0, py::arg("unscale_ptr") = 0

PYBIND11_MODULE(_core, m) {
  m.doc() = "clipops core: fused global-norm clipping (CPU and CUDA), framework-free";
  m.attr("CHUNK") = clipops::detail::kChunk;
  m.attr("LANES") = clipops::detail::kLanes;
  m.attr("THREADS") = clipops::detail::kThreads;
  m.attr("MODES") = py::dict(py::arg("global_norm") = int(clipops::kClipByGlobalNorm),
                             py::arg("norm") = int(clipops::kClipByNorm),
                             py::arg("value") = int(clipops::kClipByValue));
  m.attr("DTYPE_CODES") = py::dict(py::arg("float16") = int(clipops::kFloat16),
                                   py::arg("bfloat16") = int(clipops::kBFloat16),
                                   py::arg("float32") = int(clipops::kFloat32),
                                   py::arg("float64") = int(clipops::kFloat64));

  m.def("cuda_compiled", &clipops::cuda_compiled,
        "True when the CUDA kernel was compiled into this build.");

  m.def(
      "norm_dtype_of",
      [](const std::vector<int>& dtypes) {
        std::vector<clipops::TensorDesc> d(dtypes.size());
        for (size_t i = 0; i < d.size(); ++i) d[i].dtype = dtypes[i];
        return clipops::norm_dtype_of(d.data(), static_cast<int>(d.size()));
      },
      py::arg("dtype_codes"), "The norm's dtype code: the common dtype, or float32 if mixed.");

  m.def(
      "clip_cpu",
      [](const std::vector<Desc>& descs, int norm_dtype, bool scale, double clip_norm,
         std::optional<double> use_norm, uintptr_t norm_out, bool check_overlap,
         uintptr_t tensor_norms, bool skip_nonfinite, int mode, double clip_min, double clip_max,
         double unscale) {
        const auto t = to_descs(descs);
        const auto args = to_args(norm_dtype, scale, clip_norm, 0, use_norm, 0, norm_out,
                                  check_overlap, tensor_norms, skip_nonfinite, mode, clip_min, 0,
                                  clip_max, 0, unscale, 0);
        clipops::Status s;
        {
          py::gil_scoped_release release;
          s = clipops::clip_by_global_norm_cpu(t.data(), static_cast<int>(t.size()), args,
                                               clipops::default_parallel_for());
        }
        raise_if_error(s);
      },
      py::arg("descs"), py::arg("norm_dtype"), py::arg("scale"), py::arg("clip_norm"),
      py::arg("use_norm"), py::arg("norm_out"), py::arg("check_overlap") = true,
      py::arg("tensor_norms") = 0, py::arg("skip_nonfinite") = false, py::arg("mode") = 0,
      py::arg("clip_min") = 0.0, py::arg("clip_max") = 0.0, py::arg("unscale") = 1.0,
      "Run the CPU kernel over host buffers; raises ValueError on invalid input. tensor_norms: "
      "the address of one norm-dtype element per tensor, or 0. mode: 0 clip by the global "
      "norm, 1 by each tensor's norm (clip_norm), 2 by value (clip_min, clip_max). unscale: "
      "mode 0 takes the inputs as x * unscale (ClipArgs::unscale).");

  m.def(
      "cuda_workspace_bytes",
      [](const std::vector<Desc>& descs) {
        const auto t = to_descs(descs);
        return clipops::cuda_workspace_bytes(t.data(), static_cast<int>(t.size()));
      },
      py::arg("descs"), "Device workspace bytes clip_cuda needs for this list.");

  m.def("clip_cuda", &launch<clipops::clip_by_global_norm_cuda, cudaStream_t>,
        LAUNCH_ARGS,
        "One cooperative launch on `stream` over device buffers; never waits for the GPU.");

  m.def(
      "configure_driver",
      [](const std::string& nvrtc_library, const std::string& cuda_library,
         const std::vector<std::string>& include_dirs, const std::string& kernel_dir,
         const std::string& cache_dir) {
        clipops::DriverConfig c;
        c.nvrtc_library = nvrtc_library;
        c.cuda_library = cuda_library;
        c.include_dirs = include_dirs;
        c.kernel_dir = kernel_dir;
        c.cache_dir = cache_dir;
        clipops::configure_driver_route(c);
      },
      py::arg("nvrtc_library"), py::arg("cuda_library"), py::arg("include_dirs"),
      py::arg("kernel_dir"), py::arg("cache_dir"),
      "Where the driver route (clip_driver) finds NVRTC, the driver, headers, sources and cache.");

  m.def("clip_driver", &launch<clipops::clip_by_global_norm_driver, CUstream>,
        LAUNCH_ARGS,
        "clip_cuda through the driver route (NVRTC at first use, the driver API): the TF op's "
        "GPU route. Raises ValueError on invalid input, RuntimeError otherwise.");
}
