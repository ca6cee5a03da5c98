"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as
timm's ``Lamb`` computes it:

    g <- g / max(1, |g_all| / max_grad_norm)             (if max_grad_norm; |g_all| over every param)
    m <- b1 * m + (1 - b1) * g,   v <- b2 * v + (1 - b2) * g^2
    u  = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + weight_decay * p
         with bc_i = 1 - b_i^t when bias_correction, else 1
    r  = |p| / |u|  (1 when either is 0; min(r, 1) with trust_clip)   if weight_decay != 0 or always_adapt
    p <- p - lr * r * u

State per parameter: ``step`` (0-dim float32 tensor on the param's device),
``exp_avg``, ``exp_avg_sq`` -- the layout of torch.optim.Adam.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fastsgd.optim.base import FusedOptimizer, GroupWork, check_non_negative, lr_arg
from fastsgd.optim.sgd import hp_float


class LAMB(FusedOptimizer):
    """Layer-wise adaptive moments for large-batch training (You et al. 2019)."""

    _HOST_HPARAMS = ("betas", "eps", "weight_decay")
    _GROUP_DEFAULTS = {"bias_correction": True, "trust_clip": False, "always_adapt": False}
    _STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
    _ATTR_DEFAULTS = {"max_grad_norm": None}

    def __init__(self, params, lr: float | Tensor, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, bias_correction: bool = True,
                 max_grad_norm: Optional[float] = None, trust_clip: bool = False, always_adapt: bool = False,
                 backend: str = "auto"):
        check_non_negative("lr", lr, "learning rate", read_device=True)
        check_non_negative("eps", eps, "epsilon value")
        check_non_negative("weight_decay", weight_decay, "weight_decay value")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip, always_adapt=always_adapt)
        super().__init__(params, defaults, backend=backend)

    def _check_group(self, group):
        check_non_negative("lr", group["lr"], "learning rate")
        check_non_negative("eps", group["eps"], "epsilon value")
        check_non_negative("weight_decay", group["weight_decay"], "weight_decay value")

    def _new_state(self, group, params, states):
        # A step counter on another device (a checkpoint loaded onto the CPU)
        # is moved by _init_state.
        return [st is None or "exp_avg" not in st or st["step"].device != p.device for p, st in zip(params, states)]

    def _init_state(self, group, p):
        st = self.state[p]
        if "exp_avg" in st:  # loaded from a checkpoint with the step on another device
            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            return
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def step_subset(self, params):
        if self.max_grad_norm is not None:
            raise RuntimeError("LAMB(max_grad_norm=...) clips by the norm of all gradients, so it cannot "
                               "update part of the parameters before every gradient is known; "
                               "step once at the end instead")
        super().step_subset(params)

    def _prepare(self, works: List[GroupWork], grad_scale) -> Dict[str, object]:
        if self.max_grad_norm is None:
            return {"clip_divisor": None}
        grads = [g for w in works for g in w.grads]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in grads]))
        if grad_scale is not None:
            norm = norm / grad_scale.to(norm.device)
        # Stays on the device: no host sync.
        return {"clip_divisor": torch.clamp(norm / self.max_grad_norm, min=1.0)}

    def _run_group(self, kernels, work: GroupWork, new_state: List[bool], *, grad_scale, found_inf,
                   clip_divisor=None):
        g = work.group
        st = work.states
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st]
        self._like_params(kernels, work, "exp_avg", exp_avgs)
        self._like_params(kernels, work, "exp_avg_sq", exp_avg_sqs)
        beta1, beta2 = (hp_float(b) for b in g["betas"])
        kernels.lamb_step(work.params, work.grads, exp_avgs, exp_avg_sqs, [s["step"] for s in st],
                          lr=lr_arg(g["lr"]), beta1=beta1, beta2=beta2, eps=hp_float(g["eps"]),
                          weight_decay=hp_float(g["weight_decay"]), bias_correction=bool(g["bias_correction"]),
                          trust_clip=bool(g["trust_clip"]), always_adapt=bool(g["always_adapt"]),
                          clip_divisor=clip_divisor, grad_scale=grad_scale, found_inf=found_inf)
