"""Ghost batch norm with vectorised torch ops: the CPU path (and the fallback
on any device without Triton).

The input arrives as an (N, C, L) view (L = product of the spatial sizes, 1
for (N, C) input) whose rows are dense either along L ("rows" layout: NCHW)
or along C ("channels" layout: channels_last, and every (N, C) input).
There is no Python loop over ghost batches: every pass reduces or rewrites the
whole tensor with per-(sample, channel) coefficients, and ghost batches only
appear in the tiny (N, C) -> (G, C) sums and the (G, C) -> (N, C) tiling.

The "rows" layout borrows nn.BatchNorm's own CPU kernels by viewing x as
(1, N*C, L), one "channel" per (sample, channel) row: eval-mode batch_norm is
the fused normalise + affine (per-row mean, var, weight, bias), and eval-mode
native_batch_norm_backward returns per-row sum(dy) and sum(dy * xhat) in one
pass. The "channels" layout uses plain broadcasting ops.

Passes over an N*C*L tensor:
  forward:  sum(x), sum(x^2), y = (x - mean)*rstd*w + b
  backward: sum(dy), sum(dy*xhat), dx = a*dy + xhat*b' + d'
In the rows layout each is one fused kernel, about what nn.BatchNorm's CPU
kernel does. The channels layout has no fused product-sum or three-term update
in torch: x^2 and dy*x are written to the output buffer and summed, and dx takes
two passes, so it costs more than nn.BatchNorm2d, most at small H*W, where the
per-(sample, channel) bookkeeping weighs most. Both against nn.BatchNorm2d:
bench/ghost_bn.py, results in bench/results/ghost_bn_cpu.json (column x_bn).

Statistics are accumulated in float32 (float64 for float64 input) as a sum and
a sum of squares. var = E[x^2] - E[x]^2 loses digits when |mean| >> std, so
when any group's one-pass variance is below ``_CANCELLATION * mean^2`` the
variance is recomputed with the two-pass formula sum((x - mean)^2): one more
pass, only when it triggers (rare for activations).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsgd.kernels.contract import Capabilities

# The one-pass variance keeps about 7 - log10(mean^2/var) digits in float32;
# below var = 1e-3 * mean^2 that is fewer than 4, so recompute.
_CANCELLATION = 1e-3


NAME = "torch"
CAPABILITIES = Capabilities(NAME, "tensors on any device", (torch.float32, torch.float64, torch.bfloat16,
                                                            torch.float16), strided=True)


def unavailable_reason() -> Optional[str]:
    return None  # plain PyTorch: always there


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in CAPABILITIES.dtypes


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_layout(x3: Tensor) -> bool:
    """True for NCHW-like (N, C, L) views with L > 1 contiguous."""
    return x3.shape[2] > 1 and x3.stride(2) == 1


def group_sum(per_sample: Tensor, g: int) -> Tensor:
    """(N, ...) -> (G, ...): sums over ghost batches [k*g, (k+1)*g)."""
    n = per_sample.shape[0]
    full = n // g * g
    parts = [per_sample[:full].view(n // g, g, *per_sample.shape[1:]).sum(1)]
    if full < n:
        parts.append(per_sample[full:].sum(0, keepdim=True))
    return torch.cat(parts)


def group_counts(n: int, g: int, spatial: int, dtype: torch.dtype, device) -> Tensor:
    """(G, 1): values per channel in each ghost batch."""
    sizes = torch.full(((n + g - 1) // g,), g, dtype=dtype, device=device)
    sizes[-1] = n - (sizes.shape[0] - 1) * g
    return (sizes * spatial)[:, None]


def _per_sample(t: Tensor, n: int, g: int) -> Tensor:
    """(G, C) -> (N, C): each sample gets its ghost batch's row."""
    return t[:, None].expand(t.shape[0], g, *t.shape[1:]).reshape(-1, *t.shape[1:])[:n]


def _sum_over_l(t3: Tensor, acc: torch.dtype, square: bool = False, other: Optional[Tensor] = None,
                scratch: Optional[Tensor] = None) -> Tensor:
    """(N, C): sum over L of t3, of t3^2 (square) or of t3*other, in dtype
    acc. Products are written to ``scratch`` (an output buffer about to be
    overwritten) when given: on CPU a fresh N*C*L temporary costs a
    page-faulting allocation as slow as the pass itself."""
    if not square and other is None:
        return t3.sum(2, dtype=acc)
    if square and _rows_layout(t3) and t3.dtype == acc:  # inner reduction: a norm needs no temporary
        return torch.linalg.vector_norm(t3, dim=2).square()
    other = t3 if square else other
    if t3.dtype != acc:  # bf16/fp16: products in float32
        return (t3.to(acc) * other.to(acc)).sum(2)
    return torch.mul(t3, other, out=scratch).sum(2) if scratch is not None else (t3 * other).sum(2)


