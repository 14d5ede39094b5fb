// Launcher of the CUDA kernel through the driver API, with the kernel compiled
// at first use by NVRTC: the TensorFlow op's GPU route (clipops.h, "CUDA
// through the driver API"; README "The TF op's GPU kernel on TensorFlow's
// CUDA 12").
//
// Nothing of CUDA is linked and no CUDA header is included: libcuda.so.1 and
// libnvrtc are opened with dlopen at the first launch, so the op brings no CUDA
// runtime of its own into the framework's process and runs with any driver
// that the NVRTC's CUDA major version supports. Per CUDA context (a GPU, as the
// framework set it up) the kernel is compiled once, cached on disk, loaded,
// and its largest cooperative grid found. A launch then stages the tensor
// table in pinned memory, copies it on the caller's stream and makes one
// cooperative launch there, as clip_cuda.cu does with the runtime API.
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "clip_launch.h"
#include "clipops.h"

namespace clipops {
namespace {

using detail::TensorEntry;

// ---- the driver API and NVRTC, as far as used, declared as cuda.h and nvrtc.h do
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUevent_st* CUevent;
using nvrtcProgram = void*;

constexpr CUresult kSuccess = 0;
constexpr CUresult kErrorNoBinaryForGpu = 209;
constexpr CUresult kErrorUnsupportedPtxVersion = 222;
constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrComputeCapabilityMajor = 75;
constexpr int kAttrComputeCapabilityMinor = 76;
constexpr int kAttrCooperativeLaunch = 95;
constexpr unsigned kEventDisableTiming = 0x2;

constexpr const char* kKernelName = "clipops_clip_kernel";
constexpr const char* kKernelFiles[] = {"clip_kernel.cuh", "clip_math.h"};
constexpr int kOldestArch = 60;  // grid-wide sync, and TensorFlow's oldest GPU
// Bump when the way binaries are made changes without the sources changing.
constexpr const char* kCacheFormat = "clipops-driver-1";

struct CudaApi {
  CUresult (*Init)(unsigned);
  CUresult (*DriverGetVersion)(int*);
  CUresult (*GetErrorString)(CUresult, const char**);
  CUresult (*StreamGetCtx)(CUstream, CUcontext*);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext*);
  CUresult (*CtxGetDevice)(CUdevice*);
  CUresult (*DeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*ModuleLoadData)(CUmodule*, const void*);
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*OccupancyMaxActiveBlocksPerMultiprocessor)(int*, CUfunction, int, size_t);
  CUresult (*MemHostAlloc)(void**, size_t, unsigned);
  CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
  CUresult (*EventCreate)(CUevent*, unsigned);
  CUresult (*EventRecord)(CUevent, CUstream);
  CUresult (*EventQuery)(CUevent);
  CUresult (*LaunchCooperativeKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                      unsigned, unsigned, CUstream, void**);
  int version = 0;  // e.g. 12020 for CUDA 12.2
};

struct NvrtcApi {
  int (*Version)(int*, int*);
  int (*GetNumSupportedArchs)(int*);
  int (*GetSupportedArchs)(int*);
  int (*CreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*,
                       const char* const*);
  int (*CompileProgram)(nvrtcProgram, int, const char* const*);
  int (*GetProgramLogSize)(nvrtcProgram, size_t*);
  int (*GetProgramLog)(nvrtcProgram, char*);
  int (*GetCUBINSize)(nvrtcProgram, size_t*);
  int (*GetCUBIN)(nvrtcProgram, char*);
  int (*GetPTXSize)(nvrtcProgram, size_t*);
  int (*GetPTX)(nvrtcProgram, char*);
  int (*DestroyProgram)(nvrtcProgram*);
  const char* (*GetErrorString)(int);
  int major = 0, minor = 0;
  std::vector<int> archs;  // the sm_XX it can make cubins for, ascending
};

// ---- state: one per process, guarded by mu ---------------------------------------
struct Kernel {
  CUfunction function = nullptr;
  int resident_blocks = 0;  // the largest cooperative grid on this GPU
};

