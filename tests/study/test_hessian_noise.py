"""B_noise = tr(H Sigma)/(G^T H G) and B_simple from micro-batch gradients and HVPs, checked against
the closed forms of Gaussian least squares (fastsgd.study.workloads.least_squares):
e = w - w*, H = diag(h), Sigma = H e e^T H + (e^T H e + s^2) H, so
G^T H G = e^T H^3 e and tr(H Sigma) = e^T H^3 e + (e^T H e + s^2) tr(H^2)."""
import math

import pytest
import torch

from fastsgd.study.combine.hessian_noise import HessianNoiseScale, hvp, noise_scale_estimates
from fastsgd.study.workloads.least_squares import GaussianLeastSquares, power_law_spectrum


def _loss(out, y):
    return 0.5 * (out - y).pow(2).mean()


def _problem(noise_std=0.5, dim=8):
    h = power_law_spectrum(dim, alpha=1.0)
    w_star = torch.arange(1, dim + 1, dtype=torch.float64)   # error weighted to small eigenvalues: B_noise > B_simple
    return GaussianLeastSquares(h=h, w_star=w_star, w0=torch.zeros(dim, dtype=torch.float64), noise_std=noise_std)


def _closed(p):
    e = p.error(p.w0)
    ghg = float((p.h ** 3 * e * e).sum())
    ehe = float((p.h * e * e).sum())
    return {"ghg": ghg, "trace_h": ghg + (ehe + p.noise_std ** 2) * float((p.h ** 2).sum()),
            "g2": p.grad_sq_norm(p.w0), "trace": p.trace_cov(p.w0)}


def test_hvp_is_the_batch_hessian_times_v():
    p = _problem()
    model = p.make_model().double()
    gen = torch.Generator().manual_seed(0)
    x, y = p.sample(13, gen, dtype=torch.float64)
    v = torch.randn(p.dim, dtype=torch.float64, generator=gen)
    (hv,) = hvp(model, _loss, (x, y), [v])
    torch.testing.assert_close(hv, x.T @ (x @ v) / 13)
    with pytest.raises(ValueError, match="shape"):
        hvp(model, _loss, (x, y), [torch.ones(p.dim + 1, dtype=torch.float64)])


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_estimates_are_unbiased_and_ratios_match_closed_forms(noise_std):
    p = _problem(noise_std)
    closed = _closed(p)
    assert closed["trace_h"] / closed["ghg"] == pytest.approx(p.b_noise(p.w0))
    assert closed["trace"] / closed["g2"] == pytest.approx(p.b_simple(p.w0))
    assert abs(p.b_noise(p.w0) / p.b_simple(p.w0) - 1) > 0.3      # the two scales differ here
    model = p.make_model().double()
    gen = torch.Generator().manual_seed(1)
    acc, rows = HessianNoiseScale(), []
    for _ in range(600):
        mbs = [p.sample(4, gen, dtype=torch.float64) for _ in range(6)]
        est = noise_scale_estimates(model, _loss, mbs, p.sample(16, gen, dtype=torch.float64))
        acc.update(est)
        rows.append(est)
    for k, true in closed.items():
        vals = torch.tensor([r[k] for r in rows], dtype=torch.float64)
        se = float(vals.std()) / math.sqrt(len(vals))
        assert abs(float(vals.mean()) - true) < 4 * se, (k, float(vals.mean()), true, se)
        assert abs(float(vals.mean()) / true - 1) < 0.15, (k, float(vals.mean()), true)
    r = acc.read()
    assert r["b_noise"] == pytest.approx(p.b_noise(p.w0), rel=0.15)
    assert r["b_simple"] == pytest.approx(p.b_simple(p.w0), rel=0.15)
    assert r["updates"] == 600


def test_bad_inputs_are_named():
    p = _problem()
    model = p.make_model().double()
    gen = torch.Generator().manual_seed(0)
    hb = p.sample(4, gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        noise_scale_estimates(model, _loss, [hb], hb)
    with pytest.raises(ValueError, match="equal sizes"):
        noise_scale_estimates(model, _loss, [hb, p.sample(5, gen, dtype=torch.float64)], hb)
    with pytest.raises(RuntimeError, match="no updates"):
        HessianNoiseScale().read()


def test_estimates_leave_the_model_untouched():
    p = _problem()
    model = p.make_model().double()
    seen = []
    model.weight.register_hook(lambda g: seen.append(g))
    gen = torch.Generator().manual_seed(0)
    mbs = [p.sample(4, gen, dtype=torch.float64) for _ in range(3)]
    noise_scale_estimates(model, _loss, mbs, p.sample(8, gen, dtype=torch.float64))
    assert seen == [] and model.weight.grad is None
