// LAMB (timm's Lamb rule) in at most three launches, no host sync:
//   1. lamb_norms_kernel: per block, the partial sums of p^2 and u^2, with u
//      the update direction computed from the NEW moments (not stored yet);
//   2. lamb_finalize_kernel: one block per tensor: |p|, |u| from the partials,
//      the trust ratio r, the bias corrections of step t = step + 1, all into
//      per_tensor[4 * t]; then it increments the tensor's step on the device;
//   3. lamb_update_kernel: recomputes m, v, u from the old moments (so u is
//      never rounded to a 16-bit state dtype before use) and writes m, v and
//      p -= lr * r * u.
// Without adaptation (weight_decay == 0 and not always_adapt) launch 1 is left
// out and r = 1. Launch 1 reads the step itself; launches 2 and 3 agree with it
// because 3 reads the bias corrections that 2 computed before incrementing.
//
// Fused (fused_max > 0): a tensor that one block owns (norms.cuh:
// fused_tensor) is skipped by launches 1 and 2; launch 3's block computes
// its bias corrections, norms and trust ratio, advances its step, then
// updates it (the norms pass has just brought its data into L1/L2). When
// every tensor is fused (all_fused), launches 1 and 2 are left out.
//
// Per element, in acc_t:
//   g = grad / grad_scale / clip_divisor
//   m = b1 * m + (1 - b1) * g,  v = b2 * v + (1 - b2) * g^2
//   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + wd * p
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/norms.cuh"

