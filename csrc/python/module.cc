// pybind11 adapter: exposes the core to the NumPy and CuPy front ends
// (clipops/numpy.py, clipops/cupy.py). The CuPy route takes raw pointers, so it
// needs no CuPy headers; the NumPy route (NumpyBatch) reads the arrays through
// pybind11's NumPy API, which finds NumPy at run time, so it needs none of
// NumPy's headers either.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "clipops.h"
#include "core_args.h"
#include "kernel_cache.h"
#include "optim_args.h"
#include "optim_launch.h"

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

// update_cuda and update_driver: the fused update's launchers, likewise.
template <auto kLauncher, typename Stream>
void launch_update(const std::vector<clipops_py::ParamTuple>& params,
                   const clipops::UpdateArgs& args, uintptr_t workspace, size_t workspace_bytes,
                   uintptr_t stream) {
  const auto d = clipops_py::to_param_descs(params);
  clipops::Status s;
  {
    py::gil_scoped_release release;
    s = kLauncher(d.data(), static_cast<int>(d.size()), args, reinterpret_cast<void*>(workspace),
                  workspace_bytes, reinterpret_cast<Stream>(stream));
  }
  raise_if_error(s);
}

// ---- NumPy: the list walked in C++ ------------------------------------------
// A list of NumPy arrays, checked and described once per call without a Python
// loop (a list of 10,000 small arrays cost 3 us per array in Python), and the
// kernel run over it with fresh outputs allocated here.
namespace {

// NumPy's type numbers (stable parts of its ABI) of the dtypes with a fixed
// number; bfloat16 (ml_dtypes) is registered at run time: the caller names it.
int code_of_type_num(int num) {
  switch (num) {
    case 23: return clipops::kFloat16;  // NPY_HALF
    case 11: return clipops::kFloat32;  // NPY_FLOAT
    case 12: return clipops::kFloat64;  // NPY_DOUBLE
    default: return -1;
  }
}

struct HostBlock {  // a capsule's payload: the block a NumPy output lives in
  void* data;
  size_t bytes;
};

// An ndarray shaped and typed like `like`, C-contiguous: over `data` (a view
// whose memory `owner` keeps), or with data null in memory NumPy allocates.
// PyArray_NewFromDescr directly: pybind11's constructor copies the shape and
// computes strides first (a third of the time per small array).
py::array array_like(const py::array& like, void* data, const py::object& owner) {
  const auto& api = py::detail::npy_api::get();
  PyObject* descr = py::detail::array_proxy(like.ptr())->descr;
  Py_INCREF(descr);  // PyArray_NewFromDescr steals it
  constexpr int kViewFlags = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ |
                             py::detail::npy_api::NPY_ARRAY_ALIGNED_ |
                             py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  PyObject* out = api.PyArray_NewFromDescr_(
      api.PyArray_Type_, descr, static_cast<int>(like.ndim()),
      reinterpret_cast<Py_intptr_t*>(const_cast<py::ssize_t*>(like.shape())), nullptr, data,
      data == nullptr ? 0 : kViewFlags, nullptr);
  if (out == nullptr) throw py::error_already_set();
  auto array = py::reinterpret_steal<py::array>(out);
  // steals a reference to the owner (released on failure too)
  if (data != nullptr && api.PyArray_SetBaseObject_(out, owner.inc_ref().ptr()) != 0)
    throw py::error_already_set();
  return array;
}

// A block of the host cache and the capsule that returns it when freed.
std::pair<char*, py::object> host_block(size_t bytes) {
  void* data = clipops::host_block_alloc(bytes);
  if (data == nullptr) throw std::bad_alloc();
  py::capsule owner(new HostBlock{data, bytes}, [](void* p) {
    auto* block = static_cast<HostBlock*>(p);
    clipops::host_block_free(block->data, block->bytes);
    delete block;
  });
  return {static_cast<char*>(data), std::move(owner)};
}

// A fresh array like `like`: NumPy's own below kCachedOutputBytes, else in a
// block of the host cache.
py::array fresh_like(const py::array& like) {
  const size_t bytes = static_cast<size_t>(like.nbytes());
  if (bytes < clipops::kCachedOutputBytes) return array_like(like, nullptr, py::none());
  auto [data, owner] = host_block(bytes);
  return array_like(like, data, owner);
}

// Small outputs (under kCachedOutputBytes) of one call share one block of the
// host cache, each a C-contiguous view at a 64-byte boundary whose base is the
// block's capsule; the block goes back to the cache when the last of them is
// freed. Why: allocating 10,000 small arrays one by one (NumPy's malloc, then
// free) cost more than the clip itself (bench/micro.py, small_10k:
// numpy_empty_like alone 6x the floor). Used where at least kMinShared
// outputs are small; fewer take fresh_like.
constexpr size_t kViewAlign = 64;  // a cache line: views never share one
constexpr int kMinShared = 2;

size_t aligned_bytes(size_t bytes) { return (bytes + kViewAlign - 1) / kViewAlign * kViewAlign; }

std::vector<py::array> fresh_outputs(const py::list& arrays, const std::vector<int>& positions) {
  const auto item = [&](size_t k) {
    return py::reinterpret_borrow<py::array>(PyList_GET_ITEM(arrays.ptr(), positions[k]));
  };
  size_t shared_bytes = 0;
  int small = 0;
  for (size_t k = 0; k < positions.size(); ++k) {
    const size_t bytes = static_cast<size_t>(item(k).nbytes());
    if (bytes < clipops::kCachedOutputBytes) {
      shared_bytes += aligned_bytes(bytes);
      ++small;
    }
  }
  py::object owner;
  char* base = nullptr;
  if (small >= kMinShared) std::tie(base, owner) = host_block(shared_bytes);  // page-aligned
  std::vector<py::array> outs;
  outs.reserve(positions.size());
  size_t offset = 0;
  for (size_t k = 0; k < positions.size(); ++k) {
    const py::array like = item(k);
    const size_t bytes = static_cast<size_t>(like.nbytes());
    if (base == nullptr || bytes >= clipops::kCachedOutputBytes) {
      outs.push_back(fresh_like(like));
      continue;
    }
    outs.push_back(array_like(like, base + offset, owner));
    offset += aligned_bytes(bytes);
  }
  return outs;
}

class NumpyBatch {
 public:
  // arrays: a list of NumPy arrays or None. codes: None (the arrays must be
  // plain, C-contiguous, aligned, native-order ndarrays of float16/32/64, else
  // from_list returns None and the caller takes its checking path), or a dtype
  // code per entry from that path, which has normalized the arrays.
  static std::optional<NumpyBatch> from_list(const py::list& arrays, bool in_place,
                                             const py::object& codes) {
    NumpyBatch b;
    b.length_ = static_cast<int>(arrays.size());
    b.arrays_ = arrays;
    const bool checked = !codes.is_none();
    const py::list code_list = checked ? py::list(codes) : py::list();
    const auto& api = py::detail::npy_api::get();
    int need = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    if (in_place) need |= py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    for (int i = 0; i < b.length_; ++i) {
      PyObject* item = PyList_GET_ITEM(arrays.ptr(), i);
      if (item == Py_None) continue;
      // subclasses (np.matrix, masked arrays) take the checking path
      if (Py_TYPE(item) != api.PyArray_Type_ && !(checked && api.PyArray_Check_(item)))
        return fail(checked, i, "is not a NumPy array");
      const auto a = py::reinterpret_borrow<py::array>(item);
      if ((a.flags() & need) != need || a.dtype().byteorder() == '>')
        return fail(checked, i, "is not a C-contiguous, aligned, native-order array");
      const int code = checked ? code_list[i].cast<int>() : code_of_type_num(a.dtype().num());
      if (code < 0) return std::nullopt;  // the checking path names the dtype
      clipops::TensorDesc d;
      d.in = a.data();
      d.out = in_place ? const_cast<void*>(d.in) : nullptr;
      d.numel = a.size();
      d.dtype = code;
      b.descs_.push_back(d);
      b.positions_.push_back(i);
    }
    b.norm_code_ = clipops::norm_dtype_of(b.descs_.data(), static_cast<int>(b.descs_.size()));
    return b;
  }

