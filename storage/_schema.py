"""The first contact with an empty store: Optuna's tables are created by one process at a time.

Optuna creates its tables, its version row and its alembic stamp whenever an RDBStorage is
built, each as a check-then-write; processes that start together on an empty database race in
between (PostgreSQL: a duplicate `pg_type` row while two sessions create one table; SQLite: a
duplicate alembic stamp). `schema_ready` says whether the store already holds the whole schema,
in which case building the storage only reads and needs no lock; otherwise `schema_lock`
serialises the building: a PostgreSQL session-level advisory lock in a key space of its own
(released by the server if the holder dies), or an exclusive `flock` on the lock file beside the
SQLite file (released by the kernel). A database that holds something else is not ready either:
its error then comes from Optuna, under the lock, and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy
import sqlalchemy.exc

from storage._lock import LOCK_TIMEOUT_S, SCHEMA_NAMESPACE, advisory_lock, file_lock
from storage._optuna import MODELS as models
from storage._url import StoreLocation

_ALEMBIC_TABLE = "alembic_version"
_VERSION_TABLE = models.VersionInfoModel.__tablename__
# Optuna's tables (the models its RDBStorage creates) and the alembic stamp.
SCHEMA_TABLES = frozenset(models.BaseModel.metadata.tables) | {_ALEMBIC_TABLE}
SCHEMA_LOCK_TIMEOUT_S = LOCK_TIMEOUT_S  # creating the tables takes well under a second
_COLUMNS = {
    name: frozenset(column.name for column in table.columns)
    for name, table in models.BaseModel.metadata.tables.items()
} | {_ALEMBIC_TABLE: frozenset({"version_num"})}


def _engine(location: StoreLocation, engine_kwargs: dict[str, Any]) -> sqlalchemy.Engine:
    """A one-connection-at-a-time engine with the store's connect options (no pool left open)."""
    options = {k: v for k, v in engine_kwargs.items() if k in ("creator", "connect_args")}
    return sqlalchemy.create_engine(location.url, poolclass=sqlalchemy.pool.NullPool, **options)


def schema_ready(location: StoreLocation, engine_kwargs: dict[str, Any]) -> bool:
    """Whether every table of the Optuna schema exists and holds its version row and stamp, so
    that building an RDBStorage on it writes nothing. A connection failure propagates."""
    engine = _engine(location, engine_kwargs)
    try:
        with engine.connect() as connection:
            if not SCHEMA_TABLES <= set(sqlalchemy.inspect(connection).get_table_names()):
                return False
            try:
                for table in (_VERSION_TABLE, _ALEMBIC_TABLE):
                    query = sqlalchemy.text(f"SELECT count(*) FROM {table}")
                    if not connection.execute(query).scalar():
                        return False
            except sqlalchemy.exc.ProgrammingError:
                return False  # tables of those names with other columns: not Optuna's
            return True
    finally:
        engine.dispose()


def foreign_schema(location: StoreLocation, engine_kwargs: dict[str, Any]) -> str | None:
    """Why the store cannot hold Optuna's schema (a table of one of its names with other columns,
    or another application's alembic stamp), or None. Tables of other names are left alone:
    Optuna's are created beside them."""
    engine = _engine(location, engine_kwargs)
    try:
        with engine.connect() as connection:
            inspector = sqlalchemy.inspect(connection)
            present = set(inspector.get_table_names())
            for table in sorted(present & SCHEMA_TABLES):
                columns = {column["name"] for column in inspector.get_columns(table)}
                missing = sorted(_COLUMNS[table] - columns)
                if missing:
                    return f"its table {table} has no column {missing[0]}"
            if _ALEMBIC_TABLE in present and _VERSION_TABLE not in present:
                query = sqlalchemy.text(f"SELECT version_num FROM {_ALEMBIC_TABLE}")
                stamp = connection.execute(query).scalar()
                if stamp is not None:
                    return f"its {_ALEMBIC_TABLE} table belongs to another application ({stamp})"
            return None
    finally:
        engine.dispose()


@contextlib.contextmanager
def schema_lock(
    location: StoreLocation,
    engine_kwargs: dict[str, Any],
    *,
    timeout_s: float = SCHEMA_LOCK_TIMEOUT_S,
) -> Iterator[None]:
    """Hold the store's schema-creation lock (one per PostgreSQL database, or per SQLite file)."""
    what = f"another process to create the tables of {location.describe()}"
    if location.kind == "sqlite":
        with file_lock(f"{location.database}.lock", timeout_s, what=what):
            yield
        return
    engine = _engine(location, engine_kwargs)
    try:
        with advisory_lock(engine, 0, timeout_s, namespace=SCHEMA_NAMESPACE, what=what):
            yield
    finally:
        engine.dispose()