def forward(x3: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], g: int,
            eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """y (N, C, L) in x's dtype and layout, per-group mean and biased variance
    (G, C) in the accumulation dtype."""
    n, c, l = x3.shape
    acc = _acc_dtype(x3.dtype)
    counts = group_counts(n, g, l, acc, x3.device)
    y3 = None if _rows_layout(x3) else torch.empty_like(x3)
    mean = group_sum(_sum_over_l(x3, acc), g) / counts
    var = (group_sum(_sum_over_l(x3, acc, square=True, scratch=y3), g) / counts - mean.square()).clamp_(min=0)
    if bool((var < _CANCELLATION * mean.square()).any()):
        centred = x3.to(acc) - _per_sample(mean, n, g)[:, :, None]
        var = group_sum(centred.square().sum(2), g) / counts
    return _normalize(x3, mean, var, weight, bias, eps, g, out=y3), mean, var


def _normalize(x3: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, g: int, out: Optional[Tensor] = None, dy3: Optional[Tensor] = None,
               dy_scale: Optional[Tensor] = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias (+ dy_scale * dy) with
    per-group (G, C) mean, var, dy_scale and (C,) or (G, C) weight and bias;
    result in x's dtype and layout (in ``out`` when given, channels layout),
    float32 arithmetic for bf16/fp16 input."""
    n, c, l = x3.shape
    acc = mean.dtype

    def per_sample(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.to(acc)
        return t.expand(n, c) if t.dim() == 1 else _per_sample(t, n, g)

    if _rows_layout(x3):
        def rows(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else per_sample(t).reshape(n * c)
        result = F.batch_norm(x3.reshape(1, n * c, l), rows(mean), rows(var), rows(weight), rows(bias),
                              False, 0.0, eps).view(n, c, l)
        if dy3 is not None:
            result.addcmul_(dy3, per_sample(dy_scale)[:, :, None].to(result.dtype))
        return result
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    scale, shift = per_sample(scale)[:, :, None], per_sample(shift)[:, :, None]
    out = torch.empty_like(x3) if out is None else out
    if x3.dtype == acc:
        torch.addcmul(shift, x3, scale, out=out)
        if dy3 is not None:
            out.addcmul_(dy3, per_sample(dy_scale)[:, :, None])
    else:  # bf16/fp16: a*x + b cancels, so compute it in float32
        t = torch.addcmul(shift, x3.to(acc), scale)
        if dy3 is not None:
            t.addcmul_(dy3.to(acc), per_sample(dy_scale)[:, :, None])
        out.copy_(t)
    return out


def backward(dy3: Tensor, x3: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor, g: int, eps: float,
             needs_input_grad: bool) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """dx (or None, when not needed), and the per-group sums of dy and
    dy*xhat, (G, C) each (dweight and dbias are their sums over groups).

    Per ghost batch, with m values per channel and a = weight*rstd:
      dx = a * (dy - sum(dy)/m - xhat * sum(dy*xhat)/m)
    computed as one normalisation of x (weight -a*sum(dy*xhat)/m, bias
    -a*sum(dy)/m) plus a*dy.
    """
    n, c, l = x3.shape
    acc = mean.dtype
    rstd = (var + eps).rsqrt()
    dx3 = None
    if _rows_layout(x3):
        _, dw_rows, db_rows = torch.ops.aten.native_batch_norm_backward(
            dy3.reshape(1, n * c, l), x3.reshape(1, n * c, l), None, _per_sample(mean, n, g).reshape(n * c),
            _per_sample(var, n, g).reshape(n * c), None, None, False, eps, [False, True, True])
        sum_dy_xhat = group_sum(dw_rows.view(n, c), g)
        sum_dy = group_sum(db_rows.view(n, c), g)
    else:
        dx3 = torch.empty_like(x3) if needs_input_grad else None  # scratch for dy*x first
        sum_dy = group_sum(_sum_over_l(dy3, acc), g)
        # sum(dy*(x - mean)) = sum(dy*x) - mean*sum(dy): the error grows like
        # |mean|/std only, not its square as in the variance.
        sum_dy_xhat = (group_sum(_sum_over_l(dy3, acc, other=x3, scratch=dx3), g) - mean * sum_dy) * rstd
    if not needs_input_grad:
        return None, sum_dy, sum_dy_xhat
    counts = group_counts(n, g, l, acc, x3.device)
    a = rstd if weight is None else rstd * weight.to(acc)
    dx3 = _normalize(x3, mean, var, -a * sum_dy_xhat / counts, -a * sum_dy / counts, eps, g, out=dx3, dy3=dy3,
                     dy_scale=a)
    return dx3, sum_dy, sum_dy_xhat