struct PinnedBlock {
  CUcontext context;
  void* ptr;
  size_t bytes;
  CUevent done;  // recorded after the block's last copy
};

std::mutex mu;
DriverConfig config;
CudaApi* cuda = nullptr;    // loaded once, never unloaded
NvrtcApi* nvrtc = nullptr;  // loaded at the first compilation
std::map<CUcontext, Kernel> kernels;
std::vector<PinnedBlock> pinned;  // reused for the life of the process

std::string cuda_error_text(CUresult err) {
  const char* text = nullptr;
  if (cuda != nullptr && cuda->GetErrorString(err, &text) == kSuccess && text != nullptr)
    return std::string(text) + " (CUDA error " + std::to_string(err) + ")";
  return "CUDA error " + std::to_string(err);
}

Status cuda_failure(const char* what, CUresult err) {
  return Status::Runtime(std::string(what) + ": " + cuda_error_text(err));
}

std::string version_text(int v) {  // 12020 -> "12.2"
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

std::string last_dl_error() {
  const char* e = dlerror();
  return e != nullptr ? e : "unknown error";
}

template <typename F>
bool bind(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  return *fn != nullptr;
}

// ---- loading the libraries --------------------------------------------------------
Status load_cuda() {
  if (cuda != nullptr) return Status::Ok();
  void* lib = dlopen(config.cuda_library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr)
    return Status::Unavailable("clipops' GPU kernel needs the CUDA driver, but " +
                               config.cuda_library + " could not be loaded (" + last_dl_error() +
                               "). Install the NVIDIA driver.");
  auto* api = new CudaApi;
  // the _v2 names: the unsuffixed ones are CUDA 3's 32-bit-pointer versions
  const bool ok =
      bind(lib, "cuInit", &api->Init) && bind(lib, "cuDriverGetVersion", &api->DriverGetVersion) &&
      bind(lib, "cuGetErrorString", &api->GetErrorString) &&
      bind(lib, "cuStreamGetCtx", &api->StreamGetCtx) &&
      bind(lib, "cuCtxPushCurrent_v2", &api->CtxPushCurrent) &&
      bind(lib, "cuCtxPopCurrent_v2", &api->CtxPopCurrent) &&
      bind(lib, "cuCtxGetDevice", &api->CtxGetDevice) &&
      bind(lib, "cuDeviceGetAttribute", &api->DeviceGetAttribute) &&
      bind(lib, "cuModuleLoadData", &api->ModuleLoadData) &&
      bind(lib, "cuModuleGetFunction", &api->ModuleGetFunction) &&
      bind(lib, "cuOccupancyMaxActiveBlocksPerMultiprocessor",
           &api->OccupancyMaxActiveBlocksPerMultiprocessor) &&
      bind(lib, "cuMemHostAlloc", &api->MemHostAlloc) &&
      bind(lib, "cuMemcpyHtoDAsync_v2", &api->MemcpyHtoDAsync) &&
      bind(lib, "cuEventCreate", &api->EventCreate) &&
      bind(lib, "cuEventRecord", &api->EventRecord) &&
      bind(lib, "cuEventQuery", &api->EventQuery) &&
      bind(lib, "cuLaunchCooperativeKernel", &api->LaunchCooperativeKernel);
  if (!ok) {
    delete api;
    return Status::Unavailable(config.cuda_library + " lacks a function (" + last_dl_error() + ")" +
                               ": the CUDA driver is older than CUDA 9. Update the NVIDIA driver.");
  }
  CUresult err = api->Init(0);
  if (err == kSuccess) err = api->DriverGetVersion(&api->version);
  if (err != kSuccess) {
    delete api;
    return Status::Unavailable("the CUDA driver could not be initialised (CUDA error " +
                               std::to_string(err) + ")");
  }
  cuda = api;
  return Status::Ok();
}

Status load_nvrtc() {
  if (nvrtc != nullptr) return Status::Ok();
  void* lib = dlopen(config.nvrtc_library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr)
    return Status::Unavailable(
        "clipops compiles its GPU kernel at first use with NVRTC, but " + config.nvrtc_library +
        " could not be loaded (" + last_dl_error() + "). Install TensorFlow's CUDA libraries with "
        "`pip install tensorflow[and-cuda]` (or `pip install nvidia-cuda-nvrtc-cu12`), or point "
        "CLIPOPS_NVRTC at a libnvrtc.so.12.");
  auto* api = new NvrtcApi;
  const bool ok = bind(lib, "nvrtcVersion", &api->Version) &&
                  bind(lib, "nvrtcGetNumSupportedArchs", &api->GetNumSupportedArchs) &&
                  bind(lib, "nvrtcGetSupportedArchs", &api->GetSupportedArchs) &&
                  bind(lib, "nvrtcCreateProgram", &api->CreateProgram) &&
                  bind(lib, "nvrtcCompileProgram", &api->CompileProgram) &&
                  bind(lib, "nvrtcGetProgramLogSize", &api->GetProgramLogSize) &&
                  bind(lib, "nvrtcGetProgramLog", &api->GetProgramLog) &&
                  bind(lib, "nvrtcGetCUBINSize", &api->GetCUBINSize) &&
                  bind(lib, "nvrtcGetCUBIN", &api->GetCUBIN) &&
                  bind(lib, "nvrtcGetPTXSize", &api->GetPTXSize) &&
                  bind(lib, "nvrtcGetPTX", &api->GetPTX) &&
                  bind(lib, "nvrtcDestroyProgram", &api->DestroyProgram) &&
                  bind(lib, "nvrtcGetErrorString", &api->GetErrorString);
  int count = 0;
  if (!ok || api->Version(&api->major, &api->minor) != 0 ||
      api->GetNumSupportedArchs(&count) != 0 || count <= 0) {
    delete api;
    return Status::Unavailable(config.nvrtc_library +
                               " is not a usable NVRTC (CUDA 11.2 or newer is needed)");
  }
  api->archs.resize(count);
  api->GetSupportedArchs(api->archs.data());
  nvrtc = api;
  return Status::Ok();
}

// ---- compiling ----------------------------------------------------------------------
bool read_file(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream s;
  s << f.rdbuf();
  *out = s.str();
  return static_cast<bool>(f) || f.eof();
}

// Written whole or not at all; an unwritable cache costs a compilation per process.
void write_atomically(const std::string& path, const std::string& data) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  std::ostringstream tmp;
  tmp << path << "." << getpid() << "." << std::hash<std::thread::id>()(std::this_thread::get_id())
      << ".tmp";
  {
    std::ofstream f(tmp.str(), std::ios::binary);
    if (!f || !f.write(data.data(), static_cast<std::streamsize>(data.size()))) {
      std::filesystem::remove(tmp.str(), ec);
      return;
    }
  }
  std::filesystem::rename(tmp.str(), path, ec);
  if (ec) std::filesystem::remove(tmp.str(), ec);
}

