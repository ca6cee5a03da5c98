"""What every fastsgd optimizer shares: the step protocol.

A step is two passes over the parameter groups:
1. plan: collect (param, grad) pairs and check what torch does not already
   guarantee -- hyperparameters, sparse gradients, one device per step,
   backend support for the dtypes and layouts. Any problem is raised here,
   before a single tensor or state entry is touched (backend limits such as
   an unsupported momentum dtype included).
2. run: create missing state, then one kernel call per param group. Should a
   kernel still refuse its arguments, the state created by this step for that
   group and the ones after it is dropped again, so a retry is a first step.
   State tensors in another memory layout than their param are copied into
   the param's layout first (flat kernels walk both with one index).

Params with sparse gradients (SGD family only) are split off in the plan and
updated by torch's own SGD after the fused calls; params on the meta device
get their state and no kernel call, as in torch.optim.SGD.

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
from fastsgd.kernels.tensors import grad_like_param, is_dense

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
    contiguous: bool = True  # every param of the step is contiguous


# The hyperparameters that may be tensors on the params' device: kernels read
# them there, so a step needs no host sync and can be captured in a CUDA graph.
# Every other hyperparameter is read on the host as a Python float.
DEVICE_HPARAMS = ("lr",)

# Keys that torch's LR schedulers and SWA add to param groups; a saved state
# dict may hold them although the optimizer loading it does not know them yet.
SCHEDULER_GROUP_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"})


def check_non_negative(name: str, value: Any, label: Optional[str] = None, *, read_device: bool = False) -> None:
    """torch.optim's checks and wording: ``Invalid learning rate: -1.0``,
    ``Tensor lr must be 1-element``. A CPU tensor is read (free); a device
    tensor only with ``read_device`` (in the constructor, as torch does), so
    that a step never synchronises with the host."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.device.type != "cpu" and not read_device:
            return
        value = value.item()
    if value < 0.0:
        raise ValueError(f"Invalid {label or name}: {value}")


def check_host_hparam(owner: str, name: str, value: Any) -> None:
    """A hyperparameter read on the host (not in DEVICE_HPARAMS): a number or a
    1-element CPU tensor, never a device tensor (reading that every step would
    be a host sync, and would break CUDA-graph capture)."""
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, Tensor):
            if v.device.type != "cpu":
                raise ValueError(f"fastsgd.{owner}: {name} is a tensor on {v.device}; only "
                                 f"{', '.join(DEVICE_HPARAMS)} may be a device tensor (read on the device every "
                                 f"step); give {name} as a Python float or a CPU tensor")
            if v.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element")


