// Launcher of the CUDA kernel through the driver API, with the kernel compiled
// at first use by NVRTC: the TensorFlow op's GPU route (clipops.h, "CUDA
// through the driver API"; docs/design.md "The TF op's GPU kernel on TensorFlow's
// CUDA 12").
//
// Nothing of CUDA is linked and no CUDA header is included: libcuda.so.1 and
// libnvrtc are opened with dlopen at the first launch, so the op brings no CUDA
// runtime of its own into the framework's process and runs with any driver
// that the NVRTC's CUDA major version supports. Per CUDA context (a GPU, as the
// framework set it up) the kernel is compiled once (or read from the disk
// cache of kernel_cache.h, shared with the CuPy route), loaded, and its
// largest cooperative grid found. A launch then stages the tensor table in
// pinned memory, copies it on the caller's stream and makes one cooperative
// launch there, as clip_cuda.cu does with the runtime API. The module holds
// both kernels of the program (kernel_cache::kProgram): the clip
// (clip_by_global_norm_driver) and the fused update (update_driver), so a
// context compiles and loads once for both.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "clip_launch.h"
#include "clipops.h"
#include "kernel_cache.h"
#include "optim_launch.h"

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

constexpr int kOldestArch = 60;  // grid-wide sync, and TensorFlow's oldest GPU

struct CudaApi {
  CUresult (*Init)(unsigned);
  CUresult (*DriverGetVersion)(int*);
  CUresult (*GetErrorString)(CUresult, const char**);
  CUresult (*StreamGetCtx)(CUstream, CUcontext*);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext*);
  CUresult (*CtxGetDevice)(CUdevice*);
  CUresult (*CtxGetId)(CUcontext, unsigned long long*);  // CUDA 12.0
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

// ---- state: one per process ---------------------------------------------------------
// The two kernels of a context's module, each with its largest cooperative
// grid on this GPU (the update kernel uses more registers than the clip's).
struct Kernel {
  CUfunction function = nullptr;  // clipops_clip_kernel
  int resident_blocks = 0;
  CUfunction update = nullptr;    // clipops_update_kernel
  int update_resident_blocks = 0;
};

// A context's kernel. Its own mutex is held while it is compiled and loaded,
// so a first compilation (seconds) holds up launches on that context only.
struct ContextKernel {
  std::mutex mu;
  std::atomic<bool> ready{false};
  Kernel kernel;  // written once, before ready
};

struct PinnedBlock {
  unsigned long long context;  // cuCtxGetId's id
  void* ptr;
  size_t bytes;
  CUevent done;  // recorded after the block's last copy
};

// Contexts are told apart by cuCtxGetId, unique for the life of the process:
// a CUcontext address is reused by the next context created after one is
// destroyed, and a kernel or pinned block of the dead one must not be taken
// for the new one's. (A dead context's entries stay: a few bytes each.)
std::mutex mu;  // guards config, cuda, kernels and pinned; never held while compiling
DriverConfig config;
CudaApi* cuda = nullptr;    // loaded once, never unloaded
std::map<unsigned long long, std::unique_ptr<ContextKernel>> kernels;  // entries never erased
std::vector<PinnedBlock> pinned;  // reused for the life of the process
std::mutex nvrtc_mu;        // guards nvrtc
NvrtcApi* nvrtc = nullptr;  // loaded at the first compilation

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
// The first LD_LIBRARY_PATH entry that is empty or relative, or "" when there is
// none. The dynamic loader reads such an entry as (a folder under) the current
// directory, for the library asked for and for every library it pulls in.
std::string unsafe_library_path_entry() {
  const char* env = std::getenv("LD_LIBRARY_PATH");
  if (env == nullptr || *env == '\0') return "";  // glibc ignores an empty value
  const std::string path = env;
  for (size_t start = 0;;) {
    const size_t end = path.find_first_of(":;", start);  // glibc splits on both
    const std::string entry = path.substr(start, end == std::string::npos ? end : end - start);
    if (entry.empty() || entry[0] != '/') return entry.empty() ? "(an empty entry)" : entry;
    if (end == std::string::npos) return "";
    start = end + 1;
  }
}

