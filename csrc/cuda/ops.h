// Host-side API of the CUDA kernels: plain C++ structs that bind_cuda.cpp
// fills from Python arguments and the launch_* functions in sgd.cu, lars.cu
// and lamb.cu consume. No CUDA or torch headers here, so the bindings file is
// compiled by the ordinary C++ compiler.
//
// Every pointer is a raw device address taken from tensor.data_ptr() in
// fastsgd/kernels/cuda.py, which also checks devices, dtypes and layouts
// before calling. The launch functions throw std::runtime_error (pybind11
// turns it into RuntimeError) naming the op when a launch fails.
#pragma once

#include <cstdint>

namespace fastsgd {
namespace cuda {

// Dtype codes for scalars read on the device (lr, momentum, grad_scale,
// found_inf, clip_divisor). Must match _DTYPE_CODES in fastsgd/kernels/cuda.py.
enum ScalarDType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// A hyperparameter that is either a host value or a device tensor.
// ptr == nullptr: use value. Otherwise read ptr[0] (0-dim tensor) or, when
// per_row != 0, ptr[i / row_len] for element i of a stacked-trials tensor
// (row r of every param uses entry r; see reference.py).
struct ScalarArg {
  double value = 0.0;
  const void* ptr = nullptr;
  int32_t dtype = kF32;
  int32_t per_row = 0;
};

// The device-side tensor table built and uploaded by fastsgd/kernels/cuda.py;
// its layout is described in common.cuh.
struct TableArg {
  const int64_t* table = nullptr;
  int64_t n_tensors = 0;
  int64_t n_blocks = 0;   // one CUDA block per (tensor, chunk)
  int64_t chunk_size = 0; // elements per chunk, a multiple of 8
};

// SGD / momentum / Nesterov, also the final update of LARS.
struct SgdArgs {
  TableArg table;
  ScalarArg lr, momentum;
  double dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false, lr_in_momentum = false, has_buf = false;
  ScalarArg grad_scale;  // host value 1.0 when there is none
  ScalarArg found_inf;   // ptr == nullptr: none (the step runs)
  bool stochastic_rounding = false; // bf16 momentum buffers only
  uint64_t seed = 0;
  // Stochastic rounding: a device-side step counter mixed into the hash with
  // the seed (nullptr: none). The caller advances it after each launch, so
  // replays of a captured graph (same host seed) draw fresh bits.
  const int64_t* seed_counter = nullptr;
  // LARS: per-tensor trust ratio (double[n_tensors]) multiplying g + wd * p.
  // nullptr for plain SGD.
  const double* ratio = nullptr;
  // LARS, fused: tensors of 1..fused_max elements compute their trust ratio
  // in the update kernel from these (0: every ratio is read from `ratio`).
  int64_t fused_max = 0;
  double trust_coeff = 0.0, trust_eps = 0.0;
  bool trust_clip = false;
};

struct LarsArgs {
  SgdArgs sgd;                 // sgd.ratio is set by launch_lars
  double trust_coeff = 0.001, eps = 1e-8;
  bool trust_clip = false, adapt = false;  // adapt = weight_decay != 0 or always_adapt
  // Tensors of 1..fused_max elements (at most chunk_size: one block each) get
  // norms and update in one kernel; 0: none (the 2-pass path). all_fused:
  // every tensor is such a tensor, so the norm and ratio launches are left out.
  int64_t fused_max = 0;
  bool all_fused = false;
  double* partials = nullptr;  // scratch, double[2 * n_blocks]
  double* ratio = nullptr;     // scratch, double[n_tensors]
};

struct LambArgs {
  TableArg table;
  ScalarArg lr, clip_divisor, grad_scale, found_inf;  // as in SgdArgs; clip_divisor 1.0 when none
  bool has_clip_divisor = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0.0;
  bool bias_correction = true, trust_clip = false, adapt = false;
  int64_t fused_max = 0;   // as in LarsArgs; a fused tensor's step is advanced by its update block
  bool all_fused = false;  // no tensor is empty or larger than fused_max
  double* partials = nullptr;    // scratch, double[2 * n_blocks]
  double* per_tensor = nullptr;  // scratch, double[4 * n_tensors]
};

// Makes `device` current in this module's CUDA runtime (throws naming op).
void set_device(int device, const char* op);

// stream: a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
void launch_sgd(const SgdArgs& args, uintptr_t stream, const char* op = "sgd_step");
void launch_lars(const LarsArgs& args, uintptr_t stream);
void launch_lamb(const LambArgs& args, uintptr_t stream);

}  // namespace cuda
}  // namespace fastsgd
