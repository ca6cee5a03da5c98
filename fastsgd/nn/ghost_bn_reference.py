"""The ghost batch norm oracle: a plain Python loop over ghost batches, each
one an ordinary ``torch.nn.functional.batch_norm`` call.

Slow on purpose and obviously right; every fused path is tested against it.
It follows the semantics documented in :mod:`fastsgd.nn.functional`:
contiguous ghost batches ``[k*g, (k+1)*g)``, a smaller last one, one
running-statistics update per call from the plain mean over ghost batches of
the per-batch mean and unbiased variance.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def ghost_batch_norm_reference(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                               ghost_batch_size: int = 32) -> Tensor:
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    outputs, means, unbiased_vars = [], [], []
    for chunk in input.split(ghost_batch_size, dim=0):
        # F.batch_norm raises "Expected more than 1 value per channel" for a
        # one-value ghost batch, exactly the error the fused paths must give.
        outputs.append(F.batch_norm(chunk, None, None, weight, bias, True, 0.0, eps))
        dims = [0] + list(range(2, chunk.dim()))
        with torch.no_grad():
            means.append(chunk.double().mean(dims))
            unbiased_vars.append(chunk.double().var(dims, correction=1))
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            new_mean = torch.stack(means).mean(0)
            new_var = torch.stack(unbiased_vars).mean(0)
            running_mean.copy_(momentum * new_mean + (1 - momentum) * running_mean.double())
            running_var.copy_(momentum * new_var + (1 - momentum) * running_var.double())
    return torch.cat(outputs, dim=0)