// 128-bit FNV-1a (two 64-bit lanes with different offsets): a cache key, not a MAC.
std::string cache_key(const std::vector<std::string>& parts) {
  uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
  for (const std::string& p : parts) {
    for (unsigned char c : p + '\0') {
      a = (a ^ c) * 0x100000001b3ull;
      b = (b ^ c) * 0x100000001b3ull;
    }
  }
  char out[33];
  std::snprintf(out, sizeof(out), "%016llx%016llx", static_cast<unsigned long long>(a),
                static_cast<unsigned long long>(b));
  return out;
}

bool any_dir_has(const std::vector<std::string>& dirs, const char* header) {
  std::error_code ec;
  for (const std::string& d : dirs)
    if (std::filesystem::is_regular_file(std::filesystem::path(d) / header, ec)) return true;
  return false;
}

// The kernel for compute capability cc as a cubin (cc known to this NVRTC) or
// as PTX of the newest older architecture, which the driver compiles.
Status compile_kernel(int cc, std::string* binary, bool* is_ptx) {
  Status status = load_nvrtc();
  if (!status.ok()) return status;
  const std::vector<int>& archs = nvrtc->archs;
  const int nvrtc_version = nvrtc->major * 1000 + nvrtc->minor * 10;
  int target = 0;
  for (int a : archs)
    if (a <= cc) target = a;
  if (target == 0)
    return Status::Unavailable("this GPU (compute capability " + std::to_string(cc / 10) + "." +
                               std::to_string(cc % 10) + ") is older than the oldest architecture "
                               "NVRTC " + version_text(nvrtc_version) + " compiles for (sm_" +
                               std::to_string(archs.front()) + ")");
  *is_ptx = target != cc;
  // Cubins run on any driver of NVRTC's major version (CUDA's minor-version
  // compatibility); PTX needs a driver at least as new as the NVRTC.
  if (cuda->version / 1000 < nvrtc->major || (*is_ptx && cuda->version < nvrtc_version))
    return Status::Unavailable(
        "the CUDA driver supports CUDA " + version_text(cuda->version) + ", older than the NVRTC "
        "that compiles clipops' kernel (CUDA " + version_text(nvrtc_version) + ", " +
        config.nvrtc_library + "). Update the NVIDIA driver (CUDA 12 needs 525 or newer), or "
        "install an nvidia-cuda-nvrtc-cu12 no newer than CUDA " + version_text(cuda->version) + ".");

  for (const char* header : {"cooperative_groups.h", "nv/target"})
    if (!any_dir_has(config.include_dirs, header))
      return Status::Unavailable(
          std::string("NVRTC needs the CUDA header <") + header + "> to compile clipops' kernel, "
          "and no include folder holds it. Install them with `pip install "
          "nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12` (or `pip install clipops[tf-gpu]`), or "
          "point CLIPOPS_CUDA_INCLUDE at the folders that hold them.");

  // The nvcc build's code generation (CMakeLists.txt: --fmad=false); every
  // option that changes floating-point results is spelled out.
  std::vector<std::string> options = {"-std=c++17", "-I" + config.kernel_dir};
  for (const std::string& d : config.include_dirs) options.push_back("-I" + d);
  options.push_back((*is_ptx ? "-arch=compute_" : "-arch=sm_") + std::to_string(target));
  for (const char* o : {"--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"})
    options.push_back(o);

  std::vector<std::string> key_parts = {kCacheFormat, version_text(nvrtc_version)};
  for (const char* name : kKernelFiles) {
    std::string text;
    if (!read_file(config.kernel_dir + "/" + name, &text))
      return Status::Unavailable(std::string("clipops' kernel source ") + name + " is missing from '" +
                                 config.kernel_dir + "'; reinstall clipops");
    key_parts.push_back(name);
    key_parts.push_back(text);
  }
  key_parts.insert(key_parts.end(), options.begin(), options.end());
  const std::string cache_path = config.cache_dir.empty() ? std::string() :
      config.cache_dir + "/clipops_" + cache_key(key_parts) + (*is_ptx ? ".ptx" : ".cubin");
  if (!cache_path.empty() && read_file(cache_path, binary) && !binary->empty())
    return Status::Ok();

  std::vector<const char*> argv;
  for (const std::string& o : options) argv.push_back(o.c_str());
  nvrtcProgram prog = nullptr;
  if (int rc = nvrtc->CreateProgram(&prog, "#include \"clip_kernel.cuh\"\n", "clipops_kernel.cu", 0,
                                    nullptr, nullptr))
    return Status::Runtime(std::string("nvrtcCreateProgram: ") + nvrtc->GetErrorString(rc));
  int rc = nvrtc->CompileProgram(prog, static_cast<int>(argv.size()), argv.data());
  if (rc != 0) {
    size_t size = 0;
    std::string log;
    if (nvrtc->GetProgramLogSize(prog, &size) == 0 && size > 0) {
      log.resize(size);
      nvrtc->GetProgramLog(prog, &log[0]);
    }
    nvrtc->DestroyProgram(&prog);
    std::string joined;
    for (const std::string& o : options) joined += " " + o;
    return Status::Unavailable(std::string("NVRTC failed to compile clipops' kernel (") +
                               nvrtc->GetErrorString(rc) + "); options" + joined + ":\n" + log);
  }
  size_t size = 0;
  rc = *is_ptx ? nvrtc->GetPTXSize(prog, &size) : nvrtc->GetCUBINSize(prog, &size);
  if (rc == 0) {
    binary->assign(size, '\0');  // PTX: the size counts its terminating NUL
    rc = *is_ptx ? nvrtc->GetPTX(prog, &(*binary)[0]) : nvrtc->GetCUBIN(prog, &(*binary)[0]);
  }
  nvrtc->DestroyProgram(&prog);
  if (rc != 0) return Status::Runtime(std::string("NVRTC: ") + nvrtc->GetErrorString(rc));
  if (!cache_path.empty()) write_atomically(cache_path, *binary);
  return Status::Ok();
}

