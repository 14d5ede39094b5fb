// The CUDA emulation: a fake CUDA runtime (devices, streams, events, pinned
// memory, launches) and the scheduler that runs a kernel's threads.
//
// Execution model. Each block runs on its own OS thread; its threads are
// fibers (ucontext) of that OS thread, run one at a time in the chosen order
// and switched only at __syncthreads, __syncwarp, __shfl_*_sync and the grid
// sync. Blocks take turns (one runs at a time, in the chosen block order) and
// hand over at the grid sync or when they finish, so a launch is
// deterministic for a given order and seed. When no fiber of a block can run,
// the scheduler releases a complete barrier group, or reports the deadlock,
// the barrier some threads never reach, or the shuffle that reads outside its
// mask, naming the source line, instead of hanging.
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define CLIPOPS_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CLIPOPS_EMU_ASAN 1
#endif
#endif
#if defined(CLIPOPS_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

struct CUstream_st {};
struct CUevent_st {
  bool pending = false;  // recorded, and the work before it has not run yet
};

namespace clipops_emu {
namespace {

// ---- fake devices, streams, events, pinned memory ------------------------------

struct Device {
  int sms, blocks_per_sm;
  bool cooperative;
};

std::mutex g_mu;  // guards everything in this section
Settings g_settings;
std::vector<Device> g_devices{{4, 2, true}};  // device 0: 8 resident blocks
std::vector<KernelInfo> g_kernels;
std::set<const CUstream_st*> g_streams{nullptr};  // nullptr: the default stream
std::set<const CUevent_st*> g_events;
std::map<const char*, size_t, std::less<>> g_pinned;  // cudaHostAlloc buffers: start -> bytes
Stats g_stats;
// Stream work, run by synchronize(): every stream's in one queue, in
// submission order, which is one of the orders CUDA allows.
std::deque<std::function<std::string()>> g_queue;
thread_local int t_device = 0;                      // per host thread, as in CUDA

const KernelInfo* find_kernel(const void* fn) {
  for (const KernelInfo& k : g_kernels)
    if (k.fn == fn) return &k;
  return nullptr;
}

bool is_pinned(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  auto it = g_pinned.upper_bound(c);
  if (it == g_pinned.begin()) return false;
  --it;
  return c + bytes <= it->first + it->second;
}

// ---- the scheduler ------------------------------------------------------------------

constexpr size_t kStackBytes = 64 << 10;  // per fiber; the kernels use a few KiB
constexpr unsigned long long kCanary = 0x5ca1ab1ec0ffee11ull;  // at each stack's far end

enum class Wait { kNone, kSyncthreads, kGridSync, kSyncwarp, kShuffle };
enum class FiberState { kRunnable, kWaiting, kExited, kFailed };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 idx{};
  unsigned int linear = 0;
  FiberState state = FiberState::kRunnable;
  Wait wait = Wait::kNone;
  Site site{nullptr, 0};
  unsigned int mask = 0;  // warp operations
  Shuffle shuffle = Shuffle::kIdx;
  int arg = 0, width = 32;
  unsigned long long value = 0;  // a shuffle's value in, then its result out
  void* fake_stack = nullptr;    // ASan's stack-use-after-return bookkeeping
};

struct Launch;

// kAtGridSync: every thread arrived at the grid sync; kReleased: so did every block
enum class BlockPhase { kReady, kAtGridSync, kReleased, kDone, kFailed };

struct Block {
  Launch* launch = nullptr;
  unsigned int id = 0;
  uint3 idx{};
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  ucontext_t sched;
  void* sched_fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  Fiber* running = nullptr;
  std::string error;
  BlockPhase phase = BlockPhase::kReady;
  std::mt19937_64 rng;
};

struct Launch {
  const KernelInfo* kernel = nullptr;
  std::vector<std::unique_ptr<std::max_align_t[]>> arg_storage;
  std::vector<void*> args;
  dim3 grid, block;
  bool cooperative = false;
  Settings settings;
  std::mutex mu;
  std::condition_variable cv;
  long long turn = -1;  // the block allowed to run, -1: the launch's own thread
  bool abort = false;
};

thread_local Block* t_block = nullptr;  // the block this OS thread runs

std::string base_name(const char* file) {
  const char* slash = std::strrchr(file, '/');
  return slash ? slash + 1 : file;
}

std::string where(Site s) { return base_name(s.file) + ":" + std::to_string(s.line); }

const char* shuffle_name(Shuffle k) {
  switch (k) {
    case Shuffle::kIdx: return "__shfl_sync";
    case Shuffle::kUp: return "__shfl_up_sync";
    case Shuffle::kDown: return "__shfl_down_sync";
    default: return "__shfl_xor_sync";
  }
}

std::string hex(unsigned int m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

// ASan must be told when the stack changes under it (fiber switches).
void start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#if defined(CLIPOPS_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
void finish_switch(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#if defined(CLIPOPS_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

// From the running fiber back to its block's scheduler. Returns when the
// scheduler resumes this fiber (never, once it exited or failed).
void yield(Block& b, Fiber& f) {
  start_switch(f.state == FiberState::kExited ? nullptr : &f.fake_stack, b.sched_bottom,
               b.sched_size);
  swapcontext(&f.ctx, &b.sched);
  finish_switch(f.fake_stack, nullptr, nullptr);
}

void fiber_main() {
  Block& b = *t_block;
  finish_switch(nullptr, &b.sched_bottom, &b.sched_size);  // first entry: learn the OS stack
  Fiber& f = *b.running;
  b.launch->kernel->invoke(b.launch->kernel->fn, b.launch->args.data());
  f.state = FiberState::kExited;
  yield(b, f);
}

Block& current_block() {
  Block* b = t_block;
  if (b == nullptr || b->running == nullptr) {
    std::fprintf(stderr, "clipops emulation: a device function was called outside a kernel\n");
    std::abort();
  }
  return *b;
}

// Records the first error of the block and stops this fiber for good.
[[noreturn]] void fail(Block& b, const std::string& message) {
  Fiber& f = *b.running;
  if (b.error.empty())
    b.error = "block " + std::to_string(b.id) + ", thread " + std::to_string(f.linear) + ": " + message;
  f.state = FiberState::kFailed;
  yield(b, f);
  std::abort();  // a failed fiber is never resumed
}

void wait_at(Block& b, Wait w, Site site) {
  Fiber& f = *b.running;
  f.state = FiberState::kWaiting;
  f.wait = w;
  f.site = site;
  yield(b, f);
}

void switch_to(Block& b, Fiber& f) {
  b.running = &f;
  start_switch(&b.sched_fake_stack, f.stack, kStackBytes);
  swapcontext(&b.sched, &f.ctx);
  finish_switch(b.sched_fake_stack, nullptr, nullptr);
  b.running = nullptr;
  unsigned long long canary;
  std::memcpy(&canary, f.stack, sizeof canary);
  if (canary != kCanary && b.error.empty())
    b.error = "block " + std::to_string(b.id) + ", thread " + std::to_string(f.linear) +
              ": overflowed its " + std::to_string(kStackBytes >> 10) + " KiB emulated stack";
}

// "threads 0-31, 64" style lists.
std::string ranges(const std::vector<unsigned int>& ids) {
  std::ostringstream os;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    os << (i ? ", " : "") << ids[i];
    if (j > i) os << "-" << ids[j];
    i = j + 1;
  }
  return os.str();
}

std::string describe(const Fiber& f) {
  switch (f.state) {
    case FiberState::kExited: return "exited";
    case FiberState::kWaiting: break;
    default: return "running";
  }
  switch (f.wait) {
    case Wait::kSyncthreads: return "wait at __syncthreads() at " + where(f.site);
    case Wait::kGridSync: return "wait at this_grid().sync() at " + where(f.site);
    case Wait::kSyncwarp: return "wait at __syncwarp(" + hex(f.mask) + ") at " + where(f.site);
    default: return std::string("wait at ") + shuffle_name(f.shuffle) + "(" + hex(f.mask) + ") at " +
                    where(f.site);
  }
}

// What every thread of a stuck block is doing, grouped.
std::string block_state(const Block& b) {
  std::map<std::string, std::vector<unsigned int>> groups;
  for (const Fiber& f : b.fibers) groups[describe(f)].push_back(f.linear);
  std::string s;
  for (const auto& [what, ids] : groups)
    s += (s.empty() ? "" : "; ") + std::string("threads ") + ranges(ids) + " " + what;
  return s;
}

bool is_warp_op(const Fiber& f) {
  return f.state == FiberState::kWaiting && (f.wait == Wait::kSyncwarp || f.wait == Wait::kShuffle);
}

// The lane a shuffle reads (its own when the source is outside its segment).
int source_lane(const Fiber& f, int lane) {
  const int seg = lane / f.width * f.width, pos = lane - seg;
  switch (f.shuffle) {
    case Shuffle::kIdx: return seg + ((f.arg % f.width) + f.width) % f.width;
    case Shuffle::kUp: return pos >= f.arg ? lane - f.arg : lane;
    case Shuffle::kDown: return pos + f.arg < f.width ? lane + f.arg : lane;
    default: {
      const int src = lane ^ f.arg;
      return src >= seg && src < seg + f.width ? src : lane;
    }
  }
}

// Completes the warp operations whose every mask lane has arrived at the same
// call. Returns whether any completed; sets b.error for a bad shuffle.
bool release_warp_groups(Block& b) {
  bool released = false;
  const unsigned int n = static_cast<unsigned int>(b.fibers.size());
  for (unsigned int w = 0; w < n; w += 32) {
    for (unsigned int l = w; l < std::min(n, w + 32); ++l) {
      const Fiber& f = b.fibers[l];
      if (!is_warp_op(f)) continue;
      bool complete = true;
      for (int lane = 0; lane < 32 && complete; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        const unsigned int t = w + lane;
        complete = t < n && is_warp_op(b.fibers[t]) && b.fibers[t].wait == f.wait &&
                   b.fibers[t].mask == f.mask && b.fibers[t].site.line == f.site.line &&
                   b.fibers[t].site.file == f.site.file;
      }
      if (!complete) continue;
      unsigned long long in[32] = {};
      for (int lane = 0; lane < 32; ++lane)
        if (f.mask >> lane & 1u) in[lane] = b.fibers[w + lane].value;
      for (int lane = 0; lane < 32; ++lane) {
        if (!(f.mask >> lane & 1u)) continue;
        Fiber& g = b.fibers[w + lane];
        if (g.wait == Wait::kShuffle) {
          const int src = source_lane(g, lane);
          if (!(f.mask >> src & 1u)) {
            b.error = "block " + std::to_string(b.id) + ", thread " + std::to_string(g.linear) + ": " +
                      shuffle_name(g.shuffle) + "(" + hex(f.mask) + ") at " + where(g.site) +
                      ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                      ", which is not in the mask (its value is undefined)";
            return false;
          }
          g.value = in[src];
        }
        g.state = FiberState::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

// Called when no fiber of the block can run: releases a barrier, or decides
// that the block is done, at the grid sync, or stuck (b.error says how).
bool resolve(Block& b) {
  size_t exited = 0, at_sync = 0, at_grid = 0;
  for (const Fiber& f : b.fibers) {
    exited += f.state == FiberState::kExited;
    at_sync += f.state == FiberState::kWaiting && f.wait == Wait::kSyncthreads;
    at_grid += f.state == FiberState::kWaiting && f.wait == Wait::kGridSync;
  }
  const size_t n = b.fibers.size();
  if (exited == n) {
    b.phase = BlockPhase::kDone;
    return false;
  }
  if (release_warp_groups(b)) return true;
  if (!b.error.empty()) return false;
  const Site s0 = b.fibers[0].site;
  const bool one_site = std::all_of(b.fibers.begin(), b.fibers.end(), [&](const Fiber& f) {
    return f.site.line == s0.line && f.site.file == s0.file;
  });
  if (at_sync == n && one_site) {
    for (Fiber& f : b.fibers) f.state = FiberState::kRunnable;
    return true;
  }
  if (at_grid == n && one_site) {
    b.phase = BlockPhase::kAtGridSync;
    return false;
  }
  const std::string prefix = "block " + std::to_string(b.id) + ": ";
  if ((at_sync > 0 || at_grid > 0) && exited > 0)
    b.error = prefix + "a barrier that not every thread of the block reaches: " + block_state(b);
  else if (at_sync == n || at_grid == n)
    b.error = prefix + "threads wait at different barriers (a barrier in divergent code): " +
              block_state(b);
  else
    b.error = prefix + "deadlock, no thread can proceed: " + block_state(b);
  return false;
}

std::vector<size_t> ordered(std::vector<size_t> ids, Order order, std::mt19937_64& rng) {
  if (order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  if (order == Order::kRandom) std::shuffle(ids.begin(), ids.end(), rng);
  return ids;
}

// Runs the block's fibers until the block is done, at the grid sync, or failed.
void run_block(Block& b) {
  if (b.phase == BlockPhase::kReleased)
    for (Fiber& f : b.fibers) f.state = FiberState::kRunnable;
  b.phase = BlockPhase::kReady;
  for (;;) {
    std::vector<size_t> runnable;
    for (size_t i = 0; i < b.fibers.size(); ++i)
      if (b.fibers[i].state == FiberState::kRunnable) runnable.push_back(i);
    for (size_t i : ordered(std::move(runnable), b.launch->settings.thread_order, b.rng)) {
      switch_to(b, b.fibers[i]);
      if (!b.error.empty()) {
        b.phase = BlockPhase::kFailed;
        return;
      }
    }
    if (std::any_of(b.fibers.begin(), b.fibers.end(),
                    [](const Fiber& f) { return f.state == FiberState::kRunnable; }))
      continue;
    if (resolve(b)) continue;
    if (!b.error.empty()) b.phase = BlockPhase::kFailed;
    if (b.phase != BlockPhase::kReady) return;
  }
}

void start_fibers(Block& b) {
  const Launch& L = *b.launch;
  const unsigned int n = L.block.x * L.block.y * L.block.z;
  b.stacks_bytes = kStackBytes * n;
  void* mem = mmap(nullptr, b.stacks_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    b.error = "block " + std::to_string(b.id) + ": cannot map its threads' stacks";
    b.phase = BlockPhase::kFailed;
    return;
  }
  b.stacks = static_cast<char*>(mem);
  b.fibers.resize(n);
  for (unsigned int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.idx = uint3{t % L.block.x, t / L.block.x % L.block.y, t / (L.block.x * L.block.y)};
    f.stack = b.stacks + kStackBytes * t;
    std::memcpy(f.stack, &kCanary, sizeof kCanary);  // stacks grow down, towards it
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
}

void free_fibers(Block& b) {
  if (b.stacks == nullptr) return;
#if defined(CLIPOPS_EMU_ASAN)
  // abandoned fibers leave poisoned frames behind; the next mapping must not inherit them
  __asan_unpoison_memory_region(b.stacks, b.stacks_bytes);
#endif
  munmap(b.stacks, b.stacks_bytes);
  b.stacks = nullptr;
}

void block_thread(Launch& L, Block& b) {
  t_block = &b;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(L.mu);
      L.cv.wait(lock, [&] { return L.turn == b.id || L.abort; });
      if (L.abort) break;
    }
    if (b.stacks == nullptr) start_fibers(b);
    if (b.phase != BlockPhase::kFailed) run_block(b);
    const bool finished = b.phase == BlockPhase::kDone || b.phase == BlockPhase::kFailed;
    {
      std::lock_guard<std::mutex> lock(L.mu);
      L.turn = -1;
    }
    L.cv.notify_all();
    if (finished) break;
  }
  free_fibers(b);
  t_block = nullptr;
}

std::string execute(Launch& L) {
  const unsigned int nb = L.grid.x * L.grid.y * L.grid.z;
  std::vector<std::unique_ptr<Block>> blocks(nb);
  std::mt19937_64 rng(L.settings.seed);
  for (unsigned int i = 0; i < nb; ++i) {
    blocks[i] = std::make_unique<Block>();
    Block& b = *blocks[i];
    b.launch = &L;
    b.id = i;
    b.idx = uint3{i % L.grid.x, i / L.grid.x % L.grid.y, i / (L.grid.x * L.grid.y)};
    b.rng.seed(L.settings.seed * 0x9e3779b97f4a7c15ull + i);
  }
  std::vector<std::thread> threads;
  threads.reserve(nb);
  for (auto& b : blocks) threads.emplace_back(block_thread, std::ref(L), std::ref(*b));

  std::string error;
  std::vector<size_t> all(nb);
  for (size_t i = 0; i < nb; ++i) all[i] = i;
  for (bool done = false; !done && error.empty();) {
    for (size_t i : ordered(all, L.settings.block_order, rng)) {
      Block& b = *blocks[i];
      if (b.phase == BlockPhase::kDone || b.phase == BlockPhase::kAtGridSync) continue;
      std::unique_lock<std::mutex> lock(L.mu);
      L.turn = b.id;
      L.cv.notify_all();
      const auto limit = std::chrono::duration<double>(L.settings.watchdog_s);
      if (!L.cv.wait_for(lock, limit, [&] { return L.turn == -1; })) {
        // a thread that never reaches a barrier cannot be stopped from outside
        std::fprintf(stderr,
                     "clipops emulation: block %u ran %.0f s without reaching a barrier or "
                     "finishing (an endless loop?); aborting\n",
                     b.id, L.settings.watchdog_s);
        std::abort();
      }
      if (b.phase == BlockPhase::kFailed) {
        error = b.error;
        break;
      }
    }
    if (!error.empty()) break;
    std::vector<unsigned int> waiting, finished;
    for (const auto& b : blocks)
      (b->phase == BlockPhase::kDone ? finished : waiting).push_back(b->id);
    done = waiting.empty();
    if (!done && finished.empty())
      for (const auto& b : blocks) b->phase = BlockPhase::kReleased;  // the whole grid arrived
    if (!done && !finished.empty())
      error = "this_grid().sync() at " + where(blocks[waiting[0]]->fibers[0].site) +
              " is reached by blocks " + ranges(waiting) + ", but blocks " + ranges(finished) +
              " exited without it: the grid sync never completes";
  }
  {
    std::lock_guard<std::mutex> lock(L.mu);
    L.abort = true;
  }
  L.cv.notify_all();
  for (auto& t : threads) t.join();
  return error;
}

}  // namespace

// ---- device-side entry points ----------------------------------------------------

const uint3& thread_idx() { return current_block().running->idx; }
const uint3& block_idx() { return current_block().idx; }
const dim3& block_dim() { return current_block().launch->block; }
const dim3& grid_dim() { return current_block().launch->grid; }

void syncthreads(Site site) { wait_at(current_block(), Wait::kSyncthreads, site); }

void grid_sync(Site site) {
  Block& b = current_block();
  if (!b.launch->cooperative)
    fail(b, "this_grid().sync() at " + where(site) +
                " in a kernel not launched with cudaLaunchCooperativeKernel");
  wait_at(b, Wait::kGridSync, site);
}

namespace {
void warp_op(Block& b, Wait w, unsigned int mask, Site site, const char* name) {
  Fiber& f = *b.running;
  const unsigned int lane = f.linear % 32;
  if (!(mask >> lane & 1u))
    fail(b, std::string(name) + "(" + hex(mask) + ") at " + where(site) + " is called by lane " +
                std::to_string(lane) + ", which its mask does not include");
  f.mask = mask;
  wait_at(b, w, site);
}
}  // namespace

void syncwarp(unsigned int mask, Site site) {
  warp_op(current_block(), Wait::kSyncwarp, mask, site, "__syncwarp");
}

unsigned long long shuffle(Shuffle kind, unsigned int mask, unsigned long long value, int arg,
                           int width, Site site) {
  Block& b = current_block();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(b, std::string(shuffle_name(kind)) + " at " + where(site) + ": width " +
                std::to_string(width) + " is not a power of 2 up to 32");
  Fiber& f = *b.running;
  f.shuffle = kind;
  f.arg = arg;
  f.width = width;
  f.value = value;
  warp_op(b, Wait::kShuffle, mask, site, shuffle_name(kind));
  return f.value;
}

// ---- the emulation's own API --------------------------------------------------------

void configure(const Settings& s) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_settings = s;
}

Settings settings() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_settings;
}

int device_for(int sms, int blocks_per_sm, bool cooperative) {
  std::lock_guard<std::mutex> lock(g_mu);
  for (size_t d = 0; d < g_devices.size(); ++d)
    if (g_devices[d].sms == sms && g_devices[d].blocks_per_sm == blocks_per_sm &&
        g_devices[d].cooperative == cooperative)
      return static_cast<int>(d);
  g_devices.push_back({sms, blocks_per_sm, cooperative});
  return static_cast<int>(g_devices.size() - 1);
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  Stats s = g_stats;
  s.pinned_buffers = static_cast<long long>(g_pinned.size());
  return s;
}

void reset_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_stats = Stats();
}

void add_kernel(const KernelInfo& kernel) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_kernels.push_back(kernel);
}

std::string synchronize() {
  for (;;) {
    std::function<std::string()> op;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      if (g_queue.empty()) return "";
      op = std::move(g_queue.front());
      g_queue.pop_front();
    }
    std::string error = op();
    if (!error.empty()) {
      std::lock_guard<std::mutex> lock(g_mu);
      g_queue.clear();
      for (const CUevent_st* e : g_events) const_cast<CUevent_st*>(e)->pending = false;
      return error;
    }
  }
}

