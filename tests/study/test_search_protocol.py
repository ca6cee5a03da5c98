"""The search protocol's rules on hand-made trial records: ranking and the pruning cap, top-ups to a
number of non-diverged trials, per-batch-size Sobol points, the refine box, budget extension, the
diverged-neighbour flag, censored batch sizes and the fit refusal, storage of roles and reruns, and the
batch_science status mapping. (A tiny whole study: test_search_protocol_study.py.)"""
import csv
import json
import os
import time

import pytest

from fastsgd.study.steps import search
from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED, TrialRecord
from fastsgd.study.steps.batch_science import export_records, import_records
from fastsgd.study.steps.runner import StudyConfig, analyze_study, protocol_report, summary_table
from fastsgd.study.steps.storage import StudyStorage
from fastsgd.study.steps.trials import TrialResult

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPACE = search.validate_space({"lr": {"low": 1e-3, "high": 10.0, "scale": "log"},
                               "one_minus_momentum": {"low": 1e-3, "high": 1.0, "scale": "log"}}, "nesterov")


def rec(trial_id, reach=None, *, outcome=None, best=0.5, lr=0.1, momentum=0.9, role="search", bs=32,
        max_steps=100, base_trial=None):
    """A trial whose val_error first drops below 0.2 at step ``reach`` (None: never; its best value is ``best``)."""
    if reach is None:
        steps, errs = [0, 10, 20], [0.9, 0.7, best]
        outcome = outcome or BUDGET
    else:
        steps, errs = [0, reach - 1, reach], [0.9, 0.5, 0.1]
        outcome = outcome or GOAL
    return TrialRecord(batch_size=bs, trial_id=trial_id, seed=100 + trial_id,
                       hparams={"lr": lr, "momentum": momentum, "weight_decay": 0.0}, outcome=outcome,
                       steps=steps, metrics={"val_error": errs}, max_steps=max_steps, role=role,
                       base_trial=base_trial)


GOAL_ARGS = dict(goal=0.2, metric="val_error")


# ---------------------------------------------------------------- ranking and the pruning cap

def test_rank_reached_by_steps_then_best_value_leaving_out_diverged_unfinished_and_reseeds():
    records = [rec(0, best=0.4), rec(1, 50), rec(2, 30), rec(3, 30), rec(4, outcome=INFEASIBLE, best=0.25),
               rec(5, best=0.3, outcome=PRUNED), rec(6, 5, role="reseed"), rec(7, 10, outcome="interrupted"),
               rec(8, 40, role="refine")]
    assert [r.trial_id for r in search.rank(records, **GOAL_ARGS)] == [2, 3, 8, 1, 5, 0]
    # without a goal (Golmant's largest batch size) only the best values count
    assert [r.trial_id for r in search.rank(records[:2], None, "val_error")] == [1, 0]


def test_kth_best_steps_is_the_pruning_cap_of_the_search_trials():
    records = [rec(0, 50), rec(1, 30), rec(2), rec(3, 70, role="refine"), rec(4, 5, role="reseed"), rec(5, 40)]
    assert search.kth_best_steps(records, 1, **GOAL_ARGS) == 30
    assert search.kth_best_steps(records, 3, **GOAL_ARGS) == 50
    assert search.kth_best_steps(records, 4, **GOAL_ARGS) == 70
    assert search.kth_best_steps(records, 5, **GOAL_ARGS) is None  # fewer than 5 reached: nothing is pruned yet
    with pytest.raises(ValueError, match="k must be >= 1"):
        search.kth_best_steps(records, 0, **GOAL_ARGS)


# ---------------------------------------------------------------- adequate search

def test_top_up_counts_non_diverged_search_trials_up_to_the_cap():
    ok, bad = (lambda i: rec(i, 20)), (lambda i: rec(i, outcome=INFEASIBLE))
    assert search.top_up([ok(0), bad(1), bad(2), ok(3)], target=4, hard_cap=12) == 2
    assert search.top_up([ok(0), bad(1), ok(2), ok(3), rec(4, 9, role="refine")], 4, 12) == 1  # refine is no search
    assert search.top_up([ok(i) for i in range(4)], 4, 12) == 0
    assert search.top_up([bad(i) for i in range(10)], 4, 12) == 2  # capped: 12 tried at most
    assert search.top_up([bad(i) for i in range(12)], 4, 12) == 0
    assert search.top_up([ok(0), rec(1, 5, outcome="running")], 2, 6) == 1  # unfinished trials have not counted yet
    with pytest.raises(ValueError, match="target <= hard_cap"):
        search.top_up([], 5, 4)


