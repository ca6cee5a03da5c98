"""Enqueueing a stage is all or nothing, on SQLite and on a real PostgreSQL server.

A process killed while it writes a stage's trials (simulated by an exception raised from the database
write of the k-th trial, or of the stage's marker) must leave no trial of the stage behind: otherwise
another worker trains half a stage, and a resume computes the stage from records that already hold part
of it. After the "kill", enqueueing the stage again gives exactly the stage, once.
"""
import optuna
import pytest
import sqlalchemy.orm
from optuna.storages._rdb import models
from optuna.trial import TrialState

from fastsgd.study.steps.storage import StudyStorage

N = 4
TRIALS = [{"index": i, "point": {"lr": 0.1 * (i + 1)}, "hparams": {"lr": 0.1 * (i + 1), "momentum": 0.0},
           "seed": 100 + i} for i in range(N)]


class Killed(RuntimeError):
    pass


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_url")


def die_at_trial(monkeypatch, k):
    """Raise from the database write of the k-th trial (1-based), as a kill there would stop it."""
    real = optuna.storages.RDBStorage._get_prepared_new_trial
    calls = []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise Killed(f"killed while writing trial {k}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_prepared_new_trial", dying)


def die_at_marker(monkeypatch):
    """Raise when the stage's ``enqueued:`` marker is added, after every trial was written."""
    real = sqlalchemy.orm.Session.add

    def dying(self, instance, *args, **kwargs):
        if isinstance(instance, models.StudyUserAttributeModel) and instance.key.startswith("enqueued:"):
            raise Killed("killed while writing the stage marker")
        return real(self, instance, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy.orm.Session, "add", dying)


def stage_rows(study):
    return [(t.user_attrs["index"], t.user_attrs["seed"], t.user_attrs["stage"], t.state)
            for t in study.get_trials(deepcopy=False) if "index" in t.user_attrs]


@pytest.mark.parametrize("kill", [f"trial {k}" for k in range(1, N + 1)] + ["marker"])
def test_a_stage_killed_while_enqueued_leaves_nothing_and_is_enqueued_whole_later(url, kill, monkeypatch):
    store = StudyStorage(url, "x", {"k": 1})
    study = store.batch_study(8, 10)
    with monkeypatch.context() as m:
        if kill == "marker":
            die_at_marker(m)
        else:
            die_at_trial(m, int(kill.split()[1]))
        with pytest.raises(Killed):
            store.enqueue(study, TRIALS, "search@0")
    # a fresh process on the same database sees no part of the stage, and has nothing to claim
    other = StudyStorage(url, "x", {"k": 1})
    other_study = other.batch_study(8, 10)
    assert stage_rows(other_study) == [] and other.enqueued(other_study) == {}
    assert other.claim(other_study, 10) == []
    # the resume enqueues the stage whole, once; enqueueing it again is a no-op
    assert other.enqueue(other_study, TRIALS, "search@0")
    assert not store.enqueue(study, TRIALS, "search@0")
    want = [(i, 100 + i, "search@0", TrialState.WAITING) for i in range(N)]
    assert stage_rows(other_study) == want and stage_rows(study) == want
    assert other.enqueued(other_study) == {"search@0": N}
    claimed = store.claim(study, 10)
    for t, _ in claimed:
        store.heartbeat.remove(t._trial_id)  # this test's "worker" stops here
    assert [(spec.trial_id, spec.seed) for _, spec in claimed] == [(i, 100 + i) for i in range(N)]
    assert [t.params for t, _ in claimed] == [t["point"] for t in TRIALS]  # the point as Optuna params


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the bare ask() below stands for a dying worker
def test_a_recovery_killed_halfway_leaves_the_trial_to_recover_again(url, monkeypatch):
    """Recovering a dead worker's trial marks it FAIL and enqueues it again; a kill between the two would
    leave a failed trial that nobody reruns (lost), so both are one transaction."""
    import time

    store = StudyStorage(url, "x", {"k": 1}, heartbeat_interval=1, grace_period=2)
    study = store.batch_study(8, 10)
    store.enqueue(study, TRIALS[:1])
    study.ask()  # taken from the queue by a worker that dies before writing its owner
    time.sleep(2.5)  # past the grace period
    with monkeypatch.context() as m:
        die_at_trial(m, 1)  # the re-enqueued copy is the recovery's only new trial
        with pytest.raises(Killed):
            store.recover_stale(study)
    assert [(i, state) for i, _, _, state in stage_rows(study)] == [(0, TrialState.RUNNING)]
    assert store.recover_stale(study) == 1
    ((trial, spec),) = store.claim(study, 5)
    store.heartbeat.remove(trial._trial_id)  # this test's "worker" stops here
    assert (spec.trial_id, spec.seed) == (0, 100)
    assert [(i, t.user_attrs.get("outcome")) for (i, *_), t in zip(stage_rows(study), study.get_trials())] == \
        [(0, "interrupted"), (0, None)]


def test_a_batch_study_opened_by_a_killed_process_gets_all_its_attributes(url, monkeypatch):
    real = optuna.Study.set_user_attr

    def dying(self, key, value):
        if key == "max_steps":
            raise Killed("killed between the batch study's two attributes")
        return real(self, key, value)

    with monkeypatch.context() as m:
        m.setattr(optuna.Study, "set_user_attr", dying)
        with pytest.raises(Killed):
            StudyStorage(url, "x", {"k": 1}).batch_study(8, 10)
    study = StudyStorage(url, "x", {"k": 1}).batch_study(8, 10)
    assert {k: study.user_attrs.get(k) for k in ("batch_size", "max_steps")} == {"batch_size": 8, "max_steps": 10}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_that_finished_meanwhile_is_not_recovered(url):
    """Recovery decides on a trial read earlier; if it has finished since (a slow but live worker), the
    state test inside the recovery's transaction leaves it finished and enqueues nothing."""
    store = StudyStorage(url, "x", {"k": 1})
    study = store.batch_study(8, 10)
    store.enqueue(study, TRIALS[:1])
    trial = study.ask()
    (seen_running,) = study.get_trials(deepcopy=False)
    study.tell(trial, 1.0)
    assert not store._requeue(study._study_id, seen_running)
    assert [(t.state, t.user_attrs.get("outcome")) for t in study.get_trials()] == [(TrialState.COMPLETE, None)]
