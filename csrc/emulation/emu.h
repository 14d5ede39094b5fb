// The CUDA emulation's own API, beyond the CUDA runtime it fakes: settings the
// tests choose (thread and block orders, the fake devices), kernel
// registration, and a synchronize that reports what went wrong in words.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace clipops_emu {

// The order in which runnable threads (fibers) of a block, and blocks of a
// grid, are run between barriers. A race-free kernel gives the same bits in
// every order.
enum class Order { kForward, kReverse, kRandom };

struct Settings {
  Order thread_order = Order::kForward;
  Order block_order = Order::kForward;
  unsigned long long seed = 0;    // of the random orders
  unsigned int extra_blocks = 0;  // added to every grid: grids larger than the launcher picks
  double watchdog_s = 120.0;      // a block that runs longer without a barrier aborts the process
};
void configure(const Settings& settings);
Settings settings();

// The fake device with this many SMs, resident blocks per SM and cooperative
// launch support (created on first request). The launcher caches residency
// per device, so each configuration gets its own device number.
int device_for(int sms, int blocks_per_sm, bool cooperative);

struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  bool cooperative;
  int device;
};
struct Stats {
  std::vector<LaunchRecord> launches;
  long long pageable_copies = 0;  // cudaMemcpyAsync from memory not from cudaHostAlloc
  long long pinned_buffers = 0;   // live cudaHostAlloc buffers
};
Stats stats();
void reset_stats();

// Runs all queued stream work in order. Returns "" or what failed, in words
// (a detected deadlock, divergent barrier, bad shuffle mask, ...); after a
// failure the rest of the queue is dropped, as a CUDA context would be lost.
std::string synchronize();

// A kernel the fake runtime can launch: its address and how to call it with
// CUDA's `void** args` (one pointer per parameter).
struct KernelInfo {
  const void* fn;
  const char* name;
  std::vector<size_t> arg_sizes;
  void (*invoke)(const void* fn, void* const* args);
};
void add_kernel(const KernelInfo& kernel);

template <typename... A, size_t... I>
void invoke_with(void (*f)(A...), void* const* args, std::index_sequence<I...>) {
  f(*static_cast<const std::decay_t<A>*>(args[I])...);
}

// Every kernel the emulation runs is registered once, e.g. at static
// initialization beside the source that defines it.
template <typename... A>
bool register_kernel(void (*f)(A...), const char* name) {
  add_kernel(KernelInfo{reinterpret_cast<const void*>(f), name, {sizeof(A)...},
                        [](const void* fn, void* const* args) {
                          invoke_with(reinterpret_cast<void (*)(A...)>(fn), args,
                                      std::index_sequence_for<A...>());
                        }});
  return true;
}

}  // namespace clipops_emu
