"""How the GPU backends (triton, cuda) run LARS and LAMB: a tensor small
enough for one program (Triton) or one thread block (CUDA) has its norms
computed and its update applied in the same launch; larger tensors take two
passes (norm partials and trust ratios, then the update).

``FASTSGD_GPU_TWO_PASS=1`` in the environment, read on every call, sends
every tensor through the two passes, so one benchmark run can time both
ways (bench/optimizer_step.py's ``-2pass`` providers). Both ways give the
same bits: the fused path sums a tensor's squares in the order the two-pass
path does.
"""
from __future__ import annotations

import os

TWO_PASS_ENV = "FASTSGD_GPU_TWO_PASS"


def fused_max(default: int) -> int:
    """Largest tensor (elements) fused into one program: ``default``, or 0
    (nothing fused) when FASTSGD_GPU_TWO_PASS=1."""
    return 0 if os.environ.get(TWO_PASS_ENV, "0") == "1" else default
