"""The critical batch size predicted from the gradient noise scale of one training run.

:func:`measure_noise_run` trains a workload once at one batch size, splitting every step
into accumulation micro-batches so that :class:`fastsgd.noise_scale.NoiseScaleAccumulator`
measures B_simple along the way (McCandlish et al. 2018), and stops at the first evaluation
that beats the goal. :func:`predict_critical_batch` turns the measured B_simple windows into
B_crit and S(B) = S_min + E_min/B; :func:`compare_with_study` sets that against a measured
steps-to-result study. ``fastsgd noise`` is the command line.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from fastsgd.measure import environment
from fastsgd.noise_scale import GradientNoiseScale, NoiseScaleAccumulator

SCHEMA = "fastsgd.noise_scale_run/1"


@dataclass
class CriticalBatchPrediction:
    """B_crit and S(B) = S_min + E_min/B predicted from the noise scale of one run.

    batch_size, run_steps:  the run that was measured (``run_steps`` = its steps to the goal)
    b_crit:                 E_min / S_min, the progress-weighted mean of B_simple (see
                            :func:`predict_critical_batch`); the headline prediction
    b_simple_mean:          plain mean of B_simple over the run's steps
    b_simple_final:         B_simple in the last window (at the goal)
    windows_used, windows_dropped: windows with a usable (finite, positive) B_simple, and the rest
    """

    batch_size: int
    run_steps: int
    s_min: float
    e_min: float
    b_crit: float
    b_simple_mean: float
    b_simple_final: float
    windows_used: int
    windows_dropped: int
    method: str = field(default="progress-weighted mean of B_simple along the run (McCandlish et al. 2018, sec. 2.3)")

    def steps(self, batch_size):
        """Predicted steps to result at ``batch_size``: S_min + E_min / B."""
        import numpy as np
        return self.s_min + self.e_min / np.asarray(batch_size, dtype=float)

    def as_dict(self) -> Dict[str, object]:
        return {"batch_size": self.batch_size, "run_steps": self.run_steps, "S_min": self.s_min,
                "E_min": self.e_min, "B_crit": self.b_crit, "b_simple_mean": self.b_simple_mean,
                "b_simple_final": self.b_simple_final, "windows_used": self.windows_used,
                "windows_dropped": self.windows_dropped, "method": self.method}


def predict_critical_batch(b_simple: Sequence[float], window_steps: Sequence[int],
                           batch_size: int) -> CriticalBatchPrediction:
    """Predict B_crit and S(B) from B_simple measured along one run at ``batch_size``.

    ``b_simple[i]`` is the noise scale measured over the ``window_steps[i]`` training steps
    of window i (e.g. the ratio of the summed trace and |G|^2 estimates between two
    evaluations); the windows cover the run up to the goal.

    Why weighted: McCandlish et al.'s model says a step at batch B makes the progress of
    ``1 / (1 + B_noise/B)`` steps of a huge-batch run. Summed over the run that gives
    ``S_min = sum_t 1/(1 + B_t/B)`` and ``E_min = sum_t B_t/(1 + B_t/B)``, so
    ``B_crit = E_min / S_min`` is the mean of the noise scale weighted by progress, and
    ``S(B) = S_min + E_min/B`` passes exactly through the measured run
    (``S(batch_size) = run_steps``). B_simple stands in for B_noise (the paper's cheap
    proxy; it ignores the Hessian, and on real networks it is often within a small
    factor of B_crit -- report the ratio against a measured study). Windows whose
    B_simple is not finite and positive (|G|^2 estimate <= 0 from too few samples) are
    dropped and the remaining windows' steps rescaled to the run's length.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(b_simple) != len(window_steps):
        raise ValueError(f"{len(b_simple)} B_simple values but {len(window_steps)} window lengths")
    if any(not isinstance(n, int) or n < 1 for n in window_steps):
        raise ValueError(f"window lengths must be positive integers (steps), got {list(window_steps)}")
    run_steps = int(sum(window_steps))
    good = [(float(v), n) for v, n in zip(b_simple, window_steps) if math.isfinite(float(v)) and float(v) > 0]
    if not good:
        raise ValueError("no window has a finite positive B_simple: measure over more steps per window "
                         "(|G|^2 estimates were <= 0 everywhere)")
    scale = run_steps / sum(n for _, n in good)
    weights = [n * scale / (1.0 + v / batch_size) for v, n in good]
    s_min = sum(weights)
    e_min = sum(w * v for w, (v, _) in zip(weights, good))
    mean = sum(v * n for v, n in good) / sum(n for _, n in good)
    return CriticalBatchPrediction(batch_size=batch_size, run_steps=run_steps, s_min=s_min, e_min=e_min,
                                   b_crit=e_min / s_min, b_simple_mean=mean, b_simple_final=good[-1][0],
                                   windows_used=len(good), windows_dropped=len(b_simple) - len(good))