// ---- per context --------------------------------------------------------------------
// Makes the stream's context current on this thread while alive.
class ScopedContext {
 public:
  Status push(CUstream stream) {
    CUresult err = cuda->StreamGetCtx(stream, &context_);
    if (err != kSuccess) return cuda_failure("cuStreamGetCtx", err);
    if ((err = cuda->CtxPushCurrent(context_)) != kSuccess)
      return cuda_failure("cuCtxPushCurrent", err);
    pushed_ = true;
    return Status::Ok();
  }
  ~ScopedContext() {
    CUcontext popped;
    if (pushed_) cuda->CtxPopCurrent(&popped);
  }
  CUcontext context() const { return context_; }

 private:
  CUcontext context_ = nullptr;
  bool pushed_ = false;
};

// The kernel loaded in the current context (compiled, or read from the cache).
Status get_kernel(CUcontext context, Kernel* kernel) {
  auto it = kernels.find(context);
  if (it != kernels.end()) {
    *kernel = it->second;
    return Status::Ok();
  }
  CUdevice device = 0;
  int major = 0, minor = 0, coop = 0, sms = 0;
  CUresult err = cuda->CtxGetDevice(&device);
  if (err == kSuccess) err = cuda->DeviceGetAttribute(&major, kAttrComputeCapabilityMajor, device);
  if (err == kSuccess) err = cuda->DeviceGetAttribute(&minor, kAttrComputeCapabilityMinor, device);
  if (err == kSuccess) err = cuda->DeviceGetAttribute(&coop, kAttrCooperativeLaunch, device);
  if (err == kSuccess) err = cuda->DeviceGetAttribute(&sms, kAttrMultiprocessorCount, device);
  if (err != kSuccess) return cuda_failure("querying the GPU", err);
  const int cc = major * 10 + minor;
  if (cc < kOldestArch)
    return Status::Unavailable("clipops' GPU kernel needs compute capability 6.0 or newer (a grid-"
                               "wide sync); this GPU has " + std::to_string(major) + "." +
                               std::to_string(minor) + ". Run the op on the CPU.");
  if (!coop)
    return Status::Unavailable("this GPU does not support cooperative launches, which clipops' "
                               "kernel needs (one launch for norm and scale). Run the op on the CPU.");

  std::string binary;
  bool is_ptx = false;
  Status status = compile_kernel(cc, &binary, &is_ptx);
  if (!status.ok()) return status;
  CUmodule module = nullptr;
  err = cuda->ModuleLoadData(&module, binary.data());
  if (err == kErrorUnsupportedPtxVersion || err == kErrorNoBinaryForGpu)
    return Status::Unavailable(
        "the CUDA driver (CUDA " + version_text(cuda->version) + ") cannot load clipops' kernel "
        "compiled by NVRTC " + version_text(nvrtc->major * 1000 + nvrtc->minor * 10) + " (" +
        cuda_error_text(err) + "). Update the NVIDIA driver, or install an nvidia-cuda-nvrtc-cu12 "
        "no newer than the driver's CUDA.");
  if (err != kSuccess) return cuda_failure("loading clipops' kernel (cuModuleLoadData)", err);
  Kernel k;
  int per_sm = 0;
  err = cuda->ModuleGetFunction(&k.function, module, kKernelName);
  if (err == kSuccess)
    err = cuda->OccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k.function, detail::kThreads, 0);
  if (err != kSuccess) return cuda_failure("preparing clipops' kernel", err);
  k.resident_blocks = std::max(1, sms * per_sm);
  kernels[context] = k;  // the module stays loaded for the life of the context
  *kernel = k;
  return Status::Ok();
}