namespace fastsgd {
namespace cuda {
namespace {

struct BiasCorrection {
  double bc1, sqrt_bc2;
};

__device__ __forceinline__ BiasCorrection bias_correction(const LambArgs& a, const Entry& e) {
  if (!a.bias_correction) return {1.0, 1.0};
  const double t = static_cast<double>(*reinterpret_cast<const float*>(e.ptr[4])) + 1.0;
  return {1.0 - pow(a.beta1, t), sqrt(1.0 - pow(a.beta2, t))};
}

// Walks one chunk computing the new moments and the direction u; calls
// out(width, i, p[], m[], v[], u[]) for each vector of W elements.
template <class K, class Out>
__device__ __forceinline__ void lamb_chunk(const LambArgs& a, const Entry& e, BiasCorrection bc, int64_t begin,
                                           int64_t end, Out&& out) {
  using P = typename K::param_t;
  using S = typename K::state_t;
  using A = typename K::acc_t;
  // No __restrict__: the update kernel writes p, m, v through other pointers
  // (each element is read, then written, by the same thread).
  const P* param = reinterpret_cast<const P*>(e.ptr[0]);
  const P* grad = reinterpret_cast<const P*>(e.ptr[1]);
  const S* m_in = reinterpret_cast<const S*>(e.ptr[2]);
  const S* v_in = reinterpret_cast<const S*>(e.ptr[3]);
  const A inv_scale = A(1) / read_scalar<A>(a.grad_scale);
  const A clip0 = a.has_clip_divisor ? read_scalar<A>(a.clip_divisor) : A(1);
  const A b1 = static_cast<A>(a.beta1), b2 = static_cast<A>(a.beta2);
  const A c1 = static_cast<A>(1.0 - a.beta1), c2 = static_cast<A>(1.0 - a.beta2);
  const A bc1 = static_cast<A>(bc.bc1), sqrt_bc2 = static_cast<A>(bc.sqrt_bc2);
  const A eps = static_cast<A>(a.eps), wd = static_cast<A>(a.weight_decay);
  walk_chunk<K::kVec>(begin, end, e.vectorised, [&](auto width, int64_t i) {
    constexpr int W = decltype(width)::value;
    A p[W], g[W], m[W], v[W], u[W];
    load_n<W>(param, i, p);
    load_n<W>(grad, i, g);
    load_n<W>(m_in, i, m);
    load_n<W>(v_in, i, v);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const A clip = a.has_clip_divisor ? scalar_at<A>(a.clip_divisor, clip0, i + k, e.row_len) : A(1);
      const A gk = g[k] * inv_scale / clip;
      m[k] = b1 * m[k] + c1 * gk;
      v[k] = b2 * v[k] + c2 * gk * gk;
      u[k] = (m[k] / bc1) / (sqrt(v[k]) / sqrt_bc2 + eps);
      if (wd != A(0)) u[k] += wd * p[k];
    }
    out(width, i, p, m, v, u);
  });
}

// The block's sums of p^2 and u^2 over [begin, end) (u from the new
// moments, nothing stored): per thread in acc_t, across the block in fp64.
// Valid in thread 0.
__device__ __forceinline__ void lamb_block_squares(const LambArgs& a, const Entry& e, BiasCorrection bc,
                                                   int64_t begin, int64_t end, double& pp, double& uu) {
  pp = 0.0;
  uu = 0.0;
  dispatch_kind(e.kind, [&](auto kind) {
    using K = decltype(kind);
    using A = typename K::acc_t;
    A p2 = A(0), u2 = A(0);
    lamb_chunk<K>(a, e, bc, begin, end, [&](auto width, int64_t, const auto& p, const auto&, const auto&,
                                            const auto& u) {
      constexpr int W = decltype(width)::value;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        p2 += p[k] * p[k];
        u2 += u[k] * u[k];
      }
    });
    pp = p2;
    uu = u2;
  });
  block_sum2(pp, uu);
}

__global__ void __launch_bounds__(kThreads) lamb_norms_kernel(const LambArgs a) {
  if (step_skipped(a.found_inf)) return;
  const Chunk c = this_chunk(a.table);
  if (fused_tensor(c.e, a.fused_max)) return;  // the update kernel computes its norms
  double pp, uu;
  lamb_block_squares(a, c.e, bias_correction(a, c.e), c.begin, c.end, pp, uu);
  if (threadIdx.x == 0) {
    a.partials[2 * blockIdx.x] = pp;
    a.partials[2 * blockIdx.x + 1] = uu;
  }
}

__global__ void __launch_bounds__(kThreads) lamb_finalize_kernel(const LambArgs a) {
  if (step_skipped(a.found_inf)) return;
  const int64_t t = blockIdx.x;
  const Entry e = load_entry(a.table.table, t);
  if (fused_tensor(e, a.fused_max)) return;  // ratio and step: the update kernel's block
  double pp = 0.0, uu = 0.0;
  if (a.adapt) segment_sum2(a.partials, e, a.table.chunk_size, pp, uu);
  if (threadIdx.x == 0) {
    const BiasCorrection bc = bias_correction(a, e);
    a.per_tensor[4 * t] = lamb_trust_ratio(pp, uu, a.adapt, a.trust_clip);
    a.per_tensor[4 * t + 1] = bc.bc1;
    a.per_tensor[4 * t + 2] = bc.sqrt_bc2;
    float* step = reinterpret_cast<float*>(e.ptr[4]);
    *step = *step + 1.0f;
  }
}

// Register pressure: ptxas reports 80 registers per thread for this kernel,
// set by its float64 instantiation (all dtype kinds share the one kernel).
// Left as is unless the GPU benchmark shows the fp32 step well below copy
// bandwidth.
// kFused: some tensors are fused (a.fused_max > 0); a separate instantiation,
// so the 2-pass update compiles as it did without the fused path.
template <bool kFused>
__global__ void __launch_bounds__(kThreads) lamb_update_kernel(const LambArgs a) {
  if (step_skipped(a.found_inf)) return;
  const Chunk c = this_chunk(a.table);
  const Entry& e = c.e;
  double r;
  BiasCorrection bc;
  if (kFused && fused_tensor(e, a.fused_max)) {  // this block owns the whole tensor: bias corrections, norms, ratio, step
    bc = bias_correction(a, e);  // from the step before it advances
    double pp = 0.0, uu = 0.0;
    if (a.adapt) lamb_block_squares(a, e, bc, c.begin, c.end, pp, uu);
    r = from_thread0(lamb_trust_ratio(pp, uu, a.adapt, a.trust_clip));  // its barrier: every thread has read step
    if (threadIdx.x == 0) {
      float* step = reinterpret_cast<float*>(e.ptr[4]);
      *step = *step + 1.0f;
    }
  } else {
    const double* per_tensor = a.per_tensor + 4 * c.tensor;
    r = per_tensor[0];
    bc = BiasCorrection{per_tensor[1], per_tensor[2]};
  }
  dispatch_kind(e.kind, [&](auto kind) {
    using K = decltype(kind);
    using P = typename K::param_t;
    using S = typename K::state_t;
    using A = typename K::acc_t;
    P* param = reinterpret_cast<P*>(e.ptr[0]);
    S* m_out = reinterpret_cast<S*>(e.ptr[2]);
    S* v_out = reinterpret_cast<S*>(e.ptr[3]);
    const A lr0 = read_scalar<A>(a.lr);
    const A ratio = static_cast<A>(r);
    lamb_chunk<K>(a, e, bc, c.begin, c.end, [&](auto width, int64_t i, const auto& p, const auto& m, const auto& v,
                                            const auto& u) {
      constexpr int W = decltype(width)::value;
      P p_out[W];
      S m_st[W], v_st[W];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const A lr = scalar_at<A>(a.lr, lr0, i + k, e.row_len);
        p_out[k] = narrow<P>(p[k] - lr * ratio * u[k]);
        m_st[k] = narrow<S>(m[k]);
        v_st[k] = narrow<S>(v[k]);
      }
      store_n<W>(param, i, p_out);
      store_n<W>(m_out, i, m_st);
      store_n<W>(v_out, i, v_st);
    });
  });
}

}  // namespace

void launch_lamb(const LambArgs& args, uintptr_t stream) {
  const cudaStream_t s = as_stream(stream);
  if (args.table.n_tensors == 0) return;
  if (!args.all_fused) {
    if (args.adapt && args.table.n_blocks > 0) {
      FASTSGD_LAUNCH(lamb_norms_kernel, static_cast<unsigned>(args.table.n_blocks), s)(args);
      check_launch("lamb_step", "lamb_norms_kernel");
    }
    // It increments the step of every tensor not fused, empty tensors included.
    FASTSGD_LAUNCH(lamb_finalize_kernel, static_cast<unsigned>(args.table.n_tensors), s)(args);
    check_launch("lamb_step", "lamb_finalize_kernel");
  }
  if (args.table.n_blocks > 0) {
    if (args.fused_max > 0) {
      FASTSGD_LAUNCH(lamb_update_kernel<true>, static_cast<unsigned>(args.table.n_blocks), s)(args);
    } else {
      FASTSGD_LAUNCH(lamb_update_kernel<false>, static_cast<unsigned>(args.table.n_blocks), s)(args);
    }
    check_launch("lamb_step", "lamb_update_kernel");
  }
}

}  // namespace cuda
}  // namespace fastsgd
