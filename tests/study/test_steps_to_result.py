"""Steps to result: the definition on hand-made curves, the S(B) fit, the search
space and evaluation schedule, and the batch_science export/import round trip.
(Training, storage/resume and end-to-end studies: tests/test_study_trials.py,
tests/test_study_runner.py.)"""

import numpy as np
import pytest

from fastsgd.study.steps import search
from fastsgd.study.steps.analysis import (
    BUDGET,
    GOAL,
    INFEASIBLE,
    PRUNED,
    TrialRecord,
    analyze,
    batch_size_steps_to_result,
    fit_scaling,
    golmant_goal,
    trial_steps_to_result,
)
from fastsgd.study.steps.batch_science import export_records, import_records
from fastsgd.study.steps.trials import evaluation_steps, next_eval_step


def rec(trial_id, steps, errors, outcome=BUDGET, bs=32, hp=None):
    return TrialRecord(batch_size=bs, trial_id=trial_id, seed=trial_id, hparams=hp or {"lr": 0.1, "momentum": 0.9},
                       outcome=outcome, steps=list(steps), metrics={"val_error": list(errors)}, max_steps=100)


# ---------------------------------------------------------------- definition

def test_goal_is_strict():
    r = rec(0, [0, 10, 20, 30], [0.9, 0.5, 0.3, 0.2])
    assert trial_steps_to_result(r, 0.3, "val_error") == 30  # 0.3 equals the goal: not better
    assert trial_steps_to_result(r, 0.30001, "val_error") == 20


def test_higher_is_better():
    r = TrialRecord(32, 0, 0, {"lr": 1.0}, BUDGET, [0, 5, 9], {"acc": [0.1, 0.8, 0.95]})
    assert trial_steps_to_result(r, 0.8, "acc", higher_is_better=True) == 9


def test_infeasible_and_budget_have_no_result():
    diverged = rec(0, [0, 10, 20], [0.9, float("nan"), float("nan")], outcome=INFEASIBLE)
    short = rec(1, [0, 10, 100], [0.9, 0.6, 0.5], outcome=BUDGET)
    assert trial_steps_to_result(diverged, 0.4, "val_error") is None
    assert trial_steps_to_result(short, 0.4, "val_error") is None
    assert batch_size_steps_to_result([diverged, short], 0.4, "val_error") == (None, None)


def test_batch_size_result_is_min_over_trials_ties_to_lowest_id():
    a = rec(3, [0, 10, 20], [0.9, 0.5, 0.1], outcome=GOAL)
    b = rec(1, [0, 10, 20], [0.9, 0.5, 0.1], outcome=GOAL)
    c = rec(2, [0, 5, 40], [0.9, 0.8, 0.1], outcome=PRUNED)
    steps, best = batch_size_steps_to_result([a, b, c], 0.2, "val_error")
    assert (steps, best.trial_id) == (20, 1)
    # recomputed for an easier goal from the same curves
    steps, best = batch_size_steps_to_result([a, b, c], 0.85, "val_error")
    assert (steps, best.trial_id) == (5, 2)


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match="val_loss"):
        trial_steps_to_result(rec(0, [0], [0.5]), 0.1, "val_loss")


def test_golmant_goal_is_lower_quartile_of_best_values():
    recs = [rec(i, [0, 1], [1.0, v]) for i, v in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])]
    recs.append(rec(9, [0, 1], [float("nan"), float("nan")], outcome=INFEASIBLE))
    assert golmant_goal(recs, "val_error") == pytest.approx(0.2)


# ---------------------------------------------------------------- fit

def test_fit_recovers_smin_emin():
    rng = np.random.default_rng(0)
    b = 2.0 ** np.arange(3, 13)
    s = (50 + 20000 / b) * np.exp(rng.normal(0, 0.03, len(b)))
    fit = fit_scaling(b, s, n_boot=300, seed=1)
    assert fit.S_min == pytest.approx(50, rel=0.1)
    assert fit.E_min == pytest.approx(20000, rel=0.1)
    assert fit.B_crit == pytest.approx(400, rel=0.15)
    lo, hi = fit.B_crit_ci
    assert lo <= 400 <= hi and hi < 1000
    reg = fit.regions()
    assert reg["perfect_scaling_max"] == pytest.approx(fit.B_crit / 9)
    assert reg["maximal_parallelism_min"] == pytest.approx(fit.B_crit * 9)


