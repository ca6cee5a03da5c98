"""Triton kernel for LAMB (timm's rule, see fastsgd/optim/lamb.py).

``lamb_kernel`` runs twice per step with the same arithmetic:
- NORMS_ONLY: computes the new moments and the update direction u without
  storing them, and writes each program's (sum p^2, sum u^2) partials for
  triton_norms.trust_ratio_kernel (which then advances the step counts);
- update: recomputes the moments (bit-identical), stores them and applies
  p <- p - lr * ratio * u.
Recomputing instead of storing the moments in the first pass keeps the update
exactly the reference's (u from the unrounded moments) at the cost of one
extra read of p, g, m, v.

Bytes moved per element (s = param/grad size, m = moment size): norms pass
2*s + 2*m read; update pass 3*s + 4*m.

Fused (FUSED_MAX > 0): a tensor that fits one program
(triton_common.fused_tensor) is left out of the norms pass and of
trust_ratio_kernel; its update-pass program runs the norms loop itself
(the same ``_lamb_chunk``, so the same bits), takes the trust ratio,
advances the step count and then updates the tensor, whose data the norms
loop has just brought into cache.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastsgd.kernels.triton_common import (
    COL_NUMEL,
    address,
    fused_tensor,
    load_f32,
    load_hparam,
    program_chunk,
    step_skipped,
)
from fastsgd.kernels.triton_norms import trust_ratio


@triton.jit
def bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION: tl.constexpr):
    """1 - beta1^t and sqrt(1 - beta2^t), computed in fp64: with beta2 near 1,
    1 - beta2^t cancels most fp32 digits. log_beta = log(beta) (host, fp64)."""
    bc1 = 1.0
    sqrt_bc2 = 1.0
    if BIAS_CORRECTION:
        t64 = t.to(tl.float64)
        bc1 = (1.0 - tl.exp(t64 * log_beta1)).to(tl.float32)
        sqrt_bc2 = tl.sqrt((1.0 - tl.exp(t64 * log_beta2)).to(tl.float32))
    return bc1, sqrt_bc2


@triton.jit
def _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, offsets, mask, scale, clip, beta1, one_minus_beta1, beta2,
                one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, step_size,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, NORMS_ONLY: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                MASKED: tl.constexpr):
    """One block of one tensor: p^2 and u^2 per element (for the norms); in
    the update pass also stores m, v and p. ``mask`` is None unless MASKED."""
    p = load_f32(p_ptr, offsets, mask, MASKED)
    g = load_f32(g_ptr, offsets, mask, MASKED)
    m = load_f32(m_ptr, offsets, mask, MASKED)
    v = load_f32(v_ptr, offsets, mask, MASKED)
    if HAS_SCALE:
        g = g / scale
    if HAS_CLIP:
        g = g / clip
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    u = (m / bc1) / (tl.sqrt(v) / sqrt_bc2 + eps)
    if HAS_WEIGHT_DECAY:
        u = u + weight_decay * p
    if MASKED:
        u = tl.where(mask, u, 0.0)  # 0/0 in masked lanes when eps == 0
    if not NORMS_ONLY:
        tl.store(m_ptr + offsets, m.to(STATE_DTYPE), mask=mask)
        tl.store(v_ptr + offsets, v.to(STATE_DTYPE), mask=mask)
        tl.store(p_ptr + offsets, (p - step_size * u).to(PARAM_DTYPE), mask=mask)
    return p * p, u * u


@triton.jit
def _lamb_chunk(p_ptr, g_ptr, m_ptr, v_ptr, start, numel, scale, clip, beta1, one_minus_beta1, beta2,
                one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, step_size,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, NORMS_ONLY: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Elements [start, start + CHUNK) of one tensor: (sum p^2, sum u^2) in
    one fixed order; unless NORMS_ONLY also stores m, v and p."""
    p_acc = tl.zeros([BLOCK], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)  # int64
        if start + i + BLOCK <= numel:  # a full block: no mask, vector loads
            pp, uu = _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, offsets, None, scale, clip, beta1, one_minus_beta1,
                                 beta2, one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, step_size, PARAM_DTYPE,
                                 STATE_DTYPE, NORMS_ONLY, HAS_SCALE, HAS_CLIP, HAS_WEIGHT_DECAY, False)
            p_acc += pp
            u_acc += uu
        elif start + i < numel:  # the tensor's last, partial block
            pp, uu = _lamb_block(p_ptr, g_ptr, m_ptr, v_ptr, offsets, offsets < numel, scale, clip, beta1,
                                 one_minus_beta1, beta2, one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay,
                                 step_size, PARAM_DTYPE, STATE_DTYPE, NORMS_ONLY, HAS_SCALE, HAS_CLIP,
                                 HAS_WEIGHT_DECAY, True)
            p_acc += pp
            u_acc += uu
    return tl.sum(p_acc, axis=0), tl.sum(u_acc, axis=0)


