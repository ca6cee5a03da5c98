"""Reference kernels: plain PyTorch, computed in float64, the oracle.

Every backend implements the ops of fastsgd/kernels/contract.py with the
same signatures; the contract's rules, in short:
- ``params``/``grads``/state lists are aligned, tensors on one device, each
  grad with its param's shape and dtype, state tensors with the param's shape.
- ``lr`` is a float or a 0-dim tensor.
- Stacked trials (``sgd_step(..., stacked_trials=True)``, an explicit opt-in):
  ``lr`` and ``momentum`` may also be 1-D tensors of length T
  when every param has T as its first dimension (T independent models trained
  side by side, as the study harness does); row i of every param, grad and
  buffer then uses lr[i] and momentum[i]. Such hyperparameter tensors live on
  the CPU for the cpu backend and on the params' device for GPU backends.
  Without the flag a 1-element 1-D tensor is one value for all (as
  torch.optim takes ``lr=torch.tensor([0.1])``) and a longer one is an error.
- ``first_step[i]`` is True when ``bufs[i]`` is new: then b = g (or lr*g in
  the lr_in_momentum form) instead of b = mu*b + (1-tau)*g.
- ``grad_scale`` (0-dim tensor or None): gradients are divided by it.
  ``found_inf`` (0-dim tensor or None): when non-zero, nothing is modified.
- Gradients are never modified.
- ``stochastic_rounding`` (sgd/lars): GPU backends may round bfloat16
  momentum buffers stochastically (unbiased). The reference always rounds to
  nearest and ignores the flag: it is the expected value the stochastic
  result is tested against.

The reference is written for clarity, not speed: one tensor at a time, math in
float64 (complex128 for complex params), results rounded once into the
param/state dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastsgd.kernels.contract import FLOATS, Capabilities
from fastsgd.kernels.tensors import first_step_flags, trial_hparams  # noqa: F401  (the backends' shared reading)

Scalar = Union[float, Tensor]

NAME = "reference"
CAPABILITIES = Capabilities(
    NAME, "tensors on any device", FLOATS + (torch.complex64, torch.complex128), strided=True,
    stacked_trials=True, trust_clip_per_trial_lr=True)
STRIDED = CAPABILITIES.strided  # plain torch ops: any layout


def unavailable_reason() -> Optional[str]:
    return None  # plain PyTorch: always there


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in CAPABILITIES.dtypes


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _hp(x: Scalar, like: Tensor) -> Scalar:
    """A hyperparameter as float64; a 1-D per-trial tensor becomes (T, 1, ...)
    so that row i of ``like`` uses entry i."""
    if isinstance(x, Tensor):
        x = x.to(device=like.device, dtype=torch.float64)
        if x.ndim == 1:
            x = x.reshape((-1,) + (1,) * (like.ndim - 1))
        return x
    return float(x)


def _skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _unscaled(g: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    g64 = _wide(g)
    if grad_scale is not None:
        g64 = g64 / grad_scale.to(device=g.device, dtype=torch.float64)
    return g64


def _apply_momentum(p: Tensor, p64: Tensor, g64: Tensor, buf: Optional[Tensor], *,
                    lr, momentum, dampening, nesterov, lr_in_momentum, first) -> None:
    """PyTorch/TensorFlow momentum (lr outside the buffer) or the
    Sutskever/Goyal form (lr inside), then the parameter update."""
    lr = _hp(lr, p)
    mu = _hp(momentum, p)
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
                        nesterov=nesterov, lr_in_momentum=lr_in_momentum, first=firsts[i])


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
