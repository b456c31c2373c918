"""Start the worker processes, show progress from the store, forward Ctrl-C, replace the dead.

Workers are forked from a fork server that has imported torch, Optuna and the pipeline once (never
from the launcher itself, and nothing there starts a thread or touches CUDA), so they do not each
import torch anew (8 workers on 2 cores: training 3.6 s after the command instead of 8 s);
`HPO_WORKER_START=exec` starts fresh interpreters (`python -m hpo._worker`) instead. Each worker
runs in its own session so the launcher alone decides how a Ctrl-C reaches them: it forwards
SIGINT, waits for every worker to record its trial (FAIL, re-queued), and kills what is left
after `STOP_GRACE_S`. A worker that dies (kill -9, the out-of-memory killer, a crash) is replaced
(at most `max_replacements` times); its trial is recorded as FAIL with the exit status as the
reason and re-queued with the same parameters, so its retry resumes from the dead trial's last
checkpoint. A trial that keeps killing its worker is given up after `MAX_RETRIES` tries and then
counts.

Several launchers (nodes) may share a study. Each one runs until the study holds the budget of
finished trials: when its workers see the budget taken but trials of other nodes are still
running, it waits, and every heartbeat interval fails and re-queues trials whose heartbeat stopped
(a node that vanished), then starts workers again for them. Store reads and writes are retried
while the store is away (a PostgreSQL restart), for `reconnect_s` at most.

With a deadline (`hpo run --timeout`, counted from the command's start) no trial starts once it
has passed: each worker finishes and records the trial it is running, then exits; the launcher
replaces no worker after it and stops as soon as its own workers are gone, without waiting for
other nodes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import optuna
from optuna.trial import TrialState

from hpo._errors import LaunchError
from hpo._study import (
    ATTR_WORKER_PID,
    StudyCounts,
    best_trial,
    count_trials,
    deadline_passed,
    fail_stale_trials,
    fail_trial,
    prune_checkpoints_or_warn,
    stale_local_trials,
)
from hpo._worker import EXIT_DONE, EXIT_RECYCLE, WorkerSpec, process_alive, run_forked
from storage import Reconnect, StoreLocation, redact

# What the fork server imports once; every worker forked from it starts with these loaded.
FORKSERVER_PRELOAD = (
    "torch", "optuna", "sqlalchemy", "psycopg2", "pipeline", "storage", "hpo._worker",
    "hpo._objective", "hpo._search_space", "hpo._study",
)  # fmt: skip
START_METHODS = ("forkserver", "exec")
STOP_GRACE_S = 20.0  # after a Ctrl-C, how long workers get to record their trials
POLL_S = 0.2



@dataclass(frozen=True)
class WorkerSlot:
    index: int
    device: str  # "cpu" or "cuda"
    cuda_visible_devices: str  # what the child sees as its only GPU; "" hides every GPU
    threads: int  # torch intra-op threads


# CPU default: one single-threaded worker per core. Measured on the 2-core machine (quick preset,
# 16 trials of 2 epochs, bench/overhead.py): 2 workers x 1 thread 42.9 s, 1 worker x 2 threads
# 59.8 s; the small per-scene operations of a trial scale better across processes than across
# threads. Capped so that a many-core host does not start dozens of ~0.5 GB processes unasked.
CPU_WORKERS_MAX = 8


def plan_slots(
    *,
    device: str,
    workers: int | None,
    gpus: str | None,
    workers_per_gpu: int | None,
    n_gpus: int,
    visible: str | None,
    n_cpus: int,
    threads: int | None = None,
) -> list[WorkerSlot]:
    """The worker layout: one per visible GPU (or `--gpus`, times `--workers-per-gpu`), or on the
    CPU one per core (at most CPU_WORKERS_MAX) with one thread each; `--workers N` spreads N over
    the GPUs round-robin. Each worker gets `threads` torch
    threads, by default the cores divided among the workers (never more threads than cores: an
    oversubscribed OpenMP pool can run ten times slower). LaunchError names the problem."""
    if threads is not None and threads < 1:
        raise LaunchError(f"--threads must be >= 1, but got {threads}")
    if device not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"--device must be auto, cpu or cuda, but got {device!r}")
    if workers is not None and workers < 1:
        raise LaunchError(f"--workers must be >= 1, but got {workers}")
    if workers_per_gpu is not None and workers_per_gpu < 1:
        raise LaunchError(f"--workers-per-gpu must be >= 1, but got {workers_per_gpu}")
    gpu_ids = _parse_gpus(gpus, n_gpus) if gpus is not None else None
    if gpu_ids is not None and device == "cpu":
        raise LaunchError("--gpus cannot be combined with --device cpu")
    use_gpus = gpu_ids is not None or device == "cuda" or (device == "auto" and n_gpus > 0)
    if use_gpus and n_gpus == 0:
        raise LaunchError("--device cuda asked for, but CUDA is not available on this machine")
    if not use_gpus:
        if workers_per_gpu is not None:
            raise LaunchError("--workers-per-gpu needs GPUs, and the workers run on the CPU")
        n = workers or max(1, min(n_cpus, CPU_WORKERS_MAX))
        per_worker = threads or max(1, n_cpus // n)
        return [WorkerSlot(i, "cpu", "", per_worker) for i in range(n)]
    ids = gpu_ids if gpu_ids is not None else list(range(n_gpus))
    per_gpu = workers_per_gpu or 1
    if workers is not None and workers_per_gpu is not None and workers != per_gpu * len(ids):
        raise LaunchError(
            f"--workers {workers} disagrees with --workers-per-gpu {per_gpu} on {len(ids)} GPU(s)"
        )
    n = workers if workers is not None else per_gpu * len(ids)
    names = [v.strip() for v in visible.split(",")] if visible else None
    per_worker = threads or max(1, n_cpus // n)
    return [
        WorkerSlot(
            i, "cuda", names[ids[i % len(ids)]] if names else str(ids[i % len(ids)]), per_worker
        )
        for i in range(n)
    ]


def _parse_gpus(text: str, n_gpus: int) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LaunchError(f"--gpus takes GPU numbers like 0,1,3, but got {text!r}") from None
    if not ids:
        raise LaunchError(f"--gpus takes GPU numbers like 0,1,3, but got {text!r}")
    if len(set(ids)) != len(ids):
        raise LaunchError(f"--gpus names a GPU twice: {text!r}")
    if n_gpus == 0:
        raise LaunchError(f"--gpus {text}: this machine has no visible CUDA GPU")
    missing = [i for i in ids if not 0 <= i < n_gpus]
    if missing:
        raise LaunchError(
            f"--gpus names GPU {missing[0]}, but only GPU 0-{n_gpus - 1} are visible"
            if n_gpus > 1
            else f"--gpus names GPU {missing[0]}, but only GPU 0 is visible"
        )
    return ids


class _ForkedProcess:
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


def _forkserver_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return context


# What a fork server that cannot start or fork raises (no socket, no process, a closed pipe).
_FORKSERVER_ERRORS = (OSError, EOFError, ValueError)


def warm_up(method: str, warn: Callable[[str], None] | None = None) -> str:
    """Start the fork server now, so that its imports overlap the launcher's own set-up.

    Returns the method workers can start by: `method`, or "exec" (after one line to `warn`) when
    the fork server cannot be started here.
    """
    if method != "forkserver":
        return method
    try:
        _forkserver_context()
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except _FORKSERVER_ERRORS as error:
        if warn is not None:
            warn(f"warning: the fork server did not start ({error}); workers start as fresh "
                 "interpreters instead (HPO_WORKER_START=exec)")
        return "exec"
    return method


@dataclass
class _Worker:
    slot: WorkerSlot
    process: subprocess.Popen[bytes] | _ForkedProcess
    log_path: Path
    started: float


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

    @property
    def budget_met(self) -> bool:
        return self.counts.finished >= self.budget


class Launcher:
    """Runs W worker processes until the study holds `budget` finished trials."""

    def __init__(
        self,
        *,
        location: StoreLocation,
        study: optuna.Study,
        spec: WorkerSpec,  # index, seed and threads are filled in per worker
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
        self.quiet = quiet
        self.out = out or sys.stderr
        self.max_replacements = (
            max_replacements if max_replacements is not None else max(3, 2 * len(slots))
        )
        self.direction = direction
        self.deadline = deadline
        self._n_started = 0
        self._replacements = 0
        self._signals: list[int] = []
        self._deaths: list[str] = []
        self._last_line = ""
        self._last_key: list[str] = []
        self._last_print = 0.0
        self._last_stale_check = time.monotonic()
        self.retry = Reconnect(location, deadline_s=spec.reconnect_s)

    # ------------------------------------------------------------------------------- the loop

    def run(self) -> LaunchResult:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        finished_before = self._counts().finished
        self._recover_orphans("its worker was gone when hpo run started")
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        workers: list[_Worker] = []
        gave_up: str | None = None
        timed_out = False
        try:
            if self._counts().used < self.spec.budget:
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
                    counts = self._counts()
                    if counts.finished >= self.spec.budget:
                        break
                    if self._time_up():
                        timed_out = True
                        break
                    # Slots free again (re-queued trials, or claims that saw a full budget and
                    # were then voided or failed): run them. Otherwise the rest is running on
                    # other nodes: wait for it to finish or to go stale.
                    if counts.used < self.spec.budget or counts.waiting:
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
        if not self.quiet and self.out.isatty():
            self.out.write("\n")
        trials = self.retry(
            lambda: self.study.get_trials(deepcopy=False), "reading the study's trials"
        )
        return LaunchResult(
            counts=count_trials(trials),
            budget=self.spec.budget,
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
        env = dict(os.environ)
        env.update(
            {
                "HPO_STORAGE": self.location.url,  # the environment, not argv: ps shows argv
                "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
                "OMP_NUM_THREADS": str(slot.threads),
                "MKL_NUM_THREADS": str(slot.threads),
                "TZ": "UTC",  # Optuna stores naive UTC datetimes
                "PYTHONUNBUFFERED": "1",
            }
        )
        log_path = self.log_dir / f"worker-{slot.index}.log"
        if self.start_method == "forkserver":
            # The environment travels through the fork server's socket, not argv.
            forked = _forkserver_context().Process(
                target=run_forked,
                args=(spec.to_json(), env, str(log_path)),
                name=f"hpo-worker-{slot.index}",
            )
            try:
                forked.start()
            except _FORKSERVER_ERRORS as error:
                # Lost fork server that cannot be restarted: this and later workers start as
                # fresh interpreters rather than the study stopping.
                self.out.write(f"warning: cannot fork a worker ({error}); workers start as "
                               "fresh interpreters from now on\n")
                self.start_method = "exec"
            else:
                return _Worker(slot, _ForkedProcess(forked), log_path, time.monotonic())
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "hpo._worker", spec.to_json()],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it forwards
            )
        return _Worker(slot, process, log_path, time.monotonic())

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
                how = _describe_exit(code)
                last = _last_line(worker.log_path)
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

    def _counts(self) -> StudyCounts:
        return count_trials(
            self.retry(lambda: self.study.get_trials(deepcopy=False), "counting trials")
        )

    def _fail_trials_of(self, pid: int, reason: str, *, requeue: bool) -> None:
        def fail() -> None:
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                if trial.user_attrs.get(ATTR_WORKER_PID) == pid:
                    fail_trial(self.study, trial._trial_id, redact(reason), requeue=requeue)

        self.retry(fail, f"recording the trial of worker pid {pid}")

    def _recover_orphans(self, why: str, own: frozenset[int] = frozenset()) -> None:
        """RUNNING trials of this host whose worker process is gone: FAIL and re-queue them.
        Workers in `own` are this launcher's, which `_reap` records with their exit status."""

        def alive(pid: int) -> bool:
            return pid in own or _worker_alive(pid)

        def recover() -> None:
            for trial in stale_local_trials(self.study, alive):
                pid = trial.user_attrs.get(ATTR_WORKER_PID)
                fail_trial(self.study, trial._trial_id, f"{why} (pid {pid})", requeue=True)

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
        if self.out.isatty() and self._last_line:
            self.out.write("\n")
            self._last_line = ""
        self.out.write(text + "\n")
        self.out.flush()

    def _progress(self, started: float, finished_before: int, *, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        tty = self.out.isatty()
        if not force and now - self._last_print < (1.0 if tty else 2.0):
            return
        self._last_print = now
        try:
            trials = self.study.get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001  (the store is away: the next poll shows progress)
            return
        line = format_progress(
            count_trials(trials),
            self.spec.budget,
            best=best_trial(trials, self.direction),
            elapsed_s=now - started,
            finished_before=finished_before,
        )
        if tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
            self._last_line = line
            return
        # In a log: a line when the counts or the best change, not one per poll.
        key = line.split(" | trials/h")[0].split(" | ")[:2]
        if force or key != self._last_key:
            self.out.write(line + "\n")
            self.out.flush()
            self._last_key = key


def format_progress(
    counts: StudyCounts,
    budget: int,
    *,
    best: optuna.trial.FrozenTrial | None,
    elapsed_s: float,
    finished_before: int,
) -> str:
    """finished / pruned / failed / running out of the budget, best, trials per hour, ETA."""
    finished = (
        f"{counts.finished}/{budget} finished ({counts.complete} complete, {counts.pruned} "
        f"pruned, {counts.failed} failed), {counts.running} running"
    )
    parts = [finished]
    parts.append(f"best {best.value:.4g} (trial {best.number})" if best else "best -")
    done_now = counts.finished - finished_before
    if done_now > 0 and elapsed_s > 0:
        per_hour = done_now / elapsed_s * 3600
        remaining = max(budget - counts.finished, 0)
        parts.append(f"{per_hour:.0f} trials/h")
        parts.append(f"ETA {_duration(remaining / per_hour * 3600)}")
    else:
        parts.append("-- trials/h")
    parts.append(f"elapsed {_duration(elapsed_s)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return redact(lines[-1])[:300] if lines else ""


def _worker_alive(pid: int) -> bool:
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
