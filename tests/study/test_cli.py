"""The `fastsgd` command: subcommands, bench/ wrappers, a user's own workload, `advise` end to end,
and progress output that fits where it runs."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from fastsgd.study.cli import COMMANDS, run_command
from fastsgd.study.progress import Progress, progress_mode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The subcommands run in this process set torch's thread count (--threads 1); the fixture restores it after
# the module, so later test modules run as they would alone.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A user's own workload: a linearly separable 2-class problem an MLP learns in a few dozen steps.
USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn
    from fastsgd.study import Workload

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g)
        return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()

    X, Y = _data(2048, 0)
    XV, YV = _data(512, 1)

    def sample_batch(batch_size, generator, device):
        idx = torch.randint(0, len(X), (batch_size,), generator=generator)
        return X[idx].to(device), Y[idx].to(device)

    def evaluate(model, device):
        with torch.no_grad():
            pred = model(XV.to(device)).argmax(1)
        return {"val_error": (pred != YV.to(device)).float().mean().item()}

    def make_workload():
        return Workload(name="toy-separable", make_model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                                             nn.Linear(16, 2)),
                        sample_batch=sample_batch, loss=nn.functional.cross_entropy, evaluate=evaluate,
                        goal_metric="val_error", goal=0.1, info={"train_size": len(X)})

    def no_goal():
        w = make_workload()
        w.goal = None
        return w

    def not_a_workload():
        return 42
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "toy_user_workload.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    yield "toy_user_workload"
    sys.modules.pop("toy_user_workload", None)


def test_console_script_lists_every_subcommand():
    exe = shutil.which("fastsgd")
    assert exe is not None, "the `fastsgd` console script must be installed by `pip install .`"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("script, command", [("throughput.py", "throughput"), ("steps_to_result.py", "steps"),
                                             ("predict_critical_batch.py", "noise"), ("report.py", "report")])
def test_bench_scripts_are_the_subcommands(script, command, capsys):
    spec = importlib.util.spec_from_file_location(f"bench_{command}", os.path.join(ROOT, "bench", script))
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    with pytest.raises(SystemExit) as exc:
        wrapper.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: bench/{script}")
    own_options = {a.option_strings[0] for a in _subparser(command)._actions if a.option_strings}
    assert own_options and all(f"{o} " in text or f"{o}\n" in text or f"{o}," in text for o in own_options)


def _subparser(command):
    from fastsgd.study.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_throughput_on_a_user_workload(user_module, tmp_path, capsys):
    out = tmp_path / "tp"
    rc = run_command("throughput", ["--workload", f"{user_module}:make_workload", "--batch-sizes", "1,2,4",
                                    "--steps", "2", "--warmup", "0", "--time-budget", "0", "--threads", "1",
                                    "--quiet", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "throughput.json").read_text())
    assert doc["meta"]["workload"]["name"] == "toy-separable"
    assert [r["batch_size"] for r in doc["rows"]] == [1, 2, 4]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:make", "module .no_such_module_xyz. not found"),
    ("{mod}:missing_factory", "has no attribute 'missing_factory'"),
    ("{mod}:not_a_workload", "not a (fastsgd.study.)?Workload"),
])
def test_user_workload_errors_name_the_problem(user_module, spec, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run_command("throughput", ["--workload", spec.format(mod=user_module), "--quiet", "--out", os.devnull])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_advise_refuses_a_workload_without_a_goal_before_measuring(user_module, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_command("advise", ["--workload", f"{user_module}:no_goal", "--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    assert "has no goal" in capsys.readouterr().err
    assert not (tmp_path / "a").exists(), "nothing may be measured or written before the check"


def test_advise_end_to_end_on_a_user_workload(user_module, tmp_path):
    """The whole command in a subprocess whose output is a pipe: lines per batch size, no bar redraws."""
    out = tmp_path / "advice"
    proc = subprocess.run([sys.executable, "-m", "fastsgd.study.cli", "advise", "--workload",
                           f"{user_module}:make_workload", "--batch-sizes", "4..64", "--time-budget", "0.05",
                           "--threads", "1", "--lr", "0.2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "FASTSGD_PROGRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "\r" not in proc.stdout, "no progress-bar redraws in a pipe"
    for b in (4, 8, 16, 32, 64):
        assert f"batch size {b}:" in proc.stderr
    doc = json.loads((out / "advise.json").read_text())
    best = doc["numbers"]["recommended batch size"]
    assert int(best) in (4, 8, 16, 32, 64), "the recommendation stays inside the timed range"
    rows = {r["batch_size"]: r for r in doc["time_to_result"]}
    assert min(rows.values(), key=lambda r: r["time_to_result_s"])["batch_size"] == int(best)
    measured = {r["batch_size"]: r["step_time_s"]
                for r in json.loads((out / "throughput" / "throughput.json").read_text())["rows"]}
    for r in rows.values():  # T(B) = S(B) x measured t(B)
        s = doc["steps_curve"]["S_min"] + doc["steps_curve"]["E_min"] / r["batch_size"]
        assert r["time_to_result_s"] == pytest.approx(s * measured[r["batch_size"]], rel=1e-9)
    assert doc["steps_curve"]["source"] == "predicted (noise scale)"
    assert any("predicted from the noise scale at lr 0.2" in c for c in doc["caveats"])
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"Train toy-separable at batch size {best}:"), last
    assert (out / "advise.md").read_text().startswith("# Batch size advice: toy-separable")


# ---- progress output ---------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    monkeypatch.delenv("FASTSGD_PROGRESS", raising=False)
    assert progress_mode(io.StringIO()) == "lines"
    assert progress_mode(_Tty()) == "bar"
    assert progress_mode(_Tty(), enabled=False) == "off"
    monkeypatch.setenv("FASTSGD_PROGRESS", "lines")
    assert progress_mode(_Tty()) == "lines"
    monkeypatch.setenv("FASTSGD_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="FASTSGD_PROGRESS='sometimes'"):
        progress_mode(_Tty())


def test_progress_lines_mode_prints_only_lines(monkeypatch):
    monkeypatch.delenv("FASTSGD_PROGRESS", raising=False)
    stream = io.StringIO()
    with Progress(3, unit="batch size", stream=stream) as p:
        for b in (1, 2, 4):
            for step in range(100):
                p.status(f"B={b} step {step}")
            p.advance()
            p.line(f"batch size {b}: done")
    assert stream.getvalue().splitlines() == ["batch size 1: done", "batch size 2: done", "batch size 4: done"]
