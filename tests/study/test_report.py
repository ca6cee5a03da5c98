"""bench/report.py renders from small synthetic inputs in the documented file formats."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from fastsgd.study.combine.noise_prediction import predict_critical_batch
from fastsgd.study.combine.report import build_report, render_markdown
from fastsgd.study.combine.time_to_result import StepsCurve, StepTimeCurve, StudyData, ThroughputData

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = StepsCurve(50.0, 50.0 * 256)     # B_crit 256
TIME = StepTimeCurve(0.01, 1600.0)       # B_hw 16 -> B* 64


def _bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "bench", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_inputs(d):
    study_b = [8, 32, 128, 512, 2048]
    summary = {"schema": "fastsgd.steps_to_result/1", "workload": "toy", "optimizer": "nesterov",
               "goal": {"metric": "val_loss", "value": 0.1},
               "per_batch_size": [{"batch_size": b, "steps": round(float(STEPS.steps(b)))} for b in study_b],
               "fit": {"S_min": 50.0, "E_min": 12800.0, "B_crit": 256.0, "B_crit_ci": [200.0, 300.0]}}
    os.makedirs(os.path.join(d, "study"))
    with open(os.path.join(d, "study", "study_summary.json"), "w") as f:
        json.dump(summary, f)
    thr_b = [1, 4, 16, 64, 256, 1024]
    thr = {"meta": {"schema": "fastsgd.throughput/1", "workload": {"name": "toy", "parameters": 250_000},
                    "environment": {"device": "test cpu"},
                    "fit": {"t0_s": 0.01, "throughput": 1600.0, "knee_batch_size": 16.0, "ok": True}},
           "rows": [{"batch_size": b, "step_time_s": float(TIME.time(b)), "energy_per_step_j": None} for b in thr_b]}
    os.makedirs(os.path.join(d, "thr"))
    with open(os.path.join(d, "thr", "throughput.json"), "w") as f:
        json.dump(thr, f)
    pred = predict_critical_batch([200.0, 300.0], [400, 400], batch_size=64)
    noise = {"schema": "fastsgd.noise_scale_run/1", "workload": "toy", "optimizer": "fastsgd-nesterov", "lr": 0.1,
             "momentum": 0.9, "batch_size": 64, "steps": 800, "prediction": pred.as_dict(),
             "trajectory": [{"step": 400, "window_steps": 400, "b_simple": 200.0},
                            {"step": 800, "window_steps": 400, "b_simple": 300.0}]}
    with open(os.path.join(d, "noise.json"), "w") as f:
        json.dump(noise, f)
    allreduce = {"meta": {"world_size": 2, "allreduce_latency_s": 2e-5, "allreduce_bandwidth_GBps": 5.0},
                 "rows": [{"provider": "bdp+fused_step", "hidden_comm": 0.5}]}
    with open(os.path.join(d, "allreduce.json"), "w") as f:
        json.dump(allreduce, f)
    return pred


def test_report_cli_renders_markdown_and_pngs(tmp_path, capsys):
    pred = _write_inputs(str(tmp_path))
    out = tmp_path / "out"
    rc = _bench_report().main(["--study", str(tmp_path / "study"), "--throughput", str(tmp_path / "thr"),
                               "--noise", str(tmp_path / "noise.json"), "--allreduce", str(tmp_path / "allreduce.json"),
                               "--max-devices", "64", "--note", "synthetic inputs", "--out", str(out)])
    assert rc == 0
    md = (out / "report.md").read_text()
    # the three figures are linked by relative path and are PNG files next to report.md
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["noise_prediction.png", "time_to_result.png", "whatif.png"]
    for name in links:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.html"))
    # the headline rows carry the values the synthetic curves imply: B_crit 256, B_hw 16, B* = sqrt(256 x 16)
    ratio = pred.b_crit / 256.0
    assert "| Measured B_crit (study fit E_min/S_min) | 256 (95% CI 200..300) |" in md
    assert "| Hardware knee B_hw = t0 X | 16 |" in md
    assert "| B* = sqrt(B_crit B_hw) | 64 (95% CI 56.6..69.3, t(B) fit held fixed) |" in md  # sqrt(200 x 16)..sqrt(300 x 16)
    assert f"| Predicted B_crit (noise scale) | {pred.b_crit:.3g} |" in md
    assert f"| Predicted / measured B_crit | {ratio:.3g} |" in md
    # the noise-scale comparison: predicted steps at B = 8 from the run's S(B)
    assert f"| 8 | {round(float(STEPS.steps(8)))} | {float(pred.steps(8)):.3g} |" in md
    assert "| batch_size | steps | step_time_s |" in md
    assert "| devices | global_batch |" in md
    assert "planning model, not a promise" in md
    assert "synthetic inputs" in md
    numbers = json.loads((out / "report.json").read_text())["numbers"]
    assert numbers["b_star"] == pytest.approx(64.0) and numbers["ratio_predicted_measured"] == pytest.approx(ratio)
    assert "b_star" in capsys.readouterr().out


def test_report_without_noise_or_comm_says_what_is_missing():
    study = StudyData([16, 256], [float(STEPS.steps(16)), float(STEPS.steps(256))], STEPS, {"workload": "a"})
    thr = ThroughputData([16, 256], [float(TIME.time(16)), float(TIME.time(256))], fit=TIME, meta={"workload": "b"})
    rep = build_report(study, thr)
    md = render_markdown(rep)
    assert "no what-if table" in md
    assert any("differ" in w for w in rep.warnings)
    assert "| Predicted B_crit (noise scale) | n/a |" in md