def lr_arg(lr: Any) -> Any:
    """lr for the kernels: a 1-element tensor of any shape becomes a 0-dim view
    (torch.optim takes ``lr=torch.tensor([0.1])``; a 1-D lr would ask the
    kernels for stacked trials). A view, so later in-place changes still count."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.ndim else lr


def _mro_dict(cls: type, attr: str) -> Dict[str, Any]:
    """``attr`` (a dict) merged over ``cls``'s bases, the most derived last."""
    out: Dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        out.update(vars(base).get(attr, {}))
    return out


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_check_group``, ``_new_state``,
    ``_init_state`` and ``_run_group``, and declare:

    - ``_HOST_HPARAMS``: group hyperparameters read on the host (refused as device tensors);
    - ``_GROUP_DEFAULTS``: group entries that may be missing from old pickles and
      state dicts (filled in by ``__setstate__``); every other key of
      ``defaults`` is required of a state dict being loaded;
    - ``_STATE_KEYS``: the per-parameter state entries this optimizer keeps;
    - ``_ATTR_DEFAULTS``: instance attributes outside torch's param groups,
      kept by pickling and deepcopy, with their defaults for old pickles.
    """

    _step_supports_amp_scaling = True
    _HOST_HPARAMS: tuple = ()
    _GROUP_DEFAULTS: Dict[str, Any] = {}
    _STATE_KEYS: frozenset = frozenset()
    _ATTR_DEFAULTS: Dict[str, Any] = {"backend": "auto"}
    _SPARSE_GRADS = False  # subclasses that update params with sparse gradients set this

    def __init__(self, params, defaults: Dict[str, Any], *, backend: str = "auto"):
        self.backend = requested_backend(backend)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate_group(group)
        self._check_options()

    # ---- pickling, deepcopy, state dicts --------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()  # torch keeps defaults, state and param_groups only
        state.update({name: getattr(self, name) for name in _mro_dict(type(self), "_ATTR_DEFAULTS")})
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in _mro_dict(type(self), "_ATTR_DEFAULTS").items():
            self.__dict__.setdefault(name, default)
        for group in self.param_groups:
            for key, default in self._GROUP_DEFAULTS.items():
                group.setdefault(key, default)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after checking that ``state_dict`` comes
        from an optimizer with this one's hyperparameters and state layout (a
        torch.optim.Adam state dict loads into torch.optim.SGD without a word
        and fails, or runs as something else, later)."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)

    def _check_loadable(self, state_dict: Dict[str, Any]) -> None:
        name = type(self).__name__
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(self.param_groups):
            return  # torch's own checks name these
        required = set(self.defaults) - set(self._GROUP_DEFAULTS)
        problems = []
        params_by_index = {}
        for gi, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(required - set(saved))
            foreign = sorted(set(saved) - set(ours) - set(self.defaults) - SCHEDULER_GROUP_KEYS
                             - {"params", "param_names"})
            if missing:
                problems.append(f"param group {gi} lacks {', '.join(missing)}")
            if foreign:
                problems.append(f"param group {gi} has {', '.join(foreign)}, which fastsgd.{name} does not have")
            if isinstance(saved.get("params"), list):
                params_by_index.update(zip(saved["params"], ours["params"]))
        for index, st in state.items():
            if not isinstance(st, dict):
                continue
            extra = sorted(set(st) - self._STATE_KEYS)
            if extra:
                problems.append(f"the state of parameter {index} holds {', '.join(extra)} (fastsgd.{name} keeps "
                                f"{', '.join(sorted(self._STATE_KEYS))})")
            p = params_by_index.get(index)
            for key, value in st.items():
                if p is not None and isinstance(value, Tensor) and value.ndim > 0 and value.shape != p.shape:
                    problems.append(f"the {key} of parameter {index} has shape {tuple(value.shape)}, the parameter "
                                    f"{tuple(p.shape)}")
        if problems:
            raise ValueError(f"fastsgd.{name}.load_state_dict: the state dict does not fit fastsgd.{name} over "
                             "these parameters (is it another optimizer's?): " + "; ".join(problems[:6])
                             + ("; ..." if len(problems) > 6 else ""))

    # ---- subclass interface -------------------------------------------------
    def _validate_group(self, group: Dict[str, Any]) -> None:
        owner = type(self).__name__
        for name in self._HOST_HPARAMS:
            check_host_hparam(owner, name, group[name])
        self._check_group(group)

    def _check_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_options(self) -> None:
        """Optimizer-wide options that no kernel call should see when invalid."""

    def _state_dtypes(self) -> set:
        """Dtypes of state tensors that differ from the params' (a backend must support them)."""
        return set()

    def _check_backend(self, kernels) -> None:
        """What the chosen kernels cannot do, raised before any state is created."""

    def _new_state(self, group: Dict[str, Any], params: List[Tensor],
                   states: List[Optional[Dict[str, Any]]]) -> List[bool]:
        """Per param: True when its state must be created (first step)."""
        raise NotImplementedError

    def _init_state(self, group: Dict[str, Any], p: Tensor) -> None:
        raise NotImplementedError

    def _run_group(self, kernels, work: GroupWork, new_state: List[bool], *,
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor], **extra) -> None:
        raise NotImplementedError

    def _check_sparse(self, works: List[GroupWork]) -> None:
        """What the sparse path cannot do, raised before anything changes."""

    def _run_sparse(self, works: List[GroupWork], grad_scale: Optional[Tensor]) -> None:
        """Update the params with sparse gradients (only with ``_SPARSE_GRADS``)."""
        raise NotImplementedError

    def _prepare(self, works: List[GroupWork], grad_scale: Optional[Tensor]) -> Dict[str, Any]:
        """Step-wide values computed after planning (e.g. LAMB's global grad norm)."""
        return {}

    def _like_params(self, kernels, work: GroupWork, key: str, tensors: List[Optional[Tensor]]) -> None:
        """State tensors ``tensors`` (entry ``key`` of each param's state) laid
        out like their params, for kernels that walk param and state with one
        flat index. A tensor in another layout (a contiguous checkpoint loaded
        into a channels_last model, ``model.to(memory_format=...)`` after some
        steps, a param whose ``.data`` became a transposed view) is copied once
        into its param's layout, in ``tensors`` and in the state; later steps
        then take the fast path. Values are unchanged."""
        if getattr(kernels, "STRIDED", False) or (work.contiguous and all(map(_is_contiguous, tensors))):
            return
        for i, (p, t) in enumerate(zip(work.params, tensors)):
            if t is not None and t.numel() > 1 and t.stride() != p.stride() and is_dense(p):
                relaid = torch.empty_like(p, dtype=t.dtype)
                relaid.copy_(t)
                tensors[i] = work.states[i][key] = relaid

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
            self._validate_group(group)
            if only is None:
                ps = [p for p in group["params"] if p.grad is not None]
            else:
                ps = [p for p in group["params"] if p.grad is not None and id(p) in only]
            works.append(GroupWork(group, ps, list(map(_grad, ps)), list(map(self.state.get, ps))))
        grads = [g for w in works for g in w.grads]
        if not self._SPARSE_GRADS and any(map(_is_sparse, grads)):
            gi, pi = self._locate(lambda p: p.grad is not None and p.grad.is_sparse)
            raise RuntimeError(f"fastsgd.{type(self).__name__} does not support sparse gradients (parameter {pi} "
                               f"of param group {gi}); use fastsgd.SGD, torch.optim.SGD or torch.optim.SparseAdam "
                               "for sparse layers")
        devices = set(map(_device, grads))
        if len(devices) > 1:
            first = grads[0].device
            gi, pi = self._locate(lambda p: p.grad is not None and p.device != first)
            where = self.param_groups[gi]["params"][pi].device
            raise RuntimeError(f"fastsgd.{type(self).__name__}: all parameters updated in one step must be on one "
                               f"device; parameter {pi} of param group {gi} is on {where}, others on {first}. "
                               "Use one optimizer per device.")
        return works

    @staticmethod
    def _split_sparse(works: List[GroupWork]) -> List[GroupWork]:
        """Moves the params with sparse gradients out of ``works`` into works of their own."""
        sparse = []
        for w in works:
            flags = list(map(_is_sparse, w.grads))
            if any(flags):
                sparse.append(GroupWork(w.group, *([x for x, f in zip(xs, flags) if f]
                                                   for xs in (w.params, w.grads, w.states))))
                w.params, w.grads, w.states = ([x for x, f in zip(xs, flags) if not f]
                                               for xs in (w.params, w.grads, w.states))
        return sparse

    def _locate(self, pred) -> tuple:
        """(group index, param index) of the first param matching ``pred``, for error messages."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if pred(p):
                    return gi, pi
        return -1, -1

    def _create_state(self, works: List[GroupWork], new_state: List[List[bool]]) -> List[List[tuple]]:
        """Creates the flagged state; returns, per group, (param, its state before) for undoing it."""
        undo = []
        for w, flags in zip(works, new_state):
            before = []
            if any(flags):
                for i, p in enumerate(w.params):
                    if flags[i]:
                        before.append((p, dict(self.state[p]) if p in self.state else None))
                        self._init_state(w.group, p)
                        w.states[i] = self.state[p]
            undo.append(before)
        return undo

    def _undo_state(self, undo: List[tuple]) -> None:
        for p, before in undo:
            if before is None:
                self.state.pop(p, None)
            else:
                self.state[p].clear()
                self.state[p].update(before)

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
        sparse = self._split_sparse(works) if self._SPARSE_GRADS else []
        if sparse:
            self._check_sparse(sparse)
        params = [p for w in works for p in w.params]
        if not params and not sparse:
            return
        self._check_options()
        device = (params or [p for w in sparse for p in w.params])[0].device
        new_state = [self._new_state(w.group, w.params, w.states) for w in works]
        if device.type == "meta":
            # What torch.optim.SGD does with meta tensors: state is created (on
            # meta, with the shapes and dtypes a real step would give) and no
            # values exist to compute. No kernel runs.
            self._create_state(works, new_state)
            return
        contiguous = all(map(_is_contiguous, params))
        kernels = None
        if params:
            kernels = get_backend(self.backend, device, set(map(_dtype, params)) | self._state_dtypes(),
                                  dense=contiguous or all(map(is_dense, params)))
            self._check_backend(kernels)
        if any(map(any, new_state)) and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fastsgd.{type(self).__name__}: optimizer state must exist before CUDA graph "
                               "capture; run one eager step (warm-up) first, as with torch's capturable optimizers")
        if found_inf is not None and (found_inf.device.type == "cpu" or sparse or any(map(any, new_state))):
            if found_inf.item() != 0:  # skipped by the AMP scaler: change nothing, create nothing
                return
            found_inf = None
        # ---- everything checked: from here on, state and params change ----
        undo = self._create_state(works, new_state)
        extra = self._prepare(works, grad_scale)
        for gi, (w, flags) in enumerate(zip(works, new_state)):
            if w.params:
                w.contiguous = contiguous
                if not (getattr(kernels, "STRIDED", False) or (contiguous and all(map(_is_contiguous, w.grads)))):
                    w.grads = [g if g.is_contiguous() and p.is_contiguous() else grad_like_param(g, p)
                               for g, p in zip(w.grads, w.params)]
                try:
                    self._run_group(kernels, w, flags, grad_scale=grad_scale, found_inf=found_inf, **extra)
                except BaseException:
                    # The kernels check their arguments before changing anything: the state this step
                    # created for this and later groups is dropped, so a retried step is their first.
                    for created in undo[gi:]:
                        self._undo_state(created)
                    raise
        if sparse:
            self._run_sparse(sparse, grad_scale)
