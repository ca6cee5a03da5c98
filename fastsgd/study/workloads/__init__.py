"""Workloads: what the harness trains and times.

- :mod:`.base`: the :class:`~fastsgd.study.workloads.base.Workload` record every measurement takes
- :mod:`.data`: real-data workloads with fixed splits (MNIST-1D, scikit-learn digits)
- :mod:`.least_squares`: a Gaussian least-squares problem whose noise scale is known in closed form
- :mod:`.synthetic`: random-input models for timing steps (CNNs, a Transformer, timm/torchvision)
- :mod:`.models`: the small model definitions the synthetic workloads use

:func:`get_workload` is the registry of the trainable workloads by name.
"""
from __future__ import annotations

from typing import Callable, Dict

from fastsgd.study.workloads.base import Workload
from fastsgd.study.workloads.data import digits_mlp, mnist1d_cnn, mnist1d_mlp

WORKLOADS: Dict[str, Callable[..., Workload]] = {
    "mnist1d-mlp": mnist1d_mlp,
    "mnist1d-cnn": mnist1d_cnn,
    "digits-mlp": digits_mlp,
}


def get_workload(name: str, **kwargs) -> Workload:
    """A bundled workload by name (``WORKLOADS``), or ``least-squares``
    (:func:`fastsgd.study.workloads.least_squares.least_squares_workload`)."""
    if name == "least-squares":
        from fastsgd.study.workloads.least_squares import least_squares_workload
        return least_squares_workload(**kwargs)
    if name not in WORKLOADS:
        raise ValueError(f"Unknown workload: {name!r}; choose one of {', '.join(sorted(WORKLOADS))}, least-squares")
    return WORKLOADS[name](**kwargs)
