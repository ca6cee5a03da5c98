"""Several worker processes on one study in a real PostgreSQL database.

Two workers run the same ``bench/steps_to_result.py`` command against one
fresh database, started together (Optuna's schema creation used to kill the
second one); one is stopped (SIGSTOP) while the database shows it holding a
trial with evaluations, and killed (SIGKILL) while still stopped, so it dies
holding that trial. The other must finish the study alone, rerunning that
trial exactly once (to the same evaluations) once its heartbeat stops, and its
summary must equal a single worker's (run on SQLite, the default storage). Fixture: tests/study/conftest.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from fastsgd.study.steps.storage import stored_evaluations

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# --no-prune and one trial per group: every trial's outcome is then independent of which
# worker runs it and of what finished before, so the summaries can be compared exactly.
# A space where most points train, so that every batch size reaches the goal within the budget.
SPACE = '{"lr": {"low": 0.05, "high": 0.5, "scale": "log"}, "one_minus_momentum": {"low": 0.1, "high": 0.5, "scale": "log"}}'
STUDY = ["--workload", "digits-mlp", "--optimizer", "nesterov", "--batch-sizes", "32,128", "--trials", "3",
         "--space", SPACE, "--goal", "0.1", "--budget", "150", "--budget-cap", "150", "--max-trials", "3", "--reseeds", "0", "--group-size", "1",
         "--no-prune", "--no-progress", "--threads", "1", "--heartbeat-interval", "1", "--grace-period", "3"]
NOT_COMPARED = ("wall_seconds", "wall_seconds_total", "storage", "plots")  # where and how long, not what


def worker(out, storage=None):
    """A worker process; its output goes to ``<out>.log`` (read with :func:`log_of`)."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "steps_to_result.py"), *STUDY, "--out", str(out)]
    if storage:
        cmd += ["--storage", storage]
    env = dict(os.environ, FASTSGD_EVAL_FLUSH_SECONDS="0")  # every evaluation stored at once: a running
    with open(f"{out}.log", "w") as log:                      # trial shows its evaluations in the database
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.out = out
    return proc


def log_of(proc) -> str:
    with open(f"{proc.out}.log") as f:
        return f.read()[-4000:]


