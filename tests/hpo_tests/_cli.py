"""Running the `hpo` command in tests: in this process (typer's CliRunner) or as the real console
entry point in a fresh interpreter, always with the store URL cleared from the environment so a
developer's $HPO_STORAGE never leaks in, and on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner, Result

from hpo.cli import app


def environment(**extra: str) -> dict[str, str]:
    """For `hpo` in a fresh interpreter: no store URL, no GPU, UTC (Optuna's naive datetimes)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPO_STORAGE": "", "TZ": "UTC", **extra}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """`hpo ARGS` in this process."""
    return CliRunner().invoke(app, list(args), env={"HPO_STORAGE": "", **(env or {})})


def hpo(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`hpo ARGS` in a fresh interpreter, as a user runs it."""
    return run_argv([sys.executable, "-m", "hpo.cli", *args], cwd=cwd, timeout=timeout)


def run_argv(argv: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`argv` (an `hpo` command line) to its end, output captured, in `environment()`."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
