"""Ghost batch norm with vectorised torch ops: the CPU path (and the fallback
on any device without Triton).

The input arrives as an (N, C, L) view (L = product of the spatial sizes, 1
for (N, C) input) of a tensor that is contiguous or channels-last. Full ghost
batches are viewed as (G, g, C, L) and reduced over dims (1, 3) in one op per
statistic, so there is no Python loop over ghost batches; a smaller last
batch is a second "segment" of the same ops (at most two segments).

Memory passes (a pass = one read of an N*C*L tensor):
  forward:  sum(x), sum(x^2) [vector_norm, no temporary], y = x*scale + shift
  backward: sum(dy), sum(dy*x) [one temporary], dx = a*dy + b*x + d [two ops]
nn.BatchNorm's CPU kernel makes about the same number of passes, which is why
this stays within a small factor of it (see bench/ghost_bn.py).

Statistics are accumulated in float32 (float64 for float64 input) as a sum and
a sum of squares. var = E[x^2] - E[x]^2 loses digits when |mean| >> std, so
groups where the one-pass variance is below ``_CANCELLATION * mean^2`` are
recomputed with the two-pass formula sum((x - mean)^2) (rare for activations;
it costs one extra pass only when it triggers).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

# One-pass variance keeps about -log10(eps32) - log10(mean^2/var) digits;
# below var = 1e-3 * mean^2 that is fewer than ~4, so recompute.
_CANCELLATION = 1e-3


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segments(n: int, g: int) -> List[Tuple[int, int, int, int]]:
    """(start, stop, number of groups, group size) for the full ghost batches
    and, when g does not divide n, the smaller last one."""
    full = n // g
    out = []
    if full:
        out.append((0, full * g, full, g))
    if n - full * g:
        out.append((full * g, n, 1, n - full * g))
    return out


def _grouped(t3: Tensor, seg: Tuple[int, int, int, int]) -> Tensor:
    start, stop, groups, size = seg
    return t3[start:stop].view(groups, size, t3.shape[1], t3.shape[2])


def forward(x3: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], g: int,
            eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """y (N, C, L) in x's dtype and layout; per-group mean, biased var and
    1/sqrt(var + eps), each (G, C) in the accumulation dtype."""
    n, c, l = x3.shape
    acc = _acc_dtype(x3.dtype)
    means, variances = [], []
    for seg in segments(n, g):
        xs = _grouped(x3, seg)
        count = seg[3] * l
        mean = xs.sum((1, 3), dtype=acc) / count
        if xs.dtype == acc:
            sumsq = torch.linalg.vector_norm(xs, dim=(1, 3)).square()
        else:  # bf16/fp16: upcast on the fly through a temporary
            sumsq = xs.to(acc).square().sum((1, 3))
        var = (sumsq / count - mean.square()).clamp_(min=0)
        if bool((var < _CANCELLATION * mean.square()).any()):
            var = (xs.to(acc) - mean[:, None, :, None]).square().sum((1, 3)) / count
        means.append(mean)
        variances.append(var)
    mean = torch.cat(means)
    var = torch.cat(variances)
    rstd = (var + eps).rsqrt()
    scale = rstd if weight is None else rstd * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    y3 = torch.empty_like(x3)
    g0 = 0
    for seg in segments(n, g):
        sl = slice(g0, g0 + seg[2])
        _axpb(_grouped(x3, seg), scale[sl, None, :, None], shift[sl, None, :, None], out=_grouped(y3, seg))
        g0 += seg[2]
    return y3, mean, var, rstd


def _axpb(x: Tensor, a: Tensor, b: Tensor, out: Tensor, dy: Optional[Tensor] = None,
          dy_scale: Optional[Tensor] = None) -> None:
    """out = a*x + b (+ dy_scale*dy), computed in a's dtype: in place for
    float32/64, through float32 temporaries for bf16/fp16 input, whose own
    precision would not survive the cancellation in a*x + b."""
    if x.dtype == a.dtype:
        torch.addcmul(b, x, a, out=out)
        if dy is not None:
            out.addcmul_(dy, dy_scale)
    else:
        t = torch.addcmul(b, x.to(a.dtype), a)
        if dy is not None:
            t.addcmul_(dy.to(a.dtype), dy_scale)
        out.copy_(t)


def backward(dy3: Tensor, x3: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, g: int,
             needs_input_grad: bool) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """dx (or None), and the per-group sums of dy and dy*xhat, (G, C) each
    (dweight and dbias are their sums over groups).

    Per group, with m values per channel and a = weight*rstd:
      dx = a * (dy - sum(dy)/m - xhat * sum(dy*xhat)/m)
         = a*dy + b*x + d,  b = -a*rstd*sum(dy*xhat)/m,  d = -a*sum(dy)/m - b*mean
    """
    n, c, l = dy3.shape
    acc = mean.dtype
    sum_dy, sum_dy_x = [], []
    for seg in segments(n, g):
        dys, xs = _grouped(dy3, seg), _grouped(x3, seg)
        sum_dy.append(dys.sum((1, 3), dtype=acc))
        prod = dys * xs if dys.dtype == acc else dys.to(acc) * xs.to(acc)
        sum_dy_x.append(prod.sum((1, 3)))
    sdy = torch.cat(sum_dy)
    # sum(dy * (x - mean)) = sum(dy*x) - mean*sum(dy): no cancellation worse
    # than |mean|/std, unlike the variance.
    sdy_xhat = (torch.cat(sum_dy_x) - mean * sdy) * rstd
    if not needs_input_grad:
        return None, sdy, sdy_xhat
    counts = torch.tensor([seg[3] * l for seg in segments(n, g) for _ in range(seg[2])], dtype=acc,
                          device=mean.device)[:, None]
    a = rstd if weight is None else rstd * weight.to(acc)
    b = -a * rstd * sdy_xhat / counts
    d = -a * sdy / counts - b * mean
    dx3 = torch.empty_like(x3)
    g0 = 0
    for seg in segments(n, g):
        sl = slice(g0, g0 + seg[2])
        _axpb(_grouped(x3, seg), b[sl, None, :, None], d[sl, None, :, None], out=_grouped(dx3, seg),
              dy=_grouped(dy3, seg), dy_scale=a[sl, None, :, None])
        g0 += seg[2]
    return dx3, sdy, sdy_xhat
