"""Streaming Gaussian least squares: a workload whose gradient noise scale is known exactly.

The problem
-----------
Inputs ``x ~ N(0, H)`` with ``H = diag(h)`` (a power-law spectrum by default,
``h_i = i**-alpha``), labels ``y = x^T w* + eps`` with optional label noise
``eps ~ N(0, s^2)`` independent of ``x``, and the per-example loss
``l(w; x, y) = 1/2 (x^T w - y)^2``; the batch loss is its mean. Every batch is
fresh (streaming), so there is no over-fitting and the expected loss is the
validation metric.

Closed forms (error ``e = w - w*``)
-----------------------------------
Per-example gradient ``g = x (x^T e - eps)``.

* True gradient: ``G = E[g] = E[x x^T] e - E[x eps] = H e``, so ``|G|^2 = |He|^2``.
* Second moment, by Isserlis' theorem for Gaussian ``x``
  (``E[x x^T e e^T x x^T] = 2 H e e^T H + (e^T H e) H``) and independence of eps:
  ``E[g g^T] = 2 H e e^T H + (e^T H e) H + s^2 H``.
* Per-example covariance ``Sigma = E[g g^T] - G G^T = H e e^T H + (e^T H e + s^2) H``, so
  ``tr(Sigma) = |He|^2 + (e^T H e + s^2) tr(H)``.
* Simple noise scale ``B_simple = tr(Sigma) / |G|^2 = 1 + (e^T H e + s^2) tr(H) / |He|^2``.
* The loss Hessian is ``H`` for every ``w``, so McCandlish et al.'s full noise scale
  ``B_noise = tr(H Sigma) / (G^T H G) = 1 + (e^T H e + s^2) tr(H^2) / (e^T H^3 e)``.
* Expected loss ``L(w) = 1/2 E[(x^T e - eps)^2] = 1/2 (e^T H e + s^2)``; the noise floor is ``s^2 / 2``.

As training removes the error along the large eigenvalues first, ``e^T H e / |He|^2``
grows, so the noise scale grows during training -- as McCandlish et al. observe
on real networks. ``tests/test_noise_scale.py`` checks these formulas by Monte
Carlo on per-example gradients.

The :class:`~fastsgd.study.workloads.base.Workload` built by :func:`least_squares_workload`
uses a bias-free ``nn.Linear(dim, 1)`` initialised at ``w0`` (zero by default), reports the
exact expected loss as ``val_loss`` (and ``excess_loss`` = ``val_loss`` minus the noise
floor), and its default goal is the noise floor plus ``goal_fraction`` (default 5 %) of the
initial excess loss. ``workload.info["problem"]`` holds the :class:`GaussianLeastSquares`
with all closed forms, e.g. for checking a noise-scale estimate or a fitted B_crit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fastsgd.study.workloads.base import Workload

__all__ = ["GaussianLeastSquares", "power_law_spectrum", "least_squares_workload"]


def power_law_spectrum(dim: int, alpha: float = 1.0, h_max: float = 1.0) -> Tensor:
    """Eigenvalues ``h_max * i**-alpha`` for ``i = 1..dim`` (float64)."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"spectrum exponent alpha must be finite and >= 0, got {alpha!r}")
    if not (h_max > 0 and math.isfinite(h_max)):
        raise ValueError(f"largest eigenvalue h_max must be finite and > 0, got {h_max!r}")
    return h_max * torch.arange(1, dim + 1, dtype=torch.float64).pow(-alpha)


def _as_vector(name: str, w, dim: int) -> Tensor:
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu().reshape(-1)
    if w.numel() != dim:
        raise ValueError(f"{name} must have {dim} elements (the problem's dimension), got {w.numel()}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or inf")
    return w


