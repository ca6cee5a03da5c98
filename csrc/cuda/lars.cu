// LARS (timm's Lars rule) in at most three launches, no host sync:
//   1. lars_norms_kernel: each block writes the partial sums of p^2 and
//      (g / grad_scale)^2 over its chunk to partials[block] (no atomics, so
//      no zeroing pass and the norms are deterministic);
//   2. lars_ratio_kernel: one block per tensor adds its blocks' partials in
//      order and computes the trust ratio (norms.cuh: lars_trust_ratio);
//   3. sgd_kernel (sgd.cu) with g <- (g + wd * p) * r, then momentum.
// When neither weight_decay != 0 nor always_adapt, only launch 3 runs (r = 1).
//
// Fused (fused_max > 0): a tensor that one block owns (norms.cuh:
// fused_tensor) is skipped by launches 1 and 2; launch 3's block computes its
// norms and ratio before updating it. When every tensor is fused
// (all_fused), launches 1 and 2 are left out: one launch per step.
#include "cuda/common.cuh"
#include "cuda/norms.cuh"

namespace fastsgd {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kThreads) lars_norms_kernel(const LarsArgs a) {
  if (step_skipped(a.sgd.found_inf)) return;
  const Chunk c = this_chunk(a.sgd.table);
  if (fused_tensor(c.e, a.fused_max)) return;  // the update kernel computes its norms
  double pp, gg;
  lars_block_squares(a.sgd.grad_scale, c.e, c.begin, c.end, pp, gg);
  if (threadIdx.x == 0) {
    a.partials[2 * blockIdx.x] = pp;
    a.partials[2 * blockIdx.x + 1] = gg;
  }
}

__global__ void __launch_bounds__(kThreads) lars_ratio_kernel(const LarsArgs a) {
  if (step_skipped(a.sgd.found_inf)) return;
  const int64_t t = blockIdx.x;
  const Entry e = load_entry(a.sgd.table.table, t);
  if (fused_tensor(e, a.fused_max)) return;
  double pp, gg;
  segment_sum2(a.partials, e, a.sgd.table.chunk_size, pp, gg);
  if (threadIdx.x == 0) {
    a.ratio[t] = lars_trust_ratio(pp, gg, a.sgd.weight_decay, a.trust_coeff, a.eps, a.trust_clip, a.sgd.lr);
  }
}

}  // namespace

void launch_lars(const LarsArgs& args, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  SgdArgs sgd = args.sgd;
  sgd.ratio = nullptr;
  if (args.adapt) {
    if (!args.all_fused && args.sgd.table.n_blocks > 0) {
      FASTSGD_LAUNCH(lars_norms_kernel, static_cast<unsigned>(args.sgd.table.n_blocks), s)(args);
      check_launch("lars_step", "lars_norms_kernel");
    }
    if (!args.all_fused && args.sgd.table.n_tensors > 0) {
      FASTSGD_LAUNCH(lars_ratio_kernel, static_cast<unsigned>(args.sgd.table.n_tensors), s)(args);
      check_launch("lars_step", "lars_ratio_kernel");
    }
    sgd.ratio = args.ratio;
    sgd.fused_max = args.fused_max;
    sgd.trust_coeff = args.trust_coeff;
    sgd.trust_eps = args.eps;
    sgd.trust_clip = args.trust_clip;
  }
  launch_sgd(sgd, stream, "lars_step");
}

}  // namespace cuda
}  // namespace fastsgd
