"""Run a whole steps-to-result study: every batch size, stored as it goes, then analysed.

:func:`run_study` takes a :class:`StudyConfig`, and for each batch size
enqueues the quasi-random trials in the Optuna storage (once), recovers trials
of dead runs, trains the waiting trials in vmapped groups, and finally writes
``study_summary.json`` (schema in fastsgd.study.steps_to_result) and the plots
into ``config.out``. Running the same configuration again resumes: finished
trials are read back, not rerun.

Protocols: ``tuned`` searches every batch size anew (Shallue et al.). A Golmant
rule (``constant``, ``sqrt``, ``linear``, ``linear-warmup``) searches only at
``base_batch_size`` (default: the smallest) and trains every other batch size
with the base's best hyperparameters, lr scaled by the rule, over
``config.trials`` seeds.

Step budget per batch size: ``ceil(budget_epochs * train_size / B)`` clamped to
[min_steps, max_steps], with train_size from ``workload.info['train_size']``;
a workload without one (streaming data, e.g. least squares) counts as
train_size 1, so its budget is min_steps unless budget_epochs is raised.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from fastsgd.measure import strict_json
from fastsgd.study import search
from fastsgd.study.data_workloads import get_workload, restrict_eval_sets
from fastsgd.study.steps_to_result import (INFEASIBLE, SCHEMA, analyze, batch_size_steps_to_result,
                                           golmant_goal, trial_steps_to_result)
from fastsgd.study.storage import StudyStorage
from fastsgd.study.trials import RunSettings, pruning_cap, run_trials
from fastsgd.study.workload import Workload

PROTOCOLS = ("tuned",) + search.SCALING_RULES
GOAL_RULES = ("fixed", "golmant")


@dataclass
class StudyConfig:
    """Everything that defines a study (stored with it; a resume must match).

    goal:        fixed goal value (None: the workload's default); ignored for goal_rule "golmant"
    goal_metric: metric compared with the goal (None: the workload's goal_metric), e.g. val_error, train_loss
    space:       search space (fastsgd.study.search format; None: search.default_space(optimizer))
    group_size:  trials trained together in one vmapped group (0: all trials of a batch size)
    train_metrics: also score the training subset at every evaluation (always when the goal metric is train_*)
    """

    out: str
    workload: str = "mnist1d-mlp"
    optimizer: str = "nesterov"
    batch_sizes: List[int] = field(default_factory=lambda: [2 ** k for k in range(3, 13)])
    trials: int = 32
    goal: Optional[float] = None
    goal_rule: str = "fixed"
    goal_metric: Optional[str] = None
    higher_is_better: bool = False
    space: Optional[Dict[str, object]] = None
    protocol: str = "tuned"
    base_batch_size: Optional[int] = None
    budget_epochs: float = 30.0
    min_steps: int = 200
    max_steps: int = 20000
    warmup_epochs: float = 5.0
    group_size: int = 0
    prune: bool = True
    divergence_factor: float = 10.0
    eval_ratio: float = 1.05
    train_metrics: bool = False
    seed: int = 0
    storage: Optional[str] = None
    backend: str = "auto"

    def validate(self) -> None:
        if not self.batch_sizes or any(int(b) != b or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"batch sizes repeat: {self.batch_sizes}")
        if self.trials < 1:
            raise ValueError(f"need at least one trial per batch size, got {self.trials}")
        if self.goal_rule not in GOAL_RULES:
            raise ValueError(f"Invalid goal rule: {self.goal_rule!r}; choose one of {', '.join(GOAL_RULES)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Invalid protocol: {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.protocol != "tuned" and self.goal_rule == "golmant":
            raise ValueError("the Golmant goal rule needs protocol 'tuned' (the base batch size is tuned against "
                             "a goal that the largest batch size defines)")
        if self.base_batch_size is not None and self.base_batch_size not in self.batch_sizes:
            raise ValueError(f"base batch size {self.base_batch_size} is not among the batch sizes {self.batch_sizes}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}")
        if self.budget_epochs <= 0:
            raise ValueError(f"budget_epochs must be > 0, got {self.budget_epochs}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")

    def study_name(self) -> str:
        return f"{self.workload}/{self.optimizer}/{self.protocol}"

    def stored(self) -> Dict[str, object]:
        """The settings that change results (checked on resume); out/storage/backend may differ."""
        d = asdict(self)
        for k in ("out", "storage", "backend", "group_size"):
            d.pop(k)
        return d


def step_budget(config: StudyConfig, workload: Workload, batch_size: int) -> int:
    n = int(workload.info.get("train_size", 0)) or 1
    return int(min(config.max_steps, max(config.min_steps, math.ceil(config.budget_epochs * n / batch_size))))


class _Progress:
    """tqdm bar over all trials with done / running / infeasible for the current batch size."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="trial", dynamic_ncols=True)

    def show(self, batch_size: int, done: int, running: int, infeasible: int, advance: int = 0) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"B={batch_size}: done {done} running {running} infeasible {infeasible}")
            self.bar.update(advance)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_batch_size(config: StudyConfig, store: StudyStorage, workload: Workload, batch_size: int,
                    trial_list, goal: Optional[float], metric: str, progress: _Progress) -> None:
    max_steps = step_budget(config, workload, batch_size)
    study = store.batch_study(batch_size, max_steps)
    store.enqueue(study, trial_list)
    store.recover_stale(study)
    records = store.records(batch_size)
    done = sum(r.outcome not in ("running", "interrupted") for r in records)
    infeasible = sum(r.outcome == INFEASIBLE for r in records)
    progress.show(batch_size, done, 0, infeasible, advance=done)
    group = config.group_size or config.trials
    while True:
        claimed = store.claim(study, group)
        if not claimed:
            break
        cap = None
        if goal is not None:  # the keep_top-th best steps to result of the trials already stored
            known = [trial_steps_to_result(r, goal, metric, config.higher_is_better) for r in store.records(batch_size)]
            cap = pruning_cap(None, [s for s in known if s is not None], RunSettings.keep_top)
        settings = RunSettings(batch_size=batch_size, max_steps=max_steps, optimizer=config.optimizer, goal=goal,
                               goal_metric=metric, higher_is_better=config.higher_is_better, step_cap=cap,
                               prune=config.prune and goal is not None, divergence_factor=config.divergence_factor,
                               eval_ratio=config.eval_ratio, backend=config.backend)
        by_id = {spec.trial_id: trial for trial, spec in claimed}
        running = [len(claimed)]

        def on_eval(spec, step, metrics):
            store.record_eval(by_id[spec.trial_id], step, metrics)

        def on_end(result):
            nonlocal done, infeasible
            store.finish(study, by_id[result.spec.trial_id], result)
            done += 1
            running[0] -= 1
            infeasible += result.outcome == INFEASIBLE
            progress.show(batch_size, done, running[0], infeasible, advance=1)

        progress.show(batch_size, done, running[0], infeasible)
        run_trials(workload, [spec for _, spec in claimed], settings, on_eval=on_eval, on_end=on_end)


def _tuned_trials(config: StudyConfig, space, batch_size: int):
    points = search.sobol_points(space, config.trials, seed=config.seed)
    seeds = search.trial_seeds(config.seed, batch_size, config.trials)
    return [(p, search.hparams(p, space), s) for p, s in zip(points, seeds)]


def _scaled_trials(config: StudyConfig, best_hp, base: int, batch_size: int, train_size: int):
    hp = search.scaled_hparams(best_hp, base, batch_size, config.protocol,
                               warmup_examples=int(config.warmup_epochs * train_size))
    seeds = search.trial_seeds(config.seed, batch_size, config.trials)
    return [({}, hp, s) for s in seeds]


def open_storage(config: StudyConfig) -> StudyStorage:
    """The study's storage (``config.storage``, default ``<out>/study.db``); the
    configuration must match the stored one."""
    if config.space is None:
        config.space = search.validate_space(search.default_space(config.optimizer), config.optimizer)
    return StudyStorage(config.storage or os.path.join(config.out, "study.db"), config.study_name(),
                        config.stored())


def run_study(config: StudyConfig, *, workload: Optional[Workload] = None, progress: bool = True,
              log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run (or resume) the study and write ``study_summary.json`` and plots into
    ``config.out``. Returns the summary dict.

    ``workload``: your own Workload object (see fastsgd.study.data_workloads for
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
    os.makedirs(config.out, exist_ok=True)
    store = open_storage(config)
    batch_sizes = sorted(config.batch_sizes)
    bar = _Progress(config.trials * len(batch_sizes), progress)
    try:
        goal = config.goal if config.goal is not None else workload.goal
        if config.goal_rule == "golmant":
            largest = batch_sizes[-1]
            _run_batch_size(config, store, workload, largest, _tuned_trials(config, space, largest), None,
                            metric, bar)
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
                _run_batch_size(config, store, workload, bs, _tuned_trials(config, space, bs), goal, metric, bar)
        else:
            base = config.base_batch_size or batch_sizes[0]
            _run_batch_size(config, store, workload, base, _tuned_trials(config, space, base), goal, metric, bar)
            _, best = batch_size_steps_to_result(store.records(base), goal, metric, config.higher_is_better)
            if best is None:
                raise RuntimeError(f"protocol {config.protocol!r}: no trial at the base batch size {base} reached "
                                   f"the goal {metric} {goal}; cannot scale its hyperparameters")
            train_size = int(workload.info.get("train_size", 0))
            for bs in batch_sizes:
                if bs != base:
                    _run_batch_size(config, store, workload, bs,
                                    _scaled_trials(config, best.hparams, base, bs, train_size), goal, metric, bar)
    finally:
        bar.close()
    summary = summarize(config, store, goal, metric, space, wall_seconds=time.time() - start)
    log(summary_table(summary))
    for w in summary["warnings"]:
        log(f"warning: {w}")
    return summary


def summarize(config: StudyConfig, store: StudyStorage, goal: float, metric: str, space, *,
              wall_seconds: float) -> Dict[str, object]:
    """Analyse the stored trials, draw the plots and write study_summary.json."""
    from fastsgd.study import study_plots

    records = store.records()
    result = analyze(records, goal=goal, metric=metric, higher_is_better=config.higher_is_better,
                     space=space if config.protocol == "tuned" else None, run_goal=goal, seed=config.seed)
    result["goal"]["rule"] = config.goal_rule
    # Training time adds up over the runs that completed (a resumed study counts each part once).
    total = float(store.get_meta("wall_seconds_total") or 0.0) + wall_seconds
    store.set_meta("wall_seconds_total", total)
    summary = {"schema": SCHEMA, "workload": config.workload, "optimizer": config.optimizer,
               "protocol": config.protocol, "storage": store.url, "search_space": space,
               **result, "config": config.stored(), "wall_seconds": wall_seconds, "wall_seconds_total": total}
    summary["plots"] = study_plots.plot_all(summary, records, config.out)
    path = os.path.join(config.out, "study_summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(summary), f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return summary


def summary_table(summary: Dict[str, object]) -> str:
    """The per-batch-size table printed at the end of a study."""
    from fastsgd.measure import format_table

    rows = []
    for r in summary["per_batch_size"]:
        hp = r["best_hparams"] or {}
        rows.append({"batch": r["batch_size"], "steps": r["steps"], "trial": r["best_trial"],
                     "lr": hp.get("lr"), "momentum": hp.get("momentum"), "eff_lr": r["best_effective_lr"],
                     "goal": r["reached_goal"], "infeas": r["infeasible"], "budget": r["budget"],
                     "pruned": r["pruned"], "max_steps": r["max_steps"], "edge": ",".join(r["at_edge"])})
    g = summary["goal"]
    lines = [f"{summary['workload']} / {summary['optimizer']} / {summary['protocol']}: steps to "
             f"{g['metric']} {'>' if g['higher_is_better'] else '<'} {g['value']:.4g} ({g['rule']} goal)",
             format_table(rows, ["batch", "steps", "trial", "lr", "momentum", "eff_lr", "goal", "infeas", "budget",
                                 "pruned", "max_steps", "edge"])]
    fit = summary.get("fit")
    if fit:
        ci = fit["B_crit_ci"]
        lines.append(f"fit S(B) = {fit['S_min']:.4g} + {fit['E_min']:.4g}/B:  B_crit = {fit['B_crit']:.4g}"
                     + (f" ({fit['ci_level']:.0%} CI {ci[0]:.4g} .. {ci[1]:.4g})" if ci else ""))
        reg = summary["regions"]
        lines.append(f"regions: perfect scaling B <= {reg['perfect_scaling_max']:.4g}, diminishing returns, "
                     f"maximal data parallelism B >= {reg['maximal_parallelism_min']:.4g}")
    lines.append(f"wall time {summary['wall_seconds']:.1f} s (all runs of this study: "
                 f"{summary['wall_seconds_total']:.1f} s)")
    return "\n".join(lines)
