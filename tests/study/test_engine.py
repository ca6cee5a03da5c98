"""The trial engine: for each layer type it batches, a batched trial follows the one-at-a-time
reference (train_single) to fp32 tolerance; trials that drop out leave the others bit-identical;
models it cannot batch fall back to the vmap path with a notice; bad input gets clear errors."""

import warnings

import pytest
import torch
from torch import nn

from fastsgd.study.steps.analysis import INFEASIBLE
from fastsgd.study.steps.engine import (
    NotConvertible,
    StepContext,
    batch_indices,
    batch_indices_block,
    convert,
    trial_keys,
)
from fastsgd.study.steps.trials import RunSettings, TrialSpec, data_seed, run_trials, train_single
from fastsgd.study.workloads.data import make_data_workload, restrict_eval_sets

FEATURES, CLASSES, VOCAB = 16, 3, 11


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _workload(make_model, tokens=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if tokens:
        x = torch.randint(VOCAB, (96, 4), generator=g)
        y = (x.sum(1) % CLASSES)
    else:
        x = torch.randn(96, FEATURES, generator=g)
        y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % CLASSES
    wl = make_data_workload("tiny", make_model, x[:64], y[:64], x[64:], y[64:], goal=0.0)
    return restrict_eval_sets(wl, ["val"])


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.body(x)


class Conv1dNet(nn.Module):  # custom forward with per-sample tensor methods, as the MNIST-1D CNN
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(4 * 8, CLASSES)

    def forward(self, x):
        h = torch.relu(self.conv1(x.unsqueeze(-2)))
        h = torch.nn.functional.silu(self.conv2(h))
        return self.head(h.flatten(-2))


def _image(*layers):
    return nn.Sequential(nn.Unflatten(1, (1, 4, 4)), *layers)


MODELS = {
    "linear": lambda: nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU(), nn.Linear(12, CLASSES)),
    "conv1d": Conv1dNet,
    "conv2d": lambda: _image(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(12, CLASSES)),
    "layernorm": lambda: nn.Sequential(nn.Linear(FEATURES, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, CLASSES)),
    "batchnorm1d": lambda: nn.Sequential(nn.Linear(FEATURES, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                         nn.Linear(12, CLASSES)),
    "batchnorm2d": lambda: _image(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3, momentum=None),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(48, CLASSES)),
    "embedding": lambda: nn.Sequential(nn.Embedding(VOCAB, 5), nn.Flatten(), nn.Linear(20, CLASSES)),
    "dropout": lambda: nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, CLASSES)),
    "residual": lambda: nn.Sequential(nn.Linear(FEATURES, 8), Residual(8), nn.ReLU(), nn.Linear(8, CLASSES)),
}

SPECS = [TrialSpec(0, 11, {"lr": 0.1, "momentum": 0.9}),
         TrialSpec(1, 12, {"lr": 0.3, "momentum": 0.5, "weight_decay": 1e-2}),
         TrialSpec(2, 13, {"lr": 0.05, "momentum": 0.0, "decay_alpha": 0.1, "decay_fraction": 0.5})]


def assert_same_curves(a, b, exact=False):
    assert a.steps == b.steps and a.outcome == b.outcome and a.end_step == b.end_step, (a, b)
    assert a.metrics.keys() == b.metrics.keys()
    for k in b.metrics:
        if exact:
            assert a.metrics[k] == b.metrics[k], (a.spec.trial_id, k, a.metrics[k], b.metrics[k])
        else:
            torch.testing.assert_close(torch.tensor(a.metrics[k]), torch.tensor(b.metrics[k]), rtol=2e-4, atol=2e-5,
                                       msg=lambda m, k=k: f"trial {a.spec.trial_id} metric {k}: {m}")


@pytest.mark.parametrize("layer", sorted(MODELS))
def test_batched_equals_one_at_a_time(layer):
    wl = _workload(MODELS[layer], tokens=layer == "embedding")
    settings = RunSettings(batch_size=8, max_steps=10, optimizer="nesterov", eval_ratio=1.6, engine="engine")
    stats = {}
    batched = run_trials(wl, SPECS, settings, stats=stats)
    assert stats["path"] == "TrialEngine"
    for res, spec in zip(batched, SPECS):
        single = train_single(wl, spec, settings)
        assert_same_curves(res, single)
    assert len(set(batched[0].metrics["val_loss"])) == len(batched[0].steps)  # the weights did change


@pytest.mark.parametrize("layer", ["linear", "conv1d", "batchnorm2d", "dropout"])
def test_dropping_out_leaves_others_bit_identical(layer):
    wl = _workload(MODELS[layer])
    settings = RunSettings(batch_size=8, max_steps=10, optimizer="momentum", eval_ratio=1.5, engine="engine")
    diverging = TrialSpec(9, 19, {"lr": 1e4, "momentum": 0.99})
    together = run_trials(wl, [SPECS[0], diverging, SPECS[1]], settings)
    alone = run_trials(wl, [SPECS[0], SPECS[1]], settings)
    assert together[1].outcome == INFEASIBLE and together[1].end_step < 10
    assert_same_curves(together[0], alone[0], exact=True)
    assert_same_curves(together[2], alone[1], exact=True)


class MixesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        return self.lin(x - x.mean(0))  # centres over the batch: not per sample


def test_unsupported_model_falls_back_to_vmap_with_notice():
    wl = _workload(MixesBatch)
    settings = RunSettings(batch_size=8, max_steps=3, optimizer="nesterov", eval_ratio=2.0)
    stats = {}
    with pytest.warns(UserWarning, match=r"trial engine cannot batch .*mean.*batch dimension.*vmap path"):
        res = run_trials(wl, SPECS[:2], settings, stats=stats)
    assert stats["path"] == "_Stack" and all(r.outcome == "budget" for r in res)
    for r, spec in zip(res, SPECS[:2]):
        assert_same_curves(r, train_single(wl, spec, settings))
    with pytest.raises(ValueError, match=r"trial engine cannot batch workload 'tiny'.*mean"):
        run_trials(wl, SPECS[:1], RunSettings(batch_size=8, max_steps=3, engine="engine"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a convertible model gives no notice
        run_trials(_workload(MODELS["linear"]), SPECS[:1], settings)


class UsesWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(FEATURES, CLASSES))

    def forward(self, x):
        return x @ self.w


class FixedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        return self.lin(x.view(8, FEATURES))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


@pytest.mark.parametrize("model, match", [
    (UsesWeight(), r"^w: its forward uses this parameter"),
    (FixedView(), r"view\(\) with a fixed first dimension"),
    (Branchy(), r"torch.fx cannot trace"),
    (nn.Sequential(nn.Conv1d(1, 2, 3, padding_mode="circular", padding=1)), r"0 \(Conv1d\): padding_mode 'circular'"),
    (nn.Sequential(nn.Embedding(5, 2, padding_idx=0)), r"0 \(Embedding\): option\(s\) padding_idx"),
    (nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4)), r"1 \(GRU\): no trial-batched version"),
    (nn.Sequential(nn.Flatten(0)), r"Flatten"),
])
def test_not_convertible_names_the_module_and_why(model, match):
    with pytest.raises(NotConvertible, match=match):
        convert(model, {}, StepContext(trial_keys([1])))


def test_counter_based_draws():
    keys = trial_keys([data_seed(s) for s in (1, 2, 3)])
    both = batch_indices(keys, 7, 64, 1000)
    assert both.shape == (3, 64) and both.dtype == torch.int64 and 0 <= int(both.min()) and int(both.max()) < 1000
    torch.testing.assert_close(batch_indices(keys[1:2], 7, 64, 1000), both[1:2], rtol=0, atol=0)  # no neighbours
    assert not torch.equal(batch_indices(keys, 8, 64, 1000), both)  # a new step, new batches
    assert not torch.equal(both[0], both[1])
    counts = torch.bincount(batch_indices(trial_keys([5]), 0, 100000, 10).flatten(), minlength=10)
    assert int(counts.min()) > 9500 and int(counts.max()) < 10500  # about uniform (sd ~95)
    with pytest.raises(ValueError, match="need 0 < n < 2\\*\\*31"):
        batch_indices(keys, 0, 4, 0)


def test_batch_draws_are_pinned_and_a_block_of_steps_draws_the_same_indices():
    # pinned: stored studies are resumed and rerun with these draws (a change would alter their trials)
    assert batch_indices(trial_keys([12345]), 3, 6, 1000).tolist() == [[994, 650, 100, 316, 583, 742]]
    assert batch_indices(trial_keys([2 ** 63 + 7]), 2 ** 32 + 3, 4, 2 ** 31 - 1).tolist() == [
        [1348458856, 1924178818, 1042574603, 391700172]]
    keys = trial_keys([3, 2 ** 40 + 5, 2 ** 64 - 1])
    block = batch_indices_block(keys, 2 ** 32 - 4, 9, 50, 1000)  # across the counter's 32-bit boundary
    assert block.shape == (3, 9, 50)
    for i in range(9):
        assert torch.equal(block[:, i], batch_indices(keys, 2 ** 32 - 4 + i, 50, 1000))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_engine_on_cuda_matches_cpu():
    wl = _workload(MODELS["batchnorm1d"])
    cpu = run_trials(wl, SPECS, RunSettings(batch_size=8, max_steps=8, eval_ratio=1.5, engine="engine"))
    stats = {}
    gpu = run_trials(wl, SPECS, RunSettings(batch_size=8, max_steps=8, eval_ratio=1.5, engine="engine",
                                            device="cuda"), stats=stats)
    assert stats["path"] == "TrialEngine"
    for a, b in zip(gpu, cpu):
        assert_same_curves(a, b)
