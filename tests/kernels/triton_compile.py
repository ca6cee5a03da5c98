"""Compiles every Triton kernel of fastsgd for a GPU architecture, no GPU needed.

    python tests/kernels/triton_compile.py 90 optimizer   # or ghost_bn

Each kernel is compiled with representative constexpr combinations for
sm_<arch> by Triton's bundled ptxas; the number compiled is printed last.
Run without TRITON_INTERPRET (tests/kernels/test_gpu_backends.py starts it in
a fresh process for that reason).
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def build(kernel, types, constexprs, arch, num_warps=8):
    sig = {n: ("constexpr" if n in constexprs else types.get(n, "*fp32")) for n in kernel.arg_names}
    cx = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def optimizer_variants(arch: int) -> int:
    """Compile every kernel with representative constexpr combinations for
    sm_<arch> (checking that aligned variants use 16-byte vector loads);
    returns the number compiled. Run without TRITON_INTERPRET."""
    from fastsgd.kernels.triton_lamb import lamb_kernel
    from fastsgd.kernels.triton_norms import lars_partials_kernel, trust_ratio_kernel
    from fastsgd.kernels.triton_sgd import momentum_sgd_kernel

    def check(kernel, types, constexprs):
        compiled = build(kernel, types, constexprs, arch)
        if constexprs.get("ALIGNED"):  # full blocks of aligned tensors must use 16-byte accesses
            assert "ld.global.v4" in compiled.asm["ptx"], f"{kernel.__name__} {constexprs}: no vector loads"

    table = {"tensors_ptr": "*i64", "programs_ptr": "*i64", "rng_ptr": "*i64"}
    floats = {n: "fp32" for n in ("lr_value", "momentum", "one_minus_dampening", "weight_decay", "clip_value",
                                  "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "log_beta1",
                                  "log_beta2", "eps", "trust_coeff")}
    types = dict(table, **floats, first_all="i32")
    size = dict(BLOCK=2048, CHUNK=16384)
    off = dict(NESTEROV=False, MAXIMIZE=False, LR_IN_MOMENTUM=False, HAS_WEIGHT_DECAY=False, HAS_RATIO=False,
               LR_IS_TENSOR=False, HAS_SCALE=False, HAS_FOUND_INF=False, STOCHASTIC_ROUNDING=False, ALIGNED=True,
               TRUST_CLIP=False, FUSED_MAX=0)
    sgd = [
        dict(off, PARAM_DTYPE=tl.float32, BUF_DTYPE=tl.float32, HAS_MOMENTUM=False),
        dict(off, PARAM_DTYPE=tl.bfloat16, BUF_DTYPE=tl.float32, HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=True,
             HAS_WEIGHT_DECAY=True, LR_IS_TENSOR=True, HAS_SCALE=True, HAS_FOUND_INF=True),
        dict(off, PARAM_DTYPE=tl.float16, BUF_DTYPE=tl.float16, HAS_MOMENTUM=True, LR_IN_MOMENTUM=True,
             HAS_RATIO=True, ALIGNED=False),
        dict(off, PARAM_DTYPE=tl.float32, BUF_DTYPE=tl.bfloat16, HAS_MOMENTUM=True, STOCHASTIC_ROUNDING=True),
        # LARS, fused: one-program tensors compute their norms and trust ratio in the update kernel
        dict(off, PARAM_DTYPE=tl.float32, BUF_DTYPE=tl.float32, HAS_MOMENTUM=True, HAS_WEIGHT_DECAY=True,
             HAS_RATIO=True, NESTEROV=True, TRUST_CLIP=True, LR_IS_TENSOR=True, HAS_SCALE=True, HAS_FOUND_INF=True,
             FUSED_MAX=16384),
        dict(off, PARAM_DTYPE=tl.bfloat16, BUF_DTYPE=tl.bfloat16, HAS_MOMENTUM=True, HAS_RATIO=True, ALIGNED=False,
             FUSED_MAX=16384),
    ]
    lamb_off = dict(LR_IS_TENSOR=False, HAS_SCALE=False, HAS_FOUND_INF=False, HAS_CLIP=False, CLIP_IS_TENSOR=False,
                    HAS_WEIGHT_DECAY=False, BIAS_CORRECTION=False, ALIGNED=True, ADAPT=True, TRUST_CLIP=False,
                    FUSED_MAX=0)
    lamb = [
        dict(lamb_off, PARAM_DTYPE=tl.float32, STATE_DTYPE=tl.float32, NORMS_ONLY=True, HAS_CLIP=True,
             CLIP_IS_TENSOR=True, HAS_WEIGHT_DECAY=True, BIAS_CORRECTION=True, HAS_SCALE=True, HAS_FOUND_INF=True),
        dict(lamb_off, PARAM_DTYPE=tl.bfloat16, STATE_DTYPE=tl.bfloat16, NORMS_ONLY=False, LR_IS_TENSOR=True,
             BIAS_CORRECTION=True, HAS_CLIP=True),
        dict(lamb_off, PARAM_DTYPE=tl.float16, STATE_DTYPE=tl.float32, NORMS_ONLY=False, ALIGNED=False),
        # fused: the norms pass skips one-program tensors, the update pass does their norms, ratio and step
        dict(lamb_off, PARAM_DTYPE=tl.float32, STATE_DTYPE=tl.float32, NORMS_ONLY=True, HAS_WEIGHT_DECAY=True,
             BIAS_CORRECTION=True, FUSED_MAX=16384),
        dict(lamb_off, PARAM_DTYPE=tl.float32, STATE_DTYPE=tl.float32, NORMS_ONLY=False, HAS_WEIGHT_DECAY=True,
             BIAS_CORRECTION=True, HAS_CLIP=True, CLIP_IS_TENSOR=True, HAS_SCALE=True, HAS_FOUND_INF=True,
             LR_IS_TENSOR=True, ADAPT=True, TRUST_CLIP=True, FUSED_MAX=16384),
        dict(lamb_off, PARAM_DTYPE=tl.bfloat16, STATE_DTYPE=tl.float32, NORMS_ONLY=False, ADAPT=False,
             FUSED_MAX=16384),
    ]
    ratio_off = dict(TRUST_CLIP=False, LR_IS_TENSOR=False, HAS_FOUND_INF=False, BLOCK=256, FUSED_MAX=0)
    ratios = [dict(ratio_off, LAMB=False, ADAPT=True, TRUST_CLIP=True, LR_IS_TENSOR=True, HAS_FOUND_INF=True),
              dict(ratio_off, LAMB=True, ADAPT=True, TRUST_CLIP=True),
              dict(ratio_off, LAMB=True, ADAPT=False),
              dict(ratio_off, LAMB=False, ADAPT=True, FUSED_MAX=16384)]
    partials = [dict(PARAM_DTYPE=tl.float32, HAS_SCALE=False, HAS_FOUND_INF=False, ALIGNED=False, FUSED_MAX=0,
                     **size),
                dict(PARAM_DTYPE=tl.bfloat16, HAS_SCALE=True, HAS_FOUND_INF=True, ALIGNED=True, FUSED_MAX=16384,
                     **size)]
    jobs = ([(momentum_sgd_kernel, dict(c, **size)) for c in sgd] + [(lamb_kernel, dict(c, **size)) for c in lamb]
            + [(trust_ratio_kernel, c) for c in ratios] + [(lars_partials_kernel, c) for c in partials])
    for kernel, constexprs in jobs:
        check(kernel, types, constexprs)
    return len(jobs)


def ghost_bn_variants(arch: int) -> int:
    """Both ghost-BN kernels, forward and backward, in the two layouts
    (NCHW planes and channels-last rows) and for fp32 and bf16 input."""
    from fastsgd.kernels.triton_ghost_bn import _apply_kernel, _partial_sums_kernel

    ints = {n: "i32" for n in ("N", "C", "g", "inner", "rows_per_sample", "stride_n", "stride_c", "row_stride",
                               "inner_stride")}
    planes = dict(S=2, CHUNK_R=16, INNER_ITERS=2, BLOCK_R=8, BLOCK_C=1, BLOCK_I=256)
    rows = dict(S=4, CHUNK_R=64, INNER_ITERS=1, BLOCK_R=32, BLOCK_C=64, BLOCK_I=1)
    count = 0
    for x_type in ("*fp32", "*bf16"):
        data = dict(ints, X=x_type, DY=x_type, OUT=x_type, W=x_type, B=x_type, eps="fp32")
        for layout in (planes, rows):
            for backward in (False, True):
                build(_partial_sums_kernel, data, dict(layout, BACKWARD=backward), arch, num_warps=4)
                build(_apply_kernel, data, dict(layout, BACKWARD=backward, HAS_WEIGHT=True, HAS_BIAS=not backward),
                      arch, num_warps=4)
                count += 1
    return count  # variants: (dtype, layout, direction), each both kernels


if __name__ == "__main__":
    arch, family = int(sys.argv[1]), sys.argv[2]
    print({"optimizer": optimizer_variants, "ghost_bn": ghost_bn_variants}[family](arch))
