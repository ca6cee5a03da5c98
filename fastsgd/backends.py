"""Which kernel backend runs an optimizer step.

Backends share one functional signature (see fastsgd/kernels/reference.py):
  reference  plain PyTorch in float64, the oracle; any device
  cpu        fused C++ (fastsgd._C), CPU tensors
  triton     Triton kernels, CUDA tensors (CPU tensors under TRITON_INTERPRET=1)
  cuda       CUDA C++ (fastsgd._C), CUDA tensors

``"auto"`` picks the first available backend for the device from AUTO_ORDER;
an explicitly requested backend that is missing raises BackendUnavailable
with the reason.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

_MODULES = {
    "reference": "fastsgd.kernels.reference",
    "cpu": "fastsgd.kernels.cpu",
    "triton": "fastsgd.kernels.triton_optim",
    "cuda": "fastsgd.kernels.cuda",
}

# Preference per device type for backend="auto". The CUDA order is
# provisional: no GPU run has measured triton against cuda yet. Triton comes
# first because its kernel bodies are also exercised by the CPU test suite
# (Triton interpreter); bench/optimizer_step.py --device cuda decides it.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

ENV_VAR = "FASTSGD_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _load(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        return None, f"{_MODULES[name]} could not be imported: {exc}"
    reason = mod.unavailable_reason()
    return (None, reason) if reason else (mod, None)


def available_backends() -> Dict[str, Optional[str]]:
    """Every backend name mapped to None when usable here, else to the reason it is not."""
    return {name: _load(name)[1] for name in BACKENDS}


def validate_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    return backend


def requested_backend(backend: str) -> str:
    """The constructor's ``backend=``, with FASTSGD_BACKEND standing in for "auto"."""
    validate_name(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            try:
                return validate_name(env)
            except ValueError as exc:
                raise ValueError(f"{ENV_VAR}={env!r}: {exc}") from None
    return backend


def _handles(mod: ModuleType, device: torch.device, dtypes, dense: bool) -> bool:
    return (dense or getattr(mod, "STRIDED", False)) and all(mod.supports(device, dt) for dt in dtypes)


def get_backend(name: str, device: torch.device, dtypes=(), *, dense: bool = True) -> ModuleType:
    """The kernel module that will run tensors of ``dtypes`` on ``device``.

    ``dense=False`` means some tensor does not cover its memory exactly once
    (a strided view); only backends with ``STRIDED = True`` take those.
    For "auto": the first backend of AUTO_ORDER that is available and handles
    the tensors. For a named backend: that module, or BackendUnavailable / a
    TypeError naming what it does not support.
    """
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            mod, _ = _load(candidate)
            if mod is not None and _handles(mod, device, dtypes, dense):
                return mod
        raise BackendUnavailable(f"no fastsgd backend supports {sorted(map(str, dtypes))} on {device}")
    mod, reason = _load(name)
    if mod is None:
        raise BackendUnavailable(f"fastsgd backend {name!r} is not available: {reason}")
    if not dense and not getattr(mod, "STRIDED", False):
        raise TypeError(f"fastsgd backend {name!r} needs dense parameters (contiguous, channels_last or "
                        "any other layout without gaps); use backend='reference' (or 'auto') for strided views")
    for dt in dtypes:
        if not mod.supports(device, dt):
            raise TypeError(f"fastsgd backend {name!r} does not support {dt} tensors on {device}; "
                            f"use backend='reference' (or 'auto') for them")
    return mod