  int norm_code() const { return norm_code_; }
  const std::vector<int>& positions() const { return positions_; }

  // Runs the CPU kernel (module.cc's clip_cpu arguments); with scale and not
  // in place, into fresh outputs. Returns the list of results, None where the
  // input was None (the input arrays themselves in place; [] without scale).
  py::list run(bool in_place, bool scale, double clip_norm, std::optional<double> use_norm,
               uintptr_t norm_out, uintptr_t tensor_norms, bool skip_nonfinite, int mode,
               double clip_min, double clip_max, double unscale) {
    std::vector<clipops::TensorDesc> descs = descs_;
    std::vector<py::array> outs;
    if (scale && !in_place) {
      outs = fresh_outputs(arrays_, positions_);
      for (size_t k = 0; k < descs.size(); ++k) descs[k].out = outs[k].mutable_data();
    }
    // Copying, the outputs are fresh (above) and the inputs only read: nothing
    // can overlap anything written, and sorting 2n ranges to show it took
    // ~5% of a perf profile's samples on 10,000 small arrays. In place, the
    // check stays.
    const bool check_overlap = in_place;
    const auto args = clipops_py::to_args(norm_code_, scale, clip_norm, 0, use_norm, 0, norm_out,
                                          check_overlap, tensor_norms, skip_nonfinite, mode,
                                          clip_min, 0, clip_max, 0, unscale, 0);
    clipops::Status s;
    {
      py::gil_scoped_release release;
      s = clipops::clip_by_global_norm_cpu(descs.data(), static_cast<int>(descs.size()), args,
                                           clipops::default_parallel_for());
    }
    raise_if_error(s);  // the fresh outputs are freed (their blocks cached) on the way out
    py::list result(scale ? length_ : 0);
    if (!scale) return result;
    for (int i = 0; i < length_; ++i) result[i] = py::none();
    for (size_t k = 0; k < descs.size(); ++k)
      result[positions_[k]] = in_place ? py::reinterpret_borrow<py::object>(
                                             PyList_GET_ITEM(arrays_.ptr(), positions_[k]))
                                       : py::object(outs[k]);
    return result;
  }

