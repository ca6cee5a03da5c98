#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace fastsgd {
// CPU kernels are registered here (being written).
void bind_cpu(py::module_& m) { (void)m; }
}  // namespace fastsgd
