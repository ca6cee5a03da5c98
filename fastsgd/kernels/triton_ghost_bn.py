"""Ghost batch norm in Triton: two kernels, each used by forward and backward
(the ``BACKWARD`` constexpr picks what is accumulated and written).

The input is an (N, C, L) view (see fastsgd.nn.functional.as_ncl). A ghost
batch k is samples [k*g, min((k+1)*g, N)). Both kernels run on the grid
((ghost batch k, chunk s), channel block) and walk the chunk's rows of batch k:

  _partial_sums_kernel   forward:  sum(x - K) and sum((x - K)^2) per (k, s, c),
                                   K = x[k*g, c, 0] (a shift: the one-pass
                                   variance then loses digits only when the
                                   spread is tiny next to |mean - K|, not |mean|)
                         backward: sum(dy) and sum(dy * (x - mean)) per (k, s, c)
  _apply_kernel          adds up the S chunk partials of its (k, c) and writes
                         forward:  y = (x - mean) * rstd * w + b  (+ mean, var)
                         backward: dx = w*rstd*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m)
                                   (+ sum(dy), sum(dy*xhat) for dweight/dbias)

Chunks split a ghost batch over many programs, so a few large ghost batches
still fill the GPU. Two memory layouts, one kernel: a tile is
[BLOCK_R rows, BLOCK_C channels, BLOCK_I inner] with
  NCHW ("planes"): a row is one sample's L-long plane of one channel:
                   BLOCK_C = 1, inner = L contiguous values;
  channels_last or (N, C): a row is one (sample, position) with C contiguous
                   channels: BLOCK_I = 1, L rows per sample.
Bytes moved: forward reads x twice and writes y; backward reads x and dy
twice and writes dx; (G, S, C) float32 partials are small next to that.
Statistics and arithmetic are float32 for float32/bf16/fp16 input; outputs
are in the input's dtype.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsgd.kernels.contract import Capabilities

NAME = "triton"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CAPABILITIES = Capabilities(NAME, "CUDA tensors (CPU tensors under TRITON_INTERPRET=1)", DTYPES, strided=True,
                            device_scalars=True)
_TILE = 2048                 # values per tile
_MAX_INNER = 1024            # widest tile along a plane (NCHW); longer planes loop
_VALUES_PER_PROGRAM = 32768  # target work per program; sets the chunk count


def unavailable_reason() -> Optional[str]:
    """None: imported means usable (``supports`` says for which tensors)."""
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors, or CPU tensors when the kernels run in the interpreter."""
    device = torch.device(device)
    on_device = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and dtype in DTYPES


