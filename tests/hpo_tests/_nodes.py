"""Helpers for the multi-process tests: start `hpo run` drivers ("nodes"), read the study back
through a separate connection, and wait for conditions on the stored trials."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from storage import Reconnect
from tests.hpo_tests._cli import environment

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


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
    try:
        out, err = node.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        node.kill()
        out, err = node.communicate()
        raise AssertionError(f"node still running after {timeout_s:.0f} s: {err[-3000:]}")
    return node.returncode, out, err


def worker_logs(*dirs: Path) -> str:
    return "\n".join(p.read_text() for d in dirs for p in (d / "runs").rglob("*.log"))


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