// Opens a library whose code will run in this process. One already loaded (by
// the framework, or earlier) is reused: RTLD_NOLOAD runs nothing new. Otherwise
// the name must be absolute or a bare name for the system loader's search, and
// LD_LIBRARY_PATH must hold no empty or relative entry: a library planted in the
// current directory would run its constructors before any check could look at it.
// \param[in] name  a bare name ("libcuda.so.1") or an absolute path
// \param[in] env   the variable that overrides it, for the message
// \param[out] lib  the handle
Status open_library(const std::string& name, const char* env, void** lib) {
  *lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (*lib != nullptr) return Status::Ok();
  if (name.find('/') != std::string::npos && name[0] != '/')
    return Status::Unavailable(std::string(env) + " must be an absolute path or a bare library "
                               "name, not '" + name + "' (relative to the current directory)");
  const std::string unsafe = unsafe_library_path_entry();
  if (!unsafe.empty())
    return Status::Unavailable(
        "clipops does not load " + name + " while LD_LIBRARY_PATH holds " + unsafe + ", which the "
        "dynamic loader reads as the current directory: a library planted there would run in "
        "this process. Remove that entry from LD_LIBRARY_PATH (a trailing ':' makes one).");
  *lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (*lib == nullptr) return Status::Unavailable(last_dl_error());
  return Status::Ok();
}