@triton.jit
def _tile(base, r0, c0, i0, row_end, C, inner, row_stride, stride_c, inner_stride,
          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets and mask of the [BLOCK_R, BLOCK_C, BLOCK_I] tile at (r0, c0, i0)."""
    r = r0 + tl.arange(0, BLOCK_R)[:, None, None]
    c = c0 + tl.arange(0, BLOCK_C)[None, :, None]
    i = i0 + tl.arange(0, BLOCK_I)[None, None, :]
    offs = base + r.to(tl.int64) * row_stride + c.to(tl.int64) * stride_c + i.to(tl.int64) * inner_stride
    mask = (r < row_end) & (c < C) & (i < inner)
    return offs, mask


@triton.jit
def _group_rows(k, s, N, g, rows_per_sample, CHUNK_R: tl.constexpr):
    """First and one-past-last row of chunk s of ghost batch k, and m (values per channel)."""
    size = tl.minimum(g, N - k * g)
    rows = size * rows_per_sample
    row_start = s * CHUNK_R
    row_end = tl.minimum(row_start + CHUNK_R, rows)
    return row_start, row_end, size


@triton.jit
def _partial_sums_kernel(
    X, DY,                    # (N, C, L) input, and upstream gradient (backward only)
    MEAN,                     # (G, C) float32 per-group mean (backward only)
    P1, P2,                   # (G, S, C) float32 partial sums
    N, C, g, inner, rows_per_sample,
    stride_n, stride_c, row_stride, inner_stride,
    BACKWARD: tl.constexpr, S: tl.constexpr, CHUNK_R: tl.constexpr, INNER_ITERS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    k = tl.program_id(0) // S
    s = tl.program_id(0) % S
    c0 = tl.program_id(1) * BLOCK_C
    cs = c0 + tl.arange(0, BLOCK_C)
    cmask = cs < C
    base = k.to(tl.int64) * g * stride_n
    row_start, row_end, _ = _group_rows(k, s, N, g, rows_per_sample, CHUNK_R)
    if BACKWARD:
        centre = tl.load(MEAN + k * C + cs, mask=cmask, other=0.0)
    else:
        centre = tl.load(X + base + cs.to(tl.int64) * stride_c, mask=cmask, other=0.0).to(tl.float32)
    centre = centre[None, :, None]
    acc1 = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_I], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_I], dtype=tl.float32)
    # A constant trip count (masked past row_end): the last, smaller ghost
    # batch only idles some programs, and loop bounds stay compile-time.
    for it in range(CHUNK_R // BLOCK_R):
        r0 = row_start + it * BLOCK_R
        for ii in range(INNER_ITERS):
            i0 = ii * BLOCK_I
            offs, mask = _tile(base, r0, c0, i0, row_end, C, inner, row_stride, stride_c, inner_stride,
                               BLOCK_R, BLOCK_C, BLOCK_I)
            xc = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - centre, 0.0)
            if BACKWARD:
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                acc1 += dy
                acc2 += dy * xc
            else:
                acc1 += xc
                acc2 += xc * xc
    out = (k * S + s) * C + cs
    tl.store(P1 + out, tl.sum(tl.sum(acc1, axis=2), axis=0), mask=cmask)
    tl.store(P2 + out, tl.sum(tl.sum(acc2, axis=2), axis=0), mask=cmask)


@triton.jit
def _apply_kernel(
    X, DY, OUT,               # (N, C, L) input, upstream gradient (backward), y or dx
    W, B,                     # (C,) weight and bias (optional)
    MEAN, VAR,                # (G, C) float32: written by forward, read by backward
    P1, P2,                   # (G, S, C) float32 partial sums from _partial_sums_kernel
    SUM1, SUM2,               # (G, C) float32: backward writes sum(dy), sum(dy*xhat)
    N, C, g, inner, rows_per_sample, eps,
    stride_n, stride_c, row_stride, inner_stride,
    BACKWARD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    S: tl.constexpr, CHUNK_R: tl.constexpr, INNER_ITERS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    k = tl.program_id(0) // S
    s = tl.program_id(0) % S
    c0 = tl.program_id(1) * BLOCK_C
    cs = c0 + tl.arange(0, BLOCK_C)
    cmask = cs < C
    base = k.to(tl.int64) * g * stride_n
    row_start, row_end, size = _group_rows(k, s, N, g, rows_per_sample, CHUNK_R)
    m = (size * rows_per_sample * inner).to(tl.float32)
    sum1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(S):
        sum1 += tl.load(P1 + (k * S + j) * C + cs, mask=cmask, other=0.0)
        sum2 += tl.load(P2 + (k * S + j) * C + cs, mask=cmask, other=0.0)
    if BACKWARD:
        mean = tl.load(MEAN + k * C + cs, mask=cmask, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.load(VAR + k * C + cs, mask=cmask, other=1.0) + eps)
        sum_dy_xhat = sum2 * rstd
        if s == 0:
            tl.store(SUM1 + k * C + cs, sum1, mask=cmask)
            tl.store(SUM2 + k * C + cs, sum_dy_xhat, mask=cmask)
        c_dy = sum1 / m
        c_xhat = sum_dy_xhat / m
    else:
        shift = tl.load(X + base + cs.to(tl.int64) * stride_c, mask=cmask, other=0.0).to(tl.float32)
        d = sum1 / m
        mean = shift + d
        var = tl.maximum(sum2 / m - d * d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        if s == 0:
            tl.store(MEAN + k * C + cs, mean, mask=cmask)
            tl.store(VAR + k * C + cs, var, mask=cmask)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(W + cs, mask=cmask, other=1.0).to(tl.float32)
    if HAS_BIAS and not BACKWARD:
        bias = tl.load(B + cs, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
    mean = mean[None, :, None]
    rstd = rstd[None, :, None]
    scale = scale[None, :, None]
    # A constant trip count (masked past row_end): the last, smaller ghost
    # batch only idles some programs, and loop bounds stay compile-time.
    for it in range(CHUNK_R // BLOCK_R):
        r0 = row_start + it * BLOCK_R
        for ii in range(INNER_ITERS):
            i0 = ii * BLOCK_I
            offs, mask = _tile(base, r0, c0, i0, row_end, C, inner, row_stride, stride_c, inner_stride,
                               BLOCK_R, BLOCK_C, BLOCK_I)
            xc = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean
            if BACKWARD:
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                out = scale * (dy - c_dy[None, :, None] - xc * rstd * c_xhat[None, :, None])
            else:
                out = xc * scale
                if HAS_BIAS:
                    out += bias
            tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _launch_config(x3: Tensor, g: int) -> dict:
    """Layout, tile and chunking for x3 (N, C, L); see the module docstring."""
    n, c, l = x3.shape
    planes = l > 1 and x3.stride(2) == 1
    if planes:
        block_c, block_i = 1, min(triton.next_power_of_2(l), _MAX_INNER)
        rows_per_sample, row_stride, inner, inner_stride = 1, x3.stride(0), l, 1
    else:
        # channels contiguous; rows (sample, position) are evenly spaced when
        # x is channels-last (stride_n = L * stride_l) or L == 1.
        block_c, block_i = min(triton.next_power_of_2(c), 64), 1
        rows_per_sample, row_stride, inner, inner_stride = l, (x3.stride(2) if l > 1 else x3.stride(0)), 1, 1
    rows_per_group = g * rows_per_sample
    block_r = max(1, min(triton.next_power_of_2(rows_per_group), _TILE // (block_c * block_i)))
    values_per_row = block_c * inner
    iters = max(1, min(_VALUES_PER_PROGRAM // (block_r * values_per_row), triton.cdiv(rows_per_group, block_r)))
    chunk_r = block_r * iters
    return dict(planes=planes, block_c=block_c, block_i=block_i, block_r=block_r, chunk_r=chunk_r,
                chunks=triton.cdiv(rows_per_group, chunk_r), rows_per_sample=rows_per_sample,
                row_stride=row_stride, inner=inner, inner_stride=inner_stride)


def _check_layout(x3: Tensor) -> None:
    n, c, l = x3.shape
    if l > 1 and x3.stride(2) != 1 and not (x3.stride(1) == 1 and x3.stride(0) == l * x3.stride(2)):
        raise ValueError(f"triton ghost batch norm needs an NCHW-contiguous or channels-last input, got an "
                         f"(N, C, L) view with strides {x3.stride()}")


def _grid_and_args(x3: Tensor, g: int):
    cfg = _launch_config(x3, g)
    n, c, _ = x3.shape
    groups = triton.cdiv(n, g)
    # (ghost batch, chunk) share grid axis 0, which may exceed 65535 (axes 1, 2 may not).
    grid = (groups * cfg["chunks"], triton.cdiv(c, cfg["block_c"]))
    sizes = (n, c, g, cfg["inner"], cfg["rows_per_sample"])
    strides = (x3.stride(0), x3.stride(1), cfg["row_stride"], cfg["inner_stride"])
    # Trip counts are compile-time (S, CHUNK_R, INNER_ITERS): one compile per
    # distinct BN shape of a network, a handful; runtime loop bounds are
    # also what the Triton interpreter cannot run.
    meta = dict(S=cfg["chunks"], CHUNK_R=cfg["chunk_r"], INNER_ITERS=triton.cdiv(cfg["inner"], cfg["block_i"]),
                BLOCK_R=cfg["block_r"], BLOCK_C=cfg["block_c"], BLOCK_I=cfg["block_i"])
    return grid, groups, cfg["chunks"], sizes, strides, meta


def forward(x3: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], g: int,
            eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """y (N, C, L) like x3, per-group mean and biased variance (G, C) float32."""
    _check_layout(x3)
    grid, groups, chunks, sizes, strides, meta = _grid_and_args(x3, g)
    c = x3.shape[1]
    f32 = dict(dtype=torch.float32, device=x3.device)
    p1, p2 = torch.empty(groups, chunks, c, **f32), torch.empty(groups, chunks, c, **f32)
    mean, var = torch.empty(groups, c, **f32), torch.empty(groups, c, **f32)
    y3 = torch.empty_like(x3)
    _partial_sums_kernel[grid](x3, x3, mean, p1, p2, *sizes, *strides, BACKWARD=False, **meta)
    _apply_kernel[grid](x3, x3, y3, weight if weight is not None else x3, bias if bias is not None else x3,
                        mean, var, p1, p2, mean, var, *sizes, eps, *strides, BACKWARD=False,
                        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **meta)
    return y3, mean, var


def backward(dy3: Tensor, x3: Tensor, weight: Optional[Tensor], mean: Tensor, var: Tensor, g: int, eps: float,
             needs_input_grad: bool) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """dx (or None), per-group sum(dy) and sum(dy*xhat) (G, C) float32.
    dy3 must have x3's strides (the autograd Function ensures it)."""
    grid, groups, chunks, sizes, strides, meta = _grid_and_args(x3, g)
    c = x3.shape[1]
    f32 = dict(dtype=torch.float32, device=x3.device)
    p1, p2 = torch.empty(groups, chunks, c, **f32), torch.empty(groups, chunks, c, **f32)
    _partial_sums_kernel[grid](x3, dy3, mean, p1, p2, *sizes, *strides, BACKWARD=True, **meta)
    if not needs_input_grad:
        return None, p1.sum(1), p2.sum(1) * (var + eps).rsqrt()
    sum_dy, sum_dy_xhat = torch.empty(groups, c, **f32), torch.empty(groups, c, **f32)
    dx3 = torch.empty_like(x3)
    _apply_kernel[grid](x3, dy3, dx3, weight if weight is not None else x3, x3, mean, var, p1, p2,
                        sum_dy, sum_dy_xhat, *sizes, eps, *strides, BACKWARD=True,
                        HAS_WEIGHT=weight is not None, HAS_BIAS=False, **meta)
    return dx3, sum_dy, sum_dy_xhat