def trials_of(url):
    """{batch size: [FrozenTrial]} of the study's batch-size studies (empty before they exist)."""
    # read only: a reader that created Optuna's schema would race the workers creating it
    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
    out = {}
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if "/B" in s.study_name:
            out[int(s.study_name.rsplit("/B", 1)[1])] = optuna.load_study(
                study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
    storage.engine.dispose()
    return out


def summary(out):
    with open(os.path.join(out, "study_summary.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in NOT_COMPARED}


def held_trial(url, pid):
    """(batch size, FrozenTrial) of a trial the worker ``pid`` holds RUNNING with evaluations stored, or None."""
    import sqlalchemy.exc

    if not _schema_ready(url):
        return None
    try:
        studies = trials_of(url)
    except (sqlalchemy.exc.SQLAlchemyError, KeyError):  # the workers are still creating the schema or studies
        return None
    for bs, trials in studies.items():
        for t in trials:
            if (t.state == TrialState.RUNNING and (t.user_attrs.get("owner") or {}).get("pid") == pid
                    and evals(t)):
                return bs, t
    return None


def evals(t):
    """{step: {metric: value}} of the trial's stored evaluations."""
    return dict(stored_evaluations(t.user_attrs))


@pytest.mark.timeout(300)
def test_two_workers_one_killed_mid_trial_finish_the_study_once(postgres_url, tmp_path):
    reference = worker(tmp_path / "single")  # one worker, SQLite
    a, b = worker(tmp_path / "a", postgres_url), worker(tmp_path / "b", postgres_url)
    procs = {a.pid: a, b.pid: b}
    try:
        victim = None
        deadline = time.time() + 120
        while victim is None and time.time() < deadline:
            assert a.poll() is None or b.poll() is None, "both workers ended before one could be killed"
            for pid, proc in procs.items():
                if proc.poll() is not None or held_trial(postgres_url, pid) is None:
                    continue
                # Freeze the worker, then look again: what it holds now it still holds when it is killed
                # (a stopped process finishes nothing; the look takes far less than the 3 s grace period).
                os.kill(pid, signal.SIGSTOP)
                held = held_trial(postgres_url, pid)
                if held is None:  # it finished that trial just before it stopped: let it go on, look again
                    os.kill(pid, signal.SIGCONT)
                    continue
                os.kill(pid, signal.SIGKILL)
                victim = (proc,) + held
                break
            time.sleep(0.05)
        assert victim is not None, "no trial was seen running with evaluations"
        killed, victim_bs, held = victim
        survivor = b if killed is a else a
        assert survivor.wait(timeout=180) == 0, log_of(survivor)
        assert reference.wait(timeout=180) == 0, log_of(reference)
    finally:
        for p in (a, b, reference):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert killed.wait() == -signal.SIGKILL

    studies = trials_of(postgres_url)
    assert sorted(studies) == [32, 128]
    for bs, trials in studies.items():
        assert not [t.number for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)], bs
        assert not [t for t in trials if t.user_attrs.get("outcome") in ("duplicate", "spurious")]
        finished = {}
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                assert t.user_attrs["index"] not in finished, f"B={bs}: trial {t.user_attrs['index']} ran twice"
                finished[t.user_attrs["index"]] = t
            else:  # the only failed trial is the one the killed worker held
                assert (bs, t.number) == (victim_bs, held.number), (bs, t.number, t.state)
        assert sorted(finished) == [0, 1, 2], f"B={bs}: finished trials {sorted(finished)}"

    # The trial the killed worker held: failed as interrupted, nothing it had stored lost, and run again
    # exactly once, by the survivor, to the same evaluations.
    trials = studies[victim_bs]
    (after,) = [t for t in trials if t.number == held.number]
    assert after.state == TrialState.FAIL and after.user_attrs["outcome"] == "interrupted"
    assert after.user_attrs["owner"]["pid"] == killed.pid
    assert evals(held).items() <= evals(after).items()
    same = [t for t in trials if (t.user_attrs["index"], t.user_attrs["stage"]) ==
            (held.user_attrs["index"], held.user_attrs["stage"])]
    assert [t.number for t in same] == sorted(t.number for t in same) and same[0].number == held.number
    assert [t.state for t in same[1:]] in ([TrialState.COMPLETE], [TrialState.PRUNED]), "rerun not exactly once"
    rerun = same[1]
    assert rerun.user_attrs["owner"]["pid"] == survivor.pid and rerun.user_attrs["seed"] == held.user_attrs["seed"]
    rerun_evals = evals(rerun)
    for step, metrics in evals(held).items():
        assert rerun_evals.get(step) == metrics, f"the rerun's evaluation at step {step} differs or is missing"

    single = summary(tmp_path / "single")
    assert summary(tmp_path / ("b" if killed is a else "a")) == single
    assert single["per_batch_size"] and all(r["steps"] is not None for r in single["per_batch_size"])


def _schema_ready(url) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        return sqlalchemy.inspect(engine).has_table("trials")
    finally:
        engine.dispose()


def open_together(url):
    """Four processes create the schema, the study and one batch size's queue at the same moment."""
    code = ("import sys; from fastsgd.study.steps.storage import StudyStorage; "
            "s = StudyStorage(sys.argv[1], 'race', {'k': 1}); b = s.batch_study(8, 10); "
            "s.enqueue(b, [{'index': i, 'point': {'lr': 0.1 * i}, 'hparams': {'lr': 0.1 * i}, 'seed': i} "
            "for i in range(5)]); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(logs)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False))
    assert names == ["race/B8", "race/meta"]
    waiting = optuna.load_study(study_name="race/B8", storage=url).get_trials(deepcopy=False)
    assert sorted(t.user_attrs["index"] for t in waiting) == [0, 1, 2, 3, 4]  # enqueued once


def test_workers_starting_together_all_open_the_study(postgres_url):
    open_together(postgres_url)


def test_workers_starting_together_on_sqlite(tmp_path):
    open_together(f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the bare ask() below stands for a dying worker
def test_a_trial_whose_claim_never_completed_is_recovered(tmp_path):
    """A process that died between taking a trial from the queue and writing its owner and
    first heartbeat leaves a RUNNING trial that no heartbeat will ever mark stale."""
    from fastsgd.study.steps.storage import StudyStorage

    store = StudyStorage(str(tmp_path / "s.db"), "x", {"k": 1}, heartbeat_interval=1, grace_period=2)
    study = store.batch_study(8, 10)
    store.enqueue(study, [{"index": 0, "point": {"lr": 0.1}, "hparams": {"lr": 0.1}, "seed": 7}])
    study.ask()  # taken from the queue; the "process" dies here
    assert store.recover_stale(study) == 0  # too early: it could still be a live claim
    time.sleep(2.5)
    assert store.recover_stale(study) == 1
    ((_, spec),) = store.claim(study, 5)
    assert (spec.trial_id, spec.seed) == (0, 7)
