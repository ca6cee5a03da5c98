"""Batched trials (the trial engine and the vmap path): the same curves as one-at-a-time training, drop-out without
disturbing the others, stopping rules and lr schedules."""

import pytest
import torch

from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED
from fastsgd.study.steps.engine import batch_indices, trial_keys
from fastsgd.study.steps.trials import (
    RunSettings,
    TrialSpec,
    _Batches,
    _Schedules,
    data_seed,
    pruning_cap,
    run_trials,
    stacked_backend,
    train_single,
)
from fastsgd.study.workloads.data import digits_mlp, restrict_eval_sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workload():
    return restrict_eval_sets(digits_mlp(), ["val"])  # the training subset would double the evaluation time


def assert_same_curves(a, b, rtol=1e-4, atol=1e-5):
    assert a.steps == b.steps, (a.spec, a.steps, b.steps)
    assert a.outcome == b.outcome and a.steps_to_result == b.steps_to_result
    for k in b.metrics:
        torch.testing.assert_close(torch.tensor(a.metrics[k]), torch.tensor(b.metrics[k]), rtol=rtol, atol=atol,
                                   equal_nan=True, msg=lambda m, k=k: f"trial {a.spec.trial_id} metric {k}: {m}")


SPECS = [
    TrialSpec(0, 11, {"lr": 0.05, "momentum": 0.9}),
    TrialSpec(1, 12, {"lr": 0.2, "momentum": 0.5, "weight_decay": 1e-3}),
    TrialSpec(2, 13, {"lr": 0.1, "momentum": 0.95, "decay_alpha": 0.1, "decay_fraction": 0.5}),
    TrialSpec(3, 14, {"lr": 400.0, "momentum": 0.99}),  # diverges within a few steps
    TrialSpec(4, 15, {"lr": 0.02, "momentum": 0.8, "warmup_steps": 10, "warmup_start_lr": 0.002}),
]


@pytest.mark.parametrize("engine", ["engine", "vmap"])
@pytest.mark.parametrize("optimizer", ["nesterov", "sgd"])
def test_batched_equals_one_at_a_time(workload, optimizer, engine):
    specs = SPECS if optimizer != "sgd" else [TrialSpec(s.trial_id, s.seed, dict(s.hparams, momentum=0.0))
                                              for s in SPECS]
    settings = RunSettings(batch_size=24, max_steps=25, optimizer=optimizer, goal=None, engine=engine)
    stats = {}
    stacked = run_trials(workload, specs, settings, stats=stats)
    assert stats["path"] == {"engine": "TrialEngine", "vmap": "_Stack"}[engine]
    for res, spec in zip(stacked, specs):
        assert_same_curves(res, train_single(workload, spec, settings))
    assert stacked[3].outcome == INFEASIBLE and stacked[3].end_step < 10
    assert {r.outcome for i, r in enumerate(stacked) if i != 3} == {BUDGET}


@pytest.mark.parametrize("engine", ["engine", "vmap"])
def test_dropping_trials_does_not_disturb_others(workload, engine):
    settings = RunSettings(batch_size=16, max_steps=20, optimizer="momentum", goal=None, engine=engine)
    alone = run_trials(workload, [SPECS[0], SPECS[2]], settings)
    with_diverging = run_trials(workload, SPECS[:4], settings)
    assert_same_curves(with_diverging[0], alone[0])
    assert_same_curves(with_diverging[2], alone[1])


def test_goal_and_pruning(workload):
    wl = workload
    assert set(digits_mlp().eval_data) == {"val", "train"} and set(wl.eval_data) == {"val"}
    settings = RunSettings(batch_size=32, max_steps=300, optimizer="nesterov", goal=0.5, goal_metric="val_error",
                           keep_top=1)
    specs = [TrialSpec(0, 1, {"lr": 0.5, "momentum": 0.9}), TrialSpec(1, 2, {"lr": 0.001, "momentum": 0.0})]
    fast, slow = run_trials(wl, specs, settings)
    assert fast.outcome == GOAL and fast.metrics["val_error"][-1] < 0.5
    assert fast.steps_to_result == fast.steps[-1] and all(v >= 0.5 for v in fast.metrics["val_error"][:-1])
    assert slow.outcome == PRUNED and slow.end_step == fast.steps_to_result  # can no longer win
    nopr = run_trials(wl, specs[1:], RunSettings(batch_size=32, max_steps=30, optimizer="nesterov", goal=0.5,
                                                  prune=False))
    assert nopr[0].outcome == BUDGET and nopr[0].steps[-1] == 30
    capped = run_trials(wl, specs[1:], RunSettings(batch_size=32, max_steps=300, optimizer="nesterov", goal=0.5,
                                                    step_cap=12))
    assert capped[0].outcome == PRUNED and capped[0].end_step == 12
    # keep_top=2: the slow trial runs on until a second trial has finished (the default keeps the top 5)
    third = TrialSpec(2, 3, {"lr": 0.3, "momentum": 0.9})
    top2 = run_trials(wl, specs + [third], RunSettings(batch_size=32, max_steps=300, optimizer="nesterov", goal=0.5,
                                                       keep_top=2))
    assert top2[0].outcome == GOAL and top2[2].outcome == GOAL
    second = max(top2[0].steps_to_result, top2[2].steps_to_result)
    assert top2[1].outcome == PRUNED and top2[1].end_step == second


