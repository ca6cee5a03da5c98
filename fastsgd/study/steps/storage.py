"""Study storage on Optuna: every evaluation stored, resume after a kill.

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
- the evaluations in chunks, user attrs ``"evals:<first step, 7 digits>"`` =
  {"steps": [...], "t": [unix times], "metrics": {metric: [values]}}: a running
  trial's evaluations are written at least every ``EVAL_FLUSH_SECONDS`` (or
  ``FASTSGD_EVAL_FLUSH_SECONDS``) and at its end. One write per evaluation made the study's database reads grow with
  every evaluation ever stored (Optuna loads a trial with all its attributes);
  chunks keep a trial at a handful of rows. A kill loses at most the last
  seconds of a running trial's curve, which its rerun reproduces anyway.
  (Studies stored one ``"eval:<step>"`` attr per evaluation are still read.)
- at the end: user attrs ``outcome`` (goal | budget | infeasible | pruned) and
  ``end_step``; state COMPLETE with value = steps to result when the goal was
  beaten, else PRUNED (the analysis reads the curves, not the Optuna values);
- a trial left RUNNING by a dead process (same host and its pid gone, or the
  same process in an earlier run, or claimed without an owner written, or no
  heartbeat for ``grace_period``
  seconds: every process writes Optuna's trial heartbeat for the trials it
  trains every ``heartbeat_interval`` seconds, from a background thread, and
  the staleness test uses the database server's clock) is marked FAIL with
  outcome ``interrupted`` — its evaluations stay stored — and its point and
  seed are enqueued again, in the same transaction (a kill in between cannot
  leave it failed and not rerun). Trials are deterministic given their seed, so the
  rerun reproduces the lost part exactly; finished trials never rerun.
- a study-level ``"<study name>/meta"`` study holds the ``config``, for
  Golmant's goal rule the computed ``goal``, and ``train_seconds``: the
  seconds spent training groups of trials, added by every run and worker as
  each group ends.

Scaling out: run the same command (same ``--storage`` URL, e.g. PostgreSQL)
in several processes or machines. They take enqueued trials atomically from
the shared queue (Optuna moves a trial from WAITING to RUNNING under a row
lock). The writes that several processes could make at once — creating the
Optuna schema and the studies with their attributes, enqueueing a batch size,
recovering stale trials, study-level results — run under one cross-process
lock per study: a PostgreSQL advisory lock (released by the server if its
holder dies), a file lock beside a SQLite file. A stage's trials and its
``enqueued:<stage>`` marker are one transaction (see :meth:`StudyStorage.enqueue`),
so a kill never leaves half a stage. Other databases get no lock; should two
processes then enqueue one stage, the second copy of a trial is marked FAIL
with outcome ``duplicate`` when claimed and never trained.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models  # the one-transaction writes below use Optuna's RDB internals,
from optuna.storages._rdb.storage import _create_scoped_session  # pinned by tests/study/test_storage_enqueue.py
from optuna.trial import TrialState

from fastsgd.study.steps.analysis import FINAL_OUTCOMES, GOAL, TrialRecord
from fastsgd.study.steps.trials import TrialResult, TrialSpec

EVAL_PREFIX = "eval:"    # one evaluation per attr (the earlier layout; read, no longer written)
EVALS_PREFIX = "evals:"  # a chunk of evaluations per attr
EVAL_FLUSH_SECONDS = 30.0  # a running trial's buffered evaluations are written at least this often
FLUSH_ENV = "FASTSGD_EVAL_FLUSH_SECONDS"  # overrides it (0: every evaluation at once, e.g. to watch live curves)
DUPLICATE = "duplicate"  # a second copy of an enqueued trial (two processes enqueued the same batch size)
SPURIOUS = "spurious"    # a waiting trial that is no study trial (and, in older studies, a trial ask() made up)
HEARTBEAT_INTERVAL = 10  # seconds between heartbeats of a running trial
GRACE_PERIOD = 60        # seconds without a heartbeat after which a trial counts as abandoned


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
    may lose the last commits), at a fraction of the default's cost per write, which
    matters with tens of thousands of evaluations."""
    from sqlalchemy import event

    def pragmas(dbapi_connection, _record):
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect, so every pooled connection gets the pragmas


def eval_flush_seconds() -> float:
    """``FASTSGD_EVAL_FLUSH_SECONDS`` (seconds >= 0), else ``EVAL_FLUSH_SECONDS``."""
    raw = os.environ.get(FLUSH_ENV)
    if raw is None:
        return EVAL_FLUSH_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{FLUSH_ENV}={raw!r}: need a number of seconds >= 0")
    return value


