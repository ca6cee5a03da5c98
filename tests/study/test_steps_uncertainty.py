"""Steps-to-result analysis rules on hand-made curves and points: within-point bootstrap,
fit diagnostics, model-free brackets, regions from the data, censored and missing batch
sizes, reseeds and top-k trials, steps to result against the goal."""
import math

import numpy as np
import pytest

from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED, TrialRecord, analyze, steps_against_goal
from fastsgd.study.steps.scaling import brackets, data_regions, fit_diagnostics, fit_once, runs_test_p
from fastsgd.study.steps.uncertainty import PointData, bootstrap, replicate_point, spread

S_MIN, E_MIN = 50.0, 50.0 * 256          # B_crit = 256
BS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def model(b):
    return S_MIN + E_MIN / np.asarray(b, dtype=float)


def rec(bs, tid, reach_at, outcome=None, role="search", base=None, end=None, hp=None):
    """A trial whose val_error drops from 0.9 to 0.1 at step ``reach_at`` (None: never, curve ends at ``end``)."""
    if reach_at is None:
        steps, errs = [0, end], [0.9, 0.5]
        outcome = outcome or BUDGET
    else:
        steps, errs = [0, reach_at - 1, reach_at], [0.9, 0.5, 0.1]
        outcome = outcome or GOAL
    return TrialRecord(batch_size=bs, trial_id=tid, seed=tid, hparams=hp or {"lr": 0.1 * (tid + 1), "momentum": 0.9},
                       outcome=outcome, steps=steps, metrics={"val_error": errs}, max_steps=end or 10 * (reach_at or 1),
                       role=role, base_trial=base)


# ---------------------------------------------------------------- fit diagnostics

def test_runs_test_is_exact():
    assert runs_test_p([1, 1, 1, 1, -1, -1, -1, -1]) == pytest.approx(2 / math.comb(8, 4))
    assert runs_test_p([1, -1] * 4) == pytest.approx(1.0)
    # 3 runs of 3 + and 2 -: P(R=2) + P(R=3) = (2 + 2*1 + 1*... ) by enumeration
    from itertools import permutations
    perms = set(permutations([1, 1, 1, -1, -1]))
    runs = [1 + sum(a != b for a, b in zip(p, p[1:])) for p in perms]
    assert runs_test_p([1, 1, -1, -1, 1]) == pytest.approx(sum(r <= 3 for r in runs) / len(perms))
    assert runs_test_p([1, 1, 1]) is None


def test_exact_model_fits_without_flags():
    s = model(BS)
    d = fit_diagnostics(BS, s, *fit_once(np.array(BS, float), s))
    assert d["r2_log"] == pytest.approx(1.0) and d["max_abs_relative_residual"] < 1e-9
    assert not d["lack_of_fit"]


def test_systematic_misfit_is_flagged_by_runs_and_by_within_point_intervals():
    b = 2.0 ** np.arange(0, 16)
    s = 1e5 / b ** 1.5 + 40       # steeper than 1/B, then flat: residuals + at both ends, - between
    s_min, e_min = fit_once(b, s)
    d = fit_diagnostics(b, s, s_min, e_min)
    assert d["lack_of_fit"] and "runs" in d["lack_of_fit_reasons"][0]
    # tight within-point intervals that the curve misses at most batch sizes
    d2 = fit_diagnostics(b, s, s_min, e_min, [(v * 0.99, v * 1.01) for v in s])
    assert len(d2["outside_within_point"]) >= 3 and any("within-point" in r for r in d2["lack_of_fit_reasons"])
    # wide intervals contain the curve: only the runs test speaks
    d3 = fit_diagnostics(b, s, s_min, e_min, [(v / 10, v * 10) for v in s])
    assert d3["outside_within_point"] == [] and d3["within_point_checked"] == len(b)


# ---------------------------------------------------------------- brackets and regions

