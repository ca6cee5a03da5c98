"""Train many trials of one batch size at once, with one fused optimizer step.

Three ways to run the trials of a batch size, with the same stopping rules and
the same per-trial data:

- the trial engine (fastsgd/study/steps/engine.py): all trials as one batched
  model, weights as views into one flat buffer per dtype, the whole step in a
  handful of large ops. Used whenever the model converts;
- the vmap path: ``torch.func.stack_module_state`` + ``functional_call``
  under ``vmap``. Used for models the engine cannot batch (a one-line warning
  names the module that forced it and why);
- :func:`train_single`: one plain model, the one-at-a-time reference.

In the first two the optimizer step is ONE call of the fused kernel
(``fastsgd.backends.get_backend``'s ``sgd_step``) with per-trial lr and
momentum as 1-D tensors along the stacked dimension ("stacked trials", see
fastsgd/kernels/reference.py).

Reproducibility: a trial is fully determined by its seed and hyperparameters.
``torch.manual_seed(seed)`` precedes ``workload.make_model()``. Training
batches come from the trial's own key (:func:`data_seed`): for workloads that
expose ``train_data`` (every DataWorkload) the indices of all trials' batches
are drawn in one op by a counter-based hash of (key, step, position)
(``engine.batch_indices``); other workloads draw through ``sample_batch`` with
a ``torch.Generator`` per trial. Either way each trial sees its own batch
sequence whatever else runs beside it, and all three paths draw the same
batches. Dropout masks come from the same kind of per-trial counter-based
stream (``engine.KeyedDropout``, also in the reference path). Evaluation runs
with the model in eval mode (dropout off, batch norm on running statistics).

Per trial and step (step = optimizer updates done so far):
- lr schedule: constant, Goyal et al.'s linear warm-up (``warmup_steps``,
  ``warmup_start_lr``) and/or Shallue et al.'s linear decay to
  ``decay_alpha * lr`` over ``decay_fraction * max_steps`` steps;
- evaluation at the steps of :func:`evaluation_steps` (every step up to 40,
  then each <= 5 % after the previous), so steps to result is resolved to 5 %;
- stop when an evaluation beats the goal ("goal"), at the step budget
  ("budget"), when the training loss is NaN/inf or above ``divergence_factor``
  times the trial's initial loss ("infeasible"), or, with pruning, once its
  next evaluation would come after the ``keep_top``-th best steps to result of
  the batch size ("pruned": it can no longer enter the top ``keep_top``).
Stopped trials are removed from the stack (rows dropped from parameters,
momentum buffers and hyperparameter tensors, one gather per buffer), so the
others run on bit for bit unchanged and the remaining work shrinks.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from fastsgd import backends
from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED, beats
from fastsgd.study.steps.engine import (
    KeyedDropout,
    NotConvertible,
    StepContext,
    TrialEngine,
    batch_indices_block,
    trial_keys,
)
from fastsgd.study.workloads.base import Workload

OPTIMIZERS = ("sgd", "momentum", "nesterov")
ENGINES = ("auto", "engine", "vmap")


@dataclass
class TrialSpec:
    """One trial: an id, a seed and hyperparameters (see fastsgd.study.steps.search.hparams:
    lr, momentum, weight_decay, optional decay_alpha/decay_fraction, warmup_steps/warmup_start_lr)."""

    trial_id: int
    seed: int
    hparams: Dict[str, float]


@dataclass
class RunSettings:
    """How the trials of one batch size are run.

    goal:      stop at the first evaluation strictly better than this (None: run to the budget)
    keep_top:  with pruning, a trial stops only once it can no longer beat the ``keep_top``-th best
               finished trial of its batch size, so the best ``keep_top`` trials are all known
               (1: stop as soon as a trial cannot win)
    step_cap:  the ``keep_top``-th best steps to result already known at this batch size from
               earlier runs (None: fewer than ``keep_top`` known); an upper bound for pruning
    engine:    "auto" (the trial engine when the model converts, else the vmap path with a
               warning), "engine" (error when the model does not convert) or "vmap"
    device:    where the trials train ("cpu", "cuda", ...)
    """

    batch_size: int
    max_steps: int
    optimizer: str = "nesterov"
    goal: Optional[float] = None
    goal_metric: str = "val_error"
    higher_is_better: bool = False
    step_cap: Optional[int] = None
    prune: bool = True
    keep_top: int = 5
    divergence_factor: float = 10.0
    eval_ratio: float = 1.05
    backend: str = "auto"
    engine: str = "auto"
    device: str = "cpu"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ValueError(f"batch_size and max_steps must be >= 1, got {self.batch_size} and {self.max_steps}")
        if not 1.0 < self.eval_ratio <= 2.0:
            raise ValueError(f"eval_ratio must be in (1, 2], got {self.eval_ratio}")
        if not self.divergence_factor > 1.0:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        if self.keep_top < 1:
            raise ValueError(f"keep_top must be >= 1, got {self.keep_top}")
        if self.engine not in ENGINES:
            raise ValueError(f"Invalid engine: {self.engine!r}; choose one of {', '.join(ENGINES)}")
        torch.device(self.device)  # a clear error for a malformed device string


@dataclass
class TrialResult:
    spec: TrialSpec
    outcome: str = ""
    steps: List[int] = field(default_factory=list)
    metrics: Dict[str, List[float]] = field(default_factory=dict)
    steps_to_result: Optional[int] = None
    end_step: int = 0


EvalCallback = Callable[[TrialSpec, int, Dict[str, float]], None]
EndCallback = Callable[[TrialResult], None]


def data_seed(seed: int) -> int:
    """The seed of a trial's batch draws (kept apart from the init seed)."""
    return (int(seed) * 0x9E3779B1 + 0x5DEECE66D) % (2 ** 63)


