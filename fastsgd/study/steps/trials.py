"""Train many trials of one batch size at once: vmapped models, one fused optimizer step.

The trials of a batch size are stacked into one batched model
(``torch.func.stack_module_state``; forward and loss through
``torch.func.functional_call`` under ``torch.func.vmap``), and the optimizer
step is ONE call of the fused kernel (``fastsgd.backends.get_backend``'s
``sgd_step``) with per-trial lr and momentum as 1-D tensors along the stacked
dimension ("stacked trials", see fastsgd/kernels/reference.py).

Reproducibility: a trial is fully determined by its seed and hyperparameters.
``torch.manual_seed(seed)`` precedes ``workload.make_model()``, and the trial's
own ``torch.Generator`` (seeded with :func:`data_seed`) draws its training
batches, so each trial sees its own batch sequence whatever else runs beside
it. :func:`train_single` runs the same loop on a plain (unstacked) model; the
tests check that both give the same curves.

Per trial and step (step = optimizer updates done so far):
- lr schedule: constant, Goyal et al.'s linear warm-up (``warmup_steps``,
  ``warmup_start_lr``) and/or Shallue et al.'s linear decay to
  ``decay_alpha * lr`` over ``decay_fraction * max_steps`` steps;
- evaluation at the steps of :func:`evaluation_steps` (every step up to 40,
  then each <= 5 % after the previous), so steps to result is resolved to 5 %;
- stop when an evaluation beats the goal ("goal"), at the step budget
  ("budget"), when the training loss is NaN/inf or above ``divergence_factor``
  times the trial's initial loss ("infeasible"), or, with pruning, once its
  next evaluation would come after the best finished trial of the batch size
  ("pruned": it can no longer win).
Stopped trials are removed from the stack (rows dropped from parameters,
momentum buffers and hyperparameter tensors), so the others run on unchanged
and the remaining work shrinks (masking would keep computing dead rows).

Models: anything ``torch.func.functional_call`` can run under ``vmap``. Buffers
are passed along read-only, so batch norm must not track running statistics
(``track_running_stats=False``) in vmapped trials.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from fastsgd.backends import get_backend
from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED, beats
from fastsgd.study.workloads.base import Workload

OPTIMIZERS = ("sgd", "momentum", "nesterov")
CPU = torch.device("cpu")


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

    goal:        stop at the first evaluation strictly better than this (None: run to the budget)
    step_cap:    steps to result of the best trial already finished at this batch size (for pruning)
    """

    batch_size: int
    max_steps: int
    optimizer: str = "nesterov"
    goal: Optional[float] = None
    goal_metric: str = "val_error"
    higher_is_better: bool = False
    step_cap: Optional[int] = None
    prune: bool = True
    divergence_factor: float = 10.0
    eval_ratio: float = 1.05
    backend: str = "auto"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ValueError(f"batch_size and max_steps must be >= 1, got {self.batch_size} and {self.max_steps}")
        if not 1.0 < self.eval_ratio <= 2.0:
            raise ValueError(f"eval_ratio must be in (1, 2], got {self.eval_ratio}")
        if not self.divergence_factor > 1.0:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")


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
    """The seed of a trial's batch generator (kept apart from the init seed)."""
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


class _Stack:
    """The live trials as one vmapped model (parameters with trials as dim 0)."""

    def __init__(self, workload: Workload, models, momentum: bool):
        self.workload = workload
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

    def _forward(self, params, buffers, x):
        return functional_call(self.base, ({n: p for n, p in zip(self.names, params)}, buffers), (x,))

    def _trial_loss(self, params, buffers, x, y):
        return self.workload.loss(self._forward(params, buffers, x), y)

    def losses_and_grads(self, x: Tensor, y: Tensor):
        leaves = [p.requires_grad_(True) for p in self.params]
        losses = self._loss(leaves, self.buffers, x, y)
        grads = torch.autograd.grad(losses.sum(), leaves)  # trials are independent: d(sum)/d(row i) = grad of trial i
        for p in self.params:
            p.requires_grad_(False)
        # vmap's gradients may come back in a permuted layout; the fused kernels want the param's layout.
        return losses.detach(), [g.contiguous() for g in grads]

    @torch.no_grad()
    def evaluate(self) -> List[Dict[str, float]]:
        if self._metrics is not None:
            per_metric = {}
            for set_name, (x, y) in self.workload.eval_data.items():
                for name, values in self._metrics(self._outputs(self.params, self.buffers, x), y).items():
                    per_metric[f"{set_name}_{name}"] = values.tolist()
            return [{k: v[i] for k, v in per_metric.items()} for i in range(len(self.models))]
        out = []
        for i, model in enumerate(self.models):  # any Workload: copy row i into a real model
            for (name, p) in zip(self.names, self.params):
                model.get_parameter(name).copy_(p[i])
            for name, b in self.buffers.items():
                model.get_buffer(name).copy_(b[i])
            out.append(self.workload.evaluate(model, CPU))
        return out

    def keep(self, idx: Tensor) -> None:
        self.params = [p[idx].contiguous() for p in self.params]
        self.buffers = {k: v[idx] for k, v in self.buffers.items()}
        if self.bufs is not None:
            self.bufs = [b[idx].contiguous() for b in self.bufs]
        self.models = [self.models[i] for i in idx.tolist()]


