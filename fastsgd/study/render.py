"""Every figure of the harness, drawn on a ``matplotlib.figure.Figure`` this module creates.

No pyplot and no ``matplotlib.use``: the global backend and pyplot's figure registry stay
as the calling program set them, so the figures work without a display and inside other
programs (notebooks, GUIs). Each ``*_figure`` function returns a Figure; :func:`save`
writes one (PNG, or any format matplotlib infers from the file name).

- steps to result (one study): :func:`steps_with_intervals` (seed medians with within-point
  intervals, censored points, the fit with its B_crit interval, the model-free bracket and the
  fit's residuals), :func:`contour_figure`, :func:`effective_lr_figure`, all three written by
  :func:`write_study_figures`; :func:`b_crit_against_goal` (B_crit recomputed at other goals)
- step time (one sweep): :func:`throughput_figure`
- combined: :func:`time_to_result_figure`, :func:`whatif_figure`, :func:`noise_prediction_figure`

matplotlib is imported on first use, so importing this module does not need it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["save", "steps_with_intervals", "b_crit_against_goal", "contour_figure", "effective_lr_figure",
           "write_study_figures", "best_curve", "throughput_figure", "time_to_result_figure", "whatif_figure",
           "noise_prediction_figure"]


def _figure(figsize, **kwargs):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError(f"plotting needs matplotlib ({exc}); pip install matplotlib") from None
    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)   # its own canvas: tight_layout and savefig need a renderer, not pyplot's
    return fig


def save(fig, path: str, dpi: int = 120) -> str:
    """Write ``fig`` to ``path`` (creating its directory); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------- one steps-to-result study

def _title(summary: Dict[str, object]) -> str:
    g = summary["goal"]
    return (f"{summary['workload']} / {summary['optimizer']} / {summary['protocol']}: "
            f"{g['metric']} {'>' if g['higher_is_better'] else '<'} {g['value']:.3g}")