def next_eval_step(step: int, ratio: float = 1.05) -> int:
    """The evaluation after ``step``: every step while that is within ``ratio``,
    then the last step that keeps consecutive evaluations within ``ratio``."""
    return max(step + 1, int(math.floor(step * ratio)))


def evaluation_steps(max_steps: int, ratio: float = 1.05) -> List[int]:
    """All evaluation steps from 0 to ``max_steps`` (always included)."""
    out, s = [0], 0
    while s < max_steps:
        s = min(next_eval_step(s, ratio), max_steps)
        out.append(s)
    return out


def pruning_cap(step_cap: Optional[int], finished: Sequence[int], keep_top: int) -> Optional[int]:
    """The ``keep_top``-th best steps to result known so far: the smaller of ``step_cap`` (from
    earlier runs) and the ``keep_top``-th smallest of ``finished`` (this run); None while unknown."""
    caps = [step_cap] if step_cap is not None else []
    if len(finished) >= keep_top:
        caps.append(sorted(finished)[keep_top - 1])
    return min(caps) if caps else None


class _Schedules:
    """Per-trial hyperparameters as float64 tensors, and the lr at a step."""

    def __init__(self, specs: Sequence[TrialSpec], max_steps: int):
        def col(key, default):
            return torch.tensor([float(s.hparams.get(key, default)) for s in specs], dtype=torch.float64)
        self.lr0, self.momentum, self.weight_decay = col("lr", math.nan), col("momentum", 0.0), col("weight_decay", 0.0)
        if torch.isnan(self.lr0).any():
            raise ValueError("every trial needs an 'lr' hyperparameter")
        self.alpha = col("decay_alpha", 1.0)
        self.decay_steps = torch.clamp(torch.round(col("decay_fraction", 1.0) * max_steps), min=1.0)
        self.warmup = col("warmup_steps", 0.0)
        self.warmup_start = torch.where(self.warmup > 0, col("warmup_start_lr", 0.0), self.lr0)

    def keep(self, idx: Tensor) -> None:
        for name in ("lr0", "momentum", "weight_decay", "alpha", "decay_steps", "warmup", "warmup_start"):
            setattr(self, name, getattr(self, name)[idx])

    def lr(self, t: int) -> Tensor:
        """lr for update number ``t`` (0-based): warm-up from warmup_start_lr over
        ``warmup`` steps, times the linear decay factor."""
        frac = torch.clamp(t / self.decay_steps, max=1.0)
        lr = self.lr0 * (1.0 - (1.0 - self.alpha) * frac)
        ramp = torch.clamp(torch.tensor(float(t), dtype=torch.float64) / torch.clamp(self.warmup, min=1.0), max=1.0)
        return torch.where(t < self.warmup, self.warmup_start + (lr - self.warmup_start) * ramp, lr)


