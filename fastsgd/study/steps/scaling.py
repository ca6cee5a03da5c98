"""The S(B) = S_min + E_min / B model: the fit itself, how well it fits, and what the
measured points say without it.

Pure numpy on arrays of batch sizes and steps to result (no study records), so the
bootstrap (:mod:`fastsgd.study.steps.uncertainty`) can call it thousands of times.

Fit
---
Non-negative least squares on *relative* errors: minimise sum_i ((S_min + E_min/B_i)/S_i - 1)^2,
so 10 steps and 10,000 steps count alike. B_crit = E_min / S_min.

Goodness of fit (:func:`fit_diagnostics`)
------------------------------------------
* residuals per batch size: relative ``S_i / S_fit(B_i) - 1`` and log ``ln S_i - ln S_fit(B_i)``;
* ``r2_log``: R^2 in log space, ``1 - sum(log residual^2) / sum((ln S_i - mean ln S)^2)``;
* runs test on the signs of the residuals ordered by batch size (Wald-Wolfowitz, exact
  for small n): a curve that misses the data systematically (above at both ends, below in
  the middle) has few runs; ``runs_p`` is P(runs <= observed) under random signs;
* within-point check: where a batch size has an interval from its own noise (seeds and
  top-k trials, see the bootstrap), the fit should pass through it; ``outside_within_point``
  lists the batch sizes where it does not; with 95 % intervals about 5 % of the points may
  miss by chance, so the flag needs more misses than Binomial(n, 0.05) gives with p < 0.05.
* ``lack_of_fit``: runs_p < 0.05, or too many points outside their within-point intervals.

Model-free brackets (:func:`brackets`)
--------------------------------------
In the model, S(B) = 2 S_min and B S(B) = 2 E_min both hold exactly at B = B_crit. From the
measured curve (log-log interpolation between neighbouring batch sizes):

* ``b_steps_double``: the B where S(B) = 2 x the measured minimum of S. The measured minimum
  is at least S_min, so this B is at most the model's B_crit: a lower bracket.
* ``b_examples_double``: the B where B S(B) = 2 x the measured minimum of B S(B) (examples to
  result). The measured minimum is at least E_min, so this B is at least B_crit: an upper bracket.

Either is ``None`` when the measured curve never crosses the level (then ``*_bound`` says
on which side of the measured range it lies).

Regions from the data (:func:`data_regions`)
--------------------------------------------
* perfect scaling: from the smallest batch size up to the largest B such that every
  measured B' <= B has B' S(B') within ``tol`` (default 20 %) of the smallest measured B S(B);
* maximal data parallelism: from the smallest B such that every measured B' >= B has
  S(B') within ``tol`` of the smallest measured S;
* diminishing returns: in between.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REGION_TOLERANCE = 0.20
RUNS_TEST_LEVEL = 0.05
WITHIN_POINT_LEVEL = 0.05   # the within-point intervals are (1 - this) intervals: ci_level 0.95


def fit_once(batch_sizes: np.ndarray, steps: np.ndarray) -> Tuple[float, float]:
    """(S_min, E_min) minimising the relative residuals, both >= 0."""
    from scipy.optimize import nnls
    # Relative residuals: (S_min + E_min/B)/S - 1, i.e. rows [1/S, 1/(B S)] against 1.
    a = np.stack([1.0 / steps, 1.0 / (batch_sizes * steps)], axis=1)
    (s_min, e_min), _ = nnls(a, np.ones_like(steps))
    return float(s_min), float(e_min)


def runs_test_p(signs: Sequence[int]) -> Optional[float]:
    """P(number of runs <= observed) for a random ordering of the given +1/-1 signs
    (Wald-Wolfowitz, exact). None when all signs are equal (no test possible)."""
    s = [1 if x > 0 else -1 for x in signs]
    n1, n2 = s.count(1), s.count(-1)
    if n1 == 0 or n2 == 0:
        return None
    runs = 1 + sum(a != b for a, b in zip(s, s[1:]))
    total = math.comb(n1 + n2, n1)

    def p_runs(r: int) -> float:
        if r % 2 == 0:
            k = r // 2
            return 2 * math.comb(n1 - 1, k - 1) * math.comb(n2 - 1, k - 1) / total
        k = (r - 1) // 2
        return (math.comb(n1 - 1, k) * math.comb(n2 - 1, k - 1)
                + math.comb(n1 - 1, k - 1) * math.comb(n2 - 1, k)) / total
    return float(min(1.0, sum(p_runs(r) for r in range(2, runs + 1))))


def _binomial_tail_limit(n: int, p: float = WITHIN_POINT_LEVEL, level: float = 0.05) -> int:
    """The smallest m with P(Binomial(n, p) >= m) < level."""
    from scipy.stats import binom
    for m in range(n + 2):
        if binom.sf(m - 1, n, p) < level:
            return m
    return n + 1


def fit_diagnostics(batch_sizes: Sequence[float], steps: Sequence[float], s_min: float, e_min: float,
                    point_ci: Optional[Sequence[Optional[Tuple[float, float]]]] = None) -> Dict[str, object]:
    """Residuals, R^2 in log space, the runs test and the within-point check (module docstring).

    ``point_ci[i]`` is batch size i's own interval for S(B_i) (None where unknown)."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    pred = s_min + e_min / b
    rel = s / pred - 1.0
    logres = np.log(s) - np.log(pred)
    ss_tot = float(np.sum((np.log(s) - np.log(s).mean()) ** 2))
    r2 = 1.0 - float(np.sum(logres ** 2)) / ss_tot if ss_tot > 0 else None
    order = np.argsort(b)
    runs_p = runs_test_p([1 if logres[i] > 0 else -1 for i in order if logres[i] != 0])
    outside: List[int] = []
    checked = 0
    if point_ci is not None:
        for bi, pi, ci in zip(b, pred, point_ci):
            if ci is None or ci[0] is None or ci[0] == ci[1]:
                continue  # no within-point spread measured here
            checked += 1
            if not ci[0] <= pi <= ci[1]:
                outside.append(int(bi))
    limit = _binomial_tail_limit(checked) if checked else None
    reasons = []
    if runs_p is not None and runs_p < RUNS_TEST_LEVEL:
        signs = "".join("+" if logres[i] > 0 else "-" for i in order)
        reasons.append(f"residual signs {signs} (by batch size) have too few runs (p = {runs_p:.3f})")
    if limit is not None and len(outside) >= limit:
        reasons.append(f"the fit misses the within-point interval at {len(outside)} of {checked} batch sizes "
                       f"({outside})")
    worst = int(np.argmax(np.abs(rel)))
    return {"residuals": [{"batch_size": int(bi), "relative": float(r), "log": float(lr)}
                          for bi, r, lr in zip(b, rel, logres)],
            "r2_log": r2, "max_abs_relative_residual": float(np.abs(rel).max()),
            "worst_batch_size": int(b[worst]), "runs_p": runs_p,
            "within_point_checked": checked, "outside_within_point": outside,
            "lack_of_fit": bool(reasons), "lack_of_fit_reasons": reasons}


