"""LARS: a drop-in for timm's ``Lars`` (the de-facto PyTorch LARS).

Per parameter tensor, when ``weight_decay != 0`` or ``always_adapt``:

    r = trust_coeff * |p| / (|g| + weight_decay * |p| + eps)   (r = 1 if |p| = 0 or |g| = 0)
    r = min(r / lr, 1)                                           if trust_clip (LARC)
    g <- (g + weight_decay * p) * r

then SGD momentum / Nesterov exactly as fastsgd.SGD (lr outside the buffer,
or inside with ``lr_in_momentum``). Unlike timm, ``p.grad`` is not modified.
Exclude biases and norm weights from adaptation by giving them a group with
``weight_decay=0`` (see ``fastsgd.param_groups``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from fastsgd.optim.base import FusedOptimizer, GroupWork, check_non_negative, lr_arg
from fastsgd.optim.sgd import MomentumBuffers, check_nesterov, hp_float, rounding_kwargs


class LARS(MomentumBuffers, FusedOptimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) with timm's rule and flags.
    ``momentum_dtype`` and ``stochastic_rounding`` as in fastsgd.SGD."""

    _HOST_HPARAMS = ("momentum", "dampening", "weight_decay", "trust_coeff", "eps")
    _GROUP_DEFAULTS = {"nesterov": False, "trust_clip": False, "always_adapt": False, "lr_in_momentum": False}

    def __init__(self, params, lr: float | Tensor, momentum: float = 0.9, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, trust_coeff: float = 0.001,
                 eps: float = 1e-8, trust_clip: bool = False, always_adapt: bool = False,
                 lr_in_momentum: bool = False, momentum_dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = False, backend: str = "auto"):
        check_non_negative("lr", lr, "learning rate", read_device=True)
        check_non_negative("momentum", momentum, "momentum value")
        check_non_negative("weight_decay", weight_decay, "weight_decay value")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                        always_adapt=always_adapt, lr_in_momentum=lr_in_momentum)
        self.momentum_dtype = momentum_dtype
        self.stochastic_rounding = bool(stochastic_rounding)
        super().__init__(params, defaults, backend=backend)

    def _check_group(self, group):
        check_non_negative("lr", group["lr"], "learning rate")
        check_non_negative("momentum", group["momentum"], "momentum value")
        check_non_negative("weight_decay", group["weight_decay"], "weight_decay value")
        check_non_negative("trust_coeff", group["trust_coeff"], "trust_coeff value")
        check_non_negative("eps", group["eps"], "epsilon value")
        check_nesterov(group)

    def _run_group(self, kernels, work: GroupWork, new_state: List[bool], *, grad_scale, found_inf):
        g = work.group
        momentum = hp_float(g["momentum"])
        bufs = self._momentum_buffers(kernels, work, momentum)
        kernels.lars_step(work.params, work.grads, bufs, lr=lr_arg(g["lr"]), momentum=momentum,
                          dampening=hp_float(g["dampening"]), weight_decay=hp_float(g["weight_decay"]),
                          nesterov=bool(g["nesterov"]), trust_coeff=hp_float(g["trust_coeff"]),
                          eps=hp_float(g["eps"]), trust_clip=bool(g["trust_clip"]),
                          always_adapt=bool(g["always_adapt"]), lr_in_momentum=bool(g["lr_in_momentum"]),
                          first_step=new_state, grad_scale=grad_scale, found_inf=found_inf,
                          **rounding_kwargs(self))
