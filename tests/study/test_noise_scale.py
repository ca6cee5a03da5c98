"""Gradient noise scale: closed forms of the least-squares workload (Monte Carlo), the
two-batch estimator in one process (accumulation hook) and in 2-process gloo data parallel."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastsgd.noise_scale import GradientNoiseScale, NoiseScaleAccumulator, to_floats, two_batch_estimates
from fastsgd.study.workloads.least_squares import GaussianLeastSquares, least_squares_workload, power_law_spectrum


def _problem(noise_std: float = 0.0, dim: int = 16) -> GaussianLeastSquares:
    g = torch.Generator().manual_seed(3)
    return GaussianLeastSquares(h=power_law_spectrum(dim, 1.0), w_star=torch.randn(dim, generator=g, dtype=torch.float64),
                                w0=torch.zeros(dim, dtype=torch.float64), noise_std=noise_std)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---- closed forms --------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_std", [0.0, 0.7])
def test_closed_forms_match_monte_carlo(noise_std):
    p = _problem(noise_std)
    w = p.w_star + 0.5 * torch.randn(p.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x, y = p.sample(400_000, torch.Generator().manual_seed(7), dtype=torch.float64)
    per_ex = p.per_example_gradients(x, y, w)
    mc_g2 = per_ex.mean(0).pow(2).sum().item()
    mc_trace = per_ex.var(0).sum().item()
    mc_loss = 0.5 * (x @ w - y.reshape(-1)).pow(2).mean().item()
    cf = p.closed_forms(w)
    assert _rel(mc_g2, cf["g2"]) < 0.03, (mc_g2, cf)
    assert _rel(mc_trace, cf["trace"]) < 0.03, (mc_trace, cf)
    assert _rel(mc_loss, cf["loss"]) < 0.02, (mc_loss, cf)
    # the noise term is really there: dropping it would be far off
    if noise_std:
        assert _rel(cf["trace"] - noise_std ** 2 * p.h.sum().item(), mc_trace) > 0.05


def test_workload_protocol_and_goal():
    wl = least_squares_workload(dim=8, alpha=1.0, noise_std=0.5, seed=1, goal_fraction=0.1)
    p = wl.info["problem"]
    model = wl.make_model()
    assert torch.equal(model.weight.detach().double().reshape(-1), p.w0)
    x, y = wl.sample_batch(5, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == (5, 8) and y.shape == (5, 1) and x.dtype == torch.float32
    loss = wl.loss(model(x), y)
    assert loss.ndim == 0
    ev = wl.evaluate(model, torch.device("cpu"))
    assert ev["val_loss"] == pytest.approx(p.expected_loss(p.w0))
    assert wl.goal == pytest.approx(p.noise_floor + 0.1 * (ev["val_loss"] - p.noise_floor))
    assert p.expected_losses(torch.stack([p.w0, p.w_star])).tolist() == pytest.approx(
        [p.expected_loss(p.w0), p.noise_floor])
    with pytest.raises(ValueError, match="noise floor"):
        least_squares_workload(dim=8, noise_std=1.0, goal=0.4)
    with pytest.raises(ValueError, match="w_star must have 8 elements"):
        least_squares_workload(dim=8, w_star=torch.zeros(3))


# ---- estimator arithmetic ------------------------------------------------------------------------

def test_two_batch_estimates_are_exact_on_expected_norms():
    g2, trace = 3.0, 120.0
    est = two_batch_estimates(g2 + trace / 8, 8, g2 + trace / 64, 64)
    assert est[0] == pytest.approx(g2) and est[1] == pytest.approx(trace)


def test_ema_is_bias_corrected_and_divides_averages():
    ns = GradientNoiseScale(decay=0.5)
    # raw estimates (g2, trace): (1, 10) then (-1, 30): a ratio of the averages, not an average of ratios
    for g2, tr in [(1.0, 10.0), (3.0, 30.0)]:
        small, big = g2 + tr / 2, g2 + tr / 4
        out = ns.update(small, 2, big, 4)
    # weights 0.25 and 0.5 after bias correction -> (1*0.25 + 3*0.5)/0.75
    assert float(out["g2"]) == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert float(out["trace"]) == pytest.approx((0.25 * 10 + 0.5 * 30) / 0.75)
    assert ns.b_simple == pytest.approx(float(out["trace"]) / float(out["g2"]))
    assert out["step"] == 2 and float(out["g2_raw"]) == pytest.approx(3.0)
    assert set(to_floats(out)) == {"step", "g2", "trace", "b_simple", "g2_raw", "trace_raw"}


def test_bad_inputs_have_clear_errors():
    ns = GradientNoiseScale()
    with pytest.raises(RuntimeError, match="no updates"):
        _ = ns.b_simple
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        ns.update(1.0, 8, 1.0, 8)
    with pytest.raises(ValueError, match="small_batch must be a positive"):
        ns.update(1.0, 0, 1.0, 8)
    with pytest.raises(ValueError, match="decay"):
        GradientNoiseScale(decay=1.0)
    with pytest.raises(ValueError, match="world_size"):
        ns.update_from_distributed(1.0, 0.5, 8, 1)
    with pytest.raises(ValueError, match="last_grad_sq_norms"):
        ns.update_from_ddp(torch.nn.Linear(2, 2), 8)
    model = torch.nn.Linear(3, 1)
    acc = NoiseScaleAccumulator(model, ns)
    with pytest.raises(RuntimeError, match="after loss.backward"):
        acc.micro_step(4)
    model(torch.ones(4, 3)).sum().backward()
    acc.micro_step(4)
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        acc.finish()
    with pytest.raises(ValueError, match="mode must be one of"):
        NoiseScaleAccumulator(model, ns, mode="last")


def test_update_from_ddp_reads_last_grad_sq_norms():
    class FakeDDP:   # the documented fields of BucketedDataParallel.last_grad_sq_norms
        last_grad_sq_norms = {"local": torch.tensor(99.0), "local_mean": torch.tensor(2.0 + 100 / 16),
                              "global": torch.tensor(2.0 + 100 / 64), "world_size": 4, "local_batch_size": 16}
    out = GradientNoiseScale().update_from_ddp(FakeDDP())
    assert float(out["g2"]) == pytest.approx(2.0) and float(out["trace"]) == pytest.approx(100.0)
    # summed (not averaged) micro-batch losses: gradients 3x the mean
    FakeDDP.last_grad_sq_norms = {k: (v * 9 if isinstance(v, torch.Tensor) else v)
                                  for k, v in FakeDDP.last_grad_sq_norms.items()}
    out = GradientNoiseScale().update_from_ddp(FakeDDP(), grad_scale=3)
    assert float(out["g2"]) == pytest.approx(2.0) and float(out["trace"]) == pytest.approx(100.0)


@pytest.mark.parametrize("mode", ["each", "first"])
def test_accumulator_sees_the_micro_batch_gradients(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    xs = [torch.randn(3, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)]   # unequal, 9 in all

    def mean_grad_sq(x):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        return sum(p.grad.pow(2).sum() for p in model.parameters()).item()

    g_small = [mean_grad_sq(x) for x in xs]
    g_big = mean_grad_sq(torch.cat(xs))
    model.zero_grad()
    ns = GradientNoiseScale(decay=None)
    acc = NoiseScaleAccumulator(model, ns, mode=mode)
    for x in xs:
        (model(x).pow(2).mean() * len(x) / 9).backward()
        acc.micro_step(len(x))
    out = acc.finish()
    if mode == "each":
        expect = two_batch_estimates(sum(g_small) / 2, 2 / (1 / 3 + 1 / 6), g_big, 9)
    else:
        expect = two_batch_estimates(g_small[0], 3, g_big, 9)
    assert float(out["g2_raw"]) == pytest.approx(expect[0], rel=1e-6)
    assert float(out["trace_raw"]) == pytest.approx(expect[1], rel=1e-6)
    acc.remove()


# ---- the estimator against the closed form ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["each", "first"])
def test_single_process_estimate_within_10_percent_of_closed_form(mode):
    wl = least_squares_workload(dim=32, alpha=1.0, noise_std=0.3, seed=2)
    p = wl.info["problem"]
    model = wl.make_model()
    with torch.no_grad():   # fixed parameters partway to the optimum
        model.weight.copy_((p.w_star * 0.6).reshape(1, -1))
    truth = p.b_simple(model.weight)
    ns = GradientNoiseScale(decay=None)
    acc = NoiseScaleAccumulator(model, ns, mode=mode)
    gen = torch.Generator().manual_seed(11)
    micro, k = 8, 4
    # "first" takes one small-batch sample per step instead of k: it needs ~k times the steps
    for _ in range(800 if mode == "each" else 2400):
        for _ in range(k):
            x, y = wl.sample_batch(micro, gen, torch.device("cpu"))
            (wl.loss(model(x), y) / k).backward()
            acc.micro_step(micro)
        acc.finish()
        model.zero_grad(set_to_none=True)
    assert _rel(ns.b_simple, truth) < 0.10, (ns.read(), truth)
    assert _rel(ns.g2, p.grad_sq_norm(model.weight)) < 0.10


def _gloo_worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        wl = least_squares_workload(dim=32, alpha=1.0, noise_std=0.3, seed=2)
        p = wl.info["problem"]
        model = wl.make_model()
        with torch.no_grad():
            model.weight.copy_((p.w_star * 0.6).reshape(1, -1))
        ns = GradientNoiseScale(decay=None)
        gen = torch.Generator().manual_seed(100 + rank)   # each rank its own data
        local_batch = 16
        for _ in range(500):
            x, y = wl.sample_batch(local_batch, gen, torch.device("cpu"))
            model.zero_grad()
            wl.loss(model(x), y).backward()
            grad = model.weight.grad
            local_sq = grad.pow(2).sum()
            dist.all_reduce(grad)
            grad /= world_size
            global_sq = grad.pow(2).sum()
            dist.all_reduce(local_sq)               # average the local estimate over ranks (lower variance)
            ns.update_from_distributed(local_sq / world_size, global_sq, local_batch, world_size)
        result = {"estimate": ns.read(), "truth": p.b_simple(model.weight),
                  "g2_truth": p.grad_sq_norm(model.weight)}
        # the same through BucketedDataParallel's own norms (no optimizer: parameters stay fixed)
        from fastsgd.distributed import BucketedDataParallel
        ddp = BucketedDataParallel(model, track_grad_norms=True)
        ns_ddp = GradientNoiseScale(decay=None)
        for _ in range(500):
            x, y = wl.sample_batch(local_batch, gen, torch.device("cpu"))
            model.zero_grad()
            wl.loss(ddp(x), y).backward()
            ns_ddp.update_from_ddp(ddp)
        result["estimate_ddp"] = ns_ddp.read()
        if rank == 0:
            torch.save(result, result_file)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_estimate_within_10_percent_of_closed_form():
    with tempfile.TemporaryDirectory() as d:
        init_file, result_file = os.path.join(d, "init"), os.path.join(d, "result.pt")
        mp.start_processes(_gloo_worker, args=(2, init_file, result_file), nprocs=2, join=True,
                           start_method="spawn")
        r = torch.load(result_file)
    assert _rel(r["estimate"]["b_simple"], r["truth"]) < 0.10, r
    assert _rel(r["estimate"]["g2"], r["g2_truth"]) < 0.10, r
    assert _rel(r["estimate_ddp"]["b_simple"], r["truth"]) < 0.10, r