cudaError_t max_active_blocks(int* blocks, const void* func, int block_size, size_t) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (blocks == nullptr || block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  if (find_kernel(func) == nullptr) return cudaErrorInvalidDeviceFunction;
  *blocks = g_devices[t_device].blocks_per_sm;
  return cudaSuccess;
}

namespace {

cudaError_t launch(const void* func, dim3 grid, dim3 block, void** args, cudaStream_t stream,
                   bool cooperative) {
  std::lock_guard<std::mutex> lock(g_mu);
  const KernelInfo* kernel = find_kernel(func);
  if (kernel == nullptr) return cudaErrorInvalidDeviceFunction;
  if (!g_streams.count(stream)) return cudaErrorInvalidResourceHandle;
  grid.x += g_settings.extra_blocks;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024)
    return cudaErrorInvalidConfiguration;
  const Device& dev = g_devices[t_device];
  if (cooperative) {
    if (!dev.cooperative) return cudaErrorNotSupported;
    // all blocks of a cooperative grid must be resident at once
    if (1ull * grid.x * grid.y * grid.z > 1ull * dev.sms * dev.blocks_per_sm)
      return cudaErrorCooperativeLaunchTooLarge;
  }
  // CUDA copies the parameter values at launch
  auto L = std::make_shared<Launch>();
  L->kernel = kernel;
  for (size_t size : kernel->arg_sizes) {
    L->arg_storage.emplace_back(new std::max_align_t[(size + sizeof(std::max_align_t) - 1) /
                                                     sizeof(std::max_align_t)]);
    std::memcpy(L->arg_storage.back().get(), args[L->args.size()], size);
    L->args.push_back(L->arg_storage.back().get());
  }
  L->grid = grid;
  L->block = block;
  L->cooperative = cooperative;
  L->settings = g_settings;
  g_stats.launches.push_back({kernel->name, grid, block, cooperative, t_device});
  g_queue.push_back([L] { return execute(*L); });
  return cudaSuccess;
}

}  // namespace
}  // namespace clipops_emu

