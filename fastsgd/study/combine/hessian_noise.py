"""The Hessian-aware noise scale B_noise = tr(H Sigma) / (G^T H G) (McCandlish et al. 2018, sec. 2.2),
estimated from micro-batch gradients and Hessian-vector products, next to B_simple = tr(Sigma) / |G|^2.

Estimator (one call of :func:`noise_scale_estimates`, at fixed parameters)
--------------------------------------------------------------------------
Inputs: m >= 2 independent micro-batches of b examples each, with mean-loss gradients
g_1..g_m, and one further independent batch whose loss Hessian H_c (E[H_c] = H) is only
ever applied to vectors (Hessian-vector products by double backward). With the mean
gradient gbar = (1/m) sum_j g_j and deviations d_j = g_j - gbar:

* E[sum_j d_j d_j^T] = (m - 1) Sigma / b, so
  ``T = b/(m-1) sum_j d_j^T H_c d_j`` is unbiased for tr(H Sigma) (H_c is independent of
  the d_j, so E[d^T H_c d] = E[d^T H d]), and ``t = b/(m-1) sum_j |d_j|^2`` for tr(Sigma);
* E[gbar^T H_c gbar] = G^T H G + tr(H Sigma) / (m b), so
  ``Q = gbar^T H_c gbar - T / (m b)`` is unbiased for G^T H G (the quadratic form along
  the mean gradient), and ``q = |gbar|^2 - t / (m b)`` for |G|^2.

Cost: m HVPs (H_c g_j; H_c gbar and H_c d_j follow by linearity) plus m + 1 gradients.
Ratios of single estimates are noisy and Q, q can come out negative, so
:class:`HessianNoiseScale` averages the four numerators and denominators over calls and
divides the averages (as for B_simple, McCandlish et al. appendix A.1).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["hvp", "noise_scale_estimates", "HessianNoiseScale"]

Batch = Tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _leaves(model: nn.Module) -> Dict[str, Tensor]:
    """Detached copies of the trainable parameters as fresh autograd leaves: the estimates
    differentiate these, so hooks on the model's own parameters (e.g. a
    NoiseScaleAccumulator's) and their ``.grad`` never see the extra backward passes."""
    return {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}


def _grad(model: nn.Module, loss_fn: LossFn, batch: Batch, leaves: Dict[str, Tensor], create_graph: bool = False):
    x, y = batch
    out = torch.func.functional_call(model, leaves, (x,))
    return torch.autograd.grad(loss_fn(out, y), list(leaves.values()), create_graph=create_graph)


def hvp(model: nn.Module, loss_fn: LossFn, batch: Batch, vectors: Sequence[Tensor]) -> List[Tensor]:
    """H v for each flat vector v, H the Hessian of ``loss_fn`` on ``batch`` w.r.t. the
    trainable parameters (double backward, one graph for all vectors)."""
    leaves = _leaves(model)
    params = list(leaves.values())
    grads = _grad(model, loss_fn, batch, leaves, create_graph=True)
    flat = _flat(grads)
    out = []
    for i, v in enumerate(vectors):
        if v.shape != flat.shape:
            raise ValueError(f"hvp: vector {i} has shape {tuple(v.shape)}, the parameters {tuple(flat.shape)}")
        hv = torch.autograd.grad(flat, params, grad_outputs=v.to(flat), retain_graph=i < len(vectors) - 1)
        out.append(_flat(hv).detach())
    return out


def noise_scale_estimates(model: nn.Module, loss_fn: LossFn, micro_batches: Sequence[Batch],
                          hessian_batch: Batch) -> Dict[str, float]:
    """Unbiased single-step estimates (module docstring) at the model's current parameters:
    ``trace`` (tr Sigma), ``g2`` (|G|^2), ``trace_h`` (tr H Sigma), ``ghg`` (G^T H G), and
    the ratios ``b_simple``, ``b_noise`` of these single estimates. ``micro_batches`` must
    be independent draws of equal size; ``hessian_batch`` independent of them."""
    m = len(micro_batches)
    if m < 2:
        raise ValueError(f"need at least 2 micro-batches to measure gradient noise, got {m}")
    sizes = {int(x.shape[0]) for x, _ in micro_batches}
    if len(sizes) != 1:
        raise ValueError(f"micro-batches must have equal sizes, got {sorted(sizes)}")
    (b,) = sizes
    leaves = _leaves(model)
    if not leaves:
        raise ValueError("the model has no trainable parameters")
    dtype = next(iter(leaves.values())).dtype
    gs = torch.stack([_flat(_grad(model, loss_fn, mb, leaves)).detach() for mb in micro_batches]).double()
    hgs = torch.stack(hvp(model, loss_fn, hessian_batch, list(gs.to(dtype)))).double()
    gbar, hgbar = gs.mean(0), hgs.mean(0)
    dev, hdev = gs - gbar, hgs - hgbar
    trace = float(b / (m - 1) * dev.pow(2).sum())
    trace_h = float(b / (m - 1) * (dev * hdev).sum())
    g2 = float(gbar.pow(2).sum()) - trace / (m * b)
    ghg = float(gbar @ hgbar) - trace_h / (m * b)
    return {"trace": trace, "g2": g2, "trace_h": trace_h, "ghg": ghg,
            "b_simple": trace / g2 if g2 != 0 else math.nan, "b_noise": trace_h / ghg if ghg != 0 else math.nan,
            "micro_batch": b, "micro_batches": m}


class HessianNoiseScale:
    """Running means of tr(Sigma), |G|^2, tr(H Sigma) and G^T H G; ``read()`` divides the means."""

    KEYS = ("trace", "g2", "trace_h", "ghg")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.count = 0

    def update(self, estimates: Dict[str, float]) -> None:
        for k in self.KEYS:
            self.sums[k] += float(estimates[k])
        self.count += 1

    def read(self) -> Dict[str, float]:
        if not self.count:
            raise RuntimeError("HessianNoiseScale has no updates yet")
        mean = {k: v / self.count for k, v in self.sums.items()}
        mean["b_simple"] = mean["trace"] / mean["g2"] if mean["g2"] != 0 else math.nan
        mean["b_noise"] = mean["trace_h"] / mean["ghg"] if mean["ghg"] != 0 else math.nan
        mean["updates"] = self.count
        return mean
