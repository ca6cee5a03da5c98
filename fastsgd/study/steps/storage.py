"""Study storage on Optuna: every evaluation written as it happens, resume after a kill.

Layout in the Optuna storage (SQLite file by default; any SQLAlchemy URL, e.g.
PostgreSQL, lets many processes on many machines share one study):

- one Optuna study per batch size, named ``"<study name>/B<batch size>"``,
  with user attrs ``config`` (the study configuration, checked on resume),
  ``batch_size``, ``max_steps`` and ``enqueued`` (number of trials enqueued);
- one Optuna trial per study trial, *enqueued* up front with the quasi-random
  point as its params (so even trial 0 is quasi-random) and user attrs
  ``index`` (the trial id within the batch size), ``seed``, ``point`` (the
  searched values), ``hparams`` (the full hyperparameters the trial trains
  with), ``role`` (search | refine | reseed), ``base_trial`` (a reseed's
  original), ``stage`` (the enqueue stage, see :meth:`StudyStorage.enqueue`)
  and how it runs: ``max_steps`` (its step budget), ``goal_stop`` (stop at the
  goal) and ``prune``. A trial rerun with a larger budget or without the goal
  stop keeps its index in a new stage; the latest attempt per index is the
  trial's record;
- every evaluation as user attr ``"eval:<step, 7 digits>"`` = {metric: value, "t": unix time};
- at the end: user attrs ``outcome`` (goal | budget | infeasible | pruned) and
  ``end_step``; state COMPLETE with value = steps to result when the goal was
  beaten, else PRUNED (the analysis reads the curves, not the Optuna values);
- a trial left RUNNING by a dead process (same host and its pid gone, or the
  same process in an earlier run, or no write for ``stale_seconds``) is marked
  FAIL with outcome ``interrupted`` — its evaluations stay stored — and its
  point and seed are enqueued again. Trials are deterministic given their seed,
  so the rerun reproduces the lost part exactly; finished trials never rerun.
- a study-level ``"<study name>/meta"`` study holds the ``config`` and, for
  Golmant's goal rule, the computed ``goal``.

Scaling out: run the same command (same ``--storage`` URL, e.g. PostgreSQL)
in several processes or machines. They take enqueued trials atomically from
the shared queue. If two processes reach a new batch size together they may
both enqueue it; the second copy of a trial is then marked FAIL with outcome
``duplicate`` when claimed and never trained (in the rare case both copies are
claimed at the same instant, both train the same seed and the records keep one).
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Dict, List, Optional, Tuple

import optuna
from optuna.trial import TrialState

from fastsgd.study.steps.analysis import FINAL_OUTCOMES, GOAL, TrialRecord
from fastsgd.study.steps.trials import TrialResult, TrialSpec

EVAL_PREFIX = "eval:"
DUPLICATE = "duplicate"  # a second copy of an enqueued trial (two processes enqueued the same batch size)
SPURIOUS = "spurious"    # ask() found no enqueued trial left (another process took it)
STALE_SECONDS = 1800.0


# User attrs that define a trial and how it runs (copied when a trial is enqueued again).
RUN_ATTRS = ("index", "seed", "hparams", "point", "role", "base_trial", "stage", "max_steps", "goal_stop", "prune")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    """Write-ahead log with synchronous=NORMAL: each evaluation is still committed
    before training goes on (safe when the process is killed; only an OS crash
    may lose the last commits), at about a third of the default's cost per write
    (measured 1.6 vs 4-5 ms), which matters with tens of thousands of evaluations."""
    from sqlalchemy import event

    def pragmas(dbapi_connection, _record):
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect, so every pooled connection gets the pragmas


def storage_url(url_or_path: str) -> str:
    """A SQLAlchemy URL as is; a plain path becomes a SQLite file URL."""
    if "://" in url_or_path:
        return url_or_path
    return "sqlite:///" + os.path.abspath(url_or_path)


class StudyStorage:
    """The Optuna storage of one study (all its batch sizes)."""

    def __init__(self, url: str, study_name: str, config: Dict[str, object], *,
                 stale_seconds: float = STALE_SECONDS):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = storage_url(url)
        if self.url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.url[len("sqlite:///"):]) or ".", exist_ok=True)
        self.storage = optuna.storages.RDBStorage(self.url)
        if self.url.startswith("sqlite"):
            _sqlite_wal(self.storage)
        self.name = study_name
        self.config = json.loads(json.dumps(config))  # JSON-normalised, so it compares equal after a round trip
        self.stale_seconds = stale_seconds
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex}
        self.meta = self._study("meta")

    # -- studies ---------------------------------------------------------------------------------
    def _study(self, suffix: str) -> optuna.Study:
        name = f"{self.name}/{suffix}"
        study = optuna.create_study(storage=self.storage, study_name=name, direction="minimize",
                                    load_if_exists=True)
        stored = study.user_attrs.get("config")
        if stored is None:
            study.set_user_attr("config", self.config)
        elif stored != self.config:
            diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            raise ValueError(f"study {name!r} in {self.url} was created with a different configuration "
                             f"(differs in: {', '.join(diff)}); use another --out/--storage or the same settings")
        return study

    def batch_study(self, batch_size: int, max_steps: int) -> optuna.Study:
        study = self._study(f"B{batch_size}")
        if "batch_size" not in study.user_attrs:
            study.set_user_attr("batch_size", int(batch_size))
            study.set_user_attr("max_steps", int(max_steps))
        return study

    def batch_studies(self) -> Dict[int, optuna.Study]:
        """Every batch size of this study found in the storage."""
        out = {}
        for s in optuna.get_all_study_summaries(self.storage, include_best_trial=False):
            if s.study_name.startswith(self.name + "/B") and s.study_name[len(self.name) + 2:].isdigit():
                out[int(s.study_name[len(self.name) + 2:])] = optuna.load_study(
                    study_name=s.study_name, storage=self.storage)
        return dict(sorted(out.items()))

    def get_meta(self, key: str):
        return self.meta.user_attrs.get(key)

    def set_meta(self, key: str, value) -> None:
        self.meta.set_user_attr(key, value)

    # -- trials ----------------------------------------------------------------------------------
    def enqueue(self, study: optuna.Study, trials: List[Dict[str, object]], stage: str = "search") -> bool:
        """Enqueue ``trials`` (dicts of RUN_ATTRS: at least index, point, hparams, seed) once per
        ``stage`` name; a stage already enqueued is left alone (a resume or a second process
        computes the same stages). Returns whether anything was enqueued."""
        key = f"enqueued:{stage}"
        if study.user_attrs.get(key):
            return False
        for t in trials:
            attrs = {"role": "search", "base_trial": None, **t, "stage": stage, "seed": int(t["seed"])}
            study.enqueue_trial(dict(t["point"]), user_attrs=attrs)
        study.set_user_attr(key, len(trials))
        return True

    @staticmethod
    def enqueued(study: optuna.Study) -> Dict[str, int]:
        """Stage name -> number of trials enqueued in it."""
        return {k[len("enqueued:"):]: v for k, v in study.user_attrs.items() if k.startswith("enqueued:")}

    def _stale(self, trial: optuna.trial.FrozenTrial) -> bool:
        owner = trial.user_attrs.get("owner") or {}
        if owner.get("host") == self.owner["host"]:
            if not _pid_alive(int(owner.get("pid", -1))):
                return True
            if owner.get("pid") == self.owner["pid"] and owner.get("run") != self.owner["run"]:
                return True  # this process, an earlier run that raised
        times = [v.get("t", 0.0) for k, v in trial.user_attrs.items() if k.startswith(EVAL_PREFIX)]
        last = max(times + [trial.datetime_start.timestamp() if trial.datetime_start else 0.0])
        return time.time() - last > self.stale_seconds

    def recover_stale(self, study: optuna.Study) -> int:
        """Fail RUNNING trials of dead runs (keeping their evaluations) and enqueue
        their point and seed again. Returns how many were recovered."""
        n = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "index" not in t.user_attrs or not self._stale(t):
                continue
            self.storage.set_trial_user_attr(t._trial_id, "outcome", "interrupted")
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.user_attrs["point"],
                                user_attrs={k: t.user_attrs[k] for k in RUN_ATTRS if k in t.user_attrs})
            n += 1
        return n

    def claim(self, study: optuna.Study, n: int) -> List[Tuple[optuna.Trial, TrialSpec]]:
        """Take up to ``n`` enqueued trials (atomically, so several processes can share a study)."""
        out = []
        while len(out) < n and study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = study.ask()
            attrs = trial.user_attrs
            if "index" not in attrs:  # another process took the last waiting trial first
                trial.set_user_attr("outcome", SPURIOUS)
                study.tell(trial, state=TrialState.FAIL)
                break
            if self._taken(study, trial):
                trial.set_user_attr("outcome", DUPLICATE)
                study.tell(trial, state=TrialState.FAIL)
                continue
            for name, value in attrs["point"].items():
                trial.suggest_float(name, value, value)  # record the point as Optuna params (for dashboards)
            trial.set_user_attr("owner", self.owner)
            out.append((trial, TrialSpec(trial_id=int(attrs["index"]), seed=int(attrs["seed"]),
                                         hparams=dict(attrs["hparams"]))))
        return out

    @staticmethod
    def _taken(study: optuna.Study, trial: optuna.Trial) -> bool:
        """Whether another trial with the same index and stage already runs or has finished: two
        processes that reached a new batch size together may both have enqueued it."""
        index, stage = trial.user_attrs["index"], trial.user_attrs.get("stage")
        return any(t.number != trial.number and t.user_attrs.get("index") == index
                   and t.user_attrs.get("stage") == stage
                   for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE,
                                                                     TrialState.PRUNED)))

    def record_eval(self, trial: optuna.Trial, step: int, metrics: Dict[str, float]) -> None:
        value = {k: float(v) for k, v in metrics.items()}
        value["t"] = time.time()
        self.storage.set_trial_user_attr(trial._trial_id, f"{EVAL_PREFIX}{step:07d}", value)

    def finish(self, study: optuna.Study, trial: optuna.Trial, result: TrialResult) -> None:
        self.storage.set_trial_user_attr(trial._trial_id, "outcome", result.outcome)
        self.storage.set_trial_user_attr(trial._trial_id, "end_step", int(result.end_step))
        if result.outcome == GOAL:
            study.tell(trial, float(result.steps_to_result))
        else:
            study.tell(trial, state=TrialState.PRUNED)

    # -- reading ---------------------------------------------------------------------------------
    def records(self, batch_size: Optional[int] = None) -> List[TrialRecord]:
        """TrialRecords of every batch size (or one), latest attempt per index."""
        studies = self.batch_studies()
        if batch_size is not None:
            studies = {batch_size: studies[batch_size]} if batch_size in studies else {}
        out = []
        for bs, study in studies.items():
            latest: Dict[int, optuna.trial.FrozenTrial] = {}
            for t in study.get_trials(deepcopy=False):
                if ("index" not in t.user_attrs or t.state == TrialState.WAITING
                        or t.user_attrs.get("outcome") in (DUPLICATE, SPURIOUS)):
                    continue
                latest[t.user_attrs["index"]] = t  # trials come in creation order: reruns win
            max_steps = study.user_attrs.get("max_steps")
            out += [frozen_to_record(bs, t, max_steps) for _, t in sorted(latest.items())]
        return out


def frozen_to_record(batch_size: int, t: optuna.trial.FrozenTrial, max_steps: Optional[int]) -> TrialRecord:
    evals = sorted((int(k[len(EVAL_PREFIX):]), v) for k, v in t.user_attrs.items() if k.startswith(EVAL_PREFIX))
    metrics: Dict[str, List[float]] = {}
    for _, m in evals:
        for k, v in m.items():
            if k != "t":
                metrics.setdefault(k, []).append(float(v))
    outcome = t.user_attrs.get("outcome", "running")
    if outcome not in FINAL_OUTCOMES and t.state != TrialState.RUNNING:
        outcome = "interrupted"
    base = t.user_attrs.get("base_trial")
    return TrialRecord(batch_size=batch_size, trial_id=int(t.user_attrs["index"]), seed=int(t.user_attrs["seed"]),
                       hparams=dict(t.user_attrs["hparams"]), outcome=outcome, steps=[s for s, _ in evals],
                       metrics=metrics, max_steps=t.user_attrs.get("max_steps", max_steps),
                       role=t.user_attrs.get("role", "search"), base_trial=None if base is None else int(base))
