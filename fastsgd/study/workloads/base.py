"""The workload protocol shared by the throughput sweep and the steps-to-result study.

A workload is a small object that says how to build the model, how to draw a
training batch, and how to score the model. The throughput harness only needs
``make_model``, ``sample_batch`` and ``loss``; the steps-to-result study also
needs ``evaluate`` and a default goal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn


@dataclass
class Workload:
    """One model + data + objective.

    name:          short identifier, e.g. "mnist1d-mlp"
    make_model:    () -> nn.Module, built on the CPU; call torch.manual_seed first for reproducibility
    sample_batch:  (batch_size, generator, device) -> (inputs, targets): a training batch
    loss:          (outputs, targets) -> scalar loss tensor (mean over the batch)
    evaluate:      (model, device) -> {metric: value}, on held-out data (None: no evaluation)
    goal_metric:   the metric ``evaluate`` returns that the study compares with ``goal``
    goal:          default goal value (lower is better unless ``higher_is_better``)
    """

    name: str
    make_model: Callable[[], nn.Module]
    sample_batch: Callable[[int, torch.Generator, torch.device], Tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    evaluate: Optional[Callable[[nn.Module, torch.device], Dict[str, float]]] = None
    goal_metric: str = "val_error"
    goal: Optional[float] = None
    higher_is_better: bool = False
    info: Dict[str, object] = field(default_factory=dict)
