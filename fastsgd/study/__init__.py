"""The measuring harness: step time against batch size (hardware), steps to
result against batch size (algorithm), their product (time to result), the
critical batch size and its prediction from the gradient noise scale.

Names are imported on first use: the study pieces need optional packages
(optuna, scipy, matplotlib: ``pip install "fastsgd[study]"``) that plain
optimizer users do not.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Workload": "fastsgd.study.workload",
    # hardware half (bench/throughput.py)
    "measure_step_times": "fastsgd.study.step_time",
    "write_results": "fastsgd.study.step_time",
    "StepTimeSweep": "fastsgd.study.step_time",
    "fit_step_time": "fastsgd.study.hardware_fit",
    "HardwareFit": "fastsgd.study.hardware_fit",
    "synthetic_workload": "fastsgd.study.synthetic",
    "make_optimizer": "fastsgd.study.optimizer_factory",
    # algorithmic half (bench/steps_to_result.py)
    "StudyConfig": "fastsgd.study.runner",
    "run_study": "fastsgd.study.runner",
    "DataWorkload": "fastsgd.study.data_workloads",
    "make_data_workload": "fastsgd.study.data_workloads",
    "get_workload": "fastsgd.study.data_workloads",
    "analyze": "fastsgd.study.steps_to_result",
    "fit_scaling": "fastsgd.study.steps_to_result",
    "least_squares_workload": "fastsgd.study.least_squares",
    # combining them (bench/report.py)
    "GradientNoiseScale": "fastsgd.study.noise_scale",
    "NoiseScaleAccumulator": "fastsgd.study.noise_scale",
    "predict_critical_batch": "fastsgd.study.noise_scale",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastsgd.study' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
