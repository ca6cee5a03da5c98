"""A study's trials as text: every evaluation of every trial in one gzip-compressed CSV.

The Optuna database (``study.db``) is the working store of a study: written as
trials run, shared between processes, resumable. ``curves.csv.gz`` is the
record to keep and share: the same :class:`TrialRecord` objects the analysis
reads, as a small deterministic text file that :func:`load_records` reads back
exactly, so a study can be re-analysed (:func:`reanalyze`, any goal) without
the database.

Format (schema ``"fastsgd.curves/1"``), UTF-8 text, gzip with mtime 0::

    # {"metrics": ["val_error", "val_loss"], "schema": "fastsgd.curves/1", ...}
    batch_size,trial_id,seed,hparams,outcome,max_steps,...,step,val_error,val_loss
    8,0,1513215994,"{""lr"":2.52,""momentum"":0.0}",infeasible,20000,...,0,0.872,2.299
    ...

- line 1: ``#`` and a JSON object: ``schema``, ``metrics`` (the metric columns)
  and optional provenance (e.g. ``study``);
- line 2: the column names: every field of :class:`TrialRecord` except
  ``steps`` and ``metrics``, in declaration order (so fields added to the
  dataclass are carried without changes here), then ``step``, then one column
  per metric name (sorted);
- one row per evaluation (long format), the trial's fields repeated on each
  row; a trial without evaluations is one row with an empty ``step``;
- cells: integers in decimal, floats as Python's ``repr`` (exact; ``nan``,
  ``inf``, ``-inf``), strings as they are, ``None`` of an optional number as an
  empty cell, anything else (dicts such as ``hparams``, optional strings) as
  compact JSON with sorted keys (so such values must be JSON's own types: string
  keys, lists rather than tuples); a metric cell is empty where the trial has no
  such metric;
- rows sorted by batch size, trial id and the other fields; within a trial in
  evaluation order. The same records therefore always give the same bytes.

With pandas: ``pd.read_csv(path, skiprows=1)``.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import numbers
import os
import typing
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from fastsgd.study.steps.analysis import TrialRecord

SCHEMA = "fastsgd.curves/1"
FILENAME = "curves.csv.gz"
DATABASE = "study.db"
STEP = "step"
CURVE_FIELDS = ("steps", "metrics")  # the per-evaluation fields; all others are per trial


# ---------------------------------------------------------------- cell codecs

Codec = Tuple[Callable[[Any], str], Callable[[str], Any]]


def _encode_int(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"expected an integer, got {v!r}")
    return str(int(v))


def _encode_float(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"expected a number, got {v!r}")
    return repr(float(v))


def _encode_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def _encode_bool(v: Any) -> str:
    if not isinstance(v, bool):
        raise TypeError(f"expected True or False, got {v!r}")
    return "true" if v else "false"


def _decode_bool(s: str) -> bool:
    if s not in ("true", "false"):
        raise ValueError(f"expected true or false, got {s!r}")
    return s == "true"


def _encode_json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


_SCALARS: Dict[Any, Codec] = {int: (_encode_int, int), float: (_encode_float, float), str: (_encode_str, str),
                              bool: (_encode_bool, _decode_bool)}
_JSON: Codec = (_encode_json, json.loads)


def _codec(hint: Any) -> Codec:
    """How a field of this type annotation is written to and read from a cell."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        if inner in (int, float, bool):  # numbers are never empty, so an empty cell can mean None
            enc, dec = _SCALARS[inner]
            return (lambda v: "" if v is None else enc(v)), (lambda s: None if s == "" else dec(s))
    return _JSON  # dicts, lists, optional strings (null vs ""), anything else


def _trial_fields(record_type: type) -> List[Tuple[dataclasses.Field, Codec]]:
    """The per-trial fields of ``record_type`` (TrialRecord or a dataclass derived from it) and their codecs."""
    if not (dataclasses.is_dataclass(record_type) and issubclass(record_type, TrialRecord)):
        raise TypeError(f"curves: record_type must be TrialRecord or a dataclass derived from it, got {record_type!r}")
    hints = typing.get_type_hints(record_type)
    return [(f, _codec(hints[f.name])) for f in dataclasses.fields(record_type) if f.name not in CURVE_FIELDS]


