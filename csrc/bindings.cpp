// The one pybind11 module, fastsgd._C. Each backend registers its own
// functions (csrc/cpu/bind_cpu.cpp, csrc/cuda/bind_cuda.cpp) so the two
// backends can be built and read independently.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastsgd {
void bind_cpu(py::module_& m);
#ifdef FASTSGD_WITH_CUDA
void bind_cuda(py::module_& m);
#endif
}  // namespace fastsgd

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastsgd native kernels (raw-pointer API, not linked against libtorch)";
#ifdef FASTSGD_WITH_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
#ifdef FASTSGD_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  fastsgd::bind_cpu(m);
#ifdef FASTSGD_WITH_CUDA
  fastsgd::bind_cuda(m);
#endif
}
