"""The throughput plot: step time and examples/s against batch size, log-log,
with the fitted t(B) = t0 + B/X and the hardware knee B_hw = t0*X marked.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so it works without a display and inside other programs.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

from fastsgd.study.hardware.fit import HardwareFit


def plot_throughput(records: Sequence[Dict[str, Any]], fit: HardwareFit, path: str, *, title: str = "",
                    subtitle: str = "") -> str:
    """Write the two-panel PNG (or any format matplotlib infers from ``path``); returns ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise RuntimeError(f"the throughput plot needs matplotlib ({exc}); pip install matplotlib") from None
    if not records:
        raise ValueError("no records to plot")

    b = np.array([r["batch_size"] for r in records], dtype=float)
    t = np.array([r["step_time_s"] for r in records]) * 1e3
    lo = np.array([r["step_time_q20_s"] for r in records]) * 1e3
    hi = np.array([r["step_time_q80_s"] for r in records]) * 1e3
    opt = np.array([r["optimizer_time_s"] for r in records]) * 1e3
    eps = np.array([r["examples_per_s"] for r in records])

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
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
    fig.savefig(path, dpi=120)
    return path


def _mark_knee(ax_t, ax_x, fit: HardwareFit, b: np.ndarray) -> None:
    knee = fit.knee_batch_size
    if not knee or not (b.min() / 4 <= knee <= b.max() * 4):
        return  # far outside the measured range: a line there would only stretch the axes
    for ax in (ax_t, ax_x):
        ax.axvline(knee, color="C3", ls="--", lw=1)
    ax_t.annotate(f"knee B_hw = t0*X = {knee:.3g}", xy=(knee, float(fit.predict(knee)) * 1e3),
                  xytext=(6, -14), textcoords="offset points", color="C3", fontsize=8)