def test_sobol_points_are_scrambled_per_batch_size_and_stage_and_continue_for_top_ups():
    seeds = {search.point_seed(0, b, s) for b in (8, 16, 32) for s in ("search", "refine")}
    assert len(seeds) == 6 and search.point_seed(0, 8) == search.point_seed(0, 8) != search.point_seed(1, 8)
    seed = search.point_seed(0, 64)
    whole = search.sobol_points(SPACE, 12, seed=seed)
    assert search.sobol_points(SPACE, 8, seed=seed) + search.sobol_points(SPACE, 4, seed=seed, start=8) == whole
    assert whole != search.sobol_points(SPACE, 12, seed=search.point_seed(0, 128))
    assert search.trial_seeds(0, 64, 3, start=5) == search.trial_seeds(0, 64, 8)[5:]


def test_refine_space_is_the_widened_box_around_the_best_points():
    space = dict(SPACE, weight_decay=1e-4)
    best = [{"lr": 0.1, "one_minus_momentum": 0.1}, {"lr": 0.3, "one_minus_momentum": 0.05}]
    sub = search.validate_space(search.refine_space(space, best, margin=0.1), "nesterov")
    assert sub["weight_decay"] == 1e-4
    decades = 4.0  # lr spans 1e-3 .. 10; 10 % of that on a log scale is 0.4 decades
    assert sub["lr"]["low"] == pytest.approx(0.1 / 10 ** (0.1 * decades))
    assert sub["lr"]["high"] == pytest.approx(0.3 * 10 ** (0.1 * decades))
    assert sub["one_minus_momentum"]["low"] == pytest.approx(0.05 / 10 ** 0.3)
    pts = search.sobol_points(sub, 16, seed=1)
    assert all(sub["lr"]["low"] <= p["lr"] <= sub["lr"]["high"] for p in pts)
    edge = search.refine_space(space, [{"lr": 9.0, "one_minus_momentum": 0.95}])
    assert edge["lr"]["high"] == 10.0 and edge["one_minus_momentum"]["high"] == 1.0  # clipped to the space
    with pytest.raises(ValueError, match="no points"):
        search.refine_space(space, [])


def test_point_of_inverts_hparams():
    p = {"lr": 0.3, "one_minus_momentum": 0.05}
    assert search.point_of(search.hparams(p, SPACE), SPACE) == pytest.approx(p)


def test_next_lr_diverged_flags_a_diverged_neighbour_along_the_effective_lr():
    sgd = lambda i, lr, **kw: rec(i, lr=lr, momentum=0.0, **kw)  # noqa: E731
    winner = sgd(0, 1.5, reach=20)
    records = [winner, sgd(1, 0.5, reach=40), sgd(2, 2.53, outcome=INFEASIBLE), sgd(3, 4.15, outcome=INFEASIBLE)]
    assert search.next_lr_diverged(records, winner).trial_id == 2
    records.append(sgd(4, 2.0, reach=30))  # a trained point in between: the edge is not next to the winner
    assert search.next_lr_diverged(records, winner) is None
    assert search.next_lr_diverged([winner, sgd(1, 0.5, outcome=INFEASIBLE)], winner) is None  # smaller lr only
    # momentum: lr 0.2 at 0.9 (effective 2) lies above lr 1.5 at 0 (effective 1.5)
    assert search.next_lr_diverged([winner, rec(5, lr=0.2, momentum=0.9, outcome=INFEASIBLE)], winner).trial_id == 5


# ---------------------------------------------------------------- step budgets

