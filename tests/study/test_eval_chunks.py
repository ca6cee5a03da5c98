"""Evaluations are stored in chunks per trial (a handful of rows, not one per evaluation), read back in
step order, and studies stored in the one-attr-per-evaluation layout still read."""
import math

import pytest

from fastsgd.study.steps import storage as storage_module
from fastsgd.study.steps.analysis import BUDGET
from fastsgd.study.steps.storage import EVAL_PREFIX, EVALS_PREFIX, StudyStorage
from fastsgd.study.steps.trials import TrialResult

POINT = {"index": 0, "point": {"lr": 0.1}, "hparams": {"lr": 0.1, "momentum": 0.9}, "seed": 3}


def one_trial(tmp_path):
    store = StudyStorage(str(tmp_path / "study.db"), "w/nesterov/tuned", {"seed": 0})
    study = store.batch_study(16, 100)
    store.enqueue(study, [POINT])
    (trial, spec), = store.claim(study, 1)
    return store, study, trial, spec


def stored_keys(store, prefix):
    (study,) = store.batch_studies().values()
    (t,) = study.get_trials(deepcopy=False)
    return sorted(k for k in t.user_attrs if k.startswith(prefix))


def metrics_at(step):
    return {"val_error": 1.0 / (step + 1), "val_loss": math.nan if step == 7 else 2.0 - step / 100}


def test_a_trials_evaluations_are_one_chunk_written_at_its_end(tmp_path):
    store, study, trial, spec = one_trial(tmp_path)
    steps = [0, 1, 2, 4, 7, 12]
    for s in steps:
        store.record_eval(trial, s, metrics_at(s))
    assert stored_keys(store, EVALS_PREFIX) == []  # buffered: nothing written yet
    store.finish(study, trial, TrialResult(spec=spec, outcome=BUDGET, end_step=12))
    assert stored_keys(store, EVALS_PREFIX) == [f"{EVALS_PREFIX}0000000"]
    (rec,) = store.records(16)
    assert rec.steps == steps
    assert rec.metrics["val_error"] == [metrics_at(s)["val_error"] for s in steps]
    assert math.isnan(rec.metrics["val_loss"][4]) and rec.metrics["val_loss"][5] == 2.0 - 12 / 100


def test_a_long_running_trial_is_written_in_chunks_that_read_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv(storage_module.FLUSH_ENV, "0")  # every evaluation is "old enough"
    store, study, trial, spec = one_trial(tmp_path)
    for s in (0, 3, 9):
        store.record_eval(trial, s, metrics_at(s))
    # written while the trial still runs: a dead process leaves them for the record of its interrupted trial
    assert stored_keys(store, EVALS_PREFIX) == [f"{EVALS_PREFIX}{s:07d}" for s in (0, 3, 9)]
    (rec,) = store.records(16)
    assert rec.outcome == "running" and rec.steps == [0, 3, 9]
    assert rec.metrics["val_error"] == [1.0, 0.25, 0.1]


def test_studies_stored_one_attr_per_evaluation_still_read(tmp_path):
    store, study, trial, spec = one_trial(tmp_path)
    for s in (5, 0, 2):  # the old layout: "eval:<step>" = {metric: value, "t": time}
        store.storage.set_trial_user_attr(trial._trial_id, f"{EVAL_PREFIX}{s:07d}", dict(metrics_at(s), t=1.0))
    store.finish(study, trial, TrialResult(spec=spec, outcome=BUDGET, end_step=5))
    (rec,) = store.records(16)
    assert rec.steps == [0, 2, 5] and set(rec.metrics) == {"val_error", "val_loss"}
    assert rec.metrics["val_loss"] == [2.0, 1.98, 1.95]


def test_a_bad_flush_interval_is_refused_when_the_storage_opens(tmp_path, monkeypatch):
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(storage_module.FLUSH_ENV, bad)
        with pytest.raises(ValueError, match="FASTSGD_EVAL_FLUSH_SECONDS=.*seconds >= 0"):
            StudyStorage(str(tmp_path / "study.db"), "w/nesterov/tuned", {"seed": 0})
    assert not (tmp_path / "study.db").exists()