// Copies the table to the device on `stream` through a pinned block that no
// copy in flight uses (cuEventQuery never blocks, so the host never waits).
Status stage_table(CUcontext context, void* dst, const void* src, size_t bytes, CUstream stream) {
  PinnedBlock* block = nullptr;
  for (PinnedBlock& b : pinned)
    if (b.context == context && b.bytes >= bytes && cuda->EventQuery(b.done) == kSuccess) {
      block = &b;
      break;
    }
  if (block == nullptr) {
    PinnedBlock b{context, nullptr, std::max<size_t>(bytes, 64 << 10), nullptr};
    CUresult err = cuda->MemHostAlloc(&b.ptr, b.bytes, 0);
    if (err != kSuccess) return cuda_failure("allocating pinned memory for the tensor table", err);
    if ((err = cuda->EventCreate(&b.done, kEventDisableTiming)) != kSuccess)
      return cuda_failure("creating an event", err);  // the pinned block leaks: rare, small
    pinned.push_back(b);
    block = &pinned.back();
  }
  std::memcpy(block->ptr, src, bytes);
  CUresult err = cuda->MemcpyHtoDAsync(reinterpret_cast<CUdeviceptr>(dst), block->ptr, bytes, stream);
  if (err != kSuccess) return cuda_failure("copying the tensor table", err);
  if ((err = cuda->EventRecord(block->done, stream)) != kSuccess)
    return cuda_failure("recording the table copy", err);
  return Status::Ok();
}

}  // namespace

