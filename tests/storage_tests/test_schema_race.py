"""Processes that open an empty store at the same instant all get it (Optuna's tables are made
once, under the schema lock), and a database that holds something else is still refused with
one line before anything is written into it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import psycopg2
import pytest
import sqlalchemy

from storage import StorageSchemaError, open_storage, parse_url
from storage._optuna import MODELS as models
from storage._schema import SCHEMA_TABLES, schema_ready
from storage.testing import DUMMY_PASSWORD, fresh_postgres_database

N_PROCESSES = 8
N_ROUNDS = 5

# One racer: imports first, says "ready", then for each URL read from stdin opens the store as
# every hpo command does and creates (or loads) one study. The test writes a URL to all racers
# back to back, so they open within a millisecond or so of each other: stdin is the barrier.
_RACER = textwrap.dedent(
    """
    import sys, warnings
    import optuna
    from storage import StorageError, open_storage, study_id
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            storage = open_storage(line.strip(), heartbeat=False)
            study = optuna.create_study(storage=storage, study_name="first", load_if_exists=True)
            print(f"ok {study_id(study)}", flush=True)
            storage.engine.dispose()
        except StorageError as e:
            print(f"error: {e}", flush=True)
    """
)


@contextlib.contextmanager
def _empty_store(kind: str, path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{path}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_processes_opening_an_empty_store_together_all_get_it(kind, tmp_path):
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(N_PROCESSES)
    ]
    try:
        assert [r.stdout.readline().strip() for r in racers] == ["ready"] * N_PROCESSES
        for round_ in range(N_ROUNDS):
            with _empty_store(kind, tmp_path / f"round-{round_}.db") as url:
                for racer in racers:  # the barrier: every racer wakes on its line at once
                    racer.stdin.write(url + "\n")
                    racer.stdin.flush()
                answers = [r.stdout.readline().strip() for r in racers]
                # Every racer opened the store and found one and the same study.
                assert len(set(answers)) == 1 and answers[0].startswith("ok "), (round_, answers)
                assert schema_ready(parse_url(url), {})
                storage = open_storage(url, heartbeat=False)
                assert [s.study_name for s in storage.get_all_studies()] == ["first"]
                storage.engine.dispose()
    finally:
        for racer in racers:
            racer.stdin.close()
        codes = [r.wait(timeout=60) for r in racers]
    assert codes == [0] * N_PROCESSES, [r.stderr.read()[-2000:] for r in racers]


def test_a_half_made_store_is_completed_by_the_next_opener(tmp_path):
    # A creator killed after CREATE TABLE, before the version row and the alembic stamp.
    url = f"sqlite:///{tmp_path / 'half.db'}"
    engine = sqlalchemy.create_engine(url)
    models.BaseModel.metadata.create_all(engine)
    engine.dispose()
    assert not schema_ready(parse_url(url), {})
    open_storage(url, heartbeat=False).engine.dispose()
    assert schema_ready(parse_url(url), {})


def _tables(url: str) -> set[str]:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return set(sqlalchemy.inspect(connection).get_table_names())
    finally:
        engine.dispose()


_FOREIGN = {
    "another studies table": (
        ["CREATE TABLE studies (id integer, note text)", "INSERT INTO studies VALUES (1, 'x')"],
        "its table studies has no column study_id",
    ),
    "another application's alembic stamp": (
        [
            "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)",
            "INSERT INTO alembic_version VALUES ('1f2e3d4c5b6a')",
        ],
        "its alembic_version table belongs to another application (1f2e3d4c5b6a)",
    ),
}


@pytest.mark.parametrize("case", sorted(_FOREIGN))
@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_database_that_holds_something_else_is_refused_in_one_line(kind, case, tmp_path):
    statements, reason = _FOREIGN[case]
    with _empty_store(kind, tmp_path / "foreign.db") as url:
        engine = sqlalchemy.create_engine(url)
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(sqlalchemy.text(statement))
        engine.dispose()
        before = _tables(url)
        with pytest.raises(StorageSchemaError) as raised:
            open_storage(url, heartbeat=False)
        message = str(raised.value)
        assert message.endswith(f"is not an Optuna store: {reason}"), message
        assert "\n" not in message and DUMMY_PASSWORD not in message
        assert _tables(url) == before  # nothing of Optuna's was written beside it
        assert not SCHEMA_TABLES <= before


@pytest.mark.postgres
def test_the_schema_lock_is_apart_from_the_study_locks(postgres_url):
    # The creation lock (namespace "HPS", key 0) is held while a study lock is free, and the
    # server drops it when its session ends.
    from storage._lock import SCHEMA_NAMESPACE
    from storage._schema import schema_lock

    location = parse_url(postgres_url)
    url = sqlalchemy.make_url(postgres_url).set(drivername="postgresql")
    with schema_lock(location, {}):
        probe = psycopg2.connect(url.render_as_string(hide_password=False))
        probe.autocommit = True
        with probe.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, 0)", (SCHEMA_NAMESPACE,))
            assert cursor.fetchone()[0] is False
            cursor.execute("SELECT pg_try_advisory_lock(%s, 0)", (0x48504F,))
            assert cursor.fetchone()[0] is True
        probe.close()
