"""The runner's orchestration of the search protocol, with the training engine replaced by a stand-in
whose curves follow from the hyperparameters (seconds, not minutes): the pruning cap handed to the engine,
top-ups along the batch size's own Sobol sequence, budget extension, censored batch sizes and the fit
refusal, reseeds and full curves."""
import json
import math

import pytest

from fastsgd.study.steps import runner, search
from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED
from fastsgd.study.steps.runner import StudyConfig, open_storage, run_study
from fastsgd.study.steps.trials import TrialResult, evaluation_steps
from fastsgd.study.workloads.base import Workload

DIVERGES_ABOVE = 2.0  # lr
WORKLOAD = Workload(name="stand-in", make_model=lambda: None, sample_batch=None, loss=None,
                    evaluate=lambda model, device: {}, goal_metric="val_error", goal=0.1)


def reach(lr, batch_size, seed, unreachable_from):
    """Steps a trial needs to get val_error below 0.1: fewer for a larger lr, a little seed noise."""
    if batch_size >= unreachable_from:
        return math.inf
    return math.ceil(20.0 / lr) + seed % 3


class StandIn:
    """run_trials with made-up curves: val_error 0.05 from ``reach`` on, else falling linearly from 0.5;
    lr above DIVERGES_ABOVE diverges at step 1. Honours goal, budget and the pruning cap like the engine."""

    def __init__(self, unreachable_from=math.inf):
        self.unreachable_from = unreachable_from
        self.calls = []    # (settings, trial ids, expected cap) per call
        self.ledger = {}   # (batch size, trial id) -> steps to result of the latest attempt (None: no result)

    def expected_cap(self, settings, ids, keep_top):
        done = sorted(s for (bs, tid), s in self.ledger.items()
                      if bs == settings.batch_size and tid not in ids and s is not None)
        return done[keep_top - 1] if len(done) >= keep_top else None

    def __call__(self, workload, specs, settings, *, on_eval=None, on_end=None):
        self.calls.append((settings, [s.trial_id for s in specs]))
        out = []
        for spec in specs:
            res = TrialResult(spec=spec)
            need = reach(spec.hparams["lr"], settings.batch_size, spec.seed, self.unreachable_from)
            evals = evaluation_steps(settings.max_steps, settings.eval_ratio)
            for t, nxt in zip(evals, evals[1:] + [None]):
                if spec.hparams["lr"] > DIVERGES_ABOVE and t >= 1:
                    res.outcome = INFEASIBLE
                    break
                err = 0.05 if t >= need else 0.15 + 0.35 * (1 - t / need)
                res.steps.append(t)
                res.metrics.setdefault("val_error", []).append(err)
                on_eval(spec, t, {"val_error": err})
                if settings.goal is not None and err < settings.goal:
                    res.outcome, res.steps_to_result = GOAL, t
                    break
                if t == settings.max_steps:
                    res.outcome = BUDGET
                    break
                if settings.prune and settings.step_cap is not None and nxt > settings.step_cap:
                    res.outcome = PRUNED
                    break
            res.end_step = res.steps[-1]
            self.ledger[(settings.batch_size, spec.trial_id)] = next(  # first measured step below the goal
                (t for t, e in zip(res.steps, res.metrics.get("val_error", [])) if e < 0.1), None)
            on_end(res)
            out.append(res)
        return out


def study(tmp_path, monkeypatch, engine, **kw):
    monkeypatch.setattr(runner, "run_trials", engine)
    cfg = dict(workload="stand-in", optimizer="sgd", batch_sizes=[16], trials=4, max_trials=12, keep_top=2,
               reseeds=2, goal=0.1, budget=64, budget_cap=256, group_size=3,
               space={"lr": {"low": 0.05, "high": 5.0, "scale": "log"}})
    cfg.update(kw)
    config = StudyConfig(out=str(tmp_path), **cfg)
    summary = run_study(config, workload=WORKLOAD, progress=False, log=lambda s: None)
    return config, summary, open_storage(config).records()


def test_pruning_cap_is_the_kth_best_of_the_other_trials(tmp_path, monkeypatch):
    engine = StandIn()
    # record the cap the engine should get, from the trials finished before each call
    real_call = engine.__call__
    expected = []

    def checking(workload, specs, settings, **kw):
        ids = {s.trial_id for s in specs}
        expected.append(engine.expected_cap(settings, ids, 2) if settings.prune else None)
        return real_call(workload, specs, settings, **kw)

    study(tmp_path, monkeypatch, checking, reseeds=0)
    caps = [s.step_cap for s, _ in engine.calls]
    assert caps == expected and any(c is not None for c in caps)  # the cap was in force at least once
    assert all(s.keep_top == 2 for s, _ in engine.calls)