# ---------------------------------------------------------------- measuring B_simple along one run

def study_hparams(study_dir: str, batch_size: int) -> Tuple[dict, Optional[dict]]:
    """(steps-to-result summary dict, its best hyperparameters at ``batch_size`` or None)."""
    import json

    from fastsgd.study.combine.time_to_result import find_result_file
    with open(find_result_file(study_dir, "study_summary.json")) as f:
        summary = json.load(f)
    for row in summary.get("per_batch_size", []):
        if int(row["batch_size"]) == batch_size:
            return summary, row.get("best_hparams")
    return summary, None


def measure_noise_run(wl, *, optimizer: str, lr: float, momentum: float, batch_size: int, micro_batches: int,
                      window: int, decay: float, noise_mode: str, eval_resolution: float, max_steps: int,
                      seed: int, device: str, study_summary: Optional[dict] = None, progress: bool = False,
                      hessian_every: int = 0) -> dict:
    """Train ``wl`` at ``batch_size`` until its goal, measuring B_simple every ``window`` steps.

    Returns the run record of schema ``fastsgd.noise_scale_run/1`` (see
    ``fastsgd noise``); ``prediction`` is None when the goal was not reached, and
    ``comparison`` is :func:`compare_with_study` against ``study_summary`` when one is given.

    ``hessian_every`` K > 0 also measures the Hessian-aware B_noise = tr(H Sigma)/(G^T H G) every K
    steps from the step's micro-batch gradients and Hessian-vector products on one extra batch
    (:mod:`fastsgd.study.combine.hessian_noise`); windows then carry ``b_noise`` and the result
    ``hessian_noise`` and ``prediction_b_noise`` (B_crit predicted from B_noise the same way).
    """
    from fastsgd.study.combine.hessian_noise import HessianNoiseScale, noise_scale_estimates
    from fastsgd.study.optimizers import make_optimizer

    if wl.evaluate is None or wl.goal is None:
        raise ValueError(f"workload {wl.name} has no evaluate/goal: give a goal")
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible by {micro_batches} micro-batches")

    torch.manual_seed(seed)
    dev = torch.device(device)
    model = wl.make_model().to(dev)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum)
    noise = GradientNoiseScale(decay=decay)
    acc = NoiseScaleAccumulator(model, noise, mode=noise_mode)
    gen = torch.Generator().manual_seed(seed + 1)
    micro = batch_size // micro_batches
    sign = -1.0 if wl.higher_is_better else 1.0

    trajectory, evaluations = [], []
    hess_total, hess_win = HessianNoiseScale(), HessianNoiseScale()
    win_g2 = win_tr = None
    win_steps, step, reached = 0, 0, False
    next_eval = 1
    t_start = time.perf_counter()
    while step < max_steps:
        x, y = wl.sample_batch(batch_size, gen, dev)
        if hessian_every and step % hessian_every == 0:
            est = noise_scale_estimates(model, wl.loss, list(zip(x.split(micro), y.split(micro))),
                                        wl.sample_batch(batch_size, gen, dev))
            hess_total.update(est)
            hess_win.update(est)
        for xb, yb in zip(x.split(micro), y.split(micro)):
            (wl.loss(model(xb), yb) / micro_batches).backward()
            acc.micro_step(len(xb))
        d = acc.finish()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        win_steps += 1
        win_g2 = d["g2_raw"] if win_g2 is None else win_g2 + d["g2_raw"]
        win_tr = d["trace_raw"] if win_tr is None else win_tr + d["trace_raw"]
        done = False
        if step >= next_eval:
            metric = wl.evaluate(model, dev)[wl.goal_metric]
            evaluations.append({"step": step, wl.goal_metric: metric})
            if not math.isfinite(metric):
                raise ValueError(f"training diverged at step {step} ({wl.goal_metric}={metric}); lower the lr")
            done = sign * (metric - wl.goal) < 0
            # resolve steps to result within ~2 %: the evaluation interval grows with the step
            next_eval = step + max(1, int(step * eval_resolution))
        if win_steps >= window or done:
            g2, tr = float(win_g2 / win_steps), float(win_tr / win_steps)
            trajectory.append({"step": step, "window_steps": win_steps, "g2": g2, "trace": tr,
                               "b_simple": tr / g2 if g2 > 0 else float("nan"), "b_simple_ema": noise.b_simple})
            if hess_win.count:
                h = hess_win.read()
                trajectory[-1].update(b_noise=h["b_noise"], b_simple_hvp_steps=h["b_simple"], hvp_steps=h["updates"])
                hess_win = HessianNoiseScale()
            win_g2 = win_tr = None
            win_steps = 0
        if done:
            reached = True
            break
        if progress and step % 100 == 0:
            print(f"  step {step}: {wl.goal_metric} {evaluations[-1][wl.goal_metric]:.4g} (goal {wl.goal}), "
                  f"B_simple(EMA) {noise.b_simple:.4g}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    acc.remove()

    result = {"schema": SCHEMA, "workload": wl.name, "optimizer": optimizer, "lr": lr, "momentum": momentum,
              "batch_size": batch_size, "micro_batches": micro_batches,
              "window": window, "ema_decay": decay, "seed": seed, "noise_mode": noise_mode,
              "goal": {"metric": wl.goal_metric, "value": wl.goal, "higher_is_better": wl.higher_is_better},
              "reached_goal": reached, "steps": step if reached else None, "max_steps": max_steps,
              "trajectory": trajectory, "evaluations": evaluations, "prediction": None, "comparison": None,
              "environment": environment(dev), "wall_seconds": wall}
    if reached:
        pred = predict_critical_batch([r["b_simple"] for r in trajectory], [r["window_steps"] for r in trajectory],
                                      batch_size)
        result["prediction"] = pred.as_dict()
        if hess_total.count:
            h = hess_total.read()
            result["hessian_noise"] = {"b_noise": h["b_noise"], "b_simple_same_steps": h["b_simple"],
                                       "hvp_steps": h["updates"], "every": hessian_every}
            wins = [r for r in trajectory if "b_noise" in r]
            try:
                pn = predict_critical_batch([r["b_noise"] for r in wins], [r["window_steps"] for r in wins],
                                            batch_size)
                result["prediction_b_noise"] = {**pn.as_dict(), "method": "progress-weighted mean of B_noise "
                                                "(Hessian-aware) along the run"}
            except ValueError as e:  # no window with a usable B_noise
                result["prediction_b_noise"] = None
                result["hessian_noise"]["message"] = str(e)
        if study_summary is not None:
            result["comparison"] = compare_with_study(pred, study_summary)
    return result


def compare_with_study(pred: CriticalBatchPrediction, summary: dict) -> dict:
    """Predicted vs measured B_crit and steps per batch size."""
    fit = summary.get("fit") or {}
    measured = fit.get("B_crit")
    rows = [{"batch_size": int(r["batch_size"]), "measured_steps": r.get("steps"),
             "predicted_steps": float(pred.steps(int(r["batch_size"])))} for r in summary.get("per_batch_size", [])]
    return {"measured_B_crit": measured, "measured_B_crit_ci": fit.get("B_crit_ci"),
            "predicted_B_crit": pred.b_crit,
            "ratio": (pred.b_crit / measured) if measured else None,
            "ratio_mean_b_simple": (pred.b_simple_mean / measured) if measured else None,
            "ratio_final_b_simple": (pred.b_simple_final / measured) if measured else None,
            "measured_S_min": fit.get("S_min"), "predicted_S_min": pred.s_min, "per_batch_size": rows}
