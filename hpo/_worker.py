"""One worker process of `hpo run`: `run_forked` in a process forked from the launcher's fork
server, or `python -m hpo._worker SPEC_JSON` as a fresh interpreter (HPO_WORKER_START=exec).

The launcher gives it the store URL in $HPO_STORAGE (never on the command line, where `ps` would
show a password), its GPU in CUDA_VISIBLE_DEVICES and its thread count in OMP_NUM_THREADS. It
opens its own store connection and loops: claim a trial within the budget, train it, record the
outcome, until the budget is used up.

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
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_DONE = 0
EXIT_ERROR = 1
EXIT_RECYCLE = 75
EXIT_INTERRUPTED = 130
MAX_CONSECUTIVE_ERRORS = 5  # unexpected (non-numerical) trial errors in a row before giving up
# A trial saves its training state (for a retry to resume) once this many seconds of training have
# passed since its last save, and after its last epoch (`hpo run --checkpoint-every`).
CHECKPOINT_EVERY_S = 30.0

_logger = logging.getLogger("hpo.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the store URL; travels as one JSON argument."""

    study: str
    budget: int  # the study's total of finished trials
    preset: str
    epochs: int
    objective: str
    pruner: str
    sampler: str
    sampler_seed: int | None
    space: dict[str, Any]  # SearchSpace.to_dict()
    device: str  # "cpu" or "cuda" (the one GPU in CUDA_VISIBLE_DEVICES)
    threads: int  # torch intra-op threads
    index: int  # worker slot, for logs
    parent_pid: int  # the launcher; the worker stops when it is gone
    max_trials: int = 50  # trials before the process is recycled (a new fork: ~1 s)
    checkpoint_dir: str | None = None  # absolute; shared by every node of the study
    keep_checkpoints: int = 3  # final checkpoints of the best COMPLETE trials kept on disk
    checkpoint_every_s: float = CHECKPOINT_EVERY_S  # 0: after every epoch
    heartbeat_interval_s: int = 20  # storage.HEARTBEAT_INTERVAL_S
    grace_period_s: int = 300  # storage.GRACE_PERIOD_S
    reconnect_s: float = 300.0  # storage.RECONNECT_S: how long a lost store is waited for
    reduction_factor: int = 3  # eta of hyperband and asha (hpo._study.REDUCTION_FACTOR)
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


class _Signals:
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


