// pybind11 registration of the CUDA kernels (fastsgd._C.cuda_*).
//
// The module is not linked against libtorch: every tensor arrives as a raw
// device address (int), every hyperparameter that may live on the device as
// a (value, ptr, dtype_code, per_row) tuple, and the stream as an int
// (torch.cuda.current_stream().cuda_stream). fastsgd/kernels/cuda.py checks
// devices, dtypes and layouts and builds the tensor table before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>

#include "cuda/ops.h"

namespace py = pybind11;

namespace fastsgd {
namespace cuda {

// Implemented in runtime.cu (it needs the CUDA runtime headers).
int runtime_version();
int device_count();

namespace {

using ScalarTuple = std::tuple<double, uintptr_t, int, bool>;

ScalarArg to_scalar(const ScalarTuple& s) {
  ScalarArg a;
  a.value = std::get<0>(s);
  a.ptr = reinterpret_cast<const void*>(std::get<1>(s));
  a.dtype = std::get<2>(s);
  a.per_row = std::get<3>(s) ? 1 : 0;
  return a;
}

TableArg to_table(uintptr_t table, int64_t n_tensors, int64_t n_blocks, int64_t chunk_size) {
  TableArg t;
  t.table = reinterpret_cast<const int64_t*>(table);
  t.n_tensors = n_tensors;
  t.n_blocks = n_blocks;
  t.chunk_size = chunk_size;
  return t;
}

SgdArgs sgd_args(uintptr_t table, int64_t n_tensors, int64_t n_blocks, int64_t chunk_size, const ScalarTuple& lr,
                 const ScalarTuple& momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                 bool lr_in_momentum, bool has_buf, const ScalarTuple& grad_scale, const ScalarTuple& found_inf,
                 bool stochastic_rounding, uint64_t seed, uintptr_t seed_counter) {
  SgdArgs a;
  a.table = to_table(table, n_tensors, n_blocks, chunk_size);
  a.lr = to_scalar(lr);
  a.momentum = to_scalar(momentum);
  a.dampening = dampening;
  a.weight_decay = weight_decay;
  a.nesterov = nesterov;
  a.maximize = maximize;
  a.lr_in_momentum = lr_in_momentum;
  a.has_buf = has_buf;
  a.grad_scale = to_scalar(grad_scale);
  a.found_inf = to_scalar(found_inf);
  a.stochastic_rounding = stochastic_rounding;
  a.seed = seed;
  a.seed_counter = reinterpret_cast<const int64_t*>(seed_counter);
  return a;
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("cuda_runtime_version", &runtime_version,
        "CUDA runtime version the module was built with (e.g. 13000), from cudaRuntimeGetVersion.");
  m.def("cuda_device_count", &device_count,
        "Number of CUDA devices the module's runtime sees (0 when there is no device or driver).");

  m.def(
      "cuda_sgd_step",
      [](uintptr_t table, int64_t n_tensors, int64_t n_blocks, int64_t chunk_size, const ScalarTuple& lr,
         const ScalarTuple& momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
         bool lr_in_momentum, bool has_buf, const ScalarTuple& grad_scale, const ScalarTuple& found_inf,
         bool stochastic_rounding, uint64_t seed, uintptr_t seed_counter, uintptr_t stream, int device) {
        set_device(device, "sgd_step");
        const SgdArgs a = sgd_args(table, n_tensors, n_blocks, chunk_size, lr, momentum, dampening, weight_decay,
                                   nesterov, maximize, lr_in_momentum, has_buf, grad_scale, found_inf,
                                   stochastic_rounding, seed, seed_counter);
        launch_sgd(a, stream, "sgd_step");
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_blocks"), py::arg("chunk_size"), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("maximize"), py::arg("lr_in_momentum"), py::arg("has_buf"), py::arg("grad_scale"),
      py::arg("found_inf"), py::arg("stochastic_rounding"), py::arg("seed"), py::arg("seed_counter"),
      py::arg("stream"), py::arg("device"),
      R"doc(SGD / momentum / Nesterov over every tensor of the table: ONE kernel launch.

table: device address of the int64 tensor table (layout in csrc/cuda/common.cuh;
  built by fastsgd/kernels/cuda.py): per tensor param, grad, momentum buffer
  pointers, numel, stacked-trial row length, first block, dtype kind,
  first_step and vectorised flags; then one (tensor, chunk) word per block.
lr, momentum, grad_scale, found_inf: (value, device_ptr, dtype_code, per_row)
  with device_ptr 0 for a host value (grad_scale/found_inf: 0 = absent).
  dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 float64.
has_buf: momentum buffers present (state slot 0). stochastic_rounding: round
  bf16 momentum buffers stochastically (hash of seed, the int64 step counter at
  device address seed_counter (0: none), tensor, element and the gradient bits). stream: cudaStream_t as int; device: its CUDA device index. Raises RuntimeError when the
  launch fails. Gradients are never written.)doc");

  m.def(
      "cuda_lars_step",
      [](uintptr_t table, int64_t n_tensors, int64_t n_blocks, int64_t chunk_size, const ScalarTuple& lr,
         const ScalarTuple& momentum, double dampening, double weight_decay, bool nesterov, double trust_coeff,
         double eps, bool trust_clip, bool adapt, bool lr_in_momentum, bool has_buf, const ScalarTuple& grad_scale,
         const ScalarTuple& found_inf, bool stochastic_rounding, uint64_t seed, uintptr_t seed_counter,
         int64_t fused_max, bool all_fused, uintptr_t partials, uintptr_t ratio, uintptr_t stream, int device) {
        set_device(device, "lars_step");
        LarsArgs a;
        a.sgd = sgd_args(table, n_tensors, n_blocks, chunk_size, lr, momentum, dampening, weight_decay, nesterov,
                         /*maximize=*/false, lr_in_momentum, has_buf, grad_scale, found_inf, stochastic_rounding,
                         seed, seed_counter);
        a.trust_coeff = trust_coeff;
        a.eps = eps;
        a.trust_clip = trust_clip;
        a.adapt = adapt;
        a.fused_max = fused_max;
        a.all_fused = all_fused;
        a.partials = reinterpret_cast<double*>(partials);
        a.ratio = reinterpret_cast<double*>(ratio);
        launch_lars(a, stream);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_blocks"), py::arg("chunk_size"), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("trust_coeff"), py::arg("eps"), py::arg("trust_clip"), py::arg("adapt"), py::arg("lr_in_momentum"),
      py::arg("has_buf"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("stochastic_rounding"),
      py::arg("seed"), py::arg("seed_counter"), py::arg("fused_max"), py::arg("all_fused"), py::arg("partials"),
      py::arg("ratio"), py::arg("stream"), py::arg("device"),
      R"doc(LARS (timm rule) over every tensor of the table: at most 3 launches, no host sync.

With adapt (weight_decay != 0 or always_adapt): per-block partial sums of p^2
and (g/grad_scale)^2 into `partials` (float64[2 * n_blocks]), per-tensor trust
ratios into `ratio` (float64[n_tensors]), then the momentum update of
cuda_sgd_step with g <- (g + weight_decay * p) * ratio. A tensor of
1..fused_max elements (fused_max <= chunk_size; 0: none) gets its norms and
ratio in the update launch instead, from the block that updates it; with
all_fused (every tensor is one) the step is that one launch. Other arguments
as in cuda_sgd_step.)doc");

  m.def(
      "cuda_lamb_step",
      [](uintptr_t table, int64_t n_tensors, int64_t n_blocks, int64_t chunk_size, const ScalarTuple& lr,
         double beta1, double beta2, double eps, double weight_decay, bool bias_correction, bool trust_clip,
         bool adapt, const ScalarTuple& clip_divisor, bool has_clip_divisor, const ScalarTuple& grad_scale,
         const ScalarTuple& found_inf, int64_t fused_max, bool all_fused, uintptr_t partials, uintptr_t per_tensor,
         uintptr_t stream, int device) {
        set_device(device, "lamb_step");
        LambArgs a;
        a.table = to_table(table, n_tensors, n_blocks, chunk_size);
        a.lr = to_scalar(lr);
        a.beta1 = beta1;
        a.beta2 = beta2;
        a.eps = eps;
        a.weight_decay = weight_decay;
        a.bias_correction = bias_correction;
        a.trust_clip = trust_clip;
        a.adapt = adapt;
        a.clip_divisor = to_scalar(clip_divisor);
        a.has_clip_divisor = has_clip_divisor;
        a.grad_scale = to_scalar(grad_scale);
        a.found_inf = to_scalar(found_inf);
        a.fused_max = fused_max;
        a.all_fused = all_fused;
        a.partials = reinterpret_cast<double*>(partials);
        a.per_tensor = reinterpret_cast<double*>(per_tensor);
        launch_lamb(a, stream);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_blocks"), py::arg("chunk_size"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("bias_correction"),
      py::arg("trust_clip"), py::arg("adapt"), py::arg("clip_divisor"), py::arg("has_clip_divisor"),
      py::arg("grad_scale"), py::arg("found_inf"), py::arg("fused_max"), py::arg("all_fused"), py::arg("partials"),
      py::arg("per_tensor"), py::arg("stream"), py::arg("device"),
      R"doc(LAMB (timm rule) over every tensor of the table: at most 3 launches, no host sync.

The table's state slots 0/1 are exp_avg/exp_avg_sq and slot 4 the float32
0-dim step tensor, which is incremented on the device (found_inf set: not
incremented, nothing written). `partials`: float64[2 * n_blocks] scratch for
the |p|, |u| partial sums; `per_tensor`: float64[4 * n_tensors] scratch (trust
ratio and bias corrections). clip_divisor (used when has_clip_divisor):
gradients are divided by it after unscaling. fused_max, all_fused: as in
cuda_lars_step (a fused tensor's step is advanced by its update block; an
empty tensor is never fused). Other arguments as in cuda_sgd_step.)doc");
}

}  // namespace cuda

void bind_cuda(py::module_& m) { cuda::bind_cuda(m); }

}  // namespace fastsgd