def _change_state(session, trial_id: int, old: TrialState, new: TrialState):
    """In the caller's transaction: move the trial from ``old`` to ``new`` and return its row, or None
    when it is no longer in ``old``. The state test is part of the UPDATE, the transaction's first
    write: SQLite reads outside the write transaction, so a test before the update would let two
    processes both change the trial."""
    row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
    changed = session.query(models.TrialModel).filter(
        models.TrialModel.trial_id == trial_id, models.TrialModel.state == old,
    ).update({models.TrialModel.state: new}, synchronize_session=False)
    return row if changed == 1 else None


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def cross_process_lock(url: str, name: str) -> Iterator[None]:
    """Hold a lock named ``name`` shared by every process that uses the database at ``url``:
    a session-level advisory lock on PostgreSQL (the server drops it when its holder's
    connection dies, so a killed worker never leaves it taken), an exclusive ``flock`` on
    ``<file>.lock`` for SQLite, nothing for other databases."""
    import sqlalchemy

    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    if backend == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(name)})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})
        finally:
            engine.dispose()
    elif backend == "sqlite" and url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        import fcntl

        with open(url[len("sqlite:///"):] + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


class _Heartbeat:
    """Writes Optuna's heartbeat for the trials this process trains, every ``interval`` seconds."""

    def __init__(self, storage: optuna.storages.RDBStorage, interval: float):
        self.storage, self.interval = storage, interval
        self.trial_ids: set = set()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)  # at once: a claimed trial is never without a heartbeat
        with self.lock:
            self.trial_ids.add(trial_id)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="fastsgd-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # a database hiccup must not kill training; the next beat retries
                    warnings.warn(f"heartbeat of trial {trial_id} not written: {exc}", RuntimeWarning, stacklevel=2)


def storage_url(url_or_path: str) -> str:
    """A SQLAlchemy URL as is; a plain path becomes a SQLite file URL."""
    if "://" in url_or_path:
        return url_or_path
    return "sqlite:///" + os.path.abspath(url_or_path)


