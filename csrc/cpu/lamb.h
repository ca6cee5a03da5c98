// Fused LAMB step on CPU (raw pointers; no libtorch).
#pragma once

#include <cstdint>

namespace fastsgd {
namespace cpu {

// One int64 row per tensor. exp_avg and exp_avg_sq share one dtype (state);
// step points at a 0-dim float32 or float64 tensor that is incremented.
enum LambField : int64_t {
  kLambParam = 0, kLambGrad, kLambExpAvg, kLambExpAvgSq, kLambStep, kLambNumel, kLambParamDtype,
  kLambStateDtype, kLambStepDtype, kLambTableWidth
};

// grad_divisor: gradients are divided by it (grad_scale * clip_divisor).
void lamb_step(int64_t table, int64_t num_entries, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool bias_correction, bool trust_clip, bool always_adapt, double grad_divisor,
               int threads);

}  // namespace cpu
}  // namespace fastsgd
