"""Fit per-step time against batch size: t(B) = t0 + B / X.

t0 is the fixed per-step cost (kernel launches, the optimizer step, Python,
synchronisation), X the throughput (examples/s) once the hardware is busy.
The hardware knee B_hw = t0 * X is where both parts are equal: below it a
larger batch is nearly free per step, above it step time grows linearly with
B and examples/s approaches X.

The fit is a weighted least-squares fit of the median step times with weights
1/t^2, i.e. it minimises *relative* residuals, so batch size 1 counts as much
as batch size 512 although their times differ by orders of magnitude; a few
iteratively reweighted rounds with Huber weights then damp outliers (a noisy
shared machine). Quality: ``r2`` is the coefficient of determination under the
same 1/t^2 weights, ``rel_residuals`` are measured/fitted - 1 per point.

Degenerate data is reported in ``message`` rather than raised: fewer than two
distinct batch sizes (t0 and X cannot be separated), a negative t0 (refit with
t0 = 0: no measurable fixed cost, knee 0), or step time that does not grow
with B (the knee lies beyond the largest batch size measured).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

POOR_FIT_REL_RESIDUAL = 0.25  # a point this far off the curve makes the fit "poor" in the message


@dataclass
class HardwareFit:
    """t(B) = t0_s + B / throughput; see the module docstring."""

    t0_s: Optional[float]
    throughput: Optional[float]            # X, examples/s
    knee_batch_size: Optional[float]       # B_hw = t0 * X
    r2: Optional[float]
    rel_residuals: List[float] = field(default_factory=list)
    max_abs_rel_residual: Optional[float] = None
    n_points: int = 0
    method: str = "weighted least squares on relative residuals, Huber-reweighted"
    message: str = ""

    @property
    def ok(self) -> bool:
        """Both parameters were determined from the data."""
        return self.t0_s is not None and self.throughput is not None

    def predict(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """Fitted step time in seconds."""
        if not self.ok:
            raise ValueError(f"no fitted curve: {self.message}")
        return self.t0_s + np.asarray(batch_size, dtype=float) / self.throughput

    def as_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _wls(b: np.ndarray, t: np.ndarray, w: np.ndarray, through_origin: bool) -> tuple[float, float]:
    """(t0, slope) minimising sum w * (t - t0 - slope*b)^2."""
    if through_origin:
        return 0.0, float(np.sum(w * t * b) / np.sum(w * b * b))
    sw = np.sqrt(w)
    a = np.stack([sw, sw * b], axis=1)
    (t0, slope), *_ = np.linalg.lstsq(a, sw * t, rcond=None)
    return float(t0), float(slope)


def _robust_fit(b: np.ndarray, t: np.ndarray, through_origin: bool, rounds: int = 10) -> tuple[float, float]:
    base_w = 1.0 / t ** 2
    w = base_w
    for _ in range(rounds):
        t0, slope = _wls(b, t, w, through_origin)
        rel = (t - (t0 + slope * b)) / t
        scale = 1.4826 * float(np.median(np.abs(rel - np.median(rel))))
        if scale <= 1e-12:
            break
        k = 1.345 * scale
        w = base_w * np.minimum(1.0, k / np.maximum(np.abs(rel), 1e-300))
    return t0, slope


def fit_step_time(batch_sizes: Sequence[float], step_times: Sequence[float]) -> HardwareFit:
    """Fit t(B) = t0 + B/X to median step times (seconds) at the given batch sizes."""
    b = np.asarray(batch_sizes, dtype=float)
    t = np.asarray(step_times, dtype=float)
    if b.shape != t.shape or b.ndim != 1:
        raise ValueError(f"batch_sizes and step_times must be 1-D of equal length, got {b.shape} and {t.shape}")
    if not (np.all(np.isfinite(b)) and np.all(b > 0)):
        raise ValueError(f"batch sizes must be positive and finite, got {b.tolist()}")
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise ValueError(f"step times must be positive and finite, got {t.tolist()}")
    n = len(b)
    if len(np.unique(b)) < 2:
        what = "no batch size" if n == 0 else f"only batch size {int(b[0])}"
        return HardwareFit(None, None, None, None, n_points=n,
                           message=f"cannot fit t(B) = t0 + B/X: {what} measured; t0 and X need at least two "
                                   "different batch sizes")

    notes = []
    t0, slope = _robust_fit(b, t, through_origin=False)
    if slope <= 0:
        return HardwareFit(float(np.average(t, weights=1 / t ** 2)), None, None, None, n_points=n,
                           message=f"step time does not grow with batch size up to B={int(b.max())}: the hardware "
                                   "knee lies beyond the largest batch size measured; measure larger batches")
    if t0 < 0:
        notes.append(f"the fitted fixed cost t0 was negative ({t0 * 1e3:.3g} ms): no measurable per-step "
                     "overhead in this range, refit with t0 = 0, so the knee is 0 (step time proportional to B)")
        t0, slope = _robust_fit(b, t, through_origin=True)

    pred = t0 + slope * b
    rel = t / pred - 1.0
    w = 1.0 / t ** 2
    mean_w = np.sum(w * t) / np.sum(w)
    ss_tot = float(np.sum(w * (t - mean_w) ** 2))
    r2 = 1.0 - float(np.sum(w * (t - pred) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    max_rel = float(np.max(np.abs(rel)))
    if n == 2:
        notes.append("two batch sizes: the curve passes through both, so the quality figures say nothing")
    if max_rel > POOR_FIT_REL_RESIDUAL:
        worst = int(b[int(np.argmax(np.abs(rel)))])
        notes.append(f"poor fit: the step time at B={worst} is {max_rel:.0%} off the curve "
                     "(noisy timings, or a regime change such as caches or kernel selection)")
    throughput = 1.0 / slope
    return HardwareFit(t0, throughput, t0 * throughput, r2, rel.tolist(), max_rel, n, message="; ".join(notes))
