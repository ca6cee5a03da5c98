// Fused SGD-family and LARS steps on CPU (raw pointers; no libtorch).
#pragma once

#include <cstdint>

namespace fastsgd {
namespace cpu {

// One int64 row per tensor in the table passed to sgd_step / lars_step.
// A zero buf pointer means "no momentum buffer" for that tensor.
enum SgdField : int64_t { kParam = 0, kGrad, kBuf, kNumel, kParamDtype, kBufDtype, kFirst, kSgdTableWidth };

// hparams: 0, or the address of num_entries (lr, momentum) float64 pairs that
// replace `lr` and `momentum` per entry (stacked trials).
void sgd_step(int64_t table, int64_t num_entries, int64_t hparams, double lr, double momentum, double dampening,
              double weight_decay, double grad_scale, bool maximize, bool nesterov, bool lr_in_momentum,
              int threads);

void lars_step(int64_t table, int64_t num_entries, double lr, double momentum, double dampening,
               double weight_decay, double grad_scale, bool nesterov, double trust_coeff, double eps,
               bool trust_clip, bool always_adapt, bool lr_in_momentum, int threads);

}  // namespace cpu
}  // namespace fastsgd