def _describe(r: TrialRecord) -> str:
    return f"trial {r.trial_id!r} (batch size {r.batch_size!r})"


# ---------------------------------------------------------------- writing

def _record_rows(r: TrialRecord, record_type: type, fields_codecs,
                 metric_names: Sequence[str]) -> Tuple[Tuple[str, ...], List[List[str]]]:
    if type(r) is not record_type:  # a subclass's extra fields would be lost
        raise TypeError(f"curves: expected {record_type.__name__} objects, got {type(r).__name__}")
    cells = []
    for f, (enc, _) in fields_codecs:
        try:
            cells.append(enc(getattr(r, f.name)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"curves: {_describe(r)}: field {f.name!r}: {exc}") from None
    for name, values in r.metrics.items():
        if len(values) != len(r.steps):
            raise ValueError(f"curves: {_describe(r)}: metric {name!r} has {len(values)} values for "
                             f"{len(r.steps)} evaluated steps")
    if not r.steps:
        if r.metrics:
            raise ValueError(f"curves: {_describe(r)} has no evaluations but metric entries {sorted(r.metrics)}; "
                             "a curves file holds metrics per evaluation")
        return tuple(cells), [cells + [""] * (1 + len(metric_names))]
    rows = []
    for i, step in enumerate(r.steps):
        try:
            row = cells + [_encode_int(step)]
            row += [_encode_float(r.metrics[m][i]) if m in r.metrics else "" for m in metric_names]
        except TypeError as exc:
            raise ValueError(f"curves: {_describe(r)}, evaluation {i}: {exc}") from None
        rows.append(row)
    return tuple(cells), rows


def curves_bytes(records: Iterable[TrialRecord], *, meta: Optional[Dict[str, Any]] = None,
                 record_type: type = TrialRecord) -> bytes:
    """The gzip-compressed curves file of ``records`` (see the module docstring)."""
    records = list(records)
    fields_codecs = _trial_fields(record_type)
    metric_names = sorted({m for r in records if isinstance(r, record_type) for m in r.metrics})
    blocks = []
    for r in records:
        key, rows = _record_rows(r, record_type, fields_codecs, metric_names)
        blocks.append(((r.batch_size, r.trial_id, key), rows))
    blocks.sort(key=lambda b: b[0])
    for (a, _), (b, _) in zip(blocks, blocks[1:]):
        if a[2] == b[2]:
            raise ValueError(f"curves: two trials with identical fields ({', '.join(a[2])}); the file could not "
                             "tell their evaluations apart")
    header = dict(meta or {})
    header.update(schema=SCHEMA, metrics=metric_names)
    text = io.StringIO()
    text.write("# " + json.dumps(header, sort_keys=True, separators=(", ", ": ")) + "\n")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([f.name for f, _ in fields_codecs] + [STEP] + metric_names)
    for _, rows in blocks:
        writer.writerows(rows)
    raw = io.BytesIO()
    # mtime=0 and no file name in the gzip header: identical records give identical bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(text.getvalue().encode("utf-8"))
    return raw.getvalue()


def write_curves(records: Iterable[TrialRecord], path: str, *, meta: Optional[Dict[str, Any]] = None,
                 record_type: type = TrialRecord) -> str:
    """Write ``records`` to ``path`` (a directory means ``path/curves.csv.gz``), atomically.
    ``meta``: provenance for the header line (JSON-serialisable). Returns the file written."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    data = curves_bytes(records, meta=meta, record_type=record_type)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- reading

def read_header(path: str) -> Dict[str, Any]:
    """The JSON object of a curves file's first line; ValueError if it is not a curves file this version reads."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return _parse_header(path, f.readline())


def _parse_header(path: str, line: str) -> Dict[str, Any]:
    try:
        header = json.loads(line[1:]) if line.startswith("#") else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or not str(header.get("schema", "")).startswith("fastsgd.curves/"):
        raise ValueError(f"{path}: not a fastsgd curves file (first line {line[:80]!r})")
    if header["schema"] != SCHEMA:
        raise ValueError(f"{path}: schema {header['schema']!r}; this version of fastsgd reads {SCHEMA!r}")
    return header


def read_curves(path: str, record_type: type = TrialRecord) -> List[TrialRecord]:
    """The records of a curves file, in the file's order (batch size, trial id). A column the
    file lacks takes the field's default (files written before the field existed)."""
    fields_codecs = _trial_fields(record_type)
    known = {f.name: (f, codec) for f, codec in fields_codecs}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        header = _parse_header(path, f.readline())
        reader = csv.reader(f)
        columns = next(reader, None)
        if columns is None or STEP not in columns:
            raise ValueError(f"{path}: no column named {STEP!r} in the column line {columns}")
        n_fields = columns.index(STEP)
        names, metric_names = columns[:n_fields], columns[n_fields + 1:]
        if metric_names != list(header.get("metrics", [])):
            raise ValueError(f"{path}: metric columns {metric_names} differ from the header's {header.get('metrics')}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{path}: columns {unknown} are not fields of {record_type.__name__} in this version "
                             "of fastsgd")
        defaults = {}
        for name, (fld, _) in known.items():
            if name in names:
                continue
            if fld.default is not dataclasses.MISSING:
                defaults[name] = fld.default
            elif fld.default_factory is not dataclasses.MISSING:
                defaults[name] = fld.default_factory()
            else:
                raise ValueError(f"{path}: no column for the {record_type.__name__} field {name!r}, which has no "
                                 "default")

        groups: List[Tuple[Tuple[str, ...], int, List[List[str]]]] = []  # (trial cells, first line, rows)
        for line_no, row in enumerate(reader, start=3):
            if len(row) != len(columns):
                raise ValueError(f"{path}, line {line_no}: {len(row)} cells, expected {len(columns)}")
            key = tuple(row[:n_fields])
            if not groups or groups[-1][0] != key:
                groups.append((key, line_no, []))
            groups[-1][2].append(row[n_fields:])
    if len({g[0] for g in groups}) != len(groups):
        raise ValueError(f"{path}: the rows of a trial are not together (the file was not written by write_curves)")
    records = []
    for key, line_no, rows in groups:
        where = f"{path}, trial starting on line {line_no}"
        values = dict(defaults)
        for name, cell in zip(names, key):
            try:
                values[name] = known[name][1][1](cell)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: column {name!r}: {exc}") from None
        records.append(record_type(**values, **_curve(rows, metric_names, where)))
    return records


def _curve(rows: List[List[str]], metric_names: Sequence[str], where: str) -> Dict[str, Any]:
    """``steps`` and ``metrics`` of one trial from its rows (step cell, then metric cells)."""
    if rows[0][0] == "":
        if len(rows) > 1 or any(rows[0][1:]):
            raise ValueError(f"{where}: a row without a step must be the trial's only row and have no metric values")
        return {"steps": [], "metrics": {}}
    steps, metrics = [], {}
    for j, name in enumerate(metric_names):
        cells = [row[j + 1] for row in rows]
        if all(c == "" for c in cells):
            continue  # the trial has no such metric
        if any(c == "" for c in cells):
            raise ValueError(f"{where}: metric {name!r} is missing in some evaluations of the trial")
        try:
            metrics[name] = [float(c) for c in cells]
        except ValueError as exc:
            raise ValueError(f"{where}: metric {name!r}: {exc}") from None
    try:
        steps = [int(row[0]) for row in rows]
    except ValueError as exc:
        raise ValueError(f"{where}: column {STEP!r}: {exc}") from None
    return {"steps": steps, "metrics": metrics}


# ---------------------------------------------------------------- loading a study

def open_study_storage(url_or_path: str, study_name: Optional[str] = None):
    """The :class:`~fastsgd.study.steps.storage.StudyStorage` of a study in an Optuna storage
    (a SQLite path or a SQLAlchemy URL).

    ``study_name`` (``"<workload>/<optimizer>/<protocol>"``) may be left out when the storage holds
    one study; its stored configuration is used, so nothing else about the study needs to be known.
    """
    import optuna

    from fastsgd.study.steps.storage import StudyStorage, storage_url

    url = storage_url(url_or_path)
    if url.startswith("sqlite:///") and not os.path.isfile(url[len("sqlite:///"):]):
        raise FileNotFoundError(f"no study database at {url[len('sqlite:///'):]!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    names = sorted(s.study_name[:-len("/meta")] for s in optuna.get_all_study_summaries(storage, False)
                   if s.study_name.endswith("/meta"))
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}); name one")
        study_name = names[0]
    elif study_name not in names:
        raise ValueError(f"{url} has no study {study_name!r}; it has {', '.join(names) or 'none'}")
    config = optuna.load_study(study_name=study_name + "/meta", storage=storage).user_attrs.get("config")
    return StudyStorage(url, study_name, config)


