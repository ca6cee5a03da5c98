// LARS (timm's Lars rule) in at most three launches, no host sync:
//   1. lars_norms_kernel: each block writes the partial sums of p^2 and
//      (g / grad_scale)^2 over its chunk to partials[block] (no atomics, so
//      no zeroing pass and the norms are deterministic);
//   2. lars_ratio_kernel: one block per tensor adds its blocks' partials in
//      order and computes the trust ratio
//        r = trust_coeff * |p| / (|g| + wd * |p| + eps), 1 if |p| or |g| is 0,
//        r = min(r / lr, 1) with trust_clip;
//   3. sgd_kernel (sgd.cu) with g <- (g + wd * p) * r, then momentum.
// When neither weight_decay != 0 nor always_adapt, only launch 3 runs (r = 1).
#include <cmath>

#include "cuda/common.cuh"

namespace fastsgd {
namespace cuda {
namespace {

template <class K>
__device__ __forceinline__ void norms_chunk(const LarsArgs& a, const Entry& e, int64_t begin, int64_t end,
                                            typename K::acc_t& pp, typename K::acc_t& gg) {
  using P = typename K::param_t;
  using A = typename K::acc_t;
  const P* __restrict__ param = reinterpret_cast<const P*>(e.ptr[0]);
  const P* __restrict__ grad = reinterpret_cast<const P*>(e.ptr[1]);
  const A inv_scale = A(1) / read_scalar<A>(a.sgd.grad_scale);
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

__global__ void __launch_bounds__(kThreads) lars_norms_kernel(const LarsArgs a) {
  if (step_skipped(a.sgd.found_inf)) return;
  const Chunk c = this_chunk(a.sgd.table);
  // Per-thread sums in acc_t (fp32 or fp64), block sum and partials in fp64.
  double pp = 0.0, gg = 0.0;
  dispatch_kind(c.e.kind, [&](auto kind) {
    using A = typename decltype(kind)::acc_t;
    A p2 = A(0), g2 = A(0);
    norms_chunk<decltype(kind)>(a, c.e, c.begin, c.end, p2, g2);
    pp = p2;
    gg = g2;
  });
  block_sum2(pp, gg);
  if (threadIdx.x == 0) {
    a.partials[2 * blockIdx.x] = pp;
    a.partials[2 * blockIdx.x + 1] = gg;
  }
}

__global__ void __launch_bounds__(kThreads) lars_ratio_kernel(const LarsArgs a) {
  if (step_skipped(a.sgd.found_inf)) return;
  const int64_t t = blockIdx.x;
  const Entry e = load_entry(a.sgd.table.table, t);
  double pp, gg;
  segment_sum2(a.partials, e, a.sgd.table.chunk_size, pp, gg);
  if (threadIdx.x == 0) {
    const double w = sqrt(pp), g = sqrt(gg), wd = a.sgd.weight_decay;
    double r = 1.0;
    if (w > 0.0 && g > 0.0) r = a.trust_coeff * w / (g + wd * w + a.eps);
    if (a.trust_clip) r = fmin(r / read_scalar<double>(a.sgd.lr), 1.0);
    a.ratio[t] = r;
  }
}

}  // namespace

void launch_lars(const LarsArgs& args, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  SgdArgs sgd = args.sgd;
  sgd.ratio = nullptr;
  if (args.adapt) {
    if (args.sgd.table.n_blocks > 0) {
      FASTSGD_LAUNCH(lars_norms_kernel, static_cast<unsigned>(args.sgd.table.n_blocks), s)(args);
      check_launch("lars_step", "lars_norms_kernel");
    }
    if (args.sgd.table.n_tensors > 0) {
      FASTSGD_LAUNCH(lars_ratio_kernel, static_cast<unsigned>(args.sgd.table.n_tensors), s)(args);
      check_launch("lars_step", "lars_ratio_kernel");
    }
    sgd.ratio = args.ratio;
  }
  launch_sgd(sgd, stream, "lars_step");
}

}  // namespace cuda
}  // namespace fastsgd
