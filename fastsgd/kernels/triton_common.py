"""Pieces shared by fastsgd's Triton optimizer kernels: table columns, launch
sizes, and small device functions (hyperparameters read on the device, the
AMP skip, stochastic rounding to bfloat16).

Whether the kernels run compiled (CUDA) or through the Triton interpreter
(CPU tensors) is Triton's choice when a kernel is defined, for Triton's own
library functions (tl.sum, tl.philox) as much as for ours:
``TRITON_INTERPRET=1`` must be set before triton is first imported.
``kernel_mode()`` says which way they were built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastsgd.kernels import triton_table

# Column indices of the tensor table (see triton_table.py), as compile-time constants.
TABLE_WIDTH = tl.constexpr(triton_table.TABLE_WIDTH)
COL_NUMEL = tl.constexpr(triton_table.COL_NUMEL)
COL_FIRST_PROGRAM = tl.constexpr(triton_table.COL_FIRST_PROGRAM)
COL_NUM_PROGRAMS = tl.constexpr(triton_table.COL_NUM_PROGRAMS)
COL_FLAG = tl.constexpr(triton_table.COL_FLAG)

TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass(frozen=True)
class LaunchConfig:
    block: int         # elements per loop iteration of a program
    chunk: int         # elements per program (a multiple of block)
    reduce_block: int  # partial sums summed per iteration in the trust-ratio kernel
    num_warps: int
    # LARS/LAMB: a tensor of 1..fused_max elements is owned by one program,
    # which computes its norms and then updates it in the same launch (one
    # read of the tensor from memory instead of two). At most ``chunk``: a
    # larger tensor is split over several programs, and its norm needs all of
    # them, so it keeps the 2-pass path (norm partials, trust ratios, update).
    fused_max: int

    def __post_init__(self):
        if not 0 <= self.fused_max <= self.chunk:
            raise ValueError(f"fused_max {self.fused_max} must be within 0..chunk ({self.chunk}): a fused tensor "
                             "is one program's chunk")


# GPU sizes: 16 KiB-64 KiB of each tensor per program keeps a ResNet-50 step
# at a few thousand programs while a tiny tensor costs one short program.
# (Chosen, not yet tuned on a GPU.)
#
# fused_max = chunk: every tensor that fits one program takes the fused
# path. Such a tensor gets one program on either path, so fusing costs no
# parallelism; it saves the second read of p and g (LAMB: also of m and v)
# from memory -- the update pass re-reads what the same program just read,
# from L1/L2 -- and, when no tensor is larger, the two extra launches.
# Fusing larger tensors would need one program to walk a whole tensor (one
# SM's share of the bandwidth for the biggest tensors of a model) or a
# grid-wide wait. To be confirmed by the GPU benchmark
# (bench/optimizer_step.py: fastsgd-triton against fastsgd-triton-2pass).
GPU_CONFIG = LaunchConfig(block=2048, chunk=16384, reduce_block=256, num_warps=8, fused_max=16384)
# Interpreter sizes: small, so that test shapes of a few hundred elements
# cross block and chunk boundaries and exercise the same loops as on a GPU.
INTERPRETER_CONFIG = LaunchConfig(block=64, chunk=128, reduce_block=4, num_warps=1, fused_max=128)


def kernel_mode() -> str:
    """"compiled", "interpreted", or "mixed" when our kernels and Triton's
    library functions were defined in different modes (TRITON_INTERPRET was
    set between importing triton and importing these modules); mixed kernels
    cannot run."""
    from triton.runtime.interpreter import InterpretedFunction
    ours, triton_lib = (isinstance(f, InterpretedFunction) for f in (load_hparam, tl.sum))
    if ours != triton_lib:
        return "mixed"
    return "interpreted" if ours else "compiled"


def kernels_interpreted() -> bool:
    """True when the Triton kernels of this process run in the interpreter."""
    return kernel_mode() == "interpreted"


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_config(device: torch.device) -> LaunchConfig:
    return GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG


@triton.jit
def fused_tensor(numel, FUSED_MAX: tl.constexpr):
    """True for a tensor whose norms and update run in one program
    (LaunchConfig.fused_max; FUSED_MAX 0: none, the 2-pass path). Empty
    tensors have no program and stay on the 2-pass path (LAMB's step count)."""
    return (numel > 0) & (numel <= FUSED_MAX)


@triton.jit
def load_hparam(ptr, value, IS_TENSOR: tl.constexpr):
    """A hyperparameter given either as a 0-dim device tensor (read here, so
    the host never waits and a CUDA graph replays the current value) or as a
    float kernel argument."""
    if IS_TENSOR:
        value = tl.load(ptr).to(tl.float32)
    return value


@triton.jit
def step_skipped(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """True when the AMP scaler found inf/nan gradients: the step changes nothing."""
    skipped = False
    if HAS_FOUND_INF:
        skipped = tl.load(found_inf_ptr) != 0
    return skipped


@triton.jit
def program_chunk(tensors_ptr, programs_ptr):
    """This program's work: (tensor index, first element, table row). Program
    ``pid`` owns one CHUNK of one tensor, listed as (tensor, start) pairs in
    the programs table built with the tensor table."""
    pid = tl.program_id(0)
    tensor = tl.load(programs_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(programs_ptr + 2 * pid + 1), 16)  # a multiple of CHUNK
    return tensor, start, tensors_ptr + tensor * TABLE_WIDTH


@triton.jit
def address(row_ptr, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Column ``column`` of a tensor-table row as a pointer to DTYPE. ALIGNED
    promises a 16-byte aligned address (checked on the host when the table is
    built), which lets the compiler use 16-byte vector loads and stores."""
    ptr = tl.load(row_ptr + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load_f32(ptr, offsets, mask, MASKED: tl.constexpr):
    """Elements ``offsets`` of ``ptr`` as fp32; masked only in a tensor's
    last, partial block, so full blocks can be vectorised."""
    if MASKED:
        x = tl.load(ptr + offsets, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offsets)
    return x.to(tl.float32)


@triton.jit
def random_bits(offsets, tensor_index, seed, counter):
    """32 random bits per element: Philox keyed by the seed, the element
    offset (64-bit), the tensor and the call counter, so every element of
    every call draws fresh bits and a given seed replays exactly."""
    zero = tl.zeros(offsets.shape, dtype=tl.uint32)
    c0 = (offsets & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offsets >> 32).to(tl.uint32)
    c2 = zero + tensor_index.to(tl.uint32)
    c3 = zero + counter.to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return bits


@triton.jit
def store_rounded(ptr, x, mask, offsets, tensor_index, seed, counter, DTYPE: tl.constexpr,
                  STOCHASTIC: tl.constexpr):
    """Store fp32 ``x`` as DTYPE. With STOCHASTIC (bfloat16 only) the value
    rounds up with probability equal to its distance from the lower bf16
    neighbour, so the stored value is unbiased: add 16 random bits below
    bf16's last mantissa bit, then truncate."""
    if STOCHASTIC:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (random_bits(offsets, tensor_index, seed, counter) & 0xFFFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    tl.store(ptr + offsets, x.to(DTYPE), mask=mask)  # mask None: a full block


@triton.jit
def advance_rng(rng_ptr, counter):
    """Bump the call counter of the stochastic-rounding state once per launch,
    on the device: the last program to finish (atomic ticket) writes
    counter + 1. Every program read the counter before taking its ticket, so
    no program of this launch sees the new value."""
    ticket = tl.atomic_add(rng_ptr + 2, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        tl.store(rng_ptr + 1, counter + 1)
        tl.store(rng_ptr + 2, 0)
