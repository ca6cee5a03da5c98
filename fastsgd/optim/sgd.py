"""SGD, Momentum and Nesterov: drop-ins for torch.optim.SGD.

Update rule (PyTorch/TensorFlow form, the default), with g the gradient
(negated if ``maximize``) plus ``weight_decay * p``:

    b_1 = g,   b_t = mu * b_{t-1} + (1 - tau) * g          (tau = dampening)
    d   = g + mu * b_t  (Nesterov)   or   b_t
    p  <- p - lr * d

``lr_in_momentum=True`` is the Sutskever et al. / Goyal et al. form, where the
buffer holds a velocity that already includes the learning rate:

    v_1 = lr * g,   v_t = mu * v_{t-1} + (1 - tau) * lr * g
    d   = lr * g + mu * v_t  (Nesterov)   or   v_t
    p  <- p - d

With a constant lr the two are the same trajectory (v = lr * b). When lr
changes (warm-up, decay) they differ: at a change lr_old -> lr_new the
default form rescales the whole accumulated history by the new lr at once
(p moves by lr_new * mu * b), the velocity form keeps the old steps at the
old lr and blends in the new one over ~1/(1-mu) steps. The momentum buffers of
the two forms are therefore not interchangeable (v = lr * b).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from fastsgd.optim.base import FusedOptimizer, GroupWork, check_non_negative

_DIFFERENTIABLE_ERROR = ("fastsgd optimizers do not support differentiable=True: the step is an in-place "
                         "fused kernel that autograd cannot see through. Use torch.optim.SGD(differentiable=True) "
                         "to differentiate through optimizer steps.")


def check_torch_compat_flags(foreach, fused, differentiable) -> None:
    """torch.optim.SGD's ``foreach=``/``fused=`` are accepted and mean "use the
    fastest fused backend" (which fastsgd always does); ``differentiable=True``
    is refused."""
    if differentiable:
        raise RuntimeError(_DIFFERENTIABLE_ERROR)
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_nesterov(group: Dict[str, Any]) -> None:
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def rounding_kwargs(opt) -> Dict[str, bool]:
    """``stochastic_rounding=True`` for the kernel call when asked for; left
    out otherwise so that backends without the option keep working."""
    return {"stochastic_rounding": True} if getattr(opt, "stochastic_rounding", False) else {}


def hp_float(value: Any) -> float:
    """A hyperparameter other than lr as a Python float (tensors are read once)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class MomentumBuffers:
    """State of the SGD family and LARS: one ``momentum_buffer`` per param
    (torch.optim.SGD's layout), created as zeros in ``momentum_dtype`` (default:
    the param's dtype) on the first step that updates the param."""

    momentum_dtype: Optional[torch.dtype] = None

    def _new_state(self, group, params, states):
        if group["momentum"] == 0:
            return [False] * len(params)
        return [st is None or st.get("momentum_buffer") is None for st in states]

    def _init_state(self, group, p):
        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format,
                                                            dtype=self.momentum_dtype or p.dtype)

    def _momentum_buffers(self, work: GroupWork, momentum: float) -> Optional[List[Tensor]]:
        return [st["momentum_buffer"] for st in work.states] if momentum != 0 else None


class SGD(MomentumBuffers, FusedOptimizer):
    r"""Stochastic gradient descent, optionally with momentum or Nesterov momentum.

    A drop-in for :class:`torch.optim.SGD`: same arguments, defaults,
    validation messages, param groups, ``state_dict()`` layout
    (``state[i]["momentum_buffer"]``) and update, but each step runs as one
    fused kernel call per param group (see ``fastsgd.available_backends()``).

    Extra arguments: ``lr_in_momentum`` (see the module docstring),
    ``momentum_dtype`` (dtype of new momentum buffers; default: the param's),
    ``stochastic_rounding`` (round bfloat16 momentum buffers stochastically --
    unbiased; GPU backends only, the cpu backend raises, the reference rounds
    to nearest) and ``backend`` ("auto", "reference", "cpu", "triton", "cuda";
    the ``FASTSGD_BACKEND`` environment variable stands in for "auto").
    ``foreach``/``fused`` are accepted for compatibility and change nothing;
    ``differentiable=True`` raises.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 lr_in_momentum: bool = False, foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, momentum_dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = False, backend: str = "auto"):
        check_non_negative("lr", lr, "learning rate")
        check_non_negative("momentum", momentum, "momentum value")
        check_non_negative("weight_decay", weight_decay, "weight_decay value")
        check_torch_compat_flags(foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, lr_in_momentum=lr_in_momentum)
        self.momentum_dtype = momentum_dtype
        self.stochastic_rounding = bool(stochastic_rounding)
        super().__init__(params, defaults, backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("stochastic_rounding", False)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)
            group.setdefault("lr_in_momentum", False)

    def _check_group(self, group):
        check_non_negative("lr", group["lr"], "learning rate")
        check_non_negative("momentum", group["momentum"], "momentum value")
        check_non_negative("weight_decay", group["weight_decay"], "weight_decay value")
        check_nesterov(group)
        if group.get("differentiable"):
            raise RuntimeError(_DIFFERENTIABLE_ERROR)

    def _run_group(self, kernels, work: GroupWork, new_state: List[bool], *, grad_scale, found_inf):
        g = work.group
        momentum = hp_float(g["momentum"])
        bufs = self._momentum_buffers(work, momentum)
        kernels.sgd_step(work.params, work.grads, bufs, lr=g["lr"], momentum=momentum,
                         dampening=hp_float(g["dampening"]), weight_decay=hp_float(g["weight_decay"]),
                         nesterov=bool(g["nesterov"]), maximize=bool(g["maximize"]),
                         lr_in_momentum=bool(g["lr_in_momentum"]), first_step=new_state,
                         grad_scale=grad_scale, found_inf=found_inf, **rounding_kwargs(self))


class Momentum(SGD):
    """SGD with (heavy-ball) momentum on by default: ``Momentum(params, lr, momentum=0.9)``."""

    def __init__(self, params, lr: float | Tensor, momentum: float = 0.9, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, **kwargs):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, **kwargs)


class Nesterov(SGD):
    """SGD with Nesterov momentum: ``Nesterov(params, lr, momentum=0.9)``."""

    def __init__(self, params, lr: float | Tensor, momentum: float = 0.9, dampening: float = 0,
                 weight_decay: float | Tensor = 0, **kwargs):
        super().__init__(params, lr, momentum, dampening, weight_decay, True, **kwargs)
