"""Ride through a store that goes away for a while (a PostgreSQL restart, a failover, a blip).

`Reconnect` runs one store operation and, when it fails because the connection was lost or the
server is (re)starting, runs it again after a pause that doubles up to `MAX_PAUSE_S`, for at most
`deadline_s` in all; then it raises StorageUnreachableError with one line saying what was being
done. The engine's pre-ping replaces dead pooled connections, so a retry after the server is back
runs on a fresh connection. Only errors a retry can cure count: a lost connection, a server that is
starting or shutting down, a serialisation failure, SQLite's "database is locked". Anything else
(bad SQL, a finished trial, a missing table) propagates at once.

The operation must be safe to run twice: setting a value, reporting a step, or a whole claim that
starts from a fresh count (see `LockLostError`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy.exc

from storage._defaults import RECONNECT_S
from storage._errors import StorageError, StorageUnreachableError
from storage._url import StoreLocation

_logger = logging.getLogger(__name__)

FIRST_PAUSE_S = 0.25
MAX_PAUSE_S = 8.0

T = TypeVar("T")


class TransientStoreError(StorageError):
    """Raised on purpose when an operation must be redone from the start (Reconnect retries it)."""


class LockLostError(TransientStoreError):
    """The store lock was lost (its connection died) while its section ran: redo the section."""


def _psycopg2_transient() -> tuple[type[BaseException], ...]:
    try:
        import psycopg2
    except ImportError:  # pragma: no cover  (a SQLite-only install)
        return ()
    return (psycopg2.OperationalError, psycopg2.InterfaceError)


_SQLITE_TRANSIENT = ("database is locked", "database is busy", "disk i/o error")


def is_transient(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is one a later retry can cure."""
    seen: set[int] = set()
    current: BaseException | None = error
    psycopg2_errors = _psycopg2_transient()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransientStoreError):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sqlite3.OperationalError):
            return any(text in str(current).lower() for text in _SQLITE_TRANSIENT)
        if psycopg2_errors and isinstance(current, psycopg2_errors):
            return True
        if isinstance(current, sqlalchemy.exc.InterfaceError | sqlalchemy.exc.OperationalError):
            orig = current.orig
            if orig is None or not isinstance(orig, sqlite3.Error):
                return True
        current = current.__cause__ or current.__context__
    return False


class Reconnect:
    """Run store operations, retrying those that fail on a lost connection (see the module)."""

    def __init__(
        self,
        location: StoreLocation | None = None,
        *,
        deadline_s: float = RECONNECT_S,
        first_pause_s: float = FIRST_PAUSE_S,
        max_pause_s: float = MAX_PAUSE_S,
    ) -> None:
        if deadline_s < 0:
            raise ValueError(f"deadline_s must be >= 0, but got {deadline_s=}")
        self.location = location
        self.deadline_s = deadline_s
        self.first_pause_s = first_pause_s
        self.max_pause_s = max_pause_s
        self.n_retries = 0  # over the object's life, for logs and tests

    def __call__(self, operation: Callable[[], T], what: str) -> T:
        started = time.monotonic()
        pause = self.first_pause_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation()
            except Exception as error:
                if not is_transient(error):
                    raise
                elapsed = time.monotonic() - started
                reason = self._reason(error)
                if elapsed + pause > self.deadline_s:
                    where = self.location.describe() if self.location else "the store"
                    raise StorageUnreachableError(
                        f"{where}: lost while {what} and not back after {elapsed:.0f} s "
                        f"({attempt} attempts; last error: {reason})"
                    ) from None
                self.n_retries += 1
                _logger.warning(
                    "store error while %s (attempt %d): %s; retrying in %.1f s",
                    what,
                    attempt,
                    reason,
                    pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, self.max_pause_s)

    def _reason(self, error: BaseException) -> str:
        root: BaseException = error
        while root.__cause__ is not None:
            root = root.__cause__
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        text = f"{type(root).__name__}: {lines[0] if lines else ''}".strip()
        return self.location.scrub(text) if self.location else text
