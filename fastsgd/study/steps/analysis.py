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

Point estimate per batch size: the median of steps to result over the best setting's
seeds (the best trial plus its reseeds, TrialRecord.role "reseed"); with no reseeds, the
best trial's steps. ``steps`` stays batch_science's minimum over the search trials.
A batch size where no search trial reached the goal is *censored* when trials ran out of
budget (S(B) > ``steps_lower_bound``), *truncated* when curves stopped early (run goal,
pruning: unknown), *diverged* or *missing*; such points are shown and never fitted.

Fit (McCandlish et al. 2018): S(B) = S_min + E_min / B, a straight line in 1/B;
B_crit = E_min / S_min (:mod:`fastsgd.study.steps.scaling`: relative-error least squares,
residuals, R^2 in log space, lack-of-fit flag, model-free brackets, regions from the data).
The fit refuses when batch sizes larger than every measured one are censored, truncated or
missing: they decide S_min. Intervals: :mod:`fastsgd.study.steps.uncertainty` (bootstrap
over batch sizes, and per batch size over the top-k trials and the best setting's seeds).
Regions from the fit (``regions``): the local slope d log S / d log B equals
-B_crit / (B + B_crit); *perfect scaling* while the slope is steeper than -0.9
(B <= B_crit / 9), *maximal data parallelism* once it is flatter than -0.1
(B >= 9 B_crit), *diminishing returns* in between. The per-row ``region`` labels and
``regions_data`` come from the measured points alone.

On-disk summary (``study_summary.json``, written by ``fastsgd.study.steps.runner``;
other modules such as the time-to-result report read it). Schema
``"fastsgd.steps_to_result/2"`` (/1 lacked everything marked "/2")::

    {
      "schema": "fastsgd.steps_to_result/2",
      "workload": "mnist1d-mlp", "optimizer": "nesterov",   # sgd | momentum | nesterov
      "protocol": "tuned",            # or a Golmant scaling rule: constant | sqrt | linear | linear-warmup
      "storage": "sqlite:///DIR/study.db",
      "goal": {"metric": "val_error", "value": 0.4, "higher_is_better": false,
               "rule": "fixed" | "golmant", "harder_than_run_goal": false},
      "search_space": {...},          # fastsgd.study.steps.search format
      "per_batch_size": [             # ascending batch size
        {"batch_size": 8, "steps": 1234 | null, "best_trial": 17 | null,
         "trials": 32, "reached_goal": 5, "infeasible": 3, "budget": 4, "pruned": 20,
         "unfinished": 0, "max_steps": 20000,
         "best_hparams": {"lr": 0.1, "momentum": 0.9, ...} | null,
         "best_effective_lr": 1.0 | null,      # lr / (1 - momentum)
         "at_edge": ["lr:high", ...],          # best trial on the edge of the search space
         # /2:
         "status": "measured" | "censored" | "truncated" | "diverged" | "missing" | "excluded",
         "steps_lower_bound": 20000 | null,    # censored: S(B) is larger than this
         "reseeds": 3, "seeds": [1234, 1301, null, 1190],   # best trial first; null: did not reach the goal
         "steps_median": 1262.0 | null,        # the point estimate (fitted)
         "seed_spread": {"median", "min", "max", "n", "not_reached", "relative_half_range"},
         "topk": [{"trial": 17, "steps": 1234}, ...],       # best search/refine trials, ascending
         "steps_ci": [lo, hi] | null,          # within-point bootstrap interval of the point estimate;
                                               # hi null: too many replicates missed the goal (open upwards)
         "fit_residual": 0.05 | null,          # steps_median / fitted S(B) - 1
         "region": "perfect scaling" | "diminishing returns" | "maximal data parallelism" | null},
        ...],
      "steps_estimator": "...",               # /2: what the point estimate is
      "fit": {"S_min": 40.1, "E_min": 9.8e3, "B_crit": 244.0,
              "S_min_ci": [lo, hi], "E_min_ci": [lo, hi], "B_crit_ci": [lo, hi],
              "ci_level": 0.95, "n_boot": 1000, "points": 10} | null,
      "fit_refused": "no S(B) fit: ..." | null,                                  # /2
      "fit_diagnostics": {"residuals": [{"batch_size", "relative", "log"}], "r2_log", "runs_p",
                          "max_abs_relative_residual", "worst_batch_size", "within_point_checked",
                          "outside_within_point": [...], "lack_of_fit": bool,
                          "lack_of_fit_reasons": [...]} | null,                    # /2
      "uncertainty": {"n_boot", "ci_level", "resampled": "...", "within_point_batch_sizes", "batch_sizes",
                      "S_min_ci", "E_min_ci", "B_crit_ci", "b_steps_double_ci",
                      "b_examples_double_ci", "bracket_replicates_not_crossed"} | null,  # /2
      "brackets": {"S_min_measured", "S_min_measured_at", "E_min_measured", "E_min_measured_at",
                   "b_steps_double", "b_steps_double_bound", "b_examples_double",
                   "b_examples_double_bound", "b_steps_double_ci", "b_examples_double_ci"} | null,  # /2
      "regions": {"perfect_scaling_max": 27.1, "maximal_parallelism_min": 2196.0} | null,   # from the fit
      "regions_data": {"tolerance": 0.2, "perfect_scaling_max": 128 | null,
                       "maximal_parallelism_min": 1024 | null} | null,          # /2, from the points
      "effective_lr": {"batch_sizes": [...], "best": [...], "linear_rule": [...], "sqrt_rule": [...]},
      "warnings": ["..."],
      "plots": ["steps_vs_batch_size.png", ...],
      "wall_seconds": 183.2,          # this invocation
      "wall_seconds_total": 410.0     # time spent training trials, summed over every run and worker
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

from fastsgd.study.steps.scaling import brackets, data_regions, fit_diagnostics, fit_once
from fastsgd.study.steps.uncertainty import PointData, bootstrap, spread

SCHEMA = "fastsgd.steps_to_result/2"

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
    # "search", "refine" (second search stage) or "reseed" (a batch size's best setting rerun with another seed)
    role: str = "search"
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
        """Region boundaries in batch size from the fit (see the module docstring)."""
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


def fit_scaling(batch_sizes: Sequence[float], steps: Sequence[float], *, n_boot: int = 1000,
                ci_level: float = 0.95, seed: int = 0,
                points: Optional[Sequence[PointData]] = None) -> ScalingFit:
    """Fit S(B) = S_min + E_min/B to steps to result.

    Needs at least two distinct batch sizes with positive steps. Intervals come from
    :func:`fastsgd.study.steps.uncertainty.bootstrap` over ``points`` (the runs behind
    each batch size: seeds of the best setting and the top-k trials); without ``points``
    each batch size is one value and only batch sizes are resampled. With a handful of
    batch sizes and no within-point data the interval is narrow for lack of resamples, not
    for certainty (with two batch sizes it collapses to the point estimate).
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"fit_scaling: batch_sizes and steps must be 1-D of equal length, got {b.shape} and {s.shape}")
    if np.any(~np.isfinite(s)) or np.any(s <= 0) or np.any(b <= 0):
        raise ValueError("fit_scaling: batch sizes and steps must be finite and positive")
    if len(np.unique(b)) < 2:
        raise ValueError(f"fit_scaling: need at least two distinct batch sizes, got {sorted(set(b.tolist()))}")
    s_min, e_min = fit_once(b, s)
    fit = ScalingFit(S_min=s_min, E_min=e_min, points=len(b), ci_level=ci_level)
    if n_boot <= 0:
        return fit
    if points is None:
        points = [PointData(int(bi), [float(si)]) for bi, si in zip(b, s)]
    boot = bootstrap(points, n_boot=n_boot, ci_level=ci_level, seed=seed)
    fit.S_min_ci, fit.E_min_ci, fit.B_crit_ci, fit.n_boot = boot.S_min_ci, boot.E_min_ci, boot.B_crit_ci, boot.n_boot
    return fit


# ---------------------------------------------------------------- one batch size

MEASURED = "measured"      # some search/refine trial reached the goal
CENSORED = "censored"      # no trial reached it within the largest budget: S(B) > steps_lower_bound
TRUNCATED = "truncated"    # no trial reached it, but curves stopped early (run goal, pruning): unknown
DIVERGED = "diverged"      # every trial diverged
MISSING = "missing"        # an expected batch size without trials
EXCLUDED = "excluded"      # left out of the fit by the caller
SEARCH_ROLES = ("search", "refine")


def _point_runs(recs: Sequence[TrialRecord], best: TrialRecord, goal: float, metric: str,
                higher_is_better: bool, top_k: int):
    """(seed values, top-k [(trial id, steps)]) of one batch size."""
    def sr(r):
        v = trial_steps_to_result(r, goal, metric, higher_is_better)
        return math.inf if v is None else float(v)
    reseeds = sorted((r for r in recs if r.role == "reseed" and r.base_trial == best.trial_id),
                     key=lambda r: r.trial_id)
    seeds = [sr(best)] + [sr(r) for r in reseeds if r.outcome in FINAL_OUTCOMES]
    ranked = sorted(((sr(r), r.trial_id) for r in recs if r.role in SEARCH_ROLES), key=lambda x: (x[0], x[1]))
    topk = [(tid, v) for v, tid in ranked if math.isfinite(v)][:top_k]
    return seeds, topk


def _unreached_status(recs: Sequence[TrialRecord], goal: float, metric: str, higher_is_better: bool):
    """(status, lower bound on S(B)) for a batch size where no search trial reached the goal."""
    search = [r for r in recs if r.role in SEARCH_ROLES]
    if all(r.outcome == INFEASIBLE for r in search):
        return DIVERGED, None
    stopped_early = [r for r in search if r.outcome in (GOAL, PRUNED)]
    ran_out = [r for r in search if r.outcome == BUDGET and r.steps]
    if stopped_early or not ran_out:
        return TRUNCATED, None
    return CENSORED, int(max(r.steps[-1] for r in ran_out))


# ---------------------------------------------------------------- whole-study analysis

def analyze(records: Sequence[TrialRecord], *, goal: float, metric: str, higher_is_better: bool = False,
            space: Optional[Dict[str, object]] = None, run_goal: Optional[float] = None,
            n_boot: int = 1000, seed: int = 0, top_k: int = 5, ci_level: float = 0.95,
            batch_sizes: Optional[Sequence[int]] = None, exclude: Sequence[int] = ()) -> Dict[str, object]:
    """Per-batch-size steps to result with their spread and intervals, the fit with its
    diagnostics, model-free brackets, regions and effective learning rates for ``records``
    (any number of batch sizes) at ``goal``.

    ``space`` (fastsgd.study.steps.search format) enables the edge-of-search-space warning;
    ``run_goal`` (the goal trials were stopped at) enables the truncated-curves flag;
    ``top_k``: how many of the best search/refine trials per batch size enter the
    bootstrap; ``batch_sizes``: the batch sizes the study meant to measure (those without
    trials show up as "missing"); ``exclude``: batch sizes left out of the fit on purpose.
    Returns the part of the study summary documented in the module docstring.
    """
    from fastsgd.study.steps.search import at_edge

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    by_bs: Dict[int, List[TrialRecord]] = {}
    for r in records:
        by_bs.setdefault(int(r.batch_size), []).append(r)
    for b in batch_sizes or ():
        by_bs.setdefault(int(b), [])
    rows, warnings, points = [], [], []
    for bs in sorted(by_bs):
        recs = by_bs[bs]
        search_recs = [r for r in recs if r.role in SEARCH_ROLES]
        steps, best = batch_size_steps_to_result(search_recs, goal, metric, higher_is_better)
        reseeded = {r.base_trial for r in recs if r.role == "reseed"}
        if best is not None and best.trial_id not in reseeded:
            # a tie for the fewest steps goes to the trial whose seeds were measured
            tied = [r for r in search_recs if r.trial_id in reseeded
                    and trial_steps_to_result(r, goal, metric, higher_is_better) == steps]
            best = min(tied, key=lambda r: r.trial_id) if tied else best
        counts = {o: sum(r.outcome == o for r in search_recs) for o in FINAL_OUTCOMES}
        row = {"batch_size": bs, "steps": steps, "best_trial": best.trial_id if best else None,
               "trials": len(search_recs), "reached_goal": sum(
                   trial_steps_to_result(r, goal, metric, higher_is_better) is not None for r in search_recs),
               "infeasible": counts[INFEASIBLE], "budget": counts[BUDGET], "pruned": counts[PRUNED],
               "unfinished": sum(r.outcome not in FINAL_OUTCOMES for r in recs),
               "reseeds": sum(r.role == "reseed" for r in recs),
               "max_steps": max((r.max_steps or 0) for r in recs) if recs else None,
               "best_hparams": dict(best.hparams) if best else None,
               "best_effective_lr": effective_lr(best.hparams) if best else None,
               "at_edge": at_edge(best.hparams, space) if (best and space) else [],
               "status": MEASURED, "steps_lower_bound": None, "steps_median": None, "steps_ci": None,
               "seeds": None, "seed_spread": None, "topk": None}
        row["max_steps"] = row["max_steps"] or None
        if row["at_edge"]:
            warnings.append(f"batch size {bs}: best trial {best.trial_id} lies at the edge of the search space "
                            f"({', '.join(row['at_edge'])}); widen the space there")
        if not recs:
            row["status"] = MISSING
            warnings.append(f"batch size {bs}: no trials stored")
        elif steps is None:
            row["status"], row["steps_lower_bound"] = _unreached_status(recs, goal, metric, higher_is_better)
            op = ">" if higher_is_better else "<"
            if row["status"] == CENSORED:
                warnings.append(f"batch size {bs}: censored: no trial reached {metric} {op} {goal} within "
                                f"{row['steps_lower_bound']} steps (S(B) > {row['steps_lower_bound']}); raise its "
                                "step budget")
            elif row["status"] == DIVERGED:
                warnings.append(f"batch size {bs}: every trial diverged")
            else:
                warnings.append(f"batch size {bs}: no trial reached {metric} {op} {goal}, and curves stopped "
                                "early (at the run goal or pruned): unknown, rerun with full curves")
        else:
            seeds, topk = _point_runs(recs, best, goal, metric, higher_is_better, top_k)
            other = sorted({r.base_trial for r in recs if r.role == "reseed"} - {best.trial_id})
            if other:
                warnings.append(f"batch size {bs}: reseeds rerun trial(s) {other}, not trial {best.trial_id} that is "
                                "best at this goal: its seed spread is unknown here")
            p = PointData(bs, seeds, [v for _, v in topk])
            sp = spread(seeds)
            row.update(steps_median=sp["median"], seeds=[None if not math.isfinite(v) else int(v) for v in seeds],
                       seed_spread=sp, topk=[{"trial": t, "steps": int(v)} for t, v in topk])
            if sp["median"] is None:
                row["status"], row["steps_lower_bound"] = CENSORED, int(steps)
                warnings.append(f"batch size {bs}: half or more of the best setting's {len(seeds)} seeds did not "
                                "reach the goal: its median is censored")
            else:
                points.append(p)
        if bs in exclude and row["status"] == MEASURED:
            row["status"] = EXCLUDED
            points = [p for p in points if p.batch_size != bs]
        rows.append(row)

    # the fit: measured points only, and only when nothing unmeasured lies above them
    fit, boot, diag, refused = None, None, None, None
    fitted = {p.batch_size: p for p in points}
    if len(fitted) >= 2:
        top = max(fitted)
        above = [r for r in rows if r["batch_size"] > top and r["batch_size"] not in exclude]
        if above:
            refused = (f"no S(B) fit: the largest batch size(s) {[r['batch_size'] for r in above]} have no "
                       f"measured steps to result ({', '.join(sorted({r['status'] for r in above}))}); they decide "
                       "S_min, so a fit without them would be extrapolation. Raise their step budget (or rerun with "
                       "full curves), or leave them out explicitly (exclude=...)")
            warnings.append(refused)
        else:
            bsz = [p.batch_size for p in points]
            vals = [p.median for p in points]
            fit = fit_scaling(bsz, vals, n_boot=0, ci_level=ci_level)
            if n_boot > 0:
                boot = bootstrap(points, n_boot=n_boot, ci_level=ci_level, seed=seed)
                fit.S_min_ci, fit.E_min_ci, fit.B_crit_ci, fit.n_boot = (boot.S_min_ci, boot.E_min_ci,
                                                                          boot.B_crit_ci, boot.n_boot)
                for r in rows:
                    ci = boot.point_ci.get(r["batch_size"])
                    r["steps_ci"] = list(ci) if (ci and r["status"] == MEASURED) else None
            diag = fit_diagnostics(bsz, vals, fit.S_min, fit.E_min,
                                   [boot.point_ci.get(b) for b in bsz] if boot else None)
            res = {d["batch_size"]: d["relative"] for d in diag["residuals"]}
            for r in rows:
                r["fit_residual"] = res.get(r["batch_size"])
            if diag["lack_of_fit"]:
                warnings.append("lack of fit: S(B) = S_min + E_min/B misses the data systematically: "
                                + "; ".join(diag["lack_of_fit_reasons"]) + ". Read B_crit from the model-free "
                                "brackets rather than from the fit")
            if boot is not None and 2 * boot.within_point < len(points):
                warnings.append(f"only {boot.within_point} of {len(points)} batch sizes have reseeds or a second "
                                "trial that reached the goal: the noise inside the other points is missing from the "
                                "intervals (rerun with reseeds and top-k trials)")
    elif len(fitted) < 2 and rows:
        refused = f"no S(B) fit: {len(fitted)} batch size(s) with measured steps to result (need 2)"
    measured = [(p.batch_size, p.median) for p in points]
    brk = brackets(*zip(*measured)) if len(measured) >= 2 else None
    if brk is not None and boot is not None:
        brk["b_steps_double_ci"] = list(boot.b_steps_double_ci) if boot.b_steps_double_ci else None
        brk["b_examples_double_ci"] = list(boot.b_examples_double_ci) if boot.b_examples_double_ci else None
    reg_data = data_regions(*zip(*measured)) if len(measured) >= 2 else None
    for r in rows:
        r["region"] = reg_data["labels"].get(r["batch_size"]) if reg_data else None
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
            "steps_estimator": "median over the best setting's seeds (best trial + reseeds); with one seed, the "
                               "best trial's steps",
            "per_batch_size": rows, "fit": fit.to_dict() if fit else None, "fit_refused": refused,
            "fit_diagnostics": diag, "uncertainty": boot.to_dict() if boot else None, "brackets": brk,
            "regions": fit.regions() if fit else None, "regions_data": _strip_labels(reg_data),
            "effective_lr": eff_lr, "warnings": warnings}


def _strip_labels(reg: Optional[Dict[str, object]]) -> Optional[Dict[str, object]]:
    return None if reg is None else {k: v for k, v in reg.items() if k != "labels"}


def steps_against_goal(records: Sequence[TrialRecord], goals: Sequence[float], *, metric: str,
                       higher_is_better: bool = False, run_goal: Optional[float] = None, n_boot: int = 200,
                       seed: int = 0, top_k: int = 5, **kwargs) -> List[Dict[str, object]]:
    """Steps to result per batch size, B_crit (fit, interval, brackets) at each goal,
    recomputed from the stored curves. One entry per goal: ``goal``, ``batch_sizes``,
    ``steps`` (point estimates, None where not measured), ``status`` per batch size,
    ``B_crit``, ``B_crit_ci``, ``b_steps_double``, ``b_examples_double``, ``fit_refused``,
    ``lack_of_fit``, ``harder_than_run_goal``. Goals harder than ``run_goal`` read curves that
    stopped at the run goal: their batch sizes come out "truncated" unless the top-k trials
    ran to their budget (full curves)."""
    out = []
    for g in goals:
        a = analyze(records, goal=float(g), metric=metric, higher_is_better=higher_is_better, run_goal=run_goal,
                    n_boot=n_boot, seed=seed, top_k=top_k, **kwargs)
        fit, brk, diag = a["fit"], a["brackets"] or {}, a["fit_diagnostics"] or {}
        out.append({"goal": float(g), "batch_sizes": [r["batch_size"] for r in a["per_batch_size"]],
                    "steps": [r["steps_median"] for r in a["per_batch_size"]],
                    "status": [r["status"] for r in a["per_batch_size"]],
                    "B_crit": fit["B_crit"] if fit else None, "B_crit_ci": fit["B_crit_ci"] if fit else None,
                    "b_steps_double": brk.get("b_steps_double"), "b_examples_double": brk.get("b_examples_double"),
                    "fit_refused": a["fit_refused"], "lack_of_fit": diag.get("lack_of_fit"),
                    "harder_than_run_goal": a["goal"]["harder_than_run_goal"]})
    return out
