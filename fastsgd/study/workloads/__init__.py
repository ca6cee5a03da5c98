"""Workloads: what the harness trains and times.

- :mod:`.base`: the :class:`~fastsgd.study.workloads.base.Workload` record every measurement takes
- :mod:`.data`: real-data workloads with fixed splits (MNIST-1D, scikit-learn digits)
- :mod:`.least_squares`: a Gaussian least-squares problem whose noise scale is known in closed form
- :mod:`.images`: a small CNN with batch norm (or ghost batch norm) on the digits images
- :mod:`.charlm`: a character-level GPT on the Python standard library's own source
- :mod:`.synthetic`: random-input models for timing steps (CNNs, a Transformer, timm/torchvision)
- :mod:`.models`: the small model definitions the synthetic workloads use

:func:`get_workload` is the registry of the trainable workloads by name; it also loads a user's own
workload given as ``package.module:factory`` (:mod:`.loading`).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

from fastsgd.study.workloads.base import Workload
from fastsgd.study.workloads.data import digits_mlp, mnist1d_cnn, mnist1d_mlp


def _elsewhere(module: str, factory: str, **fixed) -> Callable[..., Workload]:
    """A factory of another module, imported when called (the language model reads its corpus then)."""
    def make(**kwargs) -> Workload:
        return getattr(importlib.import_module(module), factory)(**fixed, **kwargs)
    return make


WORKLOADS: Dict[str, Callable[..., Workload]] = {
    "mnist1d-mlp": mnist1d_mlp,
    "mnist1d-cnn": mnist1d_cnn,
    "digits-mlp": digits_mlp,
    "digits-cnn-bn": _elsewhere("fastsgd.study.workloads.images", "digits_cnn_bn"),
    "digits-cnn-ghostbn": _elsewhere("fastsgd.study.workloads.images", "digits_cnn_ghostbn"),
    "stdlib-charlm": _elsewhere("fastsgd.study.workloads.charlm", "stdlib_charlm", size="small"),
    "stdlib-charlm-large": _elsewhere("fastsgd.study.workloads.charlm", "stdlib_charlm", size="large"),
}


# Synthetic timing models that also contain a colon; everything else with one is a user's module:factory.
_ZOO_PREFIXES = ("torchvision", "timm")


def is_user_workload(name: str) -> bool:
    """True for ``package.module:factory`` (a user's own workload)."""
    return ":" in name and name.split(":", 1)[0] not in _ZOO_PREFIXES


def get_workload(name: str, **kwargs) -> Workload:
    """A bundled workload by name (``WORKLOADS``), ``least-squares``
    (:func:`fastsgd.study.workloads.least_squares.least_squares_workload`), or a user's own
    ``package.module:factory`` (keyword arguments such as ``goal`` then override the returned fields)."""
    if is_user_workload(name):
        import dataclasses

        from fastsgd.study.workloads.loading import check_workload, load_workload
        workload = load_workload(name)
        return check_workload(dataclasses.replace(workload, **kwargs), where=name) if kwargs else workload
    if name == "least-squares":
        from fastsgd.study.workloads.least_squares import least_squares_workload
        return least_squares_workload(**kwargs)
    if name not in WORKLOADS:
        raise ValueError(f"Unknown workload: {name!r}; choose one of {', '.join(sorted(WORKLOADS))}, least-squares, "
                         "or your own as package.module:factory")
    return WORKLOADS[name](**kwargs)