@pytest.mark.parametrize("reach,budget,expected", [
    (60, 100, 200),    # the winner used more than half: double it
    (50, 100, None),   # exactly half is enough
    (None, 100, 200),  # nothing reached: more steps
    (90, 800, None),
    (900, 1000, 1500),  # capped
    (1400, 1500, None),  # at the cap: censored or final
])
def test_next_budget(reach, budget, expected):
    records = [rec(0, reach, max_steps=budget), rec(1, outcome=INFEASIBLE)]
    assert search.next_budget(records, budget, **GOAL_ARGS, growth=2.0, cap=1500) == expected


def test_next_budget_has_nothing_to_rerun_when_every_trial_diverged():
    assert search.next_budget([rec(0, outcome=INFEASIBLE)], 100, **GOAL_ARGS, growth=2.0, cap=1000) is None


# ---------------------------------------------------------------- summary: censoring, refusal, flags

def config(**kw):
    return StudyConfig(out="unused", **dict(dict(batch_sizes=[32, 128, 512], trials=3, max_trials=6), **kw))


def test_censored_batch_size_is_reported_with_its_lower_bound_and_the_fit_refused():
    records = [rec(0, 80, bs=32), rec(1, bs=32), rec(2, 60, bs=32),
               rec(0, 30, bs=128), rec(1, 20, bs=128), rec(2, bs=128, max_steps=800),
               rec(0, bs=512, max_steps=400), rec(1, bs=512, max_steps=800),
               rec(2, bs=512, outcome=INFEASIBLE, max_steps=800)]
    result = analyze_study(config(), records, 0.2, "val_error", None, n_boot=0)
    rows = {r["batch_size"]: r for r in result["per_batch_size"]}
    # the bound is the last evaluated step of the trials that ran out of budget: S(512) is larger
    bound = max(r.steps[-1] for r in records if r.batch_size == 512 and r.outcome == BUDGET)
    assert rows[512]["censored"] and rows[512]["steps_lower_bound"] == bound and rows[512]["budgets"] == [400, 800]
    assert not rows[128]["censored"] and rows[128]["steps_lower_bound"] is None
    assert rows[512]["search_feasible"] == 2 and rows[512]["search_short"]
    assert not rows[32]["search_short"]
    assert result["fit"] is None and "[512]" in result["fit_refused"]
    assert sum("batch size 512: censored" in w and f"{bound} steps" in w for w in result["warnings"]) == 1


def test_a_censored_middle_batch_size_is_flagged_but_the_fit_stands():
    records = [rec(0, 80, bs=32), rec(0, bs=128, max_steps=400), rec(0, 10, bs=512)]
    result = analyze_study(config(), records, 0.2, "val_error", None, n_boot=0)
    rows = {r["batch_size"]: r for r in result["per_batch_size"]}
    assert rows[128]["censored"] and not result.get("fit_refused") and result["fit"] is not None
    assert any("batch size 128: censored" in w for w in result["warnings"])


def test_every_trial_diverged_is_not_censored():
    records = [rec(0, 80, bs=32), rec(0, 10, bs=128), rec(0, bs=512, outcome=INFEASIBLE),
               rec(1, bs=512, outcome=INFEASIBLE)]
    result = analyze_study(config(), records, 0.2, "val_error", None, n_boot=0)
    row = {r["batch_size"]: r for r in result["per_batch_size"]}[512]
    assert row["status"] == "diverged" and not row["censored"] and row["steps_lower_bound"] is None
    assert ">None" not in summary_table({**result, "workload": "w", "optimizer": "nesterov", "protocol": "tuned",
                                         "wall_seconds": 1.0, "wall_seconds_total": 1.0})


def test_reseeds_do_not_decide_the_result_and_are_counted():
    records = [rec(0, 80), rec(1, 60), rec(2, 30, role="reseed", base_trial=1), rec(3, role="reseed", base_trial=1),
               rec(4, 90, role="refine")]
    rows, _ = protocol_report(config(batch_sizes=[32]), records, 0.2, "val_error")
    assert rows[32]["reseed_trials"] == 2 and rows[32]["refine_trials"] == 1 and rows[32]["search_trials"] == 2
    # a batch size where only a reseed reached the goal is still censored: reseeds rerun, they do not search
    only = [rec(0, max_steps=50), rec(1, 30, role="reseed", base_trial=0)]
    result = analyze_study(config(batch_sizes=[32]), only, 0.2, "val_error", None, n_boot=0)
    assert result["per_batch_size"][0]["censored"]


