// Fused SGD / momentum / Nesterov and LARS steps over a table of tensors.
//
// SGD family: one pass, per element  reads p, g (and b), writes p (and b).
// LARS: |p|^2 and |g|^2 per tensor (float64 partials per segment, summed in
// segment order: deterministic), the trust ratio per tensor, then the SGD
// update with the gradient scaled by it, tensor by tensor while the tensor is
// still in cache (for_each_entry_reduce_update in work.h). The norms are
// skipped when no tensor adapts (weight_decay == 0 and not always_adapt).
#include "cpu/sgd.h"

#include <cmath>
#include <vector>

#include "cpu/numeric.h"
#include "cpu/work.h"

namespace fastsgd {
namespace cpu {
namespace {

// Per-tensor coefficients of the update, in the math type C.
//   g' = (grad * g + wd * p) * ratio
//   no buffer:  p -= lr * g'
//   buffer:     s = in * g';  b = s (first step) or mu * b + damp * s
//               d = s + mu * b (Nesterov) or b;  p -= out * d
// in/out are (1, lr) in the PyTorch form and (lr, 1) in the lr-in-momentum form.
template <class C>
struct Coeffs {
  C grad, wd, ratio, lr, mu, damp, in, out;
};

struct EntryCoeffs {
  double lr, mu, ratio;
};

template <class P, class B, bool HAS_BUF, bool FIRST, bool NESTEROV, bool WD>
FASTSGD_CLONES
void update_segment(P* __restrict p, const P* __restrict g, B* __restrict b, int64_t n,
                    const Coeffs<MathOf<P, B>> k) {
  using C = MathOf<P, B>;
  for (int64_t i = 0; i < n; ++i) {
    const C pi = C(Num<P>::load(p[i]));
    C gi = k.grad * C(Num<P>::load(g[i]));
    if (WD) gi += k.wd * pi;
    gi *= k.ratio;
    if (!HAS_BUF) {
      p[i] = Num<P>::store(pi - k.lr * gi);
      continue;
    }
    const C s = k.in * gi;
    const C bi = FIRST ? s : k.mu * C(Num<B>::load(b[i])) + k.damp * s;
    b[i] = Num<B>::store(bi);
    const C d = NESTEROV ? s + k.mu * bi : bi;
    p[i] = Num<P>::store(pi - k.out * d);
  }
}

template <class P>
FASTSGD_CLONES
void sum_squares_segment(const P* __restrict p, const P* __restrict g, int64_t n, double* p_sq, double* g_sq) {
  double sp = 0.0, sg = 0.0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : sp, sg)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const double pi = double(Num<P>::load(p[i]));
    const double gi = double(Num<P>::load(g[i]));
    sp += pi * pi;
    sg += gi * gi;
  }
  *p_sq = sp;
  *g_sq = sg;
}

// Rows of the table (see sgd.h for the layout), checked before any work starts.
struct Entry {
  int64_t param, grad, buf, numel, param_code, buf_code;
  bool first;
};

std::vector<Entry> read_entries(const Table& t, const char* what) {
  std::vector<Entry> out(size_t(t.rows));
  for (int64_t r = 0; r < t.rows; ++r) {
    Entry& e = out[size_t(r)];
    e = Entry{t.at(r, kParam), t.at(r, kGrad), t.at(r, kBuf), t.at(r, kNumel),
              t.at(r, kParamDtype), t.at(r, kBufDtype), t.at(r, kFirst) != 0};
    if (e.numel < 0) throw std::invalid_argument(std::string(what) + ": negative numel in entry " + std::to_string(r));
    check_dtype_code(e.param_code, what, r);
    if (e.buf != 0) check_dtype_code(e.buf_code, what, r);
    if (e.numel > 0) {
      check_pointer(e.param, what, r, "param");
      check_pointer(e.grad, what, r, "grad");
    }
  }
  return out;
}

struct StepFlags {
  double dampening, weight_decay, grad_factor;
  bool nesterov, lr_in_momentum;
};

// Updates elements [begin, end) of entry e with its coefficients.
void update_range(const Entry& e, const EntryCoeffs& ec, int64_t begin, int64_t end, const StepFlags& f) {
  const bool wd = f.weight_decay != 0.0;
  const int64_t n = end - begin;
  with_dtype(e.param_code, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    P* p = ptr<P>(e.param) + begin;
    const P* g = ptr<const P>(e.grad) + begin;
    auto coeffs_for = [&](auto btag) {
      using C = MathOf<P, typename decltype(btag)::type>;
      const double in = f.lr_in_momentum ? ec.lr : 1.0, out = f.lr_in_momentum ? 1.0 : ec.lr;
      return Coeffs<C>{C(f.grad_factor), C(f.weight_decay), C(ec.ratio), C(ec.lr),
                       C(ec.mu),         C(1.0 - f.dampening), C(in),  C(out)};
    };
    if (e.buf == 0) {
      with_flag(wd, [&](auto WD) {
        update_segment<P, P, false, false, false, WD.value>(p, g, nullptr, n, coeffs_for(TypeTag<P>{}));
      });
      return;
    }
    with_dtype(e.buf_code, [&](auto btag) {
      using B = typename decltype(btag)::type;
      B* b = ptr<B>(e.buf) + begin;
      const auto k = coeffs_for(btag);
      with_flag(e.first, [&](auto FIRST) {
        with_flag(f.nesterov, [&](auto NEST) {
          with_flag(wd, [&](auto WD) {
            update_segment<P, B, true, FIRST.value, NEST.value, WD.value>(p, g, b, n, k);
          });
        });
      });
    });
  });
}

