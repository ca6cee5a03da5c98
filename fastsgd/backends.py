"""Which kernel backend runs an optimizer step.

Backends share one functional signature (fastsgd/kernels/contract.py):
  reference  plain PyTorch in float64, the oracle; any device
  cpu        fused C++ (fastsgd._C), CPU tensors
  triton     Triton kernels, CUDA tensors (CPU tensors under TRITON_INTERPRET=1)
  cuda       CUDA C++ (fastsgd._C), CUDA tensors

Ghost batch norm registers here too (family "ghost_bn": torch, triton).
What each backend can do is its CAPABILITIES record (kernels/contract.py).

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
GHOST_BN_BACKENDS = ("torch", "triton")

# Every kernel family and its backends. Each module declares NAME,
# CAPABILITIES (fastsgd.kernels.contract.Capabilities), unavailable_reason()
# and supports(device, dtype).
REGISTRY: Dict[str, Dict[str, str]] = {
    "optimizer": {
        "reference": "fastsgd.kernels.reference",
        "cpu": "fastsgd.kernels.cpu",
        "triton": "fastsgd.kernels.triton_optim",
        "cuda": "fastsgd.kernels.cuda",
    },
    "ghost_bn": {
        "torch": "fastsgd.nn.ghost_bn_torch",
        "triton": "fastsgd.kernels.triton_ghost_bn",
    },
}

# Preference per device type for backend="auto". The CUDA order is
# provisional: no GPU run has measured triton against cuda yet. Triton comes
# first because its kernel bodies are also exercised by the CPU test suite
# (Triton interpreter); bench/optimizer_step.py --device cuda decides it.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}
# Ghost batch norm: the fused Triton kernels on CUDA, torch ops elsewhere
# (and for what triton does not support, e.g. float64).
GHOST_BN_AUTO_ORDER = {
    "cpu": ("torch",),
    "cuda": ("triton", "torch"),
}
_AUTO = {"optimizer": (AUTO_ORDER, ("reference",)), "ghost_bn": (GHOST_BN_AUTO_ORDER, ("torch",))}

ENV_VAR = "FASTSGD_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _load(name: str, family: str = "optimizer") -> tuple[Optional[ModuleType], Optional[str]]:
    path = REGISTRY[family][name]
    try:
        mod = importlib.import_module(path)
    except ImportError as exc:
        return None, f"{path} could not be imported: {exc}"
    reason = mod.unavailable_reason()
    return (None, reason) if reason else (mod, None)


def available_backends(family: str = "optimizer") -> Dict[str, Optional[str]]:
    """Every backend name of ``family`` mapped to None when usable here, else to the reason it is not."""
    return {name: _load(name, family)[1] for name in REGISTRY[family]}


def capabilities(name: str, family: str = "optimizer"):
    """The Capabilities record of an available backend (BackendUnavailable otherwise)."""
    mod, reason = _load(name, family)
    if mod is None:
        raise BackendUnavailable(f"fastsgd backend {name!r} is not available: {reason}")
    return mod.CAPABILITIES


def stacked_trial_backends() -> list:
    """Names of the optimizer backends available here whose capabilities include stacked trials
    (``sgd_step(..., stacked_trials=True)``), in registry order."""
    return [name for name, reason in available_backends().items()
            if reason is None and capabilities(name).stacked_trials]


def validate_name(backend: str, family: str = "optimizer") -> str:
    if backend != "auto" and backend not in REGISTRY[family]:
        raise ValueError(f"Invalid backend: {backend!r}; choose 'auto' or one of {', '.join(REGISTRY[family])}")
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
    return (dense or mod.CAPABILITIES.strided) and all(mod.supports(device, dt) for dt in dtypes)


def get_backend(name: str, device: torch.device, dtypes=(), *, dense: bool = True,
                family: str = "optimizer") -> ModuleType:
    """The kernel module of ``family`` that will run tensors of ``dtypes`` on ``device``.

    ``dense=False`` means some tensor does not cover its memory exactly once
    (a strided view); only backends whose capabilities say ``strided`` take
    those. For "auto": the first backend of the family's auto order that is
    available and handles the tensors. For a named backend: that module, or
    BackendUnavailable / a TypeError naming what it does not support.
    """
    device = torch.device(device)
    if name == "auto":
        order, fallback = _AUTO[family]
        for candidate in order.get(device.type, fallback):
            mod, _ = _load(candidate, family)
            if mod is not None and _handles(mod, device, dtypes, dense):
                return mod
        raise BackendUnavailable(f"no fastsgd backend supports {sorted(map(str, dtypes))} on {device}")
    mod, reason = _load(name, family)
    if mod is None:
        raise BackendUnavailable(f"fastsgd backend {name!r} is not available: {reason}")
    caps = mod.CAPABILITIES
    if not dense and not caps.strided:
        raise TypeError(f"fastsgd backend {name!r} needs dense parameters (contiguous, channels_last or "
                        "any other layout without gaps); use backend='reference' (or 'auto') for strided views")
    for dt in dtypes:
        if not mod.supports(device, dt):
            what = (f"{dt} tensors" if dt not in caps.dtypes else "tensors") + f" on {device}"
            raise TypeError(f"fastsgd backend {name!r} does not support {what} (it takes {caps.dtype_names()} "
                            f"{caps.devices}); use backend='{_AUTO[family][1][0]}' (or 'auto') for them")
    return mod
