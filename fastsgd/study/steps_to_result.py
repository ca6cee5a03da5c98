"""Steps to result: the definition, the per-batch-size analysis and the S(B) fit.

Definition (Shallue et al. 2019, as in google-research/batch_science): a trial's
*steps to result* is the first evaluated step whose goal metric is strictly
better than the goal (``<`` for losses/errors, ``>`` when higher is better).
A trial that never gets there (step budget, divergence, stopped early) has no
steps to result. The steps to result of a batch size is the minimum over its
trials. Because every evaluation of every trial is stored, all of this can be
recomputed for any other goal (:func:`analyze` with a new ``goal``), with one
caveat: trials are stopped at the first evaluation that beats the goal they ran
with, and once they can no longer beat the best trial of their batch size, so
a *harder* goal than the running goal may find truncated curves (the summary
says so in ``goal.harder_than_run_goal``).

Fit (McCandlish et al. 2018): S(B) = S_min + E_min / B, a straight line in
1/B; B_crit = E_min / S_min. Fitted by non-negative least squares on relative
errors (each point weighted 1/S(B), so that 10 steps and 10,000 steps count
alike), with a case-resampling bootstrap over batch sizes for the intervals.
Regions (from the fit): the local slope d log S / d log B equals
-B_crit / (B + B_crit); *perfect scaling* while the slope is steeper than -0.9
(B <= B_crit / 9), *maximal data parallelism* once it is flatter than -0.1
(B >= 9 B_crit), *diminishing returns* in between.

On-disk summary (``study_summary.json``, written by ``fastsgd.study.runner``;
other modules such as the time-to-result report read it). Schema
``"fastsgd.steps_to_result/1"``::

    {
      "schema": "fastsgd.steps_to_result/1",
      "workload": "mnist1d-mlp", "optimizer": "nesterov",   # sgd | momentum | nesterov
      "protocol": "tuned",            # or a Golmant scaling rule: constant | sqrt | linear | linear-warmup
      "storage": "sqlite:///DIR/study.db",
      "goal": {"metric": "val_error", "value": 0.4, "higher_is_better": false,
               "rule": "fixed" | "golmant", "harder_than_run_goal": false},
      "search_space": {...},          # fastsgd.study.search format
      "per_batch_size": [             # ascending batch size
        {"batch_size": 8, "steps": 1234 | null, "best_trial": 17 | null,
         "trials": 32, "reached_goal": 5, "infeasible": 3, "budget": 4, "pruned": 20,
         "unfinished": 0, "max_steps": 20000,
         "best_hparams": {"lr": 0.1, "momentum": 0.9, ...} | null,
         "best_effective_lr": 1.0 | null,      # lr / (1 - momentum)
         "at_edge": ["lr:high", ...]},         # best trial on the edge of the search space
        ...],
      "fit": {"S_min": 40.1, "E_min": 9.8e3, "B_crit": 244.0,
              "S_min_ci": [lo, hi], "E_min_ci": [lo, hi], "B_crit_ci": [lo, hi],
              "ci_level": 0.95, "n_boot": 1000, "points": 10} | null,
      "regions": {"perfect_scaling_max": 27.1, "maximal_parallelism_min": 2196.0} | null,
      "effective_lr": {"batch_sizes": [...], "best": [...], "linear_rule": [...], "sqrt_rule": [...]},
      "warnings": ["..."],
      "plots": ["steps_vs_batch_size.png", ...],
      "wall_seconds": 183.2,          # this invocation
      "wall_seconds_total": 410.0     # all completed invocations on this storage (resumes add up)
    }

``steps``, ``fit`` and ``regions`` are ``null`` when not measurable (goal never
reached, fewer than two batch sizes with a result); non-finite numbers (e.g.
B_crit when S_min fits to 0) are written as ``null``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SCHEMA = "fastsgd.steps_to_result/1"

# Trial outcomes, as stored with every trial.
GOAL = "goal"              # beat the goal: has steps to result
BUDGET = "budget"          # ran its whole step budget without beating the goal
INFEASIBLE = "infeasible"  # loss became NaN/inf or exploded
PRUNED = "pruned"          # stopped once it could no longer beat the best trial of its batch size
FINAL_OUTCOMES = (GOAL, BUDGET, INFEASIBLE, PRUNED)

# Slopes of log S against log B that bound the three regions (see module doc).
PERFECT_SCALING_SLOPE = 0.9
MAXIMAL_PARALLELISM_SLOPE = 0.1


@dataclass
class TrialRecord:
    """One trial: its hyperparameters, how it ended, and its evaluation curve.

    ``steps[i]`` is the number of optimizer updates done when ``metrics[name][i]``
    was measured (step 0 is the initial model). ``outcome`` is one of
    FINAL_OUTCOMES, or "running"/"interrupted" for a trial that has not finished.
    """

    batch_size: int
    trial_id: int
    seed: int
    hparams: Dict[str, float]
    outcome: str
    steps: List[int] = field(default_factory=list)
    metrics: Dict[str, List[float]] = field(default_factory=dict)
    max_steps: Optional[int] = None
    role: str = "search"  # "search", "refine" (second search stage) or "reseed" (a batch size's best setting rerun with another seed)
    base_trial: Optional[int] = None  # role "reseed": the trial whose hyperparameters it reruns

    def curve(self, metric: str) -> Tuple[List[int], List[float]]:
        if not self.steps:
            return [], []  # not evaluated yet
        if metric not in self.metrics:
            raise KeyError(f"trial {self.trial_id} (batch size {self.batch_size}) has no metric {metric!r}; "
                           f"it has {sorted(self.metrics)}")
        return self.steps, self.metrics[metric]


def beats(value: float, goal: float, higher_is_better: bool = False) -> bool:
    """Strictly better than the goal; NaN never beats anything."""
    if value != value:
        return False
    return value > goal if higher_is_better else value < goal


def trial_steps_to_result(record: TrialRecord, goal: float, metric: str,
                          higher_is_better: bool = False) -> Optional[int]:
    """The first evaluated step whose ``metric`` is strictly better than ``goal``, else None."""
    steps, values = record.curve(metric)
    for step, value in zip(steps, values):
        if beats(value, goal, higher_is_better):
            return int(step)
    return None


def batch_size_steps_to_result(records: Sequence[TrialRecord], goal: float, metric: str,
                               higher_is_better: bool = False) -> Tuple[Optional[int], Optional[TrialRecord]]:
    """Minimum steps to result over ``records`` and the trial that achieved it
    (ties go to the lowest trial id); (None, None) when no trial reached the goal."""
    best: Tuple[Optional[int], Optional[TrialRecord]] = (None, None)
    for rec in sorted(records, key=lambda r: r.trial_id):
        s = trial_steps_to_result(rec, goal, metric, higher_is_better)
        if s is not None and (best[0] is None or s < best[0]):
            best = (s, rec)
    return best


def golmant_goal(records: Sequence[TrialRecord], metric: str, higher_is_better: bool = False) -> float:
    """Golmant et al. 2018's goal: the lower quartile (upper quartile when
    higher is better) of the best values reached by the given trials, meant to
    be the trials of the largest batch size. Trials with no finite value are skipped."""
    best_values = []
    for rec in records:
        vals = [v for v in rec.curve(metric)[1] if math.isfinite(v)]
        if vals:
            best_values.append(max(vals) if higher_is_better else min(vals))
    if not best_values:
        raise ValueError(f"Golmant goal: no trial has a finite {metric!r} value to take a quartile of")
    return float(np.quantile(best_values, 0.75 if higher_is_better else 0.25))


def effective_lr(hparams: Dict[str, float]) -> float:
    """lr / (1 - momentum): the step size that momentum SGD takes in steady state."""
    return float(hparams["lr"]) / (1.0 - float(hparams.get("momentum", 0.0)))


# ---------------------------------------------------------------- S(B) fit

@dataclass
class ScalingFit:
    """S(B) = S_min + E_min / B with bootstrap intervals (None when not computed)."""

    S_min: float
    E_min: float
    points: int
    S_min_ci: Optional[Tuple[float, float]] = None
    E_min_ci: Optional[Tuple[float, float]] = None
    B_crit_ci: Optional[Tuple[float, float]] = None
    ci_level: float = 0.95
    n_boot: int = 0

    @property
    def B_crit(self) -> float:
        return self.E_min / self.S_min if self.S_min > 0 else math.inf

    def steps(self, batch_size) -> np.ndarray:
        return self.S_min + self.E_min / np.asarray(batch_size, dtype=float)

    def regions(self) -> Dict[str, float]:
        """Region boundaries in batch size (see the module docstring)."""
        b = self.B_crit
        lo = b * (1 - PERFECT_SCALING_SLOPE) / PERFECT_SCALING_SLOPE
        hi = b * (1 - MAXIMAL_PARALLELISM_SLOPE) / MAXIMAL_PARALLELISM_SLOPE
        return {"perfect_scaling_max": lo, "maximal_parallelism_min": hi}

    def to_dict(self) -> Dict[str, object]:
        return {"S_min": self.S_min, "E_min": self.E_min, "B_crit": self.B_crit,
                "S_min_ci": list(self.S_min_ci) if self.S_min_ci else None,
                "E_min_ci": list(self.E_min_ci) if self.E_min_ci else None,
                "B_crit_ci": list(self.B_crit_ci) if self.B_crit_ci else None,
                "ci_level": self.ci_level, "n_boot": self.n_boot, "points": self.points}


def _fit_once(batch_sizes: np.ndarray, steps: np.ndarray) -> Tuple[float, float]:
    from scipy.optimize import nnls
    # Relative residuals: (S_min + E_min/B)/S - 1, i.e. rows [1/S, 1/(B S)] against 1.
    a = np.stack([1.0 / steps, 1.0 / (batch_sizes * steps)], axis=1)
    (s_min, e_min), _ = nnls(a, np.ones_like(steps))
    return float(s_min), float(e_min)


def fit_scaling(batch_sizes: Sequence[float], steps: Sequence[float], *, n_boot: int = 1000,
                ci_level: float = 0.95, seed: int = 0) -> ScalingFit:
    """Fit S(B) = S_min + E_min/B to measured steps to result.

    Needs at least two distinct batch sizes with positive steps. The bootstrap
    resamples (batch size, steps) pairs with replacement ``n_boot`` times
    (resamples with fewer than two distinct batch sizes are skipped) and
    reports percentile intervals; with only a handful of batch sizes the
    interval is narrow for lack of resamples, not for certainty (with two
    batch sizes it collapses to the point estimate).
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"fit_scaling: batch_sizes and steps must be 1-D of equal length, got {b.shape} and {s.shape}")
    if np.any(~np.isfinite(s)) or np.any(s <= 0) or np.any(b <= 0):
        raise ValueError("fit_scaling: batch sizes and steps must be finite and positive")
    if len(np.unique(b)) < 2:
        raise ValueError(f"fit_scaling: need at least two distinct batch sizes, got {sorted(set(b.tolist()))}")
    s_min, e_min = _fit_once(b, s)
    fit = ScalingFit(S_min=s_min, E_min=e_min, points=len(b), ci_level=ci_level)
    if n_boot <= 0:
        return fit
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(b), len(b))
        if len(np.unique(b[idx])) < 2:
            continue
        samples.append(_fit_once(b[idx], s[idx]))
    if samples:
        arr = np.array(samples)
        with np.errstate(divide="ignore", invalid="ignore"):
            bcrit = np.where(arr[:, 0] > 0, arr[:, 1] / arr[:, 0], np.inf)
        q = [(1 - ci_level) / 2, (1 + ci_level) / 2]
        # "nearest": B_crit is inf for resamples with S_min = 0, and interpolating inf - inf is NaN
        fit.S_min_ci = tuple(float(x) for x in np.quantile(arr[:, 0], q, method="nearest"))
        fit.E_min_ci = tuple(float(x) for x in np.quantile(arr[:, 1], q, method="nearest"))
        fit.B_crit_ci = tuple(float(x) for x in np.quantile(bcrit, q, method="nearest"))
        fit.n_boot = len(samples)
    return fit