void run_update(const std::vector<Entry>& entries, const std::vector<EntryCoeffs>& coeffs, const Plan& plan,
                const StepFlags& f, int threads) {
  for_each_segment(plan, threads, [&](int64_t s) {
    const Segment& seg = plan.segments[size_t(s)];
    update_range(entries[size_t(seg.entry)], coeffs[size_t(seg.entry)], seg.begin, seg.end, f);
  });
}

}  // namespace

void sgd_step(int64_t table, int64_t num_entries, int64_t hparams, double lr, double momentum, double dampening,
              double weight_decay, double grad_scale, bool maximize, bool nesterov, bool lr_in_momentum,
              int threads) {
  const char* what = "fastsgd._C.sgd_step";
  const Table t = table_from_address(table, num_entries, kSgdTableWidth, what);
  const std::vector<Entry> entries = read_entries(t, what);
  // Per-entry (lr, momentum) pairs for stacked trials, else the scalars.
  const double* hp = reinterpret_cast<const double*>(hparams);
  std::vector<EntryCoeffs> coeffs(entries.size());
  std::vector<int64_t> numel(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    coeffs[i] = hp ? EntryCoeffs{hp[2 * i], hp[2 * i + 1], 1.0} : EntryCoeffs{lr, momentum, 1.0};
    numel[i] = entries[i].numel;
  }
  const StepFlags f{dampening, weight_decay, (maximize ? -1.0 : 1.0) / grad_scale, nesterov, lr_in_momentum};
  run_update(entries, coeffs, make_plan(numel), f, threads);
}

void lars_step(int64_t table, int64_t num_entries, double lr, double momentum, double dampening,
               double weight_decay, double grad_scale, bool nesterov, double trust_coeff, double eps,
               bool trust_clip, bool always_adapt, bool lr_in_momentum, int threads) {
  const char* what = "fastsgd._C.lars_step";
  const Table t = table_from_address(table, num_entries, kSgdTableWidth, what);
  const std::vector<Entry> entries = read_entries(t, what);
  std::vector<int64_t> numel(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) numel[i] = entries[i].numel;
  const Plan plan = make_plan(numel);
  const StepFlags f{dampening, weight_decay, 1.0 / grad_scale, nesterov, lr_in_momentum};
  if (weight_decay == 0.0 && !always_adapt) {  // no tensor adapts: plain momentum SGD, one pass
    run_update(entries, std::vector<EntryCoeffs>(entries.size(), EntryCoeffs{lr, momentum, 1.0}), plan, f, threads);
    return;
  }
  std::vector<double> p_sq(plan.segments.size()), g_sq(plan.segments.size());
  for_each_entry_reduce_update(
      plan, threads,
      [&](int64_t s) {
        const Segment& seg = plan.segments[size_t(s)];
        const Entry& e = entries[size_t(seg.entry)];
        with_dtype(e.param_code, [&](auto ptag) {
          using P = typename decltype(ptag)::type;
          sum_squares_segment<P>(ptr<const P>(e.param) + seg.begin, ptr<const P>(e.grad) + seg.begin,
                                 seg.end - seg.begin, &p_sq[size_t(s)], &g_sq[size_t(s)]);
        });
      },
      [&](int64_t e) {
        double sp = 0.0, sg = 0.0;
        for (int64_t s = plan.entry_start[size_t(e)]; s < plan.entry_start[size_t(e) + 1]; ++s) {
          sp += p_sq[size_t(s)];
          sg += g_sq[size_t(s)];
        }
        const double w_norm = std::sqrt(sp), g_norm = std::sqrt(sg) / grad_scale;
        // timm's rule: r = tc*|w| / (|g| + wd*|w| + eps), 1 when either norm is 0; LARC clip: min(r/lr, 1).
        double r = (w_norm > 0.0 && g_norm > 0.0) ? trust_coeff * w_norm / (g_norm + weight_decay * w_norm + eps)
                                                  : 1.0;
        if (trust_clip) r = std::fmin(r / lr, 1.0);
        return EntryCoeffs{lr, momentum, r};
      },
      [&](int64_t e, int64_t begin, int64_t end, const EntryCoeffs& c) {
        update_range(entries[size_t(e)], c, begin, end, f);
      });
}

}  // namespace cpu
}  // namespace fastsgd
