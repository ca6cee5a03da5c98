"""Real-data workloads for the steps-to-result study, with fixed train/val splits.

- ``mnist1d-mlp``, ``mnist1d-cnn``: MNIST-1D (Greydanus 2020) generated locally by
  the ``mnist1d`` package's ``make_dataset`` (never its downloader), 40-sample
  signals, 10 classes; the generated arrays are cached under
  ``$FASTSGD_CACHE`` (default ``~/.cache/fastsgd``).
- ``digits-mlp``: scikit-learn's ``load_digits`` (8x8 images, ships with the package).

Every training batch is drawn i.i.d. with replacement from the training split
by the trial's own ``torch.Generator``, so a trial's data order follows from its
seed alone. Metrics: ``val_loss``/``val_error`` on the held-out split and
``train_loss``/``train_error`` on a fixed subset of the training split (the
goal may use either).

Writing your own workload
-------------------------
Any :class:`fastsgd.study.workloads.base.Workload` works with the study. Give it
``make_model`` (a fresh model after ``torch.manual_seed``), ``sample_batch``
(draw with the generator you are given, so trials are reproducible), ``loss``
(mean over the batch, written with plain torch ops so ``torch.func.vmap`` can
batch it), ``evaluate`` returning ``{metric: float}``, ``goal_metric`` and a
default ``goal``. Trials are then evaluated one model at a time. To let the
study evaluate all trials of a batch size in one vmapped call, use
:class:`DataWorkload` instead: add ``eval_data`` (named (inputs, targets)
pairs) and ``metrics`` ((outputs, targets) -> {name: 0-dim tensor}); metric
names are then ``<eval set>_<name>``. :func:`make_data_workload` builds one
from tensors::

    wl = make_data_workload("my-task", make_model, x_train, y_train, x_val, y_val, goal=0.1)
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsgd.study.workloads.base import Workload

TRAIN_EVAL_SIZE = 2000  # training examples scored at each evaluation (train_loss / train_error)


@dataclass
class DataWorkload(Workload):
    """A classification-style workload over in-memory tensors whose evaluation
    can be vmapped over stacked trials.

    eval_data: {set name: (inputs, targets)} scored at every evaluation
    metrics:   (outputs, targets) -> {name: 0-dim tensor}; written with torch ops only (vmapped)
    """

    eval_data: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    metrics: Callable[[Tensor, Tensor], Dict[str, Tensor]] = None
    train_data: Optional[Tuple[Tensor, Tensor]] = None  # (inputs, targets): trial batches are drawn from it by index


def classification_metrics(outputs: Tensor, targets: Tensor) -> Dict[str, Tensor]:
    """Mean cross-entropy and error rate (fraction misclassified)."""
    return {"loss": F.cross_entropy(outputs, targets),
            "error": (outputs.argmax(-1) != targets).to(outputs.dtype).mean()}


def _evaluate(eval_data, metrics, model: nn.Module, device: torch.device) -> Dict[str, float]:
    out = {}
    with torch.no_grad():
        for set_name, (x, y) in eval_data.items():
            for name, value in metrics(model(x.to(device)), y.to(device)).items():
                out[f"{set_name}_{name}"] = float(value)
    return out


def make_data_workload(name: str, make_model: Callable[[], nn.Module], x_train: Tensor, y_train: Tensor,
                       x_val: Tensor, y_val: Tensor, *, goal: float, goal_metric: str = "val_error",
                       train_eval_size: int = TRAIN_EVAL_SIZE, info=None) -> DataWorkload:
    """A :class:`DataWorkload` for classification on fixed tensors (cross-entropy
    loss; val_* metrics on (x_val, y_val), train_* on the first ``train_eval_size``
    training examples)."""
    if len(x_train) != len(y_train) or len(x_val) != len(y_val):
        raise ValueError(f"{name}: inputs and targets differ in length "
                         f"(train {len(x_train)} vs {len(y_train)}, val {len(x_val)} vs {len(y_val)})")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"{name}: empty train or validation split")
    n = len(x_train)

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device):
        idx = torch.randint(n, (batch_size,), generator=generator)
        return x_train[idx].to(device), y_train[idx].to(device)

    eval_data = {"val": (x_val, y_val), "train": (x_train[:train_eval_size], y_train[:train_eval_size])}
    return DataWorkload(
        name=name, make_model=make_model, sample_batch=sample_batch, loss=F.cross_entropy,
        evaluate=functools.partial(_evaluate, eval_data, classification_metrics),
        goal_metric=goal_metric, goal=goal, eval_data=eval_data, metrics=classification_metrics,
        train_data=(x_train, y_train),
        info=dict(info or {}, train_size=n, val_size=len(x_val)))


def restrict_eval_sets(workload: Workload, sets) -> Workload:
    """A copy of a :class:`DataWorkload` that scores only the eval sets in ``sets``
    (evaluation dominates the cost of small-batch trials; the study scores
    the training subset only when asked to). Other workloads are returned as they are."""
    if not isinstance(workload, DataWorkload):
        return workload
    unknown = set(sets) - set(workload.eval_data)
    if unknown:
        raise ValueError(f"workload {workload.name!r} has no eval set(s) {sorted(unknown)}; "
                         f"it has {sorted(workload.eval_data)}")
    eval_data = {k: v for k, v in workload.eval_data.items() if k in sets}
    return dataclasses.replace(workload, eval_data=eval_data,
                               evaluate=functools.partial(_evaluate, eval_data, workload.metrics))


# ---------------------------------------------------------------- data

def _cache_dir() -> str:
    return os.environ.get("FASTSGD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastsgd"))


@functools.lru_cache(maxsize=4)
def mnist1d_arrays(num_samples: int = 10000, seed: int = 42) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D (x_train, y_train, x_val, y_val) from ``mnist1d.data.make_dataset``
    (80/20 split as the package makes it), inputs standardised with the training
    mean and std. Generated once, then cached on disk."""
    path = os.path.join(_cache_dir(), f"mnist1d-{num_samples}-{seed}.npz")
    if os.path.exists(path):
        d = dict(np.load(path))
    else:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise ImportError("the MNIST-1D workloads need the 'mnist1d' package: pip install mnist1d") from exc
        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        d = make_dataset(args)  # generated locally from the package's templates; no download
        d = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp.npz"
        np.savez(tmp, **d)
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written cache
    x, xv = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    return ((x - mean) / std, torch.tensor(d["y"], dtype=torch.long),
            (xv - mean) / std, torch.tensor(d["y_test"], dtype=torch.long))