def test_fit_exact_without_noise_and_errors():
    b = [16, 64, 256, 1024]
    fit = fit_scaling(b, [10 + 1000 / x for x in b], n_boot=0)
    assert (fit.S_min, fit.E_min) == (pytest.approx(10), pytest.approx(1000))
    with pytest.raises(ValueError, match="two distinct batch sizes"):
        fit_scaling([8, 8], [10, 11])
    with pytest.raises(ValueError, match="positive"):
        fit_scaling([8, 16], [10, float("nan")])


def test_analyze_rows_fit_edge_and_effective_lr():
    space = search.default_space("nesterov")
    recs = []
    for bs, s in [(8, 1000), (32, 260), (128, 80), (512, 35)]:
        recs.append(rec(0, [0, s], [0.9, 0.1], outcome=GOAL, bs=bs, hp={"lr": 0.01 * bs / 8, "momentum": 0.9}))
        recs.append(rec(1, [0, 5], [0.9, float("nan")], outcome=INFEASIBLE, bs=bs, hp={"lr": 9.9, "momentum": 0.0}))
    recs.append(rec(2, [0, 3], [0.9, 0.1], outcome=GOAL, bs=2048, hp={"lr": 9.9, "momentum": 0.0}))
    out = analyze(recs, goal=0.2, metric="val_error", space=space, n_boot=50)
    rows = {r["batch_size"]: r for r in out["per_batch_size"]}
    assert rows[32]["steps"] == 260 and rows[32]["infeasible"] == 1 and rows[32]["reached_goal"] == 1
    assert rows[2048]["at_edge"] == ["lr:high", "one_minus_momentum:high"]
    assert any("edge" in w and "2048" in w for w in out["warnings"])
    assert out["fit"]["B_crit"] > 0
    eff = out["effective_lr"]
    assert eff["best"][0] == pytest.approx(0.1) and eff["linear_rule"][1] == pytest.approx(0.4)
    assert eff["sqrt_rule"][1] == pytest.approx(0.2)
    assert analyze(recs, goal=0.05, metric="val_error", run_goal=0.2, n_boot=0)["goal"]["harder_than_run_goal"]


# ---------------------------------------------------------------- evaluation schedule, search

@pytest.mark.parametrize("max_steps", [1, 7, 40, 41, 1000, 123457])
def test_evaluation_schedule_resolves_five_percent(max_steps):
    steps = evaluation_steps(max_steps)
    assert steps[0] == 0 and steps[-1] == max_steps
    assert all(b > a for a, b in zip(steps, steps[1:]))
    # the first evaluation at or after any true crossing s is within 5 % of s
    assert all(b <= max(a * 1.05, a + 1) for a, b in zip(steps, steps[1:]))
    assert next_eval_step(100) == 105


def test_sobol_points_in_space_and_deterministic():
    space = {"lr": {"low": 1e-3, "high": 10, "scale": "log"},
             "one_minus_momentum": {"low": 1e-3, "high": 1, "scale": "log"},
             "decay_alpha": {"low": 0.0, "high": 1.0, "scale": "linear"},
             "decay_fraction": {"low": 0.5, "high": 1.0, "scale": "linear"}, "weight_decay": 1e-4}
    space = search.validate_space(space, "nesterov")
    pts = search.sobol_points(space, 32, seed=3)
    assert pts == search.sobol_points(space, 32, seed=3) and pts != search.sobol_points(space, 32, seed=4)
    lrs = [p["lr"] for p in pts]
    assert min(lrs) >= 1e-3 and max(lrs) <= 10 and min(lrs) < 1e-2 and max(lrs) > 1
    hp = search.hparams(pts[0], space)
    assert hp["momentum"] == pytest.approx(1 - pts[0]["one_minus_momentum"]) and hp["weight_decay"] == 1e-4
    assert 0.5 <= hp["decay_fraction"] <= 1
    seeds = search.trial_seeds(0, 64, 32)
    assert len(set(seeds)) == 32 and seeds == search.trial_seeds(0, 64, 32) != search.trial_seeds(0, 128, 32)


