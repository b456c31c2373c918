"""The storage error hierarchy: one root, one subclass per thing a user can fix.

Every message is one line that names where the store is (host, port and database, or the SQLite
file) and never the password, so the CLI can print it as it is.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error the storage package raises on purpose."""


class StorageURLError(StorageError, ValueError):
    """The storage URL is not a URL, or names a database kind this service does not support."""


class StorageUnreachableError(StorageError):
    """The database server could not be reached (after the bounded retries)."""


class StorageAuthError(StorageError):
    """The server refused the credentials (wrong password, unknown role, pg_hba rule)."""


class StorageMissingError(StorageError):
    """The database (or the SQLite file, when it must already exist) does not exist."""


class StorageSchemaError(StorageError):
    """The store exists but cannot be used as it is (not an Optuna store, incompatible schema)."""