def test_diverged_neighbour_is_flagged_in_rows_and_warnings():
    records = [rec(0, 30, lr=2.53, momentum=0.0), rec(1, outcome=INFEASIBLE, lr=4.15, momentum=0.0),
               rec(2, 60, lr=1.0, momentum=0.0)]
    rows, warnings = protocol_report(config(optimizer="sgd", batch_sizes=[32]), records, 0.2, "val_error")
    assert rows[32]["next_lr_diverged"] == 1
    assert any("next to a diverged trial 1" in w for w in warnings)


def test_summary_table_shows_censored_points_and_the_refusal():
    row = {"batch_size": 512, "steps": None, "best_trial": None, "best_hparams": None, "best_effective_lr": None,
           "reached_goal": 0, "infeasible": 1, "budget": 2, "pruned": 0, "max_steps": 800, "at_edge": [],
           "censored": True, "steps_lower_bound": 800, "search_feasible": 2, "search_trials": 3,
           "search_short": True, "refine_trials": 0, "reseed_trials": 0, "next_lr_diverged": None}
    summary = {"workload": "w", "optimizer": "sgd", "protocol": "tuned", "per_batch_size": [row],
               "goal": {"metric": "val_error", "value": 0.2, "higher_is_better": False, "rule": "fixed"},
               "fit": None, "fit_refused": "fit refused: the largest batch size 512 ...", "wall_seconds": 1.0,
               "wall_seconds_total": 1.0}
    text = summary_table(summary)
    assert ">800 (censored)" in text and "2/3!" in text and "fit refused" in text


@pytest.mark.parametrize("change,msg", [
    (dict(max_trials=2), "max_trials"), (dict(keep_top=0), "keep_top must be >= 1"),
    (dict(reseeds=-1), "reseeds must be >= 0"), (dict(budget_growth=1.0), "budget_growth must be > 1"),
    (dict(budget=500, budget_cap=400), "budget_cap"), (dict(budgets={64: 100}), r"batch sizes \[64\]"),
])
def test_bad_protocol_settings_are_named(change, msg):
    with pytest.raises(ValueError, match=msg):
        config(**change).validate()


def test_cli_budget_parsing():
    from fastsgd.study.cli.steps import budget_arg
    assert budget_arg("1000") == (1000, {})
    assert budget_arg("500,8:20000,1024:400") == (500, {8: 20000, 1024: 400})
    with pytest.raises(Exception, match="invalid budget"):
        budget_arg("8:x")
    c = config(budget=300, budgets={32: 5000})
    assert c.initial_budget(32) == 5000 and c.initial_budget(128) == 300
    assert c.stored()["budgets"] == {"32": 5000}


# ---------------------------------------------------------------- storage: roles and reruns

def test_storage_keeps_roles_and_a_rerun_replaces_the_earlier_attempt(tmp_path):
    store = StudyStorage(str(tmp_path / "s.db"), "x", {"k": 1})
    study = store.batch_study(32, 100)
    base = {"point": {"lr": 0.1}, "hparams": {"lr": 0.1, "momentum": 0.0}, "max_steps": 100}
    assert store.enqueue(study, [dict(base, index=0, seed=7), dict(base, index=1, seed=8, role="reseed",
                                                                     base_trial=0)], stage="search@0")
    assert not store.enqueue(study, [dict(base, index=0, seed=7)], stage="search@0")  # a stage is enqueued once

    def run(claimed, end_step):
        for trial, spec in claimed:
            for s in range(0, end_step + 1, 10):
                store.record_eval(trial, s, {"val_error": 1.0 - s / 1000})
            store.finish(study, trial, TrialResult(spec=spec, outcome=BUDGET, end_step=end_step))

    run(store.claim(study, 10), 100)
    recs = {r.trial_id: r for r in store.records(32)}
    assert (recs[0].role, recs[0].base_trial, recs[0].max_steps) == ("search", None, 100)
    assert (recs[1].role, recs[1].base_trial) == ("reseed", 0)
    # trial 0 rerun with a larger budget: same index in a new stage, not taken for a duplicate
    store.enqueue(study, [dict(base, index=0, seed=7, max_steps=200)], stage="budget:200")
    claimed = store.claim(study, 10)
    assert [(spec.trial_id, t.user_attrs["max_steps"]) for t, spec in claimed] == [(0, 200)]
    run(claimed, 200)
    recs = {r.trial_id: r for r in store.records(32)}
    assert len(recs) == 2 and recs[0].max_steps == 200 and recs[0].steps[-1] == 200
    assert store.enqueued(study) == {"search@0": 2, "budget:200": 1}