// ---- the CUDA runtime API ------------------------------------------------------------

using namespace clipops_emu;

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unrecognized error code";
}

cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (device < 0 || device >= static_cast<int>(g_devices.size())) return cudaErrorInvalidDevice;
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (device < 0 || device >= static_cast<int>(g_devices.size())) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_devices[device].sms; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = g_devices[device].cooperative; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int) {
  void* p = std::aligned_alloc(4096, (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096);
  if (p == nullptr) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(g_mu);
  g_pinned[static_cast<const char*>(p)] = bytes;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (ptr == nullptr) return cudaSuccess;
  if (!g_pinned.erase(static_cast<const char*>(ptr))) return cudaErrorInvalidValue;
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_streams.count(stream)) return cudaErrorInvalidResourceHandle;
  if ((dst == nullptr || src == nullptr) && bytes > 0) return cudaErrorInvalidValue;
  // from pageable memory CUDA may wait for the stream: the launcher promises not to
  if ((kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost) && !is_pinned(src, bytes))
    ++g_stats.pageable_copies;
  // the copy reads `src` when the stream gets to it, not now
  g_queue.push_back([dst, src, bytes] {
    std::memcpy(dst, src, bytes);
    return std::string();
  });
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  std::lock_guard<std::mutex> lock(g_mu);
  *stream = new CUstream_st;
  g_streams.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  std::lock_guard<std::mutex> lock(g_mu);
  *event = new CUevent_st;
  g_events.insert(*event);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_events.count(event) || !g_streams.count(stream)) return cudaErrorInvalidResourceHandle;
  event->pending = true;
  g_queue.push_back([event] {
    std::lock_guard<std::mutex> lock(g_mu);
    event->pending = false;
    return std::string();
  });
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_events.count(event)) return cudaErrorInvalidResourceHandle;
  return event->pending ? cudaErrorNotReady : cudaSuccess;
}

cudaError_t cudaLaunchKernel(const void* func, dim3 grid, dim3 block, void** args, size_t,
                             cudaStream_t stream) {
  return launch(func, grid, block, args, stream, false);
}

cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args,
                                        size_t, cudaStream_t stream) {
  return launch(func, grid, block, args, stream, true);
}
