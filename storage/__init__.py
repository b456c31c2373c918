"""Where trials are kept: the Optuna store (embedded SQLite by default, or PostgreSQL).

`resolve_url` picks the URL (flag, then $HPO_STORAGE, then sqlite:///hpo.db in the working
directory), `open_storage` turns it into an Optuna RDBStorage with the right engine options (on a
new store, Optuna's tables are made by one process at a time, so processes may start together), and
`store_lock` serialises short critical sections across every process using the store, and
`Reconnect` retries an operation while the store is briefly away (a server restart). Errors are
StorageError subclasses whose messages are one line and never contain a password; `redact` hides
passwords in any other text that might hold a URL.
"""

from __future__ import annotations

from storage._errors import (
    StorageAuthError,
    StorageError,
    StorageMissingError,
    StorageSchemaError,
    StorageUnreachableError,
    StorageURLError,
)
from storage._lock import StoreLease, store_lock
from storage._open import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, open_storage
from storage._retry import (
    RECONNECT_S,
    LockLostError,
    Reconnect,
    TransientStoreError,
    is_transient,
)
from storage._url import DEFAULT_URL, ENV_VAR, StoreLocation, parse_url, redact, resolve_url

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "GRACE_PERIOD_S",
    "HEARTBEAT_INTERVAL_S",
    "RECONNECT_S",
    "LockLostError",
    "Reconnect",
    "StorageAuthError",
    "StorageError",
    "StorageMissingError",
    "StorageSchemaError",
    "StorageURLError",
    "StorageUnreachableError",
    "StoreLease",
    "StoreLocation",
    "TransientStoreError",
    "is_transient",
    "open_storage",
    "parse_url",
    "redact",
    "resolve_url",
    "store_lock",
]