def test_pruning_cap():
    assert pruning_cap(None, [], 1) is None and pruning_cap(None, [30, 10], 3) is None
    assert pruning_cap(None, [30, 10, 20], 1) == 10 and pruning_cap(None, [30, 10, 20], 2) == 20
    assert pruning_cap(15, [30, 10], 2) == 15 and pruning_cap(40, [30, 10], 2) == 30 and pruning_cap(7, [], 5) == 7


def test_reproducible_from_seed(workload):
    settings = RunSettings(batch_size=8, max_steps=15, optimizer="nesterov")
    a = run_trials(workload, [SPECS[0], SPECS[1]], settings)[1]
    b = run_trials(workload, [SPECS[1]], settings)[0]
    assert_same_curves(a, b)
    other_seed = run_trials(workload, [TrialSpec(1, 99, SPECS[1].hparams)], settings)[0]
    assert other_seed.metrics["val_loss"] != b.metrics["val_loss"]


def test_lr_schedules():
    specs = [TrialSpec(0, 0, {"lr": 1.0}),
             TrialSpec(1, 0, {"lr": 1.0, "decay_alpha": 0.1, "decay_fraction": 0.5}),
             TrialSpec(2, 0, {"lr": 1.0, "warmup_steps": 4, "warmup_start_lr": 0.2})]
    hp = _Schedules(specs, max_steps=100)
    lr = torch.stack([hp.lr(t) for t in (0, 2, 25, 50, 90)])
    torch.testing.assert_close(lr[:, 0], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(lr[:, 1], torch.tensor([1.0, 1 - 0.9 * 2 / 50, 0.55, 0.1, 0.1], dtype=torch.float64))
    torch.testing.assert_close(lr[:, 2], torch.tensor([0.2, 0.6, 1.0, 1.0, 1.0], dtype=torch.float64))


def test_settings_errors():
    with pytest.raises(ValueError, match="Invalid optimizer"):
        RunSettings(batch_size=8, max_steps=10, optimizer="adam")
    with pytest.raises(ValueError, match="eval_ratio"):
        RunSettings(batch_size=8, max_steps=10, eval_ratio=1.0)
    with pytest.raises(ValueError, match="keep_top must be >= 1"):
        RunSettings(batch_size=8, max_steps=10, keep_top=0)
    with pytest.raises(ValueError, match="Invalid engine: 'jit'"):
        RunSettings(batch_size=8, max_steps=10, engine="jit")
    with pytest.raises(ValueError, match="momentum != 0"):
        run_trials(digits_mlp(), [SPECS[0]], RunSettings(batch_size=8, max_steps=2, optimizer="sgd"))


def test_batches_drawn_in_blocks_are_each_steps_own_draw_also_after_trials_leave():
    wl = digits_mlp()
    x, y = wl.train_data
    seeds = [11, 12, 13, 14]
    batches = _Batches(wl, seeds, torch.device("cpu"))
    keys = trial_keys([data_seed(s) for s in seeds])
    live = list(range(4))
    for step in range(2 * _Batches.BLOCK + 5):  # crosses two block boundaries
        if step == _Batches.BLOCK - 3:  # trial 1 leaves mid-block, trial 3 at a block boundary
            live.remove(1)
            batches.keep(torch.tensor([0, 2, 3]))
        if step == 2 * _Batches.BLOCK:
            live.remove(3)
            batches.keep(torch.tensor([0, 1]))
        xb, yb = batches.draw(step, 16)
        idx = batch_indices(keys[live], step, 16, len(x))
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
    xb, _ = batches.draw(7, 4)  # another batch size or an earlier step: drawn anew
    assert torch.equal(xb, x[batch_indices(keys[live], 7, 4, len(x))])


def test_the_study_backend_must_step_stacked_trials_and_is_refused_before_training(monkeypatch):
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is part of the test install")
    wl = restrict_eval_sets(digits_mlp(), ["val"])
    evaluated = []
    with pytest.raises(ValueError, match="'triton' cannot step stacked trials.*one of: reference, cpu"):
        run_trials(wl, [TrialSpec(0, 1, {"lr": 0.1, "momentum": 0.9})],
                   RunSettings(batch_size=8, max_steps=3, optimizer="nesterov", backend="triton"),
                   on_eval=lambda *a: evaluated.append(a))
    assert evaluated == []
    assert stacked_backend("auto", torch.device("cpu")).NAME == "cpu"
    monkeypatch.setenv("FASTSGD_BACKEND", "reference")  # stands in for "auto", as for the optimizers
    assert stacked_backend("auto", torch.device("cpu")).NAME == "reference"
