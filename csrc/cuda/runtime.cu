// Small runtime queries for diagnostics (fastsgd._C.cuda_runtime_version /
// cuda_device_count), which never raise (0 with no driver or device), and
// set_device, used before every launch.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastsgd {
namespace cuda {

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

// Makes `device` current for this thread in the module's own (static) CUDA
// runtime: torch's cudaSetDevice goes to torch's runtime, not to this one.
void set_device(int device, const char* op) {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == device) return;
  const cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastsgd cuda ") + op + ": cudaSetDevice(" + std::to_string(device) +
                             ") failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

}  // namespace cuda
}  // namespace fastsgd
