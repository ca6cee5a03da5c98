"""fastsgd.study.render draws without touching matplotlib's global state: no pyplot import,
no backend switch, no figures left in pyplot's registry."""
import subprocess
import sys

CODE = r"""
import sys
import matplotlib
matplotlib.use("svg")           # the caller's choice, which drawing must not change
from fastsgd.study import render
from fastsgd.study.combine.time_to_result import StepsCurve, StepTimeCurve, StudyData, ThroughputData, combine
from fastsgd.study.combine.whatif import CommModel, what_if

steps, time = StepsCurve(50.0, 50.0 * 256), StepTimeCurve(0.01, 1600.0)
study = StudyData([4, 16, 64, 256], [float(steps.steps(b)) for b in (4, 16, 64, 256)])
thr = ThroughputData([1, 8, 64, 512], [float(time.time(b)) for b in (1, 8, 64, 512)])
noise = {"batch_size": 64, "steps": 800,
         "trajectory": [{"step": 400, "b_simple": 200.0}, {"step": 800, "b_simple": 300.0}],
         "prediction": {"B_crit": 250.0, "S_min": 60.0, "E_min": 15000.0}}
figs = [render.time_to_result_figure(combine(study, thr), study, thr, title="t"),
        render.whatif_figure(what_if(steps, time, CommModel(1e8, 1e10, 1e-5), max_devices=64)),
        render.noise_prediction_figure(study, noise, 256.0)]
for i, fig in enumerate(figs):
    render.save(fig, sys.argv[1] + f"/{i}.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_figures_leave_global_matplotlib_state_alone(tmp_path):
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False"]
    for i in range(3):
        assert (tmp_path / f"{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
