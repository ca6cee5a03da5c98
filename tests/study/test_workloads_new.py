"""The bundled no-download workloads (stdlib character LM, digits CNN with batch
norm / ghost batch norm), the user-workload loader and the example workload."""
import dataclasses
import math
import os
import sys
import textwrap
import uuid

import pytest
import torch

from fastsgd.study.steps.trials import RunSettings, TrialSpec, run_trials, train_single
from fastsgd.study.workloads import charlm, get_workload
from fastsgd.study.workloads.loading import WorkloadError, load_workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = torch.device("cpu")


# ---------------------------------------------------------------- character LM: corpus

def test_vocabulary_is_tab_newline_printable_ascii_and_unknown():
    assert charlm.VOCAB_SIZE == 98 and charlm.UNK == 97
    ids = charlm.encode("\t\n ~A\u00e9\r\x0c")
    assert ids.tolist() == [0, 1, 2, 96, 2 + ord("A") - 32, 97, 97, 97]
    assert ids.dtype == torch.uint8
    text = "def f(x):\n\treturn x ** 2  # ok\n"
    assert charlm.decode(charlm.encode(text)) == text


def test_file_list_and_split_follow_the_documented_rules(tmp_path):
    names = ["b.py", "a.py", "copy.py", "random.py", "notes.txt", "z.py"]
    for n in names:
        (tmp_path / n).write_text(f"# {n}\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "inner.py").write_text("x = 1\n")  # subdirectories are not part of the corpus
    files = charlm.stdlib_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["a.py", "b.py", "copy.py", "random.py", "z.py"]
    val = [os.path.basename(f) for f in files if charlm.is_validation_file(f)]
    assert val == ["copy.py", "random.py"]  # crc32(name) % 10 == 0
    train, valid, info = charlm.stdlib_corpus(str(tmp_path))
    assert charlm.decode(train) == "# a.py\n# b.py\n# z.py\n"
    assert charlm.decode(valid) == "# copy.py\n# random.py\n"
    assert info["files"] == 5 and info["val_files"] == val


def test_real_stdlib_corpus_is_deterministic_and_split_by_file():
    files = charlm.stdlib_files()
    assert files == sorted(files) and files == charlm.stdlib_files()
    assert all(f.endswith(".py") and os.path.dirname(f) == os.path.dirname(files[0]) for f in files)
    assert "os.py" in {os.path.basename(f) for f in files}
    train, _, info = charlm.stdlib_corpus()
    assert 0 < info["val_chars"] < info["train_chars"] and len(info["val_files"]) > 0
    assert (train == charlm.UNK).float().mean() < 1e-3  # the vocabulary covers almost all of the text


# ---------------------------------------------------------------- character LM: model and workload

@pytest.fixture(scope="module")
def lm():
    return get_workload("stdlib-charlm")


def test_lm_batches_are_shifted_windows_of_the_training_text(lm):
    g = torch.Generator().manual_seed(3)
    x, y = lm.sample_batch(5, g, CPU)
    t = lm.info["context"]
    assert x.shape == y.shape == (5, t) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = lm.sample_batch(5, torch.Generator().manual_seed(3), CPU)
    assert torch.equal(x, x2)


def test_lm_is_causal_and_evaluates_in_bits_per_character(lm):
    torch.manual_seed(0)
    model = lm.make_model()
    x, _ = lm.sample_batch(2, torch.Generator().manual_seed(0), CPU)
    out = model(x)
    assert out.shape == (2, x.shape[1], charlm.VOCAB_SIZE)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % charlm.VOCAB_SIZE
    torch.testing.assert_close(model(x2)[:, :-1], out[:, :-1])  # the future does not leak backwards
    metrics = lm.evaluate(model, CPU)
    assert lm.goal_metric == "val_bpc" and lm.goal is not None and lm.goal_metric in metrics
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2))
    assert metrics["val_bpc"] == pytest.approx(math.log2(charlm.VOCAB_SIZE), abs=0.2)  # near uniform at init


def test_lm_training_steps_reduce_the_loss(lm):
    specs = [TrialSpec(0, 1, {"lr": 0.3, "momentum": 0.9})]
    result = run_trials(lm, specs, RunSettings(batch_size=16, max_steps=40, eval_ratio=2.0))[0]
    bpc = result.metrics["val_bpc"]
    assert result.outcome == "budget" and bpc[-1] < bpc[0] - 1.0, bpc


