"""What every fastsgd optimizer shares: the step protocol.

A step is two passes over the parameter groups:
1. plan: collect (param, grad) pairs and check what torch does not already
   guarantee -- hyperparameters, sparse gradients, one device per step,
   backend support for the dtypes and layouts. Any problem is raised here,
   before a single tensor or state entry is touched.
2. run: create missing state, then one kernel call per param group.

AMP: ``torch.amp.GradScaler`` sees ``_step_supports_amp_scaling`` and sets
``self.grad_scale``/``self.found_inf`` before calling ``step()``. Kernels
divide gradients by ``grad_scale`` and change nothing when ``found_inf`` is
set. On the steps that create state (normally only the first), ``found_inf``
is read on the host so that a skipped first step leaves no half-initialised
buffers behind (torch's fused SGD gets this wrong); on CPU it is always read
on the host, which costs nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from fastsgd.backends import get_backend, requested_backend
from fastsgd.kernels.tensors import grad_like_param, grads_fit, is_dense  # noqa: F401  (re-exported)


# Per-tensor reads go through C-level map() with these: a step over 10,000
# small params spends most of its host time in such loops.
_grad = attrgetter("grad")
_dtype = attrgetter("dtype")
_device = attrgetter("device")
_is_sparse = attrgetter("is_sparse")
_is_contiguous = Tensor.is_contiguous
_numel = Tensor.numel


@dataclass
class GroupWork:
    """The tensors of one param group that take part in this step, and their
    state dicts (None where a param has none yet)."""
    group: Dict[str, Any]
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    states: List[Optional[Dict[str, Any]]] = field(default_factory=list)


def check_non_negative(name: str, value: Any, label: Optional[str] = None) -> None:
    """torch.optim's wording: ``Invalid learning rate: -1.0``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return  # a device tensor is not read on the host
    if value < 0.0:
        raise ValueError(f"Invalid {label or name}: {value}")


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_check_group``, ``_new_state``,
    ``_init_state`` and ``_run_group``."""

    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: Dict[str, Any], *, backend: str = "auto"):
        self.backend = requested_backend(backend)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    # ---- subclass interface -------------------------------------------------
    def _check_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _new_state(self, group: Dict[str, Any], params: List[Tensor],
                   states: List[Optional[Dict[str, Any]]]) -> List[bool]:
        """Per param: True when its state must be created (first step)."""
        raise NotImplementedError

    def _init_state(self, group: Dict[str, Any], p: Tensor) -> None:
        raise NotImplementedError

    def _run_group(self, kernels, work: GroupWork, new_state: List[bool], *,
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor], **extra) -> None:
        raise NotImplementedError

    def _prepare(self, works: List[GroupWork], grad_scale: Optional[Tensor]) -> Dict[str, Any]:
        """Step-wide values computed after planning (e.g. LAMB's global grad norm)."""
        return {}

    # ---- the step -----------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step(None)
        return loss

    @torch.no_grad()
    def step_subset(self, params: Iterable[Tensor]) -> None:
        """Update only ``params`` (with their groups' hyperparameters), as one
        fused call per group. Used by the bucketed data-parallel engine to step
        each bucket as soon as its gradients are reduced."""
        self._step({id(p) for p in params})

    def _plan(self, only: Optional[set]) -> List[GroupWork]:
        # Per-tensor Python work is the fixed cost of a step with many small
        # tensors, so this stays lean: torch itself already guarantees that a
        # grad has its param's shape, dtype and device (AccumulateGrad and the
        # .grad setter check it); what is left to check is sparsity and one
        # device per step.
        works = []
        for group in self.param_groups:
            self._check_group(group)
            if only is None:
                ps = [p for p in group["params"] if p.grad is not None]
            else:
                ps = [p for p in group["params"] if p.grad is not None and id(p) in only]
            works.append(GroupWork(group, ps, list(map(_grad, ps)), list(map(self.state.get, ps))))
        grads = [g for w in works for g in w.grads]
        if any(map(_is_sparse, grads)):
            gi, pi = self._locate(lambda p: p.grad is not None and p.grad.is_sparse)
            raise RuntimeError(f"fastsgd.{type(self).__name__} does not support sparse gradients (parameter {pi} "
                               f"of param group {gi}); use torch.optim.SGD or torch.optim.SparseAdam for sparse layers")
        devices = set(map(_device, grads))
        if len(devices) > 1:
            first = grads[0].device
            gi, pi = self._locate(lambda p: p.grad is not None and p.device != first)
            raise RuntimeError(f"fastsgd.{type(self).__name__}: all parameters updated in one step must be on one "
                               f"device; parameter {pi} of param group {gi} is on {self.param_groups[gi]['params'][pi].device}, "
                               f"others on {first}. Use one optimizer per device.")
        return works

    def _locate(self, pred) -> tuple:
        """(group index, param index) of the first param matching ``pred``, for error messages."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if pred(p):
                    return gi, pi
        return -1, -1

    # torch.compile: the step is left out of the traced graph on purpose. It is
    # host-side planning (hyperparameter checks, state creation, the kernel
    # tables) around 1-3 fused launches that a graph could not make cheaper;
    # tracing it would only add graph breaks and recompiles. So a compiled
    # training step breaks exactly once here (a closure passed to step() is
    # still traced) and the launches run eagerly.
    @torch.compiler.disable
    def _step(self, only: Optional[set]) -> None:
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        works = self._plan(only)
        params = [p for w in works for p in w.params]
        if not params:
            return
        device = params[0].device
        contiguous = all(map(_is_contiguous, params))
        kernels = get_backend(self.backend, device, set(map(_dtype, params)),
                              dense=contiguous or all(map(is_dense, params)))
        new_state = [self._new_state(w.group, w.params, w.states) for w in works]
        if any(map(any, new_state)) and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fastsgd.{type(self).__name__}: optimizer state must exist before CUDA graph "
                               "capture; run one eager step (warm-up) first, as with torch's capturable optimizers")
        if found_inf is not None and (found_inf.device.type == "cpu" or any(map(any, new_state))):
            if found_inf.item() != 0:  # skipped by the AMP scaler: change nothing, create nothing
                return
            found_inf = None
        # ---- everything checked: from here on, state and params change ----
        for w, flags in zip(works, new_state):
            if any(flags):
                for i, p in enumerate(w.params):
                    if flags[i]:
                        self._init_state(w.group, p)
                        w.states[i] = self.state[p]
        extra = self._prepare(works, grad_scale)
        for w, flags in zip(works, new_state):
            if w.params:
                if not (getattr(kernels, "STRIDED", False) or (contiguous and all(map(_is_contiguous, w.grads)))):
                    w.grads = [g if g.is_contiguous() and p.is_contiguous() else grad_like_param(g, p)
                               for g, p in zip(w.grads, w.params)]
                self._run_group(kernels, w, flags, grad_scale=grad_scale, found_inf=found_inf, **extra)