class _Heartbeat:
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


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (alive, or a zombie not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    signals = _Signals()
    signals.install()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s worker {spec.index} pid {os.getpid()} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    _watch_parent(spec.parent_pid)
    try:
        return _Worker(spec, signals).loop()
    except WorkerInterrupted:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001  (logged with its traceback; the exit code tells the launcher)
        from storage import redact

        _logger.error("worker failed:\n%s", redact(traceback.format_exc()))
        return EXIT_ERROR


class _Worker:
    def __init__(self, spec: WorkerSpec, signals: _Signals) -> None:
        # Heavy imports here, after the signal handlers are in place.
        import optuna
        import torch

        from hpo._search_space import SearchSpace
        from hpo._study import RequeueStaleTrial, make_pruner, make_sampler, pruning_steps
        from pipeline import preset, replace, resolve_device
        from storage import Reconnect, open_storage, resolve_url

        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.signals = signals
        self.location = resolve_url(None)  # $HPO_STORAGE, set by the launcher
        self.retry = Reconnect(self.location, deadline_s=spec.reconnect_s)
        self.storage = open_storage(
            self.location,
            stale_trial_callback=RequeueStaleTrial(),
            heartbeat_interval_s=spec.heartbeat_interval_s,
            grace_period_s=spec.grace_period_s,
            patience_s=spec.reconnect_s,  # started while the server restarts: wait for it
        )
        self.heartbeat_s = spec.heartbeat_interval_s
        self.study = self.retry(
            lambda: optuna.load_study(
                study_name=spec.study,
                storage=self.storage,
                sampler=make_sampler(spec.sampler, spec.sampler_seed),
                pruner=make_pruner(spec.pruner, spec.epochs, spec.reduction_factor),
            ),
            "loading the study",
        )
        # Read the study's trials once, outside the store lock: Optuna keeps the finished ones,
        # so each claim's read under the lock fetches only what changed since. In a study of
        # 10,000 trials that first read took 17 CPU-s; made under the lock by 16 new workers at
        # once, it kept claims waiting past the lock's timeout (bench/load.py, BENCHMARKS.md).
        self.retry(lambda: self.study.get_trials(deepcopy=False), "reading the study")
        # The epochs after which the pruner can stop a trial: it is asked there only.
        self.prune_steps = pruning_steps(spec.pruner, spec.epochs, spec.reduction_factor)
        self.base = replace(preset(spec.preset), epochs=spec.epochs)
        self.space = SearchSpace.from_dict(spec.space)
        self.device = resolve_device(spec.device)
        self.device_info: dict[str, Any] = {"device": str(self.device), "threads": spec.threads}
        if self.device.type == "cuda":
            self.device_info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
            self.device_info["gpu_name"] = torch.cuda.get_device_name(self.device)

    def loop(self) -> int:
        from hpo._study import claim_trial, deadline_passed

        n_trials = 0
        n_errors = 0
        deadline = self.spec.deadline
        while True:
            if self.signals.received is not None:
                return EXIT_INTERRUPTED
            if n_trials >= self.spec.max_trials:
                _logger.info("recycling after %d trials", n_trials)
                return EXIT_RECYCLE
            trial = self.retry(
                lambda: claim_trial(self.study, self.spec.budget, deadline), "claiming a trial"
            )
            if trial is None:
                if deadline_passed(deadline):
                    _logger.info("time limit of hpo run (%s) reached; exiting",
                                 datetime.fromtimestamp(deadline, UTC).isoformat())
                else:
                    _logger.info("budget of %d trials used up; exiting", self.spec.budget)
                return EXIT_DONE
            n_trials += 1
            unexpected = self._run(trial)
            n_errors = n_errors + 1 if unexpected else 0
            if n_errors >= MAX_CONSECUTIVE_ERRORS:
                _logger.error("%d unexpected trial errors in a row; giving up", n_errors)
                return EXIT_ERROR

    def _checkpoint_dir(self, trial: Any) -> Path | None:
        from hpo._study import chain_root, checkpoint_dir_for

        if self.spec.checkpoint_dir is None:
            return None
        return checkpoint_dir_for(
            Path(self.spec.checkpoint_dir), self.spec.study, chain_root(trial)
        )

    def _set_attrs(self, trial: Any, attrs: dict[str, Any], what: str) -> None:
        from hpo._study import set_user_attrs

        self.retry(lambda: set_user_attrs(trial, attrs), f"{what} of trial {trial.number}")

    def _run(self, trial: Any) -> bool:
        """Run one claimed trial to its recorded end. True if it failed unexpectedly."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from hpo._objective import run_trial
        from hpo._search_space import suggest_config
        from hpo._study import (
            ATTR_CHECKPOINT,
            ATTR_FAIL_REASON,
            ATTR_RESUMED_FROM,
            ATTR_RETRY_COUNT,
            ETA_PRUNERS,
            fail_trial,
        )
        from hpo._trial_writes import batched_params
        from pipeline import config_to_dict
        from storage import StorageError

        started = time.time()
        heartbeat = _Heartbeat(self.storage, trial._trial_id, self.heartbeat_s)
        checkpoint_dir = self._checkpoint_dir(trial)
        try:
            def suggest() -> Any:
                with batched_params(trial):  # one transaction for all the parameters
                    return suggest_config(trial, self.space, self.base)

            config = self.retry(suggest, "suggesting parameters")
            attrs: dict[str, Any] = {
                "config": config_to_dict(config),
                "seed": config.seed,
                "worker_index": self.spec.index,
                "started_unix": started,
                "pruner": self.spec.pruner,  # what judged this trial (a resumed study may differ)
                **({"reduction_factor": self.spec.reduction_factor}
                   if self.spec.pruner in ETA_PRUNERS else {}),
                **self.device_info,
            }
            if ATTR_RETRY_COUNT not in trial.user_attrs:
                attrs[ATTR_RETRY_COUNT] = 0
            if checkpoint_dir is not None:
                attrs["checkpoint_dir"] = str(checkpoint_dir)
            self._set_attrs(trial, attrs, "recording the start")
            _logger.info("trial %d: %s", trial.number, trial.params)
            with self.signals.armed():
                run = run_trial(
                    trial,
                    config,
                    device=self.device,
                    objective=self.spec.objective,
                    guard=self.signals.held,
                    checkpoint_dir=checkpoint_dir,
                    store=self.retry,
                    on_resume=lambda epoch: self._set_attrs(
                        trial, {ATTR_RESUMED_FROM: epoch}, "recording the resume"
                    ),
                    checkpoint_every_s=self.spec.checkpoint_every_s,
                    prune_steps=self.prune_steps,
                )
        except WorkerInterrupted as e:
            heartbeat.stop()
            reason = f"interrupted by {e} (worker pid {os.getpid()}); re-queued"
            self.retry(
                lambda: fail_trial(self.study, trial._trial_id, reason, requeue=True),
                f"re-queueing trial {trial.number}",
            )
            _logger.info("trial %d: %s", trial.number, reason)
            raise
        except UpdateFinishedTrialError:
            heartbeat.stop()
            # Declared stale (no heartbeat for the grace period) and failed by another process,
            # which queued its retry: stop working on it.
            _logger.warning("trial %d was finished by another process; dropping it", trial.number)
            return False
        except StorageError as e:
            heartbeat.stop()
            # The store stayed away past reconnect_s: the trial is left to its heartbeat.
            _logger.error("trial %d: %s", trial.number, e)
            raise
        except Exception as e:  # noqa: BLE001  (recorded as the trial's failure reason)
            heartbeat.stop()
            _logger.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
            first = (str(e).strip().splitlines() or [""])[0]
            failed = {
                ATTR_FAIL_REASON: f"{type(e).__name__}: {first}",
                "wall_time_s": time.time() - started,
            }
            self._finish(trial, TrialState.FAIL, None, failed)
            return True
        heartbeat.stop()
        attrs = {
            "wall_time_s": time.time() - started,
            "train_time_s": run.train_seconds,
            # Of train_time_s: the service's per-epoch reports and checkpoint writes (wall s),
            # and this worker's CPU seconds training, without that service share.
            "service_time_s": run.service_seconds,
            "train_cpu_s": run.cpu_seconds - run.service_cpu_seconds,
        }
        if run.history:
            attrs["metrics"] = run.history[-1]
        if run.state == TrialState.COMPLETE and run.checkpoint is not None:
            attrs[ATTR_CHECKPOINT] = str(run.checkpoint)
        elif run.state == TrialState.PRUNED:
            attrs["pruned_reason"] = run.reason
        elif run.state == TrialState.FAIL:
            attrs[ATTR_FAIL_REASON] = run.reason
        recorded = self._finish(trial, run.state, run.value, attrs)
        if recorded:
            _logger.info(
                "trial %d: %s%s%s in %.1f s",
                trial.number,
                run.state.name,
                f" value {run.value:.5g}" if run.value is not None else f" ({run.reason})",
                f", resumed after epoch {run.resumed_from_epoch}"
                if run.resumed_from_epoch
                else "",
                time.time() - started,
            )
        if recorded and run.state != TrialState.COMPLETE and checkpoint_dir is not None:
            # A pruned or failed trial ends its chain (only an interrupted or stale one is
            # re-queued, and not here): its directory goes, and the ranking the other
            # directories are kept by has not changed, so there is nothing else to prune.
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        else:
            self._prune_checkpoints(checkpoint_dir)
        return False

    def _finish(self, trial: Any, state: Any, value: float | None, attrs: dict[str, Any]) -> bool:
        """Record the outcome (attributes, then the state); False if another process finished
        the trial first (it went stale and was re-queued)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from hpo._study import set_user_attrs

        def tell() -> bool:
            if self.storage.get_trial(trial._trial_id).state.is_finished():
                return False  # a retry after a commit whose answer was lost, or a stale trial
            set_user_attrs(trial, attrs)
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=state)
            return True

        try:
            return self.retry(tell, f"recording the end of trial {trial.number}")
        except UpdateFinishedTrialError:
            _logger.warning("trial %d was already finished by another process", trial.number)
            return False

    def _prune_checkpoints(self, checkpoint_dir: Path | None) -> None:
        from hpo._study import prune_checkpoints_or_warn

        if checkpoint_dir is None or self.spec.checkpoint_dir is None:
            return
        prune_checkpoints_or_warn(self.study, self.spec.checkpoint_dir,
                                  keep=self.spec.keep_checkpoints, retry=self.retry,
                                  warn=_logger.warning)


if __name__ == "__main__":
    sys.exit(main())
