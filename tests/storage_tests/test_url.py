"""Which store a command uses, and that its text never shows a password."""

from __future__ import annotations

import os

import pytest

from storage import (
    DEFAULT_URL,
    ENV_VAR,
    StorageURLError,
    parse_url,
    redact,
    resolve_url,
)

SECRET = "s3cr3t:/@pw"  # URL-encoded below; contains the characters that break naive parsing
URL = "postgresql+psycopg2://alice:s3cr3t%3A%2F%40pw@db.example:5433/studies"


def test_flag_wins_over_environment_over_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {ENV_VAR: "sqlite:///from-env.db"}
    assert resolve_url("sqlite:///flag.db", env).database == str(tmp_path / "flag.db")
    assert resolve_url(None, env).database == str(tmp_path / "from-env.db")
    assert resolve_url(None, {}).database == str(tmp_path / "hpo.db")
    assert DEFAULT_URL == "sqlite:///hpo.db"


def test_sqlite_paths_become_absolute_so_every_worker_opens_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = parse_url("sqlite:///sub/x.db")
    assert location.kind == "sqlite"
    assert location.database == os.path.join(str(tmp_path), "sub", "x.db")
    assert location.url == f"sqlite:///{tmp_path}/sub/x.db"
    assert parse_url(location.url).database == location.database


def test_postgres_url_is_parsed_and_its_password_never_shown():
    location = parse_url(URL)
    assert (location.kind, location.host, location.port, location.database) == (
        "postgresql",
        "db.example",
        5433,
        "studies",
    )
    assert location.password == SECRET
    for text in (str(location), repr(location), location.describe(), location.redacted_url):
        assert "s3cr3t" not in text
    assert (
        location.describe() == "PostgreSQL database 'studies' at db.example:5433 as user 'alice'"
    )
    assert parse_url("postgresql://u@h/db").url.startswith("postgresql+psycopg2://")


def test_redact_hides_every_url_password_in_free_text():
    text = "failed at postgresql://bob:hunter2@h:5432/db and mysql://x:y@z/w (retrying)"
    assert (
        redact(text) == "failed at postgresql://bob:***@h:5432/db and mysql://x:***@z/w (retrying)"
    )
    assert redact("no url here") == "no url here"
    assert redact("postgresql//bob:hunter2@h/db") == "postgresql//bob:***@h/db"
    assert redact("bob:hunter2@h") == "bob:***@h"
    assert redact("at 12:30 @home") == "at 12:30 @home"
    assert "hunter2" not in parse_url("postgresql://bob:hunter2@h/db").scrub("pw hunter2 leaked")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not a url", "is not a URL"),
        ("hpo.db", "is not a URL"),
        ("postgresql//alice:topsecret@h/db", "is not a URL"),
        ("postgresql:/alice:topsecret@h/db", "is not a URL"),
        ("postgresql://alice:topsecret@h:notaport/db", "is not a URL"),
        ("mysql://alice:topsecret@h/db", "'mysql' is not supported"),
        ("postgres://alice:topsecret@h/db", "use postgresql+psycopg2://"),
        ("postgresql+asyncpg://alice:topsecret@h/db", "is not supported"),
        ("sqlite://", "in-memory SQLite store cannot be shared"),
        ("sqlite:///:memory:", "in-memory SQLite store cannot be shared"),
        ("postgresql://alice:topsecret@h:5432", "names no database"),
    ],
)
def test_bad_urls_are_one_line_errors_without_the_password(text, expected):
    with pytest.raises(StorageURLError) as info:
        parse_url(text)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "topsecret" not in message