def storage_records(url_or_path: str, study_name: Optional[str] = None) -> List[TrialRecord]:
    """The TrialRecords of a study in an Optuna storage (see :func:`open_study_storage`)."""
    return open_study_storage(url_or_path, study_name).records()


def load_records(path: str, study_name: Optional[str] = None) -> List[TrialRecord]:
    """The TrialRecords of a study: ``path`` is a study directory (its curves.csv.gz, else its
    study.db), a curves file, or a study database (SQLite path or SQLAlchemy URL, see
    :func:`storage_records`). In a directory with both files, the curves file is what the
    last completed run wrote; the database may hold more if a later run was interrupted."""
    if os.path.isdir(path):
        curves, db = os.path.join(path, FILENAME), os.path.join(path, DATABASE)
        if os.path.isfile(curves):
            return read_curves(curves)
        if os.path.isfile(db):
            return storage_records(db, study_name)
        raise FileNotFoundError(f"no {FILENAME} or {DATABASE} in {path!r}")
    if path.endswith(".csv.gz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no curves file at {path!r}")
        return read_curves(path)
    return storage_records(path, study_name)


def reanalyze(study_dir: str, *, goal: Optional[float] = None, n_boot: int = 1000) -> Dict[str, Any]:
    """Analyse a finished study again from its stored records, with the settings stored in its
    ``study_summary.json`` (the same analysis the study ran:
    :func:`fastsgd.study.steps.runner.analyze_study`) at ``goal`` (default: the goal it ran with)."""
    from fastsgd.study.steps.runner import StudyConfig, analyze_study

    with open(os.path.join(study_dir, "study_summary.json")) as f:
        summary = json.load(f)
    run_goal = summary["goal"]
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    stored = {k: v for k, v in summary["config"].items() if k in known}
    stored["budgets"] = {int(k): int(v) for k, v in (stored.get("budgets") or {}).items()}
    config = StudyConfig(out=study_dir, **stored)
    if goal is not None:
        config.goal_rule = "fixed"
    return analyze_study(config, load_records(study_dir), run_goal["value"] if goal is None else goal,
                         run_goal["metric"], summary["search_space"], n_boot=n_boot, run_goal=run_goal["value"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fastsgd.study.steps.curves DIR...``: write DIR/curves.csv.gz from DIR/study.db."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastsgd.study.steps.curves", description=main.__doc__)
    p.add_argument("dirs", nargs="+", help="study directories with a study.db")
    p.add_argument("--study-name", default=None, help="the study in a database that holds several")
    a = p.parse_args(argv)
    for d in a.dirs:
        db = os.path.join(d, DATABASE)
        store = open_study_storage(db, a.study_name)
        records = store.records()
        out = write_curves(records, os.path.join(d, FILENAME), meta={"study": store.name})
        n = sum(max(len(r.steps), 1) for r in records)
        print(f"{out}: {len(records)} trials, {n} rows, {os.path.getsize(out)} bytes (from {os.path.getsize(db)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
