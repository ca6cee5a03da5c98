"""fastsgd: fast large-batch SGD for PyTorch.

- Fused optimizers: SGD, Momentum, Nesterov, LARS, LAMB (drop-ins for torch.optim.SGD / timm Lars)
- fastsgd.nn: ghost batch norm
- fastsgd.distributed: bucketed all-reduce overlapped with backward and the optimizer step
- fastsgd.study: step time and steps-to-result against batch size, critical batch size
"""
from fastsgd.backends import BackendUnavailable, available_backends
from fastsgd.noise_scale import GradientNoiseScale
from fastsgd.optim import LAMB, LARS, SGD, Momentum, Nesterov, param_groups

__version__ = "0.1.0"

__all__ = ["SGD", "Momentum", "Nesterov", "LARS", "LAMB", "param_groups", "available_backends",
           "BackendUnavailable", "GradientNoiseScale", "__version__"]


def __getattr__(name: str):
    # fastsgd.nn and fastsgd.distributed load on first use (distributed imports
    # torch.distributed, which plain optimizer users do not need).
    if name in ("nn", "distributed", "study"):
        import importlib
        return importlib.import_module(f"fastsgd.{name}")
    raise AttributeError(f"module 'fastsgd' has no attribute {name!r}")