class StudyStorage:
    """The Optuna storage of one study (all its batch sizes)."""

    def __init__(self, url: str, study_name: str, config: Dict[str, object], *,
                 heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD):
        if not 0 < heartbeat_interval < grace_period:
            raise ValueError(f"need 0 < heartbeat_interval < grace_period, got {heartbeat_interval} and "
                             f"{grace_period}")
        self.flush_seconds = eval_flush_seconds()  # a bad setting is refused before the database is touched
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = storage_url(url)
        if self.url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.url[len("sqlite:///"):]) or ".", exist_ok=True)
        self.name = study_name
        # Optuna creates its schema on first use without guarding against a second process doing the
        # same (PostgreSQL: UniqueViolation on CREATE TYPE): one process at a time.
        with self.lock("optuna-schema"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat arguments
            self.storage = optuna.storages.RDBStorage(self.url, heartbeat_interval=int(heartbeat_interval),
                                                      grace_period=int(grace_period))
        if self.url.startswith("sqlite"):
            _sqlite_wal(self.storage)
        self.heartbeat = _Heartbeat(self.storage, heartbeat_interval)
        self.config = json.loads(json.dumps(config))  # JSON-normalised, so it compares equal after a round trip
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex}
        self._pending: Dict[int, dict] = {}  # Optuna trial id -> evaluations not yet written
        self._loaded: Dict[str, optuna.Study] = {}  # batch-size studies by name (a study's id never changes)
        self.meta = self._study("meta")

    def lock(self, purpose: str = "study"):
        """The cross-process lock of this study (see :func:`cross_process_lock`)."""
        return cross_process_lock(self.url, f"fastsgd:{self.name}:{purpose}")

    # -- studies ---------------------------------------------------------------------------------
    def _study(self, suffix: str) -> optuna.Study:
        name = f"{self.name}/{suffix}"
        with self.lock():
            study = optuna.create_study(storage=self.storage, study_name=name, direction="minimize",
                                        load_if_exists=True)
            stored = study.user_attrs.get("config")
            if stored is None:
                study.set_user_attr("config", self.config)
        if stored is not None and stored != self.config:
            diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            raise ValueError(f"study {name!r} in {self.url} was created with a different configuration "
                             f"(differs in: {', '.join(diff)}); use another --out/--storage or the same settings")
        return study

    def batch_study(self, batch_size: int, max_steps: int) -> optuna.Study:
        study = self._study(f"B{batch_size}")
        if "max_steps" not in study.user_attrs:  # written last: a kill between the two writes is redone
            with self.lock():
                if "max_steps" not in study.user_attrs:
                    study.set_user_attr("batch_size", int(batch_size))
                    study.set_user_attr("max_steps", int(max_steps))
        return study

    def batch_studies(self) -> Dict[int, optuna.Study]:
        """Every batch size of this study found in the storage. Lists the studies' names only:
        Optuna's study summaries read every trial of every study, which made each call grow with
        the whole study."""
        prefix = self.name + "/B"
        out = {}
        for s in self.storage.get_all_studies():
            if s.study_name.startswith(prefix) and s.study_name[len(prefix):].isdigit():
                study = self._loaded.get(s.study_name)
                if study is None:
                    study = self._loaded[s.study_name] = optuna.load_study(study_name=s.study_name,
                                                                           storage=self.storage)
                out[int(s.study_name[len(prefix):])] = study
        return dict(sorted(out.items()))

    def get_meta(self, key: str):
        return self.meta.user_attrs.get(key)

    def set_meta(self, key: str, value) -> None:
        with self.lock():
            self.meta.set_user_attr(key, value)

    def add_meta(self, key: str, amount: float) -> float:
        """Add ``amount`` to the number stored under ``key`` (0 when absent), read and written under the
        study's lock so that concurrent workers add up; returns the new value."""
        with self.lock():
            value = float(self.meta.user_attrs.get(key) or 0.0) + float(amount)
            self.meta.set_user_attr(key, value)
        return value

    # -- trials ----------------------------------------------------------------------------------
    def enqueue(self, study: optuna.Study, trials: List[Dict[str, object]], stage: str = "search") -> bool:
        """Enqueue ``trials`` (dicts of RUN_ATTRS: at least index, point, hparams, seed) once per
        ``stage`` name; a stage already enqueued is left alone (a resume or a second process
        computes the same stages). Returns whether anything was enqueued.

        The trials and the stage's marker (user attr ``enqueued:<stage>``) are written in one
        database transaction, so a process killed while enqueueing leaves either the whole stage
        or nothing of it: no other process claims a trial of a half-written stage, and a resume
        computes the stage again from the same records and enqueues the same trials."""
        key = f"enqueued:{stage}"
        if study.user_attrs.get(key):
            return False
        with self.lock():
            return self._enqueue_stage(study._study_id, key, trials)

    def _enqueue_stage(self, study_id: int, key: str, trials: List[Dict[str, object]]) -> bool:
        """One transaction: re-check the marker (under a row lock on the study where the database has
        them), add the WAITING trials as ``Study.enqueue_trial`` would, write the marker. Optuna
        commits every trial separately, so this uses the pieces its ``create_new_trial`` is made of
        (``RDBStorage._get_prepared_new_trial`` and the ORM models of optuna.storages._rdb): internals,
        pinned by tests/study/test_storage_enqueue.py."""
        with _create_scoped_session(self.storage.scoped_session) as session:
            study_row = models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            marker = models.StudyUserAttributeModel.find_by_study_and_key(study_row, key, session)
            if marker is not None and json.loads(marker.value_json):
                return False  # another process enqueued the stage while this one waited
            for t in trials:
                self._add_waiting(session, study_id, t["point"], {"role": "search", "base_trial": None, **t,
                                                                 "stage": key[len("enqueued:"):],
                                                                 "seed": int(t["seed"])})
            if marker is None:
                session.add(models.StudyUserAttributeModel(study_id=study_id, key=key,
                                                           value_json=json.dumps(len(trials))))
            else:
                marker.value_json = json.dumps(len(trials))
        return True

    @staticmethod
    def enqueued(study: optuna.Study) -> Dict[str, int]:
        """Stage name -> number of trials enqueued in it."""
        return {k[len("enqueued:"):]: v for k, v in study.user_attrs.items() if k.startswith("enqueued:")}


    def _dead_here(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether the trial's owner was a process on this host that is gone (found without
        waiting for the heartbeat's grace period)."""
        owner = trial.user_attrs.get("owner") or {}
        if owner.get("host") != self.owner["host"]:
            return False
        if not _pid_alive(int(owner.get("pid", -1))):
            return True
        return owner.get("pid") == self.owner["pid"] and owner.get("run") != self.owner["run"]  # an earlier run

    def _never_claimed(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether the trial was taken from the queue but its claim never completed: a live process
        writes the owner within moments of taking it, so no owner after the grace period means the
        process died in between (possibly before its first heartbeat, which staleness needs)."""
        started = trial.datetime_start
        return ("owner" not in trial.user_attrs and started is not None
                and (datetime.datetime.now() - started).total_seconds() > self.storage.grace_period)

    def recover_stale(self, study: optuna.Study) -> int:
        """Fail RUNNING trials of dead runs (keeping their evaluations) and enqueue
        their point and seed again. Returns how many were recovered."""
        with self.lock():
            no_heartbeat = set(self.storage._get_stale_trial_ids(study._study_id))  # the BaseHeartbeat interface
            n = 0
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if "index" not in t.user_attrs or t._trial_id in self.heartbeat.trial_ids:
                    continue
                if t._trial_id not in no_heartbeat and not self._dead_here(t) and not self._never_claimed(t):
                    continue
                n += self._requeue(study._study_id, t)
        return n

    def _requeue(self, study_id: int, t: optuna.trial.FrozenTrial) -> bool:
        """One transaction: mark the RUNNING trial ``t`` FAIL with outcome ``interrupted`` and enqueue
        its point and seed again, so that a kill in between cannot leave it failed without a rerun.
        False when it finished meanwhile."""
        with _create_scoped_session(self.storage.scoped_session) as session:
            row = _change_state(session, t._trial_id, TrialState.RUNNING, TrialState.FAIL)
            if row is None:
                return False  # it finished after all
            row.datetime_complete = datetime.datetime.now()  # as Optuna's set_trial_state_values
            outcome = models.TrialUserAttributeModel.find_by_trial_and_key(row, "outcome", session)
            if outcome is None:
                session.add(models.TrialUserAttributeModel(trial_id=t._trial_id, key="outcome",
                                                           value_json=json.dumps("interrupted")))
            else:
                outcome.value_json = json.dumps("interrupted")
            self._add_waiting(session, study_id, t.user_attrs["point"],
                              {k: t.user_attrs[k] for k in RUN_ATTRS if k in t.user_attrs})
        return True

    def _take(self, trial_id: int) -> bool:
        """Move a WAITING trial to RUNNING, as Optuna does when it pops a trial from the queue (see
        :func:`_change_state`). False when another process took it."""
        with _create_scoped_session(self.storage.scoped_session) as session:
            row = _change_state(session, trial_id, TrialState.WAITING, TrialState.RUNNING)
            if row is None:
                return False
            row.datetime_start = datetime.datetime.now()  # as Optuna's set_trial_state_values
        return True

    def _add_waiting(self, session, study_id: int, point: Dict[str, float], user_attrs: Dict[str, object]) -> None:
        """Add a WAITING trial with ``point`` as its fixed params, as ``Study.enqueue_trial`` does, inside
        the caller's transaction (Optuna's ``create_new_trial`` commits each trial on its own)."""
        template = optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"fixed_params": dict(point)},
                                             user_attrs=user_attrs)
        self.storage._get_prepared_new_trial(study_id, template, session)

    def unfinished(self, study: optuna.Study) -> int:
        """Trials of this batch size still waiting or running (in any process)."""
        return sum("index" in t.user_attrs for t in study.get_trials(
            deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))

    def claim(self, study: optuna.Study, n: int) -> List[Tuple[optuna.Trial, TrialSpec]]:
        """Take up to ``n`` enqueued trials (atomically, so several processes can share a study).

        One read of the waiting trials per call, then each is taken by :meth:`_take`. (Optuna's
        ``ask`` reads every waiting trial again for each trial it takes, which made claiming a batch
        size's trials grow with the square of their number, and its state change is not atomic on
        SQLite.)"""
        out: List[Tuple[optuna.Trial, TrialSpec]] = []
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        taken = self._taken_runs(study) if waiting else set()
        for frozen in waiting:
            if len(out) >= n:
                break
            if not self._take(frozen._trial_id):
                continue  # another process took it first
            trial = optuna.Trial(study, frozen._trial_id)
            self.heartbeat.add(trial._trial_id)
            attrs = frozen.user_attrs  # written at enqueue time, never changed after
            run = (attrs.get("index"), attrs.get("stage"))
            if "index" not in attrs or run in taken:  # not a study trial, or a second copy of one
                trial.set_user_attr("outcome", DUPLICATE if "index" in attrs else SPURIOUS)
                study.tell(trial, state=TrialState.FAIL)
                self.heartbeat.remove(trial._trial_id)
                continue
            taken.add(run)
            for name, value in attrs["point"].items():
                trial.suggest_float(name, value, value)  # record the point as Optuna params (for dashboards)
            trial.set_user_attr("owner", self.owner)
            out.append((trial, TrialSpec(trial_id=int(attrs["index"]), seed=int(attrs["seed"]),
                                         hparams=dict(attrs["hparams"]))))
        return out

    @staticmethod
    def _taken_runs(study: optuna.Study) -> set:
        """(index, stage) of the trials that run or have finished: a second enqueued copy of one of
        them (two processes that reached a new batch size together on a database without the
        study lock may both have enqueued it) is not trained again."""
        return {(t.user_attrs.get("index"), t.user_attrs.get("stage"))
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE,
                                                                  TrialState.PRUNED))
                if "index" in t.user_attrs}

    def record_eval(self, trial: optuna.Trial, step: int, metrics: Dict[str, float]) -> None:
        """Buffer one evaluation; the trial's buffer is written when it is ``EVAL_FLUSH_SECONDS``
        old, and by :meth:`finish`."""
        chunk = self._pending.get(trial._trial_id)
        if chunk is None:
            chunk = self._pending[trial._trial_id] = {"steps": [], "t": [], "metrics": {}, "since": time.monotonic()}
        chunk["steps"].append(int(step))
        chunk["t"].append(time.time())
        for k, v in metrics.items():
            chunk["metrics"].setdefault(k, []).append(float(v))
        if time.monotonic() - chunk["since"] >= self.flush_seconds:
            self.flush_evals(trial)

    def flush_evals(self, trial: optuna.Trial) -> None:
        """Write the trial's buffered evaluations as one chunk."""
        chunk = self._pending.pop(trial._trial_id, None)
        if not chunk or not chunk["steps"]:
            return
        value = {k: chunk[k] for k in ("steps", "t", "metrics")}
        try:
            self.storage.set_trial_user_attr(trial._trial_id, f"{EVALS_PREFIX}{chunk['steps'][0]:07d}", value)
        except UpdateFinishedTrialError:
            pass  # declared abandoned (no heartbeat within the grace period) and rerun elsewhere: the rerun counts

    def finish(self, study: optuna.Study, trial: optuna.Trial, result: TrialResult) -> None:
        self.flush_evals(trial)
        self.heartbeat.remove(trial._trial_id)
        try:
            self.storage.set_trial_user_attr(trial._trial_id, "outcome", result.outcome)
            self.storage.set_trial_user_attr(trial._trial_id, "end_step", int(result.end_step))
            if result.outcome == GOAL:
                study.tell(trial, float(result.steps_to_result))
            else:
                study.tell(trial, state=TrialState.PRUNED)
        except UpdateFinishedTrialError:
            pass  # as in flush_evals

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


def stored_evaluations(user_attrs: Dict[str, object]) -> List[Tuple[int, Dict[str, float]]]:
    """(step, {metric: value}) of every stored evaluation of a trial, in step order (both layouts)."""
    evals = [(int(k[len(EVAL_PREFIX):]), {m: float(x) for m, x in v.items() if m != "t"})
             for k, v in user_attrs.items() if k.startswith(EVAL_PREFIX)]
    for k, chunk in user_attrs.items():
        if k.startswith(EVALS_PREFIX):
            evals += [(int(step), {m: float(vals[i]) for m, vals in chunk["metrics"].items()})
                      for i, step in enumerate(chunk["steps"])]
    return sorted(evals, key=lambda e: e[0])


def frozen_to_record(batch_size: int, t: optuna.trial.FrozenTrial, max_steps: Optional[int]) -> TrialRecord:
    evals = stored_evaluations(t.user_attrs)
    metrics: Dict[str, List[float]] = {}
    for _, m in evals:
        for k, v in m.items():
            metrics.setdefault(k, []).append(v)
    outcome = t.user_attrs.get("outcome", "running")
    if outcome not in FINAL_OUTCOMES and t.state != TrialState.RUNNING:
        outcome = "interrupted"
    base = t.user_attrs.get("base_trial")
    return TrialRecord(batch_size=batch_size, trial_id=int(t.user_attrs["index"]), seed=int(t.user_attrs["seed"]),
                       hparams=dict(t.user_attrs["hparams"]), outcome=outcome, steps=[s for s, _ in evals],
                       metrics=metrics, max_steps=t.user_attrs.get("max_steps", max_steps),
                       role=t.user_attrs.get("role", "search"), base_trial=None if base is None else int(base))
