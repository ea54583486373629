"""The study's storage: an Optuna ``RDBStorage`` (SQLite or PostgreSQL) with heartbeats, stale-trial retries
and, on SQLite, transactions that take the write lock first.

The runner (``run.py``), the pruning callback inside a trial's fit (``pruning.py``) and the tests open a
study's database through :func:`make_storage`, so all of them get the same driver, timeout and locking.

Credentials stay secret: every URL shown to a person goes through :func:`public_url` (the password as
``***``), and the runner also takes its URL from ``GRPO_LAB_STORAGE`` (:data:`STORAGE_ENV`), which keeps it
out of shell history and of ``ps``. A server that cannot be reached, a refused login or a missing database
is a ``UserError`` naming host, port and database (:func:`connection_error`), checked before anything else;
a server that goes away mid-study is one line too (:func:`lost_connection`), and a restarted one is
reconnected to (``pool_pre_ping``: a pooled connection the restart killed is replaced, not used).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from grpo_lab.system.errors import UserError

STORAGE_ENV = "GRPO_LAB_STORAGE"
"""Environment variable the runner reads its storage URL from when ``--storage`` is not given."""
CONNECT_TIMEOUT_S = 10
log = logging.getLogger(__name__)


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


def storage_url(given: str | None, root: Path, study: str) -> str:
    """The study's URL: ``--storage``, else ``$GRPO_LAB_STORAGE``, else the SQLite file under ``root``."""
    return given or os.environ.get(STORAGE_ENV) or default_storage(root, study)


ENV_URL = f"env:{STORAGE_ENV}"
"""What a trial's config names as its storage when the URL holds a password: :func:`make_storage` reads the
URL from ``$GRPO_LAB_STORAGE``, which the runner sets and its trials inherit, so ``trial.yaml`` and the
fit's saved ``config.yaml`` never hold the password."""


def trial_storage_url(url: str) -> str:
    """``url`` for a trial's config: :data:`ENV_URL` when it holds a password, else itself."""
    try:
        return ENV_URL if make_url(url).password else url
    except sqlalchemy.exc.ArgumentError:
        return url


def resolve_url(url: str) -> str:
    """:data:`ENV_URL` as the URL in ``$GRPO_LAB_STORAGE``; any other URL as it is."""
    if url != ENV_URL:
        return url
    if not os.environ.get(STORAGE_ENV):
        raise UserError(f"storage {ENV_URL} names ${STORAGE_ENV}, which is not set")
    return os.environ[STORAGE_ENV]


def public_url(url: str) -> str:
    """``url`` as it may be printed, logged or stored: its password as ``***`` (SQLAlchemy's
    ``render_as_string(hide_password=True)``; a string SQLAlchemy cannot parse gets anything between
    ``scheme://user:`` and ``@`` masked)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def describe_target(url: str) -> str:
    """``host H, port P, database D`` of a server URL, ``file F`` of SQLite (no password)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"file {u.database}"
    return f"host {u.host or 'localhost'}, port {u.port or 'default'}, database {u.database or '(default)'}"


def _reason(err: BaseException) -> str:
    """The first line of the driver's message (psycopg's next lines are hints), without the SQL."""
    orig = getattr(err, "orig", None) or err.__cause__ or err
    first = next((line.strip() for line in str(orig).splitlines() if line.strip()), type(orig).__name__)
    return first


def connection_error(url: str, err: BaseException) -> UserError:
    """A user's error for a database that cannot be opened: the server, not the password."""
    return UserError(f"cannot open the study's database {public_url(url)} ({describe_target(url)}): "
                     f"{_reason(err)}; check the server, the user and the database name")


def lost_connection(url: str, err: BaseException) -> UserError:
    """A user's error for a database that went away mid-study (finished trials are kept)."""
    return UserError(f"lost the connection to the study's database {public_url(url)} "
                     f"({describe_target(url)}): {_reason(err)}; rerun the same command to resume")


def is_connection_loss(err: BaseException) -> bool:
    """``err`` (or an exception it was raised from) is the driver losing or failing its connection."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def check_connection(url: str, engine_kwargs: dict[str, Any]) -> None:
    """Open and close one connection to ``url``: a :func:`connection_error` when it fails."""
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as err:
        raise connection_error(url, err) from None
    finally:
        engine.dispose()


class BeatingRDBStorage(RDBStorage):
    """``RDBStorage`` whose heartbeat survives a database that is away for a moment (a server restart):
    Optuna's heartbeat thread ends on the first error, with a traceback on the console, and the trial then
    goes stale although it runs on. A failed beat here is one warning line; the next beat reconnects."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
            log.warning("warning: heartbeat of trial id %d not recorded (%s); retrying at the next beat",
                        trial_id, _reason(err))


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
    A database that cannot be opened is :func:`connection_error` (a ``UserError``), before any retry.
    """
    url = normalize_url(resolve_url(url))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # threads and heartbeats write concurrently; isolation_level None: we issue BEGIN ourselves
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    elif url.startswith("postgresql"):  # a restarted server: replace dead pooled connections, do not use them
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    check_connection(url, engine_kwargs)
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        retry = {"heartbeat_stale_trial_callback": quietly(optuna.storages.RetryHeartbeatStaleTrialCallback,
                                                           max_retry=2)}
    else:  # pragma: no cover - Optuna < 4.9
        retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
    kwargs = dict(engine_kwargs=engine_kwargs, heartbeat_interval=max(1, min(10, grace_period // 3)),
                  grace_period=grace_period, **retry)
    for attempt in range(5):
        try:
            storage = quietly(BeatingRDBStorage, url, **kwargs)
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
