"""Running `hpo` as a user does, for the tests and the benchmarks: commands, nodes, a store reader.

As `optuna.testing` does for Optuna, this module ships with the package so that the test suite and
`bench/` share one copy; nothing in the service imports it. Every command runs with the store URL
cleared from the environment (a developer's $HPO_STORAGE never leaks in) and on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from typer.testing import CliRunner, Result

from hpo.cli import app
from storage import Reconnect
from storage.testing import DUMMY_PASSWORD

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def environment(**extra: str) -> dict[str, str]:
    """For `hpo` in a fresh interpreter: no store URL, no GPU, UTC (Optuna's naive datetimes)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPO_STORAGE": "", "TZ": "UTC", **extra}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """`hpo ARGS` in this process (typer's CliRunner)."""
    return CliRunner().invoke(app, list(args), env={"HPO_STORAGE": "", **(env or {})})


def hpo(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`hpo ARGS` in a fresh interpreter, as a user runs it."""
    return run_argv([sys.executable, "-m", "hpo.cli", *args], cwd=cwd, timeout=timeout)


def run_argv(argv: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`argv` (an `hpo` command line) to its end, output captured, in `environment()`."""
    return subprocess.run(
        argv, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


def assert_one_line_error(
    result: Result, fragment: str, code: int = 2, *, secret: str | None = None,
    quiet_stdout: bool = True,
) -> str:  # fmt: skip
    """The CLI's contract for bad input: exit `code`, exactly one line on stderr starting with
    "error: " and holding `fragment`, no traceback, no password (the tests' dummy one or
    `secret`) anywhere, and (unless `quiet_stdout` is False) nothing on stdout. Returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    for hidden in (DUMMY_PASSWORD, secret):
        assert not hidden or hidden not in result.output, result.output
    if quiet_stdout:
        assert result.stdout == "", result.stdout
    return lines[0]

def start_node(
    url: str,
    study: str,
    *args: str,
    cwd: Path,
    host: str | None = None,
) -> subprocess.Popen[str]:
    """One `hpo run` driver; `host` names its node in the store ($HPO_HOST)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = environment()
    env.pop("HPO_HOST", None)
    if host:
        env["HPO_HOST"] = host
    argv = [sys.executable, "-m", "hpo.cli", "run", "--storage", url, "--study", study]
    argv += ["--preset", "smoke", "--threads", "1", "--quiet", *args]
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


class StoreReader:
    """Reads a study's trials through its own connection, as another program would."""

    def __init__(self, url: str, study: str) -> None:
        self.storage = optuna.storages.RDBStorage(url)
        self.name = study

    def trials(self) -> list[FrozenTrial]:
        def read() -> list[FrozenTrial]:
            try:
                study_id = self.storage.get_study_id_from_name(self.name)
            except KeyError:
                return []
            return self.storage.get_all_trials(study_id, deepcopy=False)

        # A restarted server leaves dead connections in the pool: read again on a fresh one.
        return Reconnect(deadline_s=60)(read, "reading the trials")

    def wait_for(
        self,
        condition: Callable[[list[FrozenTrial]], object],
        *,
        timeout_s: float,
        nodes: list[subprocess.Popen[str]] = (),  # type: ignore[assignment]
        what: str = "the condition",
    ) -> object:
        """Poll until `condition(trials)` is truthy; its value. Fails early if a node exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in nodes:
                if node.poll() is not None:
                    _, err = node.communicate()
                    raise AssertionError(f"a node exited ({node.returncode}) before {what}: {err}")
            found = condition(self.trials())
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def finish(node: subprocess.Popen[str], timeout_s: float) -> tuple[int, str, str]:
    """Wait for a node to exit; (returncode, stdout, stderr). Kills it and fails on timeout."""
    try:
        out, err = node.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        node.kill()
        out, err = node.communicate()
        raise AssertionError(f"node still running after {timeout_s:.0f} s: {err[-3000:]}")
    return node.returncode, out, err


def mid_trial(min_epoch: int, max_epoch: int) -> Callable[[list[FrozenTrial]], FrozenTrial | None]:
    """A RUNNING trial that has reported (so checkpointed) between min and max epochs."""

    def condition(trials: list[FrozenTrial]) -> FrozenTrial | None:
        for trial in trials:
            steps = trial.intermediate_values
            running = trial.state == TrialState.RUNNING and "worker_pid" in trial.user_attrs
            if running and steps and min_epoch <= max(steps) <= max_epoch:
                return trial
        return None

    return condition