def test_brackets_enclose_b_crit_and_converge_on_a_wide_range():
    b = 2.0 ** np.arange(0, 21)
    br = brackets(b, model(b))
    assert br["b_steps_double"] <= 256 <= br["b_examples_double"]
    assert br["b_steps_double"] == pytest.approx(256, rel=0.1)
    assert br["b_examples_double"] == pytest.approx(256, rel=0.1)
    # a narrow range: both levels lie outside, and the bound says on which side
    nb = [512, 1024, 2048]
    br = brackets(nb, model(nb))
    assert br["b_steps_double"] is None and br["b_steps_double_bound"] == "< 512"
    nb = [4, 8, 16]
    br = brackets(nb, model(nb))
    assert br["b_examples_double"] is None and br["b_examples_double_bound"] == "> 16"


def test_brackets_interpolate_in_log_log():
    # S halves per doubling down from 400 to 100: S = 2*100 exactly at B = 4; B S constant -> no upper crossing
    br = brackets([1, 2, 4, 8], [1600, 800, 200, 100])
    assert br["S_min_measured"] == 100 and br["b_steps_double"] == pytest.approx(4 / 2 ** 0.5 * 2 ** 0.5)
    br = brackets([1, 2, 4], [400, 300, 100])   # S crosses 200 between B=2 (300) and B=4 (100)
    t = (math.log(200) - math.log(300)) / (math.log(100) - math.log(300))
    assert br["b_steps_double"] == pytest.approx(2 * 2 ** t)


def test_regions_come_from_the_data_not_the_fit():
    b = [1, 2, 4, 8, 16, 32, 64]
    s = [1000, 500, 250, 130, 80, 70, 69]   # B S: 1000 1000 1000 1040 1280 2240 4416
    reg = data_regions(b, s)
    assert reg["perfect_scaling_max"] == 8 and reg["maximal_parallelism_min"] == 16
    assert [reg["labels"][x] for x in b] == ["perfect scaling"] * 4 + ["maximal data parallelism"] * 3
    reg = data_regions(b, s, tol=0.05)
    assert reg["perfect_scaling_max"] == 8 and reg["maximal_parallelism_min"] == 32
    assert reg["labels"][16] == "diminishing returns"


# ---------------------------------------------------------------- within-point bootstrap

def test_replicate_point_resamples_seeds_and_topk():
    rng = np.random.default_rng(0)
    assert {replicate_point(PointData(8, [100.0]), rng) for _ in range(20)} == {100.0}
    vals = [replicate_point(PointData(8, [10.0, 12.0, 14.0]), rng) for _ in range(400)]
    assert set(vals) == {10.0, 12.0, 14.0}          # median of 3 draws from the seeds
    vals = [replicate_point(PointData(8, [10.0], [10.0, 11.0]), rng) for _ in range(400)]
    assert set(vals) == {10.0, 11.0}                # the runner-up wins when the best is not drawn
    assert 0.15 < np.mean(np.array(vals) == 11.0) < 0.35   # P(best not among 2 draws) = 1/4
    # the runner-up borrows the best setting's seed noise: 20 * {0.8, 1, 1.2}
    vals = [replicate_point(PointData(8, [10.0, 8.0, 12.0], [10.0, 20.0]), rng) for _ in range(400)]
    assert set(np.round(vals, 6)) <= {8.0, 10.0, 12.0, 16.0, 20.0, 24.0}
    # a seed that missed the goal is lent as a miss; a replicate whose median misses is inf
    vals = [replicate_point(PointData(8, [10.0, 12.0, math.inf], [10.0, 20.0]), rng) for _ in range(2000)]
    assert math.inf in vals and set(np.round([v for v in vals if math.isfinite(v)], 6)) <= {10.0, 12.0, 16.666667, 20.0}


def test_points_need_the_best_trial_first():
    with pytest.raises(ValueError, match="topk"):
        PointData(8, [10.0], [9.0, 10.0])
    with pytest.raises(ValueError, match="finite"):
        PointData(8, [math.inf])


