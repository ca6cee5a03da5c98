"""A tiny whole study through every stage of the search protocol (search with top-ups, refine, budget
extension, reseeds, full curves), then a resume that trains nothing. Digits, two batch sizes, budgets of
tens of steps."""
import json

import pytest

from fastsgd.study.steps import runner, search
from fastsgd.study.steps.analysis import BUDGET, INFEASIBLE, trial_steps_to_result
from fastsgd.study.steps.runner import StudyConfig, open_storage, run_study

SPACE = {"lr": {"low": 0.05, "high": 0.5, "scale": "log"}, "one_minus_momentum": {"low": 0.1, "high": 0.5, "scale": "log"}}
CONFIG = dict(workload="digits-mlp", optimizer="nesterov", batch_sizes=[32, 128], trials=2, max_trials=4, keep_top=2,
              refine=1, reseeds=2, goal=0.1, budget=20, budget_cap=40, full_curves=True, space=SPACE)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol")
    runs = []
    real = runner.run_trials

    def spy(workload, specs, settings, **kw):
        runs.append((settings, [s.trial_id for s in specs]))
        return real(workload, specs, settings, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "run_trials", spy)
    try:
        config = StudyConfig(out=str(out), **CONFIG)
        summary = run_study(config, progress=False, log=lambda s: None)
        first = list(runs)
        runs.clear()
        run_study(StudyConfig(out=str(out), **CONFIG), progress=False, log=lambda s: None)
    finally:
        mp.undo()
    return out, summary, first, runs, open_storage(config).records()


def test_every_stage_ran_and_the_resume_trains_nothing(study):
    out, summary, runs, resumed, records = study
    assert resumed == []
    on_disk = json.loads((out / "study_summary.json").read_text())
    for bs in (32, 128):
        recs = [r for r in records if r.batch_size == bs]
        first = [r for r in recs if r.role == "search"]
        feasible = [r for r in first if r.outcome != INFEASIBLE]
        assert 2 <= len(first) <= 4 and (len(feasible) >= 2 or len(first) == 4)  # topped up to 2 feasible, or capped
        assert sum(r.role == "refine" for r in recs) == 1
        row = next(r for r in on_disk["per_batch_size"] if r["batch_size"] == bs)
        assert row["search_trials"] == len(first) and row["search_feasible"] == len(feasible)
        assert row["refine_trials"] == 1
        # the budget grew from 20 to 40: at 20 the winner needed more than half, or nothing reached the goal
        assert row["budgets"] == [20, 40]
        ranked = search.rank(recs, 0.1, "val_error")
        assert {r.max_steps for r in ranked[:2]} == {40}
        if row["censored"]:
            assert row["steps_lower_bound"] == 40 and row["reseed_trials"] == 0
            continue
        best = ranked[0]
        assert trial_steps_to_result(best, 0.1, "val_error") <= 40
        reseeds = [r for r in recs if r.role == "reseed"]
        assert len(reseeds) == 2 and row["reseed_trials"] == 2
        assert all(r.base_trial == best.trial_id and r.hparams == best.hparams for r in reseeds)
        assert len({r.seed for r in reseeds} | {best.seed}) == 3
        # full curves: the top trials and the reseeds ran their whole budget, past the goal
        for r in ranked[:2] + reseeds:
            if r.outcome != INFEASIBLE:
                assert r.outcome == BUDGET and r.steps[-1] == r.max_steps == 40
    kinds = {(s.max_steps, s.goal is None, s.prune) for s, _ in runs}
    assert (40, True, False) in kinds  # full-curve reruns and reseeds: no goal stop, no pruning
    assert all(s.step_cap is None or s.step_cap <= s.max_steps for s, _ in runs)
    assert summary["fit_refused"] is None or "largest batch size 128" in summary["fit_refused"]


class SimulatedKill(RuntimeError):
    pass


def test_top_ups_and_budget_stages_resume_after_a_kill_to_the_same_study(tmp_path, monkeypatch):
    """Least squares diverges above lr ~ 2/lambda_max: half the space diverges, so the search tops up; a kill
    in the middle of the stages must resume to exactly the records of an uninterrupted study."""
    from fastsgd.study.steps.storage import StudyStorage
    from fastsgd.study.workloads.least_squares import least_squares_workload

    def make(out):
        return StudyConfig(out=str(out), workload="least-squares", optimizer="sgd", batch_sizes=[4], trials=4,
                           max_trials=10, keep_top=2, reseeds=1, budget=16, budget_cap=64, group_size=3,
                           space={"lr": {"low": 0.05, "high": 20.0, "scale": "log"}})

    def workload():
        return least_squares_workload(dim=8, alpha=1.0, seed=0, goal_fraction=0.05)

    clean = make(tmp_path / "clean")
    run_study(clean, workload=workload(), progress=False, log=lambda s: None)
    want = open_storage(clean).records()
    search_recs = [r for r in want if r.role == "search"]
    assert len(search_recs) > 4 and sum(r.outcome != INFEASIBLE for r in search_recs) >= 4  # it did top up
    assert len({r.max_steps for r in want}) > 1  # and extended the budget

    killed = make(tmp_path / "killed")
    real_finish, finished = StudyStorage.finish, []

    def dying_finish(self, study, trial, result):
        if len(finished) == 5:
            raise SimulatedKill()
        real_finish(self, study, trial, result)
        finished.append(result.spec.trial_id)

    monkeypatch.setattr(StudyStorage, "finish", dying_finish)
    with pytest.raises(SimulatedKill):
        run_study(killed, workload=workload(), progress=False, log=lambda s: None)
    monkeypatch.setattr(StudyStorage, "finish", real_finish)
    run_study(killed, workload=workload(), progress=False, log=lambda s: None)
    got = open_storage(killed).records()
    key = lambda r: r.trial_id  # noqa: E731
    assert [(r.trial_id, r.role, r.seed, r.hparams, r.max_steps, r.outcome, r.steps) for r in sorted(got, key=key)] == \
        [(r.trial_id, r.role, r.seed, r.hparams, r.max_steps, r.outcome, r.steps) for r in sorted(want, key=key)]