class _Single:
    """One plain model (no vmap, no stacking): the one-at-a-time reference path."""

    def __init__(self, workload: Workload, models, momentum: bool):
        (self.model,) = models
        self.workload = workload
        self.params = [p.detach() for p in self.model.parameters()]
        self.bufs = [torch.zeros_like(p) for p in self.params] if momentum else None

    def losses_and_grads(self, x: Tensor, y: Tensor):
        with torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(True)
            loss = self.workload.loss(self.model(x[0]), y[0])
            grads = torch.autograd.grad(loss, list(self.model.parameters()))
        return loss.detach().reshape(1), list(grads)

    @torch.no_grad()
    def evaluate(self) -> List[Dict[str, float]]:
        return [self.workload.evaluate(self.model, CPU)]

    def keep(self, idx: Tensor) -> None:
        if len(idx) != 1:
            raise AssertionError("a single model cannot be split")


def _run(workload: Workload, specs: Sequence[TrialSpec], settings: RunSettings, stacked: bool,
         on_eval: Optional[EvalCallback], on_end: Optional[EndCallback]) -> List[TrialResult]:
    if not specs:
        return []
    if workload.evaluate is None and getattr(workload, "metrics", None) is None:  # step 0 is always evaluated
        raise ValueError(f"workload {workload.name!r} has no evaluate(); the study needs one")
    models = []
    for s in specs:
        torch.manual_seed(s.seed)
        models.append(workload.make_model().to(CPU))
    momentum = settings.optimizer != "sgd"
    stack = (_Stack if stacked else _Single)(workload, models, momentum)
    hp = _Schedules(specs, settings.max_steps)
    if not momentum and torch.any(hp.momentum != 0):
        raise ValueError("optimizer 'sgd' got trials with momentum != 0")
    backend = get_backend(settings.backend, CPU, {p.dtype for p in stack.params})
    gens = [torch.Generator().manual_seed(data_seed(s.seed)) for s in specs]
    results = [TrialResult(spec=s) for s in specs]
    live = list(range(len(specs)))  # positions in ``specs`` of the rows of the stack
    initial_loss = torch.full((len(specs),), math.nan)  # by position in ``specs``; set at the first step
    cap = settings.step_cap if settings.prune else None
    eval_at = evaluation_steps(settings.max_steps, settings.eval_ratio)
    eval_set, next_eval = set(eval_at), dict(zip(eval_at, eval_at[1:] + [None]))

    def finish(rows: List[int], outcome: str, step: int) -> None:
        nonlocal live
        if not rows:
            return
        for r in rows:
            res = results[live[r]]
            res.outcome, res.end_step = outcome, step
            if on_end:
                on_end(res)
        keep = [r for r in range(len(live)) if r not in set(rows)]
        live = [live[r] for r in keep]
        if live:
            idx = torch.tensor(keep, dtype=torch.long)
            stack.keep(idx)
            hp.keep(idx)
            del gens_rows[:]
            gens_rows.extend(gens[i] for i in live)

    gens_rows = list(gens)
    for t in range(settings.max_steps + 1):
        if t in eval_set:
            done = []
            for r, m in enumerate(stack.evaluate()):
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
                cap = t if cap is None else min(cap, t)
            finish(done, GOAL, t)
            if t == settings.max_steps:
                finish(list(range(len(live))), BUDGET, t)
            elif cap is not None and next_eval[t] > cap:
                finish(list(range(len(live))), PRUNED, t)
            if not live:
                break
        x, y = zip(*(workload.sample_batch(settings.batch_size, g, CPU) for g in gens_rows))
        losses, grads = stack.losses_and_grads(torch.stack(x), torch.stack(y))
        rows = torch.tensor(live, dtype=torch.long)
        if t == 0:
            initial_loss[rows] = losses.float()
        exploded = ~torch.isfinite(losses) | (losses > settings.divergence_factor * initial_loss[rows])
        if exploded.any():
            bad = exploded.nonzero().flatten().tolist()
            keep = [r for r in range(len(live)) if r not in set(bad)]
            finish(bad, INFEASIBLE, t)
            if not live:
                break
            grads = [g[torch.tensor(keep)] for g in grads] if stacked else grads
        if hp.weight_decay.any():
            wd = hp.weight_decay.to(grads[0].dtype)
            grads = [g + wd.reshape((-1,) + (1,) * (g.ndim - 1)) * p if stacked else g + wd[0] * p
                     for g, p in zip(grads, stack.params)]
        lr = hp.lr(t)
        if stacked:
            backend.sgd_step(stack.params, grads, stack.bufs, lr=lr, momentum=hp.momentum,
                             nesterov=settings.optimizer == "nesterov", first_step=t == 0, stacked_trials=True)
        else:
            backend.sgd_step(stack.params, grads, stack.bufs, lr=float(lr[0]), momentum=float(hp.momentum[0]),
                             nesterov=settings.optimizer == "nesterov", first_step=t == 0)
    return results


def run_trials(workload: Workload, specs: Sequence[TrialSpec], settings: RunSettings, *,
               on_eval: Optional[EvalCallback] = None, on_end: Optional[EndCallback] = None) -> List[TrialResult]:
    """Train ``specs`` together as one vmapped model at ``settings.batch_size``.

    ``on_eval(spec, step, metrics)`` is called for every evaluation of every
    trial as it happens, ``on_end(result)`` when a trial stops (the study
    stores both). Returns one TrialResult per spec, in order.
    """
    return _run(workload, specs, settings, True, on_eval, on_end)


def train_single(workload: Workload, spec: TrialSpec, settings: RunSettings, *,
                 on_eval: Optional[EvalCallback] = None, on_end: Optional[EndCallback] = None) -> TrialResult:
    """Train one trial on a plain model with the same schedule and stopping
    rules: the one-at-a-time reference for :func:`run_trials`."""
    return _run(workload, [spec], settings, False, on_eval, on_end)[0]
