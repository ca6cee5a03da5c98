"""A small CNN with batch norm on scikit-learn's digits as 8x8 images, with plain
or ghost batch norm.

Data: ``load_digits`` (ships with scikit-learn; no download), pixels scaled to
[0, 1], shaped (1, 8, 8), with the same fixed 360-image validation split as the
``digits-mlp`` workload.

Model: conv 3x3 (16) - BN - ReLU - conv 3x3 stride 2 (32) - BN - ReLU -
linear 512 -> 10. Convolutions carry no bias (batch norm's shift replaces it).
Batch norm tracks running statistics in training (momentum 0.1) and
evaluation runs the model in ``eval()`` mode with them, as a deployed model
would; so each trial's running statistics are part of its state. The ghost
variant uses :class:`fastsgd.nn.GhostBatchNorm2d` (ghost batches of
``ghost_batch_size`` samples; batches no larger than that are plain batch norm).

Evaluation therefore goes one model at a time (a plain :class:`Workload`):
metrics ``val_loss`` and ``val_error``; goal: ``val_error`` below ``goal``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsgd.nn import GhostBatchNorm2d
from fastsgd.study import (
    Workload,  # the package export, wherever the protocol module lives
)
from fastsgd.study.workloads.data import digits_arrays

GHOST_BATCH_SIZE = 16


class DigitsCNN(nn.Module):
    def __init__(self, norm: Callable[[int], nn.Module], channels: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False), norm(2 * channels), nn.ReLU())
        self.head = nn.Linear(2 * channels * 16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(-3))


def _evaluate(x_val: Tensor, y_val: Tensor, model: nn.Module, device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()  # batch norm with the running statistics
    try:
        with torch.no_grad():
            out = model(x_val.to(device))
            y = y_val.to(device)
            return {"val_loss": float(F.cross_entropy(out, y)),
                    "val_error": float((out.argmax(-1) != y).float().mean())}
    finally:
        model.train(was_training)


def _digits_cnn(name: str, norm: Callable[[int], nn.Module], goal: float, info) -> Workload:
    xt, yt, xv, yv = digits_arrays()
    xt, xv = xt.reshape(-1, 1, 8, 8), xv.reshape(-1, 1, 8, 8)
    n = len(xt)

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device):
        idx = torch.randint(n, (batch_size,), generator=generator)
        return xt[idx].to(device), yt[idx].to(device)

    return Workload(name=name, make_model=lambda: DigitsCNN(norm), sample_batch=sample_batch, loss=F.cross_entropy,
                    evaluate=functools.partial(_evaluate, xv, yv), goal_metric="val_error", goal=goal,
                    info=dict(info, dataset="digits", train_size=n, val_size=len(xv)))


def digits_cnn_bn(goal: float = 0.03) -> Workload:
    """Digits, CNN with nn.BatchNorm2d (running statistics); goal: val_error < ``goal``."""
    return _digits_cnn("digits-cnn-bn", nn.BatchNorm2d, goal, {"model": "cnn-bn"})


def digits_cnn_ghostbn(goal: float = 0.03, ghost_batch_size: int = GHOST_BATCH_SIZE) -> Workload:
    """Digits, CNN with fastsgd.nn.GhostBatchNorm2d; goal: val_error < ``goal``."""
    return _digits_cnn("digits-cnn-ghostbn", functools.partial(GhostBatchNorm2d, ghost_batch_size=ghost_batch_size),
                       goal, {"model": "cnn-ghostbn", "ghost_batch_size": ghost_batch_size})
