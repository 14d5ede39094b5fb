// The CUDA emulation's <cooperative_groups.h>: the grid group, whose sync()
// is a barrier across every block of a cooperative launch (and an error in
// any other launch, where CUDA would hang or fault).
#pragma once

#include "cuda_runtime.h"

namespace cooperative_groups {

class grid_group {
 public:
  void sync(CLIPOPS_EMU_SITE) const { clipops_emu::grid_sync({file, line}); }
};

inline grid_group this_grid() { return grid_group(); }

}  // namespace cooperative_groups
