"""URL -> Optuna RDBStorage with the engine options each database needs.

SQLite (the embedded default): every connection gets a 60 s busy timeout, WAL (readers never block
the writer) and BEGIN IMMEDIATE before the first write of a transaction, so several local worker
processes queue for the write lock instead of failing with "database is locked".

PostgreSQL: a small pool per process (the server allows ~100 connections for all workers), pre-ping
so a connection the server dropped is replaced instead of failing a trial, a connect timeout, and
heartbeats so trials of a worker that vanished are failed and re-queued by the next claim.

Connection failures are translated once, here, into the StorageError hierarchy with one-line
messages that name host, port and database and never the password.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from storage._defaults import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S
from storage._errors import (
    StorageAuthError,
    StorageError,
    StorageMissingError,
    StorageSchemaError,
    StorageUnreachableError,
)
from storage._retry import MAX_PAUSE_S
from storage._schema import foreign_schema, schema_lock, schema_ready
from storage._url import StoreLocation, parse_url

_logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 60.0  # a writer waits this long for the lock before "database is locked"
PG_CONNECT_TIMEOUT_S = 5  # per connection attempt
PG_POOL_SIZE = 3  # per process: the main session, the heartbeat thread, the claim lock
PG_MAX_OVERFLOW = 2
CONNECT_RETRIES = 3  # attempts at an unreachable server before giving up
CONNECT_BACKOFF_S = 0.5  # first pause between attempts; doubles each time

StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def open_storage(
    location: StoreLocation | str,
    *,
    create: bool = True,
    heartbeat: bool = True,
    stale_trial_callback: StaleTrialCallback | None = None,
    retries: int = CONNECT_RETRIES,
    backoff_s: float = CONNECT_BACKOFF_S,
    heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S,
    grace_period_s: int = GRACE_PERIOD_S,
    patience_s: float | None = None,
) -> RDBStorage:
    """Open (and with `create`, initialise) the Optuna store at `location`.

    With `create=False` a SQLite file that does not exist is a StorageMissingError instead of a
    new empty store (read-only commands must not leave files behind). `stale_trial_callback` runs
    for each trial whose heartbeat stopped; the default re-queues it at most twice. An unreachable
    PostgreSQL server is tried `retries` times, or with `patience_s` for that long (pauses capped at
    MAX_PAUSE_S): a worker started while the server restarts waits for it.
    Raises a StorageError subclass with a one-line message for every failure a user can fix.
    """
    if isinstance(location, str):
        location = parse_url(location)
    if location.kind == "sqlite":
        engine_kwargs = _sqlite_engine_kwargs(location, create=create)
    else:
        _probe_postgres(location, retries=retries, backoff_s=backoff_s, patience_s=patience_s)
        engine_kwargs = _postgres_engine_kwargs()
    with warnings.catch_warnings():
        # Heartbeats are flagged experimental; the flag is noise in every command's output.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        heartbeat_kwargs: dict[str, Any] = {}
        if heartbeat:
            heartbeat_kwargs = {
                "heartbeat_interval": heartbeat_interval_s,
                "grace_period": grace_period_s,
                "heartbeat_stale_trial_callback": stale_trial_callback
                or RetryHeartbeatStaleTrialCallback(max_retry=2),
            }
        return _build(location, engine_kwargs, heartbeat_kwargs)


def _build(
    location: StoreLocation, engine_kwargs: dict[str, Any], heartbeat_kwargs: dict[str, Any]
) -> RDBStorage:
    """RDBStorage on `location`; Optuna creates what is missing of its schema under the schema
    lock (storage._schema), so processes starting together on an empty store do not race."""
    try:
        if schema_ready(location, engine_kwargs):
            return RDBStorage(location.url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
        with schema_lock(location, engine_kwargs):
            # Whoever held the lock before may have made the schema: then only read, unlocked.
            if not schema_ready(location, engine_kwargs):
                reason = foreign_schema(location, engine_kwargs)
                if reason is not None:
                    where = location.describe()
                    raise StorageSchemaError(f"{where} is not an Optuna store: {reason}")
                try:
                    return RDBStorage(
                        location.url, engine_kwargs=engine_kwargs, **heartbeat_kwargs
                    )
                except sqlalchemy.exc.DatabaseError:
                    # A creator outside this lock (plain Optuna, an older hpo) may have raced
                    # this one; if the schema is whole now, that was the error: open it again.
                    if not schema_ready(location, engine_kwargs):
                        raise
        return RDBStorage(location.url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
    except sqlalchemy.exc.OperationalError as e:
        raise _translate(location, e.orig or e) from None
    except sqlalchemy.exc.DatabaseError as e:
        raise StorageSchemaError(
            f"{location.describe()} is not an Optuna store: {_first_line(location, e.orig or e)}"
        ) from None
    except (RuntimeError, sqlalchemy.exc.SQLAlchemyError) as e:
        # Optuna raises RuntimeError for a schema written by another Optuna version.
        raise StorageSchemaError(
            f"cannot use {location.describe()}: {_first_line(location, e)}"
        ) from None


# ---------------------------------------------------------------------------------------- SQLite


def _sqlite_connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """A DB-API connection with the settings every process of the study must share."""
    # isolation_level="IMMEDIATE": the implicit BEGIN before the first write takes the write lock
    # at once (waiting up to the busy timeout) instead of failing when it upgrades later.
    connection = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level="IMMEDIATE", check_same_thread=False
    )
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    # Persistent in the file; cheap once set. Switching a new file to WAL needs the exclusive lock,
    # and SQLite answers "database is locked" at once, without its busy handler, when another
    # connection is opening the same new file: wait for it as the busy timeout would.
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    connection.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; no fsync per commit
    return connection


def _sqlite_engine_kwargs(location: StoreLocation, *, create: bool) -> dict[str, Any]:
    path = location.database
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise StorageMissingError(
            f"cannot open {location.describe()}: directory {directory} does not exist"
        )
    if not create and not os.path.exists(path):
        raise StorageMissingError(f"no study store at {location.describe()}")
    try:
        _sqlite_connect(path, SQLITE_BUSY_TIMEOUT_S).close()
    except sqlite3.DatabaseError as e:
        raise StorageSchemaError(f"cannot open {location.describe()}: {e}") from None
    # The creator is a partial of a module function so the engine options stay picklable.
    return {"creator": functools.partial(_sqlite_connect, path, SQLITE_BUSY_TIMEOUT_S)}


# ------------------------------------------------------------------------------------ PostgreSQL


def _postgres_engine_kwargs() -> dict[str, Any]:
    return {
        "pool_size": PG_POOL_SIZE,
        "max_overflow": PG_MAX_OVERFLOW,
        "pool_pre_ping": True,
        "pool_recycle": 1800,
        "connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": "hpo"},
    }


def _probe_postgres(
    location: StoreLocation, *, retries: int, backoff_s: float, patience_s: float | None = None
) -> None:
    """Connect once, so the failure is classified before Optuna wraps it; retry when it helps."""
    started = time.monotonic()
    engine = sqlalchemy.create_engine(
        location.url,
        poolclass=sqlalchemy.pool.NullPool,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": "hpo"},
    )
    try:
        attempt = 0
        while True:
            attempt += 1
            try:
                with engine.connect():
                    return
            except sqlalchemy.exc.DBAPIError as e:
                error = _translate(location, e.orig or e, attempts=attempt)
            pause = min(backoff_s * 2 ** (attempt - 1), MAX_PAUSE_S)
            if patience_s is None:
                more = attempt < retries
            else:
                more = time.monotonic() - started + pause <= patience_s
            if not isinstance(error, StorageUnreachableError) or not more:
                raise error from None
            _logger.info("%s; retrying in %.1f s", error, pause)
            time.sleep(pause)
    finally:
        engine.dispose()


_AUTH_MARKERS = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "password must be",
    "no password supplied",
    "fe_sendauth",
    "permission denied for database",
)
_UNREACHABLE_MARKERS = (
    "could not connect",
    "connection refused",
    "could not translate host name",
    "name or service not known",
    "timeout expired",
    "timed out",
    "no route to host",
    "network is unreachable",
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
    "too many connections",
    "ssl negotiation",
)


def _translate(
    location: StoreLocation, error: BaseException, *, attempts: int = 1
) -> StorageError:
    """Map a driver error to the StorageError subclass a user can act on."""
    text = str(error)
    lowered = text.lower()
    where = location.describe()
    if any(marker in lowered for marker in _AUTH_MARKERS) or (
        "role" in lowered and "does not exist" in lowered
    ):
        return StorageAuthError(f"{where}: authentication refused ({_reason(location, text)})")
    if "database" in lowered and "does not exist" in lowered:
        return StorageMissingError(
            f"{where}: the database does not exist (create it, e.g. createdb -h "
            f"{location.host or 'localhost'} -p {location.port or 5432} {location.database})"
        )
    if location.kind == "postgresql" and (
        any(marker in lowered for marker in _UNREACHABLE_MARKERS) or "failed:" in lowered
    ):
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return StorageUnreachableError(
            f"{where}: server unreachable{tries} ({_reason(location, text)})"
        )
    return StorageError(f"{where}: {_reason(location, text)}")


def _reason(location: StoreLocation, text: str) -> str:
    """The driver's message, one line, without the libpq preamble and without secrets."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "unknown error"
    if " failed: " in first and first.startswith("connection to server"):
        first = first.split(" failed: ", 1)[1]
    first = first.removeprefix("FATAL:").strip()
    return location.scrub(first)


def _first_line(location: StoreLocation, error: BaseException) -> str:
    return _reason(location, str(error))
