"""The attribute schema: every study and trial user-attribute key hpo writes, and its records.

The worker writes a trial's attributes at four moments, each in one transaction: the claim stamp
(`claim_record`), the start (`start_record`), every epoch (`HISTORY`, with the intermediate value),
and the end (`end_record`). The launcher and the read-only commands read them back through the
same keys; nothing else in hpo spells a key out.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

# ---------------------------------------------------------------------------------- the study
ATTR_SETTINGS = "hpo_settings"  # StudySettings as a dict: what makes its trials comparable
ATTR_SPEC = "hpo_spec"  # StudySpec as a dict: what the workers run (the latest hpo run's)
ATTR_BUDGET = "hpo_budget"  # the latest --trials: the study's total of finished trials

# ----------------------------------------------------------------------- a trial: the claim stamp
ATTR_WORKER_PID = "worker_pid"
ATTR_HOST = "host"  # the node its worker ran on (node_name())
ATTR_PID_SPACE = "pid_space"  # kernel boot and pid namespace its worker_pid is valid in
ATTR_CLAIMED_UNIX = "claimed_unix"  # wall clock (s since the epoch) when it was claimed
HOST_ENV_VAR = "HPO_HOST"  # names this node in the store [default: the hostname]

# -------------------------------------------------------------------------- a trial: retries
ATTR_RETRY_OF = "retry_of"  # number of the interrupted trial it repeats
ATTR_RETRY_CHAIN = "retry_chain"  # numbers of the trials it repeats, first one first
ATTR_RETRY_COUNT = "retry_count"  # how many times its parameters were tried before
ATTR_RESUMED_FROM = "resumed_from_epoch"  # last epoch of the checkpoint it started from

# ---------------------------------------------------------------------------- a trial: start
ATTR_CONFIG = "config"  # its whole ExperimentConfig as a dict
ATTR_SEED = "seed"
ATTR_WORKER_INDEX = "worker_index"
ATTR_STARTED_UNIX = "started_unix"
ATTR_PRUNER = "pruner"  # what judged it (a resumed study may use another)
ATTR_REDUCTION_FACTOR = "reduction_factor"  # that pruner's eta, for hyperband and asha
ATTR_DEVICE = "device"
ATTR_THREADS = "threads"
ATTR_CUDA_VISIBLE = "cuda_visible_devices"
ATTR_GPU_NAME = "gpu_name"
ATTR_CHECKPOINT_DIR = "checkpoint_dir"  # where its chain checkpoints

# ------------------------------------------------------------------------ a trial: each epoch
ATTR_HISTORY = "history"  # EpochMetrics.to_dict() of every epoch so far

# ------------------------------------------------------------------------------ a trial: end
ATTR_WALL_TIME = "wall_time_s"
ATTR_TRAIN_TIME = "train_time_s"
ATTR_SERVICE_TIME = "service_time_s"  # of train_time_s: store reports and checkpoint writes
ATTR_TRAIN_CPU = "train_cpu_s"  # the worker's CPU seconds training, without that service share
ATTR_METRICS = "metrics"  # the last epoch's EpochMetrics as a dict
ATTR_CHECKPOINT = "checkpoint"  # its final checkpoint file (COMPLETE trials)
ATTR_PRUNED_REASON = "pruned_reason"
ATTR_FAIL_REASON = "fail_reason"  # why it failed
ATTR_VOID = "void_reason"  # a claim undone because it was cut off; counts nowhere

# What a FAIL without a stored reason was: failed by Optuna's own stale-trial sweep.
NO_REASON = "no heartbeat (stale)"


def node_name() -> str:
    """This node's name in the store: $HPO_HOST, else the hostname."""
    return os.environ.get(HOST_ENV_VAR) or socket.gethostname()


