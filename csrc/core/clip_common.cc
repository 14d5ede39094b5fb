// Host-side pieces shared by the CPU kernel and the CUDA launcher.
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "clip_launch.h"
#include "clipops.h"
#include "overlap.h"

namespace clipops {

using detail::kChunk;

int norm_dtype_of(const TensorDesc* tensors, int num_tensors) {
  if (num_tensors == 0) return kFloat32;
  const int first = tensors[0].dtype;
  for (int i = 1; i < num_tensors; ++i)
    if (tensors[i].dtype != first) return kFloat32;
  return first;
}

int64_t num_work_items(const TensorDesc* tensors, int num_tensors) {
  int64_t items = 0;
  for (int i = 0; i < num_tensors; ++i) items += (tensors[i].numel + kChunk - 1) / kChunk;
  return items;
}

namespace {

std::string where(int i) { return "tensor " + std::to_string(i) + ": "; }

// Ranges of the scalar arguments are labelled by these negative indices.
constexpr int kClipNorm = -1, kUseNorm = -2, kNormOut = -3, kTensorNorms = -4, kClipMin = -5,
              kClipMax = -6, kUnscale = -7;

std::string label(int index) {
  switch (index) {
    case kClipNorm: return "clip_norm";
    case kUseNorm: return "use_norm";
    case kNormOut: return "norm_out";
    case kTensorNorms: return "tensor_norms";
    case kClipMin: return "clip_value_min";
    case kClipMax: return "clip_value_max";
    case kUnscale: return "unscale";
    default: return "tensor " + std::to_string(index);
  }
}

// A range's owner is a tensor or one of the scalar labels above; it is written
// when it is an output, an input clipped in place, or norm_out.
using detail::MemRange;

MemRange range_of(const void* p, size_t bytes, int index, bool written) {
  return detail::mem_range(p, bytes, index, 0, written);
}

// The scalars the kernel reads through pointers and the norm it writes. Every
// block reads clip_norm/use_norm after block 0 has stored the norm, so norm_out
// must not alias them (checked even when the caller vouches for its tensors).
std::vector<MemRange> scalar_ranges(const ClipArgs& args, int num_tensors) {
  const size_t bytes = static_cast<size_t>(detail::dtype_size(args.norm_dtype));
  std::vector<MemRange> r;
  if (args.clip_norm.device_ptr != nullptr && args.scale)
    r.push_back(range_of(args.clip_norm.device_ptr, bytes, kClipNorm, false));
  if (args.use_norm.device_ptr != nullptr && args.has_use_norm)
    r.push_back(range_of(args.use_norm.device_ptr, bytes, kUseNorm, false));
  if (args.unscale.device_ptr != nullptr)
    r.push_back(range_of(args.unscale.device_ptr, bytes, kUnscale, false));
  if (args.norm_out != nullptr) r.push_back(range_of(args.norm_out, bytes, kNormOut, true));
  if (args.tensor_norms != nullptr)
    r.push_back(range_of(args.tensor_norms, bytes * num_tensors, kTensorNorms, true));
  if (args.mode == kClipByValue) {
    if (args.clip_min.device_ptr != nullptr)
      r.push_back(range_of(args.clip_min.device_ptr, bytes, kClipMin, false));
    if (args.clip_max.device_ptr != nullptr)
      r.push_back(range_of(args.clip_max.device_ptr, bytes, kClipMax, false));
  }
  return r;
}

// A written range must not overlap any other range: scaling one tensor would
// change another's data mid-call. Read-only ranges may share memory.
Status check_overlaps(std::vector<MemRange> ranges) {
  MemRange a, b;
  if (!detail::find_written_overlap(std::move(ranges), &a, &b)) return Status::Ok();
  return Status::Error(label(a.owner) + " and " + label(b.owner) +
                       " share memory that would be written; pass each buffer once, "
                       "and outputs that alias nothing else");
}

}  // namespace

Status validate(const TensorDesc* tensors, int num_tensors, const ClipArgs& args) {
  if (num_tensors < 0) return Status::Error("the number of tensors is negative");
  if (num_tensors > 0 && tensors == nullptr) return Status::Error("the tensor list is null");
  if (args.norm_dtype < kFloat16 || args.norm_dtype > kFloat64)
    return Status::Error("unsupported norm dtype code " + std::to_string(args.norm_dtype));
  if (args.norm_dtype != norm_dtype_of(tensors, num_tensors))
    return Status::Error("the norm dtype must be the list's dtype, or float32 for a mixed list");
  if (args.mode < kClipByGlobalNorm || args.mode > kClipByValue)
    return Status::Error("unknown clip mode " + std::to_string(args.mode));
  if (args.mode != kClipByGlobalNorm && (!args.scale || args.has_use_norm || args.norm_out))
    return Status::Error("clip_by_norm and clip_by_value always write outputs, and take neither "
                         "use_norm nor norm_out");
  if (args.mode == kClipByValue && args.tensor_norms != nullptr)
    return Status::Error("clip_by_value computes no norms: tensor_norms must be null");
  if (args.mode != kClipByGlobalNorm && (args.unscale.device_ptr || args.unscale.value != 1.0))
    return Status::Error("unscale is for clip_by_global_norm only (it must be 1 here)");
  if (args.unscale.device_ptr == nullptr &&
      !(args.unscale.value > 0.0 && args.unscale.value < std::numeric_limits<double>::infinity()))
    return Status::Error("unscale must be a finite number > 0, got " +
                         std::to_string(args.unscale.value));
  for (int i = 0; i < num_tensors; ++i) {
    const TensorDesc& t = tensors[i];
    if (t.dtype < kFloat16 || t.dtype > kFloat64)
      return Status::Error(where(i) + "unsupported dtype code " + std::to_string(t.dtype) +
                           " (float16, bfloat16, float32 and float64 are supported)");
    if (t.numel < 0) return Status::Error(where(i) + "negative element count");
    if (t.numel > 0 && t.in == nullptr) return Status::Error(where(i) + "null input pointer");
    if (args.scale && t.numel > 0 && t.out == nullptr)
      return Status::Error(where(i) + "null output pointer");
    // Element-aligned data only: a GPU faults on a misaligned load or store
    // (and the fault ends the CUDA context), and C++ gives such access no meaning.
    const uintptr_t size = static_cast<uintptr_t>(detail::dtype_size(t.dtype));
    if (t.numel > 0 && (reinterpret_cast<uintptr_t>(t.in) % size != 0 ||
                        (args.scale && reinterpret_cast<uintptr_t>(t.out) % size != 0)))
      return Status::Error(where(i) + "the data is not aligned to its " + std::to_string(size) +
                           "-byte elements; copy it to an aligned array first");
  }
  // The scalars first, and always: the caller vouches for its tensors only.
  std::vector<MemRange> ranges = scalar_ranges(args, num_tensors);
  Status status = check_overlaps(ranges);
  if (!status.ok() || !args.check_overlap) return status;
  for (int i = 0; i < num_tensors; ++i) {
    const TensorDesc& t = tensors[i];
    const size_t bytes = static_cast<size_t>(t.numel) * detail::dtype_size(t.dtype);
    ranges.push_back(range_of(t.in, bytes, i, args.scale && t.out == t.in));
    if (args.scale && t.out != nullptr && t.out != t.in)
      ranges.push_back(range_of(t.out, bytes, i, true));
  }
  return check_overlaps(std::move(ranges));
}

namespace {

// A fixed set of worker threads, started at the first parallel call and shared
// by every call and every calling thread: starting threads per call cost tens
// of microseconds each, and concurrent callers multiplied them without bound.
// A call hands out tickets; whoever holds one (a worker, or the caller itself)
// claims pieces until none is left, so a call completes even when every
// worker is busy with other calls. Tickets outlive their call harmlessly: a
// late one finds no piece left.
//
// fork(): the child has none of the parent's threads. At fork, the pool's
// mutex may be held and its condition variable may count waiters, by threads
// that do not exist in the child; touching either there could block forever.
// So a pthread_atfork handler makes the child forget the whole state (leaked on
// purpose, never touched again), and its first parallel call starts a fresh
// pool with its own workers.
class WorkerPool {
 public:
  constexpr WorkerPool() = default;