def test_within_point_noise_widens_the_intervals():
    rng = np.random.default_rng(1)
    s = model(BS)
    plain = [PointData(b, [v]) for b, v in zip(BS, s)]
    noisy = []
    for b, v in zip(BS, s):
        seeds = sorted(v * np.exp(rng.normal(0, 0.15, 4)))
        med = float(np.median(seeds))
        seeds = [v * x / med for x in seeds]        # same median as the plain point
        best = min(seeds)
        noisy.append(PointData(b, [best] + [x for x in seeds if x != best], [best, best * 1.1, best * 1.3]))
    b0 = bootstrap(plain, n_boot=300, seed=0)
    b1 = bootstrap(noisy, n_boot=300, seed=0)
    assert b0.B_crit_ci == pytest.approx((256, 256), rel=1e-6)   # exact data: every resample fits exactly
    assert b0.within_point == 0 and b1.within_point == len(BS)
    lo, hi = b1.B_crit_ci
    assert lo < 256 * 0.97 and hi > 256 * 1.03
    ci = b1.point_ci[64]
    assert ci[0] < ci[1]
    assert b1.to_dict()["resampled"].startswith("batch sizes (cases")
    assert b1.to_dict()["bracket_replicates_not_crossed"] == [0, 0]
    # a range that never reaches 2 S_min: every replicate misses the lower bracket, and says so
    narrow = bootstrap([PointData(b, [float(model(b))]) for b in (512, 1024, 2048)], n_boot=20)
    assert narrow.b_steps_double_ci is None and narrow.bracket_not_crossed[0] == 20


def test_spread_of_seeds_with_a_run_that_missed_the_goal():
    sp = spread([100.0, 120.0, math.inf])
    assert sp["median"] == 120.0 and sp["max"] is None and sp["not_reached"] == 1
    sp = spread([100.0, 120.0, 110.0])
    assert sp["relative_half_range"] == pytest.approx(10 / 110)
    assert spread([100.0, math.inf])["median"] is None


# ---------------------------------------------------------------- whole analysis

def _study(reseeds=True, censor=()):
    recs = []
    for b in BS:
        s = int(round(float(model(b))))
        if b in censor:
            recs += [rec(b, t, None, end=2 * s) for t in range(3)]
            recs.append(rec(b, 3, None, outcome=INFEASIBLE, end=3))
            continue
        recs.append(rec(b, 0, s))
        recs += [rec(b, t, int(s * (1 + 0.1 * t))) for t in (1, 2, 3, 4, 5, 6)]
        recs.append(rec(b, 7, None, outcome=PRUNED, end=s))
        if reseeds:
            recs += [rec(b, 100 + j, int(s * f), role="reseed", base=0, hp={"lr": 0.1, "momentum": 0.9})
                     for j, f in enumerate((1.1, 1.2, 0.95))]
    return recs


def test_analysis_uses_seed_median_topk_and_reports_intervals():
    out = analyze(_study(), goal=0.2, metric="val_error", n_boot=200)
    row = {r["batch_size"]: r for r in out["per_batch_size"]}[64]
    s = int(round(float(model(64))))
    assert row["steps"] == s and row["best_trial"] == 0           # batch_science's minimum, over search trials
    assert row["seeds"] == [s, int(s * 1.1), int(s * 1.2), int(s * 0.95)] and row["reseeds"] == 3
    assert row["steps_median"] == pytest.approx(np.median(row["seeds"]))
    assert [t["trial"] for t in row["topk"]] == [0, 1, 2, 3, 4]   # k = 5, reseeds and the pruned trial excluded
    assert row["trials"] == 8 and row["pruned"] == 1
    lo, hi = row["steps_ci"]
    assert lo <= row["steps_median"] <= hi and lo < hi
    assert out["fit"]["B_crit_ci"][0] < out["fit"]["B_crit"] < out["fit"]["B_crit_ci"][1]
    assert out["uncertainty"]["within_point_batch_sizes"] == len(BS)
    assert out["brackets"]["b_steps_double"] <= out["brackets"]["b_examples_double"]
    assert all(r["region"] for r in out["per_batch_size"]) and out["regions_data"]["tolerance"] == 0.2
    assert all(r["fit_residual"] is not None for r in out["per_batch_size"])


