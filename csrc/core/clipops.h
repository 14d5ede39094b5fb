// clipops core API: fused global-norm gradient clipping over a list of tensors.
//
// Framework-free: no TensorFlow, pybind11 or CuPy here. Adapters turn their
// tensors into TensorDesc and call one of the two entry points below. Both
// follow the reduction order documented in clip_math.h, so CPU and CUDA
// results are bitwise equal.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "clip_math.h"
#include "optim_math.h"

// The CUDA runtime's own declaration, repeated so this header needs no CUDA.
typedef struct CUstream_st* cudaStream_t;
typedef struct CUstream_st* CUstream;  // the driver API's name for the same handle

namespace clipops {

// One tensor of the list. `out` may equal `in` (clip in place, or a buffer the
// framework forwarded); it must not overlap any other tensor's input or output.
struct TensorDesc {
  const void* in = nullptr;  // numel elements of `dtype`, contiguous
  void* out = nullptr;       // numel elements, or nullptr for "norm only"
  int64_t numel = 0;
  int dtype = kFloat32;      // a DTypeCode
};

// A scalar argument: a host value, or (CUDA only) a device pointer to one
// element of the norm dtype, read by the kernel so the host never waits.
struct Scalar {
  double value = 0.0;
  const void* device_ptr = nullptr;
};

// The clip modes (ClipMode) are in clip_math.h, shared with the kernels.
// What to compute. The norm dtype is the list's dtype, or float32 for a list
// of mixed dtypes (see norm_dtype_of); it also types device scalars.
struct ClipArgs {
  int mode = kClipByGlobalNorm;
  int norm_dtype = kFloat32;
  bool scale = true;       // false: compute the global norm only (kClipByGlobalNorm)
  Scalar clip_norm;        // the clip threshold, exactly representable in norm_dtype
  Scalar clip_min, clip_max;  // kClipByValue: the bounds, rounded to each tensor's dtype
  bool has_use_norm = false;
  Scalar use_norm;         // replaces the computed norm when has_use_norm
  // One element of norm_dtype (host for CPU, device for CUDA); may be null. It
  // must not alias clip_norm.device_ptr or use_norm.device_ptr: block 0 stores
  // the norm while other blocks may still read them (validate() rejects it).
  void* norm_out = nullptr;
  // num_tensors elements of norm_dtype (host for CPU, device for CUDA), or null:
  // each tensor's own norm, from the same partial sums as the global norm (no
  // extra pass over the data), so tensor_norms[i] equals the global norm of
  // the list {tensor i} when the list has one dtype. Computed even with use_norm.
  void* tensor_norms = nullptr;
  // kClipByGlobalNorm: the inputs are taken as x * unscale (a loss scale's
  // inverse, 1/s, in mixed precision): the norms (global and per tensor) and
  // the outputs are those of the list {x_i * unscale}, from the one pass over
  // x. The norm is sqrt(sum of squares) * unscale, rounded once to the norm
  // dtype; each output is x * (clip scale * unscale). For a power of two both
  // products are exact (over- and underflow aside), so the outputs have the
  // bits of unscaling first and clipping after. A given use_norm is the norm
  // of the unscaled list. 1 (the default) changes nothing; a host value must
  // be finite and > 0. Other modes take 1 only.
  Scalar unscale{1.0, nullptr};
  // true: a non-finite norm (inf or NaN, computed or use_norm) skips the step:
  // the outputs equal the inputs as they are (not multiplied by unscale). false: TensorFlow's behaviour (the
  // scale, and so every output, becomes NaN).
  bool skip_nonfinite = false;
  // false when the caller allocated every output itself; true also checks
  // that norm_out and the scalar pointers overlap no tensor that is written.
  bool check_overlap = true;
};

// Success, or what went wrong: bad input (nothing was touched), a failure of
// the CUDA runtime or driver, or a GPU route that cannot run on this machine
// (a missing library, an old driver or GPU: the message names the cause and
// the fix). Adapters map them to their own error types.
struct Status {
  enum Code { kOk = 0, kInvalidArgument, kRuntimeError, kUnavailable };
  Code code = kOk;
  std::string message;
  bool ok() const { return code == kOk; }
  static Status Ok() { return {}; }
  static Status Error(std::string m) { return {kInvalidArgument, std::move(m)}; }
  static Status Runtime(std::string m) { return {kRuntimeError, std::move(m)}; }
  static Status Unavailable(std::string m) { return {kUnavailable, std::move(m)}; }
};

// The dtype of the returned norm: the common dtype, or float32 if mixed.
int norm_dtype_of(const TensorDesc* tensors, int num_tensors);

// Number of work items (chunks) of a list, the length of the partials array.
int64_t num_work_items(const TensorDesc* tensors, int num_tensors);

// Checks dtypes, sizes and pointers, that norm_out aliases neither scalar
// pointer, and (if args.check_overlap) that nothing written overlaps another
// tensor or scalar. Both entry points call it before touching data.
Status validate(const TensorDesc* tensors, int num_tensors, const ClipArgs& args);

// ---- CPU -------------------------------------------------------------------
// Runs fn(begin, end) over [0, n) split into pieces; adapters supply their
// framework's thread pool. cost_per_item is in nanoseconds, a sharding hint.
using ParallelFor =
    std::function<void(int64_t n, int64_t cost_per_item,
                       const std::function<void(int64_t begin, int64_t end)>& fn)>;

// A ParallelFor over one process-wide pool of (cores - 1) worker threads,
// started at first use and shared by concurrent callers; the calling thread
// works too, so a call never waits for a busy pool to free up. A child made
// by fork() starts a pool of its own at its first parallel call (the parent's
// workers do not exist there), even when the fork came while another thread
// was inside a call. No work is handed to workers that did not start: where
// none could, the caller does all of it.
ParallelFor default_parallel_for();

// What the pool of this process is doing, for tests (tests/test_concurrency.py).
struct WorkerPoolStats {
  int workers;               // worker threads started in this process (0 before its first call)
  int workers_that_ran;      // of them, those that have run at least one piece
  uint64_t worker_pieces;    // pieces run by workers (the callers run the rest)
  size_t queued;             // tickets waiting for a worker, stale ones included; <= workers
};
WorkerPoolStats worker_pool_stats();

// While alive, this thread computes with IEEE subnormals: FTZ and DAZ cleared
// (x86), the previous mode restored after. TensorFlow runs its CPU kernels with
// both set; the CPU kernel clears them for all its work, and an adapter must
// hold one while it converts scalar arguments to double, so that every front
// end, and the GPU, give the same bits.
class ScopedIeeeSubnormals {
 public:
  ScopedIeeeSubnormals();
  ~ScopedIeeeSubnormals();
  ScopedIeeeSubnormals(const ScopedIeeeSubnormals&) = delete;
  ScopedIeeeSubnormals& operator=(const ScopedIeeeSubnormals&) = delete;

