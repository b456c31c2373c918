"""The launcher: run the worker processes until the study is done; forward Ctrl-C, replace the dead.

Workers start as `hpo._processes` says, each in its own session, so the launcher alone decides
how a Ctrl-C reaches them: it forwards SIGINT, waits for every worker to record its trial (FAIL, re-queued), and kills what is left
after `STOP_GRACE_S`. A worker that dies (kill -9, the out-of-memory killer, a crash) is replaced
(at most `max_replacements` times); its trial is recorded as FAIL with the exit status as the
reason and re-queued with the same parameters, so its retry resumes from the dead trial's last
checkpoint. A trial that keeps killing its worker is given up after `MAX_RETRIES` tries and then
counts.

Several launchers (nodes) may share a study. Each one runs until the study holds its budget of
finished trials (the claims alone decide whether a trial may start; the launcher only asks the
budget whether the study is done or a claim could succeed): when its workers see the budget taken
but trials of other nodes are still running, it waits, and every heartbeat interval fails and re-queues trials whose heartbeat stopped
(a node that vanished), then starts workers again for them. Store reads and writes are retried
while the store is away (a PostgreSQL restart), for `reconnect_s` at most.

With a deadline (`hpo run --timeout`, counted from the command's start) no trial starts once it
has passed: each worker finishes and records the trial it is running, then exits; the launcher
replaces no worker after it and stops as soon as its own workers are gone, without waiting for
other nodes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import optuna
from optuna.trial import TrialState

from hpo._attrs import ATTR_WORKER_PID
from hpo._budget import BudgetState, StudyCounts, budget_state, deadline_passed
from hpo._checkpoints import prune_checkpoints_or_warn
from hpo._layout import WorkerSlot
from hpo._processes import (
    WorkerProcess,
    describe_exit,
    last_line,
    spawn_worker,
    start_method,
    worker_alive,
)
from hpo._progress import Progress
from hpo._requeue import fail_stale_trials, fail_trial, stale_local_trials
from hpo._studies import best_trial
from hpo._worker import EXIT_DONE, EXIT_RECYCLE, WorkerSpec
from storage import Reconnect, StoreLocation, redact, trial_id

STOP_GRACE_S = 20.0  # after a Ctrl-C, how long workers get to record their trials
POLL_S = 0.2


@dataclass
class _Worker:
    slot: WorkerSlot
    process: WorkerProcess
    log_path: Path


@dataclass
class LaunchResult:
    counts: StudyCounts
    budget: int
    elapsed_s: float
    interrupted: bool = False
    gave_up: str | None = None  # why the launcher stopped before the budget was used up
    timed_out: bool = False  # stopped at the deadline before the budget was used up
    best: optuna.trial.FrozenTrial | None = None
    worker_deaths: list[str] = field(default_factory=list)


class Launcher:
    """Runs W worker processes until the study holds its budget of finished trials."""

    def __init__(
        self,
        *,
        location: StoreLocation,
        study: optuna.Study,
        spec: WorkerSpec,  # index, seed, device and threads are filled in per worker
        slots: list[WorkerSlot],
        seed: int | None,
        log_dir: Path,
        quiet: bool = False,
        out: IO[str] | None = None,
        max_replacements: int | None = None,
        direction: str = "minimize",
        method: str | None = None,  # how workers start [default: start_method()]
        deadline: float | None = None,  # Unix time: no trial starts after it; running ones end
    ) -> None:
        self.location = location
        self.study = study
        self.spec = spec
        self.start_method = method or start_method()
        self.slots = slots
        self.seed = seed
        self.log_dir = log_dir
        self.progress = Progress(out or sys.stderr, quiet=quiet, direction=direction)
        self.max_replacements = (
            max_replacements if max_replacements is not None else max(3, 2 * len(slots))
        )
        self.direction = direction
        self.deadline = deadline
        self._n_started = 0
        self._replacements = 0
        self._signals: list[int] = []
        self._deaths: list[str] = []
        self._last_stale_check = time.monotonic()
        self.retry = Reconnect(location, deadline_s=spec.reconnect_s)

    # ------------------------------------------------------------------------------- the loop

    def run(self) -> LaunchResult:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        finished_before = self._budget().counts.finished
        self._recover_orphans("its worker was gone when hpo run started")
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        workers: list[_Worker] = []
        gave_up: str | None = None
        timed_out = False
        try:
            if self._budget().claimable:
                workers = [self._start(slot) for slot in self.slots]
            while True:
                if self._signals:
                    self._stop(workers)
                    workers = []
                    break
                workers, gave_up = self._reap(workers)
                if gave_up:
                    break
                self._check_stale(workers)
                if not workers:
                    state = self._budget()
                    if state.met:
                        break
                    if self._time_up():
                        timed_out = True
                        break
                    # Slots free again (re-queued trials, or claims that saw a full budget and
                    # were then voided or failed): run them. Otherwise the rest is running on
                    # other nodes: wait for it to finish or to go stale.
                    if state.claimable:
                        if self._replacements >= self.max_replacements:
                            gave_up = "the budget is not used up and no worker restarts are left"
                            break
                        self._replacements += 1
                        workers = [self._start(slot) for slot in self.slots]
                self._progress(started, finished_before)
                time.sleep(POLL_S)
        finally:
            for worker in workers:  # only on an unexpected error in the loop itself
                self._kill(worker)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self._recover_orphans("its worker was gone when hpo run ended")
        self._prune_checkpoints()
        self._progress(started, finished_before, force=True)
        self.progress.end()
        trials = self.retry(
            lambda: self.study.get_trials(deepcopy=False), "reading the study's trials"
        )
        state = self.retry(lambda: budget_state(self.study, trials), "reading the budget")
        return LaunchResult(
            counts=state.counts,
            budget=state.budget,
            elapsed_s=time.monotonic() - started,
            interrupted=bool(self._signals),
            gave_up=gave_up,
            timed_out=timed_out,
            best=best_trial(trials, self.direction),
            worker_deaths=list(self._deaths),
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _time_up(self) -> bool:
        return deadline_passed(self.deadline)

    def _start(self, slot: WorkerSlot) -> _Worker:
        seed = None if self.seed is None else self.seed + 7919 * self._n_started
        self._n_started += 1
        spec = replace(
            self.spec,
            index=slot.index,
            sampler_seed=seed,
            device=slot.device,
            threads=slot.threads,
            parent_pid=os.getpid(),
            deadline=self.deadline,
        )
        log_path = self.log_dir / f"worker-{slot.index}.log"
        process, self.start_method = spawn_worker(
            self.start_method, slot, spec.to_json(), url=self.location.url, log_path=log_path,
            warn=self._say,
        )  # fmt: skip
        return _Worker(slot, process, log_path)

    def _reap(self, workers: list[_Worker]) -> tuple[list[_Worker], str | None]:
        """Handle workers that exited: done, recycled, or dead (replaced while allowed)."""
        alive: list[_Worker] = []
        gave_up = None
        for worker in workers:
            code = worker.process.poll()
            if code is None:
                alive.append(worker)
            elif code == EXIT_DONE:
                continue
            elif code == EXIT_RECYCLE:
                if not self._time_up():  # a new process would only see the time up and exit
                    alive.append(self._start(worker.slot))
            else:
                how = describe_exit(code)
                last = last_line(worker.log_path)
                self._deaths.append(f"worker {worker.slot.index} pid {worker.process.pid} {how}")
                # Re-queued whatever the cause: a retry resumes from the trial's checkpoint, and a
                # trial that keeps killing its worker stops being retried after MAX_RETRIES.
                self._fail_trials_of(
                    worker.process.pid,
                    f"worker process {worker.process.pid} {how}" + (f": {last}" if last else ""),
                    requeue=True,
                )
                if self._time_up():
                    self._say(f"worker {worker.slot.index} {how}; not replaced: the time limit "
                              "has passed")
                elif self._replacements < self.max_replacements:
                    self._replacements += 1
                    self._say(f"worker {worker.slot.index} {how}; starting a replacement")
                    alive.append(self._start(worker.slot))
                else:
                    gave_up = (
                        f"worker {worker.slot.index} {how} and the {self.max_replacements} "
                        f"replacements are used up (see {worker.log_path})"
                    )
        if gave_up:
            for worker in alive:
                self._interrupt(worker)
            self._wait(alive)
            alive = []
        return alive, gave_up

    def _stop(self, workers: list[_Worker]) -> None:
        """Ctrl-C: forward it, give the workers STOP_GRACE_S to record, then kill the rest."""
        n_signals = len(self._signals)
        self._say(
            f"stopping: {len(workers)} worker(s) are recording their trials "
            "(Ctrl-C again to kill them now)"
        )
        for worker in workers:
            self._interrupt(worker)
        self._wait(workers, abort=lambda: len(self._signals) > n_signals)

    def _wait(self, workers: list[_Worker], abort: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        pending = list(workers)
        while pending and time.monotonic() < deadline and not (abort and abort()):
            pending = [w for w in pending if w.process.poll() is None]
            time.sleep(0.05)
        for worker in pending:
            self._kill(worker)
            self._fail_trials_of(
                worker.process.pid,
                "interrupted; worker killed after the stop grace period",
                requeue=True,
            )

    def _interrupt(self, worker: _Worker) -> None:
        if worker.process.poll() is None:
            try:
                worker.process.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def _kill(self, worker: _Worker) -> None:
        if worker.process.poll() is None:
            try:
                os.killpg(worker.process.pid, signal.SIGKILL)  # its session: children too
            except ProcessLookupError:
                pass
        worker.process.wait()

    # ----------------------------------------------------------------------------- the store

    def _budget(self) -> BudgetState:
        return self.retry(lambda: budget_state(self.study), "counting trials")

    def _fail_trials_of(self, pid: int, reason: str, *, requeue: bool) -> None:
        def fail() -> None:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                if trial.user_attrs.get(ATTR_WORKER_PID) == pid:
                    fail_trial(self.study, trial_id(trial), redact(reason), requeue=requeue)

        self.retry(fail, f"recording the trial of worker pid {pid}")

    def _recover_orphans(self, why: str, own: frozenset[int] = frozenset()) -> None:
        """RUNNING trials of this host whose worker process is gone: FAIL and re-queue them.
        Workers in `own` are this launcher's, which `_reap` records with their exit status."""

        def alive(pid: int) -> bool:
            return pid in own or worker_alive(pid)

        def recover() -> None:
            for trial in stale_local_trials(self.study, alive):
                pid = trial.user_attrs.get(ATTR_WORKER_PID)
                fail_trial(self.study, trial_id(trial), f"{why} (pid {pid})", requeue=True)

        self.retry(recover, "re-queueing trials of dead workers")

    def _check_stale(self, workers: list[_Worker]) -> None:
        """Every heartbeat interval: re-queue trials of vanished workers, here or on any node."""
        now = time.monotonic()
        if now - self._last_stale_check < self.spec.heartbeat_interval_s:
            return
        self._last_stale_check = now
        own = frozenset(w.process.pid for w in workers)
        self._recover_orphans("its worker was gone", own)
        stale = self.retry(lambda: fail_stale_trials(self.study), "failing stale trials")
        if stale:
            self._say(f"re-queued trial(s) {', '.join(map(str, stale))}: no heartbeat")

    def _prune_checkpoints(self) -> None:
        prune_checkpoints_or_warn(self.study, self.spec.checkpoint_dir,
                                  keep=self.spec.keep_checkpoints, retry=self.retry,
                                  warn=lambda line: self._say(f"warning: {line}"))

    # ------------------------------------------------------------------------------ progress

    def _say(self, text: str) -> None:
        self.progress.say(text)

    def _progress(self, started: float, finished_before: int, *, force: bool = False) -> None:
        self.progress.show(self.study, started, finished_before, force=force)
