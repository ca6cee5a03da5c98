"""Triton kernels for the per-tensor norms of LARS and LAMB: a segmented
reduction in two launches without atomics (so results are deterministic).

1. a partial-sums kernel, one program per chunk (LARS: ``lars_partials_kernel``
   below; LAMB: ``triton_lamb.lamb_kernel`` with NORMS_ONLY) writes
   (sum p^2, sum d^2) of its chunk into ``partials[program]``;
2. ``trust_ratio_kernel``, one program per tensor, adds the partials of its
   tensor's programs (a contiguous range, see triton_table.py) and turns the
   two norms into the tensor's trust ratio. For LAMB it also advances the
   tensor's step count, once, before the update kernel reads it.

Bytes moved: partials 2*s per element (read p, g; s = element size) plus 8 per
program; trust ratio 8 per program plus 4-8 per tensor.

Fused path (FUSED_MAX > 0, see triton_common.fused_tensor): a tensor that
fits one program gets its norms and trust ratio inside the update kernel
(triton_sgd / triton_lamb), from ``lars_chunk_squares`` and ``trust_ratio``
below -- the very functions these kernels use, so both paths give the same
bits -- and both kernels here skip it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastsgd.kernels.triton_common import (
    COL_FIRST_PROGRAM,
    COL_NUM_PROGRAMS,
    COL_NUMEL,
    TABLE_WIDTH,
    address,
    fused_tensor,
    load_f32,
    load_hparam,
    program_chunk,
    step_skipped,
)


@triton.jit
def _squares_block(p_ptr, g_ptr, offsets, mask, scale, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr):
    """p^2 and (g / grad_scale)^2 of one block; ``mask`` is None unless MASKED."""
    p = load_f32(p_ptr, offsets, mask, MASKED)
    g = load_f32(g_ptr, offsets, mask, MASKED)
    if HAS_SCALE:
        g = g / scale
    return p * p, g * g


@triton.jit
def lars_chunk_squares(p_ptr, g_ptr, start, numel, scale, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr):
    """(sum p^2, sum (g / grad_scale)^2) over elements [start, start + CHUNK)
    of one tensor, summed in one fixed order."""
    p_acc = tl.zeros([BLOCK], dtype=tl.float32)
    g_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)  # int64
        if start + i + BLOCK <= numel:  # a full block: no mask, vector loads
            pp, gg = _squares_block(p_ptr, g_ptr, offsets, None, scale, HAS_SCALE, False)
            p_acc += pp
            g_acc += gg
        elif start + i < numel:  # the tensor's last, partial block
            pp, gg = _squares_block(p_ptr, g_ptr, offsets, offsets < numel, scale, HAS_SCALE, True)
            p_acc += pp
            g_acc += gg
    return tl.sum(p_acc, axis=0), tl.sum(g_acc, axis=0)


@triton.jit
def trust_ratio(w_norm, d_norm, lr, weight_decay, trust_coeff, eps, LAMB: tl.constexpr, TRUST_CLIP: tl.constexpr):
    """A tensor's trust ratio from |p| and |d| (d: the LARS grad, the LAMB update)."""
    if LAMB:
        r = w_norm / tl.where(d_norm > 0, d_norm, 1.0)
    else:
        r = trust_coeff * w_norm / (d_norm + weight_decay * w_norm + eps)
    ratio = tl.where((w_norm > 0) & (d_norm > 0), r, 1.0)
    if TRUST_CLIP:
        if LAMB:
            ratio = tl.minimum(ratio, 1.0)
        else:  # LARC: the ratio is capped so that lr * ratio <= lr
            ratio = tl.minimum(ratio / lr, 1.0)
    return ratio


@triton.jit
def lars_partials_kernel(
    tensors_ptr,     # (T, TABLE_WIDTH) int64: addresses of param, grad; numel; ...
    programs_ptr,    # (P, 2) int64: tensor index, first element of this program's chunk
    partials_ptr,    # (P, 2) fp32 out: sum of p^2, sum of (g / grad_scale)^2 over the chunk
    scale_ptr,       # () AMP grad scale, read when HAS_SCALE
    found_inf_ptr,   # () non-zero: skip, read when HAS_FOUND_INF
    PARAM_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, FUSED_MAX: tl.constexpr,
):
    if step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    tensor, start, row = program_chunk(tensors_ptr, programs_ptr)
    numel = tl.load(row + COL_NUMEL)
    if FUSED_MAX > 0:
        if fused_tensor(numel, FUSED_MAX):  # norms computed by the update kernel
            return
    p_ptr = address(row, 0, PARAM_DTYPE, ALIGNED)
    g_ptr = address(row, 1, PARAM_DTYPE, ALIGNED)
    scale = load_hparam(scale_ptr, 1.0, HAS_SCALE)
    pp, gg = lars_chunk_squares(p_ptr, g_ptr, start, numel, scale, HAS_SCALE, BLOCK, CHUNK)
    pid = tl.program_id(0)
    tl.store(partials_ptr + 2 * pid, pp)
    tl.store(partials_ptr + 2 * pid + 1, gg)


@triton.jit
def trust_ratio_kernel(
    tensors_ptr,     # (T, TABLE_WIDTH) int64: ...; first program, program count; LAMB: step address in column 4
    partials_ptr,    # (P, 2) fp32: per program, sum of p^2 and of d^2 (d = LARS grad / LAMB update)
    ratios_ptr,      # (T,) fp32 out: trust ratio per tensor
    lr_ptr,          # () lr on the device, read when LR_IS_TENSOR (LARS trust_clip)
    found_inf_ptr,   # () non-zero: skip, read when HAS_FOUND_INF
    lr_value, weight_decay, trust_coeff, eps,
    LAMB: tl.constexpr, ADAPT: tl.constexpr, TRUST_CLIP: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr, FUSED_MAX: tl.constexpr,
):
    if step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    tensor = tl.program_id(0)
    row = tensors_ptr + tensor * TABLE_WIDTH
    if FUSED_MAX > 0:
        if fused_tensor(tl.load(row + COL_NUMEL), FUSED_MAX):  # ratio and step count: the update kernel's job
            return
    ratio = 1.0
    if ADAPT:
        first = tl.load(row + COL_FIRST_PROGRAM)
        count = tl.load(row + COL_NUM_PROGRAMS).to(tl.int32)
        w_acc = tl.zeros([BLOCK], dtype=tl.float32)
        d_acc = tl.zeros([BLOCK], dtype=tl.float32)
        # A while loop: the Triton interpreter cannot run range() over a loaded bound.
        j = count * 0
        while j < count:
            idx = j + tl.arange(0, BLOCK)
            mask = idx < count
            w_acc += tl.load(partials_ptr + 2 * (first + idx), mask=mask, other=0.0)
            d_acc += tl.load(partials_ptr + 2 * (first + idx) + 1, mask=mask, other=0.0)
            j += BLOCK
        w_norm = tl.sqrt(tl.sum(w_acc, axis=0))
        d_norm = tl.sqrt(tl.sum(d_acc, axis=0))
        lr = 1.0
        if TRUST_CLIP and not LAMB:
            lr = load_hparam(lr_ptr, lr_value, LR_IS_TENSOR)
        ratio = trust_ratio(w_norm, d_norm, lr, weight_decay, trust_coeff, eps, LAMB, TRUST_CLIP)
    tl.store(ratios_ptr + tensor, ratio)
    if LAMB:
        step_ptr = address(row, 4, tl.float32)
        tl.store(step_ptr, tl.load(step_ptr) + 1.0)
