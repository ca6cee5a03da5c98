"""One report on batch size: steps to result, step time, their product, the noise-scale
prediction and the what-if-N-devices plan, as Markdown with the plots as PNG files next to it
(and the numbers as JSON).

Inputs are the files the other tools write: a steps-to-result summary
(``study_summary.json``), a throughput sweep (``throughput.json``), optionally the
noise-scale run of ``fastsgd noise`` and the all-reduce benchmark of
``bench/allreduce.py``. :func:`build_report` takes the parsed objects, so tests and other
code can feed it synthetic data; :func:`write_report` renders and writes everything.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fastsgd.measure import strict_json
from fastsgd.study import render
from fastsgd.study.combine.time_to_result import (
    StepsCurve,
    StudyData,
    ThroughputData,
    TimeToResult,
    combine,
    time_to_result_table,
)
from fastsgd.study.combine.whatif import CommModel, WhatIf, what_if, whatif_table
from fastsgd.study.tables import format_table, format_value

__all__ = ["Report", "build_report", "render_markdown", "write_report"]

WHATIF_ASSUMPTIONS = (
    "The what-if table is a planning model, not a promise: the global batch is split evenly over N identical "
    "devices; per-device compute follows the single-device fit t(b) = t0 + b/X; gradients are all-reduced by a "
    "flat ring (2(N-1)/N x bytes / link bandwidth + 2(N-1) x latency); a fraction of that hides behind the "
    "backward pass; steps to result depend only on the global batch (S(B) from the study fit, tuned at every B). "
    "Stragglers, topology, contention, input pipelines and memory limits are not modelled.")


@dataclass
class Report:
    """Everything the report shows: headline numbers, tables and figure files."""

    numbers: Dict[str, Any]
    ttr: TimeToResult
    study: StudyData
    throughput: ThroughputData
    noise: Optional[Dict[str, Any]] = None
    whatif: Optional[WhatIf] = None
    whatif_note: str = ""
    warnings: List[str] = field(default_factory=list)
    figures: Dict[str, str] = field(default_factory=dict)   # caption -> PNG path
    notes: List[str] = field(default_factory=list)          # provenance lines (commands, machine)


def _num(v: Optional[float]) -> str:
    return format_value(v, missing="n/a")


def build_report(study: StudyData, throughput: ThroughputData, *, noise: Optional[Dict[str, Any]] = None,
                 comm: Optional[CommModel] = None, max_devices: int = 4096, min_gain: float = 0.10,
                 extrapolate: bool = False) -> Report:
    """Combine the inputs into a :class:`Report` (no files written yet).

    noise: the JSON of ``fastsgd noise`` (schema ``fastsgd.noise_scale_run/1``)
    comm:  the communication model for the what-if table (None: no what-if table)
    extrapolate: let the what-if table go beyond the measured batch sizes (rows are marked)

    Every warning of the inputs (study, step-time fit) and of the combination reaches
    ``Report.warnings``.
    """
    ttr = combine(study, throughput)
    warnings: List[str] = list(ttr.warnings)
    sw, tw = study.meta.get("workload"), throughput.meta.get("workload")
    if sw and tw and sw != tw:
        warnings.append(f"the study's workload ({sw}) and the throughput sweep's ({tw}) differ: "
                        "time to result mixes two models")
    if study.fit is None:
        warnings.append("the study has no S(B) fit (fewer than two batch sizes reached the goal)")
    if throughput.fit is None:
        warnings.append("the throughput sweep has no t(B) fit")
    extrapolated = [r["batch_size"] for r in ttr.rows if r["step_time_source"] == "fit (extrapolated)"]
    if extrapolated:
        warnings.append(f"step time extrapolated from the t(B) fit (outside the measured range) at batch sizes "
                        f"{extrapolated}")
    fit = study.meta.get("fit") or {}
    brk = study.meta.get("brackets") or {}
    diag = study.meta.get("fit_diagnostics") or {}
    numbers: Dict[str, Any] = {
        "workload": sw or tw, "device": throughput.meta.get("device"),
        "measured_b_crit": ttr.b_crit, "measured_b_crit_ci": fit.get("B_crit_ci"),
        "b_crit_bracket": [brk.get("b_steps_double"), brk.get("b_examples_double")] if brk else None,
        "fit_r2_log": diag.get("r2_log"), "fit_lack_of_fit": diag.get("lack_of_fit"),
        "b_star_ci": ttr.b_star_ci, "intervals_resample": (study.meta.get("uncertainty") or {}).get("resampled"),
        "s_min": study.fit.s_min if study.fit else None, "e_min": study.fit.e_min if study.fit else None,
        "b_hw": ttr.b_hw, "t0_s": throughput.fit.t0 if throughput.fit else None,
        "throughput_examples_per_s": throughput.fit.throughput if throughput.fit else None,
        "b_star": ttr.b_star, "t_star_s": ttr.t_star,
        "best_measured_batch_size": ttr.best_measured["batch_size"] if ttr.best_measured else None,
        "best_measured_time_s": ttr.best_measured["time_to_result_s"] if ttr.best_measured else None,
        "predicted_b_crit": None, "ratio_predicted_measured": None,
    }
    if noise is not None:
        pred = noise.get("prediction")
        if not pred:
            warnings.append("the noise-scale run did not reach its goal: no prediction")
        else:
            lr_source = noise.get("lr_source")
            numbers["noise_run_lr"], numbers["noise_run_lr_source"] = noise.get("lr"), lr_source
            if lr_source != "study best trial":
                warnings.append(f"the noise scale was measured at lr {_num(noise.get('lr'))} "
                                f"({lr_source or 'source not recorded'}), not with the study's tuned settings at "
                                "this batch size: B_simple depends on where training goes, so the prediction may be "
                                "off by a factor (measure with --study for the tuned lr)")
            numbers.update(predicted_b_crit=pred["B_crit"], predicted_s_min=pred["S_min"],
                           predicted_e_min=pred["E_min"], noise_run_batch_size=noise.get("batch_size"),
                           noise_run_steps=noise.get("steps"), b_simple_mean=pred.get("b_simple_mean"),
                           b_simple_final=pred.get("b_simple_final"))
            if ttr.b_crit:
                numbers["ratio_predicted_measured"] = pred["B_crit"] / ttr.b_crit
            pn = noise.get("prediction_b_noise")
            if pn:
                numbers["predicted_b_crit_b_noise"] = pn["B_crit"]
                numbers["b_noise_mean"] = (noise.get("hessian_noise") or {}).get("b_noise")
                if ttr.b_crit:
                    numbers["ratio_b_noise_predicted_measured"] = pn["B_crit"] / ttr.b_crit
            if noise.get("workload") and sw and noise["workload"] != sw:
                warnings.append(f"the noise-scale run's workload ({noise['workload']}) differs from the study's ({sw})")
    wi, note = None, ""
    if comm is None:
        note = "no communication model given (gradient bytes unknown): no what-if table"
    elif study.fit is None or throughput.fit is None:
        note = "the what-if table needs both fits"
    else:
        measured = [b for b, v in zip(study.batch_sizes, study.steps) if v is not None]
        steps_range = (min(measured), max(measured)) if measured else None
        hw_range = (min(throughput.batch_sizes), max(throughput.batch_sizes)) if throughput.batch_sizes else None
        wi = what_if(study.fit, throughput.fit, comm, max_devices=max_devices, min_gain=min_gain,
                     steps_range=steps_range, hardware_range=hw_range, extrapolate=extrapolate)
        marked = [r["devices"] for r in wi.rows if r.get("extrapolated")]
        if marked:
            warnings.append(f"what-if rows for N = {marked} are extrapolated beyond the measured batch sizes "
                            "(see their 'extrapolated' reasons)")
        elif not extrapolate and wi.rows[-1]["devices"] < max_devices:
            note = (f"the what-if sweep stops at N = {wi.rows[-1]['devices']}: more devices need batch sizes "
                    "outside the measured ranges (extrapolate to model them anyway)")
        numbers.update(whatif_stops_paying_off=wi.stops_paying_off, whatif_fastest_n=wi.fastest_n,
                       comm={"grad_bytes": comm.grad_bytes, "bandwidth_bytes_per_s": comm.bandwidth,
                             "latency_s": comm.latency, "overlap": comm.overlap})
    return Report(numbers, ttr, study, throughput, noise, wi, note, warnings)


# ---------------------------------------------------------------- figures

def make_figures(report: Report, out_dir: str) -> Dict[str, str]:
    """Write the report's PNGs into ``out_dir``; returns (and keeps in ``report.figures``) caption -> path."""
    figs = {"Steps, step time and time to result against batch size": render.save(
        render.time_to_result_figure(report.ttr, report.study, report.throughput,
                                     title=str(report.numbers.get("workload") or "")),
        os.path.join(out_dir, "time_to_result.png"), dpi=110)}
    fig = render.noise_prediction_figure(report.study, report.noise, report.ttr.b_crit)
    if fig is not None:
        figs["Steps to result: measured, fitted and predicted from the noise scale"] = render.save(
            fig, os.path.join(out_dir, "noise_prediction.png"), dpi=110)
    if report.whatif is not None:
        figs["What if N devices (model)"] = render.save(render.whatif_figure(report.whatif),
                                                        os.path.join(out_dir, "whatif.png"), dpi=110)
    report.figures = figs
    return figs


