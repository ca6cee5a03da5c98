"""Time to result, what-if and report: measured ranges, B* interval, and every warning reaching the report."""
from __future__ import annotations

import json
import math

import pytest

from fastsgd.study.combine.noise_prediction import predict_critical_batch
from fastsgd.study.combine.report import build_report, render_markdown
from fastsgd.study.combine.time_to_result import (
    StepsCurve,
    StepTimeCurve,
    StudyData,
    ThroughputData,
    combine,
    load_study,
)
from fastsgd.study.combine.whatif import CommModel, what_if

STEPS = StepsCurve(50.0, 50.0 * 256)     # B_crit 256
TIME = StepTimeCurve(0.01, 1600.0)       # B_hw 16 -> B* 64
COMM = CommModel(grad_bytes=1e6, bandwidth=1e10, latency=1e-5)


def _study(bs=(8, 32, 128, 512, 2048), ci=(200.0, 300.0), warnings=()):
    meta = {"fit": {"S_min": 50.0, "E_min": 12800.0, "B_crit": 256.0, "B_crit_ci": list(ci)},
            "warnings": list(warnings), "workload": "toy"}
    return StudyData(list(bs), [float(STEPS.steps(b)) for b in bs], STEPS, meta)


def _thr(times=None, fit=TIME):
    bs = [1, 4, 16, 64, 256, 1024]
    return ThroughputData(bs, times or [float(TIME.time(b)) for b in bs], fit=fit, meta={"workload": "toy"})


def test_whatif_stays_in_the_measured_range_unless_asked():
    kw = dict(max_devices=1 << 16, steps_range=(8, 2048), hardware_range=(1, 1024))
    inside = what_if(STEPS, TIME, COMM, **kw)
    assert all(8 <= r["global_batch"] <= 2048 and 1 <= r["per_device_batch"] <= 1024 for r in inside.rows)
    assert all(r["extrapolated"] == [] for r in inside.rows)
    assert inside.rows[-1]["devices"] == 2048          # one example per device at the largest measured batch
    out = what_if(STEPS, TIME, COMM, extrapolate=True, **kw)
    assert len(out.rows) > len(inside.rows)
    far = [r for r in out.rows if r["global_batch"] > 2048]
    assert far and all("outside the steps-to-result measurements" in r["extrapolated"][0] for r in far)
    with pytest.raises(ValueError, match="global batch 1e\\+06 outside .*extrapolate=True"):
        what_if(STEPS, TIME, COMM, global_batch=1e6, **kw)
    assert what_if(STEPS, TIME, COMM, global_batch=1e6, extrapolate=True, **kw).rows[0]["extrapolated"]


def test_b_star_interval_follows_b_crit_interval():
    res = combine(_study(), _thr())
    assert res.b_star == pytest.approx(64)
    assert res.b_star_ci == pytest.approx([math.sqrt(200 * 16), math.sqrt(300 * 16)])
    assert res.as_dict()["b_star_ci"] == res.b_star_ci
    # B* outside the measured batch sizes is flagged
    res = combine(_study(bs=(128, 512, 2048)), _thr())
    assert any("B* = 64 lies outside the measured batch sizes [128, 2048]" in w for w in res.warnings)


def test_every_input_warning_reaches_the_report():
    times = [float(TIME.time(b)) for b in [1, 4, 16, 64, 256, 1024]]
    times[2] *= 1.8                                        # one bad timing: the t(B) fit is poor
    thr = _thr(times=times, fit=None)
    assert thr.fit is not None and "poor fit" in thr.meta["fit"]["message"]
    study = _study(warnings=["batch size 4096: censored: no trial reached val_error < 0.3 within 200 steps"])
    pred = predict_critical_batch([200.0, 300.0], [400, 400], batch_size=64)
    noise = {"workload": "toy", "lr": 0.1, "momentum": 0.9, "batch_size": 64, "steps": 800, "lr_source": "default",
             "prediction": pred.as_dict(), "trajectory": []}
    rep = build_report(study, thr, noise=noise, comm=COMM)
    text = "\n".join(rep.warnings)
    assert "step-time fit t(B) = t0 + B/X: " in text and "poor fit" in text
    assert "batch size 4096: censored" in text
    assert "noise scale was measured at lr 0.1 (default)" in text
    md = render_markdown(rep)
    assert "poor fit" in md and "settings from: default" in md and "95% CI" in md
    noise["prediction_b_noise"] = {**pred.as_dict(), "B_crit": 128.0}
    noise["hessian_noise"] = {"b_noise": 120.0}
    rep = build_report(study, thr, noise=noise)
    assert rep.numbers["predicted_b_crit_b_noise"] == 128.0 and rep.numbers["ratio_b_noise_predicted_measured"] == 0.5
    assert "Predicted B_crit from B_noise (Hessian-aware) | 128 (/ measured 0.5)" in render_markdown(rep)
    noise["lr_source"] = "study best trial"
    assert not any("noise scale was measured" in w for w in build_report(study, thr, noise=noise).warnings)


def test_load_study_reads_the_seed_median_and_skips_unmeasured_points(tmp_path):
    summary = {"schema": "fastsgd.steps_to_result/2", "workload": "toy",
               "per_batch_size": [
                   {"batch_size": 8, "steps": 1500, "steps_median": 1700.0, "status": "measured"},
                   {"batch_size": 32, "steps": 450, "steps_median": 480.0, "status": "measured"},
                   {"batch_size": 128, "steps": None, "steps_median": None, "status": "censored",
                    "steps_lower_bound": 400}],
               "fit": None, "fit_refused": "no S(B) fit: ...", "warnings": ["batch size 128: censored: ..."]}
    (tmp_path / "study_summary.json").write_text(json.dumps(summary))
    st = load_study(str(tmp_path))
    assert st.steps == [1700.0, 480.0, None] and st.meta["status"][128] == "censored"
    assert st.meta["fit_refused"] == "no S(B) fit: ..." and st.meta["warnings"]
    assert st.fit is None                                  # the refusal is not undone by refitting here
    rep = build_report(st, _thr())
    assert any("no S(B) fit: ..." in w for w in rep.warnings)
