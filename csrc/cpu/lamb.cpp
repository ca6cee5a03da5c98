// Fused LAMB step over a table of tensors.
//
// When the trust ratio is needed (weight_decay != 0 or always_adapt) the step
// makes two passes over each tensor, pass 1 for the per-tensor norms |p| and
// |u| (float64 partials per segment, summed in segment order), pass 2 for
// p -= lr * r * u, tensor by tensor so that pass 2 finds the tensor in cache
// (for_each_entry_reduce_update in work.h),
// with u = m_hat / (sqrt(v_hat) + eps) + wd * p computed from the new moments
// before they are rounded to their storage type, as the reference does:
//   moments stored in the math type (float32 moments with float32/16-bit
//     params, float64 with float64): pass 1 reads p, g, m, v and writes m, v;
//     pass 2 reads p, m, v and writes p.
//   moments narrower than the math type (16-bit moments, or float32 moments of
//     float64 params: rounding them would change u, e.g. v underflowing in
//     float16): pass 1 only reads p, g, m, v; pass 2 recomputes the moments
//     from g and the old m, v, writes m, v and p.
// Without adaptation it is a single pass (read p, g, m, v; write p, m, v).
#include "cpu/lamb.h"

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/numeric.h"
#include "cpu/work.h"

namespace fastsgd {
namespace cpu {
namespace {

template <class C>
struct LambCoeffs {
  C grad, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_sqrt_bc2, eps, wd, step;
};

template <class C, bool WD>
inline C lamb_direction(C m, C v, C p, const LambCoeffs<C>& k) {
  C u = (m * k.inv_bc1) / (std::sqrt(v) * k.inv_sqrt_bc2 + k.eps);
  if (WD) u += k.wd * p;
  return u;
}

// Moments narrower than the math type are written in pass 2 (see the top of the file).
template <class P, class S>
constexpr bool kDeferMoments = !std::is_same_v<S, MathOf<P, S>>;

// Pass 1. ADAPT: accumulate |p|^2, |u|^2 and leave p alone; otherwise apply
// p -= step * u right away (k.step = lr).
template <class P, class S, bool ADAPT, bool WD>
FASTSGD_CLONES
void moments_segment(P* __restrict p, const P* __restrict g, S* __restrict m, S* __restrict v, int64_t n,
                     const LambCoeffs<MathOf<P, S>> k, double* p_sq, double* u_sq) {
  using C = MathOf<P, S>;
  constexpr bool kWriteMoments = !(ADAPT && kDeferMoments<P, S>);
  double sp = 0.0, su = 0.0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : sp, su)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const C pi = C(Num<P>::load(p[i]));
    const C gi = k.grad * C(Num<P>::load(g[i]));
    const C mi = k.beta1 * C(Num<S>::load(m[i])) + k.one_minus_beta1 * gi;
    const C vi = k.beta2 * C(Num<S>::load(v[i])) + k.one_minus_beta2 * gi * gi;
    if constexpr (kWriteMoments) {
      m[i] = Num<S>::store(mi);
      v[i] = Num<S>::store(vi);
    }
    const C u = lamb_direction<C, WD>(mi, vi, pi, k);
    if (ADAPT) {
      sp += double(pi) * double(pi);
      su += double(u) * double(u);
    } else {
      p[i] = Num<P>::store(pi - k.step * u);
    }
  }
  *p_sq = sp;
  *u_sq = su;
}

// Pass 2: p -= (lr * r) * u; u from the moments stored in pass 1, or, for
// 16-bit moments, from moments recomputed (and stored) here.
template <class P, class S, bool WD>
FASTSGD_CLONES
void apply_segment(P* __restrict p, const P* __restrict g, S* __restrict m, S* __restrict v, int64_t n,
                   const LambCoeffs<MathOf<P, S>> k) {
  using C = MathOf<P, S>;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = C(Num<P>::load(p[i]));
    C mi = C(Num<S>::load(m[i]));
    C vi = C(Num<S>::load(v[i]));
    if constexpr (kDeferMoments<P, S>) {
      const C gi = k.grad * C(Num<P>::load(g[i]));
      mi = k.beta1 * mi + k.one_minus_beta1 * gi;
      vi = k.beta2 * vi + k.one_minus_beta2 * gi * gi;
      m[i] = Num<S>::store(mi);
      v[i] = Num<S>::store(vi);
    }
    p[i] = Num<P>::store(pi - k.step * lamb_direction<C, WD>(mi, vi, pi, k));
  }
}

struct Entry {
  int64_t param, grad, exp_avg, exp_avg_sq, numel, param_code, state_code;
  double inv_bc1, inv_sqrt_bc2;  // from this step's t
};

}  // namespace

