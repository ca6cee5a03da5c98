// Per-tensor norms and trust ratios shared by the LARS kernels (lars.cu, and
// sgd.cu's update, which fuses them for small tensors) and by LAMB (lamb.cu).
//
// Fused path: a tensor of 1..fused_max elements (fused_max <= chunk_size, so
// one block owns it) gets its norms from the block that then updates it,
// reduced by the same per-thread sums and block_sum2 as the 2-pass norms
// kernel; the 2-pass ratio kernel then adds that one partial to zeros, so
// both paths compute the same trust ratio bit for bit.
#pragma once

#include <cmath>

#include "cuda/common.cuh"

namespace fastsgd {
namespace cuda {

// True for a tensor whose norms and update run in one block (fused_max 0: none).
// Empty tensors own no block: they stay with the 2-pass launches (LAMB's step count).
__device__ __forceinline__ bool fused_tensor(const Entry& e, int64_t fused_max) {
  return e.numel > 0 && e.numel <= fused_max;
}

// Per-thread sums of p^2 and (g / grad_scale)^2 over elements [begin, end) of e.
template <class K>
__device__ __forceinline__ void lars_squares(const ScalarArg& grad_scale, const Entry& e, int64_t begin, int64_t end,
                                             typename K::acc_t& pp, typename K::acc_t& gg) {
  using P = typename K::param_t;
  using A = typename K::acc_t;
  const P* __restrict__ param = reinterpret_cast<const P*>(e.ptr[0]);
  const P* __restrict__ grad = reinterpret_cast<const P*>(e.ptr[1]);
  const A inv_scale = A(1) / read_scalar<A>(grad_scale);
  walk_chunk<K::kVec>(begin, end, e.vectorised, [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    A p[W], g[W];
    load_n<W>(param, i, p);
    load_n<W>(grad, i, g);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const A gk = g[k] * inv_scale;
      pp += p[k] * p[k];
      gg += gk * gk;
    }
  });
}

// The block's sums of p^2 and (g / grad_scale)^2 over [begin, end): per
// thread in acc_t (fp32 or fp64), across the block in fp64. Valid in thread 0.
__device__ __forceinline__ void lars_block_squares(const ScalarArg& grad_scale, const Entry& e, int64_t begin,
                                                   int64_t end, double& pp, double& gg) {
  pp = 0.0;
  gg = 0.0;
  dispatch_kind(e.kind, [&](auto kind) {
    using A = typename decltype(kind)::acc_t;
    A p2 = A(0), g2 = A(0);
    lars_squares<decltype(kind)>(grad_scale, e, begin, end, p2, g2);
    pp = p2;
    gg = g2;
  });
  block_sum2(pp, gg);
}

//   r = trust_coeff * |p| / (|g| + wd * |p| + eps), 1 if |p| or |g| is 0,
//   r = min(r / lr, 1) with trust_clip (LARC).
__device__ __forceinline__ double lars_trust_ratio(double pp, double gg, double weight_decay, double trust_coeff,
                                                   double eps, bool trust_clip, const ScalarArg& lr) {
  const double w = sqrt(pp), g = sqrt(gg);
  double r = 1.0;
  if (w > 0.0 && g > 0.0) r = trust_coeff * w / (g + weight_decay * w + eps);
  if (trust_clip) r = fmin(r / read_scalar<double>(lr), 1.0);
  return r;
}

//   r = |p| / |u|, 1 if |p| or |u| is 0, min(r, 1) with trust_clip; 1 without adaptation.
__device__ __forceinline__ double lamb_trust_ratio(double pp, double uu, bool adapt, bool trust_clip) {
  double r = 1.0;
  if (adapt) {
    const double w = sqrt(pp), u = sqrt(uu);
    if (w > 0.0 && u > 0.0) r = w / u;
    if (trust_clip) r = fmin(r, 1.0);
  }
  return r;
}

// A value computed by thread 0, handed to every thread of the block.
__device__ __forceinline__ double from_thread0(double v) {
  __shared__ double shared;
  __syncthreads();  // every thread has read what thread 0 may overwrite next
  if (threadIdx.x == 0) shared = v;
  __syncthreads();
  return shared;
}

}  // namespace cuda
}  // namespace fastsgd
