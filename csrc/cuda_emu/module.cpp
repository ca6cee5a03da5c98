// fastsgd._cuda_emu: the same bindings as fastsgd._C's cuda_* functions, over
// the CUDA kernels compiled for the CPU (cuda_emu.h). Pointers are host
// addresses; tests point fastsgd.kernels.cuda at this module with CPU tensors.
#include <pybind11/pybind11.h>

#include "cuda_emu.h"

namespace fastsgd {
void bind_cuda(pybind11::module_& m);
}

PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "fastsgd's CUDA kernels compiled for the CPU with a fiber-per-thread emulator (for tests only)";
  m.attr("has_cuda") = true;
  fastsgd::bind_cuda(m);
  m.def("grids_run", &fastsgd::emu::grids_run, "Kernel launches (grids) run so far, for tests that count them.");
}
