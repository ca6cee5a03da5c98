"""Confidence intervals for steps to result that include the noise inside each point.

What one batch size contributes (:class:`PointData`)
----------------------------------------------------
* ``seeds``: steps to result of the best setting's runs, the best trial first, then its
  reseeds (same hyperparameters, other seeds). ``inf`` for a run that did not reach the goal.
* ``topk``: steps to result of the k best search/refine trials (distinct settings, one run
  each), ascending; ``topk[0]`` is the best trial, i.e. ``seeds[0]``.

The point estimate of S(B) is the median of ``seeds`` (with one seed: the best trial's
steps, i.e. batch_science's minimum over trials). It leans low: ``seeds[0]`` won the search
partly by seed luck, and the median includes it.

One bootstrap replicate of a batch size (:func:`replicate_point`) re-runs the *procedure*
that produced the point, with the measured noise:

1. search: draw k candidates with replacement from the top-k trials (case resampling of the
   settings the search found);
2. each candidate gets a fresh single-run value: the best setting a value drawn from its
   ``seeds``; any other setting its measured steps times ``exp(d)``, d drawn from the best
   setting's log deviations ``ln seeds - ln median(seeds)`` (residual resampling of seed
   noise: the other settings ran once, so their seed noise is borrowed from the best one;
   a seed of the best setting that missed the goal lends a miss);
3. the winner is the candidate with the fewest steps;
4. the reported value is the median of ``len(seeds)`` fresh runs of the winner, drawn the
   same way as in step 2.

With one seed and k = 1 the replicate is the measured value: the interval then carries
only the resampling over batch sizes.

The whole-study bootstrap (:func:`bootstrap`): per replicate, batch sizes are drawn with
replacement (case resampling, as before), each drawn batch size gets an independent
replicate value, and S(B) = S_min + E_min/B is refitted (replicates with fewer than two
distinct batch sizes are skipped). Per-batch-size intervals and the model-free brackets
use replicates of every batch size (no resampling over batch sizes: they are read off
the curve, not fitted); replicates whose curve never reaches a bracket's level are left out
of that bracket's interval and counted (``bracket_replicates_not_crossed``). A replicate
value that missed the goal (inf) is left out of that replicate's fit, as the analysis
leaves censored points out. Percentile intervals throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastsgd.study.steps.scaling import brackets, fit_once


@dataclass
class PointData:
    """The runs behind one batch size's steps to result (see the module docstring)."""

    batch_size: int
    seeds: List[float]
    topk: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.seeds or not math.isfinite(self.seeds[0]) or self.seeds[0] <= 0:
            raise ValueError(f"batch size {self.batch_size}: the best trial's steps (seeds[0]) must be finite and "
                             f"positive, got {self.seeds[:1]}")
        if not self.topk:
            self.topk = [self.seeds[0]]
        if self.topk[0] != self.seeds[0]:
            raise ValueError(f"batch size {self.batch_size}: topk[0] ({self.topk[0]}) must be the best trial "
                             f"(seeds[0] = {self.seeds[0]})")
        if any(not (v > 0) for v in self.topk) or any(not math.isfinite(v) for v in self.topk):
            raise ValueError(f"batch size {self.batch_size}: top-k steps must be finite and positive, got {self.topk}")

    @property
    def median(self) -> float:
        """Median over the best setting's seeds (inf when half or more did not reach the goal)."""
        return float(np.median(self.seeds))

    def log_deviations(self) -> np.ndarray:
        """ln seeds - ln median (empty with one seed or a censored median). A seed that did not
        reach the goal gives +inf: a setting that borrows it misses the goal on that draw, as
        the best setting did."""
        if len(self.seeds) < 2 or not math.isfinite(self.median):
            return np.zeros(0)
        return np.log(np.asarray(self.seeds, dtype=float)) - math.log(self.median)


def replicate_point(p: PointData, rng: np.random.Generator, dev: Optional[np.ndarray] = None) -> float:
    """One bootstrap value of S(B) for batch size ``p`` (steps 1-4 of the module docstring)."""
    seeds = np.asarray(p.seeds, dtype=float)
    topk = np.asarray(p.topk, dtype=float)
    dev = p.log_deviations() if dev is None else dev
    r = len(seeds)

    def runs(idx: int, n: int) -> np.ndarray:
        if idx == 0:
            return seeds[rng.integers(0, r, n)]
        if dev.size == 0:
            return np.full(n, topk[idx])
        return topk[idx] * np.exp(dev[rng.integers(0, dev.size, n)])

    cand = rng.integers(0, len(topk), len(topk))
    values = [runs(int(c), 1)[0] for c in cand]
    winner = int(cand[int(np.argmin(values))])
    return float(np.median(runs(winner, r)))


def _quantiles(x: np.ndarray, level: float) -> Optional[Tuple[float, float]]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return None
    q = [(1 - level) / 2, (1 + level) / 2]
    # "nearest": B_crit is inf for resamples with S_min = 0, and interpolating inf - inf is NaN
    lo, hi = np.quantile(x, q, method="nearest")
    return float(lo), float(hi)