def test_top_ups_continue_the_batch_sizes_sobol_sequence_until_enough_trials_trained(tmp_path, monkeypatch):
    config, summary, records = study(tmp_path, monkeypatch, StandIn(), reseeds=0)
    first = sorted((r for r in records if r.role == "search"), key=lambda r: r.trial_id)
    feasible = [r for r in first if r.outcome != INFEASIBLE]
    assert len(feasible) == 4 and len(first) > 4 and first[-1].outcome != INFEASIBLE  # stopped at the 4th
    points = search.sobol_points(config.space, len(first), seed=search.point_seed(0, 16))
    assert [r.hparams["lr"] for r in first] == pytest.approx([p["lr"] for p in points])
    assert [r.seed for r in first] == search.trial_seeds(0, 16, len(first))
    row = summary["per_batch_size"][0]
    assert (row["search_trials"], row["search_feasible"], row["search_short"]) == (len(first), 4, False)


def test_a_search_that_hits_the_cap_is_reported_short(tmp_path, monkeypatch):
    _, summary, records = study(tmp_path, monkeypatch, StandIn(), reseeds=0, max_trials=5,
                                space={"lr": {"low": 1.0, "high": 50.0, "scale": "log"}})
    row = summary["per_batch_size"][0]
    assert row["search_trials"] == 5 and row["search_feasible"] < 4 and row["search_short"]
    assert any("did not diverge" in w for w in summary["warnings"])


def test_budget_grows_while_the_winner_needs_more_than_half(tmp_path, monkeypatch):
    engine = StandIn()
    # lr <= 0.5: the best needs >= 40 steps, more than half of 64, so the top 2 rerun at 128 (and stop there)
    _, summary, records = study(tmp_path, monkeypatch, engine, reseeds=0,
                                space={"lr": {"low": 0.05, "high": 0.5, "scale": "log"}})
    row = summary["per_batch_size"][0]
    assert row["budgets"] == [64, 128] and not row["censored"]
    ranked = search.rank(records, 0.1, "val_error")
    reruns = [ids for s, ids in engine.calls if s.max_steps == 128]
    assert sorted(sum(reruns, [])) == sorted(r.trial_id for r in ranked[:2])
    assert all(r.max_steps == 128 for r in ranked[:2])
    assert row["steps"] <= 64  # the winner's steps fit in half the final budget


def test_censored_largest_batch_size_refuses_the_fit(tmp_path, monkeypatch):
    _, summary, records = study(tmp_path, monkeypatch, StandIn(unreachable_from=64), batch_sizes=[16, 32, 64],
                                reseeds=0)
    rows = {r["batch_size"]: r for r in summary["per_batch_size"]}
    # 64 -> 128 -> 256 for the top 2; a rerun replaces its earlier attempt, so their budget now reads 256
    assert rows[64]["censored"] and rows[64]["steps_lower_bound"] == 256 and rows[64]["budgets"] == [64, 256]
    assert not rows[16]["censored"] and not rows[32]["censored"]
    assert summary["fit"] is None and "[64]" in summary["fit_refused"] and "censored" in summary["fit_refused"]
    on_disk = json.loads((tmp_path / "study_summary.json").read_text())
    assert on_disk["fit_refused"] == summary["fit_refused"] and on_disk["per_batch_size"][2]["censored"] is True
    assert ">256 (censored)" in runner.summary_table(summary)


def test_reseeds_and_full_curves(tmp_path, monkeypatch):
    engine = StandIn()
    _, summary, records = study(tmp_path, monkeypatch, engine, full_curves=True)
    ranked = search.rank(records, 0.1, "val_error")
    best = ranked[0]
    reseeds = [r for r in records if r.role == "reseed"]
    assert len(reseeds) == 2 and {r.base_trial for r in reseeds} == {best.trial_id}
    assert all(r.hparams == best.hparams and r.max_steps == best.max_steps for r in reseeds)
    assert len({r.seed for r in reseeds + [best]}) == 3
    for r in ranked[:2] + reseeds:  # run to their budget past the goal: curves for harder goals
        assert r.outcome == BUDGET and r.steps[-1] == r.max_steps
    no_goal = [(s.prune, sorted(ids)) for s, ids in engine.calls if s.goal is None]
    assert no_goal and all(not prune for prune, _ in no_goal)
    assert summary["per_batch_size"][0]["reseed_trials"] == 2
