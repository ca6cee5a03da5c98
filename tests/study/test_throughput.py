"""Step time against batch size: the timing loop, the memory stop, the t(B) fit,
the results schema, the plot, the command line, and the model zoo."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastsgd.study import render
from fastsgd.study.hardware.energy import EnergyMeter, PowerSampler, trapezoid_energy
from fastsgd.study.hardware.fit import fit_step_time
from fastsgd.study.hardware.step_time import RECORD_KEYS, measure_step_times, write_results
from fastsgd.study.optimizers import OPTIMIZERS, implementation, make_optimizer, parse_optimizer_spec
from fastsgd.study.workloads.synthetic import WORKLOADS, synthetic_workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "throughput.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_mlp():
    return synthetic_workload("mlp", in_features=16, hidden=(32,), num_classes=4)


@pytest.fixture(scope="module")
def tiny_sweep():
    return measure_step_times(tiny_mlp(), [1, 2, 4, 8], optimizer="torch-sgd", warmup=1, steps=3)


# ---- the timing loop ------------------------------------------------------------------------------------------
def test_records_are_complete_and_sane(tiny_sweep):
    records = tiny_sweep.records
    assert [r["batch_size"] for r in records] == [1, 2, 4, 8]
    seen = 0
    for r in records:
        assert tuple(r) == RECORD_KEYS
        assert r["warmup_steps"] == 1 and r["steps"] == 3
        seen += r["batch_size"] * (r["warmup_steps"] + r["steps"])
        assert r["examples_seen"] == seen, "examples seen must count every trained example, warm-up included"
        for key in ("step_time_s", "step_time_q20_s", "step_time_q80_s", "fwd_bwd_time_s", "optimizer_time_s"):
            assert r[key] > 0, f"{key} = {r[key]} at B={r['batch_size']}"
        assert r["step_time_q20_s"] <= r["step_time_s"] <= r["step_time_q80_s"], r
        assert r["examples_per_s"] == pytest.approx(r["batch_size"] / r["step_time_s"])
        assert r["peak_memory_bytes"] > 0
        # no GPU here: the energy columns say why instead of failing
        assert r["energy_note"].startswith("n/a (") and "cpu" in r["energy_note"]
        assert r["power_w"] is None and r["energy_per_step_j"] is None and r["energy_per_example_j"] is None
    assert all(a["examples_seen"] < b["examples_seen"] for a, b in zip(records, records[1:]))
    assert tiny_sweep.stopped is None and tiny_sweep.largest_fit == 8
    assert tiny_sweep.settings["implementation"] == "torch default"


def test_time_budget_adds_steps_up_to_max_steps():
    sweep = measure_step_times(tiny_mlp(), [2], optimizer="torch-sgd", warmup=0, steps=2, time_budget_s=2.0,
                               max_steps=5)
    assert sweep.records[0]["steps"] == 5, "a sub-millisecond step repeated for up to 2 s must reach max_steps"


def test_progress_reports_every_step():
    events = []
    measure_step_times(tiny_mlp(), [1, 4], optimizer="torch-sgd", warmup=1, steps=2,
                       progress=lambda e, b, n: events.append((e, b, n)))
    assert events == [("start", 1, 0), ("step", 1, 1), ("step", 1, 2), ("done", 1, 2),
                      ("start", 4, 0), ("step", 4, 1), ("step", 4, 2), ("done", 4, 2)]


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": []}, "batch_sizes is empty"),
    ({"batch_sizes": [4, 0]}, "Invalid batch size: 0"),
    ({"steps": 0}, "Invalid steps"),
    ({"warmup": -1}, "Invalid warmup"),
    ({"memory_limit_gb": 0}, "Invalid memory_limit_gb"),
    ({"time_budget_s": -1.0}, "Invalid time_budget_s"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "meta"}, "device"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = {"batch_sizes": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_step_times(tiny_mlp(), args.pop("batch_sizes"), optimizer="torch-sgd", **args)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the CPU memory probe reads /proc (Linux)")
def test_memory_limit_stops_the_sweep_at_the_last_good_batch_size():
    # 2**18 float32 features: every example is 1 MiB of input, so memory grows ~1 MiB per example and a
    # limit 200 MB above the current use must stop the sweep well before B=1024 (1 GiB of inputs alone).
    workload = synthetic_workload("mlp", in_features=2 ** 18, hidden=(8,), num_classes=2)
    sizes = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    limit = _rss_bytes() + 200e6
    sweep = measure_step_times(workload, sizes, optimizer="torch-sgd", warmup=1, steps=1,
                               memory_limit_gb=limit / 1e9)
    assert sweep.stopped is not None, "the sweep should have stopped before B=1024"
    ran = [r["batch_size"] for r in sweep.records]
    assert ran == sizes[:len(ran)] and sweep.largest_fit == ran[-1] >= 16
    assert sweep.stopped["batch_size"] in sizes and sweep.stopped["batch_size"] <= 512
    assert "memory limit" in sweep.stopped["reason"]
    if sweep.stopped["estimated_peak_bytes"] is not None:  # stopped before running it, from the estimate
        assert sweep.stopped["batch_size"] == sizes[len(ran)]
        assert sweep.stopped["estimated_peak_bytes"] > sweep.settings["memory_limit_bytes"]
    peaks = [r["peak_memory_bytes"] for r in sweep.records]
    assert peaks[-1] > peaks[0], "peak memory must grow with the batch size here"


def test_limit_below_current_use_runs_nothing():
    sweep = measure_step_times(tiny_mlp(), [1, 2], optimizer="torch-sgd", memory_limit_gb=1e-3)
    assert sweep.records == [] and sweep.largest_fit is None
    assert sweep.stopped["batch_size"] == 1 and "memory limit" in sweep.stopped["reason"]
    assert not sweep.fit.ok and "at least two" in sweep.fit.message


# ---- the fit --------------------------------------------------------------------------------------------------
def test_fit_recovers_t0_and_throughput_from_noisy_times():
    rng = np.random.default_rng(0)
    t0, x = 3e-3, 4000.0
    b = 2.0 ** np.arange(11)
    t = (t0 + b / x) * np.exp(rng.normal(0, 0.05, b.size))
    fit = fit_step_time(b, t)
    assert fit.ok and fit.message == ""
    assert fit.t0_s == pytest.approx(t0, rel=0.1)
    assert fit.throughput == pytest.approx(x, rel=0.1)
    assert fit.knee_batch_size == pytest.approx(t0 * x, rel=0.2)
    assert fit.r2 > 0.95 and fit.max_abs_rel_residual < 0.2 and len(fit.rel_residuals) == b.size


def test_fit_shrugs_off_one_outlier():
    b = 2.0 ** np.arange(10)
    t = 2e-3 + b / 1000.0
    t[3] *= 4  # one step time disturbed by another process
    fit = fit_step_time(b, t)
    assert fit.t0_s == pytest.approx(2e-3, rel=0.1) and fit.throughput == pytest.approx(1000.0, rel=0.1)
    assert "poor fit" in fit.message and "B=8" in fit.message


def test_fit_degenerate_data_explains_itself():
    one = fit_step_time([64], [0.01])
    assert not one.ok and "at least two" in one.message
    negative = fit_step_time([8, 16, 32, 64], [b / 1000 - 2e-3 for b in (8, 16, 32, 64)])
    assert negative.t0_s == 0.0 and negative.knee_batch_size == 0.0 and "negative" in negative.message
    flat = fit_step_time([1, 2, 4, 8], [0.01] * 4)
    assert flat.throughput is None and "does not grow" in flat.message
    with pytest.raises(ValueError, match="step times must be positive"):
        fit_step_time([1, 2], [0.01, 0.0])
    with pytest.raises(ValueError, match="equal length"):
        fit_step_time([1, 2], [0.01])


# ---- results files and plot -----------------------------------------------------------------------------------
def test_results_json_schema_is_stable(tiny_sweep, tmp_path):
    paths = write_results(tiny_sweep, str(tmp_path))
    with open(paths["json"]) as f:
        doc = json.load(f)
    assert set(doc) == {"meta", "rows"}
    meta = doc["meta"]
    assert set(meta) == {"schema", "workload", "settings", "environment", "fit", "stopped", "largest_fit"}
    assert meta["schema"] == "fastsgd.throughput/1"
    assert set(meta["workload"]) == {"name", "parameters", "info"}
    assert set(meta["settings"]) == {
        "optimizer", "implementation", "device", "warmup", "steps", "time_budget_s", "max_steps", "lr",
        "weight_decay", "ghost_bn", "batch_sizes", "memory_limit_bytes", "memory_method", "energy_method",
        "seed", "threads"}
    assert set(meta["fit"]) == {"t0_s", "throughput", "knee_batch_size", "r2", "rel_residuals",
                                "max_abs_rel_residual", "n_points", "method", "message", "ok"}
    assert {"device", "torch", "triton", "fastsgd", "date", "commit"} <= set(meta["environment"])
    assert meta["largest_fit"] == 8 and meta["stopped"] is None
    assert [set(r) for r in doc["rows"]] == [{
        "batch_size", "warmup_steps", "steps", "step_time_s", "step_time_q20_s", "step_time_q80_s",
        "fwd_bwd_time_s", "optimizer_time_s", "examples_per_s", "examples_seen", "peak_memory_bytes",
        "power_w", "gpu_util_pct", "energy_per_step_j", "energy_per_example_j", "energy_note"}] * 4
    with open(paths["csv"]) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 4 and "step_time_s" in lines[0] and "workload" in lines[0]


def test_plot_is_a_png(tiny_sweep, tmp_path):
    path = render.save(render.throughput_figure(tiny_sweep.records, tiny_sweep.fit, title="tiny"),
                       str(tmp_path / "throughput.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


# ---- the command line -----------------------------------------------------------------------------------------
def _run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, "--threads", "1", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "tp"
    proc = _run_cli("--model", "mlp", "--batch-sizes", "1,2,4", "--steps", "2", "--warmup", "1",
                    "--time-budget", "0", "--optimizer", "torch-sgd-foreach", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("throughput.json", "throughput.csv", "throughput.png"):
        assert (out / name).is_file(), name
    assert "batch" in proc.stdout and "Fit  t(B) = t0 + B/X" in proc.stdout
    assert f"Wrote {out / 'throughput.png'}" in proc.stdout
    with open(out / "throughput.json") as f:
        doc = json.load(f)
    assert [r["batch_size"] for r in doc["rows"]] == [1, 2, 4]
    assert doc["meta"]["settings"]["implementation"] == "torch foreach"


def load_cli():
    spec = importlib.util.spec_from_file_location("throughput_cli", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0..4"], "invalid batch sizes"),
    (["--optimizer", "torch-sgd:cpu"], "fastsgd optimizers only"),
    (["--model", "nonesuch"], "Unknown workload"),
    (["--model", "mlp", "--seq-len", "8"], "--seq-len does not apply"),
    (["--model", "mlp", "--warmup", "-1"], "Invalid warmup"),
    (["--model", "mlp", "--ghost-bn", "4"], "has no batch norm"),
    (["--model", "mlp", "--device", "cpu", "--optimizer", "fastsgd-sgd:cuda"],
     "backend 'cuda' (is not available|does not support)"),
])
def test_cli_rejects_bad_input_with_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main([*args, "--quiet", "--out", os.devnull])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_parse_batch_sizes():
    from fastsgd.study.cli.args import batch_sizes
    assert batch_sizes("1..512") == [2 ** k for k in range(10)]
    assert batch_sizes("3..20") == [4, 8, 16]
    assert batch_sizes("24, 8,100") == [8, 24, 100]
    assert batch_sizes("8..32,100,16") == [8, 16, 32, 100]
    for bad in ("0..8", "9..15", "8..4", "a,b", "", "8,-2"):
        with pytest.raises(Exception, match="invalid batch sizes"):
            batch_sizes(bad)


# ---- workloads, optimizers, ghost batch norm, energy ----------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in WORKLOADS if ":" not in n])
def test_every_zoo_model_builds_and_trains_one_step(name):
    workload = synthetic_workload(name)
    torch.manual_seed(0)
    model = workload.make_model()
    x, y = workload.sample_batch(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    out = model(x)
    expected = workload.info.get("num_classes") or workload.info["vocab_size"]
    assert out.shape[0] == 2 and out.shape[-1] == expected
    loss = workload.loss(out, y)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_workload_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown workload 'resnet9'.*simple-cnn"):
        synthetic_workload("resnet9")
    with pytest.raises(ValueError, match="Unknown option.*width.*valid: in_features"):
        synthetic_workload("mlp", width=3)
    for package in ("torchvision", "timm"):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ValueError, match=f"needs the {package} package"):
                synthetic_workload(f"{package}:resnet50")


def test_transformer_options_set_the_example_shape():
    workload = synthetic_workload("transformer", seq_len=16, vocab_size=50)
    x, y = workload.sample_batch(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape == (3, 16) and int(x.max()) < 50
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one token"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_spec_builds_and_steps(name):
    model = torch.nn.Linear(4, 3)
    opt = make_optimizer(name, model.parameters(), lr=0.1, weight_decay=1e-4)
    before = model.weight.detach().clone()
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight.detach())
    assert implementation(opt)


def test_optimizer_spec_errors():
    assert parse_optimizer_spec("fastsgd-lars:reference") == ("fastsgd-lars", "reference")
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        parse_optimizer_spec("adam")
    with pytest.raises(ValueError, match="Invalid backend"):
        parse_optimizer_spec("fastsgd-sgd:bogus")
    with pytest.raises(ValueError, match="fastsgd optimizers only"):
        parse_optimizer_spec("torch-sgd-fused:cpu")
    opt = make_optimizer("fastsgd-nesterov:reference", torch.nn.Linear(2, 2).parameters())
    assert implementation(opt) == "fastsgd backend reference"


def test_ghost_bn_needs_batch_norm_and_the_converter():
    with pytest.raises(ValueError, match="has no batch norm"):
        measure_step_times(tiny_mlp(), [2], optimizer="torch-sgd", ghost_bn=2)
    try:
        from fastsgd.nn import convert_ghost_batch_norm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="convert_ghost_batch_norm"):
            measure_step_times(synthetic_workload("resnet8"), [4], optimizer="torch-sgd", ghost_bn=2)
    else:
        sweep = measure_step_times(synthetic_workload("resnet8"), [4], optimizer="torch-sgd", warmup=0, steps=1,
                                   ghost_bn=2)
        assert sweep.settings["ghost_bn"] == 2 and sweep.records[0]["step_time_s"] > 0


def test_power_sampler_integrates_power():
    sampler = PowerSampler(lambda: (50.0, 80.0), interval_s=0.01)
    sampler.start()
    start = time.perf_counter()
    time.sleep(0.2)
    reading = sampler.stop()
    elapsed = time.perf_counter() - start
    assert reading.samples >= 3 and reading.power_w == 50.0 and reading.util_pct == 80.0
    assert reading.energy_j == pytest.approx(50.0 * elapsed, rel=0.2)
    assert trapezoid_energy([0.0, 1.0, 3.0], [10.0, 20.0, 20.0]) == pytest.approx(15.0 + 40.0)


def test_energy_meter_without_gpu_says_why():
    meter = EnergyMeter("cpu")
    assert "NVML" in meter.unavailable_reason and "cpu" in meter.unavailable_reason
    with pytest.raises(RuntimeError, match="energy cannot be measured"):
        with meter.measure():
            pass
