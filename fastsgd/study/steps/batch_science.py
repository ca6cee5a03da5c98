"""Export to and import from the batch_science directory layout (Shallue et al. 2019's
published measurements, google-research/batch_science), so a fastsgd study can be
compared with Google's data and read by their loader::

    ROOT/<dataset>/<model>/<optimizer>/<batch_size>/study.json
    ROOT/<dataset>/<model>/<optimizer>/<batch_size>/<trial_id>/metadata.json
    ROOT/<dataset>/<model>/<optimizer>/<batch_size>/<trial_id>/measurements.csv

- ``study.json``: {"dataset", "model", "optimizer", "batch_size", plus any extra study info}
- ``metadata.json``: {"trial_id", "status", "hparams", "seed", "max_steps",
  "fastsgd_outcome", "fastsgd_max_steps", "fastsgd_role", "fastsgd_base_trial"}
- ``measurements.csv``: a ``step`` column, then one column per metric.

Status mapping. batch_science's loader reads status COMPLETE as "ran its full
budget" (``max_steps``) and leaves INCOMPLETE trials out, while a fastsgd trial
stops early at the goal or when pruned; its measured curve is still exact up to
where it stopped. So every *finished* trial is exported as a complete
measurement of a shorter run:

==================  ===========  ===========================================
fastsgd outcome     status       metadata ``max_steps``
==================  ===========  ===========================================
goal, budget,       COMPLETE     the last measured step (the curve is whole
pruned                           up to there)
infeasible          INFEASIBLE   the last measured step
running,            INCOMPLETE   the last measured step (not a finished run)
interrupted
==================  ===========  ===========================================

The real budget is ``fastsgd_max_steps``, the exact outcome ``fastsgd_outcome``,
so a round trip loses nothing. A loader computing steps to result as the
minimum over a batch size's COMPLETE trials then gets fastsgd's answer for any
goal the stored curves reach; a trial's curve beyond its last step is unknown,
not bad (a harder goal than the run's needs the ``--full-curves`` reruns).
Reseeds (``fastsgd_role`` "reseed": the best setting rerun with other seeds,
``fastsgd_base_trial`` its original) are exported too; a loader that takes the
minimum over trials should leave them out (``roles`` of :func:`export_records`
does that at export time), or it counts seed luck as search.

Importing accepts directories written by other tools too: a missing
``fastsgd_outcome`` is derived from the status, missing ``fastsgd_max_steps``
falls back to ``max_steps``, a missing role is "search", a missing seed -1.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from fastsgd.study.steps.analysis import BUDGET, GOAL, INFEASIBLE, PRUNED, TrialRecord

_STATUS = {GOAL: "COMPLETE", BUDGET: "COMPLETE", PRUNED: "COMPLETE", INFEASIBLE: "INFEASIBLE"}  # else INCOMPLETE
_OUTCOME = {"COMPLETE": BUDGET, "INFEASIBLE": INFEASIBLE, "INCOMPLETE": PRUNED}


def workload_dir(root: str, dataset: str, model: str, optimizer: str) -> str:
    for what, name in (("dataset", dataset), ("model", model), ("optimizer", optimizer)):
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"batch_science export: {what} name {name!r} cannot be a directory name")
    return os.path.join(root, dataset, model, optimizer)


def export_records(records: List[TrialRecord], root: str, *, dataset: str, model: str, optimizer: str,
                   study_info: Optional[Dict[str, object]] = None, roles: Optional[Sequence[str]] = None) -> str:
    """Write ``records`` (any batch sizes; only those whose role is in ``roles``, default
    all) under ``root``; returns the workload directory."""
    base = workload_dir(root, dataset, model, optimizer)
    by_bs: Dict[int, List[TrialRecord]] = {}
    for r in records:
        if roles is None or r.role in roles:
            by_bs.setdefault(int(r.batch_size), []).append(r)
    for bs, recs in by_bs.items():
        study_dir = os.path.join(base, str(bs))
        os.makedirs(study_dir, exist_ok=True)
        with open(os.path.join(study_dir, "study.json"), "w") as f:
            json.dump({"dataset": dataset, "model": model, "optimizer": optimizer, "batch_size": bs,
                       **(study_info or {})}, f, indent=2)
        for r in recs:
            trial_dir = os.path.join(study_dir, str(int(r.trial_id)))
            os.makedirs(trial_dir, exist_ok=True)
            with open(os.path.join(trial_dir, "metadata.json"), "w") as f:
                json.dump({"trial_id": int(r.trial_id), "status": _STATUS.get(r.outcome, "INCOMPLETE"),
                           "hparams": r.hparams, "seed": r.seed, "max_steps": int(r.steps[-1]) if r.steps else 0,
                           "fastsgd_outcome": r.outcome, "fastsgd_max_steps": r.max_steps,
                           "fastsgd_role": r.role, "fastsgd_base_trial": r.base_trial}, f, indent=2)
            names = sorted(r.metrics)
            with open(os.path.join(trial_dir, "measurements.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step"] + names)
                for i, step in enumerate(r.steps):
                    w.writerow([step] + [repr(float(r.metrics[n][i])) for n in names])
    return base


def _float(s: str) -> float:
    return math.nan if s in ("", "nan", "NaN") else float(s)


def import_records(workload_path: str) -> Tuple[Dict[int, Dict[str, object]], List[TrialRecord]]:
    """Read a ``<dataset>/<model>/<optimizer>`` directory: (study.json per batch
    size, TrialRecords of every trial). Raises ValueError naming a malformed file."""
    if not os.path.isdir(workload_path):
        raise ValueError(f"batch_science import: {workload_path} is not a directory")
    studies, records = {}, []
    for bs_name in sorted((d for d in os.listdir(workload_path) if d.isdigit()), key=int):
        study_dir = os.path.join(workload_path, bs_name)
        study_file = os.path.join(study_dir, "study.json")
        if not os.path.exists(study_file):
            raise ValueError(f"batch_science import: {study_file} is missing")
        with open(study_file) as f:
            study = json.load(f)
        bs = int(study.get("batch_size", bs_name))
        studies[bs] = study
        for trial_name in sorted((d for d in os.listdir(study_dir) if d.isdigit()), key=int):
            trial_dir = os.path.join(study_dir, trial_name)
            with open(os.path.join(trial_dir, "metadata.json")) as f:
                meta = json.load(f)
            with open(os.path.join(trial_dir, "measurements.csv"), newline="") as f:
                rows = list(csv.reader(f))
            if not rows or rows[0][0] != "step":
                raise ValueError(f"batch_science import: {trial_dir}/measurements.csv needs a 'step' first column")
            names = rows[0][1:]
            steps = [int(float(r[0])) for r in rows[1:]]
            metrics = {n: [_float(r[j + 1]) for r in rows[1:]] for j, n in enumerate(names)}
            outcome = meta.get("fastsgd_outcome") or _OUTCOME.get(meta.get("status"), PRUNED)
            base_trial = meta.get("fastsgd_base_trial")
            records.append(TrialRecord(batch_size=bs, trial_id=int(meta.get("trial_id", trial_name)),
                                       seed=int(meta.get("seed", -1)), hparams=dict(meta.get("hparams", {})),
                                       outcome=outcome, steps=steps, metrics=metrics,
                                       max_steps=meta.get("fastsgd_max_steps", meta.get("max_steps")),
                                       role=meta.get("fastsgd_role", "search"),
                                       base_trial=None if base_trial is None else int(base_trial)))
    if not studies:
        raise ValueError(f"batch_science import: no batch-size directories under {workload_path}")
    return studies, records