@dataclass
class BootstrapResult:
    """Percentile intervals; ``None`` where no replicate gave a value."""

    n_boot: int
    ci_level: float
    point_ci: Dict[int, Optional[Tuple[float, float]]]
    S_min_ci: Optional[Tuple[float, float]]
    E_min_ci: Optional[Tuple[float, float]]
    B_crit_ci: Optional[Tuple[float, float]]
    b_steps_double_ci: Optional[Tuple[float, float]]
    b_examples_double_ci: Optional[Tuple[float, float]]
    b_crit_samples: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    bracket_not_crossed: Tuple[int, int] = (0, 0)   # replicates whose curve never reached each level
    within_point: int = 0           # batch sizes with more than one seed or top-k trial

    def to_dict(self) -> Dict[str, object]:
        def lst(ci):
            return None if ci is None else [ci[0], ci[1]]
        return {"n_boot": self.n_boot, "ci_level": self.ci_level,
                "within_point_batch_sizes": self.within_point,
                "resampled": RESAMPLED if self.within_point else RESAMPLED_BATCH_SIZES_ONLY,
                "batch_sizes": len(self.point_ci),
                "S_min_ci": lst(self.S_min_ci), "E_min_ci": lst(self.E_min_ci), "B_crit_ci": lst(self.B_crit_ci),
                "b_steps_double_ci": lst(self.b_steps_double_ci),
                "b_examples_double_ci": lst(self.b_examples_double_ci),
                "bracket_replicates_not_crossed": list(self.bracket_not_crossed)}


RESAMPLED = ("batch sizes (cases, with replacement); per batch size: the top-k trials (cases) and the seed "
             "noise of the best setting (its runs, and its log deviations lent to the other top-k settings)")
RESAMPLED_BATCH_SIZES_ONLY = ("batch sizes only: no batch size has reseeds or more than one trial that reached "
                              "the goal, so the noise inside each point is not in the interval")


def bootstrap(points: Sequence[PointData], *, n_boot: int = 1000, ci_level: float = 0.95, seed: int = 0,
              fit: Callable[[np.ndarray, np.ndarray], Tuple[float, float]] = fit_once) -> BootstrapResult:
    """Intervals for S(B) per batch size, S_min, E_min, B_crit and the model-free brackets
    (module docstring). ``points`` are the batch sizes that reached the goal (>= 2)."""
    if len({p.batch_size for p in points}) < 2:
        raise ValueError("bootstrap: need at least two distinct batch sizes with a result")
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    bs = np.array([p.batch_size for p in points], dtype=float)
    devs = [p.log_deviations() for p in points]
    n = len(points)
    fits, per_point, lo_br, hi_br = [], np.full((n_boot, n), np.nan), [], []
    for k in range(n_boot):
        full = np.array([replicate_point(p, rng, d) for p, d in zip(points, devs)])
        per_point[k] = full
        finite = np.isfinite(full)
        if finite.sum() >= 2:
            br = brackets(bs[finite], full[finite])
            lo_br.append(np.nan if br["b_steps_double"] is None else br["b_steps_double"])
            hi_br.append(np.nan if br["b_examples_double"] is None else br["b_examples_double"])
        idx = rng.integers(0, n, n)
        if len(np.unique(bs[idx])) < 2:
            continue
        # the case resample gets its own within-point replicates (a batch size drawn twice: two draws)
        vals = np.array([replicate_point(points[i], rng, devs[i]) for i in idx])
        keep = np.isfinite(vals)
        if len(np.unique(bs[idx][keep])) < 2:
            continue
        fits.append(fit(bs[idx][keep], vals[keep]))
    arr = np.array(fits) if fits else np.zeros((0, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        bcrit = np.where(arr[:, 0] > 0, arr[:, 1] / np.where(arr[:, 0] > 0, arr[:, 0], 1.0), np.inf)
    within = sum(len(p.seeds) > 1 or len(p.topk) > 1 for p in points)
    return BootstrapResult(
        n_boot=len(fits), ci_level=ci_level,
        point_ci={p.batch_size: _quantiles(per_point[:, i], ci_level) for i, p in enumerate(points)},
        S_min_ci=_quantiles(arr[:, 0], ci_level), E_min_ci=_quantiles(arr[:, 1], ci_level),
        B_crit_ci=_quantiles(bcrit, ci_level),
        b_steps_double_ci=_quantiles(np.array(lo_br, dtype=float), ci_level) if lo_br else None,
        b_examples_double_ci=_quantiles(np.array(hi_br, dtype=float), ci_level) if hi_br else None,
        b_crit_samples=bcrit, within_point=within,
        bracket_not_crossed=(int(np.isnan(lo_br).sum()) if lo_br else 0, int(np.isnan(hi_br).sum()) if hi_br else 0))


def spread(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Median, min, max and the relative half-range (max - min) / (2 median) of seed values
    (inf for runs that did not reach the goal)."""
    v = np.asarray(values, dtype=float)
    med = float(np.median(v))
    out: Dict[str, Optional[float]] = {"median": med if math.isfinite(med) else None,
                                       "min": float(v.min()), "max": float(v.max()) if np.isfinite(v).all() else None,
                                       "n": int(v.size), "not_reached": int((~np.isfinite(v)).sum())}
    out["relative_half_range"] = ((out["max"] - out["min"]) / (2 * med)
                                  if out["max"] is not None and math.isfinite(med) and v.size > 1 else None)
    return out
