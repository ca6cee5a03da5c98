// SGD / momentum / Nesterov (torch.optim.SGD semantics, or the lr-inside-
// momentum form) over every tensor of the table in ONE launch. LARS reuses
// this kernel for its final update with a per-tensor trust ratio.
//
// Per element, in acc_t (fp32, or fp64 for fp64 params):
//   g = grad / grad_scale, negated if maximize;  g += wd * p
//   g *= ratio[t]                                  (LARS only)
//   s = lr * g if lr_in_momentum else g
//   b = s on the tensor's first step, else mu * b + (1 - dampening) * s
//   d = s + mu * b if nesterov else b
//   p -= d if lr_in_momentum else lr * d          (no buffer: p -= lr * g)
// Memory traffic per element: read p, g (+ b), write p (+ b); nothing else.
//
// LARS, fused (fused_max > 0): the block that owns a whole small tensor
// (norms.cuh: fused_tensor) first reads p and g for its norms and trust
// ratio, then updates the tensor, whose data is then in L1/L2.
#include "cuda/common.cuh"
#include "cuda/norms.cuh"

namespace fastsgd {
namespace cuda {
namespace {

// fused_ratio: the LARS trust ratio computed by this block (kFusedRatio);
// otherwise it is read from a.ratio (1 for SGD).
template <class K, bool kFusedRatio>
__device__ __forceinline__ void sgd_chunk(const SgdArgs& a, const Entry& e, int64_t t, int64_t begin, int64_t end,
                                          double fused_ratio) {
  using P = typename K::param_t;
  using S = typename K::state_t;
  using A = typename K::acc_t;
  P* __restrict__ param = reinterpret_cast<P*>(e.ptr[0]);
  const P* __restrict__ grad = reinterpret_cast<const P*>(e.ptr[1]);
  S* __restrict__ buf = reinterpret_cast<S*>(e.ptr[2]);

  // Scalars read once per thread; per-row (stacked trials) ones per element.
  const A lr0 = read_scalar<A>(a.lr);
  const A mu0 = read_scalar<A>(a.momentum);
  const A inv_scale = A(1) / read_scalar<A>(a.grad_scale);
  const A ratio = kFusedRatio ? static_cast<A>(fused_ratio) : a.ratio ? static_cast<A>(a.ratio[t]) : A(1);
  const A wd = static_cast<A>(a.weight_decay);
  const A one_minus_damp = static_cast<A>(1.0 - a.dampening);
  const bool first = e.first_step;
  const bool sr = a.stochastic_rounding && std::is_same<S, __nv_bfloat16>::value;
  const uint64_t seed = sr && a.seed_counter != nullptr ? a.seed ^ mix64(static_cast<uint64_t>(*a.seed_counter))
                                                         : a.seed;

  walk_chunk<K::kVec>(begin, end, e.vectorised, [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    A p[W], g[W], b[W];
    load_n<W>(param, i, p);
    load_n<W>(grad, i, g);
    if (a.has_buf && !first) load_n<W>(buf, i, b);
    P p_out[W];
    S b_out[W];
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const int64_t idx = i + k;
      const A lr = scalar_at<A>(a.lr, lr0, idx, e.row_len);
      A gk = g[k] * inv_scale;  // multiply by 1/scale: the scale is a power of two in AMP
      if (a.maximize) gk = -gk;
      if (wd != A(0)) gk += wd * p[k];
      gk *= ratio;
      A pk;
      if (a.has_buf) {
        const A mu = scalar_at<A>(a.momentum, mu0, idx, e.row_len);
        const A s = a.lr_in_momentum ? lr * gk : gk;
        const A bk = first ? s : mu * b[k] + one_minus_damp * s;
        if constexpr (std::is_same<S, __nv_bfloat16>::value) {
          if (sr) {
            const uint64_t h = mix64(seed ^ mix64((static_cast<uint64_t>(t) << 40) ^ static_cast<uint64_t>(idx)) ^
                                     static_cast<uint64_t>(__float_as_uint(static_cast<float>(g[k]))));
            b_out[k] = bf16_stochastic(static_cast<float>(bk), static_cast<uint32_t>(h));
          } else {
            b_out[k] = narrow<S>(bk);
          }
        } else {
          b_out[k] = narrow<S>(bk);
        }
        const A d = a.nesterov ? s + mu * bk : bk;
        pk = a.lr_in_momentum ? p[k] - d : p[k] - lr * d;
      } else {
        pk = p[k] - lr * gk;
      }
      p_out[k] = narrow<P>(pk);
    }
    store_n<W>(param, i, p_out);
    if (a.has_buf) store_n<W>(buf, i, b_out);
  });
}

// Register pressure: ptxas reports 64 registers per thread for this kernel,
// set by its float64 instantiation (the fp32/bf16/fp16 kinds share the one
// kernel, so they get the same allocation). Left as is unless the GPU
// benchmark shows the fp32 step well below copy bandwidth.
// kFusedNorms: the LARS update with fused tensors (a.fused_max > 0); a
// separate instantiation, so SGD and the 2-pass LARS update compile without
// the norms code.
template <bool kFusedNorms>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const SgdArgs a) {
  if (step_skipped(a.found_inf)) return;  // AMP skipped the step: write nothing
  const Chunk c = this_chunk(a.table);
  if constexpr (kFusedNorms) {
    if (fused_tensor(c.e, a.fused_max)) {  // this block owns the whole tensor: its norms first
      double pp, gg;
      lars_block_squares(a.grad_scale, c.e, c.begin, c.end, pp, gg);
      const double ratio =
          from_thread0(lars_trust_ratio(pp, gg, a.weight_decay, a.trust_coeff, a.trust_eps, a.trust_clip, a.lr));
      dispatch_kind(c.e.kind, [&](auto kind) { sgd_chunk<decltype(kind), true>(a, c.e, c.tensor, c.begin, c.end,
                                                                               ratio); });
      return;
    }
  }
  dispatch_kind(c.e.kind, [&](auto kind) { sgd_chunk<decltype(kind), false>(a, c.e, c.tensor, c.begin, c.end,
                                                                            0.0); });
}

}  // namespace

void launch_sgd(const SgdArgs& args, uintptr_t stream, const char* op) {
  if (args.table.n_blocks == 0) return;  // only empty tensors: nothing to do
  const unsigned blocks = static_cast<unsigned>(args.table.n_blocks);
  if (args.ratio != nullptr && args.fused_max > 0) {
    FASTSGD_LAUNCH(sgd_kernel<true>, blocks, as_stream(stream))(args);
  } else {
    FASTSGD_LAUNCH(sgd_kernel<false>, blocks, as_stream(stream))(args);
  }
  check_launch(op, "sgd_kernel");
}

}  // namespace cuda
}  // namespace fastsgd
