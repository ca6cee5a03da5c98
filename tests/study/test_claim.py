"""Claiming enqueued trials: each is taken by one worker only, also when a worker acts on a list of
waiting trials that another worker has emptied meanwhile."""
from optuna.trial import TrialState

from fastsgd.study.steps.storage import StudyStorage

TRIALS = [{"index": i, "point": {"lr": 0.1 * (i + 1)}, "hparams": {"lr": 0.1 * (i + 1), "momentum": 0.0},
           "seed": 100 + i} for i in range(4)]


def test_a_trial_is_taken_once_when_two_workers_claim_from_the_same_read(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a, b = StudyStorage(url, "s", {"k": 1}), StudyStorage(url, "s", {"k": 1})
    study_a = a.batch_study(16, 100)
    a.enqueue(study_a, TRIALS)
    stale = study_a.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(stale) == 4
    got_b = b.claim(b.batch_study(16, 100), 3)
    assert [spec.trial_id for _, spec in got_b] == [0, 1, 2]
    # worker a read the queue before b took three of them: it may take only the one left
    real = study_a.get_trials
    monkeypatch.setattr(study_a, "get_trials", lambda deepcopy=True, states=None:
                        stale if states == (TrialState.WAITING,) else real(deepcopy=deepcopy, states=states))
    got_a = a.claim(study_a, 10)
    assert [spec.trial_id for _, spec in got_a] == [3]
    trials = real(deepcopy=False)
    assert sorted(t.user_attrs["owner"]["run"] for t in trials) == sorted([b.owner["run"]] * 3 + [a.owner["run"]])
    assert all(t.state == TrialState.RUNNING for t in trials)  # nobody took a trial twice or failed one
    for trial, _ in got_a + got_b:
        a.heartbeat.remove(trial._trial_id)
        b.heartbeat.remove(trial._trial_id)
