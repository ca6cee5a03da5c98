"""Reference kernels: plain PyTorch, computed in float64, the oracle.

Every backend implements the ops of fastsgd/kernels/contract.py with the
same signatures, under the contract's rules (its module docstring). Here:

- stacked trials are ``sgd_step(..., stacked_trials=True)`` only: ``lr`` and
  ``momentum`` may then be 1-D tensors of length T (on any device; they are
  moved to the params'), every param's first dimension must be T, and row i
  of every param, grad and buffer uses lr[i] and momentum[i]. Without the
  flag, and in ``lars_step`` / ``lamb_step`` always, a hyperparameter tensor
  must hold one value (0-dim or 1-element) and one with several raises a
  ValueError (fastsgd.kernels.tensors), whatever the params' shapes;
- ``stochastic_rounding`` is accepted and ignored: the reference rounds
  bfloat16 buffers to nearest, the expected value the GPU backends'
  stochastic result is tested against.

The reference is written for clarity, not speed: one tensor at a time, math in
float64 (complex128 for complex params), results rounded once into the
param/state dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastsgd.kernels.contract import FLOATS, Capabilities
from fastsgd.kernels.tensors import first_step_flags, single_hparams, trial_hparams

Scalar = Union[float, Tensor]

NAME = "reference"
CAPABILITIES = Capabilities(
    NAME, "tensors on any device", FLOATS + (torch.complex64, torch.complex128), strided=True,
    stacked_trials=True)
STRIDED = CAPABILITIES.strided  # plain torch ops: any layout


def unavailable_reason() -> Optional[str]:
    return None  # plain PyTorch: always there


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in CAPABILITIES.dtypes


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _hp(x: Scalar, like: Tensor, stacked: bool = False) -> Scalar:
    """A hyperparameter as float64. With ``stacked`` (sgd_step's stacked_trials=True) a 1-D tensor holds
    one value per trial and becomes (T, 1, ...), so that row i of ``like`` uses entry i; otherwise the
    callers have made every tensor 0-dim (fastsgd.kernels.tensors), so no shape is read as stacking."""
    if isinstance(x, Tensor):
        x = x.to(device=like.device, dtype=torch.float64)
        if stacked and x.ndim == 1:
            x = x.reshape((-1,) + (1,) * (like.ndim - 1))
        return x
    return float(x)


def _check_stacked(params: Sequence[Tensor], *hps: Scalar) -> None:
    """Every param has the trial count of the 1-D hyperparameters as its first dimension."""
    counts = {x.numel() for x in hps if isinstance(x, Tensor) and x.ndim == 1}
    if len(counts) > 1:
        raise ValueError(f"sgd_step: per-trial hyperparameters have different lengths {sorted(counts)}")
    for x in hps:
        if isinstance(x, Tensor) and x.ndim > 1:
            raise ValueError(f"sgd_step: a hyperparameter has shape {tuple(x.shape)}; stacked trials take 1-D "
                             "tensors (one value per trial), 0-dim tensors or floats")
    if counts:
        (trials,) = counts
        for i, p in enumerate(params):
            if p.ndim == 0 or p.shape[0] != trials:
                raise ValueError(f"sgd_step: lr/momentum hold {trials} values (stacked trials), so every param "
                                 f"needs {trials} as its first dimension; params[{i}] has shape {tuple(p.shape)}")


def _skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _unscaled(g: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    g64 = _wide(g)
    if grad_scale is not None:
        g64 = g64 / grad_scale.to(device=g.device, dtype=torch.float64)
    return g64


def _apply_momentum(p: Tensor, p64: Tensor, g64: Tensor, buf: Optional[Tensor], *,
                    lr, momentum, dampening, nesterov, lr_in_momentum, first, stacked: bool = False) -> None:
    """PyTorch/TensorFlow momentum (lr outside the buffer) or the
    Sutskever/Goyal form (lr inside), then the parameter update."""
    lr = _hp(lr, p, stacked)
    mu = _hp(momentum, p, stacked)
    has_momentum = buf is not None
    if not has_momentum:
        p.copy_(p64 - lr * g64)
        return
    # In the lr_in_momentum form the buffer holds v = lr * b.
    step_in = lr * g64 if lr_in_momentum else g64
    if first:
        b64 = step_in
    else:
        b64 = mu * _wide(buf) + (1.0 - dampening) * step_in
    buf.copy_(b64)
    d = step_in + mu * b64 if nesterov else b64
    p.copy_(p64 - d if lr_in_momentum else p64 - lr * d)


@torch.no_grad()
def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
             lr: Scalar, momentum: Scalar = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, maximize: bool = False, lr_in_momentum: bool = False,
             first_step: Union[bool, Sequence[bool]] = False,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, stacked_trials: bool = False) -> None:
    """torch.optim.SGD's update (plain, momentum, Nesterov, dampening, weight
    decay, maximize), optionally in the lr-inside-momentum form."""
    lr, momentum = trial_hparams("sgd_step", stacked_trials, lr=lr, momentum=momentum)
    if stacked_trials:
        _check_stacked(params, lr, momentum)
    if _skipped(found_inf):
        return
    firsts = first_step_flags("sgd_step", first_step, len(params))
    for i, (p, g) in enumerate(zip(params, grads)):
        g64 = _unscaled(g, grad_scale)
        if maximize:
            g64 = -g64
        p64 = _wide(p)
        if weight_decay != 0:
            g64 = g64 + _hp(weight_decay, p) * p64
        buf = bufs[i] if bufs is not None else None
        _apply_momentum(p, p64, g64, buf, lr=lr, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, lr_in_momentum=lr_in_momentum, first=firsts[i],
                        stacked=stacked_trials)


def lars_trust_ratio(w_norm: Tensor, g_norm: Tensor, *, lr, weight_decay, trust_coeff, eps,
                     trust_clip) -> Tensor:
    """timm Lars: r = tc*|w| / (|g| + wd*|w| + eps), 1 when either norm is 0,
    with trust_clip min(r / lr, 1)."""
    r = trust_coeff * w_norm / (g_norm + weight_decay * w_norm + eps)
    one = torch.ones_like(r)
    r = torch.where((w_norm > 0) & (g_norm > 0), r, one)
    if trust_clip:
        r = torch.minimum(r / _hp(lr, r), one)
    return r


@torch.no_grad()
def lars_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
              lr: Scalar, momentum: Scalar = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
              trust_clip: bool = False, always_adapt: bool = False, lr_in_momentum: bool = False,
              first_step: Union[bool, Sequence[bool]] = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              stochastic_rounding: bool = False) -> None:
    """timm's Lars rule: if weight_decay != 0 or always_adapt, the gradient
    becomes (g + wd*p) * trust_ratio; then SGD momentum with lr outside."""
    lr, momentum = single_hparams("lars_step", lr=lr, momentum=momentum)
    if _skipped(found_inf):
        return
    firsts = first_step_flags("lars_step", first_step, len(params))
    for i, (p, g) in enumerate(zip(params, grads)):
        g64 = _unscaled(g, grad_scale)
        p64 = _wide(p)
        if weight_decay != 0 or always_adapt:
            r = lars_trust_ratio(torch.linalg.vector_norm(p64), torch.linalg.vector_norm(g64), lr=lr,
                                 weight_decay=weight_decay, trust_coeff=trust_coeff, eps=eps,
                                 trust_clip=trust_clip)
            g64 = (g64 + weight_decay * p64) * r
        buf = bufs[i] if bufs is not None else None
        _apply_momentum(p, p64, g64, buf, lr=lr, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, lr_in_momentum=lr_in_momentum, first=firsts[i])


@torch.no_grad()
def lamb_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
              lr: Scalar, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
              weight_decay: float = 0.01, bias_correction: bool = True, trust_clip: bool = False,
              always_adapt: bool = False, clip_divisor: Optional[Scalar] = None,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """LAMB (You et al. 2019) as timm's Lamb computes it:
    m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g^2,
    u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps) + wd*p,
    r = |p|/|u| (1 when either is 0; min(r, 1) with trust_clip) when
    wd != 0 or always_adapt, else 1;  p -= lr * r * u.
    ``clip_divisor`` (>= 1) divides the gradient first (global-norm clipping).
    ``steps[i]`` (0-dim tensor) is incremented here.
    """
    lr, clip_divisor = single_hparams("lamb_step", lr=lr, clip_divisor=clip_divisor)
    if _skipped(found_inf):
        return
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g64 = _unscaled(g, grad_scale)
        if clip_divisor is not None:
            g64 = g64 / _hp(clip_divisor, p)
        p64 = _wide(p)
        t = float(step.item()) + 1.0
        step.fill_(t)
        m64 = beta1 * _wide(m) + (1.0 - beta1) * g64
        v64 = beta2 * _wide(v) + (1.0 - beta2) * g64 * g64
        m.copy_(m64)
        v.copy_(v64)
        bc1 = 1.0 - beta1 ** t if bias_correction else 1.0
        bc2 = 1.0 - beta2 ** t if bias_correction else 1.0
        u = (m64 / bc1) / (torch.sqrt(v64) / bc2 ** 0.5 + eps)
        if weight_decay != 0:
            u = u + weight_decay * p64
        if weight_decay != 0 or always_adapt:
            w_norm = torch.linalg.vector_norm(p64)
            u_norm = torch.linalg.vector_norm(u)
            r = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            if trust_clip:
                r = torch.clamp(r, max=1.0)
            u = u * r
        p.copy_(p64 - _hp(lr, p) * u)
