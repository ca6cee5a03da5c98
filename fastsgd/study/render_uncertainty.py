"""Figures for the uncertainty of a steps-to-result study (drawn on a new
``matplotlib.figure.Figure``; the caller saves it with ``fig.savefig(path)``).

- :func:`steps_with_intervals`: steps to result against batch size (log2-log2) with the
  point estimate (seed median) and its within-point interval as error bars, the single
  seeds, censored batch sizes as upward arrows from their lower bound, the fit with its
  B_crit interval, the model-free bracket as a shaded span, and the fit's relative
  residuals in a lower panel.
- :func:`b_crit_against_goal`: B_crit (fit, interval) and the model-free bracket against
  the goal, from :func:`fastsgd.study.steps_to_result.steps_against_goal`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def _figure(**kw):
    from matplotlib.figure import Figure
    return Figure(**kw)


def steps_with_intervals(summary: Dict[str, object], title: str = ""):
    """The study summary (schema fastsgd.steps_to_result/2) as a two-panel Figure."""
    fig = _figure(figsize=(6.4, 6.0))
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
    fig = _figure(figsize=(6.0, 4.2))
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