# ---------------------------------------------------------------- the vmap path and the reference path
# Both have the TrialEngine's interface: losses_and_grads(x, y, step) -> (T,) losses (gradients kept),
# update(backend, lr=, momentum=, weight_decay=, nesterov=, first_step=), keep(idx), evaluate().

def _with_weight_decay(grads: List[Tensor], params: List[Tensor], wd: Tensor) -> List[Tensor]:
    """g + wd * p, wd per trial (T,) along the first dimension of stacked tensors."""
    if not bool(wd.any()):
        return grads
    return [g + wd.to(device=g.device, dtype=g.dtype).reshape((-1,) + (1,) * (g.ndim - 1)) * p
            for g, p in zip(grads, params)]


class _Stack:
    """The live trials as one vmapped model (parameters with trials as dim 0). Buffers are passed
    read-only: batch norm must not track running statistics here."""

    def __init__(self, workload: Workload, models, momentum: bool, device: torch.device):
        self.workload, self.device = workload, device
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = [params[n].detach().contiguous() for n in self.names]
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        self.bufs = [torch.zeros_like(p) for p in self.params] if momentum else None
        self.base = copy.deepcopy(models[0]).to("meta")  # structure only: functional_call supplies the tensors
        self.models = models  # kept for workloads evaluated one model at a time
        self._loss = vmap(self._trial_loss)
        self._outputs = vmap(self._forward, in_dims=(0, 0, None))
        self._metrics = vmap(workload.metrics, in_dims=(0, None)) if getattr(workload, "metrics", None) else None
        self.grads: List[Tensor] = []

    def _forward(self, params, buffers, x):
        return functional_call(self.base, ({n: p for n, p in zip(self.names, params)}, buffers), (x,))

    def _trial_loss(self, params, buffers, x, y):
        return self.workload.loss(self._forward(params, buffers, x), y)

    def losses_and_grads(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        leaves = [p.requires_grad_(True) for p in self.params]
        with torch.enable_grad():
            losses = self._loss(leaves, self.buffers, x, y)
            grads = torch.autograd.grad(losses.sum(), leaves)  # trials are independent
        for p in self.params:
            p.requires_grad_(False)
        # vmap's gradients may come back in a permuted layout; the fused kernels want the param's layout.
        self.grads = [g.contiguous() for g in grads]
        return losses.detach()

    def update(self, backend, *, lr, momentum, weight_decay, nesterov, first_step) -> None:
        grads = _with_weight_decay(self.grads, self.params, weight_decay)
        backend.sgd_step(self.params, grads, self.bufs, lr=lr, momentum=momentum, nesterov=nesterov,
                         first_step=first_step, stacked_trials=True)

    @torch.no_grad()
    def evaluate(self) -> List[Dict[str, float]]:
        if self._metrics is not None:
            per_metric = {}
            for set_name, (x, y) in self.workload.eval_data.items():
                x, y = x.to(self.device), y.to(self.device)
                for name, values in self._metrics(self._outputs(self.params, self.buffers, x), y).items():
                    per_metric[f"{set_name}_{name}"] = values.tolist()
            return [{k: v[i] for k, v in per_metric.items()} for i in range(len(self.models))]
        out = []
        for i, model in enumerate(self.models):  # any Workload: copy row i into a real model
            for (name, p) in zip(self.names, self.params):
                model.get_parameter(name).copy_(p[i])
            for name, b in self.buffers.items():
                model.get_buffer(name).copy_(b[i])
            out.append(self.workload.evaluate(model, self.device))
        return out

    def keep(self, idx: Tensor) -> None:
        self.params = [p[idx].contiguous() for p in self.params]
        self.grads = [g[idx] for g in self.grads]
        self.buffers = {k: v[idx] for k, v in self.buffers.items()}
        if self.bufs is not None:
            self.bufs = [b[idx].contiguous() for b in self.bufs]
        self.models = [self.models[i] for i in idx.tolist()]


class _Single:
    """One plain model (no vmap, no stacking): the one-at-a-time reference path. Its dropout layers
    draw their masks from the trial's key, as the trial engine does."""

    def __init__(self, workload: Workload, models, momentum: bool, keys: Tensor, device: torch.device):
        (self.model,) = models
        self.workload, self.device = workload, device
        self.ctx = StepContext(keys)
        for name, m in list(self.model.named_modules()):
            if type(m) is nn.Dropout:
                parent, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, attr, KeyedDropout(m.p, self.ctx))
        self.model.train()
        self.params = [p.detach() for p in self.model.parameters()]
        self.bufs = [torch.zeros_like(p) for p in self.params] if momentum else None
        self.grads: List[Tensor] = []

    def losses_and_grads(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        self.ctx.start(step)
        with torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(True)
            loss = self.workload.loss(self.model(x[0]), y[0])
            self.grads = list(torch.autograd.grad(loss, list(self.model.parameters())))
        return loss.detach().reshape(1)

    def update(self, backend, *, lr, momentum, weight_decay, nesterov, first_step) -> None:
        grads = [g + float(weight_decay[0]) * p for g, p in zip(self.grads, self.params)] \
            if float(weight_decay[0]) != 0.0 else self.grads
        backend.sgd_step(self.params, grads, self.bufs, lr=float(lr[0]), momentum=float(momentum[0]),
                         nesterov=nesterov, first_step=first_step)

    @torch.no_grad()
    def evaluate(self) -> List[Dict[str, float]]:
        self.model.eval()
        try:
            return [self.workload.evaluate(self.model, self.device)]
        finally:
            self.model.train()

    def keep(self, idx: Tensor) -> None:
        if len(idx) != 1:
            raise AssertionError("a single model cannot be split")


# ---------------------------------------------------------------- the loop

def _make_stack(mode: str, workload: Workload, models, momentum: bool, keys: Tensor, device: torch.device):
    if mode == "single":
        return _Single(workload, models, momentum, keys, device)
    if mode in ("auto", "engine"):
        try:
            return TrialEngine(workload, models, momentum=momentum, keys=keys, device=device)
        except NotConvertible as exc:
            if mode == "engine":
                raise ValueError(f"the trial engine cannot batch workload {workload.name!r}: {exc}") from exc
            warnings.warn(f"fastsgd.study: trial engine cannot batch {exc}; training with the (slower) vmap path",
                          stacklevel=4)
    return _Stack(workload, models, momentum, device)


def stacked_backend(name: str, device: torch.device, dtypes=(torch.float32,)):
    """The kernel backend that steps all trials of a batch size in one call. ``name``: a backend
    name or "auto" (FASTSGD_BACKEND stands in for it, as for the optimizers); "auto" takes the
    first backend of the device's auto order whose capabilities include stacked trials. A named
    backend without them is refused here, before any trial trains."""
    name = backends.requested_backend(name)
    device = torch.device(device)
    able = backends.stacked_trial_backends()
    if name == "auto":
        for candidate in backends.AUTO_ORDER.get(device.type, ()) + ("reference",):
            if candidate in able:
                try:
                    return backends.get_backend(candidate, device, dtypes)
                except (backends.BackendUnavailable, TypeError):
                    continue
        raise backends.BackendUnavailable(f"no fastsgd backend steps stacked trials of {sorted(map(str, dtypes))} "
                                          f"on {device}")
    mod = backends.get_backend(name, device, dtypes)
    if not mod.CAPABILITIES.stacked_trials:
        raise ValueError(f"fastsgd backend {name!r} cannot step stacked trials (all trials of a batch size in "
                         f"one call), which the study needs; use 'auto' or one of: {', '.join(able)}")
    return mod


class _Batches:
    """Every live trial's training batch for a step: counter-based index draws when the workload
    exposes ``train_data`` (``BLOCK`` steps' indices drawn at once), else ``sample_batch`` with a
    generator per trial."""

    BLOCK = 64  # steps of indices drawn together: the draw costs about as much as a small step
    BLOCK_ELEMENTS = 1 << 22  # ... and at most this many indices (large batches of many trials)

    def __init__(self, workload: Workload, seeds: Sequence[int], device: torch.device):
        self.workload, self.device = workload, device
        data = getattr(workload, "train_data", None)
        self.data = None if data is None else tuple(t.to(device) for t in data)
        self.keys = trial_keys([data_seed(s) for s in seeds], device)
        self.gens = [torch.Generator().manual_seed(data_seed(s)) for s in seeds] if data is None else None
        self.block, self.block_start = None, 0  # (trials, BLOCK, batch) indices of steps block_start...

    def draw(self, step: int, batch_size: int):
        if self.data is not None:
            x, y = self.data
            if (self.block is None or not 0 <= step - self.block_start < self.block.shape[1]
                    or self.block.shape[2] != batch_size):
                steps = max(1, min(self.BLOCK, self.BLOCK_ELEMENTS // (len(self.keys) * batch_size)))
                self.block = batch_indices_block(self.keys, step, steps, batch_size, len(x))
                self.block_start = step
            idx = self.block[:, step - self.block_start]
            return x[idx], y[idx]
        x, y = zip(*(self.workload.sample_batch(batch_size, g, self.device) for g in self.gens))
        return torch.stack(x), torch.stack(y)

    def keep(self, idx: Tensor) -> None:
        self.keys = self.keys[idx.to(self.keys.device)]
        if self.block is not None:
            self.block = self.block[idx.to(self.block.device)]
        if self.gens is not None:
            self.gens = [self.gens[i] for i in idx.tolist()]


def _run(workload: Workload, specs: Sequence[TrialSpec], settings: RunSettings, mode: str,
         on_eval: Optional[EvalCallback], on_end: Optional[EndCallback],
         stats: Optional[Dict[str, float]]) -> List[TrialResult]:
    if not specs:
        return []
    if workload.evaluate is None and getattr(workload, "metrics", None) is None:  # step 0 is always evaluated
        raise ValueError(f"workload {workload.name!r} has no evaluate(); the study needs one")
    device = torch.device(settings.device)
    hp = _Schedules(specs, settings.max_steps)
    momentum = settings.optimizer != "sgd"
    if not momentum and torch.any(hp.momentum != 0):
        raise ValueError("optimizer 'sgd' got trials with momentum != 0")
    models = []
    for s in specs:
        torch.manual_seed(s.seed)
        models.append(workload.make_model().to(device))
    batches = _Batches(workload, [s.seed for s in specs], device)
    stack = _make_stack(mode, workload, models, momentum, batches.keys, device)
    dtypes = {p.dtype for m in models[:1] for p in m.parameters()}
    backend = stacked_backend(settings.backend, device, dtypes) if mode != "single" else \
        backends.get_backend(backends.requested_backend(settings.backend), device, dtypes)
    results = [TrialResult(spec=s) for s in specs]
    live = list(range(len(specs)))  # positions in ``specs`` of the rows of the stack
    initial_loss = torch.full((len(specs),), math.nan)  # by position in ``specs``; set at the first step
    finished: List[int] = []  # steps to result of the trials that reached the goal in this run
    cap = settings.step_cap if settings.prune else None
    eval_at = evaluation_steps(settings.max_steps, settings.eval_ratio)
    eval_set, next_eval = set(eval_at), dict(zip(eval_at, eval_at[1:] + [None]))
    eval_seconds, start = 0.0, time.perf_counter()

    def finish(rows: List[int], outcome: str, step: int) -> None:
        nonlocal live
        if not rows:
            return
        for r in rows:
            res = results[live[r]]
            res.outcome, res.end_step = outcome, step
            if on_end:
                on_end(res)
        drop = set(rows)
        keep = [r for r in range(len(live)) if r not in drop]
        live = [live[r] for r in keep]
        if live:
            idx = torch.tensor(keep, dtype=torch.long)
            stack.keep(idx)
            hp.keep(idx)
            batches.keep(idx)

    for t in range(settings.max_steps + 1):
        if t in eval_set:
            t0 = time.perf_counter()
            evaluated = stack.evaluate()
            eval_seconds += time.perf_counter() - t0
            done = []
            for r, m in enumerate(evaluated):
                res = results[live[r]]
                res.steps.append(t)
                for k, v in m.items():
                    res.metrics.setdefault(k, []).append(float(v))
                if on_eval:
                    on_eval(res.spec, t, m)
                if settings.goal is not None and beats(float(m[settings.goal_metric]), settings.goal,
                                                       settings.higher_is_better):
                    res.steps_to_result = t
                    done.append(r)
            if done and settings.prune:
                finished.extend([t] * len(done))
                cap = pruning_cap(settings.step_cap, finished, settings.keep_top)
            finish(done, GOAL, t)
            if t == settings.max_steps:
                finish(list(range(len(live))), BUDGET, t)
            elif cap is not None and next_eval[t] > cap:
                finish(list(range(len(live))), PRUNED, t)
            if not live:
                break
        x, y = batches.draw(t, settings.batch_size)
        losses = stack.losses_and_grads(x, y, t).float().cpu()
        rows = torch.tensor(live, dtype=torch.long)
        if t == 0:
            initial_loss[rows] = losses
        exploded = ~torch.isfinite(losses) | (losses > settings.divergence_factor * initial_loss[rows])
        if exploded.any():
            finish(exploded.nonzero().flatten().tolist(), INFEASIBLE, t)
            if not live:
                break
        stack.update(backend, lr=hp.lr(t), momentum=hp.momentum, weight_decay=hp.weight_decay,
                     nesterov=settings.optimizer == "nesterov", first_step=t == 0)
    if stats is not None:
        stats.update(eval_seconds=eval_seconds, total_seconds=time.perf_counter() - start,
                     path=type(stack).__name__)
    return results


def run_trials(workload: Workload, specs: Sequence[TrialSpec], settings: RunSettings, *,
               on_eval: Optional[EvalCallback] = None, on_end: Optional[EndCallback] = None,
               stats: Optional[Dict[str, object]] = None) -> List[TrialResult]:
    """Train ``specs`` together at ``settings.batch_size``: with the trial engine when the
    model converts, else (``settings.engine`` "auto", with a warning, or "vmap") the vmap path.

    ``on_eval(spec, step, metrics)`` is called for every evaluation of every
    trial as it happens, ``on_end(result)`` when a trial stops (the study
    stores both). ``stats``, when given, receives ``eval_seconds``,
    ``total_seconds`` and the ``path`` that ran. Returns one TrialResult per spec, in order.
    """
    return _run(workload, specs, settings, settings.engine, on_eval, on_end, stats)


def train_single(workload: Workload, spec: TrialSpec, settings: RunSettings, *,
                 on_eval: Optional[EvalCallback] = None, on_end: Optional[EndCallback] = None,
                 stats: Optional[Dict[str, object]] = None) -> TrialResult:
    """Train one trial on a plain model with the same data, schedule and stopping
    rules: the one-at-a-time reference for :func:`run_trials`."""
    return _run(workload, [spec], settings, "single", on_eval, on_end, stats)[0]
