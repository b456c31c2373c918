"""A lock shared by every process that uses one store, for short read-then-write sections.

The HPO driver uses it to claim a trial within a global budget: count the trials, and create one
only if the budget allows, with no other process doing the same in between. PostgreSQL: a
session-level advisory lock (released by the server if the process dies). SQLite: an exclusive
`flock` on a file next to the database (released by the kernel if the process dies); SQLite
stores are local, so every process that can open the file can lock its neighbour.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

import sqlalchemy
from optuna.storages import RDBStorage

from storage._errors import StorageError

_ADVISORY_NAMESPACE = 0x48504F  # "HPO": first key of the two-int advisory lock
LOCK_TIMEOUT_S = 120.0  # nobody holds the lock for more than a few database round trips
_POLL_S = 0.05


@contextlib.contextmanager
def store_lock(
    storage: RDBStorage, key: int, *, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[None]:
    """Hold the store-wide lock number `key` (e.g. a study id) for the body of the `with`."""
    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        with _advisory_lock(storage.engine, key, timeout_s):
            yield
    elif dialect == "sqlite":
        database = storage.engine.url.database
        with _file_lock(f"{database}.lock", key, timeout_s):
            yield
    else:
        raise StorageError(f"no store lock for {dialect} stores")


@contextlib.contextmanager
def _advisory_lock(engine: sqlalchemy.Engine, key: int, timeout_s: float) -> Iterator[None]:
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        args = {"space": _ADVISORY_NAMESPACE, "key": int(key)}
        try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:space, :key)")
        deadline = time.monotonic() + timeout_s
        while not connection.execute(try_lock, args).scalar():
            if time.monotonic() > deadline:
                raise StorageError(
                    f"timed out after {timeout_s:.0f} s waiting for store lock {key}"
                )
            time.sleep(_POLL_S)
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:space, :key)"), args)


@contextlib.contextmanager
def _file_lock(path: str, key: int, timeout_s: float) -> Iterator[None]:
    # One file for all keys: claims are short, and SQLite has one writer at a time anyway.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"timed out after {timeout_s:.0f} s waiting for store lock {key} ({path})"
                    ) from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