def test_lm_stacks_under_vmap_like_a_single_model(lm):
    specs = [TrialSpec(i, 10 + i, {"lr": 0.1 * (i + 1), "momentum": 0.9}) for i in range(2)]
    settings = RunSettings(batch_size=4, max_steps=3, eval_ratio=2.0)
    for stacked, spec in zip(run_trials(lm, specs, settings), specs):
        single = train_single(lm, spec, settings)
        torch.testing.assert_close(torch.tensor(stacked.metrics["val_bpc"]), torch.tensor(single.metrics["val_bpc"]),
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- digits CNN with (ghost) batch norm

@pytest.mark.parametrize("name", ["digits-cnn-bn", "digits-cnn-ghostbn"])
def test_cnn_trials_keep_their_own_running_statistics(name):
    base = get_workload(name)
    seen = []

    def evaluate(model, device):
        bn = model.features[1]
        seen.append((bn.running_mean.clone(), bn.training))
        return base.evaluate(model, device)

    wl = dataclasses.replace(base, evaluate=evaluate)
    specs = [TrialSpec(i, 20 + i, {"lr": lr, "momentum": 0.9}) for i, lr in enumerate([0.05, 0.2])]
    settings = RunSettings(batch_size=48, max_steps=12, eval_ratio=2.0)
    stacked = run_trials(wl, specs, settings)
    last_stacked = [m for m, _ in seen[-2:]]
    assert not torch.equal(last_stacked[0], last_stacked[1])  # per trial
    assert all(m.abs().sum() > 0 for m in last_stacked)  # updated by training (they start at zero)
    for res, spec in zip(stacked, specs):  # the vmapped trials equal plain models trained one at a time
        seen.clear()
        single = train_single(wl, spec, settings)
        torch.testing.assert_close(torch.tensor(res.metrics["val_loss"]), torch.tensor(single.metrics["val_loss"]),
                                   rtol=1e-4, atol=1e-5)
    assert res.metrics["val_error"][-1] < res.metrics["val_error"][0]
    assert base.goal_metric == "val_error" and base.goal is not None


def test_cnn_evaluates_with_running_statistics_and_restores_the_mode():
    wl = get_workload("digits-cnn-bn")
    torch.manual_seed(0)
    model = wl.make_model()
    x, _ = wl.sample_batch(64, torch.Generator().manual_seed(0), CPU)
    model(x)  # one training-mode forward: running stats move
    before = model.features[1].running_mean.clone()
    metrics = wl.evaluate(model, CPU)
    assert model.training and torch.equal(model.features[1].running_mean, before)
    assert set(metrics) == {"val_loss", "val_error"}


# ---------------------------------------------------------------- loading a user's workload

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write ``usermod_<n>.py`` into a directory on sys.path; returns a writer."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body: str) -> str:
        name = f"usermod_{uuid.uuid4().hex}"  # new name each time: never an already imported module
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        return name
    return write


GOOD = """
    import torch, torch.nn.functional as F
    from fastsgd.study import Workload
    def sample(b, g, d):
        return torch.randn(b, 3, generator=g), torch.randint(2, (b,), generator=g)
    def make(goal=0.1, evaluate=True, loss=F.cross_entropy):
        return Workload(name="u", make_model=lambda: torch.nn.Linear(3, 2), sample_batch=sample, loss=loss,
                        evaluate=(lambda m, d: {"val_error": 0.5}) if evaluate else None, goal=goal)
    def no_goal():
        return make(goal=None)
    def no_eval():
        return make(evaluate=False)
    def vector_loss():
        return make(loss=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    def not_a_workload():
        return {"name": "u"}
    NOT_CALLABLE = 3
"""


def test_load_workload_returns_the_checked_workload(user_module):
    mod = user_module(GOOD)
    wl = load_workload(f"{mod}:make", goal=0.2)
    assert wl.name == "u" and wl.goal == 0.2


@pytest.mark.parametrize("attr, message", [
    ("no_goal", "has no goal"),
    ("no_eval", "has no evaluate()"),
    ("vector_loss", "loss must be a scalar tensor"),
    ("not_a_workload", "returned a dict, not a fastsgd.study.Workload"),
    ("missing", "has no attribute 'missing'"),
    ("NOT_CALLABLE", "is a int, not a callable factory"),
])
def test_load_workload_names_what_is_wrong(user_module, attr, message):
    mod = user_module(GOOD)
    with pytest.raises(WorkloadError, match=message):
        load_workload(f"{mod}:{attr}")


def test_load_workload_bad_specs():
    with pytest.raises(WorkloadError, match="module 'no_such_pkg.mod' not found"):
        load_workload("no_such_pkg.mod:make")
    with pytest.raises(WorkloadError, match="expected 'package.module:factory'"):
        load_workload("just_a_module")


def test_a_broken_import_inside_the_users_module_is_not_hidden(user_module):
    mod = user_module("import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_workload(f"{mod}:make")


def test_the_example_workload_loads_and_reaches_its_goal(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    sys.modules.pop("examples.my_workload", None)
    wl = load_workload("examples.my_workload:make_workload")
    assert wl.goal_metric == "val_error" and wl.goal == 0.05
    result = run_trials(wl, [TrialSpec(0, 0, {"lr": 0.1, "momentum": 0.9})],
                        RunSettings(batch_size=32, max_steps=400, goal=wl.goal))[0]
    assert result.outcome == "goal", result.metrics["val_error"][-5:]