# ---------------------------------------------------------------- text

def _headline(report: Report) -> List[tuple]:
    n = report.numbers
    ci = n.get("measured_b_crit_ci")
    br = n.get("b_crit_bracket")
    bsci = n.get("b_star_ci")
    rows = [("Workload", str(n.get("workload"))), ("Device (throughput)", str(n.get("device"))),
            ("Measured B_crit (study fit E_min/S_min)", _num(n["measured_b_crit"]) +
             (f" (95% CI {_num(ci[0])}..{_num(ci[1])})" if ci else "") +
             ("; the fit shows lack of fit" if n.get("fit_lack_of_fit") else "")),
            ("B_crit model-free bracket (S = 2 S_min .. B S = 2 E_min, measured)",
             f"{_num(br[0])} .. {_num(br[1])}" if br else "n/a"),
            ("S(B) fit R^2 (log space)", _num(n.get("fit_r2_log"))),
            ("Predicted B_crit (noise scale)", _num(n.get("predicted_b_crit"))),
            ("Predicted / measured B_crit", _num(n.get("ratio_predicted_measured"))),
            ("Predicted B_crit from B_noise (Hessian-aware)", _num(n.get("predicted_b_crit_b_noise")) +
             (f" (/ measured {_num(n.get('ratio_b_noise_predicted_measured'))})"
              if n.get("ratio_b_noise_predicted_measured") is not None else "")),
            ("Hardware knee B_hw = t0 X", _num(n["b_hw"])),
            ("B* = sqrt(B_crit B_hw)", _num(n["b_star"]) +
             (f" (95% CI {_num(bsci[0])}..{_num(bsci[1])}, t(B) fit held fixed)" if bsci else "")),
            ("Fitted T(B*)", _num(n["t_star_s"]) + " s"),
            ("Best measured batch size (T)", f"{n.get('best_measured_batch_size')} "
                                              f"({_num(n.get('best_measured_time_s'))} s)")]
    if report.whatif is not None:
        rows.append((f"More devices stop paying off (doubling gains < {report.whatif.min_gain:.0%}) from N =",
                     str(report.whatif.stops_paying_off or "never (<= max)")))
        rows.append(("Fastest N in the what-if sweep", str(report.whatif.fastest_n)))
    return rows