  // The atfork child handler: runs in the child's only thread, before any
  // other code of the child.
  void forget_after_fork() { state_.store(nullptr); }

  // Runs fn(k) for every k in [0, pieces), on the caller and up to
  // pieces - 1 workers, and returns when all have run. The queue never holds
  // more tickets than there are workers (stale ones count): more could not be
  // taken at once, and where no worker started, none is handed out at all.
  void run(int pieces, const std::function<void(int)>& fn) {
    State* s = state();
    auto call = std::make_shared<Call>(pieces, fn);
    int helpers;
    {
      std::lock_guard<std::mutex> lock(s->mu);
      const int room = s->workers.load() - static_cast<int>(s->tickets.size());
      helpers = std::max(0, std::min(pieces - 1, room));
      for (int k = 0; k < helpers; ++k) s->tickets.push_back(call);
    }
    if (helpers > 0) s->ready.notify_all();
    call->work();  // with no helper, every piece
    std::unique_lock<std::mutex> lock(call->mu);
    call->finished.wait(lock, [&] { return call->done == call->pieces; });
  }

  WorkerPoolStats stats() {
    WorkerPoolStats r{};
    State* s = state_.load();
    if (s == nullptr) return r;  // no parallel call yet in this process
    r.workers = s->workers.load();
    r.workers_that_ran = s->workers_that_ran.load();
    r.worker_pieces = s->worker_pieces.load();
    std::lock_guard<std::mutex> lock(s->mu);
    r.queued = s->tickets.size();
    return r;
  }

