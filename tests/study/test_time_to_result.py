"""Time to result (combination, B*), the critical-batch prediction and the what-if model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastsgd.study import render
from fastsgd.study.combine.noise_prediction import predict_critical_batch
from fastsgd.study.combine.time_to_result import (
    StepsCurve,
    StepTimeCurve,
    StudyData,
    ThroughputData,
    combine,
    interpolate_loglog,
    load_study,
    load_throughput,
    optimal_batch_size,
    time_to_result_table,
)
from fastsgd.study.combine.whatif import CommModel, load_comm_model, step_time, what_if, whatif_table

STEPS = StepsCurve(s_min=50.0, e_min=50.0 * 256)      # B_crit = 256
TIME = StepTimeCurve(t0=0.01, throughput=1600.0)       # B_hw = 16


@pytest.mark.parametrize("steps,hw", [(STEPS, TIME), (StepsCurve(7.0, 3000.0), StepTimeCurve(0.2, 50.0))])
def test_b_star_minimises_fitted_time_to_result(steps, hw):
    grid = np.geomspace(1e-2, 1e7, 400_001)
    t = steps.steps(grid) * hw.time(grid)
    b_num = grid[np.argmin(t)]
    b_star = optimal_batch_size(steps, hw)
    assert b_star == pytest.approx(math.sqrt(steps.b_crit * hw.b_hw))
    assert b_num == pytest.approx(b_star, rel=1e-3)
    t_closed = (math.sqrt(steps.s_min * hw.t0) + math.sqrt(steps.e_min / hw.throughput)) ** 2
    assert float(steps.steps(b_star) * hw.time(b_star)) == pytest.approx(t_closed)


def test_interpolate_loglog_is_exact_on_power_laws_and_none_outside():
    xs = [1, 4, 16]
    ys = [3 * x ** 0.7 for x in xs]
    assert interpolate_loglog(xs, ys, 8) == pytest.approx(3 * 8 ** 0.7)
    assert interpolate_loglog(xs, ys, 32) is None


def _synthetic():
    study_b = [8, 32, 128, 512, 2048]
    study = StudyData(study_b, [float(STEPS.steps(b)) for b in study_b] + [], STEPS)
    thr_b = [1, 4, 16, 64, 256, 1024]
    thr = ThroughputData(thr_b, [float(TIME.time(b)) for b in thr_b],
                         energy_per_step=[2.0 * float(TIME.time(b)) for b in thr_b], fit=TIME)
    return study, thr


def test_combine_on_synthetic_curves():
    study, thr = _synthetic()
    res = combine(study, thr)
    by_b = {r["batch_size"]: r for r in res.rows}
    assert by_b[8]["step_time_source"] == "interpolated"
    assert by_b[2048]["step_time_source"] == "fit (extrapolated)"
    for _b, r in by_b.items():
        assert r["time_to_result_s"] == pytest.approx(r["steps"] * r["step_time_s"])
        # energy = 2 W x step time here, so energy to result = 2 x time to result
        if r["step_time_source"] != "fit (extrapolated)":
            assert r["energy_to_result_j"] == pytest.approx(2 * r["time_to_result_s"], rel=0.15)
    assert by_b[512]["step_time_s"] == pytest.approx(float(TIME.time(512)), rel=0.1)   # log-log between 256, 1024
    assert res.b_crit == pytest.approx(256) and res.b_hw == pytest.approx(16) and res.b_star == pytest.approx(64)
    assert res.best_measured["batch_size"] in (32, 128)   # the measured points bracket B* = 64
    assert "time_to_result_s" in time_to_result_table(res)
    assert time_to_result_table(res, markdown=True).startswith("| batch_size")


def test_study_and_throughput_without_fits_are_fitted(tmp_path):
    study_b = [4, 16, 64, 256, 1024]
    study = StudyData(study_b, [float(STEPS.steps(b)) for b in study_b])
    assert study.fit.b_crit == pytest.approx(256, rel=1e-6)
    thr_b = [1, 8, 64, 512]
    thr = ThroughputData(thr_b, [float(TIME.time(b)) for b in thr_b])
    assert thr.fit.b_hw == pytest.approx(16, rel=1e-3)
    path = render.save(render.time_to_result_figure(combine(study, thr), study, thr), str(tmp_path / "ttr.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_loaders_read_the_documented_schemas(tmp_path):
    summary = {"schema": "fastsgd.steps_to_result/1", "workload": "w", "optimizer": "nesterov",
               "goal": {"metric": "val_error", "value": 0.4},
               "per_batch_size": [{"batch_size": 8, "steps": 1650}, {"batch_size": 64, "steps": None},
                                  {"batch_size": 512, "steps": 75}],
               "fit": {"S_min": 50.0, "E_min": 12800.0, "B_crit": 256.0}}
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study_summary.json").write_text(json.dumps(summary))
    thr = {"meta": {"schema": "fastsgd.throughput/1", "workload": {"name": "w"},
                    "environment": {"device": "cpu"}, "fit": {"t0_s": 0.01, "throughput": 1600.0}},
           "rows": [{"batch_size": 8, "step_time_s": 0.015, "energy_per_step_j": None},
                    {"batch_size": 512, "step_time_s": 0.33, "energy_per_step_j": None}]}
    (tmp_path / "thr.json").write_text(json.dumps(thr))
    study = load_study(str(tmp_path / "study"))
    assert study.steps == [1650.0, None, 75.0] and study.fit.b_crit == pytest.approx(256)
    t = load_throughput(str(tmp_path / "thr.json"))
    assert t.fit.b_hw == pytest.approx(16) and not t.has_energy
    with pytest.raises(ValueError, match="not a throughput sweep"):
        load_throughput(str(tmp_path / "study" / "study_summary.json"))
    with pytest.raises(FileNotFoundError, match="study_summary.json"):
        load_study(str(tmp_path))


# ---- prediction from the noise scale ---------------------------------------------------------------

def test_prediction_with_constant_noise_scale_recovers_the_model():
    # a run at B = 64 with a constant B_noise = 256: S(64) = S_min (1 + 4)
    pred = predict_critical_batch([256.0] * 10, [50] * 10, batch_size=64)
    assert pred.b_crit == pytest.approx(256.0)
    assert pred.s_min == pytest.approx(500 / 5)
    assert float(pred.steps(64)) == pytest.approx(500)


def test_prediction_weights_by_progress_and_drops_bad_windows():
    pred = predict_critical_batch([10.0, float("nan"), -3.0, 1000.0], [100, 100, 100, 100], batch_size=100)
    assert pred.windows_used == 2 and pred.windows_dropped == 2
    assert float(pred.steps(100)) == pytest.approx(400)    # passes through the run
    # the noisy window makes less progress per step, so it weighs less than in the plain mean
    assert pred.b_crit < pred.b_simple_mean == pytest.approx(505.0)
    with pytest.raises(ValueError, match="no window"):
        predict_critical_batch([-1.0], [10], batch_size=8)


# ---- what-if N devices -----------------------------------------------------------------------------

def test_one_device_equals_the_measured_step_time():
    comm = CommModel(grad_bytes=4e8, bandwidth=1e9, latency=1e-4, overlap=0.5)
    st = step_time(TIME, comm, 256, 1)
    assert st["step_time_s"] == pytest.approx(float(TIME.time(256))) and st["comm_s"] == 0
    res = what_if(STEPS, TIME, comm, global_batch=256, max_devices=64)
    assert res.rows[0]["step_time_s"] == pytest.approx(float(TIME.time(256)))
    assert res.rows[0]["time_to_result_s"] == pytest.approx(float(STEPS.steps(256) * TIME.time(256)))


def test_free_communication_and_no_fixed_cost_scale_perfectly():
    hw = StepTimeCurve(t0=0.0, throughput=1000.0)
    res = what_if(STEPS, hw, CommModel(grad_bytes=1e9), global_batch=4096, max_devices=4096)
    assert [r["devices"] for r in res.rows] == [2 ** k for k in range(13)]
    for r in res.rows:
        assert r["speedup"] == pytest.approx(r["devices"])
    assert res.stops_paying_off is None and res.fastest_n == 4096


def test_communication_makes_more_devices_stop_paying_off():
    comm = CommModel(grad_bytes=1e8, bandwidth=1e10, latency=5e-5, overlap=0.0)
    assert comm.allreduce_time(8) == pytest.approx(2 * 7 / 8 * 1e8 / 1e10 + 2 * 7 * 5e-5)
    res = what_if(STEPS, TIME, comm, max_devices=4096)
    assert res.stops_paying_off is not None and res.stops_paying_off < 4096
    assert res.fastest_n <= 4096
    times = [r["time_to_result_s"] for r in res.rows]
    assert min(times) < times[0]
    # full overlap behind a whole step hides everything up to the compute time
    hidden = step_time(TIME, CommModel(1e8, 1e10, 0.0, overlap=1.0, backward_fraction=1.0), 64, 8)
    assert hidden["step_time_s"] == pytest.approx(max(hidden["compute_s"], hidden["comm_s"]))
    assert "speedup" in whatif_table(res, markdown=True)


def test_whatif_bad_inputs_and_comm_json(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        CommModel(grad_bytes=1.0, overlap=1.5)
    with pytest.raises(ValueError, match="examples each"):
        step_time(TIME, CommModel(1.0), 4, 8)
    with pytest.raises(ValueError, match="not both"):
        what_if(STEPS, TIME, CommModel(1.0), global_batch=8, per_device_batch=2)
    p = tmp_path / "allreduce.json"
    p.write_text(json.dumps({"meta": {}, "rows": [{"size_bytes": 1, "bandwidth_gbps": 2.5, "latency_s": 3e-5,
                                                     "overlap_fraction": 0.6}]}))
    comm = load_comm_model(str(p), grad_bytes=1e6)
    assert (comm.bandwidth, comm.latency, comm.overlap) == (2.5e9, 3e-5, 0.6)
    assert load_comm_model(str(p), 1e6, bandwidth=1e9).bandwidth == 1e9
    # bench/allreduce.py's layout: one all-reduce at world size 2 of 4 bytes / the largest message
    p.write_text(json.dumps({"meta": {"world_size": 2, "allreduce_latency_s": 1e-4, "allreduce_bandwidth_GBps": 3.0},
                             "rows": [{"provider": "bdp", "hidden_comm": 0.1},
                                      {"provider": "bdp+fused_step", "hidden_comm": 0.5},
                                      {"provider": "bdp+fused_step", "hidden_comm": 0.7}]}))
    comm = load_comm_model(str(p), grad_bytes=1e6)
    assert comm.latency == pytest.approx(0.5e-4) and comm.bandwidth == pytest.approx(3e9)
    assert comm.overlap == pytest.approx(0.6)
    assert comm.allreduce_time(2) == pytest.approx(1e-4 + 1e6 / 3e9)   # reproduces the measurement at W = 2
    p.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="found none"):
        load_comm_model(str(p), grad_bytes=1e6)