def _crossing(xs: np.ndarray, ys: np.ndarray, level: float) -> Optional[float]:
    """x where the polyline (log x, log y) between consecutive points first reaches ``level``
    walking along ``xs`` in the given order, starting below the level; None if it never does."""
    lx, ly, ll = np.log(xs), np.log(ys), math.log(level)
    for i in range(len(xs) - 1):
        if ly[i] < ll <= ly[i + 1]:
            t = (ll - ly[i]) / (ly[i + 1] - ly[i])
            return float(math.exp(lx[i] + t * (lx[i + 1] - lx[i])))
    return None


def brackets(batch_sizes: Sequence[float], steps: Sequence[float]) -> Dict[str, object]:
    """Model-free brackets of B_crit from the measured curve (module docstring)."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    order = np.argsort(b)
    b, s = b[order], s[order]
    e = b * s
    i_s, i_e = int(np.argmin(s)), int(np.argmin(e))
    s_meas, e_meas = float(s[i_s]), float(e[i_e])
    # S = 2 S_min: walk from the minimum of S towards smaller B
    lo = _crossing(b[:i_s + 1][::-1], s[:i_s + 1][::-1], 2 * s_meas)
    # B S = 2 E_min: walk from the minimum of B S towards larger B
    hi = _crossing(b[i_e:], e[i_e:], 2 * e_meas)
    return {"S_min_measured": s_meas, "S_min_measured_at": int(b[i_s]),
            "E_min_measured": e_meas, "E_min_measured_at": int(b[i_e]),
            "b_steps_double": lo, "b_steps_double_bound": None if lo is not None else f"< {int(b[0])}",
            "b_examples_double": hi, "b_examples_double_bound": None if hi is not None else f"> {int(b[-1])}"}


def data_regions(batch_sizes: Sequence[float], steps: Sequence[float],
                 tol: float = REGION_TOLERANCE) -> Dict[str, object]:
    """Region boundaries and a label per batch size from the measured points alone."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    order = np.argsort(b)
    b, s = b[order], s[order]
    e = b * s
    perfect_max = None
    for i in range(len(b)):
        if e[i] > (1 + tol) * e.min():
            break
        perfect_max = int(b[i])
    maximal_min = None
    for i in range(len(b) - 1, -1, -1):
        if s[i] > (1 + tol) * s.min():
            break
        maximal_min = int(b[i])
    labels = {}
    for bi in b:
        if perfect_max is not None and bi <= perfect_max:
            labels[int(bi)] = "perfect scaling"
        elif maximal_min is not None and bi >= maximal_min:
            labels[int(bi)] = "maximal data parallelism"
        else:
            labels[int(bi)] = "diminishing returns"
    return {"tolerance": tol, "perfect_scaling_max": perfect_max, "maximal_parallelism_min": maximal_min,
            "labels": labels}
