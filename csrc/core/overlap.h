// Which buffers of a call share memory that is written: a sweep over address
// ranges, used by the clip's validate (clip_common.cc) and validate_update
// (optim_common.cc).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace clipops {
namespace detail {

struct MemRange {
  uintptr_t begin, end;
  int owner;     // whose buffer: a tensor index, or a caller's label for a scalar
  int part;      // which of the owner's buffers (the caller's numbering)
  bool written;  // the call writes it
};

inline MemRange mem_range(const void* p, size_t bytes, int owner, int part, bool written) {
  const auto b = reinterpret_cast<uintptr_t>(p);
  return {b, b + bytes, owner, part, written};
}

// Finds two ranges that share memory where at least one is written (empty
// ranges share nothing; read-only ranges may overlap). Returns false when there
// are none; else true with the pair in *a and *b, the lower address first (for
// ranges that start together, the one given first: the error names them in
// the caller's order on every platform).
inline bool find_written_overlap(std::vector<MemRange> ranges, MemRange* a, MemRange* b) {
  std::stable_sort(ranges.begin(), ranges.end(),
                   [](const MemRange& x, const MemRange& y) { return x.begin < y.begin; });
  // In address order, remember the furthest end of any earlier range and of any
  // earlier written range: an overlap with either is a conflict.
  const MemRange* far_any = nullptr;
  const MemRange* far_written = nullptr;
  for (const MemRange& r : ranges) {
    if (r.begin == r.end) continue;
    const MemRange* hit = nullptr;
    if (far_written != nullptr && r.begin < far_written->end) hit = far_written;
    else if (r.written && far_any != nullptr && r.begin < far_any->end) hit = far_any;
    if (hit != nullptr) {
      *a = *hit;
      *b = r;
      return true;
    }
    if (far_any == nullptr || r.end > far_any->end) far_any = &r;
    if (r.written && (far_written == nullptr || r.end > far_written->end)) far_written = &r;
  }
  return false;
}

}  // namespace detail
}  // namespace clipops
