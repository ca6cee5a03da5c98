"""PNG plots of a steps-to-result study (matplotlib, Agg backend).

- ``steps_vs_batch_size.png``: steps to result against batch size, log2-log2,
  with the dashed perfect-scaling line steps[0] * B[0] / B (as in
  batch_science) and the fit S_min + E_min / B with B_crit marked.
- ``loss_contour.png``: Golmant et al.-style contours of the goal metric (best
  over the trials of a batch size at each step) over (batch size, steps),
  with the goal contour drawn bold.
- ``effective_lr.png``: the best trial's lr / (1 - momentum) per batch size
  against the linear and square-root rules started at the smallest batch size.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from fastsgd.study.steps.analysis import TrialRecord


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(summary: Dict[str, object]) -> str:
    g = summary["goal"]
    return (f"{summary['workload']} / {summary['optimizer']} / {summary['protocol']}: "
            f"{g['metric']} {'>' if g['higher_is_better'] else '<'} {g['value']:.3g}")


def plot_steps(summary: Dict[str, object], path: str) -> str:
    plt = _pyplot()
    rows = [r for r in summary["per_batch_size"] if r["steps"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if rows:
        b = np.array([r["batch_size"] for r in rows], dtype=float)
        s = np.array([r["steps"] for r in rows], dtype=float)
        ax.plot(b, s, "o-", label="measured (best trial)")
        ax.plot(b, s[0] * b[0] / b, "k--", lw=1, label="perfect scaling")
        fit = summary.get("fit")
        if fit:
            grid = np.geomspace(b.min(), b.max(), 200)
            ax.plot(grid, fit["S_min"] + fit["E_min"] / grid, "-", color="tab:red", lw=1,
                    label=f"fit: B_crit = {fit['B_crit']:.3g}")
            if b.min() <= fit["B_crit"] <= b.max():
                ax.axvline(fit["B_crit"], color="tab:red", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to result")
    ax.set_title(_title(summary), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def best_curve(records: Sequence[TrialRecord], metric: str, steps: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Best value over trials of ``metric`` reached by each of ``steps`` (step-wise
    constant between evaluations; NaN after every trial has stopped)."""
    out = np.full(len(steps), np.nan)
    for rec in records:
        if metric not in rec.metrics or not rec.steps:
            continue
        st = np.asarray(rec.steps, dtype=float)
        vals = np.asarray(rec.metrics[metric], dtype=float)
        vals = np.where(np.isfinite(vals), vals, np.nan)
        idx = np.searchsorted(st, steps, side="right") - 1
        ok = (idx >= 0) & (steps <= st[-1])
        v = np.where(ok, vals[np.clip(idx, 0, None)], np.nan)
        pick = np.fmax if higher_is_better else np.fmin
        out = pick(out, v)
    return out


def plot_contour(summary: Dict[str, object], records: Sequence[TrialRecord], path: str) -> str:
    plt = _pyplot()
    g = summary["goal"]
    by_bs: Dict[int, List[TrialRecord]] = {}
    for r in records:
        by_bs.setdefault(r.batch_size, []).append(r)
    batch_sizes = sorted(by_bs)
    max_step = max([max(r.steps) for r in records if r.steps] + [1])
    steps = np.unique(np.geomspace(1, max_step, 120).round())
    z = np.array([best_curve(by_bs[b], g["metric"], steps, g["higher_is_better"]) for b in batch_sizes]).T
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(batch_sizes) >= 2 and np.isfinite(z).sum() >= 4:
        x = np.log2(batch_sizes)
        zm = np.ma.masked_invalid(z)
        cs = ax.contourf(x, np.log2(steps), zm, levels=15, cmap="viridis")
        fig.colorbar(cs, ax=ax, label=f"best {g['metric']} over trials")
        lo, hi = np.nanmin(z), np.nanmax(z)
        if lo < g["value"] < hi:
            ax.contour(x, np.log2(steps), zm, levels=[g["value"]], colors="w", linewidths=2)
        ax.set_xticks(x)
        ax.set_xticklabels([str(b) for b in batch_sizes], fontsize=7)
    ax.set_xlabel("batch size")
    ax.set_ylabel("log2 steps")
    ax.set_title(_title(summary) + " (goal contour in white)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_effective_lr(summary: Dict[str, object], path: str) -> str:
    plt = _pyplot()
    eff = summary["effective_lr"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if eff["batch_sizes"]:
        b = np.array(eff["batch_sizes"], dtype=float)
        ax.plot(b, eff["best"], "o-", label="best lr / (1 - momentum)")
        ax.plot(b, eff["linear_rule"], "k--", lw=1, label="linear rule")
        ax.plot(b, eff["sqrt_rule"], "k:", lw=1, label="square-root rule")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("effective learning rate")
    ax.set_title(_title(summary), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(summary: Dict[str, object], records: Sequence[TrialRecord], out_dir: str) -> List[str]:
    """Write the three plots into ``out_dir``; returns their file names."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_steps(summary, os.path.join(out_dir, "steps_vs_batch_size.png")),
             plot_contour(summary, records, os.path.join(out_dir, "loss_contour.png")),
             plot_effective_lr(summary, os.path.join(out_dir, "effective_lr.png"))]
    return [os.path.basename(p) for p in paths]
