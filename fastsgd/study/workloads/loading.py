"""Load a user's own workload from ``package.module:factory``."""
from __future__ import annotations

import dataclasses
import importlib

from fastsgd.study.workloads.base import Workload


def load_workload(spec: str, **overrides) -> Workload:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"workload {spec!r}: write package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"workload {spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"workload {spec!r}: module {module_name!r} has no attribute {attr!r}")
    workload = factory()
    if not isinstance(workload, Workload):
        raise ValueError(f"workload {spec!r}: {attr}() returned {type(workload).__name__}, not a fastsgd.study.Workload")
    return dataclasses.replace(workload, **overrides) if overrides else workload
