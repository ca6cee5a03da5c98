"""Load a user's own workload from ``"package.module:factory"``.

The factory is any callable that returns a :class:`fastsgd.study.Workload`
(keyword arguments are passed through). The module is imported with the
current directory on ``sys.path``, as ``python -m`` would. The loaded workload is checked before
a study spends time on it, and every problem is reported by name: the module
that cannot be imported, the missing attribute, a factory that returns
something else, a workload without ``evaluate`` or without a goal, a loss
that is not a scalar on a real batch.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from fastsgd.study import (
    Workload,  # the package export, wherever the protocol module lives
)


class WorkloadError(ValueError):
    """A workload spec that cannot be loaded or a workload the study cannot use."""


def _import(spec: str):
    if spec.count(":") != 1:
        raise WorkloadError(f"workload {spec!r}: expected 'package.module:factory'")
    module_name, attr = spec.split(":")
    if not module_name or not attr:
        raise WorkloadError(f"workload {spec!r}: expected 'package.module:factory'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a console script would not find the user's modules
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):  # it, or its package
            raise WorkloadError(f"workload {spec!r}: module {module_name!r} not found (sys.path starts with "
                                f"{sys.path[:3]}; run from the directory that holds it or install it)") from exc
        raise  # the module exists but one of its own imports failed: keep the real error
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise WorkloadError(f"workload {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise WorkloadError(f"workload {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def check_workload(workload, where: str = "workload", *, batch_size: int = 2) -> Workload:
    """Raise :class:`WorkloadError` naming what a study would trip over; return the workload.

    Builds the model once and runs the loss on one batch of ``batch_size`` (on the CPU)."""
    if not isinstance(workload, Workload):
        raise WorkloadError(f"{where} returned a {type(workload).__name__}, not a fastsgd.study.Workload")
    name = workload.name
    missing = [f for f in ("make_model", "sample_batch", "loss") if not callable(getattr(workload, f, None))]
    if missing:
        raise WorkloadError(f"workload {name!r} ({where}): {', '.join(missing)} must be callable")
    if workload.evaluate is None and getattr(workload, "metrics", None) is None:
        raise WorkloadError(f"workload {name!r} ({where}) has no evaluate(); a study needs held-out metrics")
    if workload.goal is None:
        raise WorkloadError(f"workload {name!r} ({where}) has no goal: set Workload.goal (a value of "
                            f"{workload.goal_metric!r}) or pass one to the study")
    torch.manual_seed(0)
    model = workload.make_model()
    x, y = workload.sample_batch(batch_size, torch.Generator().manual_seed(0), torch.device("cpu"))
    loss = workload.loss(model(x), y)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise WorkloadError(f"workload {name!r} ({where}): loss must be a scalar tensor (the mean over the "
                            f"batch), got {shape}")
    if not loss.is_floating_point():
        raise WorkloadError(f"workload {name!r} ({where}): loss has dtype {loss.dtype}, not floating point")
    return workload


def load_workload(spec: str, **kwargs) -> Workload:
    """``"package.module:factory"`` -> the checked Workload ``factory(**kwargs)`` returns."""
    factory = _import(spec)
    return check_workload(factory(**kwargs), where=spec)
