"""Whole studies: a tiny end-to-end run through the CLI, resume after a
simulated kill (nothing lost, nothing rerun), configuration checks, the Golmant
protocol, and on least squares a fitted B_crit between the closed-form noise
scales at the start and at the goal."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch

from fastsgd.study.steps import runner
from fastsgd.study.steps.analysis import FINAL_OUTCOMES, SCHEMA
from fastsgd.study.steps.batch_science import import_records
from fastsgd.study.steps.runner import StudyConfig, open_storage, run_study
from fastsgd.study.steps.storage import EVAL_PREFIX, EVALS_PREFIX, StudyStorage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A fixed search (no top-ups, no budget extension, no reseeds): the storage/resume tests count trials.
# keep_top=1: pruning at the best finished trial, so a resumed group prunes exactly as the uninterrupted one.
# A space where most points train, so that 4 trials reach the goal at both batch sizes.
SPACE = {"lr": {"low": 0.05, "high": 0.5, "scale": "log"}, "one_minus_momentum": {"low": 0.1, "high": 0.5, "scale": "log"}}
TINY = dict(workload="digits-mlp", optimizer="nesterov", batch_sizes=[32, 128], trials=4, max_trials=4, goal=0.1,
            budget=60, budget_cap=60, reseeds=0, keep_top=1, group_size=2, space=SPACE)
CLI_ARGS = ["--workload", "digits-mlp", "--optimizer", "nesterov", "--batch-sizes", "32,128", "--trials", "4",
            "--max-trials", "4", "--goal", "0.1", "--budget", "60", "--budget-cap", "60", "--reseeds", "0",
            "--keep-top", "1", "--group-size", "2", "--space", json.dumps(SPACE), "--no-progress"]


def by_key(records):
    return {(r.batch_size, r.trial_id): r for r in records}


def same_records(a, b):
    a, b = by_key(a), by_key(b)
    assert a.keys() == b.keys()
    for k in a:
        ra, rb = a[k], b[k]
        assert (ra.seed, ra.hparams, ra.outcome, ra.steps) == (rb.seed, rb.hparams, rb.outcome, rb.steps), k
        for m in ra.metrics:
            torch.testing.assert_close(torch.tensor(ra.metrics[m]), torch.tensor(rb.metrics[m]), rtol=1e-5,
                                       atol=1e-6, equal_nan=True)


@pytest.fixture(scope="module")
def clean_study(tmp_path_factory):
    """The tiny study run once without interruption, through the CLI, with an export."""
    spec = importlib.util.spec_from_file_location("bench_steps_to_result",
                                                  os.path.join(ROOT, "bench", "steps_to_result.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path_factory.mktemp("clean")
    assert cli.main(CLI_ARGS + ["--out", str(out), "--export", str(out / "bs")]) == 0
    return out, open_storage(StudyConfig(out=str(out), **TINY)).records()


def test_end_to_end_summary_plots_export(clean_study):
    out, records = clean_study
    summary = json.loads((out / "study_summary.json").read_text())
    assert summary["schema"] == SCHEMA and summary["goal"]["value"] == 0.1
    rows = summary["per_batch_size"]
    assert [r["batch_size"] for r in rows] == [32, 128] and all(r["trials"] == 4 for r in rows)
    assert all(r["steps"] is not None and r["steps"] <= r["max_steps"] for r in rows)
    assert rows[0]["steps"] > rows[1]["steps"]
    assert summary["fit"]["B_crit"] > 0 and set(summary["regions"]) == {"perfect_scaling_max",
                                                                        "maximal_parallelism_min"}
    for name in summary["plots"]:
        assert (out / name).stat().st_size > 1000
    assert len(records) == 8 and all(r.outcome in FINAL_OUTCOMES for r in records)
    _, back = import_records(str(out / "bs" / "digits" / "mlp" / "nesterov"))
    same_records(records, back)


class SimulatedKill(RuntimeError):
    pass


def test_resume_after_simulated_kill_loses_nothing_reruns_nothing(clean_study, tmp_path, monkeypatch):
    _, clean = clean_study
    config = StudyConfig(out=str(tmp_path), **TINY)
    real_finish = StudyStorage.finish
    finished = []

    def dying_finish(self, study, trial, result):
        if len(finished) == 3:  # the process "dies" while storing the 4th finished trial
            raise SimulatedKill()
        real_finish(self, study, trial, result)
        finished.append((result.spec.trial_id, study.user_attrs["batch_size"]))

    monkeypatch.setattr(StudyStorage, "finish", dying_finish)
    with pytest.raises(SimulatedKill):
        run_study(config, progress=False, log=lambda s: None)
    monkeypatch.setattr(StudyStorage, "finish", real_finish)

    before = {}
    for _bs, study in open_storage(config).batch_studies().items():
        for t in study.get_trials(deepcopy=False):
            before[t._trial_id] = {k: v for k, v in t.user_attrs.items() if k.startswith((EVAL_PREFIX, EVALS_PREFIX))}
    assert sum(len(v) for v in before.values()) > 0

    trained = []
    real_run_trials = runner.run_trials

    def spying_run_trials(workload, specs, settings, **kw):
        trained.extend((s.trial_id, settings.batch_size) for s in specs)
        return real_run_trials(workload, specs, settings, **kw)

    monkeypatch.setattr(runner, "run_trials", spying_run_trials)
    run_study(config, progress=False, log=lambda s: None)
    assert not set(finished) & set(trained), "finished trials were rerun"
    assert len(trained) == 8 - len(finished)

    store = open_storage(config)
    after = {t._trial_id: t for study in store.batch_studies().values() for t in study.get_trials(deepcopy=False)}
    for tid, evals in before.items():  # every evaluation written before the kill is still there
        assert evals.items() <= after[tid].user_attrs.items()
    failed = [t for t in after.values() if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all(t.user_attrs["outcome"] == "interrupted" for t in failed)
    same_records(store.records(), clean)  # the reruns reproduce the uninterrupted study exactly


def die_while_enqueueing(monkeypatch, kill):
    """Raise like a kill from the write of the ``n``-th enqueued trial of the run (``("trial", n)``) or of the
    ``n``-th stage marker (``("marker", n)``), the last write of a stage."""
    import sqlalchemy.orm
    from optuna.storages._rdb import models

    kind, n = kill
    calls = []
    if kind == "trial":
        real = optuna.storages.RDBStorage._get_prepared_new_trial

        def dying(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise SimulatedKill()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(optuna.storages.RDBStorage, "_get_prepared_new_trial", dying)
    else:
        real_add = sqlalchemy.orm.Session.add

        def dying(self, instance, *args, **kwargs):
            if isinstance(instance, models.StudyUserAttributeModel) and instance.key.startswith("enqueued:"):
                calls.append(1)
                if len(calls) == n:
                    raise SimulatedKill()
            return real_add(self, instance, *args, **kwargs)

        monkeypatch.setattr(sqlalchemy.orm.Session, "add", dying)


# ("trial", 3): in the middle of the first stage (B = 32, two of its four trials written);
# ("marker", 2): every trial of B = 128's stage written, its marker not yet (B = 32 already finished).
@pytest.mark.parametrize("kill", [("trial", 3), ("marker", 2)], ids=["mid-stage", "before-marker"])
def test_resume_after_a_kill_while_enqueueing_gives_the_uninterrupted_study(clean_study, tmp_path, monkeypatch,
                                                                            kill):
    _, clean = clean_study
    config = StudyConfig(out=str(tmp_path), **TINY)
    with monkeypatch.context() as m:
        die_while_enqueueing(m, kill)
        with pytest.raises(SimulatedKill):
            run_study(config, progress=False, log=lambda s: None)
    run_study(config, progress=False, log=lambda s: None)
    store = open_storage(config)
    for bs, study in store.batch_studies().items():
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials if t.state not in (optuna.trial.TrialState.COMPLETE,
                                                           optuna.trial.TrialState.PRUNED)] == [], bs
        keys = [(t.user_attrs["stage"], t.user_attrs["index"]) for t in trials]
        assert sorted(keys) == [("search@0", i) for i in range(4)], bs  # one stage, each trial once
    same_records(store.records(), clean)


def test_wall_seconds_total_counts_training_only(clean_study, tmp_path, monkeypatch):
    """A second run of a finished study trains nothing and adds nothing to wall_seconds_total; the total is the
    time the groups of trials took to train, so it is positive and below the first run's wall time."""
    import shutil

    out, _ = clean_study
    first = json.loads((out / "study_summary.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # the finished study (its SQLite file with the write-ahead log)
    trained = []
    monkeypatch.setattr(runner, "run_trials", lambda workload, specs, *a, **kw: trained.extend(specs))
    again = run_study(StudyConfig(out=str(copy), **TINY), progress=False, log=lambda s: None)
    assert trained == []
    assert 0 < first["wall_seconds_total"] < first["wall_seconds"]
    assert again["wall_seconds_total"] == first["wall_seconds_total"]


def finished_trials(db):
    """(batch-size study, trial number) of every finished trial in a SQLite study file.

    Finished means the trial's state is final: a process killed between writing a trial's outcome and its
    state leaves it RUNNING, to be failed and rerun by the resume. The reader never creates Optuna's schema
    (it would race the study's process creating it)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_compatibility_check=True,
                                         skip_table_creation=True)
    out = set()
    try:
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            out |= {(summary.study_name, t.number) for t in study.get_trials(deepcopy=False)
                    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)}
    finally:
        storage.engine.dispose()
    return out


def test_resume_after_sigkill(tmp_path):
    """A real kill: SIGKILL the CLI once a trial is stored, run the same command again: the trials finished
    before the kill are kept (same Optuna trial numbers), none is trained twice, the study completes."""
    # One batch size, 2 groups of 2 trials, a goal out of reach: every trial runs its whole budget.
    args = [{"32,128": "32", "0.1": "0.02"}.get(a, a) for a in CLI_ARGS]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "steps_to_result.py")] + args + ["--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "study.db"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            if db.exists():
                try:
                    if finished_trials(db):
                        break
                except Exception:  # the database is being created: look again
                    continue
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished_before = finished_trials(db)
    assert finished_before
    if len(finished_before) == 4:
        pytest.skip("the study finished before the kill landed; nothing to resume")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    records = open_storage(StudyConfig(out=str(tmp_path), **dict(TINY, batch_sizes=[32], goal=0.02))).records()
    assert len(records) == 4 and all(r.outcome in FINAL_OUTCOMES for r in records)
    finished_after = finished_trials(db)
    assert finished_before <= finished_after and len(finished_after) == 4  # none of them trained twice


def test_config_mismatch_is_refused(clean_study):
    out, _ = clean_study
    with pytest.raises(ValueError, match="different configuration.*trials"):
        open_storage(StudyConfig(out=str(out), **dict(TINY, trials=5)))


@pytest.mark.parametrize("change,msg", [
    (dict(batch_sizes=[]), "batch sizes"), (dict(trials=0), "at least one trial"),
    (dict(goal_rule="median"), "Invalid goal rule"), (dict(protocol="cubic"), "Invalid protocol"),
    (dict(protocol="linear", goal_rule="golmant"), "needs protocol 'tuned'"),
    (dict(base_batch_size=64), "not among the batch sizes"),
])
def test_bad_config_is_named(tmp_path, change, msg):
    with pytest.raises(ValueError, match=msg):
        run_study(StudyConfig(out=str(tmp_path), **dict(TINY, **change)), progress=False)


def test_golmant_protocol_scales_the_base_lr(tmp_path):
    config = StudyConfig(out=str(tmp_path), **dict(TINY, protocol="linear", trials=2, group_size=0))
    summary = run_study(config, progress=False, log=lambda s: None)
    recs = open_storage(config).records()
    base_best = summary["per_batch_size"][0]["best_hparams"]
    scaled = [r for r in recs if r.batch_size == 128]
    assert len(scaled) == 2 and len({r.seed for r in scaled}) == 2
    assert all(r.hparams["lr"] == pytest.approx(4 * base_best["lr"]) for r in scaled)
    assert all(r.hparams["momentum"] == base_best["momentum"] for r in scaled)


def test_least_squares_bcrit_between_noise_scales(tmp_path):
    from fastsgd.study.workloads.least_squares import least_squares_workload

    wl = least_squares_workload(dim=16, alpha=1.0, seed=0, goal_fraction=0.02)
    problem = wl.info["problem"]
    # noise scale at the goal, taken on the gradient-flow path e(t) = exp(-H t) e0 where the loss meets the goal
    e0 = problem.w0 - problem.w_star
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if problem.expected_loss(problem.w_star + torch.exp(-problem.h * mid) * e0) > wl.goal \
            else (lo, mid)
    at_goal = problem.b_simple(problem.w_star + torch.exp(-problem.h * hi) * e0)
    at_start = problem.b_simple(problem.w0)
    config = StudyConfig(out=str(tmp_path), workload="least-squares", optimizer="sgd",
                         batch_sizes=[1, 2, 4, 8, 16, 32, 64], trials=8,
                         space={"lr": {"low": 0.02, "high": 2.5, "scale": "log"}}, budget=500, budget_cap=500,
                         max_trials=8, reseeds=0)
    summary = run_study(config, workload=wl, progress=False, log=lambda s: None)
    b_crit = summary["fit"]["B_crit"]
    assert at_start < b_crit < at_goal, (at_start, b_crit, at_goal)


def test_golmant_goal_rule(tmp_path):
    from fastsgd.study.steps.analysis import golmant_goal

    config = StudyConfig(out=str(tmp_path), **dict(TINY, goal=None, goal_rule="golmant", trials=2, max_trials=2,
                                                        budget=40, budget_cap=40))
    summary = run_study(config, progress=False, log=lambda s: None)
    largest = [r for r in open_storage(config).records() if r.batch_size == 128]
    assert all(r.outcome in ("budget", "infeasible") and r.steps[-1] <= 40 for r in largest)  # ran without a goal
    assert summary["goal"]["rule"] == "golmant"
    assert summary["goal"]["value"] == pytest.approx(golmant_goal(largest, "val_error"))


def test_duplicate_enqueue_from_two_processes_trains_each_trial_once(tmp_path):
    url = str(tmp_path / "shared.db")
    first, second = StudyStorage(url, "x", {"k": 1}), StudyStorage(url, "x", {"k": 1})
    trials = [{"index": i, "point": {"lr": 0.1 * (i + 1)}, "hparams": {"lr": 0.1 * (i + 1), "momentum": 0.0},
               "seed": i} for i in range(3)]
    s1, s2 = first.batch_study(8, 10), second.batch_study(8, 10)
    first.enqueue(s1, trials)
    s2.set_user_attr("enqueued:search", 0)  # as if the second process checked the flag before the first set it
    second.enqueue(s2, trials)
    claimed = first.claim(s1, 10) + second.claim(s2, 10)
    assert sorted(spec.trial_id for _, spec in claimed) == [0, 1, 2]
    outcomes = [t.user_attrs.get("outcome") for t in s1.get_trials()]
    assert outcomes.count("duplicate") == 3


def test_a_backend_without_stacked_trials_is_refused_before_the_storage_is_touched(tmp_path):
    out = tmp_path / "study"
    config = StudyConfig(out=str(out), backend="triton", **TINY)
    with pytest.raises(ValueError, match="'triton' cannot step stacked trials"):
        run_study(config, progress=False, log=lambda s: None)
    assert not out.exists()  # no database, no claimed trial left RUNNING