 private:
  static std::optional<NumpyBatch> fail(bool checked, int i, const char* what) {
    if (!checked) return std::nullopt;
    throw py::value_error("arrays[" + std::to_string(i) + "] " + what +
                          " after the front end's checks (a clipops bug)");
  }

  py::list arrays_;  // holds the arrays the descriptors point into
  std::vector<clipops::TensorDesc> descs_;
  std::vector<int> positions_;
  int length_ = 0;
  int norm_code_ = clipops::kFloat32;
};

}  // namespace

// ---- the compiled-kernel cache (kernel_cache.h), for the CuPy route ----------
// clipops/_nvrtc.py compiles with CuPy's NVRTC and loads with CuPy, but takes
// the folder, the key, the options, the trust checks and the recovery rule
// from here, so that both NVRTC routes share one implementation.
namespace {

// kernel_cache::get over Python callables: compile() -> bytes, load(bytes)
// raising on refusal (or None). A failure caused by a Python exception raises
// that exception again, as it was; an exception of `load` on a cached binary
// only leads to a fresh compilation, and is dropped.
py::bytes kernel_cache_get(const std::string& dir, const std::string& name,
                           const py::function& compile, const py::object& load) {
  std::optional<py::error_already_set> raised;
  auto compile_fn = [&](std::string* out) {
    try {
      *out = compile().cast<std::string>();
      return clipops::Status::Ok();
    } catch (py::error_already_set& e) {
      raised = e;
      return clipops::Status::Runtime("compile() raised");
    }
  };
  std::function<clipops::Status(const std::string&)> load_fn;
  if (!load.is_none())
    load_fn = [&](const std::string& binary) {
      try {
        load(py::bytes(binary));
        return clipops::Status::Ok();
      } catch (py::error_already_set& e) {
        raised = e;
        return clipops::Status::Runtime("load() raised");
      }
    };
  std::string binary;
  const clipops::Status s = clipops::kernel_cache::get(dir, name, compile_fn, load_fn, &binary);
  if (!s.ok() && raised) throw *raised;
  raise_if_error(s);
  return py::bytes(binary);
}

void add_kernel_cache_bindings(py::module_& m) {
  namespace kc = clipops::kernel_cache;
  m.attr("KERNEL_PROGRAM") = kc::kProgram;
  m.attr("KERNEL_PROGRAM_NAME") = kc::kProgramName;
  m.attr("KERNEL_NAME") = kc::kKernelName;
  m.attr("UPDATE_KERNEL_NAME") = kc::kUpdateKernelName;
  m.def("nvrtc_options", &kc::nvrtc_options, py::arg("arch_option"), py::arg("kernel_dir"),
        py::arg("include_dirs"),
        "The NVRTC options of both NVRTC routes (the nvcc build's code generation).");
  m.def("kernel_cache_dir", &kc::default_dir,
        "The cache folder: $CLIPOPS_CACHE_DIR, else $XDG_CACHE_HOME/clipops, else "
        "~/.cache/clipops.");
  m.def(
      "kernel_cache_key",
      [](const std::string& program, const std::vector<std::string>& options,
         std::pair<int, int> nvrtc_version) {
        std::string key;
        clipops::Status s;
        {
          py::gil_scoped_release release;  // reads and hashes a few MB of headers
          s = kc::key(program, options, nvrtc_version.first, nvrtc_version.second, &key);
        }
        raise_if_error(s);
        return key;
      },
      py::arg("program"), py::arg("options"), py::arg("nvrtc_version"),
      "SHA-256 over the program, the options without include paths, the contents of every "
      "file it can include from the -I folders, and the NVRTC (major, minor). RuntimeError "
      "when an include of the program itself is in no folder.");
  m.def("kernel_cache_entry", &kc::entry_name, py::arg("key"), py::arg("kind"),
        "The cached file's name: clipops_<key>.<kind> (kind 'cubin' or 'ptx').");
  m.def("kernel_cache_get", &kernel_cache_get, py::arg("dir"), py::arg("name"),
        py::arg("compile"), py::arg("load") = py::none(),
        "The binary from the cache folder `dir` if it and the entry `name` pass the trust "
        "checks and load(binary) accepts it; else compile(), load()ed, then written to the "
        "cache. Raises what compile() or load() raised on a fresh binary.");
  m.def(
      "sha256_hex", [](const py::bytes& data) { return kc::sha256_hex(data.cast<std::string>()); },
      py::arg("data"), "SHA-256 of data, hex (the cache key's hash).");
}

}  // namespace

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

  py::class_<NumpyBatch>(m, "NumpyBatch",
                         "A list of NumPy arrays described for the CPU kernel (clipops/numpy.py).")
      .def_static("from_list", &NumpyBatch::from_list, py::arg("arrays"), py::arg("in_place"),
                  py::arg("codes") = py::none(),
                  "The batch, or None when an entry needs the front end's checking path.")
      .def_property_readonly("norm_code", &NumpyBatch::norm_code)
      .def_property_readonly("positions", &NumpyBatch::positions)
      .def("run", &NumpyBatch::run, py::arg("in_place"), py::arg("scale"), py::arg("clip_norm"),
           py::arg("use_norm"), py::arg("norm_out"), py::arg("tensor_norms") = 0,
           py::arg("skip_nonfinite") = false, py::arg("mode") = 0, py::arg("clip_min") = 0.0,
           py::arg("clip_max") = 0.0, py::arg("unscale") = 1.0,
           "Run the CPU kernel over the batch (clip_cpu's arguments); returns the results.");

  m.def(
      "host_cache_stats",
      [] {
        const auto s = clipops::host_cache_stats();
        return py::dict(py::arg("cached_bytes") = s.cached_bytes,
                        py::arg("in_use_bytes") = s.in_use_bytes,
                        py::arg("limit_bytes") = s.limit_bytes, py::arg("hits") = s.hits,
                        py::arg("misses") = s.misses);
      },
      "The host block cache that large NumPy outputs come from (clipops.h).");
  m.def("set_host_cache_limit", &clipops::set_host_cache_limit, py::arg("bytes"),
        "Bound the freed blocks the host cache keeps (default CLIPOPS_HOST_CACHE_MB, 1024).");

  m.def(
      "_worker_pool_stats",
      [] {
        const auto s = clipops::worker_pool_stats();
        return py::dict(py::arg("workers") = s.workers,
                        py::arg("workers_that_ran") = s.workers_that_ran,
                        py::arg("worker_pieces") = s.worker_pieces, py::arg("queued") = s.queued);
      },
      "The CPU kernel's worker pool in this process (clipops.h, WorkerPoolStats); for tests.");

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

  add_kernel_cache_bindings(m);

  // ---- the fused clip + optimizer update (clipops.h: update_cpu, update_cuda) ----
  clipops_py::bind_update_args(m);
  m.def(
      "update_cpu",
      [](const std::vector<clipops_py::ParamTuple>& params, const clipops::UpdateArgs& args) {
        const auto d = clipops_py::to_param_descs(params);
        clipops::Status s;
        {
          py::gil_scoped_release release;
          s = clipops::update_cpu(d.data(), static_cast<int>(d.size()), args,
                                  clipops::default_parallel_for());
        }
        raise_if_error(s);
      },
      py::arg("params"), py::arg("args"),
      "The fused update on host buffers, in place: params is a list of (param, grad, grad dtype "
      "code, m or 0, v or 0, numel, decay); raises ValueError on invalid input (nothing written).");
  m.def("keras_cpu_power", &clipops::keras_cpu_power, py::arg("beta"), py::arg("t"),
        "beta^t (float32) as Keras' ops.power gives it on TensorFlow's CPU (the C library's powf).");
  m.def(
      "power_by_squaring",
      [](float beta, long long t) { return clipops::detail::power_by_squaring(beta, t); },
      py::arg("beta"), py::arg("t"),
      "beta^t (float32) as the kernels derive it from the step counter (kPowersFromStep).");
  m.def(
      "update_cuda_workspace_bytes",
      [](const std::vector<clipops_py::ParamTuple>& params) {
        const auto d = clipops_py::to_param_descs(params);
        return clipops::update_cuda_workspace_bytes(d.data(), static_cast<int>(d.size()));
      },
      py::arg("params"), "Device workspace bytes update_cuda needs for this list.");
  m.def("update_cuda", &launch_update<clipops::update_cuda, cudaStream_t>, py::arg("params"),
        py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "The fused update as one cooperative launch on `stream` over device buffers; never waits.");
  // The NVRTC route (clipops/_nvrtc.py) launches the update kernel itself; it
  // takes the checks and the kernel's inputs from here, from the function both
  // C++ launchers use (prepare_update_launch), so that no layout is written twice.
  m.def(
      "update_launch_layout",
      [](const std::vector<clipops_py::ParamTuple>& params, const clipops::UpdateArgs& args,
         uintptr_t workspace, size_t workspace_bytes) {
        const auto d = clipops_py::to_param_descs(params);
        const int n = static_cast<int>(d.size());
        std::vector<char> image;
        long long items = 0;
        raise_if_error(clipops::detail::prepare_update_launch(
            d.data(), n, args, reinterpret_cast<const void*>(workspace), workspace_bytes, &image,
            &items));
        const clipops::detail::UpdateParams kernel_params = clipops::detail::update_params(args);
        return py::make_tuple(
            py::bytes(image.data(), image.size()), items,
            clipops::detail::update_states_offset(n), clipops::detail::update_partials_offset(n),
            py::bytes(reinterpret_cast<const char*>(&kernel_params), sizeof kernel_params));
      },
      py::arg("params"), py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"),
      "prepare_update_launch (validate_update, the workspace's size and alignment), then what "
      "update_cuda copies and launches: (table image: the gradients' TensorEntry table and the "
      "StateEntry table at their workspace offsets, work items, the StateEntry table's offset, "
      "the partials' offset, the UpdateParams struct as bytes). Raises ValueError on invalid "
      "input.");
  m.def("update_driver", &launch_update<clipops::update_driver, CUstream>, py::arg("params"),
        py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "update_cuda through the driver route (the TF op's GPU route; tests/test_driver.py). "
      "Raises ValueError on invalid input, RuntimeError otherwise.");
}
