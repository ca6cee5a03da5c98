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
from torch.optim.sgd import sgd as torch_sgd

from fastsgd.optim.base import FusedOptimizer, GroupWork, check_non_negative, lr_arg

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


# Backends whose kernels round momentum buffers to nearest only (they raise
# when asked for stochastic rounding); checked before state is created.
ROUND_TO_NEAREST_ONLY = frozenset({"cpu"})


def hp_float(value: Any) -> float:
    """A hyperparameter other than lr as a Python float (tensors are read once)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class MomentumBuffers:
    """State of the SGD family and LARS: one ``momentum_buffer`` per param
    (torch.optim.SGD's layout), created as zeros in ``momentum_dtype`` (default:
    the param's dtype) on the first step that updates the param."""

    _STATE_KEYS = frozenset({"momentum_buffer"})
    _ATTR_DEFAULTS = {"momentum_dtype": None, "stochastic_rounding": False}
    momentum_dtype: Optional[torch.dtype] = None

    def _check_options(self):
        dt = self.momentum_dtype
        if dt is not None and not (isinstance(dt, torch.dtype) and (dt.is_floating_point or dt.is_complex)):
            raise ValueError(f"fastsgd.{type(self).__name__}: momentum_dtype must be a floating-point torch.dtype "
                             f"(or None for the param's dtype), got {dt}")

    def _state_dtypes(self):
        return {self.momentum_dtype} if self.momentum_dtype is not None else set()

    def _check_backend(self, kernels):
        if getattr(self, "stochastic_rounding", False) and kernels.NAME in ROUND_TO_NEAREST_ONLY:
            raise ValueError(f"fastsgd.{type(self).__name__}: stochastic_rounding=True is implemented by the GPU "
                             f"backends (triton, cuda) only; the {kernels.NAME!r} backend rounds to nearest. "
                             "Set stochastic_rounding=False on this device")

    def _new_state(self, group, params, states):
        if group["momentum"] == 0:
            return [False] * len(params)
        return [st is None or st.get("momentum_buffer") is None for st in states]

    def _init_state(self, group, p):
        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format,
                                                            dtype=self.momentum_dtype or p.dtype)

    def _momentum_buffers(self, kernels, work: GroupWork, momentum: float) -> Optional[List[Tensor]]:
        if momentum == 0:
            return None
        bufs = [st["momentum_buffer"] for st in work.states]
        self._like_params(kernels, work, "momentum_buffer", bufs)
        return bufs


class SGD(MomentumBuffers, FusedOptimizer):
    r"""Stochastic gradient descent, optionally with momentum or Nesterov momentum.

    A drop-in for :class:`torch.optim.SGD`: same arguments, defaults,
    validation messages, param groups, ``state_dict()`` layout
    (``state[i]["momentum_buffer"]``) and update, but each step runs as one
    fused kernel call per param group (see ``fastsgd.available_backends()``).
    Params with sparse gradients are updated by torch's own SGD code, as
    torch.optim.SGD does (weight_decay must be 0 for them, as there).

    Extra arguments: ``lr_in_momentum`` (see the module docstring),
    ``momentum_dtype`` (dtype of new momentum buffers; default: the param's),
    ``stochastic_rounding`` (round bfloat16 momentum buffers stochastically --
    unbiased; GPU backends only, the cpu backend raises, the reference rounds
    to nearest) and ``backend`` ("auto", "reference", "cpu", "triton", "cuda";
    the ``FASTSGD_BACKEND`` environment variable stands in for "auto").
    ``foreach``/``fused`` are accepted for compatibility and change nothing;
    ``differentiable=True`` raises.
    """

    _HOST_HPARAMS = ("momentum", "dampening", "weight_decay")
    _GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False,
                       "fused": False, "lr_in_momentum": False}
    _SPARSE_GRADS = True

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 lr_in_momentum: bool = False, foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, momentum_dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = False, backend: str = "auto"):
        check_non_negative("lr", lr, "learning rate", read_device=True)
        check_non_negative("momentum", momentum, "momentum value")
        check_non_negative("weight_decay", weight_decay, "weight_decay value")
        check_torch_compat_flags(foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, lr_in_momentum=lr_in_momentum)
        self.momentum_dtype = momentum_dtype
        self.stochastic_rounding = bool(stochastic_rounding)
        super().__init__(params, defaults, backend=backend)

    def _check_group(self, group):
        check_non_negative("lr", group["lr"], "learning rate")
        check_non_negative("momentum", group["momentum"], "momentum value")
        check_non_negative("weight_decay", group["weight_decay"], "weight_decay value")
        check_nesterov(group)
        if group.get("differentiable"):
            raise RuntimeError(_DIFFERENTIABLE_ERROR)

    def _check_sparse(self, works: List[GroupWork]) -> None:
        for w in works:
            gi, pi = self._locate(lambda p: p is w.params[0])
            where = f"fastsgd.{type(self).__name__}: parameter {pi} of param group {gi} has a sparse gradient"
            if w.group["weight_decay"] != 0:  # torch.optim.SGD fails here too, but after earlier params moved
                raise RuntimeError(f"{where}, and torch.optim.SGD's update cannot add weight decay to a sparse "
                                   "gradient (add(sparse, dense) is not supported); give sparse layers a param "
                                   "group with weight_decay=0")
            if w.group["lr_in_momentum"] or self.momentum_dtype is not None:
                option = "lr_in_momentum=True" if w.group["lr_in_momentum"] else "momentum_dtype"
                raise RuntimeError(f"{where}, which is updated exactly as torch.optim.SGD does; {option} is not "
                                   "part of that update. Put sparse layers in an optimizer without it")

    def _run_sparse(self, works: List[GroupWork], grad_scale) -> None:
        # torch's own single-tensor SGD, which is what torch.optim.SGD runs for
        # sparse gradients: momentum buffers start as a copy of the (sparse)
        # gradient and stay sparse, as in torch.
        for w in works:
            g = w.group
            grads = w.grads if grad_scale is None else [gr / grad_scale.to(gr.device) for gr in w.grads]
            bufs = [None if st is None else st.get("momentum_buffer") for st in w.states]
            torch_sgd(w.params, grads, bufs, has_sparse_grad=True, foreach=False, fused=False,
                      weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"],
                      dampening=g["dampening"], nesterov=g["nesterov"], maximize=g["maximize"])
            if g["momentum"] != 0:
                for p, buf in zip(w.params, bufs):
                    self.state[p]["momentum_buffer"] = buf

    def _run_group(self, kernels, work: GroupWork, new_state: List[bool], *, grad_scale, found_inf):
        g = work.group
        momentum = hp_float(g["momentum"])
        bufs = self._momentum_buffers(kernels, work, momentum)
        kernels.sgd_step(work.params, work.grads, bufs, lr=lr_arg(g["lr"]), momentum=momentum,
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