def test_recovered_trials_keep_their_run_settings(tmp_path):
    store = StudyStorage(str(tmp_path / "s.db"), "x", {"k": 1}, heartbeat_interval=1, grace_period=2)
    study = store.batch_study(32, 100)
    store.enqueue(study, [{"index": 3, "seed": 1, "point": {}, "hparams": {"lr": 0.1}, "role": "reseed",
                           "base_trial": 0, "max_steps": 400, "goal_stop": False, "prune": False}], stage="reseed")
    (trial, _), = store.claim(study, 1)
    trial.set_user_attr("owner", {"host": "elsewhere", "pid": 1})  # a dead run on another machine:
    store.heartbeat.remove(trial._trial_id)  # its heartbeats stopped, and the grace period passes
    time.sleep(3)
    assert store.recover_stale(study) == 1
    (again, spec), = store.claim(study, 1)
    assert spec.trial_id == 3
    assert {k: again.user_attrs[k] for k in ("role", "base_trial", "max_steps", "goal_stop", "prune", "stage")} == \
        {"role": "reseed", "base_trial": 0, "max_steps": 400, "goal_stop": False, "prune": False, "stage": "reseed"}


# ---------------------------------------------------------------- batch_science status mapping

def test_batch_science_export_marks_every_finished_trial_complete_up_to_its_last_step(tmp_path):
    records = [rec(0, 30, max_steps=100), rec(1, best=0.3, outcome=PRUNED, max_steps=100), rec(2, max_steps=20),
               rec(3, outcome=INFEASIBLE), rec(4, outcome="interrupted"), rec(5, 25, role="reseed", base_trial=0)]
    base = export_records(records, str(tmp_path), dataset="d", model="m", optimizer="sgd")
    meta = {r.trial_id: json.loads(open(os.path.join(base, "32", str(r.trial_id), "metadata.json")).read())
            for r in records}
    assert [meta[i]["status"] for i in range(6)] == ["COMPLETE", "COMPLETE", "COMPLETE", "INFEASIBLE", "INCOMPLETE",
                                                     "COMPLETE"]
    # a loader reading COMPLETE as "ran its full max_steps" finds every measurement up to max_steps
    for i in (0, 1, 2, 5):
        with open(os.path.join(base, "32", str(i), "measurements.csv")) as f:
            steps = [int(row["step"]) for row in csv.DictReader(f)]
        assert steps[-1] == meta[i]["max_steps"] == records[i].steps[-1]
    assert meta[0]["fastsgd_max_steps"] == 100 and meta[5]["fastsgd_role"] == "reseed"
    # what a loader of finished trials (COMPLETE or INFEASIBLE) sees: every finished trial, not 1-2 of them
    loaded = [i for i, m in meta.items() if m["status"] in ("COMPLETE", "INFEASIBLE")]
    assert loaded == [0, 1, 2, 3, 5]
    _, back = import_records(base)  # fastsgd's own importer sees every trial, exactly
    back = {r.trial_id: r for r in back}
    assert len(back) == 6
    for r in records:
        b = back[r.trial_id]
        assert (b.outcome, b.max_steps, b.role, b.base_trial, b.steps) == (r.outcome, r.max_steps, r.role,
                                                                           r.base_trial, r.steps)
    searched = export_records(records, str(tmp_path / "s"), dataset="d", model="m", optimizer="sgd",
                              roles=search.SEARCH_ROLES)
    assert sorted(r.trial_id for r in import_records(searched)[1]) == [0, 1, 2, 3, 4]
