"""Where trials are kept: the Optuna store (embedded SQLite by default, or PostgreSQL).

`resolve_url` picks the URL (flag, then $HPO_STORAGE, then sqlite:///hpo.db in the working
directory), `open_storage` turns it into an Optuna RDBStorage with the right engine options (on a
new store, Optuna's tables are made by one process at a time, so processes may start together), and
`store_lock` serialises short critical sections across every process using the store, and
`Reconnect` retries an operation while the store is briefly away (a server restart).
`set_user_attrs`, `report_epoch` and `batched_params` write a trial's values in one transaction
per group, and `study_storage`, `study_id`, `trial_id` and `stale_trial_ids` reach what Optuna
keeps private: all of them live in `storage._optuna`, the one module that touches Optuna's
private API, checked against the Optuna version at import. Errors are
StorageError subclasses whose messages are one line and never contain a password; `redact` hides
passwords in any other text that might hold a URL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storage._defaults import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, RECONNECT_S
from storage._errors import (
    StorageAuthError,
    StorageError,
    StorageMissingError,
    StorageSchemaError,
    StorageUnreachableError,
    StorageURLError,
)

if TYPE_CHECKING:
    from storage._lock import StoreLease, store_lock
    from storage._open import open_storage
    from storage._optuna import (
        PRIVATE_WRITES,
        TESTED_OPTUNA,
        batched_params,
        rdb_storage,
        report_epoch,
        set_user_attrs,
        stale_trial_ids,
        study_id,
        study_storage,
        trial_id,
    )
    from storage._retry import LockLostError, Reconnect, TransientStoreError, is_transient
    from storage._url import DEFAULT_URL, ENV_VAR, StoreLocation, parse_url, redact, resolve_url

# The rest needs Optuna and SQLAlchemy (half a second): imported on first use, so that the
# command line's --help and its defaults load without them.
_LAZY = {
    "StoreLease": "storage._lock",
    "store_lock": "storage._lock",
    "open_storage": "storage._open",
    "PRIVATE_WRITES": "storage._optuna",
    "TESTED_OPTUNA": "storage._optuna",
    "batched_params": "storage._optuna",
    "rdb_storage": "storage._optuna",
    "report_epoch": "storage._optuna",
    "set_user_attrs": "storage._optuna",
    "stale_trial_ids": "storage._optuna",
    "study_id": "storage._optuna",
    "study_storage": "storage._optuna",
    "trial_id": "storage._optuna",
    "LockLostError": "storage._retry",
    "Reconnect": "storage._retry",
    "TransientStoreError": "storage._retry",
    "is_transient": "storage._retry",
    "DEFAULT_URL": "storage._url",
    "ENV_VAR": "storage._url",
    "StoreLocation": "storage._url",
    "parse_url": "storage._url",
    "redact": "storage._url",
    "resolve_url": "storage._url",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "GRACE_PERIOD_S",
    "HEARTBEAT_INTERVAL_S",
    "PRIVATE_WRITES",
    "RECONNECT_S",
    "TESTED_OPTUNA",
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
    "batched_params",
    "is_transient",
    "open_storage",
    "parse_url",
    "rdb_storage",
    "redact",
    "report_epoch",
    "resolve_url",
    "set_user_attrs",
    "stale_trial_ids",
    "store_lock",
    "study_id",
    "study_storage",
    "trial_id",
]