@pytest.mark.parametrize("space,opt,msg", [
    ({"lr": {"low": 1, "high": 0.1, "scale": "log"}}, "sgd", "low < high"),
    ({"lr": {"low": 0, "high": 1, "scale": "log"}}, "sgd", "must be > 0"),
    ({"lr": 0.1, "momentum": 0.9}, "sgd", "no momentum"),
    ({"lr": 0.1}, "nesterov", "needs 'momentum'"),
    ({"lr": 0.1, "mom": 0.9}, "nesterov", "unknown name 'mom'"),
    ({"lr": 0.1, "momentum": 0.9, "decay_alpha": 0.1}, "momentum", "decay_fraction"),
    ({"lr": 0.1}, "adam", "Invalid optimizer"),
])
def test_bad_space_is_named(space, opt, msg):
    with pytest.raises(ValueError, match=msg):
        search.validate_space(space, opt)


def test_golmant_scaling_rules():
    assert search.scale_lr(0.1, 64, 256, "constant") == 0.1
    assert search.scale_lr(0.1, 64, 256, "sqrt") == pytest.approx(0.2)
    assert search.scale_lr(0.1, 64, 256, "linear") == pytest.approx(0.4)
    hp = search.scaled_hparams({"lr": 0.1, "momentum": 0.9}, 64, 256, "linear-warmup", warmup_examples=5 * 1000)
    assert hp["lr"] == pytest.approx(0.4) and hp["warmup_steps"] == 20 and hp["warmup_start_lr"] == 0.1
    with pytest.raises(ValueError, match="Invalid scaling rule"):
        search.scale_lr(0.1, 64, 256, "cubic")


# ---------------------------------------------------------------- batch_science round trip

def test_batch_science_round_trip(tmp_path):
    recs = [rec(0, [0, 10, 21], [0.9, 0.5, 0.123456789012345], outcome=GOAL, bs=16),
            rec(1, [0, 10], [0.9, float("nan")], outcome=INFEASIBLE, bs=16),
            rec(0, [0, 3], [0.9, 0.6], outcome=PRUNED, bs=256, hp={"lr": 0.5, "momentum": 0.99, "decay_alpha": 0.1})]
    recs[0].metrics["val_loss"] = [2.3, 1.0, 0.5]
    base = export_records(recs, str(tmp_path), dataset="mnist1d", model="mlp", optimizer="nesterov",
                          study_info={"goal": 0.2})
    assert (tmp_path / "mnist1d" / "mlp" / "nesterov" / "16" / "1" / "measurements.csv").exists()
    studies, back = import_records(base)
    assert set(studies) == {16, 256} and studies[16]["goal"] == 0.2 and studies[16]["batch_size"] == 16
    def key(r):
        return (r.batch_size, r.trial_id)
    for a, b in zip(sorted(recs, key=key), sorted(back, key=key)):
        assert (a.batch_size, a.trial_id, a.seed, a.hparams, a.outcome, a.steps, a.max_steps) == \
               (b.batch_size, b.trial_id, b.seed, b.hparams, b.outcome, b.steps, b.max_steps)
        assert a.metrics.keys() == b.metrics.keys()
        for k in a.metrics:
            np.testing.assert_array_equal(a.metrics[k], b.metrics[k])  # NaN == NaN here, repr() keeps every bit


def test_batch_science_import_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        import_records(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no batch-size directories"):
        import_records(str(tmp_path))
    with pytest.raises(ValueError, match="directory name"):
        export_records([], str(tmp_path), dataset="a/b", model="m", optimizer="o")
