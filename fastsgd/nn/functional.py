r"""Functional ghost batch norm: argument checks, backend choice, the autograd
Function shared by the backends, and the running-statistics update.

Semantics (Hoffer et al. 2017, "Train longer, generalize better")
-----------------------------------------------------------------
Input x of shape (N, C, *), ghost batch size g. In training:

* ghost batch k holds samples [k*g, min((k+1)*g, N)), k = 0 .. K-1,
  K = ceil(N / g); when g does not divide N the last one is smaller
  (r = N - (K-1)*g samples). No strided or shuffled grouping.
* each ghost batch is normalised with its own per-channel statistics over its
  samples and all spatial positions (m_k = |batch k| * prod(*) values):

      mu_kc     = 1/m_k * sum_i x_ic
      sigma2_kc = 1/m_k * sum_i (x_ic - mu_kc)^2          (biased)
      y_ic      = (x_ic - mu_kc) / sqrt(sigma2_kc + eps) * weight_c + bias_c

* a ghost batch with m_k == 1 raises ValueError("Expected more than 1 value
  per channel when training, ..."), as nn.BatchNorm does for a batch of one
  value per channel (never NaN).
* running statistics, updated once per call with factor f (momentum):

      running_mean <- (1 - f) * running_mean + f * 1/K * sum_k mu_kc
      running_var  <- (1 - f) * running_var  + f * 1/K * sum_k sigma2_kc * m_k/(m_k - 1)

  i.e. the plain (unweighted) mean over ghost batches of the per-batch mean
  and unbiased variance. A smaller last batch counts as much as a full one:
  each ghost batch is one draw of the ghost-batch statistics the running
  averages estimate (weighting by m_k would differ only for that last batch).
* K == 1 (g >= N) is exactly nn.BatchNorm's training step.
* an empty batch (N == 0) returns an empty output and updates nothing.

Outside training there is no grouping: ``training=False`` is plain
``F.batch_norm`` with the running statistics. (The modules, like
nn.BatchNorm, normalise an eval-mode batch with its own whole-batch
statistics when they track no running statistics.)

Precision: statistics are float32 (float64 for float64 input on the torch
path; the Triton kernels take float32/bf16/fp16), outputs and input
gradients are in the input dtype, weight/bias gradients in theirs.

Backends (``backend=``): "torch" (vectorised torch ops, any device; the CPU
path) and "triton" (fused kernels, CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1). "auto" takes triton for CUDA tensors when it imports,
else torch, and hands the K == 1 case to ``F.batch_norm`` (cuDNN on GPU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsgd.backends import GHOST_BN_BACKENDS, BackendUnavailable, get_backend
from fastsgd.nn import ghost_bn_torch

BACKENDS = ("auto",) + GHOST_BN_BACKENDS


def _pick_backend(backend: str, x: Tensor):
    """The ghost-BN module for ``x`` from the backend registry (family
    "ghost_bn"); a named backend that cannot run raises RuntimeError with why."""
    try:
        return get_backend(backend, x.device, (x.dtype,), family="ghost_bn")
    except (BackendUnavailable, TypeError) as exc:
        raise RuntimeError(f"ghost batch norm backend {backend!r} cannot run here: {exc}") from exc


def as_ncl(x: Tensor) -> Tensor:
    """x as an (N, C, L) view, copying only when x is neither contiguous nor
    channels-last (the backends need dense rows along L or along C)."""
    n, c = x.shape[0], x.shape[1]
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
            or x.is_contiguous(memory_format=torch.channels_last_3d)):
        x = x.contiguous()
    return x.view(n, c, -1)


class GhostBatchNormFunction(torch.autograd.Function):
    """y = ghost_bn(x3); also returns the per-group mean and biased variance
    (G, C) for the running statistics (not differentiable).

    Every backend module provides
      forward(x3, weight, bias, g, eps) -> (y3, mean, var)
      backward(dy3, x3, weight, mean, var, g, eps, needs_dx) -> (dx3 | None, sum_dy, sum_dy_xhat)
    with x3 an (N, C, L) view, statistics (G, C) in float32 (float64 input: float64).
    """

    @staticmethod
    def forward(ctx, x3: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], g: int, eps: float, impl):
        y3, mean, var = impl.forward(x3, weight, bias, g, eps)
        if y3._is_view():
            # Autograd forbids in-place ops (nn.ReLU(inplace=True)) on views made
            # inside a custom Function; a backend may return a view of a fresh
            # buffer, and detach() makes it a plain tensor without copying.
            y3 = y3.detach()
        ctx.save_for_backward(x3, weight, mean, var)
        ctx.g, ctx.eps, ctx.impl = g, eps, impl
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y3, mean, var

    @staticmethod
    def backward(ctx, dy3: Tensor, _dmean, _dvar):
        x3, weight, mean, var = ctx.saved_tensors
        if dy3.stride() != x3.stride():
            dy3 = torch.empty_like(x3).copy_(dy3)  # same dense layout as x
        dx3, sum_dy, sum_dy_xhat = ctx.impl.backward(dy3, x3, weight, mean, var, ctx.g, ctx.eps,
                                                     ctx.needs_input_grad[0])
        param_dtype = x3.dtype if weight is None else weight.dtype
        dweight = sum_dy_xhat.sum(0).to(param_dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.sum(0).to(param_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx3, dweight, dbias, None, None, None


def check_ghost_batch_size(ghost_batch_size) -> int:
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
        raise ValueError(f"Invalid ghost_batch_size: {ghost_batch_size!r} (expected an int >= 1)")
    return ghost_batch_size


def _check_one_value_batches(x: Tensor, g: int) -> None:
    n = x.shape[0]
    spatial = math.prod(x.shape[2:])
    smallest = min(g, n - (math.ceil(n / g) - 1) * g)
    if smallest * spatial == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()} "
                         f"with ghost_batch_size={g}: a ghost batch of {smallest} sample(s) has one value "
                         f"per channel")


def _check_channels(x: Tensor, **named: Optional[Tensor]) -> None:
    c = x.shape[1]
    for name, t in named.items():
        if t is not None and t.shape != (c,):
            raise RuntimeError(f"{name} should contain {c} elements (input channels) not {t.numel()} "
                               f"(input size {tuple(x.shape)})")


def ghost_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                     momentum: float = 0.1, eps: float = 1e-5, ghost_batch_size: int = 32, *,
                     backend: str = "auto") -> Tensor:
    """Ghost batch norm, arguments as ``torch.nn.functional.batch_norm`` plus
    ``ghost_batch_size``; see the module docstring for the semantics.
    ``momentum`` is the update factor f (the modules turn momentum=None into
    the cumulative factor 1/num_batches_tracked, as nn.BatchNorm does)."""
    g = check_ghost_batch_size(ghost_batch_size)
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {', '.join(BACKENDS)}")
    if input.dim() < 2:
        raise ValueError(f"expected input with at least 2 dims (N, C, ...), got {input.dim()}D input")
    _check_channels(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    n = input.shape[0]
    if n == 0 or input.numel() == 0:  # nothing to normalise, no statistics to learn from
        return F.batch_norm(input, None, None, weight, bias, True, momentum, eps)
    if backend == "auto" and g >= n:
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
    _check_one_value_batches(input, g)
    if torch._C._functorch.is_functorch_wrapped_tensor(input):
        # Under torch.func transforms (vmap over stacked trials) the fused Function and its layout
        # queries do not run; the reference's per-group F.batch_norm calls do, with the same semantics.
        from fastsgd.nn.ghost_bn_reference import ghost_batch_norm_reference
        return ghost_batch_norm_reference(input, running_mean, running_var, weight, bias, True, momentum, eps, g)
    impl = _pick_backend(backend, input)
    x3 = as_ncl(input)
    y3, mean, var = GhostBatchNormFunction.apply(x3, weight, bias, g, eps, impl)
    if running_mean is not None and running_var is not None:
        _update_running_stats(running_mean, running_var, mean, var, n, g, x3.shape[2], momentum)
    return y3.view(input.shape)


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, n: int,
                          g: int, spatial: int, momentum: float) -> None:
    with torch.no_grad():
        counts = ghost_bn_torch.group_counts(n, g, spatial, var.dtype, var.device)
        new_mean = mean.mean(0)
        new_var = (var * counts / (counts - 1)).mean(0)
        running_mean.copy_(momentum * new_mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * new_var + (1 - momentum) * running_var)
