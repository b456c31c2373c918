"""open_storage against a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import time

import optuna
import pytest

from storage import (
    StorageAuthError,
    StorageMissingError,
    StorageSchemaError,
    StorageUnreachableError,
    open_storage,
    parse_url,
)
from storage.testing import DUMMY_PASSWORD, postgres_url_with


def test_sqlite_connections_use_wal_a_busy_timeout_and_immediate_writes(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'a.db'}")
    with storage.engine.connect() as connection:
        raw = connection.connection.driver_connection
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000
        assert raw.isolation_level == "IMMEDIATE"
    assert storage.heartbeat_interval and storage.grace_period >= 5 * storage.heartbeat_interval
    optuna.create_study(storage=storage, study_name="s")
    assert (tmp_path / "a.db-wal").exists()


def test_sqlite_read_only_open_does_not_create_a_file(tmp_path):
    with pytest.raises(StorageMissingError, match="no study store at SQLite file"):
        open_storage(f"sqlite:///{tmp_path / 'absent.db'}", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_sqlite_in_a_missing_directory(tmp_path):
    with pytest.raises(StorageMissingError, match="directory .* does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'nope' / 'a.db'}")


def test_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not a database\n" * 100)
    with pytest.raises(StorageSchemaError, match="not a database"):
        open_storage(f"sqlite:///{path}")


def test_postgres_store_has_a_small_pool_pre_ping_and_heartbeats(postgres_url):
    storage = open_storage(postgres_url)
    pool = storage.engine.pool
    assert pool.size() <= 5
    assert pool._pre_ping  # no public accessor
    assert storage.heartbeat_interval and storage.grace_period >= 5 * storage.heartbeat_interval
    assert storage.get_heartbeat_stale_trial_callback() is not None
    study = optuna.create_study(storage=storage, study_name="pool-check")
    assert optuna.load_study(study_name="pool-check", storage=postgres_url).study_name == (
        study.study_name
    )


def _one_line_without_password(error: BaseException, *parts: str) -> str:
    message = str(error)
    assert "\n" not in message
    assert DUMMY_PASSWORD not in message and "hunter2" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def test_unreachable_server_is_retried_a_bounded_number_of_times():
    url = postgres_url_with(port=1, password="hunter2", database="studies")
    started = time.monotonic()
    with pytest.raises(StorageUnreachableError) as info:
        open_storage(url, retries=3, backoff_s=0.2)
    elapsed = time.monotonic() - started
    message = _one_line_without_password(info.value, "127.0.0.1:1", "'studies'", "3 attempts")
    assert "unreachable" in message
    assert 0.5 <= elapsed < 10  # two pauses (0.2 s + 0.4 s), then it gives up


def test_missing_database(postgres_url):
    url = postgres_url_with(database="hpo_no_such_database", password="hunter2")
    with pytest.raises(StorageMissingError) as info:
        open_storage(url, retries=1)
    _one_line_without_password(info.value, "'hpo_no_such_database'", "does not exist")


def test_unknown_role_is_refused_authentication():
    url = postgres_url_with(username="hpo_no_such_role", password="hunter2")
    with pytest.raises(StorageAuthError) as info:
        open_storage(url, retries=1)
    _one_line_without_password(info.value, "authentication refused", "hpo_no_such_role")


def test_wrong_password_is_refused_authentication_once(password_refusing_server):
    port = password_refusing_server.port
    url = f"postgresql+psycopg2://alice:hunter2@127.0.0.1:{port}/studies"
    with pytest.raises(StorageAuthError) as info:
        open_storage(url)
    _one_line_without_password(
        info.value, f"127.0.0.1:{port}", "'studies'", "password authentication failed"
    )
    # The password did travel (the server asked for it), and a refusal is not retried.
    assert password_refusing_server.passwords == ["hunter2"]


def test_location_describes_itself_for_messages(postgres_url):
    location = parse_url(postgres_url)
    assert location.database.startswith("hpo_test_")
    assert DUMMY_PASSWORD not in location.describe() + str(location) + repr(location)
