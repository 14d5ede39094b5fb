// The CUDA kernel and its launcher, UNCHANGED, compiled as host C++: the
// emulation's include folder comes first on the include path, so
// <cuda_runtime.h> and <cooperative_groups.h> are its shims. clip_math.h sees
// no __CUDA_ARCH__ and takes its host paths (IEEE operations without FMA,
// the same roundings as __fmul_rn and friends).
#include "clip_cuda.cu"
#include <cstddef>
#include <string>
#include <tuple>
#include <vector>

#include "emu.h"

namespace clipops_emu {

// Every kernel of csrc/core is registered here, so the fake runtime can launch it.
void register_core_kernels() { register_kernel(clipops_clip_kernel, "clipops_clip_kernel"); }

// TensorEntry as the C++ compiler lays it out: (field, offset, size), for the
// check of the NVRTC route's NumPy dtype.
std::vector<std::tuple<std::string, size_t, size_t>> tensor_entry_fields() {
  using clipops::detail::TensorEntry;
#define CLIPOPS_EMU_FIELD(f) std::make_tuple(std::string(#f), offsetof(TensorEntry, f), sizeof(TensorEntry::f))
  return {CLIPOPS_EMU_FIELD(in), CLIPOPS_EMU_FIELD(out), CLIPOPS_EMU_FIELD(numel),
          CLIPOPS_EMU_FIELD(first_item), CLIPOPS_EMU_FIELD(dtype), CLIPOPS_EMU_FIELD(pad)};
#undef CLIPOPS_EMU_FIELD
}
size_t tensor_entry_size() { return sizeof(clipops::detail::TensorEntry); }

}  // namespace clipops_emu