@functools.lru_cache(maxsize=1)
def digits_arrays(val_size: int = 360, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn digits, pixels scaled to [0, 1], a fixed random split of ``val_size`` held out."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    perm = np.random.default_rng(seed).permutation(len(ds.target))
    x = torch.tensor(ds.data[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(ds.target[perm], dtype=torch.long)
    return x[val_size:], y[val_size:], x[:val_size], y[:val_size]


# ---------------------------------------------------------------- models

def mlp(in_features: int, hidden: int, depth: int, classes: int) -> nn.Sequential:
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


class CNN1d(nn.Module):
    """Three 1-D convolutions (stride 2 after the first) and a linear head, as in the MNIST-1D paper."""

    def __init__(self, length: int = 40, channels: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.head = nn.Linear(channels * ((length + 3) // 4), classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x.unsqueeze(-2)))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.head(h.flatten(-2))


# ---------------------------------------------------------------- the bundled workloads

def mnist1d_mlp(goal: float = 0.4) -> DataWorkload:
    """MNIST-1D, MLP 40-100-100-10 (ReLU); goal: val_error < ``goal``."""
    xt, yt, xv, yv = mnist1d_arrays()
    return make_data_workload("mnist1d-mlp", lambda: mlp(40, 100, 2, 10), xt, yt, xv, yv, goal=goal,
                              info={"dataset": "mnist1d", "model": "mlp"})


def mnist1d_cnn(goal: float = 0.15) -> DataWorkload:
    """MNIST-1D, 1-D CNN (3 conv layers of 32 channels); goal: val_error < ``goal``."""
    xt, yt, xv, yv = mnist1d_arrays()
    return make_data_workload("mnist1d-cnn", lambda: CNN1d(40, 32, 10), xt, yt, xv, yv, goal=goal,
                              info={"dataset": "mnist1d", "model": "cnn"})


def digits_mlp(goal: float = 0.05) -> DataWorkload:
    """scikit-learn digits, MLP 64-128-10 (ReLU); goal: val_error < ``goal``."""
    xt, yt, xv, yv = digits_arrays()
    return make_data_workload("digits-mlp", lambda: mlp(64, 128, 1, 10), xt, yt, xv, yv, goal=goal,
                              info={"dataset": "digits", "model": "mlp"})
