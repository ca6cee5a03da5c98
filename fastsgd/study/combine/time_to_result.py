"""Time to result T(B) = S(B) x t(B): the algorithmic half times the hardware half.

Inputs
------
* Steps to result S(B) from a steps-to-result study (``study_summary.json``, schema
  ``fastsgd.steps_to_result/2`` or /1, see :mod:`fastsgd.study.steps.analysis`), as measured
  points (/2: the seed median of measured batch sizes; censored and other unmeasured batch
  sizes are left out; /1: the best trial's steps) and as the fit ``S(B) = S_min + E_min / B``
  with ``B_crit = E_min / S_min`` (none when the study refused its fit).
* Step time t(B) from a throughput sweep (``throughput.json``, schema
  ``fastsgd.throughput/1``, see :mod:`fastsgd.study.hardware.step_time`), as measured medians and as
  the fit ``t(B) = t0 + B / X`` with the hardware knee ``B_hw = t0 X``; energy per step where
  NVML measured it.

The optimum of the fitted curves
--------------------------------
``T(B) = (S_min + E_min/B)(t0 + B/X) = S_min t0 + E_min/X + S_min B/X + E_min t0 / B``.
``dT/dB = S_min/X - E_min t0 / B^2 = 0`` gives ``B*^2 = (E_min/S_min)(t0 X) = B_crit B_hw``,
so ``B* = sqrt(B_crit x B_hw)`` (a minimum: ``d2T/dB2 = 2 E_min t0 / B^3 > 0``), and
``T(B*) = (sqrt(S_min t0) + sqrt(E_min / X))^2``. Below B* steps shrink faster than step time
grows; above it, the other way round.

Uncertainty and range
---------------------
``B*`` gets an interval from the study's B_crit interval with the hardware fit held fixed
(B* is monotone in B_crit, so the percentile interval maps through:
``[sqrt(B_crit_lo B_hw), sqrt(B_crit_hi B_hw)]``); it ignores the step-time fit's own
uncertainty. A B* outside the measured batch sizes is flagged, and every warning of the
inputs (the study's, the t(B) fit's message, e.g. a poor fit) is carried in ``warnings``.

Measured points
---------------
For each batch size of the study with a steps-to-result value, the step time is the
measured median at that batch size, else a log-log interpolation between the two
neighbouring measured batch sizes, else (outside the measured range) the fitted t(B);
each row says which (``step_time_source``). Energy to result is S(B) x energy per step,
interpolated the same way, only where energy was measured.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from fastsgd.study.tables import format_table

__all__ = ["StepsCurve", "StepTimeCurve", "StudyData", "ThroughputData", "TimeToResult",
           "optimal_batch_size", "interpolate_loglog", "combine", "input_warnings", "load_study", "load_throughput",
           "time_to_result_table"]


# ---------------------------------------------------------------- fitted curves

@dataclass(frozen=True)
class StepsCurve:
    """S(B) = s_min + e_min / B (steps to result)."""

    s_min: float
    e_min: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.s_min) and math.isfinite(self.e_min) and self.s_min >= 0 and self.e_min >= 0
                and self.s_min + self.e_min > 0):
            raise ValueError(f"S(B) fit needs finite S_min >= 0 and E_min >= 0, not both zero; got "
                             f"S_min={self.s_min!r}, E_min={self.e_min!r}")

    @property
    def b_crit(self) -> float:
        return self.e_min / self.s_min if self.s_min > 0 else math.inf

    def steps(self, batch_size):
        return self.s_min + self.e_min / np.asarray(batch_size, dtype=float)


@dataclass(frozen=True)
class StepTimeCurve:
    """t(B) = t0 + B / throughput (seconds per step; throughput X in examples/s)."""

    t0: float
    throughput: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t0) and self.t0 >= 0 and self.throughput > 0):
            raise ValueError(f"t(B) fit needs finite t0 >= 0 and throughput > 0; got t0={self.t0!r}, "
                             f"throughput={self.throughput!r}")

    @property
    def b_hw(self) -> float:
        """Hardware knee t0 x X."""
        return self.t0 * self.throughput

    def time(self, batch_size):
        return self.t0 + np.asarray(batch_size, dtype=float) / self.throughput


def optimal_batch_size(steps: StepsCurve, step_time: StepTimeCurve) -> float:
    """B* = sqrt(B_crit x B_hw), the minimiser of S(B) t(B) (see the module docstring).
    0 when either knee is 0 (then the smallest batch is best), inf when S_min = 0."""
    return math.sqrt(steps.b_crit * step_time.b_hw) if steps.s_min > 0 else math.inf


def interpolate_loglog(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """log-log linear interpolation of y at x between measured (xs, ys); None outside [min xs, max xs]."""
    xs_a, ys_a = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if xs_a.size == 0 or x < xs_a.min() or x > xs_a.max():
        return None
    order = np.argsort(xs_a)
    return float(np.exp(np.interp(math.log(x), np.log(xs_a[order]), np.log(ys_a[order]))))


# ---------------------------------------------------------------- the two inputs

@dataclass
class StudyData:
    """Steps to result per batch size (``None`` where the goal was not reached) and the fit."""

    batch_sizes: List[int]
    steps: List[Optional[float]]
    fit: Optional[StepsCurve] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.steps):
            raise ValueError(f"study: {len(self.batch_sizes)} batch sizes but {len(self.steps)} step counts")
        if self.fit is None and not self.meta.get("fit_refused"):  # a study that refused its fit stays unfitted
            pts = [(b, s) for b, s in zip(self.batch_sizes, self.steps) if s is not None]
            if len({b for b, _ in pts}) >= 2:
                from fastsgd.study.steps.analysis import fit_scaling
                f = fit_scaling([b for b, _ in pts], [s for _, s in pts], n_boot=0)
                self.fit = StepsCurve(f.S_min, f.E_min)


@dataclass
class ThroughputData:
    """Median step time (s) per batch size, energy per step (J) where measured, and the fit."""

    batch_sizes: List[int]
    step_times: List[float]
    energy_per_step: Optional[List[Optional[float]]] = None
    fit: Optional[StepTimeCurve] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.step_times):
            raise ValueError(f"throughput: {len(self.batch_sizes)} batch sizes but {len(self.step_times)} step times")
        if any(not (t > 0 and math.isfinite(t)) for t in self.step_times):
            raise ValueError(f"throughput: step times must be positive and finite, got {self.step_times}")
        if self.fit is None and len(set(self.batch_sizes)) >= 2:
            from fastsgd.study.hardware.fit import fit_step_time
            f = fit_step_time(self.batch_sizes, self.step_times)
            self.meta.setdefault("fit", {"message": f.message, "r2": f.r2})
            if f.ok and f.throughput > 0:
                self.fit = StepTimeCurve(max(f.t0_s, 0.0), f.throughput)

    @property
    def has_energy(self) -> bool:
        return bool(self.energy_per_step) and any(e is not None for e in self.energy_per_step)


def find_result_file(path: str, filename: str) -> str:
    """``path`` itself if it is a file, else ``path/filename``; FileNotFoundError if that is missing."""
    p = os.path.join(path, filename) if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no {filename} at {path!r}")
    return p


def load_study(path: str) -> StudyData:
    """Read a steps-to-result summary (a directory with ``study_summary.json`` or the file)."""
    p = find_result_file(path, "study_summary.json")
    with open(p) as f:
        d = json.load(f)
    if not str(d.get("schema", "")).startswith("fastsgd.steps_to_result/"):
        raise ValueError(f"{p}: not a steps-to-result summary (schema {d.get('schema')!r}, "
                         "expected 'fastsgd.steps_to_result/1' or '/2')")
    rows = d.get("per_batch_size") or []
    fit = d.get("fit")
    curve = StepsCurve(float(fit["S_min"]), float(fit["E_min"])) if fit else None
    meta = {k: d.get(k) for k in ("workload", "optimizer", "protocol", "goal", "regions", "regions_data", "brackets",
                                  "fit_diagnostics", "fit_refused", "uncertainty", "wall_seconds")}
    meta["fit"], meta["path"] = fit, p
    meta["warnings"] = list(d.get("warnings") or [])
    meta["status"] = {int(r["batch_size"]): r.get("status", "measured" if r.get("steps") is not None else "censored")
                      for r in rows}

    def point(r):  # schema /2: the seed median (the fitted value); /1: the best trial's steps
        v = r.get("steps_median", r.get("steps"))
        return None if v is None or r.get("status", "measured") != "measured" else float(v)
    return StudyData([int(r["batch_size"]) for r in rows], [point(r) for r in rows], curve, meta)


def load_throughput(path: str) -> ThroughputData:
    """Read a throughput sweep (a directory with ``throughput.json`` or the file)."""
    p = find_result_file(path, "throughput.json")
    with open(p) as f:
        d = json.load(f)
    meta = d.get("meta", {})
    if not str(meta.get("schema", "")).startswith("fastsgd.throughput/"):
        raise ValueError(f"{p}: not a throughput sweep (schema {meta.get('schema')!r}, "
                         "expected 'fastsgd.throughput/1')")
    rows = d.get("rows", [])
    fit = meta.get("fit") or {}
    curve = None
    if fit.get("t0_s") is not None and fit.get("throughput"):
        curve = StepTimeCurve(max(float(fit["t0_s"]), 0.0), float(fit["throughput"]))
    energy = [r.get("energy_per_step_j") for r in rows]
    out_meta = {"workload": (meta.get("workload") or {}).get("name"),
                "device": (meta.get("environment") or {}).get("device"),
                "settings": meta.get("settings"), "fit": fit, "path": p}
    return ThroughputData([int(r["batch_size"]) for r in rows], [float(r["step_time_s"]) for r in rows],
                          energy if any(e is not None for e in energy) else None, curve, out_meta)


# ---------------------------------------------------------------- combining

@dataclass
class TimeToResult:
    """Rows per study batch size plus the optimum of the fitted curves."""

    rows: List[Dict[str, Any]]
    steps_fit: Optional[StepsCurve]
    time_fit: Optional[StepTimeCurve]
    b_crit: Optional[float]
    b_hw: Optional[float]
    b_star: Optional[float]
    t_star: Optional[float]                   # fitted T(B*) in seconds
    best_measured: Optional[Dict[str, Any]]   # the row with the smallest measured T(B)
    b_crit_ci: Optional[List[float]] = None
    b_star_ci: Optional[List[float]] = None   # from b_crit_ci, hardware fit held fixed
    warnings: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"rows": self.rows, "b_crit": self.b_crit, "b_hw": self.b_hw, "b_star": self.b_star,
                "b_crit_ci": self.b_crit_ci, "b_star_ci": self.b_star_ci, "warnings": self.warnings,
                "t_star_s": self.t_star, "best_measured": self.best_measured,
                "steps_fit": None if self.steps_fit is None else {"S_min": self.steps_fit.s_min,
                                                                  "E_min": self.steps_fit.e_min},
                "time_fit": None if self.time_fit is None else {"t0_s": self.time_fit.t0,
                                                                "throughput": self.time_fit.throughput}}


def _at(data: ThroughputData, values: Sequence[Optional[float]], b: float):
    """(value, source) of a per-batch-size quantity at b: measured, interpolated, or None."""
    pts = [(x, v) for x, v in zip(data.batch_sizes, values) if v is not None and v > 0]
    for x, v in pts:
        if x == b:
            return float(v), "measured"
    v = interpolate_loglog([x for x, _ in pts], [v for _, v in pts], b)
    return (v, "interpolated") if v is not None else (None, None)


def combine(study: StudyData, throughput: ThroughputData) -> TimeToResult:
    """T(B) for every study batch size with a steps-to-result value, and B* of the fits."""
    rows: List[Dict[str, Any]] = []
    for b, s in zip(study.batch_sizes, study.steps):
        if s is None:
            continue
        t, source = _at(throughput, throughput.step_times, b)
        if t is None and throughput.fit is not None:
            t, source = float(throughput.fit.time(b)), "fit (extrapolated)"
        row: Dict[str, Any] = {"batch_size": b, "steps": s, "step_time_s": t, "step_time_source": source,
                               "time_to_result_s": None if t is None else s * t,
                               "energy_to_result_j": None}
        if throughput.has_energy:
            e, _ = _at(throughput, throughput.energy_per_step, b)
            row["energy_to_result_j"] = None if e is None else s * e
        if study.fit is not None and throughput.fit is not None:
            row["fit_time_to_result_s"] = float(study.fit.steps(b) * throughput.fit.time(b))
        rows.append(row)
    timed = [r for r in rows if r["time_to_result_s"] is not None]
    best = min(timed, key=lambda r: r["time_to_result_s"]) if timed else None
    b_crit = study.fit.b_crit if study.fit else None
    b_hw = throughput.fit.b_hw if throughput.fit else None
    b_star = t_star = b_star_ci = None
    b_crit_ci = (study.meta.get("fit") or {}).get("B_crit_ci")
    warnings = input_warnings(study, throughput)
    if study.fit is not None and throughput.fit is not None:
        b_star = optimal_batch_size(study.fit, throughput.fit)
        if math.isfinite(b_star) and b_star > 0:
            t_star = float(study.fit.steps(b_star) * throughput.fit.time(b_star))
            if b_crit_ci and None not in b_crit_ci:
                b_star_ci = [math.sqrt(float(x) * throughput.fit.b_hw) for x in b_crit_ci]
            measured = [b for b, s in zip(study.batch_sizes, study.steps) if s is not None]
            if measured and not min(measured) <= b_star <= max(measured):
                warnings.append(f"B* = {b_star:.3g} lies outside the measured batch sizes "
                                f"[{min(measured)}, {max(measured)}]: the fitted curves are extrapolated there")
    return TimeToResult(rows, study.fit, throughput.fit, b_crit, b_hw, b_star, t_star, best, b_crit_ci, b_star_ci,
                        warnings)


def input_warnings(study: StudyData, throughput: ThroughputData) -> List[str]:
    """Every warning the two inputs carry: the study's own (censored points, lack of fit, refused
    fit, ...) and the t(B) fit's message (poor fit, negative t0, two points)."""
    out = [f"steps-to-result study: {w}" for w in study.meta.get("warnings") or []]
    refused = study.meta.get("fit_refused")
    if refused and not any(refused in w for w in out):
        out.append(f"steps-to-result study: {refused}")
    msg = (throughput.meta.get("fit") or {}).get("message")
    if msg:
        out.append(f"step-time fit t(B) = t0 + B/X: {msg}")
    return out


# ---------------------------------------------------------------- output

def time_to_result_table(result: TimeToResult, markdown: bool = False) -> str:
    """The T(B) rows as a text (or Markdown) table."""
    cols = ["batch_size", "steps", "step_time_s", "step_time_source", "time_to_result_s", "fit_time_to_result_s",
            "energy_to_result_j"]
    if not any(r.get("energy_to_result_j") is not None for r in result.rows):
        cols.remove("energy_to_result_j")
    return format_table(result.rows, cols, markdown=markdown, missing="-")