@dataclass(frozen=True)
class GaussianLeastSquares:
    """The problem and its closed forms. All closed forms take weights ``w``
    (any shape with ``dim`` elements: a tensor, an ``nn.Linear`` weight, a list)
    and return Python floats computed in float64.

    h:          eigenvalues of the input covariance H (diagonal), shape (dim,)
    w_star:     the true weights, shape (dim,)
    w0:         the initial weights of the model factory, shape (dim,)
    noise_std:  standard deviation s of the label noise (0: noiseless)
    """

    h: Tensor
    w_star: Tensor
    w0: Tensor
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        h = torch.as_tensor(self.h, dtype=torch.float64).reshape(-1)
        if h.numel() == 0 or not (h > 0).all() or not torch.isfinite(h).all():
            raise ValueError("eigenvalues h must be a non-empty vector of finite positive numbers")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise ValueError(f"noise_std must be finite and >= 0, got {self.noise_std!r}")
        object.__setattr__(self, "h", h)
        object.__setattr__(self, "w_star", _as_vector("w_star", self.w_star, h.numel()))
        object.__setattr__(self, "w0", _as_vector("w0", self.w0, h.numel()))

    @property
    def dim(self) -> int:
        return self.h.numel()

    # ---- closed forms -------------------------------------------------------------------------
    def error(self, w) -> Tensor:
        return _as_vector("w", w, self.dim) - self.w_star

    def gradient(self, w) -> Tensor:
        """True gradient ``G = H e`` (float64)."""
        return self.h * self.error(w)

    def grad_sq_norm(self, w) -> float:
        """``|G|^2 = |He|^2``."""
        return float(self.gradient(w).pow(2).sum())

    def _ehe(self, w) -> float:
        e = self.error(w)
        return float((self.h * e * e).sum())

    def trace_cov(self, w) -> float:
        """Per-example gradient covariance trace ``tr(Sigma) = |He|^2 + (e^T H e + s^2) tr(H)``."""
        return self.grad_sq_norm(w) + (self._ehe(w) + self.noise_std ** 2) * float(self.h.sum())

    def b_simple(self, w) -> float:
        """``B_simple = tr(Sigma) / |G|^2`` (inf at the optimum of a noisy problem)."""
        g2 = self.grad_sq_norm(w)
        return math.inf if g2 == 0 else self.trace_cov(w) / g2

    def b_noise(self, w) -> float:
        """McCandlish et al.'s ``B_noise = tr(H Sigma) / (G^T H G)`` with Hessian H."""
        e = self.error(w)
        he = self.h * e
        ghg = float((self.h * he * he).sum())
        if ghg == 0:
            return math.inf
        tr_h_sigma = ghg + (self._ehe(w) + self.noise_std ** 2) * float(self.h.pow(2).sum())
        return tr_h_sigma / ghg

    def expected_loss(self, w) -> float:
        """``L(w) = 1/2 (e^T H e + s^2)``: the exact population loss."""
        return 0.5 * (self._ehe(w) + self.noise_std ** 2)

    @property
    def noise_floor(self) -> float:
        """The smallest reachable expected loss, ``s^2 / 2``."""
        return 0.5 * self.noise_std ** 2

    def expected_losses(self, weights: Tensor) -> Tensor:
        """Expected loss of many weight vectors at once: ``weights`` of shape
        (..., dim) -> losses of shape (...), float64. For vmapped trials."""
        wts = torch.as_tensor(weights).detach().to("cpu", torch.float64)
        if wts.shape[-1] != self.dim:
            raise ValueError(f"weights' last dimension must be {self.dim}, got shape {tuple(wts.shape)}")
        e = wts - self.w_star
        return 0.5 * ((self.h * e * e).sum(-1) + self.noise_std ** 2)

    # ---- sampling -----------------------------------------------------------------------------
    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """A fresh batch ``(x, y)``: x of shape (batch_size, dim), y of shape (batch_size, 1).

        Drawn in float64 on the generator's device, then moved to ``device``/``dtype``,
        so a seed gives the same data on every device."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(batch_size, self.dim, generator=generator, device=gen_device, dtype=torch.float64)
        x = z * self.h.to(gen_device).sqrt()
        y = x @ self.w_star.to(gen_device)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(batch_size, generator=generator, device=gen_device,
                                                 dtype=torch.float64)
        return x.to(device=device, dtype=dtype), y.unsqueeze(1).to(device=device, dtype=dtype)

    @staticmethod
    def per_example_gradients(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Per-example gradients ``x_i (x_i^T w - y_i)`` of shape (batch, dim)."""
        residual = x @ w.reshape(-1).to(x) - y.reshape(-1)
        return x * residual.unsqueeze(1)

    # ---- model --------------------------------------------------------------------------------
    def make_model(self) -> nn.Module:
        """A bias-free ``nn.Linear(dim, 1)`` whose weight is ``w0``."""
        model = nn.Linear(self.dim, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(self.w0.reshape(1, -1))
        return model

    def closed_forms(self, w) -> Dict[str, float]:
        """All closed-form quantities at ``w``, as a dict of floats."""
        return {"g2": self.grad_sq_norm(w), "trace": self.trace_cov(w), "b_simple": self.b_simple(w),
                "b_noise": self.b_noise(w), "loss": self.expected_loss(w)}


def _model_weights(model: nn.Module) -> Tensor:
    params = [p for p in model.parameters()]
    if len(params) != 1:
        raise ValueError("the least-squares evaluator expects a model with exactly one parameter "
                         f"(a bias-free nn.Linear), got {len(params)}")
    return params[0].detach()


def _least_squares_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    if outputs.shape != targets.shape:
        raise ValueError(f"outputs shape {tuple(outputs.shape)} != targets shape {tuple(targets.shape)}")
    return 0.5 * (outputs - targets).pow(2).mean()


def least_squares_workload(dim: int = 100, alpha: float = 1.0, noise_std: float = 0.0, *, seed: int = 0,
                           w0=None, w_star=None, h=None, goal_fraction: float = 0.05,
                           goal: Optional[float] = None, name: Optional[str] = None) -> Workload:
    """The streaming Gaussian least-squares :class:`Workload`.

    dim, alpha:     input dimension and power-law exponent of H's eigenvalues ``i**-alpha``
                    (or give ``h`` explicitly)
    noise_std:      label-noise standard deviation s
    seed:           seeds ``w* ~ N(0, I)`` when ``w_star`` is not given
    w0:             initial weights (default zero)
    goal_fraction:  default goal = noise floor + goal_fraction x initial excess loss
    goal:           explicit goal on ``val_loss`` (overrides goal_fraction)

    The validation metric ``val_loss`` is the exact expected loss (no sampling);
    ``info["problem"]`` is the :class:`GaussianLeastSquares` with the closed forms.
    """
    if h is None:
        h = power_law_spectrum(dim, alpha)
    else:
        h = torch.as_tensor(h, dtype=torch.float64).reshape(-1)
        dim = h.numel()
    if w_star is None:
        w_star = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if w0 is None:
        w0 = torch.zeros(dim, dtype=torch.float64)
    problem = GaussianLeastSquares(h=h, w_star=w_star, w0=w0, noise_std=float(noise_std))

    initial_excess = problem.expected_loss(problem.w0) - problem.noise_floor
    if goal is None:
        if not (0 < goal_fraction < 1):
            raise ValueError(f"goal_fraction must lie in (0, 1), got {goal_fraction!r}")
        goal = problem.noise_floor + goal_fraction * initial_excess
    elif not goal > problem.noise_floor:
        raise ValueError(f"goal {goal!r} is not above the noise floor {problem.noise_floor!r}: it cannot be reached")

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device):
        return problem.sample(batch_size, generator, device)

    def evaluate(model: nn.Module, device: torch.device) -> Dict[str, float]:
        loss = problem.expected_loss(_model_weights(model))
        return {"val_loss": loss, "excess_loss": loss - problem.noise_floor}

    return Workload(
        name=name or f"least-squares-d{dim}-a{alpha:g}" + (f"-s{noise_std:g}" if noise_std else ""),
        make_model=problem.make_model, sample_batch=sample_batch, loss=_least_squares_loss, evaluate=evaluate,
        goal_metric="val_loss", goal=float(goal), higher_is_better=False,
        info={"problem": problem, "initial_loss": problem.expected_loss(problem.w0),
              "noise_floor": problem.noise_floor, "b_simple_at_init": problem.b_simple(problem.w0),
              "description": "streaming Gaussian least squares, x ~ N(0, diag(h)), y = x.w* + N(0, s^2); "
                             "val_loss is the exact expected loss"})