def pid_space() -> str | None:
    """Where this process's pids mean something: the kernel boot and the pid namespace (two
    containers, or two machines, with the same node name never share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def claim_record() -> dict[str, Any]:
    """The claim stamp: this process and node, and the time. Written in one transaction; a
    RUNNING trial without it is a claim that was cut off."""
    return {
        ATTR_WORKER_PID: os.getpid(),
        ATTR_HOST: node_name(),
        ATTR_PID_SPACE: pid_space(),
        ATTR_CLAIMED_UNIX: time.time(),
    }


def claimed(trial: FrozenTrial) -> bool:
    """Whether `trial` carries the claim stamp (its claim completed under the lock)."""
    # Both keys are written in one transaction; either one is the stamp.
    return ATTR_CLAIMED_UNIX in trial.user_attrs or ATTR_WORKER_PID in trial.user_attrs


def start_record(*, config: dict[str, Any], seed: int, worker_index: int, started_unix: float,
                 pruner: str, reduction_factor: int | None, device_info: dict[str, Any],
                 checkpoint_dir: str | None, first_try: bool) -> dict[str, Any]:
    """What a trial records when its worker starts it. `device_info` holds ATTR_DEVICE,
    ATTR_THREADS and, on a GPU, ATTR_CUDA_VISIBLE and ATTR_GPU_NAME."""
    record: dict[str, Any] = {
        ATTR_CONFIG: config,
        ATTR_SEED: seed,
        ATTR_WORKER_INDEX: worker_index,
        ATTR_STARTED_UNIX: started_unix,
        ATTR_PRUNER: pruner,
        **({ATTR_REDUCTION_FACTOR: reduction_factor} if reduction_factor is not None else {}),
        **device_info,
    }
    if first_try:
        record[ATTR_RETRY_COUNT] = 0
    if checkpoint_dir is not None:
        record[ATTR_CHECKPOINT_DIR] = checkpoint_dir
    return record


def end_record(*, state: TrialState, wall_time_s: float, train_time_s: float = 0.0,
               service_time_s: float = 0.0, train_cpu_s: float = 0.0,
               metrics: dict[str, Any] | None = None, checkpoint: str | None = None,
               reason: str | None = None, trained: bool = True) -> dict[str, Any]:
    """What a trial records when it ends in `state`; `reason` is why it was pruned or failed.
    A trial that failed before training (`trained` False) records only its wall time."""
    record: dict[str, Any] = {ATTR_WALL_TIME: wall_time_s}
    if trained:
        record |= {ATTR_TRAIN_TIME: train_time_s, ATTR_SERVICE_TIME: service_time_s,
                   ATTR_TRAIN_CPU: train_cpu_s}  # fmt: skip
    if metrics is not None:
        record[ATTR_METRICS] = metrics
    if state == TrialState.COMPLETE and checkpoint is not None:
        record[ATTR_CHECKPOINT] = checkpoint
    elif state == TrialState.PRUNED:
        record[ATTR_PRUNED_REASON] = reason
    elif state == TrialState.FAIL:
        record[ATTR_FAIL_REASON] = reason
    return record


def retry_record(failed: FrozenTrial) -> dict[str, Any]:
    """What a re-queued copy of the interrupted trial `failed` carries."""
    chain = retry_chain(failed)
    return {ATTR_RETRY_OF: failed.number, ATTR_RETRY_CHAIN: chain, ATTR_RETRY_COUNT: len(chain)}


def retry_chain(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials `trial` repeats, first one first, and its own."""
    return list(trial.user_attrs.get(ATTR_RETRY_CHAIN, [])) + [trial.number]


def chain_root(trial: Any) -> int:
    """The number of the first trial of `trial`'s retry chain (its own number if not a retry)."""
    chain = trial.user_attrs.get(ATTR_RETRY_CHAIN)
    return int(chain[0]) if chain else trial.number


def requeued_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """The numbers of the FAIL trials that a WAITING (or later) retry took the place of."""
    return {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}


def void(trial: FrozenTrial) -> bool:
    """Whether `trial` is a claim that was undone (FAIL, counted nowhere, never a failure)."""
    return trial.state == TrialState.FAIL and ATTR_VOID in trial.user_attrs


def failures(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """The study's failed trials, void claims left out, each with its reason and whether it was
    re-queued: what `hpo status` and `hpo report` list."""
    requeued = requeued_numbers(trials)
    return [
        {
            "number": t.number,
            "reason": t.user_attrs.get(ATTR_FAIL_REASON, NO_REASON),
            "requeued": t.number in requeued,
        }
        for t in trials
        if t.state == TrialState.FAIL and not void(t)
    ]
