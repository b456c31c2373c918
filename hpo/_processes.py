"""Worker processes: how they start (fork server or fresh interpreter), and how they ended.

Workers are forked from a fork server that has imported torch, Optuna and the pipeline once (never
from the launcher itself, and nothing there starts a thread or touches CUDA), so they do not each
import torch anew (8 workers on 2 cores: training 3.6 s after the command instead of 8 s);
`HPO_WORKER_START=exec` starts fresh interpreters (`python -m hpo._worker`) instead. Each worker
runs in its own session, so the launcher alone decides how a Ctrl-C reaches it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hpo._errors import LaunchError
from hpo._layout import WorkerSlot
from storage import redact

# What the fork server imports once; every worker forked from it starts with these loaded.
FORKSERVER_PRELOAD = (
    "torch", "optuna", "sqlalchemy", "psycopg2", "pipeline", "storage", "hpo._worker",
    "hpo._worker_loop", "hpo._objective", "hpo._search_space", "hpo._budget",
)  # fmt: skip
START_METHODS = ("forkserver", "exec")


class ForkedProcess:
    """A worker forked from the fork server, behind the few `subprocess.Popen` calls the launcher
    makes (exit codes alike: the code, or minus the signal that killed it)."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode


def start_method() -> str:
    """How workers start: $HPO_WORKER_START (forkserver or exec); forkserver where the platform
    has it."""
    method = os.environ.get("HPO_WORKER_START", "").strip().lower()
    if method:
        if method not in START_METHODS:
            raise LaunchError(
                f"HPO_WORKER_START must be one of {', '.join(START_METHODS)}, but got {method!r}"
            )
        return method
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "exec"


def forkserver_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


# What a fork server that cannot start or fork raises (no socket, no process, a closed pipe).
FORKSERVER_ERRORS = (OSError, EOFError, ValueError)


def warm_up(method: str, warn: Callable[[str], None] | None = None) -> str:
    """Start the fork server now, so that its imports overlap the launcher's own set-up.

    Returns the method workers can start by: `method`, or "exec" (after one line to `warn`) when
    the fork server cannot be started here.
    """
    if method != "forkserver":
        return method
    try:
        forkserver_context()
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except FORKSERVER_ERRORS as error:
        if warn is not None:
            warn(f"warning: the fork server did not start ({error}); workers start as fresh "
                 "interpreters instead (HPO_WORKER_START=exec)")
        return "exec"
    return method


WorkerProcess = subprocess.Popen[bytes] | ForkedProcess


def spawn_worker(method: str, slot: WorkerSlot, spec_json: str, *, url: str,
                 log_path: Path, warn: Callable[[str], None]) -> tuple[WorkerProcess, str]:
    """Start one worker for `slot` with `spec_json` (its WorkerSpec) and the store URL `url` in
    its environment (never in argv: ps shows argv), output appended to `log_path`. Returns the
    process and the start method to use from now on ("exec" once the fork server is lost)."""
    env = dict(os.environ)
    env.update(
        {
            "HPO_STORAGE": url,
            "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
            "OMP_NUM_THREADS": str(slot.threads),
            "MKL_NUM_THREADS": str(slot.threads),
            "TZ": "UTC",  # Optuna stores naive UTC datetimes
            "PYTHONUNBUFFERED": "1",
        }
    )
    if method == "forkserver":
        from hpo._worker import run_forked

        # The environment travels through the fork server's socket, not argv.
        forked = forkserver_context().Process(
            target=run_forked, args=(spec_json, env, str(log_path)),
            name=f"hpo-worker-{slot.index}",
        )  # fmt: skip
        try:
            forked.start()
        except FORKSERVER_ERRORS as error:
            # Lost fork server that cannot be restarted: this and later workers start as
            # fresh interpreters rather than the study stopping.
            warn(f"warning: cannot fork a worker ({error}); workers start as fresh "
                 "interpreters from now on")
            method = "exec"
        else:
            return ForkedProcess(forked), method
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hpo._worker", spec_json],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it forwards
        )
    return process, method


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return redact(lines[-1])[:300] if lines else ""


def worker_alive(pid: int) -> bool:
    """Whether `pid` is a running hpo worker (not a dead one, nor a recycled pid)."""
    if not process_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # no /proc: trust the signal probe
    # A fresh interpreter runs `-m hpo._worker`; a forked worker keeps its fork server's command
    # line (`from multiprocessing.forkserver import main; ...`).
    return b"hpo._worker" in cmdline or b"multiprocessing.forkserver" in cmdline


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (alive, or a zombie not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
