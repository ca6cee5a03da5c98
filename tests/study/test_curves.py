"""Study curves as text (fastsgd.study.steps.curves): exact round trip of TrialRecords,
deterministic bytes, fields added to the record carried without changes, clear errors,
loading a study from its curves file or its database, and the committed MNIST-1D studies
re-analysed from their curves files giving their committed summaries."""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from typing import Dict, List, Optional

import pytest

from fastsgd.study.steps import analysis, curves
from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED, TrialRecord
from fastsgd.study.steps.storage import StudyStorage
from fastsgd.study.steps.trials import TrialResult

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = [os.path.join(ROOT, "bench", "results", d) for d in ("steps_mnist1d_mlp_sgd", "steps_mnist1d_mlp_nesterov",
                                                              "steps_mnist1d_mlp_sgd_100", "steps_mnist1d_mlp_nesterov_100")]


def same(a, b, where="record"):
    """Exact equality that treats NaN as equal to NaN and also compares types (1 is not 1.0)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__} ({a!r} vs {b!r})"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(sorted(a)) == list(sorted(b)), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def same_records(a: List[TrialRecord], b: List[TrialRecord]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        same(x, y, f"records[{i}]")


def awkward_records() -> List[TrialRecord]:
    nan, inf = float("nan"), float("inf")
    return [
        TrialRecord(64, 3, 7, {"lr": 0.1, "momentum": 0.9}, INFEASIBLE, [0, 1, 2],
                    {"val_loss": [2.3, inf, nan], "val_error": [0.9, -inf, nan]}, max_steps=200),
        TrialRecord(8, 1, 2**40, {"lr": 1e-300, "momentum": 0.0, "weight_decay": 5e-4}, GOAL, [0, 10, 21],
                    {"val_loss": [2.2991745471954346, 0.1 + 0.2, -0.0], "val_error": [1.0, 0.5, 0.25]},
                    max_steps=20000),
        TrialRecord(8, 0, 0, {"lr": 0.5}, "interrupted", [], {}, max_steps=None),      # never evaluated
        TrialRecord(8, 2, 1, {"lr": 2.0, "momentum": 0.5}, BUDGET, [0, 100],
                    {"train_loss": [1.5, 1e-12]}),                                     # another metric set
        TrialRecord(8, 4, 3, {}, PRUNED, [5, 3], {"val_loss": [1.0, 2.0]}),              # steps kept as given
    ]


def test_round_trip_is_exact_and_sorted(tmp_path):
    records = awkward_records()
    path = curves.write_curves(records, str(tmp_path))
    assert path == str(tmp_path / curves.FILENAME)
    back = curves.read_curves(path)
    same_records(back, sorted(records, key=lambda r: (r.batch_size, r.trial_id)))
    assert [r.steps for r in back if r.trial_id == 4] == [[5, 3]]
    header = curves.read_header(path)
    assert header["schema"] == curves.SCHEMA and header["metrics"] == ["train_loss", "val_error", "val_loss"]


def test_bytes_are_deterministic(tmp_path):
    records = awkward_records()
    data = curves.curves_bytes(records, meta={"study": "w/o/tuned"})
    shuffled = [dataclasses.replace(r, hparams=dict(reversed(list(r.hparams.items())))) for r in reversed(records)]
    assert curves.curves_bytes(shuffled, meta={"study": "w/o/tuned"}) == data
    assert data[4:8] == b"\0\0\0\0"  # gzip mtime
    a = curves.write_curves(records, str(tmp_path / "a.csv.gz"), meta={"study": "w/o/tuned"})
    assert open(a, "rb").read() == data
    text = gzip.decompress(data).decode()
    assert text.splitlines()[1].startswith("batch_size,trial_id,seed,hparams,outcome,max_steps,role,base_trial,step,")
    assert json.loads(text.splitlines()[0][1:])["study"] == "w/o/tuned"


@dataclasses.dataclass
class ExtendedRecord(TrialRecord):
    note: Optional[str] = None
    scale: Dict[str, float] = dataclasses.field(default_factory=dict)
    weight: float = 1.0
    flag: bool = False


def test_fields_added_to_the_record_are_carried(tmp_path):
    recs = [ExtendedRecord(16, 0, 1, {"lr": 0.1}, GOAL, [0, 4], {"val_error": [0.5, 0.1]}, 50,
                           role="rerun", base_trial=3, note="", scale={"lr": 2.0}, weight=float("nan"), flag=True),
            ExtendedRecord(16, 0, 1, {"lr": 0.1}, GOAL, [0, 4], {"val_error": [0.5, 0.1]}, 50),  # differs only there
            ExtendedRecord(16, 1, 2, {"lr": 0.2}, PRUNED, [], {}, None, note=None)]
    path = curves.write_curves(recs, str(tmp_path / "x.csv.gz"), record_type=ExtendedRecord)
    back = curves.read_curves(path, record_type=ExtendedRecord)
    same_records(back, recs)  # already in file order: batch size, trial id, then the cells ("rerun" < "search")
    # a file from before the fields existed reads with their defaults
    old = curves.write_curves([TrialRecord(16, 0, 1, {"lr": 0.1}, GOAL, [0], {"val_error": [0.5]})],
                              str(tmp_path / "old.csv.gz"))
    (rec,) = curves.read_curves(old, record_type=ExtendedRecord)
    assert (rec.note, rec.scale, rec.weight, rec.flag, rec.steps) == (None, {}, 1.0, False, [0])
    # and a file with fields this version does not know is refused, not silently cut
    with pytest.raises(ValueError, match=r"columns \['note', 'scale', 'weight', 'flag'\] "
                                         r"are not fields of TrialRecord"):
        curves.read_curves(path)


def test_bad_records_are_refused_before_writing(tmp_path):
    target = tmp_path / "c.csv.gz"
    bad = [(TrialRecord(8, 0, 0, {}, GOAL, [0, 1], {"val_loss": [1.0]}), r"trial 0 \(batch size 8\): metric "
            r"'val_loss' has 1 values for 2 evaluated steps"),
           (TrialRecord(8, 0, 0, {}, GOAL, [], {"val_loss": []}), "has no evaluations but metric entries"),
           (TrialRecord(8.0, 0, 0, {}, GOAL), "field 'batch_size': expected an integer"),
           (TrialRecord(8, 0, 0, {}, GOAL, [0.5], {}), "evaluation 0: expected an integer"),
           (TrialRecord(8, 0, 0, {}, GOAL, [0], {"m": ["x"]}), "expected a number"),
           (TrialRecord(8, 0, 0, {"lr": object()}, GOAL), "field 'hparams'")]
    for rec, message in bad:
        with pytest.raises(ValueError, match=message):
            curves.write_curves([awkward_records()[0], rec], str(target))
    with pytest.raises(ValueError, match="two trials with identical fields"):
        curves.write_curves([awkward_records()[0]] * 2, str(target))
    with pytest.raises(TypeError, match="expected TrialRecord objects, got ExtendedRecord"):
        curves.write_curves([ExtendedRecord(8, 0, 0, {}, GOAL)], str(target))
    assert not target.exists()


def write_text(path, text: str) -> str:
    with gzip.open(path, "wt") as f:
        f.write(text)
    return str(path)


def test_bad_files_get_clear_errors(tmp_path):
    head = ('# {"metrics": ["m"], "schema": "fastsgd.curves/1"}\n'
            'batch_size,trial_id,seed,hparams,outcome,max_steps,step,m\n')
    cases = [("batch_size,step\n8,0\n", "not a fastsgd curves file"),
             ('# {"schema": "fastsgd.curves/2", "metrics": []}\n', "schema 'fastsgd.curves/2'"),
             (head + '8,0,0,{},goal,,0,1.0\n8,0,0,{},goal,,1,\n', "metric 'm' is missing in some evaluations"),
             (head + '8,0,0,{},goal,,0\n', "line 3: 7 cells, expected 8"),
             (head + 'x,0,0,{},goal,,0,1.0\n', "column 'batch_size'"),
             (head + '8,0,0,{},goal,,0,1.0\n8,1,0,{},goal,,0,1.0\n8,0,0,{},goal,,1,1.0\n', "not together"),
             (head + '8,0,0,{},goal,,,\n8,0,0,{},goal,,1,1.0\n', "a row without a step must be the trial's only"),
             (head.replace(",max_steps", "") + '8,0,0,{},goal,0,1.0\n', None),  # max_steps has a default
             (head.replace("seed,", "") + '8,0,{},goal,,0,1.0\n', "field 'seed', which has no default")]
    for i, (text, message) in enumerate(cases):
        path = write_text(tmp_path / f"{i}.csv.gz", text)
        if message is None:
            assert curves.read_curves(path)[0].max_steps is None
        else:
            with pytest.raises(ValueError, match=message):
                curves.read_curves(path)


def tiny_storage(path) -> StudyStorage:
    """A study database with evaluated, finished and never-evaluated trials, no training needed."""
    store = StudyStorage(str(path), "w/nesterov/tuned", {"seed": 0, "trials": 3})
    for bs in (8, 32):
        study = store.batch_study(bs, 100)
        store.enqueue(study, [{"index": i, "point": {"lr": 0.1 * (i + 1)},
                               "hparams": {"lr": 0.1 * (i + 1), "momentum": 0.9}, "seed": 10 * i + bs}
                              for i in range(3)])
        claimed = store.claim(study, 3)
        for (trial, spec), (outcome, n) in zip(claimed, [(GOAL, 3), (INFEASIBLE, 2), ("running", 0)]):
            for step in range(n):
                store.record_eval(trial, step * bs, {"val_error": 1.0 / (step + 1 + spec.trial_id),
                                                     "val_loss": float("nan") if outcome == INFEASIBLE else 2.0})
            if outcome != "running":
                store.finish(study, trial, TrialResult(spec=spec, outcome=outcome, end_step=n,
                                                       steps_to_result=n if outcome == GOAL else None))
    return store


def test_load_records_from_directory_file_or_database(tmp_path):
    store = tiny_storage(tmp_path / "study.db")
    from_db = store.records()
    assert [r.outcome for r in from_db] == [GOAL, INFEASIBLE, "running"] * 2
    same_records(curves.load_records(str(tmp_path)), from_db)               # the directory: only study.db
    same_records(curves.load_records(str(tmp_path / "study.db")), from_db)  # the database itself
    path = curves.write_curves(from_db, str(tmp_path))
    same_records(curves.load_records(str(tmp_path)), from_db)               # the directory: the curves file
    same_records(curves.load_records(path), from_db)
    os.remove(str(tmp_path / "study.db"))
    same_records(curves.load_records(str(tmp_path)), from_db)
    os.mkdir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no curves.csv.gz or study.db"):
        curves.load_records(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no study database"):
        curves.load_records(str(tmp_path / "missing.db"))


def test_database_with_several_studies_needs_a_name(tmp_path):
    db = tmp_path / "shared.db"
    tiny_storage(db)
    StudyStorage(str(db), "other/sgd/tuned", {"seed": 1})
    with pytest.raises(ValueError, match=r"holds 2 studies \(other/sgd/tuned, w/nesterov/tuned\); name one"):
        curves.load_records(str(db))
    assert len(curves.load_records(str(db), study_name="w/nesterov/tuned")) == 6
    with pytest.raises(ValueError, match="has no study 'nope'"):
        curves.load_records(str(db), study_name="nope")


def test_convert_command_writes_the_curves_of_a_database(tmp_path, capsys):
    store = tiny_storage(tmp_path / "study.db")
    assert curves.main([str(tmp_path)]) == 0
    same_records(curves.read_curves(str(tmp_path / curves.FILENAME)), store.records())
    assert curves.read_header(str(tmp_path / curves.FILENAME))["study"] == "w/nesterov/tuned"
    assert "6 trials, 12 rows" in capsys.readouterr().out


def test_study_summary_writes_the_curves_file(tmp_path, monkeypatch):
    """The runner's summarize() writes OUT/curves.csv.gz next to study_summary.json, holding what the
    database holds, so the study re-analyses from the text file alone (plots left out for speed)."""
    from fastsgd.study import render
    from fastsgd.study.steps import runner

    monkeypatch.setattr(render, "write_study_figures", lambda summary, records, out: [])
    store = tiny_storage(tmp_path / "study.db")
    config = runner.StudyConfig(out=str(tmp_path), workload="w", optimizer="nesterov", batch_sizes=[8, 32],
                                trials=3, goal=0.4)
    space = runner.search.validate_space(runner.search.default_space("nesterov"), "nesterov")
    summary = runner.summarize(config, store, 0.4, "val_error", space, wall_seconds=1.0)
    same_records(curves.read_curves(str(tmp_path / curves.FILENAME)), store.records())
    assert curves.read_header(str(tmp_path / curves.FILENAME))["study"] == "w/nesterov/tuned"
    os.remove(str(tmp_path / "study.db"))
    again = curves.reanalyze(str(tmp_path))
    assert [r["steps"] for r in again["per_batch_size"]] == [r["steps"] for r in summary["per_batch_size"]] \
        == [8, 32]  # trial 1 (infeasible later) beats 0.4 at its second evaluation
    assert again["fit"] == summary["fit"]


@pytest.mark.parametrize("study_dir", COMMITTED, ids=os.path.basename)
def test_committed_curves_reproduce_the_committed_summary(study_dir):
    """The committed curves files are the record of the MNIST-1D studies: analysed again they give
    the committed per-batch-size steps, best trials, trial counts and S(B) fit (the intervals too when the
    summary was written by this version's bootstrap, schema /2)."""
    assert os.path.isfile(os.path.join(study_dir, curves.FILENAME))
    with open(os.path.join(study_dir, "study_summary.json")) as f:
        summary = json.load(f)
    result = curves.reanalyze(study_dir)
    keys = ("batch_size", "steps", "best_trial", "trials", "reached_goal", "infeasible", "budget", "pruned",
            "unfinished", "max_steps", "best_hparams", "best_effective_lr", "at_edge")
    assert [{k: r[k] for k in keys} for r in result["per_batch_size"]] == \
        [{k: r[k] for k in keys} for r in summary["per_batch_size"]]
    fit = summary["fit"]
    for k in ("S_min", "E_min", "B_crit"):
        assert result["fit"][k] == pytest.approx(fit[k], rel=1e-9), k
    assert result["fit"]["points"] == fit["points"] and result["goal"] == summary["goal"]
    if summary["schema"] == analysis.SCHEMA:  # written by this version's analysis: everything agrees
        for k in ("S_min_ci", "E_min_ci", "B_crit_ci"):
            assert result["fit"][k] == pytest.approx(fit[k], rel=1e-9), k
        assert result["warnings"] == summary["warnings"]


def test_reanalyze_at_another_goal(tmp_path):
    """A harder goal than the run goal is flagged; an easier one needs no more steps."""
    study_dir = COMMITTED[0]
    with open(os.path.join(study_dir, "study_summary.json")) as f:
        run_goal = json.load(f)["goal"]["value"]
    easier, harder = curves.reanalyze(study_dir, goal=run_goal + 0.05, n_boot=0), \
        curves.reanalyze(study_dir, goal=run_goal - 0.05, n_boot=0)
    assert harder["goal"]["harder_than_run_goal"] and not easier["goal"]["harder_than_run_goal"]
    base = curves.reanalyze(study_dir, n_boot=0)["per_batch_size"]
    for e, b in zip(easier["per_batch_size"], base):
        assert e["steps"] is not None and e["steps"] <= b["steps"]
