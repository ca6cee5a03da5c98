"""Optimizers by name, so that benchmarks and the study can take them from a
command line: ``make_optimizer("fastsgd-nesterov:cpu", model.parameters(), lr=0.1)``.

A spec is ``NAME`` or ``NAME:BACKEND``; the backend suffix (one of
``fastsgd.backends.BACKENDS`` or ``auto``) is for fastsgd optimizers only.

    torch-sgd          torch.optim.SGD with momentum, PyTorch's default implementation for the device
    torch-sgd-foreach  torch.optim.SGD(foreach=True)  (multi-tensor)
    torch-sgd-fused    torch.optim.SGD(fused=True)    (fused kernel)
    fastsgd-sgd        fastsgd.SGD with momentum      (the same update as torch-sgd*)
    fastsgd-nesterov   fastsgd.Nesterov
    fastsgd-lars       fastsgd.LARS (adapts when weight_decay != 0, as timm's Lars)
    fastsgd-lamb       fastsgd.LAMB (``momentum`` is not used: LAMB has betas)
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch

OPTIMIZERS: Dict[str, str] = {
    "torch-sgd": "torch.optim.SGD, momentum, default implementation",
    "torch-sgd-foreach": "torch.optim.SGD, momentum, foreach=True",
    "torch-sgd-fused": "torch.optim.SGD, momentum, fused=True",
    "fastsgd-sgd": "fastsgd.SGD, momentum",
    "fastsgd-nesterov": "fastsgd.Nesterov",
    "fastsgd-lars": "fastsgd.LARS",
    "fastsgd-lamb": "fastsgd.LAMB",
}

_TORCH_FLAGS = {"torch-sgd": {}, "torch-sgd-foreach": {"foreach": True}, "torch-sgd-fused": {"fused": True}}


def parse_optimizer_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"fastsgd-lars:triton"`` -> ``("fastsgd-lars", "triton")``; no suffix -> backend None."""
    from fastsgd.backends import validate_name

    name, sep, backend = spec.partition(":")
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)} "
                         "(fastsgd ones optionally with :BACKEND)")
    if not sep:
        return name, None
    if name in _TORCH_FLAGS:
        raise ValueError(f"Optimizer {spec!r}: a :BACKEND suffix applies to fastsgd optimizers only; "
                         f"for torch SGD pick torch-sgd, torch-sgd-foreach or torch-sgd-fused")
    return name, validate_name(backend)


def make_optimizer(spec: str, params: Iterable, *, lr: float = 0.01, momentum: float = 0.9,
                   weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer named by ``spec`` over ``params``. ``kwargs`` go to
    the constructor unchanged (e.g. ``trust_coeff=`` for LARS, ``betas=`` for LAMB)."""
    import fastsgd

    name, backend = parse_optimizer_spec(spec)
    if name in _TORCH_FLAGS:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               **_TORCH_FLAGS[name], **kwargs)
    kwargs["backend"] = backend or "auto"
    if name == "fastsgd-lamb":
        return fastsgd.LAMB(params, lr=lr, weight_decay=weight_decay, **kwargs)
    cls = {"fastsgd-sgd": fastsgd.SGD, "fastsgd-nesterov": fastsgd.Nesterov, "fastsgd-lars": fastsgd.LARS}[name]
    return cls(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """What runs the step, e.g. "fastsgd backend cpu" or "torch foreach": for
    fastsgd optimizers the backend picked for the parameters' device and dtypes
    (raises BackendUnavailable/TypeError, with the reason, if the requested one
    cannot run them: call this before timing anything)."""
    from fastsgd.backends import get_backend
    from fastsgd.kernels.tensors import is_dense
    from fastsgd.optim.base import FusedOptimizer

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("the optimizer has no parameters")
    if isinstance(optimizer, FusedOptimizer):
        kernels = get_backend(optimizer.backend, params[0].device, {p.dtype for p in params},
                              dense=all(is_dense(p) for p in params))
        return f"fastsgd backend {kernels.NAME}"
    defaults = optimizer.defaults
    if defaults.get("fused"):
        return "torch fused"
    if defaults.get("foreach"):
        return "torch foreach"
    return "torch default"
