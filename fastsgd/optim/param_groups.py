"""The usual large-batch recipe: no weight decay (hence, for LARS/LAMB, no
layer-wise adaptation) for biases and normalisation weights."""
from __future__ import annotations

from typing import Any, Dict, List

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_1d: bool = True) -> List[Dict[str, Any]]:
    """Split ``model``'s trainable parameters into two param groups.

    With ``exclude_1d`` every parameter with ``ndim <= 1`` (biases, BatchNorm /
    LayerNorm weights) and every ``*.bias`` goes into a group with
    ``weight_decay=0``; the rest get ``weight_decay``. Empty groups are left
    out. For LARS/LAMB, weight_decay 0 also switches off the trust ratio
    (unless ``always_adapt=True``), which is what the recipe wants.

    >>> opt = fastsgd.LARS(fastsgd.param_groups(model, 5e-4), lr=0.1)
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exclude_1d and (p.ndim <= 1 or name.endswith(".bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
