"""`hpo` commands started at the same instant on an empty store (README's SLURM recipe starts its
nodes together): three `hpo run` nodes, `hpo status`, `best`, `report` and `dashboard` all get
the store; the nodes share one budget exactly, and a node that joins later sees the settings the
first nodes recorded."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpo import count_trials
from hpo.testing import FINISHED, StoreReader, environment, hpo
from storage.testing import free_port, fresh_postgres_database

BUDGET = 3

# `hpo ARGS` with its imports done first; it starts when a line arrives on stdin, so that every
# command opens the store within a millisecond or so of the others.
_AT_THE_BARRIER = textwrap.dedent(
    """
    import sys
    import optuna, sqlalchemy, psycopg2
    import hpo.cli, hpo._budget, storage
    print("ready", flush=True)
    sys.stdin.readline()
    sys.argv = ["hpo", *sys.argv[1:]]
    hpo.cli.main()
    """
)

# "Not yet" answers a read-only command may rightly give when it opens the store before any
# node has created the study; anything else (a schema race, a traceback) fails the test.
_NOT_YET = (
    "no study store at",  # SQLite: the file is not there yet (read-only commands never make it)
    "no study named",
    "has no trials yet",
    "has no complete trial yet",
)


@contextlib.contextmanager
def _empty_store(kind: str, path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{path}"
    else:
        with fresh_postgres_database() as url:
            yield url


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", _AT_THE_BARRIER, *args],
        cwd=cwd,
        env=environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_commands_started_together_on_an_empty_store_all_succeed(kind, tmp_path):
    name = f"together-{secrets.token_hex(3)}"
    space = tmp_path / "space.toml"
    space.write_text("n_train = 256\n")
    with _empty_store(kind, tmp_path / "hpo.db") as url:
        store = ["--storage", url, "--study", name]
        run = ["run", *store, "--preset", "smoke", "--trials", str(BUDGET), "--workers", "1",
               "--threads", "1", "--quiet", "--space", str(space)]  # fmt: skip
        commands = {
            "run-a": run,
            "run-b": run,
            "run-c": run,
            "status": ["status", *store],
            "status-json": ["status", *store, "--json"],
            "best": ["best", *store],
            "report": ["report", *store, "--out", str(tmp_path / "report")],
            "dashboard": ["dashboard", *store[:2], "--port", str(free_port())],
        }
        processes = {key: _start(args, tmp_path / key) for key, args in commands.items()}
        try:
            for key, process in processes.items():
                assert process.stdout.readline().strip() == "ready", key
            for process in processes.values():  # the barrier
                process.stdin.write("go\n")
                process.stdin.flush()
            results = {}
            for key, process in processes.items():
                if key != "dashboard":
                    out, err = process.communicate(timeout=300)
                    results[key] = (process.returncode, out, err)
            dashboard = processes["dashboard"]
            dashboard.send_signal(signal.SIGINT)
            out, err = dashboard.communicate(timeout=60)
            results["dashboard"] = (dashboard.returncode, out, err)
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for key, (code, out, err) in results.items():
            assert "not an Optuna store" not in err and "Traceback" not in err, (key, err)
            if key.startswith("run-"):
                assert code == 0, (key, err)
                assert f"{BUDGET}/{BUDGET} finished" in out, (key, out)
            elif key == "dashboard" and out:
                assert out.startswith("dashboard of "), (key, out, err)
            elif code != 0:  # read before the study existed: one "not yet" line
                lines = err.strip().splitlines()
                assert len(lines) == 1 and any(s in lines[0] for s in _NOT_YET), (key, err)

        reader = StoreReader(url, name)
        trials = reader.trials()
        counts = count_trials(trials)
        assert (counts.finished, counts.running, counts.waiting) == (BUDGET, 0, 0)
        assert len(trials) == BUDGET and all(t.state in FINISHED for t in trials)

        if kind == "sqlite":
            return  # the rest is about the study, not the store: checked once, on PostgreSQL
        # A node that joins later sees the settings the first ones recorded, and the budget full.
        status = hpo("status", *store, "--json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        settings = json.loads(status.stdout)["settings"]
        assert settings == {"preset": "smoke", "objective": "composite",
                            "direction": "minimize", "epochs": 2}  # fmt: skip
        later = hpo(*run, cwd=tmp_path)
        assert later.returncode == 0, later.stderr
        assert f"{BUDGET}/{BUDGET} finished" in later.stdout
        other = hpo(*run, "--epochs", "3", cwd=tmp_path)
        assert other.returncode == 2
        assert other.stderr.strip() == (
            f"error: study {name!r} was created with epochs 2, not 3; resume it with --epochs 2 "
            "or start a new study with --study NAME"
        )
        assert len(reader.trials()) == BUDGET
        reader.storage.engine.dispose()
