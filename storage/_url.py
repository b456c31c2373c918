"""Which store to use: the URL from a flag, then HPO_STORAGE, then the embedded default.

`StoreLocation` is the parsed, normalised URL. Its text form and repr hide the password; only
`StoreLocation.url` carries it, and only to build the engine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from storage._errors import StorageURLError

ENV_VAR = "HPO_STORAGE"
DEFAULT_SQLITE_FILE = "hpo.db"  # in the working directory
DEFAULT_URL = f"sqlite:///{DEFAULT_SQLITE_FILE}"
DEFAULT_POSTGRES_PORT = 5432

_EXAMPLES = "e.g. sqlite:///hpo.db or postgresql+psycopg2://user:password@host:5432/db"
_SQLITE_DRIVERS = ("sqlite", "sqlite+pysqlite")
_POSTGRES_DRIVERS = ("postgresql", "postgresql+psycopg2")
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)\S*@")
# "user:secret@" in text that is not a well-formed URL (e.g. a mistyped scheme)
_LOOSE_USERINFO = re.compile(r"(?P<head>[^\s:/@]+:)(?!//)(?!\*\*\*@)[^\s@]+@")


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL. `str()` and `repr()` never show the password."""

    url: str = field(repr=False)  # the full URL, password included: for the engine only
    kind: str  # "sqlite" or "postgresql"
    database: str  # database name, or the absolute path of the SQLite file
    host: str | None = None  # None for SQLite, or a PostgreSQL Unix socket
    port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def redacted_url(self) -> str:
        return redact(self.url)

    def describe(self) -> str:
        """One phrase naming where the store is, e.g. for the start of an error message."""
        if self.kind == "sqlite":
            return f"SQLite file {self.database}"
        where = f"{self.host or 'local socket'}:{self.port or DEFAULT_POSTGRES_PORT}"
        user = f" as user {self.username!r}" if self.username else ""
        return f"PostgreSQL database {self.database!r} at {where}{user}"

    def scrub(self, text: str) -> str:
        """`text` with this location's password (raw or URL-encoded) and any URL userinfo hidden."""
        text = redact(text)
        if self.password:
            text = text.replace(self.password, "***")
        return text

    def __str__(self) -> str:
        return self.redacted_url


def redact(text: str) -> str:
    """Hide the password of every URL in `text` (`user:secret@` becomes `user:***@`), also in
    text that only looks like a URL."""
    text = _USERINFO.sub(lambda m: f"{m.group('head')}***@", text)
    return _LOOSE_USERINFO.sub(lambda m: f"{m.group('head')}***@", text)


def resolve_url(flag: str | None, environ: Mapping[str, str] | None = None) -> StoreLocation:
    """The store to use: `flag` if given, else $HPO_STORAGE, else sqlite:///hpo.db in the cwd.

    Raises StorageURLError (one line, password hidden) for text that is not a URL or for a
    database kind other than SQLite and PostgreSQL.
    """
    env = os.environ if environ is None else environ
    text = flag if flag else env.get(ENV_VAR) or DEFAULT_URL
    return parse_url(text.strip())


def parse_url(text: str) -> StoreLocation:
    """Parse and normalise a store URL; SQLite paths become absolute."""
    shown = redact(text)
    if "://" not in text:
        raise StorageURLError(f"storage URL {shown!r} is not a URL; expected {_EXAMPLES}")
    try:
        url = make_url(text)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise StorageURLError(
            f"storage URL {shown!r} is not a URL; expected {_EXAMPLES}"
        ) from None
    if url.password:
        shown = url.render_as_string(hide_password=True)
    driver = url.drivername
    if driver in _SQLITE_DRIVERS:
        return _sqlite_location(url, shown)
    if driver in _POSTGRES_DRIVERS:
        return _postgres_location(url, shown)
    if driver.startswith(("postgres", "postgresql+")):
        raise StorageURLError(
            f"storage URL {shown!r}: driver {driver!r} is not supported; "
            "use postgresql+psycopg2://user:password@host:5432/db"
        )
    raise StorageURLError(
        f"storage URL {shown!r}: {driver!r} is not supported; use SQLite or PostgreSQL "
        f"({_EXAMPLES})"
    )


def _sqlite_location(url: URL, shown: str) -> StoreLocation:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise StorageURLError(
            f"storage URL {shown!r}: an in-memory SQLite store cannot be shared by worker "
            "processes; name a file, e.g. sqlite:///hpo.db"
        )
    if url.host:
        raise StorageURLError(
            f"storage URL {shown!r}: a SQLite URL has no host; write sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = os.path.abspath(os.path.expanduser(database))
    normalised = url.set(drivername="sqlite", database=path)
    return StoreLocation(
        url=normalised.render_as_string(hide_password=False), kind="sqlite", database=path
    )


def _postgres_location(url: URL, shown: str) -> StoreLocation:
    if not url.database:
        raise StorageURLError(
            f"storage URL {shown!r} names no database; add one, e.g. .../{'hpo'}"
        )
    try:
        port = url.port
    except ValueError:
        raise StorageURLError(f"storage URL {shown!r} has a port that is not a number") from None
    normalised = url.set(drivername="postgresql+psycopg2")
    return StoreLocation(
        url=normalised.render_as_string(hide_password=False),
        kind="postgresql",
        database=url.database,
        host=url.host or url.query.get("host"),
        port=port,
        username=url.username,
        password=url.password,
    )