# ---------------------------------------------------------------- whole-study analysis

def analyze(records: Sequence[TrialRecord], *, goal: float, metric: str, higher_is_better: bool = False,
            space: Optional[Dict[str, object]] = None, run_goal: Optional[float] = None,
            n_boot: int = 1000, seed: int = 0) -> Dict[str, object]:
    """Per-batch-size steps to result, fit, regions and effective learning
    rates for ``records`` (any number of batch sizes) at ``goal``.

    ``space`` (fastsgd.study.search format) enables the edge-of-search-space
    warning; ``run_goal`` (the goal trials were stopped at) enables the
    truncated-curves flag. Returns the part of the study summary documented in
    the module docstring (``per_batch_size``, ``fit``, ``regions``,
    ``effective_lr``, ``warnings``, ``goal``).
    """
    from fastsgd.study.search import at_edge

    by_bs: Dict[int, List[TrialRecord]] = {}
    for r in records:
        by_bs.setdefault(int(r.batch_size), []).append(r)
    rows, warnings = [], []
    for bs in sorted(by_bs):
        recs = by_bs[bs]
        steps, best = batch_size_steps_to_result(recs, goal, metric, higher_is_better)
        counts = {o: sum(r.outcome == o for r in recs) for o in FINAL_OUTCOMES}
        row = {"batch_size": bs, "steps": steps, "best_trial": best.trial_id if best else None,
               "trials": len(recs), "reached_goal": sum(
                   trial_steps_to_result(r, goal, metric, higher_is_better) is not None for r in recs),
               "infeasible": counts[INFEASIBLE], "budget": counts[BUDGET], "pruned": counts[PRUNED],
               "unfinished": sum(r.outcome not in FINAL_OUTCOMES for r in recs),
               "max_steps": max((r.max_steps or 0) for r in recs) or None,
               "best_hparams": dict(best.hparams) if best else None,
               "best_effective_lr": effective_lr(best.hparams) if best else None,
               "at_edge": at_edge(best.hparams, space) if (best and space) else []}
        if row["at_edge"]:
            warnings.append(f"batch size {bs}: best trial {best.trial_id} lies at the edge of the search space "
                            f"({', '.join(row['at_edge'])}); widen the space there")
        if steps is None:
            warnings.append(f"batch size {bs}: no trial reached {metric} {'>' if higher_is_better else '<'} {goal}")
        rows.append(row)

    reached = [r for r in rows if r["steps"] is not None]
    fit = None
    if len(reached) >= 2:
        fit = fit_scaling([r["batch_size"] for r in reached], [r["steps"] for r in reached], n_boot=n_boot, seed=seed)
    eff = [r for r in rows if r["best_effective_lr"] is not None]
    eff_lr = {"batch_sizes": [r["batch_size"] for r in eff], "best": [r["best_effective_lr"] for r in eff]}
    if eff:
        b0, e0 = eff[0]["batch_size"], eff[0]["best_effective_lr"]
        eff_lr["linear_rule"] = [e0 * r["batch_size"] / b0 for r in eff]
        eff_lr["sqrt_rule"] = [e0 * math.sqrt(r["batch_size"] / b0) for r in eff]
    harder = run_goal is not None and beats(goal, run_goal, higher_is_better)
    if harder:
        warnings.append(f"goal {goal} is harder than the goal {run_goal} the trials ran with: curves stop at the "
                        "run goal, so steps to result may be missing or too high")
    return {"goal": {"metric": metric, "value": goal, "higher_is_better": higher_is_better,
                     "harder_than_run_goal": harder},
            "per_batch_size": rows, "fit": fit.to_dict() if fit else None,
            "regions": fit.regions() if fit else None, "effective_lr": eff_lr, "warnings": warnings}