def steps_with_intervals(summary: Dict[str, object], title: str = ""):
    """The study summary (schema fastsgd.steps_to_result/2) as a two-panel Figure."""
    fig = _figure((6.4, 6.0))
    ax, axr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    rows = summary["per_batch_size"]
    meas = [r for r in rows if r.get("status", "measured") == "measured" and r.get("steps_median") is not None]
    if meas:
        b = np.array([r["batch_size"] for r in meas], dtype=float)
        med = np.array([r["steps_median"] for r in meas], dtype=float)
        lo = np.array([(r["steps_ci"] or [m, m])[0] for r, m in zip(meas, med)], dtype=float)
        hi = np.array([(r["steps_ci"] or [m, m])[1] for r, m in zip(meas, med)], dtype=float)
        open_hi = ~np.isfinite(hi)      # replicates that missed the goal: the interval is open upwards
        hi = np.where(open_hi, med * 2.0, hi)
        ax.errorbar(b, med, yerr=[med - lo, hi - med], fmt="o", color="tab:blue", capsize=3,
                    label="median over seeds, within-point CI")
        if open_hi.any():
            ax.plot(b[open_hi], hi[open_hi], "^", color="tab:blue", ms=5, label="CI open upwards (seeds missed)")
        for r in meas:
            seeds = [s for s in (r.get("seeds") or []) if s is not None]
            if len(seeds) > 1:
                ax.plot([r["batch_size"]] * len(seeds), seeds, ".", color="tab:blue", alpha=0.35, ms=4)
        ax.plot(b, [r["steps"] for r in meas], "x", color="0.4", ms=5, label="best trial (min over trials)")
        ax.plot(b, med[0] * b[0] / b, "k--", lw=0.8, label="perfect scaling")
    cens = [r for r in rows if r.get("status") == "censored" and r.get("steps_lower_bound")]
    if cens:
        cb = [r["batch_size"] for r in cens]
        cl = [r["steps_lower_bound"] for r in cens]
        ax.plot(cb, cl, "^", color="tab:red", label="censored: S(B) > bound")
        for x, y in zip(cb, cl):
            ax.annotate("", xy=(x, y * 1.6), xytext=(x, y), arrowprops={"arrowstyle": "->", "color": "tab:red"})
    fit = summary.get("fit")
    all_b = [r["batch_size"] for r in rows]
    if fit and all_b:
        grid = np.geomspace(min(all_b), max(all_b), 200)
        ci = fit.get("B_crit_ci")
        lab = f"fit: B_crit = {fit['B_crit']:.3g}" + (f" ({ci[0]:.3g}..{ci[1]:.3g})" if ci else "")
        ax.plot(grid, fit["S_min"] + fit["E_min"] / grid, "-", color="tab:red", lw=1, label=lab)
    brk = summary.get("brackets") or {}
    if brk.get("b_steps_double") and brk.get("b_examples_double"):
        ax.axvspan(brk["b_steps_double"], brk["b_examples_double"], color="tab:orange", alpha=0.15,
                   label=f"model-free bracket {brk['b_steps_double']:.3g}..{brk['b_examples_double']:.3g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_ylabel("steps to result")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    diag = summary.get("fit_diagnostics") or {}
    res = diag.get("residuals") or []
    if res:
        axr.axhline(0, color="0.5", lw=0.8)
        axr.plot([d["batch_size"] for d in res], [d["relative"] for d in res], "o-", color="tab:red", ms=4)
        r2 = diag.get("r2_log")
        axr.set_title(f"fit residuals (R^2 log {r2:.3f}" + (", LACK OF FIT)" if diag.get("lack_of_fit") else ")")
                      if r2 is not None else "fit residuals", fontsize=8)
    elif summary.get("fit_refused"):
        axr.text(0.5, 0.5, "no fit: " + str(summary["fit_refused"])[:90] + "...", ha="center", va="center",
                 fontsize=7, transform=axr.transAxes)
    axr.set_ylabel("measured / fit - 1")
    axr.set_xlabel("batch size")
    axr.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def b_crit_against_goal(sweep: Sequence[Dict[str, object]], metric: str = "goal", higher_is_better: bool = False,
                        title: str = ""):
    """B_crit with its interval and the model-free bracket at each goal (``steps_against_goal`` output),
    harder goals to the right. Goals whose fit was refused or shows lack of fit are marked."""
    fig = _figure((6.0, 4.2))
    ax = fig.subplots()
    g = np.array([e["goal"] for e in sweep], dtype=float)

    def arr(key: str) -> np.ndarray:
        return np.array([np.nan if e.get(key) is None else float(e[key]) for e in sweep])
    bc = arr("B_crit")
    lo = np.array([np.nan if not e.get("B_crit_ci") else e["B_crit_ci"][0] for e in sweep], dtype=float)
    hi = np.array([np.nan if not e.get("B_crit_ci") else e["B_crit_ci"][1] for e in sweep], dtype=float)
    ok = np.isfinite(bc)
    yerr = [np.where(np.isfinite(lo), bc - lo, 0)[ok], np.where(np.isfinite(hi), hi - bc, 0)[ok]]
    ax.errorbar(g[ok], bc[ok], yerr=yerr, fmt="o-", capsize=3, color="tab:red", label="fit B_crit (CI)")
    bl, bh = arr("b_steps_double"), arr("b_examples_double")
    both = np.isfinite(bl) & np.isfinite(bh)
    if both.any():
        ax.fill_between(g[both], bl[both], bh[both], color="tab:orange", alpha=0.2,
                        label="model-free bracket (S = 2 S_min .. B S = 2 E_min)")
    lof = np.array([bool(e.get("lack_of_fit")) for e in sweep]) & ok
    if lof.any():
        ax.plot(g[lof], bc[lof], "s", mfc="none", mec="k", ms=10, label="lack of fit")
    refused: List[float] = [e["goal"] for e in sweep if e.get("fit_refused")]
    for x in refused:
        ax.axvline(x, color="0.5", ls=":", lw=1)
    if refused:
        ax.plot([], [], ":", color="0.5", label="fit refused (censored/missing large B)")
    ax.set_yscale("log", base=2)
    ax.set_xlabel(metric)
    ax.set_ylabel("critical batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    if len(g):
        pad = 0.02 * (float(np.ptp(g)) or 1.0)
        lo_x, hi_x = float(g.min()) - pad, float(g.max()) + pad
        ax.set_xlim((lo_x, hi_x) if higher_is_better else (hi_x, lo_x))   # harder goals to the right
    fig.tight_layout()
    return fig


def best_curve(records: Sequence, metric: str, steps: np.ndarray, higher_is_better: bool) -> np.ndarray:
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


def contour_figure(summary: Dict[str, object], records: Sequence):
    """Golmant et al.-style contours of the goal metric (best over the trials of a batch size
    at each step) over (batch size, steps), with the goal contour drawn bold."""
    g = summary["goal"]
    by_bs: Dict[int, List] = {}
    for r in records:
        by_bs.setdefault(r.batch_size, []).append(r)
    batch_sizes = sorted(by_bs)
    max_step = max([max(r.steps) for r in records if r.steps] + [1])
    steps = np.unique(np.geomspace(1, max_step, 120).round())
    z = np.array([best_curve(by_bs[b], g["metric"], steps, g["higher_is_better"]) for b in batch_sizes]).T
    fig = _figure((6, 4.5))
    ax = fig.subplots()
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
    return fig


def effective_lr_figure(summary: Dict[str, object]):
    """The best trial's lr / (1 - momentum) per batch size against the linear and
    square-root rules started at the smallest batch size."""
    eff = summary["effective_lr"]
    fig = _figure((6, 4.5))
    ax = fig.subplots()
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
    return fig


def write_study_figures(summary: Dict[str, object], records: Sequence, out_dir: str) -> List[str]:
    """Write steps_vs_batch_size.png, loss_contour.png and effective_lr.png into ``out_dir``;
    returns their file names."""
    figures = {"steps_vs_batch_size.png": steps_with_intervals(summary, title=_title(summary)),
               "loss_contour.png": contour_figure(summary, records),
               "effective_lr.png": effective_lr_figure(summary)}
    for name, fig in figures.items():
        save(fig, os.path.join(out_dir, name))
    return list(figures)


# ---------------------------------------------------------------- one step-time sweep

def throughput_figure(records: Sequence[Dict[str, Any]], fit, *, title: str = "", subtitle: str = ""):
    """Step time and examples/s against batch size, log-log, with the fitted t(B) = t0 + B/X
    (a :class:`fastsgd.study.hardware.fit.HardwareFit`) and the hardware knee B_hw = t0*X marked."""
    from matplotlib.ticker import FuncFormatter
    if not records:
        raise ValueError("no records to plot")

    b = np.array([r["batch_size"] for r in records], dtype=float)
    t = np.array([r["step_time_s"] for r in records]) * 1e3
    lo = np.array([r["step_time_q20_s"] for r in records]) * 1e3
    hi = np.array([r["step_time_q80_s"] for r in records]) * 1e3
    opt = np.array([r["optimizer_time_s"] for r in records]) * 1e3
    eps = np.array([r["examples_per_s"] for r in records])

    fig = _figure((11, 4.4), layout="constrained")
    ax_t, ax_x = fig.subplots(1, 2)

    ax_t.errorbar(b, t, yerr=[t - lo, hi - t], fmt="o", color="C0", capsize=3, label="measured step (median, 20-80 %)")
    ax_t.plot(b, opt, "s", color="C2", ms=4, alpha=0.8, label="optimizer step part")
    ax_x.plot(b, eps, "o", color="C1", label="measured")

    if fit.ok:
        grid = np.geomspace(b.min(), b.max(), 200)
        curve = fit.predict(grid)
        ax_t.plot(grid, curve * 1e3, "-", color="C0", alpha=0.6,
                  label=f"fit t0 + B/X: t0 = {fit.t0_s * 1e3:.3g} ms, X = {fit.throughput:.4g}/s")
        ax_x.plot(grid, grid / curve, "-", color="C1", alpha=0.6, label="fit B / t(B)")
        ax_x.axhline(fit.throughput, color="gray", ls=":", lw=1, label=f"X = {fit.throughput:.4g}/s")
        _mark_knee(ax_t, ax_x, fit, b)
    for ax in (ax_t, ax_x):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper left")
    ax_t.set_ylabel("time per training step (ms)")
    ax_x.set_ylabel("examples per second")
    ax_t.set_title("step time")
    ax_x.set_title("throughput")
    if title or subtitle:
        fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=10)
    return fig


def _mark_knee(ax_t, ax_x, fit, b: np.ndarray) -> None:
    knee = fit.knee_batch_size
    if not knee or not (b.min() / 4 <= knee <= b.max() * 4):
        return  # far outside the measured range: a line there would only stretch the axes
    for ax in (ax_t, ax_x):
        ax.axvline(knee, color="C3", ls="--", lw=1)
    ax_t.annotate(f"knee B_hw = t0*X = {knee:.3g}", xy=(knee, float(fit.predict(knee)) * 1e3),
                  xytext=(6, -14), textcoords="offset points", color="C3", fontsize=8)


# ---------------------------------------------------------------- combining the halves

def time_to_result_figure(result, study, throughput, title: str = ""):
    """Three log-log panels -- S(B), t(B), T(B) -- with fits and B_crit, B_hw, B* marked
    (``result`` a :class:`fastsgd.study.combine.time_to_result.TimeToResult` of ``study`` and ``throughput``)."""
    fig = _figure((14, 4.2))
    axes = fig.subplots(1, 3)
    all_b = [b for b in study.batch_sizes] + list(throughput.batch_sizes)
    lo, hi = max(min(all_b) / 2, 0.5), max(all_b) * 2
    grid = np.geomspace(lo, hi, 200)
    marks = [("B_crit", result.b_crit, "tab:red"), ("B_hw", result.b_hw, "tab:green"),
             ("B*", result.b_star, "tab:purple")]

    pts = [(b, s) for b, s in zip(study.batch_sizes, study.steps) if s is not None]
    ax = axes[0]
    if pts:
        ax.plot(*zip(*pts), "o", label="measured")
    if study.fit:
        ax.plot(grid, study.fit.steps(grid), "-", color="0.4", label="S_min + E_min/B")
    ax.set_ylabel("steps to result")

    ax = axes[1]
    ax.plot(throughput.batch_sizes, throughput.step_times, "o", label="measured")
    if throughput.fit:
        ax.plot(grid, throughput.fit.time(grid), "-", color="0.4", label="t0 + B/X")
    ax.set_ylabel("time per step (s)")

    ax = axes[2]
    rows = [r for r in result.rows if r["time_to_result_s"] is not None]
    if rows:
        ax.plot([r["batch_size"] for r in rows], [r["time_to_result_s"] for r in rows], "o", label="measured S x t")
    if study.fit and throughput.fit:
        ax.plot(grid, study.fit.steps(grid) * throughput.fit.time(grid), "-", color="0.4", label="fit S(B) t(B)")
    ax.set_ylabel("time to result (s)")

    for ax in axes:
        for name, v, color in marks:
            if v is not None and math.isfinite(v) and lo <= v <= hi:
                ax.axvline(v, color=color, ls="--", lw=1, label=f"{name} = {v:.3g}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def whatif_figure(result, title: str = ""):
    """Time to result against devices N (log-log) from a :class:`fastsgd.study.combine.whatif.WhatIf`,
    with the ideal 1/N line and where doubling N stops paying off."""
    ns = np.array([r["devices"] for r in result.rows], dtype=float)
    ttr = np.array([r["time_to_result_s"] for r in result.rows])
    fig = _figure((6, 4.2))
    ax = fig.subplots()
    ax.plot(ns, ttr, "o-", label="time to result (model)")
    ax.plot(ns, ttr[0] / ns, "--", color="0.5", label="perfect scaling")
    if result.stops_paying_off is not None:
        ax.axvline(result.stops_paying_off, color="tab:red", ls="--", lw=1,
                   label=f"doubling gains < {result.min_gain:.0%} from N = {result.stops_paying_off}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices N")
    ax.set_ylabel("time to result (s)")
    ax.set_title(title or result.mode, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def noise_prediction_figure(study, noise: Optional[Dict[str, Any]], measured_b_crit: Optional[float]):
    """Measured steps to result (``study``, a StudyData) with the fitted and the noise-predicted
    S(B); and B_simple along the noise-scale run (``noise``, the JSON of
    ``fastsgd noise``). None when the run made no prediction."""
    pred = (noise or {}).get("prediction")
    if not pred:
        return None
    fig = _figure((11, 4.2))
    axes = fig.subplots(1, 2)
    ax = axes[0]
    pts = [(b, s) for b, s in zip(study.batch_sizes, study.steps) if s is not None]
    bs = [b for b in study.batch_sizes] + [noise.get("batch_size") or 1]
    grid = np.geomspace(max(min(bs) / 2, 0.5), max(bs) * 2, 200)
    if pts:
        ax.plot(*zip(*pts), "o", label="measured (study)")
        b0, s0 = pts[0]
        ax.plot(grid, s0 * b0 / grid, ":", color="0.6", label="perfect scaling")
    if study.fit:
        ax.plot(grid, study.fit.steps(grid), "-", color="0.3", label=f"study fit, B_crit = {study.fit.b_crit:.3g}")
    ax.plot(grid, pred["S_min"] + pred["E_min"] / grid, "--", color="tab:orange",
            label=f"noise-scale prediction, B_crit = {pred['B_crit']:.3g}")
    ax.plot([noise["batch_size"]], [noise["steps"]], "s", color="tab:orange", label="the measured run")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to result")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    traj = noise.get("trajectory") or []
    ax.plot([r["step"] for r in traj], [r["b_simple"] for r in traj], ".-", label="B_simple per window")
    if measured_b_crit:
        ax.axhline(measured_b_crit, color="0.3", ls="-", lw=1, label="measured B_crit")
    ax.axhline(pred["B_crit"], color="tab:orange", ls="--", lw=1, label="predicted B_crit")
    ax.set_yscale("log")
    ax.set_xlabel(f"step (batch size {noise['batch_size']})")
    ax.set_ylabel("B_simple")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