def _noise_text(report: Report) -> str:
    nz = report.noise or {}
    pred = nz.get("prediction")
    if not pred:
        return ""
    return (f"Noise scale measured during one run at batch size {nz.get('batch_size')} "
            f"({nz.get('optimizer')}, lr {_num(nz.get('lr'))}, momentum {_num(nz.get('momentum'))}, "
            f"settings from: {nz.get('lr_source') or 'not recorded'}; the prediction holds for these settings), "
            f"goal reached in {nz.get('steps')} steps. B_simple: mean {_num(pred.get('b_simple_mean'))}, "
            f"at the goal {_num(pred.get('b_simple_final'))}; predicted B_crit = progress-weighted mean = "
            f"{_num(pred['B_crit'])}, S(B) = {_num(pred['S_min'])} + {_num(pred['E_min'])}/B.")


def render_markdown(report: Report, title: str = "Batch size report") -> str:
    lines = [f"# {title}", "", f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}.", "",
             format_table([{"quantity": k, "value": v} for k, v in _headline(report)], ["quantity", "value"],
                          markdown=True, align="lr")]
    if report.notes:
        lines += ["", "How this was measured:"] + [f"- {n}" for n in report.notes]
    if report.warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in report.warnings]
    if _noise_text(report):
        lines += ["", "## Noise-scale prediction", "", _noise_text(report)]
        predicted = StepsCurve(report.numbers["predicted_s_min"], report.numbers["predicted_e_min"])
        cmp_rows = [{"batch_size": b, "measured steps": s, "predicted steps": float(predicted.steps(b))}
                    for b, s in zip(report.study.batch_sizes, report.study.steps)]
        lines += ["", format_table(cmp_rows, ["batch_size", "measured steps", "predicted steps"], markdown=True,
                                   missing="n/a")]
    lines += ["", "## Time to result T(B) = S(B) x t(B)", "", time_to_result_table(report.ttr, markdown=True)]
    lines += ["", "## What if N devices", ""]
    if report.whatif is None:
        lines.append(report.whatif_note)
    else:
        c = report.numbers["comm"]
        lines += [f"Mode: {report.whatif.mode}. Gradient {c['grad_bytes'] / 2**20:.3g} MiB, link bandwidth "
                  f"{c['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s, latency {c['latency_s'] * 1e6:.3g} us per ring step, "
                  f"overlap {c['overlap']:.2f}.", "", whatif_table(report.whatif, markdown=True), "",
                  WHATIF_ASSUMPTIONS]
    if report.figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{cap}]({os.path.basename(p)})" for cap, p in report.figures.items()]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str, title: str = "Batch size report") -> Dict[str, str]:
    """Write the figures (PNG), ``report.md`` (linking them by relative path) and ``report.json``
    (the numbers and tables) to ``out_dir``: plain files that diff and review in git."""
    make_figures(report, out_dir)
    paths = {"md": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "report.json")}
    with open(paths["md"], "w") as f:
        f.write(render_markdown(report, title))
    with open(paths["json"], "w") as f:
        # inf (e.g. B* when no knee was found) becomes null: report.json stays standard JSON
        json.dump(strict_json({"numbers": report.numbers, "time_to_result": report.ttr.as_dict(),
                               "whatif": report.whatif.as_dict() if report.whatif else None,
                               "warnings": report.warnings}), f, indent=2, default=str)
    paths.update({os.path.basename(p): p for p in report.figures.values()})
    return paths