def test_censored_small_batch_is_shown_and_left_out_of_the_fit():
    out = analyze(_study(censor=(8,)), goal=0.2, metric="val_error", n_boot=0)
    row = out["per_batch_size"][0]
    assert row["status"] == "censored" and row["steps"] is None
    assert row["steps_lower_bound"] == 2 * int(round(float(model(8))))
    assert out["fit"]["points"] == len(BS) - 1 and out["fit_refused"] is None
    assert any("batch size 8: censored" in w for w in out["warnings"])


def test_fit_refuses_when_the_largest_batch_sizes_are_censored_or_missing():
    out = analyze(_study(censor=(2048, 4096)), goal=0.2, metric="val_error", n_boot=0)
    assert out["fit"] is None and "[2048, 4096]" in out["fit_refused"] and "censored" in out["fit_refused"]
    assert out["fit_refused"] in out["warnings"]
    ok = analyze(_study(censor=(2048, 4096)), goal=0.2, metric="val_error", n_boot=0, exclude=(2048, 4096))
    assert ok["fit"] is not None
    recs = [r for r in _study() if r.batch_size != 4096]
    out = analyze(recs, goal=0.2, metric="val_error", n_boot=0, batch_sizes=BS)
    assert out["fit"] is None and "missing" in out["fit_refused"]
    assert out["per_batch_size"][-1]["status"] == "missing"


def test_harder_goal_with_stopped_curves_is_truncated_not_censored():
    recs = [rec(b, 0, 100, end=100) for b in (8, 16)]
    out = analyze(recs, goal=0.05, metric="val_error", run_goal=0.2, n_boot=0)
    assert [r["status"] for r in out["per_batch_size"]] == ["truncated", "truncated"]
    assert out["goal"]["harder_than_run_goal"]


def test_reseeds_of_another_trial_are_not_used_for_the_best():
    recs = [rec(8, 0, 100), rec(8, 1, 90), rec(8, 50, 95, role="reseed", base=0), rec(16, 0, 60), rec(16, 1, 70)]
    out = analyze(recs, goal=0.2, metric="val_error", n_boot=0)
    row = out["per_batch_size"][0]
    assert row["best_trial"] == 1 and row["seeds"] == [90]
    assert any("reseeds rerun trial(s) [0]" in w for w in out["warnings"])


def test_a_tie_for_best_goes_to_the_reseeded_trial():
    recs = [rec(8, 0, 90), rec(8, 1, 90), rec(8, 50, 100, role="reseed", base=1), rec(16, 0, 60), rec(16, 1, 70)]
    row = analyze(recs, goal=0.2, metric="val_error", n_boot=0)["per_batch_size"][0]
    assert row["best_trial"] == 1 and row["seeds"] == [90, 100] and row["steps"] == 90


def test_seed_median_censored_when_most_seeds_miss():
    recs = [rec(8, 0, 100), rec(8, 50, None, role="reseed", base=0, end=400),
            rec(8, 51, None, role="reseed", base=0, end=400), rec(16, 0, 60), rec(32, 0, 40)]
    out = analyze(recs, goal=0.2, metric="val_error", n_boot=0)
    row = out["per_batch_size"][0]
    assert row["status"] == "censored" and row["seeds"] == [100, None, None]
    assert out["fit"]["points"] == 2


def test_steps_against_goal_recomputes_from_curves():
    recs = []
    for b in (8, 32, 128, 512):
        s_easy, s_hard = float(model(b)), 2 * float(model(b)) + 20000 / b
        recs.append(TrialRecord(b, 0, 0, {"lr": 0.1}, BUDGET, [0, int(s_easy), int(s_hard), int(s_hard) + 1000],
                                {"val_error": [0.9, 0.3, 0.1, 0.09]}, max_steps=int(s_hard) + 1000))
    out = steps_against_goal(recs, [0.4, 0.2], metric="val_error", n_boot=0)
    assert [o["goal"] for o in out] == [0.4, 0.2]
    assert out[0]["steps"] == [int(float(model(b))) for b in (8, 32, 128, 512)]
    assert out[0]["B_crit"] == pytest.approx(256, rel=0.05)
    assert out[1]["B_crit"] > out[0]["B_crit"]
    assert steps_against_goal(recs, [0.05], metric="val_error", n_boot=0)[0]["status"] == ["censored"] * 4
