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
    "Workload": "fastsgd.study.workloads.base",
    # hardware half (`fastsgd throughput`)
    "measure_step_times": "fastsgd.study.hardware.step_time",
    "write_results": "fastsgd.study.hardware.step_time",
    "StepTimeSweep": "fastsgd.study.hardware.step_time",
    "fit_step_time": "fastsgd.study.hardware.fit",
    "HardwareFit": "fastsgd.study.hardware.fit",
    "synthetic_workload": "fastsgd.study.workloads.synthetic",
    "make_optimizer": "fastsgd.study.optimizers",
    # algorithmic half (`fastsgd steps`)
    "StudyConfig": "fastsgd.study.steps.runner",
    "run_study": "fastsgd.study.steps.runner",
    "DataWorkload": "fastsgd.study.workloads.data",
    "make_data_workload": "fastsgd.study.workloads.data",
    "get_workload": "fastsgd.study.workloads",
    "analyze": "fastsgd.study.steps.analysis",
    "fit_scaling": "fastsgd.study.steps.analysis",
    "least_squares_workload": "fastsgd.study.workloads.least_squares",
    # combining them (`fastsgd report`, `fastsgd advise`)
    "GradientNoiseScale": "fastsgd.noise_scale",
    "NoiseScaleAccumulator": "fastsgd.noise_scale",
    "predict_critical_batch": "fastsgd.study.combine.noise_prediction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastsgd.study' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