@triton.jit
def lamb_kernel(
    tensors_ptr,     # (T, TABLE_WIDTH) int64: addresses of param, grad, exp_avg, exp_avg_sq, step; numel; ...
    programs_ptr,    # (P, 2) int64: tensor index, first element of this program's chunk
    partials_ptr,    # (P, 2) fp32 out (NORMS_ONLY): sum of p^2, sum of u^2 over the chunk
    ratios_ptr,      # (T,) fp32 trust ratios (update pass)
    lr_ptr,          # () lr on the device, read when LR_IS_TENSOR
    scale_ptr,       # () AMP grad scale, read when HAS_SCALE
    found_inf_ptr,   # () non-zero: skip, read when HAS_FOUND_INF
    clip_ptr,        # () global-norm clip divisor on the device, read when CLIP_IS_TENSOR
    lr_value, clip_value, beta1, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2,
    eps, weight_decay,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, NORMS_ONLY: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr, CLIP_IS_TENSOR: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ADAPT: tl.constexpr = True, TRUST_CLIP: tl.constexpr = False, FUSED_MAX: tl.constexpr = 0,
):
    if step_skipped(found_inf_ptr, HAS_FOUND_INF):
        return
    tensor, start, row = program_chunk(tensors_ptr, programs_ptr)
    numel = tl.load(row + COL_NUMEL)
    if NORMS_ONLY and FUSED_MAX > 0:
        if fused_tensor(numel, FUSED_MAX):  # the update pass computes its norms
            return
    p_ptr = address(row, 0, PARAM_DTYPE, ALIGNED)
    g_ptr = address(row, 1, PARAM_DTYPE, ALIGNED)
    m_ptr = address(row, 2, STATE_DTYPE, ALIGNED)
    v_ptr = address(row, 3, STATE_DTYPE, ALIGNED)
    step_ptr = address(row, 4, tl.float32)
    # The norms pass runs before trust_ratio_kernel advances the step count.
    t = tl.load(step_ptr)
    if NORMS_ONLY:
        t += 1.0
    scale = load_hparam(scale_ptr, 1.0, HAS_SCALE)
    clip = 1.0
    if HAS_CLIP:
        clip = load_hparam(clip_ptr, clip_value, CLIP_IS_TENSOR)
    lr = 0.0
    if not NORMS_ONLY:
        lr = load_hparam(lr_ptr, lr_value, LR_IS_TENSOR)

    if NORMS_ONLY:
        bc1, sqrt_bc2 = bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION)
        pp, uu = _lamb_chunk(p_ptr, g_ptr, m_ptr, v_ptr, start, numel, scale, clip, beta1, one_minus_beta1, beta2,
                             one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, 0.0, PARAM_DTYPE, STATE_DTYPE,
                             True, HAS_SCALE, HAS_CLIP, HAS_WEIGHT_DECAY, BLOCK, CHUNK)
        pid = tl.program_id(0)
        tl.store(partials_ptr + 2 * pid, pp)
        tl.store(partials_ptr + 2 * pid + 1, uu)
    else:
        fused = False
        if FUSED_MAX > 0:
            fused = fused_tensor(numel, FUSED_MAX)
        if fused:  # one program owns the tensor: step count, norms and ratio here, then the update
            t = t + 1.0
            ratio = tl.full((), 1.0, tl.float32)
            if ADAPT:
                bc1, sqrt_bc2 = bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION)
                pp, uu = _lamb_chunk(p_ptr, g_ptr, m_ptr, v_ptr, start, numel, scale, clip, beta1,
                                     one_minus_beta1, beta2, one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, 0.0,
                                     PARAM_DTYPE, STATE_DTYPE, True, HAS_SCALE, HAS_CLIP, HAS_WEIGHT_DECAY, BLOCK,
                                     CHUNK)
                ratio = trust_ratio(tl.sqrt(pp), tl.sqrt(uu), 1.0, weight_decay, 0.0, eps, True, TRUST_CLIP)
            tl.store(step_ptr, t)
        else:
            ratio = tl.load(ratios_ptr + tensor)
        bc1, sqrt_bc2 = bias_corrections(t, log_beta1, log_beta2, BIAS_CORRECTION)
        _lamb_chunk(p_ptr, g_ptr, m_ptr, v_ptr, start, numel, scale, clip, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, bc1, sqrt_bc2, eps, weight_decay, lr * ratio, PARAM_DTYPE, STATE_DTYPE,
                    False, HAS_SCALE, HAS_CLIP, HAS_WEIGHT_DECAY, BLOCK, CHUNK)
