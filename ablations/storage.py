"""The study's storage: an Optuna ``RDBStorage`` (SQLite or PostgreSQL) with heartbeats, stale-trial retries
and, on SQLite, transactions that take the write lock first.

The runner (``run.py``), the pruning callback inside a trial's fit (``pruning.py``) and the tests open a
study's database through :func:`make_storage`, so all of them get the same driver, timeout and locking.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage


def quietly(fn, *args, **kwargs):
    """Call ``fn`` without Optuna's ExperimentalWarning (heartbeats have been "experimental" since v2.8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return fn(*args, **kwargs)


def fail_stale(study: optuna.Study) -> None:
    """Mark RUNNING trials whose heartbeat is older than the grace period FAIL (and enqueue their retry)."""
    quietly(optuna.storages.fail_stale_trials, study)


def beat_for_silent_trials(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Record one heartbeat now for every RUNNING trial; returns their numbers. A runner calls it once when
    it starts, after :func:`fail_stale`.

    A runner killed between starting a trial and its heartbeat thread's first beat leaves a RUNNING trial
    with no heartbeat at all, and ``fail_stale_trials`` only compares heartbeats, so that trial never went
    stale and its point was held forever: the resumed study waited on it (seen once, in
    ``test_resume_after_sigkill_reruns_only_what_is_missing``). After this beat it goes stale one grace
    period later like any dead trial. A live trial beats on by itself; a dead one whose beat was already
    older than the grace period was failed by :func:`fail_stale` first, and one with a fresh beat goes
    stale at most one grace period later than it would have."""
    study_id = storage.get_study_id_from_name(study.study_name)
    running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in running:
        quietly(storage.record_heartbeat, storage.get_trial_id_from_study_id_trial_number(study_id, number))
    return running


def default_storage(root: Path, study: str) -> str:
    return f"sqlite:///{root / 'ablate' / f'{study}.db'}"


def normalize_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy >= 2.1 means psycopg 3 by it, while
    the ``[postgres]`` extra installs psycopg2-binary; an explicit ``postgresql+driver://`` is kept."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def make_storage(url: str, grace_period: int = 30) -> RDBStorage:
    """``RDBStorage`` with heartbeats (a dead runner's trials go stale) and retries of stale trials.

    SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (:func:`serialize_sqlite_transactions`), so two
    workers can never both take the same WAITING trial (see there). PostgreSQL's row locks already prevent it.

    ``RetryHeartbeatStaleTrialCallback`` is Optuna >= 4.9's name for ``RetryFailedTrialCallback`` (and
    ``heartbeat_stale_trial_callback`` for ``failed_trial_callback``); older Optuna gets the old names.
    """
    url = normalize_url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # threads and heartbeats write concurrently; isolation_level None: we issue BEGIN ourselves
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        retry = {"heartbeat_stale_trial_callback": quietly(optuna.storages.RetryHeartbeatStaleTrialCallback,
                                                           max_retry=2)}
    else:  # pragma: no cover - Optuna < 4.9
        retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
    kwargs = dict(engine_kwargs=engine_kwargs, heartbeat_interval=max(1, min(10, grace_period // 3)),
                  grace_period=grace_period, **retry)
    for attempt in range(5):
        try:
            storage = quietly(RDBStorage, url, **kwargs)
            if url.startswith("sqlite"):
                serialize_sqlite_transactions(storage.engine)
            return storage
        except sqlalchemy.exc.ArgumentError:  # a bad URL: no use retrying
            raise
        except sqlalchemy.exc.SQLAlchemyError:  # runners starting together race to create the schema
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def serialize_sqlite_transactions(engine: sqlalchemy.engine.Engine) -> None:
    """Start every transaction on ``engine`` with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite
    recipe).

    Optuna takes a WAITING trial by reading it ``FOR UPDATE`` and then setting it RUNNING. SQLite ignores
    ``FOR UPDATE``, and Python's sqlite3 driver runs the read outside any transaction, so two worker threads
    (``optimize(n_jobs=2)``) could both read the same WAITING trial and both set it RUNNING: both then ran the
    same trial, and the second to finish crashed the runner with "Cannot tell a COMPLETE trial" (seen when a
    study resumed after a SIGKILL, whose stale trial is re-enqueued as WAITING). With the write lock taken at
    the start of the transaction, the read and the update are one atomic step. The connection must be in
    the driver's autocommit mode (``isolation_level=None``) so that this BEGIN is the only one.
    """
    sqlalchemy.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