void configure_driver_route(const DriverConfig& c) {
  std::lock_guard<std::mutex> lock(mu);
  config = c;
}

Status clip_by_global_norm_driver(const TensorDesc* tensors, int num_tensors,
                                  const ClipArgs& args, void* workspace,
                                  size_t workspace_bytes, CUstream stream) {
  thread_local std::vector<TensorEntry> table;
  long long items = 0;
  Status status = detail::prepare_launch(tensors, num_tensors, args, workspace, workspace_bytes,
                                         &table, &items);
  if (!status.ok()) return status;

  std::lock_guard<std::mutex> lock(mu);  // launches are microseconds; compiling happens once
  if (!(status = load_cuda()).ok()) return status;
  ScopedContext scope;
  if (!(status = scope.push(stream)).ok()) return status;
  Kernel kernel;
  if (!(status = get_kernel(scope.context(), &kernel)).ok()) return status;
  if (num_tensors > 0) {
    status = stage_table(scope.context(), workspace, table.data(),
                         sizeof(TensorEntry) * num_tensors, stream);
    if (!status.ok()) return status;
  }
  detail::KernelArgs kernel_args(workspace, num_tensors, items, args);
  const CUresult err = cuda->LaunchCooperativeKernel(
      kernel.function, detail::grid_size(items, kernel.resident_blocks), 1, 1, detail::kThreads,
      1, 1, 0, stream, kernel_args.params);
  if (err != kSuccess) return cuda_failure("launching the clip kernel", err);
  return Status::Ok();
}

}  // namespace clipops