 private:
  unsigned saved_ = 0;
};

// ---- Host output blocks (host_cache.cc) ---------------------------------------
// Fresh outputs of at least kCachedOutputBytes, of the NumPy front end and of
// the TF op's CPU kernel, come from here. Blocks are page-aligned (sizes
// rounded to 2 MiB, huge pages advised, from 8 MiB), kept mapped when freed,
// and handed to the next request of the same rounded size, so a training
// loop's outputs are faulted once, not every step. The freed blocks kept are
// bounded: CLIPOPS_HOST_CACHE_MB (default 1024; 0 keeps none), or
// set_host_cache_limit; beyond it the largest are unmapped. Smaller outputs
// stay with the frameworks' allocators, which reuse such sizes without new
// page faults.
// Each library that holds a copy of the core holds its own cache, bounded on
// its own: libclipops_core (the NumPy and CuPy front ends) and the TF op
// library, which keeps a CPU-only copy so that it carries no CUDA code. A
// process that uses both front ends can so keep up to twice the limit.
constexpr size_t kCachedOutputBytes = size_t(256) << 10;
size_t host_block_size(size_t bytes);     // the rounded size a request takes
void* host_block_alloc(size_t bytes);     // nullptr when the system has no memory
void host_block_free(void* block, size_t bytes);  // bytes: as passed to alloc
struct HostCacheStats {
  size_t cached_bytes;  // freed blocks kept for reuse
  size_t in_use_bytes;  // blocks handed out and not yet freed
  size_t limit_bytes;
  size_t hits, misses;  // requests served from the cache, and not
};
HostCacheStats host_cache_stats();
void set_host_cache_limit(size_t bytes);

// Computes the global norm and (if args.scale) writes every scaled tensor.
// \param[in] tensors      the list; host memory
// \param[in] num_tensors  its length (may be 0: the norm is then 0)
// \param[in] args         norm dtype, clip_norm, use_norm; host scalars only
// \param[in] parallel_for how to spread work items over threads
// \return an error status on invalid input; nothing is written then
Status clip_by_global_norm_cpu(const TensorDesc* tensors, int num_tensors,
                               const ClipArgs& args, const ParallelFor& parallel_for);

// ---- CUDA ------------------------------------------------------------------
// True when this build has the CUDA kernel compiled in.
bool cuda_compiled();

// Bytes of device workspace clip_by_global_norm_cuda needs for this list.
size_t cuda_workspace_bytes(const TensorDesc* tensors, int num_tensors);

// One cooperative kernel launch on `stream`: norm, then scale. Never waits for
// the device. Returns an error for invalid input or a failed launch.
// \param[in] tensors          the list; device pointers, host array
// \param[in] num_tensors      its length
// \param[in] args             as for the CPU; norm_out is a device pointer
// \param[in] workspace        cuda_workspace_bytes() of device memory, 16-byte aligned
// \param[in] workspace_bytes  its size
// \param[in] stream           the caller's stream
Status clip_by_global_norm_cuda(const TensorDesc* tensors, int num_tensors,
                                const ClipArgs& args, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

// ---- CUDA through the driver API (clip_driver.cc) ---------------------------
// The TF op's GPU route. Nothing of CUDA is linked: at the first launch,
// libcuda.so.1 and the NVRTC named below are opened with dlopen, the shipped
// kernel source is compiled for the GPU present (cached on disk: the folder,
// key and trust checks of kernel_cache.h, shared with the CuPy route), and the
// launch is one cuLaunchCooperativeKernel on the caller's stream, in the
// stream's own context. So the kernel runs with the CUDA the framework loaded
// (TensorFlow 2.21: CUDA 12, any driver from 525, sm_60 and newer). A context's
// first launch compiles while launches on other contexts (GPUs) go on.
struct DriverConfig {
  // A path, or a bare name that dlopen looks up in the system's library path:
  // the libraries that hold this route (libclipops_core.so, _clipops_tf.so)
  // have no RUNPATH, so a name never resolves to a file beside them.
  std::string nvrtc_library = "libnvrtc.so.12";
  std::string cuda_library = "libcuda.so.1";
  std::vector<std::string> include_dirs;  // <cooperative_groups.h> and CCCL's <nv/target>
  std::string kernel_dir;                 // clip_kernel.cuh and what it includes
  // Compiled kernels (kernel_cache::default_dir()); used only if it passes
  // kernel_cache.h's trust checks. Empty: no disk cache.
  std::string cache_dir;
};

// Sets where the route finds its libraries, headers and cache. Takes effect
// for contexts whose kernel is not loaded yet; the Python adapters call it
// once at import.
void configure_driver_route(const DriverConfig& config);

// As clip_by_global_norm_cuda, through the driver route; the workspace is
// cuda_workspace_bytes() of device memory. A route that cannot run here
// returns kUnavailable with the cause and the fix.
Status clip_by_global_norm_driver(const TensorDesc* tensors, int num_tensors,
                                  const ClipArgs& args, void* workspace,
                                  size_t workspace_bytes, CUstream stream);

// ---- Fused clip + optimizer update (optim_cpu.cc, optim_cuda.cu) ---------------
// The clip and Keras 3's update_step for SGD (momentum, nesterov), Adam and
// AdamW in one pass pair (CPU) or one cooperative launch (CUDA) over a whole
// list of variables: read the gradients for the norm, then g, p, m, v once and
// write p, m, v. Per element the update is Keras' own float32 arithmetic, op for
// op (optim_math.h), applied to the gradients the clip above would output, so
// the result is bit-identical to clip_by_global_norm (or clip_by_norm,
// clip_by_value) followed by Keras' weight decay and update_step.

// One variable of the list. The update writes param, m and v in place; none of
// them may overlap another buffer of the call.
struct ParamDesc {
  float* param = nullptr;       // numel float32 values
  const void* grad = nullptr;   // numel values of grad_dtype
  int grad_dtype = kFloat32;    // float32, float16 or bfloat16 (Keras casts to float32)
  float* m = nullptr;           // Adam's first moment, SGD's momentum; null for SGD without it
  float* v = nullptr;           // Adam's second moment; null for SGD
  int64_t numel = 0;
  bool decay = false;           // apply weight decay (false: no weight_decay, or excluded)
};

// Keras' `optimizer.iterations`: the updates applied before this one, so this
// step is t = iterations + 1 (Adam's bias correction, kPowersFromStep).
struct StepCounter {
  int64_t value = 0;
  // When set, the counter is read here instead (device memory for CUDA, host
  // for the CPU), so a training loop need not pass a new value per step.
  int64_t* ptr = nullptr;
  // With ptr: the kernel stores iterations + 1 after the update, unless the
  // step is skipped (skip_nonfinite), as Keras' loss-scale optimizer leaves the
  // inner optimizer's iterations. No other launch, no host sync.
  bool increment = false;
};

// What to compute. Scalars take a host value, or (CUDA) a device pointer read
// by the kernel, so the host never waits and a new value needs no retrace.
// Device scalars: clip and unscale are one element of norm_dtype (as ClipArgs'),
// learning_rate and the powers one float32.
struct UpdateArgs {
  int rule = kAdam;               // an UpdateRule (optim_math.h); AdamW is kAdam + weight decay

  // ---- the clip, folded in (ClipArgs' semantics) ----
  int clip_mode = kNoClip;        // kClipByGlobalNorm, kClipByNorm, kClipByValue or kNoClip
  int norm_dtype = kFloat32;      // norm_dtype_of(the gradients); types norm_out, tensor_norms
  // global_clipnorm, clipnorm, or clipvalue v (the bounds are -v and v), in
  // norm_dtype: as clip_norm / clip_value_max of the clip. A host value is > 0.
  Scalar clip;
  // kClipByGlobalNorm and kNoClip: the gradients are taken as g * unscale
  // (ClipArgs::unscale); 1 changes nothing. The other clips take 1 only.
  Scalar unscale{1.0, nullptr};
  // true: a non-finite global norm (an inf or NaN gradient, or squares past
  // float32's range) skips the step: nothing is written but norm_out and
  // tensor_norms, and the step counter is not incremented. false: Keras'
  // behaviour (the NaN reaches the variables).
  bool skip_nonfinite = false;
  void* norm_out = nullptr;       // one element of norm_dtype, or null: the norm of g * unscale
  void* tensor_norms = nullptr;   // num_tensors elements of norm_dtype, or null (ClipArgs')
  bool check_overlap = true;      // false: only the scalar buffers are checked (the caller vouches)

  // ---- the rule: float32 values, converted as Keras converts them ----
  Scalar learning_rate;           // the float32 learning rate (a schedule's value for this step)
  float weight_decay = 0.0f;      // float32(weight_decay); used for tensors with ParamDesc::decay
  float momentum = 0.0f;          // SGD: float32(momentum); nonzero: the tensors have m, as Keras
  bool nesterov = false;          // SGD with momentum
  float one_minus_beta_1 = 0.0f;  // Adam: float32(1 - beta_1), the difference taken in double
  float one_minus_beta_2 = 0.0f;  // Adam: float32(1 - beta_2)
  float epsilon = 0.0f;           // Adam: float32(epsilon)
  // Adam's bias correction: beta_1^t and beta_2^t as float32 (kPowersGiven:
  // Keras computes them with ops.power, tf.pow; keras_cpu_power reproduces
  // TensorFlow's CPU result), or derived from the step counter in the kernel
  // (kPowersFromStep: power_by_squaring of float32(beta_1), float32(beta_2)).
  int power_source = kPowersGiven;
  Scalar beta_1_power, beta_2_power;
  float beta_1 = 0.0f, beta_2 = 0.0f;  // kPowersFromStep: float32(beta_1), float32(beta_2)
  StepCounter iterations;              // kPowersFromStep, and StepCounter::increment
};

// Checks the list and the arguments (dtypes, sizes, pointers, alignment, the
// state each rule needs, host scalars' ranges) and, if args.check_overlap, that
// nothing written (params, m, v, norm outputs, a counter incremented) overlaps
// any other buffer. Both entry points call it before touching data. Errors
// name the tensor and the buffer ("tensor 3's m and tensor 5's param ...").
Status validate_update(const ParamDesc* params, int num_tensors, const UpdateArgs& args);

// beta^t as Keras' ops.power(float32(beta), float32(t)) gives it on
// TensorFlow's CPU: TF's Pow kernel on 0-d tensors is the C library's powf (in
// this process, the same function), so the NumPy route is bit-identical. For
// the host scalars beta_1_power / beta_2_power.
float keras_cpu_power(float beta, int64_t t);

// The fused update on the CPU: the norm pass, then one pass that reads g, p, m,
// v once and writes p, m, v, each spread over `parallel_for`.
// \param[in,out] params   the list; host memory; updated in place
// \param[in] num_tensors  its length (may be 0: the norm is then 0)
// \param[in] args         host scalars only (StepCounter::ptr: a host pointer)
// \param[in] parallel_for how to spread work items over threads
// \return an error status on invalid input; nothing is written then
Status update_cpu(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                  const ParallelFor& parallel_for);

// Bytes of device workspace update_cuda needs for this list (16-byte aligned).
size_t update_cuda_workspace_bytes(const ParamDesc* params, int num_tensors);

// One cooperative launch on `stream`: the gradients' norms, a grid-wide sync,
// then the update of every element. Never waits for the device.
// \param[in,out] params       the list; device pointers, host array
// \param[in] num_tensors      its length
// \param[in] args             as for the CPU; pointers are device pointers
// \param[in] workspace        update_cuda_workspace_bytes() of device memory, 16-byte aligned
// \param[in] workspace_bytes  its size
// \param[in] stream           the caller's stream
// \return an error for invalid input (nothing is launched) or a failed launch
Status update_cuda(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

// As update_cuda, through the driver route of clip_by_global_norm_driver (the
// TF op's GPU kernel): the same module, compiled once per context for both
// kernels, one cooperative launch of clipops_update_kernel on `stream`. Device
// scalars (learning rate, powers, clip, unscale) are read by the kernel, so the
// host never waits. A route that cannot run here returns kUnavailable with the
// cause and the fix, as the clip's.
// \param[in,out] params       the list; device pointers, host array
// \param[in] num_tensors      its length
// \param[in] args             as for update_cuda
// \param[in] workspace        update_cuda_workspace_bytes() of device memory, 16-byte aligned
// \param[in] workspace_bytes  its size
// \param[in] stream           the caller's stream (its context runs the kernel)
// \return an error for invalid input (nothing is launched) or a failed launch
Status update_driver(const ParamDesc* params, int num_tensors, const UpdateArgs& args,
                     void* workspace, size_t workspace_bytes, CUstream stream);

}  // namespace clipops