 private:
  struct Call {
    Call(int n, const std::function<void(int)>& f) : pieces(n), fn(f) {}
    const int pieces;
    const std::function<void(int)>& fn;  // the caller waits, so the reference stays valid
    std::atomic<int> next{0};
    std::mutex mu;
    std::condition_variable finished;
    int done = 0;  // guarded by mu

    int work() {  // returns the number of pieces this thread ran
      int ran = 0;
      for (int k; (k = next.fetch_add(1)) < pieces; ++ran) {
        fn(k);
        std::lock_guard<std::mutex> lock(mu);
        if (++done == pieces) finished.notify_all();
      }
      return ran;
    }
  };

  // Everything a process's workers share; one per process (see fork above).
  struct State {
    std::mutex mu;
    std::condition_variable ready;
    std::deque<std::shared_ptr<Call>> tickets;  // guarded by mu
    std::atomic<int> workers{0};                // threads created for this process
    std::atomic<int> workers_that_ran{0};       // instrumentation (WorkerPoolStats)
    std::atomic<uint64_t> worker_pieces{0};
  };

  // This process's state, made at its first parallel call. Published before
  // its workers start: a call that finds fewer workers hands out fewer tickets.
  State* state() {
    State* s = state_.load();
    if (s != nullptr) return s;
    auto* fresh = new State();
    if (!state_.compare_exchange_strong(s, fresh)) {
      delete fresh;  // another caller made it first
      return s;
    }
    const int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) - 1;
    for (int i = 0; i < n; ++i) {
      try {
        std::thread(loop, fresh).detach();
      } catch (const std::system_error&) {
        break;  // no more threads to be had: the callers do the rest
      }
      fresh->workers.fetch_add(1);
    }
    return fresh;
  }

  static void loop(State* s) {
    bool ran_any = false;
    for (;;) {
      std::shared_ptr<Call> call;
      {
        std::unique_lock<std::mutex> lock(s->mu);
        s->ready.wait(lock, [&] { return !s->tickets.empty(); });
        call = std::move(s->tickets.front());
        s->tickets.pop_front();
      }
      if (const int ran = call->work()) {
        s->worker_pieces.fetch_add(static_cast<uint64_t>(ran));
        if (!ran_any) s->workers_that_ran.fetch_add(1);
        ran_any = true;
      }
    }
  }

  std::atomic<State*> state_{nullptr};  // never destroyed: workers wait on it until exit
};

// Constant-initialized, so no function-local static guard exists that a fork
// could catch half-taken; the handler is registered when the library loads.
WorkerPool pool;
[[maybe_unused]] const int atfork_registered = pthread_atfork(nullptr, nullptr, [] { pool.forget_after_fork(); });

}  // namespace

WorkerPoolStats worker_pool_stats() { return pool.stats(); }

ParallelFor default_parallel_for() {
  return [](int64_t n, int64_t cost_per_item,
            const std::function<void(int64_t, int64_t)>& fn) {
    // Handing pieces to the pool costs microseconds: only worth it for ~0.1 ms of work.
    const int64_t by_cost = (n * std::max<int64_t>(cost_per_item, 1)) / 100000;
    const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
    const int64_t pieces = std::min({hw, n, std::max<int64_t>(by_cost, 1)});
    if (pieces <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    pool.run(static_cast<int>(pieces), [&](int k) {
      fn(n * k / pieces, n * (k + 1) / pieces);
    });
  };
}

size_t cuda_workspace_bytes(const TensorDesc* tensors, int num_tensors) {
  // the table, then one double per work item and one per tensor (clip_launch.h)
  const size_t table = detail::partials_offset(num_tensors);
  const size_t doubles = static_cast<size_t>(num_work_items(tensors, num_tensors)) + num_tensors;
  return std::max<size_t>(16, table + sizeof(double) * doubles);
}

#if !defined(CLIPOPS_WITH_CUDA)
bool cuda_compiled() { return false; }
Status clip_by_global_norm_cuda(const TensorDesc* tensors, int num_tensors, const ClipArgs& args,
                                void*, size_t, cudaStream_t) {
  // bad input is reported as such on every build, as by the real launcher
  Status status = validate(tensors, num_tensors, args);
  if (!status.ok()) return status;
  return Status::Runtime("clipops was built without CUDA (nvcc was not found at build time)");
}
#endif

}  // namespace clipops
