"""A worker process of `hpo run`: its spec, signals, heartbeat, parent watch and entry points.

`run_forked` runs in a process forked from the launcher's fork server, `python -m hpo._worker
SPEC_JSON` as a fresh interpreter (HPO_WORKER_START=exec); both run `hpo._worker_loop`.

The launcher gives it the store URL in $HPO_STORAGE (never on the command line, where `ps` would
show a password), its GPU in CUDA_VISIBLE_DEVICES and its thread count in OMP_NUM_THREADS. It
opens its own store connection, reads what the study runs from the store, and loops: claim a
trial within the budget, train it, record the outcome, until the budget is used up.

Signals: SIGINT/SIGTERM during training end the trial at once (FAIL, re-queued with the same
parameters), outside training they stop the loop after the current store write. A worker whose
launcher disappears stops the same way, so no worker outlives its `hpo run`.

Resuming: every trial trains in the checkpoint directory of its retry chain (checkpoint_dir/<study>/
trial-<first number>), so a retry of a trial whose worker died continues after the last epoch
that trial saved (it saves every `checkpoint_every_s` seconds of training and after its last
epoch). The store may go away (a PostgreSQL restart): every store operation is retried with a
bounded backoff (`reconnect_s` in all), and a trial whose store writes failed for good is left to
its heartbeat, which lets another worker re-queue it.

Exit codes: 0 budget used up, or `hpo run --timeout` passed (no trial starts after it; the one
running then is finished and recorded first), 75 recycled after `max_trials` trials (50) (the
launcher starts a fresh process: memory does not creep across hundreds of trials), 130
interrupted, 1 unexpected error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from hpo._processes import process_alive
from storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, RECONNECT_S

EXIT_DONE = 0
EXIT_ERROR = 1
EXIT_RECYCLE = 75
EXIT_INTERRUPTED = 130
MAX_CONSECUTIVE_ERRORS = 5  # unexpected (non-numerical) trial errors in a row before giving up
# A trial saves its training state (for a retry to resume) once this many seconds of training have
# passed since its last save, and after its last epoch (`hpo run --checkpoint-every`).
CHECKPOINT_EVERY_S = 30.0
KEEP_CHECKPOINTS = 3  # final checkpoints of the best COMPLETE trials kept on disk

_logger = logging.getLogger("hpo.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs besides the store URL and what the study holds (its settings, its
    specification and its budget, read from the store): this process's own part, which travels as
    one JSON argument."""

    study: str
    sampler_seed: int | None
    device: str  # "cpu" or "cuda" (the one GPU in CUDA_VISIBLE_DEVICES)
    threads: int  # torch intra-op threads
    index: int  # worker slot, for logs
    parent_pid: int  # the launcher; the worker stops when it is gone
    max_trials: int = 50  # trials before the process is recycled (a new fork: ~1 s)
    checkpoint_dir: str | None = None  # absolute; shared by every node of the study
    keep_checkpoints: int = KEEP_CHECKPOINTS
    checkpoint_every_s: float = CHECKPOINT_EVERY_S  # 0: after every epoch
    heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S  # seconds between a trial's heartbeats
    grace_period_s: int = GRACE_PERIOD_S  # seconds without one before a trial is stale
    reconnect_s: float = RECONNECT_S  # how long a lost store is waited for
    deadline: float | None = None  # Unix time (`hpo run --timeout`) after which no trial starts

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


class WorkerInterrupted(BaseException):
    """Raised into the training code by a signal; BaseException so no `except Exception` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """First SIGINT/SIGTERM wins. While `armed` (training) it interrupts at once; otherwise it
    only sets `received`, which the loop checks at safe points (no half-written store rows)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._armed = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self._armed:
            self._armed = False
            raise WorkerInterrupted(signum)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        if self.received is not None:
            raise WorkerInterrupted(self.received)
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside `armed`: hold signals off while the store is written, then deliver them."""
        was_armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = was_armed
        if was_armed and self.received is not None:
            raise WorkerInterrupted(self.received)


class Heartbeat:
    """Records the trial's heartbeat every `interval_s` from a daemon thread."""

    def __init__(self, storage: Any, trial_id: int, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(storage, trial_id, interval_s), daemon=True
        )
        self._thread.start()

    def _beat(self, storage: Any, trial_id: int, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as e:  # noqa: BLE001  (a missed beat is harmless; grace is long)
                _logger.warning("heartbeat of trial id %d failed: %s", trial_id, e.__cause__ or e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _watch_parent(parent_pid: int) -> None:
    """Stop this worker (as if by SIGTERM) when the launcher that started it is gone.

    The parent is the launcher, or the fork server, which exits when its launcher does; either
    way this process is re-parented then."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and process_alive(parent_pid):
            time.sleep(1.0)
        _logger.warning("launcher %d is gone; stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def run_forked(spec_json: str, env: dict[str, str], log_path: str) -> None:
    """Entry point in a process forked from the fork server: become what `python -m hpo._worker`
    would be (own session, the launcher's environment, output to the log), then run `main`."""
    os.setsid()  # like start_new_session: a Ctrl-C at the terminal reaches the launcher only
    os.environ.clear()
    os.environ.update(env)
    time.tzset()  # TZ=UTC: Optuna stores naive UTC datetimes
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    code = main([spec_json])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no multiprocessing atexit machinery; the exit code is the worker's


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec.from_json(args[0])
    signals = Signals()
    signals.install()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s worker {spec.index} pid {os.getpid()} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    _watch_parent(spec.parent_pid)
    try:
        from hpo._worker_loop import WorkerLoop

        return WorkerLoop(spec, signals).loop()
    except WorkerInterrupted:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001  (logged with its traceback; the exit code tells the launcher)
        from storage import redact

        _logger.error("worker failed:\n%s", redact(traceback.format_exc()))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
