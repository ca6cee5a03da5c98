"""Run a whole steps-to-result study: every batch size, stored as it goes, then analysed.

:func:`run_study` takes a :class:`StudyConfig`, and for each batch size
enqueues trials in the Optuna storage stage by stage (each stage once), recovers
trials of dead runs, trains the waiting trials in vmapped groups, and finally
writes ``study_summary.json`` (schema in fastsgd.study.steps.analysis, plus the
protocol fields of :func:`protocol_report`) and the plots into ``config.out``.
Running the same configuration again resumes: finished trials are read back,
not rerun, and every decision below is recomputed from them identically.

Protocol ``tuned`` (Shallue et al.), per batch size, in this order (the rules
are the pure functions of fastsgd.study.steps.search):

1. search: ``trials`` points of the batch size's own scrambled Sobol sequence,
   topped up with further points of it until ``trials`` of them did not
   diverge, or ``max_trials`` (default 3x) were tried (reported as a short
   search). Pruning stops a trial once it cannot beat the ``keep_top``-th best
   steps to result, so the best ``keep_top`` trials are all measured.
2. refine (``refine`` > 0): that many Sobol points in the box around the best
   ``keep_top`` trials (role "refine").
3. step budget: every batch size starts at ``budget`` steps (``budgets``
   overrides it per batch size). While the best trial needed more than half of
   the budget, or none reached the goal, the best ``keep_top`` trials are rerun
   with ``budget_growth`` times the budget, up to ``budget_cap``. A batch size
   where nothing reached the goal at the largest budget is *censored*: its
   steps to result is only known to exceed that budget.
4. reseeds (``reseeds`` > 0): the best trial's hyperparameters rerun with that
   many other seeds (role "reseed", never part of the minimum over trials).
5. full curves (``full_curves``): the best ``keep_top`` trials whose curve was
   cut (at the goal or by pruning) rerun to their budget without the goal stop,
   and reseeds run to their budget, so steps to result can be recomputed at a
   harder goal.

A rerun (3, 5) keeps the trial's id and seed; it replaces the earlier attempt
as the trial's record (both stay in the Optuna storage).

Several processes (or machines) may run the same configuration on one
storage URL at once: each takes waiting trials from the shared queue, and
before every decision (a top-up, the next stage, the next batch size) waits for
the trials the others still run, taking over those whose process stops sending
heartbeats (see fastsgd.study.steps.storage). Every decision is a function of
the stored records, so every process takes the same ones (a stage is enqueued
once) and ends with the complete study and the same summary.

A Golmant rule (``constant``, ``sqrt``, ``linear``, ``linear-warmup``) searches
only at ``base_batch_size`` (default: the smallest) and trains every other batch
size with the base's best hyperparameters, lr scaled by the rule, over
``config.trials`` seeds at the base's final budget.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from fastsgd.measure import strict_json
from fastsgd.study.progress import Progress
from fastsgd.study.steps import curves, search
from fastsgd.study.steps.analysis import (
    CENSORED,
    FINAL_OUTCOMES,
    INFEASIBLE,
    SCHEMA,
    TrialRecord,
    analyze,
    effective_lr,
    golmant_goal,
    trial_steps_to_result,
)
from fastsgd.study.steps.storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, StudyStorage
from fastsgd.study.steps.trials import RunSettings, run_trials, stacked_backend
from fastsgd.study.workloads import get_workload
from fastsgd.study.workloads.base import Workload
from fastsgd.study.workloads.data import restrict_eval_sets

PROTOCOLS = ("tuned",) + search.SCALING_RULES
GOAL_RULES = ("fixed", "golmant")
TRAIN_SECONDS = "train_seconds"  # meta key: seconds spent training groups of trials, over all runs and workers
WAIT_POLL_SECONDS = 1.0  # how often a worker with nothing left to claim looks at the others' trials


@dataclass
class StudyConfig:
    """Everything that defines a study (stored with it; a resume must match).

    trials:      non-diverged search trials wanted per batch size (the search tops up to this)
    max_trials:  at most this many search trials per batch size (0: 3 * trials)
    keep_top:    pruning keeps the best keep_top trials per batch size measured; budget reruns
                 and full curves take these
    reseeds:     extra seeds of each batch size's best setting
    refine:      trials of the second search stage around the best region (0: none)
    budget:      initial step budget at every batch size; budgets: {batch size: steps} overrides
    budget_growth, budget_cap: budget extension factor and the largest budget
    full_curves: rerun the top trials to their budget without the goal stop
    goal:        fixed goal value (None: the workload's default); ignored for goal_rule "golmant"
    goal_metric: metric compared with the goal (None: the workload's goal_metric), e.g. val_error, train_loss
    space:       search space (fastsgd.study.steps.search format; None: search.default_space(optimizer))
    group_size:  trials trained together in one vmapped group (0: all waiting trials of a batch size)
    train_metrics: also score the training subset at every evaluation (always when the goal metric is train_*)
    heartbeat_interval, grace_period: seconds between a running trial's heartbeats, and without one before
                 other processes take the trial over (fastsgd.study.steps.storage)
    """

    out: str
    workload: str = "mnist1d-mlp"
    optimizer: str = "nesterov"
    batch_sizes: List[int] = field(default_factory=lambda: [2 ** k for k in range(3, 13)])
    trials: int = 32
    max_trials: int = 0
    keep_top: int = 5
    reseeds: int = 3
    refine: int = 0
    goal: Optional[float] = None
    goal_rule: str = "fixed"
    goal_metric: Optional[str] = None
    higher_is_better: bool = False
    space: Optional[Dict[str, object]] = None
    protocol: str = "tuned"
    base_batch_size: Optional[int] = None
    budget: int = 1000
    budgets: Dict[int, int] = field(default_factory=dict)
    budget_growth: float = 2.0
    budget_cap: int = 20000
    full_curves: bool = False
    warmup_epochs: float = 5.0
    group_size: int = 0
    prune: bool = True
    divergence_factor: float = 10.0
    eval_ratio: float = 1.05
    train_metrics: bool = False
    seed: int = 0
    storage: Optional[str] = None
    backend: str = "auto"
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD

    def validate(self) -> None:
        if not self.batch_sizes or any(int(b) != b or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"batch sizes repeat: {self.batch_sizes}")
        if self.trials < 1:
            raise ValueError(f"need at least one trial per batch size, got {self.trials}")
        if self.max_trials and self.max_trials < self.trials:
            raise ValueError(f"max_trials ({self.max_trials}) must be 0 (3 * trials) or >= trials ({self.trials})")
        for name in ("keep_top", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("reseeds", "refine"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.goal_rule not in GOAL_RULES:
            raise ValueError(f"Invalid goal rule: {self.goal_rule!r}; choose one of {', '.join(GOAL_RULES)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Invalid protocol: {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.protocol != "tuned" and self.goal_rule == "golmant":
            raise ValueError("the Golmant goal rule needs protocol 'tuned' (the base batch size is tuned against "
                             "a goal that the largest batch size defines)")
        if self.base_batch_size is not None and self.base_batch_size not in self.batch_sizes:
            raise ValueError(f"base batch size {self.base_batch_size} is not among the batch sizes {self.batch_sizes}")
        unknown = sorted(set(int(b) for b in self.budgets) - set(self.batch_sizes))
        if unknown:
            raise ValueError(f"budgets given for batch sizes {unknown} that are not among {self.batch_sizes}")
        if any(int(v) < 1 for v in self.budgets.values()):
            raise ValueError(f"budgets must be >= 1 step, got {self.budgets}")
        if not self.budget_growth > 1.0:
            raise ValueError(f"budget_growth must be > 1, got {self.budget_growth}")
        largest = max([self.budget] + [int(v) for v in self.budgets.values()])
        if self.budget_cap < largest:
            raise ValueError(f"budget_cap ({self.budget_cap}) is below an initial budget ({largest})")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")

    def study_name(self) -> str:
        return f"{self.workload}/{self.optimizer}/{self.protocol}"

    def stored(self) -> Dict[str, object]:
        """The settings that change results (checked on resume); out/storage/backend may differ."""
        d = asdict(self)
        for k in ("out", "storage", "backend", "group_size", "heartbeat_interval", "grace_period"):
            d.pop(k)
        d["budgets"] = {str(k): int(v) for k, v in sorted(self.budgets.items(), key=lambda kv: int(kv[0]))}
        return d

    def initial_budget(self, batch_size: int) -> int:
        """The step budget a batch size starts with."""
        budgets = {int(k): int(v) for k, v in self.budgets.items()}
        return budgets.get(int(batch_size), int(self.budget))

    def search_cap(self) -> int:
        return self.max_trials or 3 * self.trials


class _Progress:
    """Trials done / running / infeasible over the trials this run trains (the total grows with every
    claimed group): a bar on a terminal, else one line per finished batch size (fastsgd.study.progress)."""

    def __init__(self, enabled: bool):
        self.progress = Progress(0, unit="trial", enabled=enabled)
        self.last = None

    def grow(self, n: int) -> None:
        self.progress.grow(n)

    def show(self, batch_size: int, done: int, running: int, infeasible: int, advance: int = 0) -> None:
        if self.last is not None and self.last[0] != batch_size:
            self._line()
        self.last = (batch_size, done, infeasible)
        self.progress.status(f"B={batch_size}: done {done} running {running} infeasible {infeasible}")
        self.progress.advance(advance)

    def _line(self) -> None:
        b, done, infeasible = self.last
        self.progress.line(f"  batch size {b}: {done} trials finished, {infeasible} infeasible")

    def close(self) -> None:
        if self.last is not None:
            self._line()
            self.last = None
        self.progress.close()


def _trial(index: int, hp: Dict[str, float], seed: int, space, *, role: str = "search", point=None,
           base_trial: Optional[int] = None, max_steps: int, goal_stop: bool, prune: bool) -> Dict[str, object]:
    """The attributes of one enqueued trial (fastsgd.study.steps.storage.RUN_ATTRS)."""
    return {"index": int(index), "seed": int(seed), "hparams": dict(hp),
            "point": dict(point) if point is not None else search.point_of(hp, space), "role": role,
            "base_trial": base_trial, "max_steps": int(max_steps), "goal_stop": bool(goal_stop), "prune": bool(prune)}


def _rerun(rec: TrialRecord, space, **changes) -> Dict[str, object]:
    """``rec`` enqueued again under its own id and seed, with changed run settings."""
    run = {"max_steps": rec.max_steps, "goal_stop": True, "prune": True, **changes}
    return _trial(rec.trial_id, rec.hparams, rec.seed, space, role=rec.role, base_trial=rec.base_trial, **run)


class _BatchSize:
    """One batch size of a study: its storage study, its stages and how its trials run."""

    def __init__(self, config: StudyConfig, store: StudyStorage, workload: Workload, batch_size: int,
                 goal: Optional[float], metric: str, progress: _Progress):
        self.config, self.store, self.workload, self.bs = config, store, workload, batch_size
        self.goal, self.metric, self.progress = goal, metric, progress
        self.study = store.batch_study(batch_size, config.initial_budget(batch_size))
        self.done = self.infeasible = 0

    def records(self) -> List[TrialRecord]:
        return self.store.records(self.bs)

    def rank(self, records=None) -> List[TrialRecord]:
        return search.rank(self.records() if records is None else records, self.goal, self.metric,
                           self.config.higher_is_better)

    def next_index(self) -> int:
        """The first unused trial id (enqueued trials included)."""
        return 1 + max((int(t.user_attrs.get("index", -1)) for t in self.study.get_trials(deepcopy=False)),
                       default=-1)

    def run_stage(self, stage: str, trials: List[Dict[str, object]]) -> None:
        """Enqueue ``trials`` as ``stage`` (once) and train every waiting trial."""
        if trials:
            self.store.enqueue(self.study, trials, stage)
        self.drain()

    def drain(self) -> None:
        """Train waiting trials until none is left, then wait for those other processes run (taking
        over any they abandon), so that the next decision sees every trial of the stage."""
        self.store.recover_stale(self.study)
        group = self.config.group_size or 1 << 30
        while True:
            claimed = self.store.claim(self.study, group)
            if not claimed:
                if not self.store.unfinished(self.study):
                    break
                time.sleep(WAIT_POLL_SECONDS)
                self.store.recover_stale(self.study)
                continue
            self.progress.grow(len(claimed))
            kinds: Dict[Tuple[int, bool, bool], list] = {}
            for trial, spec in claimed:
                a = trial.user_attrs
                key = (int(a.get("max_steps") or self.config.initial_budget(self.bs)), bool(a.get("goal_stop", True)),
                       bool(a.get("prune", True)))
                kinds.setdefault(key, []).append((trial, spec))
            for (max_steps, goal_stop, prune), part in sorted(kinds.items()):
                self._train(part, max_steps, goal_stop, prune)

    def _train(self, part, max_steps: int, goal_stop: bool, prune: bool) -> None:
        config = self.config
        goal = self.goal if goal_stop else None
        prune = prune and config.prune and goal is not None
        cap = None
        if prune:  # the k-th best of the other trials (a rerun must not be pruned by its own earlier attempt)
            ids = {spec.trial_id for _, spec in part}
            cap = search.kth_best_steps([r for r in self.records() if r.trial_id not in ids], config.keep_top,
                                        goal, self.metric, config.higher_is_better)
        settings = RunSettings(batch_size=self.bs, max_steps=max_steps, optimizer=config.optimizer, goal=goal,
                               goal_metric=self.metric, higher_is_better=config.higher_is_better, step_cap=cap,
                               prune=prune, divergence_factor=config.divergence_factor,
                               eval_ratio=config.eval_ratio, backend=config.backend, keep_top=config.keep_top)
        by_id = {spec.trial_id: trial for trial, spec in part}
        running = [len(part)]

        def on_eval(spec, step, metrics):
            self.store.record_eval(by_id[spec.trial_id], step, metrics)

        def on_end(result):
            self.store.finish(self.study, by_id[result.spec.trial_id], result)
            self.done += 1
            running[0] -= 1
            self.infeasible += result.outcome == INFEASIBLE
            self.progress.show(self.bs, self.done, running[0], self.infeasible, advance=1)

        self.progress.show(self.bs, self.done, running[0], self.infeasible)
        start = time.perf_counter()
        run_trials(self.workload, [spec for _, spec in part], settings, on_eval=on_eval, on_end=on_end)
        self.store.add_meta(TRAIN_SECONDS, time.perf_counter() - start)

    # -- stages ------------------------------------------------------------------------------------
    def search(self, space) -> None:
        """Sobol points of this batch size's sequence until ``trials`` did not diverge (or the cap)."""
        config = self.config
        self.drain()  # a resume first finishes what was enqueued, so the decisions see the same records
        while True:
            # the stages already enqueued (by this run, an earlier one or another process) name the next one
            taken = sum(n for stage, n in self.store.enqueued(self.study).items() if stage.startswith("search@"))
            n = config.trials if taken == 0 else search.top_up(self.records(), config.trials, config.search_cap())
            if n == 0:
                return
            start = self.next_index()
            points = search.sobol_points(space, n, seed=search.point_seed(config.seed, self.bs), start=taken)
            seeds = search.trial_seeds(config.seed, self.bs, n, start=start)
            self.run_stage(f"search@{taken}", [
                _trial(start + i, search.hparams(p, space), s, space, point=p,
                       max_steps=config.initial_budget(self.bs), goal_stop=self.goal is not None, prune=True)
                for i, (p, s) in enumerate(zip(points, seeds))])

    def refine(self, space) -> None:
        config = self.config
        best = self.rank()[:config.keep_top]
        if not config.refine or not best:
            return
        sub = search.refine_space(space, [search.point_of(r.hparams, space) for r in best])
        start = self.next_index()
        points = search.sobol_points(sub, config.refine, seed=search.point_seed(config.seed, self.bs, "refine"))
        seeds = search.trial_seeds(config.seed, self.bs, config.refine, start=start)
        self.run_stage("refine", [
            _trial(start + i, search.hparams(p, space), s, space, role="refine", point=p,
                   max_steps=config.initial_budget(self.bs), goal_stop=True, prune=True)
            for i, (p, s) in enumerate(zip(points, seeds))])

    def extend_budget(self, space) -> None:
        config = self.config
        while True:
            records = self.records()
            budget = max(((r.max_steps or 0) for r in records if r.role in search.SEARCH_ROLES), default=0)
            new = search.next_budget(records, budget, self.goal, self.metric, growth=config.budget_growth,
                                     cap=config.budget_cap, higher_is_better=config.higher_is_better)
            if new is None:
                return
            self.run_stage(f"budget:{new}", [_rerun(r, space, max_steps=new)
                                             for r in self.rank(records)[:config.keep_top]])

    def reseed(self, space) -> None:
        config = self.config
        ranked = self.rank()
        if not config.reseeds or not ranked or \
                trial_steps_to_result(ranked[0], self.goal, self.metric, config.higher_is_better) is None:
            return  # nothing reached the goal: there is no best setting to rerun
        best, start = ranked[0], self.next_index()
        seeds = search.trial_seeds(config.seed, self.bs, config.reseeds, start=start)
        self.run_stage("reseed", [
            _trial(start + i, best.hparams, s, space, role="reseed", base_trial=best.trial_id,
                   max_steps=best.max_steps, goal_stop=not config.full_curves, prune=False)
            for i, s in enumerate(seeds)])

    def full_curves(self, space) -> None:
        cut = [r for r in self.rank()[:self.config.keep_top] if r.outcome != "budget"]
        self.run_stage("full", [_rerun(r, space, goal_stop=False, prune=False) for r in cut])

    def tuned(self, space) -> None:
        self.search(space)
        if self.goal is None:  # the Golmant rule's largest batch size: curves for the goal only
            return
        self.refine(space)
        self.extend_budget(space)
        self.reseed(space)
        if self.config.full_curves:
            self.full_curves(space)

    def scaled(self, space, hp: Dict[str, float], max_steps: int) -> None:
        """A Golmant protocol's batch size: ``trials`` seeds of one setting."""
        seeds = search.trial_seeds(self.config.seed, self.bs, self.config.trials)
        self.run_stage("scaled", [_trial(i, hp, s, space, point={}, max_steps=max_steps, goal_stop=True, prune=True)
                                  for i, s in enumerate(seeds)])


def open_storage(config: StudyConfig) -> StudyStorage:
    """The study's storage (``config.storage``, default ``<out>/study.db``); the
    configuration must match the stored one."""
    if config.space is None:
        config.space = search.validate_space(search.default_space(config.optimizer), config.optimizer)
    return StudyStorage(config.storage or os.path.join(config.out, "study.db"), config.study_name(),
                        config.stored(), heartbeat_interval=config.heartbeat_interval,
                        grace_period=config.grace_period)


def run_study(config: StudyConfig, *, workload: Optional[Workload] = None, progress: bool = True,
              log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run (or resume) the study and write ``study_summary.json`` and plots into
    ``config.out``. Returns the summary dict.

    ``workload``: your own Workload object (see fastsgd.study.workloads.data for
    how to write one); ``config.workload`` then only names the study.
    Default: the bundled workload named ``config.workload``."""
    config.validate()
    start = time.time()
    workload = workload if workload is not None else get_workload(config.workload)
    space = search.validate_space(config.space or search.default_space(config.optimizer), config.optimizer)
    config.space = space
    metric = config.goal_metric or workload.goal_metric
    if not (config.train_metrics or metric.startswith("train_")):
        workload = restrict_eval_sets(workload, ["val"])
    # the kernel backend before the storage: a backend that cannot step stacked trials is refused
    # before any trial is claimed
    stacked_backend(config.backend, RunSettings.device)
    os.makedirs(config.out, exist_ok=True)
    store = open_storage(config)
    batch_sizes = sorted(config.batch_sizes)
    bar = _Progress(progress)

    def batch(bs: int, goal_: Optional[float]) -> _BatchSize:
        return _BatchSize(config, store, workload, bs, goal_, metric, bar)

    try:
        goal = config.goal if config.goal is not None else workload.goal
        if config.goal_rule == "golmant":
            largest = batch_sizes[-1]
            batch(largest, None).tuned(space)
            goal = store.get_meta("goal")
            if goal is None:
                goal = golmant_goal(store.records(largest), metric, config.higher_is_better)
                store.set_meta("goal", goal)
            batch_sizes = batch_sizes[:-1]
        if goal is None:
            raise ValueError(f"no goal: workload {workload.name!r} has no default goal; give one or use goal_rule "
                             "'golmant'")
        if config.protocol == "tuned":
            for bs in batch_sizes:
                batch(bs, goal).tuned(space)
        else:
            base = config.base_batch_size or batch_sizes[0]
            base_run = batch(base, goal)
            base_run.tuned(space)
            ranked = base_run.rank()
            if not ranked or trial_steps_to_result(ranked[0], goal, metric, config.higher_is_better) is None:
                raise RuntimeError(f"protocol {config.protocol!r}: no trial at the base batch size {base} reached "
                                   f"the goal {metric} {goal}; cannot scale its hyperparameters")
            best = ranked[0]
            train_size = int(workload.info.get("train_size", 0))
            for bs in batch_sizes:
                if bs != base:
                    hp = search.scaled_hparams(best.hparams, base, bs, config.protocol,
                                               warmup_examples=int(config.warmup_epochs * train_size))
                    batch(bs, goal).scaled(space, hp, best.max_steps)
    finally:
        bar.close()
    summary = summarize(config, store, goal, metric, space, wall_seconds=time.time() - start)
    log(summary_table(summary))
    for w in summary["warnings"]:
        log(f"warning: {w}")
    return summary


def protocol_report(config: StudyConfig, records: List[TrialRecord], goal: float,
                    metric: str) -> Tuple[Dict[int, Dict[str, object]], List[str]]:
    """The search protocol's evidence per batch size and its warnings.

    Per batch size (added to the summary's per_batch_size rows): ``budgets`` (the step budgets of the
    search/refine trials as they stand: the initial one and, after extensions, the top trials' final
    one), ``search_trials`` / ``search_feasible`` / ``search_target`` / ``search_short`` (the first
    stage's trials, those that did not diverge, the number wanted, and whether the cap stopped the
    top-ups short of it), ``refine_trials``, ``reseed_trials``, ``next_lr_diverged`` (id of the
    diverged trial just above the winner's effective lr, or None).

    Censoring and the fit's refusal are the analysis's (fastsgd.study.steps.analysis: ``status``,
    ``steps_lower_bound``, ``fit_refused``), read from the same records.
    """
    by_bs: Dict[int, List[TrialRecord]] = {}
    for r in records:
        by_bs.setdefault(int(r.batch_size), []).append(r)
    rows: Dict[int, Dict[str, object]] = {}
    warnings: List[str] = []
    searched_at = set(by_bs) if config.protocol == "tuned" else {config.base_batch_size or min(by_bs, default=0)}
    for bs, recs in sorted(by_bs.items()):
        target = config.trials if bs in searched_at else None
        searching = [r for r in recs if r.role in search.SEARCH_ROLES]
        ranked = search.rank(recs, goal, metric, config.higher_is_better)
        best = ranked[0] if ranked else None
        steps = trial_steps_to_result(best, goal, metric, config.higher_is_better) if best else None
        budgets = sorted({int(r.max_steps) for r in searching if r.max_steps})
        first = [r for r in recs if r.role == "search"]
        feasible = sum(r.outcome in FINAL_OUTCOMES and r.outcome != INFEASIBLE for r in first)
        neighbour = search.next_lr_diverged(recs, best) if steps is not None else None
        row = {"budgets": budgets, "search_trials": len(first), "search_feasible": feasible,
               "search_target": target, "search_short": target is not None and feasible < target,
               "refine_trials": sum(r.role == "refine" for r in recs),
               "reseed_trials": sum(r.role == "reseed" for r in recs),
               "next_lr_diverged": neighbour.trial_id if neighbour else None}
        rows[bs] = row
        if row["search_short"]:
            warnings.append(f"batch size {bs}: only {feasible} of the {target} wanted search trials did not diverge "
                            f"({len(first)} tried, the cap); the search there is thinner than elsewhere")
        if neighbour is not None:
            warnings.append(f"batch size {bs}: the best trial {best.trial_id} (effective lr "
                            f"{effective_lr(best.hparams):.4g}) is next to a diverged trial {neighbour.trial_id} "
                            f"(effective lr {effective_lr(neighbour.hparams):.4g}): the optimum may lie at the "
                            "stability edge; the search cannot tell how close")
    return rows, warnings


def analyze_study(config: StudyConfig, records: List[TrialRecord], goal: float, metric: str, space, *,
                  n_boot: int = 1000, run_goal: Optional[float] = None) -> Dict[str, object]:
    """The study's analysis: fastsgd.study.steps.analysis.analyze with the study's own settings (top-k,
    the batch sizes it meant to measure, the search space for the edge warning) plus the protocol's
    evidence per batch size. The runner's summary and a later re-analysis (fastsgd.study.steps.curves)
    both come from here, so they agree. ``run_goal``: the goal the trials were stopped at (default
    ``goal``), for the harder-goal flag."""
    protocol, warnings = protocol_report(config, records, goal, metric)
    result = analyze(records, goal=goal, metric=metric, higher_is_better=config.higher_is_better,
                     space=space if config.protocol == "tuned" else None,
                     run_goal=goal if run_goal is None else run_goal, seed=config.seed,
                     top_k=config.keep_top, batch_sizes=config.batch_sizes, n_boot=n_boot)
    result["goal"]["rule"] = config.goal_rule
    for row in result["per_batch_size"]:
        row.update(protocol.get(row["batch_size"], {}))
        row["censored"] = row.get("status") == CENSORED
    result["warnings"] = list(result["warnings"]) + warnings
    return result


def storage_label(url: str, out: str) -> str:
    """The storage as the summary records it: a SQLite file inside the study's folder by its file name (the
    summary may be committed or moved), any other URL without its password."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database:
        path = os.path.abspath(parsed.database)
        if os.path.dirname(path) == os.path.abspath(out):
            return f"sqlite:///{os.path.basename(path)} (in this folder)"
    return parsed.render_as_string(hide_password=True)


def summarize(config: StudyConfig, store: StudyStorage, goal: float, metric: str, space, *,
              wall_seconds: float) -> Dict[str, object]:
    """Analyse the stored trials, draw the plots and write study_summary.json and curves.csv.gz."""
    from fastsgd.study import render

    records = store.records()
    result = analyze_study(config, records, goal, metric, space)
    # The time spent training, over every run and worker (each group of trials adds its own time as it ends):
    # a resume that only reads finished trials adds nothing, and a group cut short by a kill adds nothing
    # either (its trials are rerun, and the rerun counts).
    total = float(store.get_meta(TRAIN_SECONDS) or 0.0)
    summary = {"schema": SCHEMA, "workload": config.workload, "optimizer": config.optimizer,
               "protocol": config.protocol, "storage": storage_label(store.url, config.out), "search_space": space,
               **result, "config": config.stored(), "wall_seconds": wall_seconds, "wall_seconds_total": total}
    summary["plots"] = render.write_study_figures(summary, records, config.out)
    curves.write_curves(records, os.path.join(config.out, curves.FILENAME), meta={"study": config.study_name()})
    path = os.path.join(config.out, "study_summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(summary), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return summary


def _steps_cell(r: Dict[str, object]) -> object:
    """The point estimate (median over the best setting's seeds) with its within-point interval, or why
    there is none."""
    status = r.get("status", "measured")
    if status == CENSORED or r.get("censored"):
        return f">{r['steps_lower_bound']} (censored)"
    if status not in ("measured", "excluded"):
        return status
    median, ci = r.get("steps_median", r["steps"]), r.get("steps_ci")
    if median is None:
        return None
    text = f"{median:.0f}"
    if ci:
        text += f" [{ci[0]:.0f}, {'open' if ci[1] is None else f'{ci[1]:.0f}'}]"
    return text + (" excluded" if status == "excluded" else "")


def summary_table(summary: Dict[str, object]) -> str:
    """The per-batch-size table printed at the end of a study, with the fit, its diagnostics and the
    model-free brackets."""
    from fastsgd.study.tables import format_table

    rows = []
    for r in summary["per_batch_size"]:
        hp = r["best_hparams"] or {}
        edge = list(r["at_edge"]) + ([f"diverged:{r['next_lr_diverged']}"] if r.get("next_lr_diverged") is not None
                                     else [])
        searched = f"{r.get('search_feasible')}/{r.get('search_trials')}" + ("!" if r.get("search_short") else "")
        rows.append({"batch": r["batch_size"], "steps [CI]": _steps_cell(r), "best": r["steps"],
                     "seeds": len([s for s in (r.get("seeds") or []) if s is not None]) or None,
                     "trial": r["best_trial"], "lr": hp.get("lr"), "momentum": hp.get("momentum"),
                     "eff_lr": r["best_effective_lr"], "feasible": searched, "refine": r.get("refine_trials"),
                     "reseeds": r.get("reseed_trials"), "goal": r["reached_goal"], "infeas": r["infeasible"],
                     "budget": r["budget"], "pruned": r["pruned"], "max_steps": r["max_steps"],
                     "region": r.get("region"), "edge": ",".join(edge)})
    g = summary["goal"]
    lines = [f"{summary['workload']} / {summary['optimizer']} / {summary['protocol']}: steps to "
             f"{g['metric']} {'>' if g['higher_is_better'] else '<'} {g['value']:.4g} ({g['rule']} goal)",
             format_table(rows, ["batch", "steps [CI]", "best", "seeds", "trial", "lr", "momentum", "eff_lr",
                                 "feasible", "refine", "reseeds", "goal", "infeas", "budget", "pruned", "max_steps",
                                 "region", "edge"]),
             "steps [CI]: median over the best setting's seeds (reached/run in 'seeds') with its within-point "
             "interval; best: fewest steps of any search trial; feasible: search trials that did not diverge / "
             "tried (! = fewer than wanted); budget: trials that ran out of steps; region: from the measured "
             "points; edge: winner at the edge of the space or next to a diverged trial along the lr"]
    if summary.get("fit_refused"):
        lines.append(summary["fit_refused"])
    fit = summary.get("fit")
    if fit:
        ci = fit.get("B_crit_ci")
        lines.append(f"fit S(B) = {fit['S_min']:.4g} + {fit['E_min']:.4g}/B:  B_crit = {fit['B_crit']:.4g}"
                     + (f" ({fit['ci_level']:.0%} CI {ci[0]:.4g} .. {ci[1]:.4g})" if ci else ""))
        diag = summary.get("fit_diagnostics") or {}
        if diag.get("r2_log") is not None:
            lines.append(f"fit quality: R^2 (log) {diag['r2_log']:.3f}, largest residual "
                         f"{diag.get('max_abs_relative_residual') or 0:.0%}"
                         + ("; LACK OF FIT: " + "; ".join(diag.get("lack_of_fit_reasons") or [])
                            if diag.get("lack_of_fit") else ""))
    brk = summary.get("brackets") or {}
    if brk.get("b_steps_double") is not None or brk.get("b_examples_double") is not None:
        def b(x):
            return "n/a" if x is None else f"{x:.4g}"
        lines.append(f"model-free B_crit bracket (no fit): {b(brk.get('b_steps_double'))} (S = 2 S_min) .. "
                     f"{b(brk.get('b_examples_double'))} (B S = 2 E_min)")
    reg = summary.get("regions_data") or {}
    if reg:
        lines.append(f"regions from the points: perfect scaling up to B = {reg.get('perfect_scaling_max')}, "
                     f"maximal data parallelism from B = {reg.get('maximal_parallelism_min')}")
    lines.append(f"wall time {summary['wall_seconds']:.1f} s (training over all runs and workers of this study: "
                 f"{summary['wall_seconds_total']:.1f} s)")
    return "\n".join(lines)