Status load_cuda() {
  if (cuda != nullptr) return Status::Ok();
  void* lib = nullptr;
  Status opened = open_library(config.cuda_library, "CLIPOPS_LIBCUDA", &lib);
  if (!opened.ok())
    return Status::Unavailable("clipops' GPU kernel needs the CUDA driver, but " +
                               config.cuda_library + " could not be loaded (" + opened.message +
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
  const bool has_ctx_id = bind(lib, "cuCtxGetId", &api->CtxGetId);
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
  if (!has_ctx_id) {
    const int v = api->version;
    delete api;
    return Status::Unavailable("the CUDA driver supports CUDA " + version_text(v) + ", older than "
                               "the CUDA 12 that clipops' GPU kernel needs (TensorFlow's CUDA). "
                               "Update the NVIDIA driver (CUDA 12 needs 525 or newer).");
  }
  cuda = api;
  return Status::Ok();
}

Status load_nvrtc(const DriverConfig& cfg) {
  std::lock_guard<std::mutex> lock(nvrtc_mu);
  if (nvrtc != nullptr) return Status::Ok();
  void* lib = nullptr;
  Status opened = open_library(cfg.nvrtc_library, "CLIPOPS_NVRTC", &lib);
  if (!opened.ok())
    return Status::Unavailable(
        "clipops compiles its GPU kernel at first use with NVRTC, but " + cfg.nvrtc_library +
        " could not be loaded (" + opened.message + "). Install TensorFlow's CUDA libraries with "
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
    return Status::Unavailable(cfg.nvrtc_library +
                               " is not a usable NVRTC (CUDA 11.2 or newer is needed)");
  }
  api->archs.resize(count);
  api->GetSupportedArchs(api->archs.data());
  nvrtc = api;
  return Status::Ok();
}

// ---- compiling ----------------------------------------------------------------------
bool any_dir_has(const std::vector<std::string>& dirs, const char* header) {
  std::error_code ec;
  for (const std::string& d : dirs)
    if (std::filesystem::is_regular_file(std::filesystem::path(d) / header, ec)) return true;
  return false;
}

// NVRTC's compilation of `options`: a cubin, or PTX (is_ptx) with its NUL.
Status run_nvrtc(const std::vector<std::string>& options, bool is_ptx, std::string* binary) {
  std::vector<const char*> argv;
  for (const std::string& o : options) argv.push_back(o.c_str());
  nvrtcProgram prog = nullptr;
  if (int rc = nvrtc->CreateProgram(&prog, kernel_cache::kProgram, kernel_cache::kProgramName, 0,
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
  rc = is_ptx ? nvrtc->GetPTXSize(prog, &size) : nvrtc->GetCUBINSize(prog, &size);
  if (rc == 0) {
    binary->assign(size, '\0');  // PTX: the size counts its terminating NUL
    rc = is_ptx ? nvrtc->GetPTX(prog, &(*binary)[0]) : nvrtc->GetCUBIN(prog, &(*binary)[0]);
  }
  nvrtc->DestroyProgram(&prog);
  if (rc != 0) return Status::Runtime(std::string("NVRTC: ") + nvrtc->GetErrorString(rc));
  return Status::Ok();
}

// The kernel for compute capability cc, loaded into the current context: a
// cubin (cc known to this NVRTC) or PTX of the newest older architecture,
// which the driver compiles; from the disk cache, or compiled by NVRTC.
Status load_module(const DriverConfig& cfg, int cc, CUmodule* module) {
  Status status = load_nvrtc(cfg);
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
  const bool is_ptx = target != cc;
  // Cubins run on any driver of NVRTC's major version (CUDA's minor-version
  // compatibility); PTX needs a driver at least as new as the NVRTC.
  if (cuda->version / 1000 < nvrtc->major || (is_ptx && cuda->version < nvrtc_version))
    return Status::Unavailable(
        "the CUDA driver supports CUDA " + version_text(cuda->version) + ", older than the NVRTC "
        "that compiles clipops' kernel (CUDA " + version_text(nvrtc_version) + ", " +
        cfg.nvrtc_library + "). Update the NVIDIA driver (CUDA 12 needs 525 or newer), or "
        "install an nvidia-cuda-nvrtc-cu12 no newer than CUDA " + version_text(cuda->version) + ".");

  for (const char* header : {"cooperative_groups.h", "nv/target"})
    if (!any_dir_has(cfg.include_dirs, header))
      return Status::Unavailable(
          std::string("NVRTC needs the CUDA header <") + header + "> to compile clipops' kernel, "
          "and no include folder holds it. Install them with `pip install "
          "nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12` (or `pip install clipops[tf-gpu]`), or "
          "point CLIPOPS_CUDA_INCLUDE at the folders that hold them.");

  const std::vector<std::string> options = kernel_cache::nvrtc_options(
      (is_ptx ? "-arch=compute_" : "-arch=sm_") + std::to_string(target), cfg.kernel_dir,
      cfg.include_dirs);
  std::string key;
  status = kernel_cache::key(kernel_cache::kProgram, options, nvrtc->major, nvrtc->minor, &key);
  if (!status.ok()) return status;
  auto compile = [&](std::string* binary) { return run_nvrtc(options, is_ptx, binary); };
  auto load = [&](const std::string& binary) {
    const CUresult err = cuda->ModuleLoadData(module, binary.data());
    if (err == kErrorUnsupportedPtxVersion || err == kErrorNoBinaryForGpu)
      return Status::Unavailable(
          "the CUDA driver (CUDA " + version_text(cuda->version) + ") cannot load clipops' kernel "
          "compiled by NVRTC " + version_text(nvrtc_version) + " (" + cuda_error_text(err) + "). "
          "Update the NVIDIA driver, or install an nvidia-cuda-nvrtc-cu12 no newer than the "
          "driver's CUDA.");
    if (err != kSuccess) return cuda_failure("loading clipops' kernel (cuModuleLoadData)", err);
    return Status::Ok();
  };
  std::string binary;
  return kernel_cache::get(cfg.cache_dir,
                           kernel_cache::entry_name(key, is_ptx ? "ptx" : "cubin"), compile, load,
                           &binary);
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
    if ((err = cuda->CtxGetId(context_, &id_)) != kSuccess) return cuda_failure("cuCtxGetId", err);
    return Status::Ok();
  }
  ~ScopedContext() {
    CUcontext popped;
    if (pushed_) cuda->CtxPopCurrent(&popped);
  }
  unsigned long long id() const { return id_; }

 private:
  CUcontext context_ = nullptr;
  unsigned long long id_ = 0;
  bool pushed_ = false;
};

// The kernel of the current context, whose id is context_id (compiled, or
// read from the cache, at its first launch).
Status get_kernel(unsigned long long context_id, Kernel* kernel) {
  ContextKernel* entry = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    std::unique_ptr<ContextKernel>& slot = kernels[context_id];
    if (!slot) slot.reset(new ContextKernel);
    entry = slot.get();
  }
  if (entry->ready.load(std::memory_order_acquire)) {
    *kernel = entry->kernel;
    return Status::Ok();
  }
  std::lock_guard<std::mutex> compiling(entry->mu);  // this context's launches wait; others go on
  if (entry->ready.load(std::memory_order_acquire)) {
    *kernel = entry->kernel;
    return Status::Ok();
  }
  DriverConfig cfg;
  {
    std::lock_guard<std::mutex> lock(mu);
    cfg = config;
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

  CUmodule module = nullptr;
  Status status = load_module(cfg, cc, &module);
  if (!status.ok()) return status;
  Kernel k;
  int per_sm = 0, update_per_sm = 0;
  err = cuda->ModuleGetFunction(&k.function, module, kernel_cache::kKernelName);
  if (err == kSuccess)
    err = cuda->OccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k.function, detail::kThreads, 0);
  if (err == kSuccess)
    err = cuda->ModuleGetFunction(&k.update, module, kernel_cache::kUpdateKernelName);
  if (err == kSuccess)
    err = cuda->OccupancyMaxActiveBlocksPerMultiprocessor(&update_per_sm, k.update,
                                                          detail::kThreads, 0);
  if (err != kSuccess) return cuda_failure("preparing clipops' kernel", err);
  k.resident_blocks = std::max(1, sms * per_sm);
  k.update_resident_blocks = std::max(1, sms * update_per_sm);
  entry->kernel = k;  // the module stays loaded for the life of the context
  entry->ready.store(true, std::memory_order_release);
  *kernel = k;
  return Status::Ok();
}

// Copies the table to the device on `stream` through a pinned block of this
// context that no copy in flight uses (cuEventQuery never blocks, so the host
// never waits). Called with mu held.
Status stage_table(unsigned long long context_id, void* dst, const void* src, size_t bytes,
                   CUstream stream) {
  PinnedBlock* block = nullptr;
  for (PinnedBlock& b : pinned)
    if (b.context == context_id && b.bytes >= bytes && cuda->EventQuery(b.done) == kSuccess) {
      block = &b;
      break;
    }
  if (block == nullptr) {
    PinnedBlock b{context_id, nullptr, std::max<size_t>(bytes, 64 << 10), nullptr};
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

// What both launchers do once their input is checked: the driver, the
// stream's context made current (while `scope` lives), its kernels, and the
// tables (`bytes` at `table`) staged into the workspace on the stream.
Status prepare_context(CUstream stream, const void* table, size_t bytes, void* workspace,
                       ScopedContext* scope, Kernel* kernel) {
  Status status;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!(status = load_cuda()).ok()) return status;
  }
  if (!(status = scope->push(stream)).ok()) return status;
  if (!(status = get_kernel(scope->id(), kernel)).ok()) return status;
  if (bytes > 0) {
    std::lock_guard<std::mutex> lock(mu);  // the pinned blocks; microseconds
    status = stage_table(scope->id(), workspace, table, bytes, stream);
  }
  return status;
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
  ScopedContext scope;
  Kernel kernel;
  status = prepare_context(stream, table.data(), sizeof(TensorEntry) * num_tensors, workspace,
                           &scope, &kernel);
  if (!status.ok()) return status;
  detail::KernelArgs kernel_args(workspace, num_tensors, items, args);
  const CUresult err = cuda->LaunchCooperativeKernel(
      kernel.function, detail::grid_size(items, kernel.resident_blocks), 1, 1, detail::kThreads,
      1, 1, 0, stream, kernel_args.params);
  if (err != kSuccess) return cuda_failure("launching the clip kernel", err);
  return Status::Ok();
}

Status update_driver(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                     void* workspace, size_t workspace_bytes, CUstream stream) {
  thread_local std::vector<char> image;  // both tables, laid out as in the workspace
  long long items = 0;
  Status status = detail::prepare_update_launch(params, num_tensors, args, workspace,
                                                workspace_bytes, &image, &items);
  if (!status.ok()) return status;
  ScopedContext scope;
  Kernel kernel;
  status = prepare_context(stream, image.data(), num_tensors > 0 ? image.size() : 0, workspace,
                           &scope, &kernel);
  if (!status.ok()) return status;
  detail::UpdateKernelArgs kernel_args(workspace, num_tensors, items, args);
  const CUresult err = cuda->LaunchCooperativeKernel(
      kernel.update, detail::grid_size(items, kernel.update_resident_blocks), 1, 1,
      detail::kThreads, 1, 1, 0, stream, kernel_args.params);
  if (err != kSuccess) return cuda_failure("launching the update kernel", err);
  return Status::Ok();
}

}  // namespace clipops
