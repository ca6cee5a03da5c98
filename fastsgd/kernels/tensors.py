"""Small tensor helpers every kernel backend (and the layers above) share.

They live here, below the optimizer layer, so that the kernels import nothing
from ``fastsgd.optim``: the optimizers, the bucketed all-reduce and the
backends all read tensors through the same few rules.
"""
from __future__ import annotations

import contextlib
from operator import attrgetter
from typing import List, Sequence, Union

import torch
from torch import Tensor

_dtype = attrgetter("dtype")
_device = attrgetter("device")
_is_contiguous = Tensor.is_contiguous
_numel = Tensor.numel

Scalar = Union[float, Tensor]


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers its memory exactly once (contiguous,
    channels_last, any permutation), so kernels may treat it as flat."""
    if t.is_contiguous():
        return True
    if any(s == 0 for s in t.stride()):
        return False
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.numel() == 0 or span == t.numel()


def grad_like_param(g: Tensor, p: Tensor) -> Tensor:
    """``g`` laid out like ``p`` in memory (a copy only when the layouts differ),
    so a kernel can walk param, grad and state with one flat index."""
    if g.stride() == p.stride():
        return g
    out = torch.empty_like(p)
    out.copy_(g)
    return out


def grads_fit(grads: Sequence[Tensor], numels: tuple, dtypes: tuple, device: torch.device) -> bool:
    """True when every grad is contiguous, on ``device`` and has its param's
    element count and dtype (``numels``/``dtypes``, per param). The backends'
    table caches are keyed on params and state only, because autograd
    re-creates grads every step with ``zero_grad(set_to_none=True)``, at
    addresses that move; this cheap check stands in for the full one when
    only the grads are new (a handful of attribute reads per tensor)."""
    return (tuple(map(_numel, grads)) == numels and tuple(map(_dtype, grads)) == dtypes
            and all(map(_is_contiguous, grads)) and set(map(_device, grads)) <= {device})


def first_step_flags(op: str, first_step: Union[bool, Sequence[bool]], n: int) -> List[bool]:
    """``first_step`` (one flag for all, or one per param) as n flags; every
    backend reads the argument through this."""
    if isinstance(first_step, bool):
        return [first_step] * n
    flags = [bool(f) for f in first_step]
    if len(flags) != n:
        raise ValueError(f"{op}: first_step has {len(flags)} entries for {n} params")
    return flags


def device_guard(device: torch.device):
    """A context that makes ``device`` the current CUDA device and restores the
    caller's afterwards (nothing to do for other devices). Every GPU op runs
    under its params' device: launches then go to that device's context and
    current stream, and a step on ``cuda:1`` leaves the caller on ``cuda:0``."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
def trial_hparams(op: str, stacked_trials: bool, **hps: Scalar) -> List[Scalar]:
    """``hps`` (lr, momentum of sgd_step) as the caller meant them: 1-D tensors
    hold one value per trial only with ``stacked_trials=True``; otherwise a
    1-element tensor is a single value and a longer one is an error. Every
    backend reads the arguments through this, so stacking is never inferred
    from a shape."""
    if stacked_trials:
        return list(hps.values())
    return _single_values(op, "pass stacked_trials=True for one value per trial, else a float or a 1-element "
                              "tensor", hps)


def single_hparams(op: str, **hps: Scalar) -> List[Scalar]:
    """``hps`` of an op without stacked trials (lars_step, lamb_step): each a float, None or a tensor
    with one element (returned 0-dim, as torch.optim takes ``lr=torch.tensor([0.1])``); a tensor with
    several values is an error, never one value per trial."""
    return _single_values(op, "stacked trials (one value per trial) are supported by "
                              "sgd_step(..., stacked_trials=True) only; give a float or a 1-element tensor", hps)


def _single_values(op: str, hint: str, hps) -> List[Scalar]:
    out = []
    for name, x in hps.items():
        if isinstance(x, Tensor) and x.ndim > 0:
            if x.numel() != 1:
                raise ValueError(f"{op}: {name} has {x.numel()} values (shape {tuple(x.shape)}); {hint}")
            x = x.reshape(())
        out.append(x)
    return out
