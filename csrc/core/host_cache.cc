// A bounded cache of large host blocks for fresh outputs (clipops.h,
// "Host output blocks"). Why: a fresh large output costs a page fault per page
// it spans on first write, and the kernel pays them inside its scale pass
// (bench/micro.py: the NumPy front end copying a 25.6M-element list took 24 ms
// with fresh outputs against 9.4 ms writing into the same ones again). A block
// freed here stays mapped and faulted, and the next output of its size takes it.
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>

#include "clipops.h"

namespace clipops {
namespace {

constexpr size_t kPage = size_t(4) << 10;
constexpr size_t kHugePage = size_t(2) << 20;

size_t limit_from_env() {
  const char* v = std::getenv("CLIPOPS_HOST_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(1) << 30;  // 1 GiB
  char* end = nullptr;
  const unsigned long long mb = std::strtoull(v, &end, 10);
  if (end == v || *end != '\0') return size_t(1) << 30;  // unparsable: the default
  return static_cast<size_t>(mb) << 20;
}

struct Cache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // by size; within a size, the newest last
  size_t cached = 0;                        // bytes in free_blocks
  size_t limit = limit_from_env();
  size_t in_use = 0, hits = 0, misses = 0;

  void evict_until_fits(size_t incoming) {  // mu held; the largest blocks go first
    while (!free_blocks.empty() && cached + incoming > limit) {
      auto last = std::prev(free_blocks.end());
      munmap(last->second, last->first);
      cached -= last->first;
      free_blocks.erase(last);
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: outputs may outlive static teardown
  return *c;
}

}  // namespace

size_t host_block_size(size_t bytes) {
  const size_t unit = bytes >= 4 * kHugePage ? kHugePage : kPage;
  return (std::max<size_t>(bytes, 1) + unit - 1) / unit * unit;
}

void* host_block_alloc(size_t bytes) {
  const size_t size = host_block_size(bytes);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto range = c.free_blocks.equal_range(size);
    if (range.first != range.second) {
      auto newest = std::prev(range.second);  // the most recently freed: warmest in cache
      void* p = newest->second;
      c.free_blocks.erase(newest);
      c.cached -= size;
      c.in_use += size;
      ++c.hits;
      return p;
    }
    ++c.misses;
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
#if defined(MADV_HUGEPAGE)
  if (size >= kHugePage) madvise(p, size, MADV_HUGEPAGE);  // advice; THP "madvise" mode wants it
#endif
  std::lock_guard<std::mutex> lock(c.mu);
  c.in_use += size;
  return p;
}

void host_block_free(void* p, size_t bytes) {
  if (p == nullptr) return;
  const size_t size = host_block_size(bytes);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.in_use -= size;
  if (size > c.limit) {
    munmap(p, size);
    return;
  }
  c.evict_until_fits(size);
  c.free_blocks.emplace(size, p);
  c.cached += size;
}

HostCacheStats host_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {c.cached, c.in_use, c.limit, c.hits, c.misses};
}

void set_host_cache_limit(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = bytes;
  c.evict_until_fits(0);
}

}  // namespace clipops
