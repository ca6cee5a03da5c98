"""Triton kernel for the SGD family (plain, momentum, Nesterov, dampening,
weight decay, maximize, lr inside or outside the momentum buffer) and for
LARS's update (the same rule applied to a trust-ratio-scaled gradient).

One launch covers every tensor of one dtype combination: program i updates
the chunk of tensor ``programs[i, 0]`` starting at element ``programs[i, 1]``
(see triton_table.py). Math is fp32 whatever the storage dtype; each result
is rounded once into its storage dtype. Full blocks run without a mask (and
with 16-byte vector accesses when the table says every address is aligned);
only a tensor's last, partial block is masked.

Bytes moved per element (s = param/grad element size, b = buffer element
size): plain SGD 3*s (read p, g; write p); with momentum 3*s + 2*b.

LARS, fused (FUSED_MAX > 0): a tensor that fits one program
(triton_common.fused_tensor) gets its norms and trust ratio here, from the
program's own pass over p and g just before the update (which then finds
them in cache); the other tensors read the ratio triton_norms computed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastsgd.kernels.triton_common import (
    COL_FLAG,
    COL_NUMEL,
    address,
    advance_rng,
    fused_tensor,
    load_f32,
    load_hparam,
    program_chunk,
    step_skipped,
    store_rounded,
)
from fastsgd.kernels.triton_norms import lars_chunk_squares, trust_ratio


@triton.jit
def _update_block(p_ptr, g_ptr, b_ptr, offsets, mask, first, lr, scale, ratio, momentum, one_minus_dampening,
                  weight_decay, tensor, seed, counter,
                  PARAM_DTYPE: tl.constexpr, BUF_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, LR_IN_MOMENTUM: tl.constexpr,
                  HAS_WEIGHT_DECAY: tl.constexpr, HAS_RATIO: tl.constexpr, HAS_SCALE: tl.constexpr,
                  STOCHASTIC_ROUNDING: tl.constexpr, MASKED: tl.constexpr):
    """One block of one tensor; ``mask`` is None (unused) unless MASKED."""
    p = load_f32(p_ptr, offsets, mask, MASKED)
    g = load_f32(g_ptr, offsets, mask, MASKED)
    if HAS_SCALE:
        g = g / scale
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    if HAS_RATIO:
        g = g * ratio
    if HAS_MOMENTUM:
        # lr_in_momentum: the buffer holds the velocity v = lr * b.
        step_in = g
        if LR_IN_MOMENTUM:
            step_in = lr * g
        b = load_f32(b_ptr, offsets, mask, MASKED)
        b = tl.where(first, step_in, momentum * b + one_minus_dampening * step_in)
        store_rounded(b_ptr, b, mask, offsets, tensor, seed, counter, BUF_DTYPE, STOCHASTIC_ROUNDING)
        d = b
        if NESTEROV:
            d = step_in + momentum * b
        if not LR_IN_MOMENTUM:
            d = lr * d
    else:
        d = lr * g
    tl.store(p_ptr + offsets, (p - d).to(PARAM_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["first_all"])
def momentum_sgd_kernel(
    tensors_ptr,     # (T, TABLE_WIDTH) int64: addresses of param, grad, momentum buffer; numel; ...; first-step flag
    programs_ptr,    # (P, 2) int64: tensor index, first element of this program's chunk
    ratios_ptr,      # (T,) fp32 LARS trust ratios, read when HAS_RATIO
    lr_ptr,          # () lr on the device, read when LR_IS_TENSOR
    scale_ptr,       # () AMP grad scale, read when HAS_SCALE
    found_inf_ptr,   # () non-zero: skip the step, read when HAS_FOUND_INF
    rng_ptr,         # (3,) int64 stochastic-rounding state: seed, call counter, ticket
    lr_value, momentum, one_minus_dampening, weight_decay,
    first_all,       # 1: every buffer is new (b = g); else the per-tensor flag column decides
    trust_coeff, eps,  # LARS, read for the tensors fused here (FUSED_MAX > 0)
    PARAM_DTYPE: tl.constexpr, BUF_DTYPE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_IN_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_RATIO: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    TRUST_CLIP: tl.constexpr = False, FUSED_MAX: tl.constexpr = 0,
):
    if step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    tensor, start, row = program_chunk(tensors_ptr, programs_ptr)
    p_ptr = address(row, 0, PARAM_DTYPE, ALIGNED)
    g_ptr = address(row, 1, PARAM_DTYPE, ALIGNED)
    b_ptr = p_ptr
    first = False
    if HAS_MOMENTUM:
        b_ptr = address(row, 2, BUF_DTYPE, ALIGNED)
        first = (first_all != 0) | (tl.load(row + COL_FLAG) != 0)
    numel = tl.load(row + COL_NUMEL)
    lr = load_hparam(lr_ptr, lr_value, LR_IS_TENSOR)
    scale = load_hparam(scale_ptr, 1.0, HAS_SCALE)
    ratio = load_hparam(ratios_ptr + tensor, 1.0, HAS_RATIO and FUSED_MAX == 0)
    if HAS_RATIO and FUSED_MAX > 0:
        if fused_tensor(numel, FUSED_MAX):  # one program owns the tensor: its norms first (start == 0)
            pp, gg = lars_chunk_squares(p_ptr, g_ptr, start, numel, scale, HAS_SCALE, BLOCK, CHUNK)
            ratio = trust_ratio(tl.sqrt(pp), tl.sqrt(gg), lr, weight_decay, trust_coeff, eps, False, TRUST_CLIP)
        else:
            ratio = tl.load(ratios_ptr + tensor)
    seed = 0
    counter = 0
    if STOCHASTIC_ROUNDING:
        seed = tl.load(rng_ptr)
        counter = tl.load(rng_ptr + 1)

    for i in range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)  # int64: tensors may pass 2^31 elements
        if start + i + BLOCK <= numel:  # a full block: no mask, vector loads
            _update_block(p_ptr, g_ptr, b_ptr, offsets, None, first, lr, scale, ratio, momentum,
                          one_minus_dampening, weight_decay, tensor, seed, counter, PARAM_DTYPE, BUF_DTYPE,
                          HAS_MOMENTUM, NESTEROV, MAXIMIZE, LR_IN_MOMENTUM, HAS_WEIGHT_DECAY, HAS_RATIO, HAS_SCALE,
                          STOCHASTIC_ROUNDING, False)
        elif start + i < numel:  # the tensor's last, partial block
            _update_block(p_ptr, g_ptr, b_ptr, offsets, offsets < numel, first, lr, scale, ratio, momentum,
                          one_minus_dampening, weight_decay, tensor, seed, counter, PARAM_DTYPE, BUF_DTYPE,
                          HAS_MOMENTUM, NESTEROV, MAXIMIZE, LR_IN_MOMENTUM, HAS_WEIGHT_DECAY, HAS_RATIO, HAS_SCALE,
                          STOCHASTIC_ROUNDING, True)

    if STOCHASTIC_ROUNDING:
        advance_rng(rng_ptr, counter)
