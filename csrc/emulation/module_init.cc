// The module itself: clipops._emulation, or clipops._emulation_teeth_<name>
// for a deliberately broken kernel variant (CMakeLists.txt, CLIPOPS_EMULATION_TEETH).
#include <pybind11/pybind11.h>

namespace clipops_emu {
void bind(pybind11::module_& m);
}

PYBIND11_MODULE(CLIPOPS_EMU_MODULE, m) { clipops_emu::bind(m); }
