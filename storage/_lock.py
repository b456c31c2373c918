"""A lock shared by every process that uses one store, for short read-then-write sections.

The HPO driver uses it to claim a trial within a global budget: count the trials, and create one
only if the budget allows, with no other process doing the same in between. PostgreSQL: a
session-level advisory lock (released by the server if the process dies). SQLite: an exclusive
`flock` on a file next to the database (released by the kernel if the process dies); SQLite
stores are local, so every process that can open the file can lock its neighbour.

A PostgreSQL lock lives as long as its connection: when the server restarts, every holder loses it
while the pool hands its next statement a fresh connection. The body therefore gets a `StoreLease`
and calls `lease.check()` after its last write; LockLostError there means another process may have
been inside at the same time, and the body must undo what it wrote and start over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

import sqlalchemy
from optuna.storages import RDBStorage

from storage._errors import StorageError
from storage._retry import LockLostError

_ADVISORY_NAMESPACE = 0x48504F  # "HPO": first key of the two-int advisory lock
SCHEMA_NAMESPACE = 0x485053  # "HPS": the lock around creating the tables (storage._schema)
LOCK_TIMEOUT_S = 120.0  # nobody holds the lock for more than a few database round trips
_POLL_S = 0.05


class StoreLease:
    """The held lock, as seen by the body of `store_lock`."""

    def __init__(self, check: Callable[[], bool] | None = None) -> None:
        self._check = check

    def check(self) -> None:
        """LockLostError unless the lock is still held (a PostgreSQL restart drops it)."""
        try:
            held = self._check() if self._check is not None else True
        except sqlalchemy.exc.SQLAlchemyError:
            held = False
        if not held:
            raise LockLostError("the store lock was lost (its connection closed)")


@contextlib.contextmanager
def store_lock(
    storage: RDBStorage, key: int, *, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[StoreLease]:
    """Hold the store-wide lock number `key` (e.g. a study id) for the body of the `with`."""
    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        with advisory_lock(storage.engine, key, timeout_s) as lease:
            yield lease
    elif dialect == "sqlite":
        database = storage.engine.url.database
        with file_lock(f"{database}.lock", timeout_s, what=f"store lock {key}"):
            yield StoreLease()  # flock dies only with its process
    else:
        raise StorageError(f"no store lock for {dialect} stores")


@contextlib.contextmanager
def advisory_lock(
    engine: sqlalchemy.Engine,
    key: int,
    timeout_s: float,
    *,
    namespace: int = _ADVISORY_NAMESPACE,
    what: str | None = None,
) -> Iterator[StoreLease]:
    """PostgreSQL session-level advisory lock (`namespace`, `key`) on a connection of its own."""
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        args = {"space": namespace, "key": int(key)}
        try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:space, :key)")
        held = sqlalchemy.text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND pid = pg_backend_pid() AND classid = :space AND objid = :key"
        )
        deadline = time.monotonic() + timeout_s
        while not connection.execute(try_lock, args).scalar():
            if time.monotonic() > deadline:
                raise StorageError(
                    f"timed out after {timeout_s:.0f} s waiting for {what or f'store lock {key}'}"
                )
            time.sleep(_POLL_S)
        try:
            yield StoreLease(lambda: bool(connection.execute(held, args).scalar()))
        finally:
            # A dead connection holds no lock: the server released it with the session.
            if not connection.invalidated:
                try:
                    connection.execute(
                        sqlalchemy.text("SELECT pg_advisory_unlock(:space, :key)"), args
                    )
                except sqlalchemy.exc.DBAPIError as e:
                    if not e.connection_invalidated:
                        raise


@contextlib.contextmanager
def file_lock(path: str, timeout_s: float, *, what: str) -> Iterator[None]:
    """An exclusive `flock` on `path` (created if missing); `what` names it in the timeout error."""
    # One file for all keys: claims are short, and SQLite has one writer at a time anyway.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StorageError(f"cannot open the lock file {path} ({e.strerror})") from None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"timed out after {timeout_s:.0f} s waiting for {what} ({path})"
                    ) from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
