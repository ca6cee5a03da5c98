"""Running a fastsgd optimizer per bucket, inside the backward pass.

The reducer calls ``optimizer.step_subset(bucket_params)`` once a bucket's
all-reduce has finished (see reducer.py for when). The user's loop stays
``loss.backward(); optimizer.step(); optimizer.zero_grad()``: this module
replaces ``optimizer.step`` (on the instance, not the class) by a version that
steps only what the backward pass did not step already -- parameters outside
the wrapped module, every parameter after a ``no_sync()`` backward, or all of
them when per-bucket stepping is impossible.

It hides the already-stepped parameters' grads (sets them to None) for the
duration of the original ``step()`` and puts them back afterwards, so the
original step, its hooks and anything that wrapped it (LR schedulers count
``step()`` calls) run unchanged.
"""
from __future__ import annotations

import types
from typing import Optional

from fastsgd.distributed.reducer import Reducer
from fastsgd.optim.base import FusedOptimizer

_SCALER_ERROR = (
    "BucketedDataParallel(optimizer=...) updates parameters during backward, before a GradScaler can unscale "
    "the gradients and check them for inf/NaN, so GradScaler is not supported with the per-bucket step. "
    "Use BucketedDataParallel(module) without optimizer= and call scaler.step(optimizer) as usual, "
    "or train in bfloat16, which needs no loss scaling")


def per_bucket_step_possible(optimizer: FusedOptimizer) -> Optional[str]:
    """None when the optimizer can step bucket by bucket, else the reason."""
    if getattr(optimizer, "max_grad_norm", None) is not None:
        return ("it clips by the norm of all gradients (max_grad_norm), which is known only when every bucket "
                "is reduced")
    return None


def check_optimizer(optimizer) -> None:
    """Raise unless ``optimizer`` can be attached (checked before any collective)."""
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"BucketedDataParallel(optimizer=...) needs a fastsgd optimizer (fastsgd.SGD, "
                        f"Momentum, Nesterov, LARS, LAMB), got {type(optimizer).__module__}."
                        f"{type(optimizer).__name__}; pass optimizer=None to use any optimizer after backward")
    if getattr(optimizer, "_fastsgd_overlap", None) is not None:
        raise RuntimeError("this optimizer is already attached to a BucketedDataParallel")


class OptimizerOverlap:
    """Connects a fastsgd optimizer to a Reducer; see the module docstring."""

    def __init__(self, optimizer: FusedOptimizer, reducer: Reducer):
        check_optimizer(optimizer)
        self.optimizer = optimizer
        self.reducer = reducer
        self.fallback_reason = per_bucket_step_possible(optimizer)
        if self.fallback_reason is None:
            reducer.step_bucket = optimizer.step_subset
        self._original_step = optimizer.step
        # A method bound to the optimizer, as LR schedulers expect when they wrap ``step``.
        optimizer.step = types.MethodType(_overlapped_step, optimizer)
        optimizer._fastsgd_overlap = self

    @property
    def per_bucket(self) -> bool:
        return self.fallback_reason is None

    def step(self, closure=None):
        """Step what the backward pass has not stepped (see the module docstring)."""
        if closure is not None:
            raise RuntimeError("BucketedDataParallel(optimizer=...) steps during backward, so step(closure) "
                               "cannot re-evaluate the model; call backward yourself, then step()")
        done = [self.reducer.params[i] for i in self.reducer.stepped]
        if done and getattr(self.optimizer, "found_inf", None) is not None:
            raise RuntimeError(_SCALER_ERROR)
        hidden = [(p, p.grad) for p in done if p.grad is not None]
        for p, _ in hidden:
            p.grad = None
        try:
            return self._original_step()
        finally:
            for p, g in hidden:
                p.grad = g
            self.reducer.stepped.clear()


def _overlapped_step(optimizer: FusedOptimizer, closure=None):
    """``optimizer.step`` while attached to a BucketedDataParallel: steps only
    the parameters the backward pass has not already stepped."""
    return optimizer._fastsgd_overlap.step(closure)