void lamb_step(int64_t table, int64_t num_entries, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool bias_correction, bool trust_clip, bool always_adapt, double grad_divisor,
               int threads) {
  const char* what = "fastsgd._C.lamb_step";
  const Table t = table_from_address(table, num_entries, kLambTableWidth, what);
  std::vector<Entry> entries(size_t(t.rows));
  std::vector<int64_t> numel(size_t(t.rows));
  // Validate every row before the first step counter is touched.
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t n = t.at(r, kLambNumel);
    if (n < 0) throw std::invalid_argument(std::string(what) + ": negative numel in entry " + std::to_string(r));
    check_dtype_code(t.at(r, kLambParamDtype), what, r);
    check_dtype_code(t.at(r, kLambStateDtype), what, r);
    const int64_t step_code = t.at(r, kLambStepDtype);
    if (step_code != kFloat32 && step_code != kFloat64) {
      throw std::invalid_argument(std::string(what) + ": entry " + std::to_string(r) +
                                  ": step must be a float32 or float64 tensor");
    }
    check_pointer(t.at(r, kLambStep), what, r, "step");
    if (n > 0) {
      check_pointer(t.at(r, kLambParam), what, r, "param");
      check_pointer(t.at(r, kLambGrad), what, r, "grad");
      check_pointer(t.at(r, kLambExpAvg), what, r, "exp_avg");
      check_pointer(t.at(r, kLambExpAvgSq), what, r, "exp_avg_sq");
    }
  }
  for (int64_t r = 0; r < t.rows; ++r) {
    // Step counters: t = step + 1, stored back; bias corrections from t.
    double step;
    if (t.at(r, kLambStepDtype) == kFloat32) {
      float* sp = ptr<float>(t.at(r, kLambStep));
      step = double(*sp) + 1.0;
      *sp = float(step);
    } else {
      double* sp = ptr<double>(t.at(r, kLambStep));
      step = *sp + 1.0;
      *sp = step;
    }
    const double bc1 = bias_correction ? 1.0 - std::pow(beta1, step) : 1.0;
    const double bc2 = bias_correction ? 1.0 - std::pow(beta2, step) : 1.0;
    entries[size_t(r)] = Entry{t.at(r, kLambParam), t.at(r, kLambGrad), t.at(r, kLambExpAvg),
                               t.at(r, kLambExpAvgSq), t.at(r, kLambNumel), t.at(r, kLambParamDtype),
                               t.at(r, kLambStateDtype), 1.0 / bc1, 1.0 / std::sqrt(bc2)};
    numel[size_t(r)] = entries[size_t(r)].numel;
  }
  const Plan plan = make_plan(numel);
  const bool adapt = weight_decay != 0.0 || always_adapt;
  const bool wd = weight_decay != 0.0;

  auto coeffs = [&](auto math_tag, const Entry& e, double step_size) {
    using C = typename decltype(math_tag)::type;
    return LambCoeffs<C>{C(1.0 / grad_divisor), C(beta1), C(1.0 - beta1), C(beta2), C(1.0 - beta2),
                         C(e.inv_bc1), C(e.inv_sqrt_bc2), C(eps), C(weight_decay), C(step_size)};
  };
  // f(P tag, S tag) for the entry's storage types.
  auto with_types = [](const Entry& e, auto&& f) {
    with_dtype(e.param_code, [&](auto ptag) { with_dtype(e.state_code, [&](auto stag) { f(ptag, stag); }); });
  };
  // Pass 1 over segment s: with ADAPT the moments and the partial norms, else the whole update.
  std::vector<double> p_sq(plan.segments.size()), u_sq(plan.segments.size());
  auto moments = [&](auto ADAPT, int64_t s) {
    const Segment& seg = plan.segments[size_t(s)];
    const Entry& e = entries[size_t(seg.entry)];
    with_types(e, [&](auto ptag, auto stag) {
      using P = typename decltype(ptag)::type;
      using S = typename decltype(stag)::type;
      const auto k = coeffs(TypeTag<MathOf<P, S>>{}, e, lr);
      with_flag(wd, [&](auto WD) {
        moments_segment<P, S, decltype(ADAPT)::value, WD.value>(
            ptr<P>(e.param) + seg.begin, ptr<const P>(e.grad) + seg.begin, ptr<S>(e.exp_avg) + seg.begin,
            ptr<S>(e.exp_avg_sq) + seg.begin, seg.end - seg.begin, k, &p_sq[size_t(s)], &u_sq[size_t(s)]);
      });
    });
  };
  if (!adapt) {
    for_each_segment(plan, threads, [&](int64_t s) { moments(std::false_type{}, s); });
    return;
  }
  for_each_entry_reduce_update(
      plan, threads, [&](int64_t s) { moments(std::true_type{}, s); },
      [&](int64_t i) {
        double sp = 0.0, su = 0.0;
        for (int64_t s = plan.entry_start[size_t(i)]; s < plan.entry_start[size_t(i) + 1]; ++s) {
          sp += p_sq[size_t(s)];
          su += u_sq[size_t(s)];
        }
        const double w_norm = std::sqrt(sp), u_norm = std::sqrt(su);
        double r = (w_norm > 0.0 && u_norm > 0.0) ? w_norm / u_norm : 1.0;
        if (trust_clip) r = std::fmin(r, 1.0);
        return lr * r;  // the entry's step size
      },
      [&](int64_t i, int64_t begin, int64_t end, double step_size) {
        const Entry& e = entries[size_t(i)];
        with_types(e, [&](auto ptag, auto stag) {
          using P = typename decltype(ptag)::type;
          using S = typename decltype(stag)::type;
          const auto k = coeffs(TypeTag<MathOf<P, S>>{}, e, step_size);
          with_flag(wd, [&](auto WD) {
            apply_segment<P, S, WD.value>(ptr<P>(e.param) + begin, ptr<const P>(e.grad) + begin,
                                          ptr<S>(e.exp_avg) + begin, ptr<S>(e.exp_avg_sq) + begin, end - begin, k);
          });
        });
      });
}

}  // namespace cpu
}  // namespace fastsgd
