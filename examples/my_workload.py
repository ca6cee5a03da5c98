"""Your own workload for the batch-size harness: a worked example.

The harness needs one object, a ``fastsgd.study.Workload``, built by a
function of yours (the "factory"). Point a study at it with
``package.module:factory``; from the repository root::

    python examples/my_workload.py [OUT]                # a small steps-to-result study on it (a few minutes)
    python -c "from fastsgd.study.workloads.loading import load_workload; \\
               print(load_workload('examples.my_workload:make_workload'))"

The task here is one you would bring yourself: three interleaved spiral arms
in the plane (generated, fixed seed, 3000 training / 600 validation points),
a 2-64-64-3 ReLU MLP, and the goal "validation error below 5 %".

What each field means (see ``fastsgd.study.Workload``):

- ``make_model()``: a fresh model. The harness calls ``torch.manual_seed`` first,
  so build it with torch's default random generator and nothing else.
- ``sample_batch(batch_size, generator, device)``: one training batch
  ``(inputs, targets)``. Draw with the ``generator`` you are given: each trial
  then sees its own reproducible data order.
- ``loss(outputs, targets)``: a scalar, the mean over the batch, written with
  plain torch ops (the harness trains many trials at once under
  ``torch.func.vmap``).
- ``evaluate(model, device)``: ``{metric: float}`` on held-out data.
- ``goal_metric`` and ``goal``: the study measures the steps until
  ``goal_metric`` first drops below ``goal`` (or rises above it with
  ``higher_is_better=True``).
- ``info['train_size']``: examples in one epoch (the study's step budget is
  counted in epochs).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastsgd.study import Workload


def spirals(n: int, seed: int, arms: int = 3, noise: float = 0.1):
    """``n`` points on ``arms`` noisy spiral arms; labels are the arm index."""
    rng = np.random.default_rng(seed)
    label = rng.integers(arms, size=n)
    r = rng.uniform(0.1, 1.0, size=n)
    angle = 1.5 * math.pi * r + 2 * math.pi * label / arms
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + noise * r[:, None] * rng.standard_normal((n, 2))
    return torch.tensor(x / 0.6, dtype=torch.float32), torch.tensor(label, dtype=torch.long)


def make_workload(goal: float = 0.05) -> Workload:
    x_train, y_train = spirals(3000, seed=1)
    x_val, y_val = spirals(600, seed=2)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device):
        idx = torch.randint(len(x_train), (batch_size,), generator=generator)
        return x_train[idx].to(device), y_train[idx].to(device)

    def evaluate(model: nn.Module, device: torch.device):
        with torch.no_grad():
            out = model(x_val.to(device))
        y = y_val.to(device)
        return {"val_loss": float(F.cross_entropy(out, y)), "val_error": float((out.argmax(1) != y).float().mean())}

    return Workload(name="spirals-mlp", make_model=make_model, sample_batch=sample_batch, loss=F.cross_entropy,
                    evaluate=evaluate, goal_metric="val_error", goal=goal,
                    info={"train_size": len(x_train), "dataset": "spirals", "model": "mlp"})


if __name__ == "__main__":
    import sys

    from fastsgd.study import StudyConfig, run_study

    # Steps to val_error < 5 % at four batch sizes, 8 trials each; results in the directory given
    # (default ./spirals_study): study_summary.json, curves.csv.gz, plots, and the trials in study.db
    # (resumable). The same from the command line, from the repository root:
    #   fastsgd steps --workload examples.my_workload:make_workload --batch-sizes 8..512 --trials 8 --out DIR
    config = StudyConfig(out=sys.argv[1] if len(sys.argv) > 1 else "spirals_study",
                         workload="examples.my_workload:make_workload", batch_sizes=[8, 32, 128, 512], trials=8,
                         budget=500, budget_cap=4000, reseeds=2)
    run_study(config, workload=make_workload())
