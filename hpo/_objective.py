"""One trial: config -> pipeline.train, reporting the objective after every epoch.

The objective is computed from validation metrics only, never from the training loss, so it does
not depend on any searched loss weight: `composite` is the localization score of SYSTEM.md §5
(lower is better), `nmse` the validation covariance NMSE, `success` the share of validation scenes
with K right and every source in the 3 deg / 3 deg / 0.5 m box (higher is better). A trial's value is the objective at its
last epoch (the model it ends with; the cosine schedule makes that the intended end point).

With a checkpoint directory, training saves its state (after every epoch, or at the interval the
worker asks for, and after the last epoch) and resumes from what is there: a retried trial (a NEW
trial with the same parameters) first reports the epochs of the checkpoint's history as its own
intermediate values 1..k, then trains and reports k+1 onwards.
So every trial's intermediate values are one per epoch with no step twice, whether it resumed or
not; `resumed_from_epoch` says how many came from the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from hpo._attrs import ATTR_HISTORY
from hpo._errors import NonFiniteObjective
from pipeline import (
    CHECKPOINT_NAME,
    CheckpointError,
    EpochMetrics,
    ExperimentConfig,
    NumericalError,
    load_checkpoint,
    train,
)
from storage import report_epoch, set_user_attrs

_logger = logging.getLogger(__name__)
# The file pipeline.train writes in its checkpoint_dir each epoch (run_trial checks that train
# resumed from the epoch read here).
CHECKPOINT_FILE = CHECKPOINT_NAME


def objective_value(metrics: EpochMetrics, objective: str) -> float:
    """The number a study optimises (`OBJECTIVES` gives the direction), from one epoch's
    validation metrics."""
    if objective == "composite":
        return float(metrics.composite)
    if objective == "nmse":
        return float(metrics.val_nmse)
    if objective == "success":
        return float(metrics.success_rate)
    raise ValueError(f"unknown objective {objective!r}")


@dataclass
class TrialRun:
    """What happened in one trial, for the worker to record."""

    state: optuna.trial.TrialState
    value: float | None = None
    reason: str | None = None  # why it failed or was pruned
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time inside pipeline.train
    # The service's share of train_seconds: per-epoch store traffic (reports, pruning questions,
    # history) and checkpoint writes; wall and this process's CPU seconds.
    service_seconds: float = 0.0
    service_cpu_seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU seconds over train_seconds
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint (0: trained from scratch)
    checkpoint: Path | None = None  # the last epoch's checkpoint file



def run_trial(
    trial: optuna.Trial,
    config: ExperimentConfig,
    *,
    device: torch.device,
    objective: str,
    guard: Callable[[], Any] | None = None,
    checkpoint_dir: Path | None = None,
    store: Callable[[Callable[[], Any], str], Any] | None = None,
    on_resume: Callable[[int], None] | None = None,
    prune_steps: Container[int] | None = None,
    checkpoint_every_s: float = 0.0,
    phase: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> TrialRun:
    """Train `config`, report the objective each epoch, prune when the pruner says so.

    `guard` is entered around each epoch's reporting (the worker uses it to hold off signals
    while the store is written); `store(fn, what)` runs each group of store writes (the worker
    retries them while the store is away). With `checkpoint_dir`, training checkpoints there (after
    every epoch, or every `checkpoint_every_s` seconds of training and after the last epoch) and
    resumes from a checkpoint of the same config found there; `on_resume(epoch)` is
    called first with the epoch it resumes after (0 for a fresh start). The pruner is asked
    after the epochs in `prune_steps` (`hpo._strategies.pruning_steps`; None: after every one), and
    once after the epochs restored from a checkpoint. Numerical failures and CUDA
    out-of-memory end the trial as FAIL with their reason; anything raised by `guard` or `store`
    or a KeyboardInterrupt-like BaseException propagates to the caller. `phase(name)`, if given,
    is entered around the epoch reports and the pruning questions (a profiler's timers).
    """
    history: list[dict[str, Any]] = []
    write = store or (lambda fn, what: fn())
    span = phase or (lambda name: contextlib.nullcontext())

    def should_prune() -> bool:
        with span("pruning questions"):
            return trial.should_prune()

    timings: dict[str, float] = {}

    def record(metrics: EpochMetrics, *, live: bool) -> None:
        began, began_cpu = time.perf_counter(), time.process_time()
        try:
            _record(metrics, live=live)
        finally:
            timings["report_s"] = timings.get("report_s", 0.0) + time.perf_counter() - began
            timings["report_cpu_s"] = (
                timings.get("report_cpu_s", 0.0) + time.process_time() - began_cpu
            )

    def _record(metrics: EpochMetrics, *, live: bool) -> None:
        value = objective_value(metrics, objective)
        history.append(metrics.to_dict())

        def send() -> bool:
            if not math.isfinite(value):
                set_user_attrs(trial, {ATTR_HISTORY: history})
                return False
            with span("epoch reports"):  # one transaction
                report_epoch(trial, value, metrics.epoch, {ATTR_HISTORY: history})
            # After the last epoch there is no training left to save: the trial completes.
            return (
                metrics.epoch < config.epochs
                and live
                and (prune_steps is None or metrics.epoch in prune_steps)
                and should_prune()
            )

        with guard() if guard else contextlib.nullcontext():
            prune = write(send, f"reporting epoch {metrics.epoch} of trial {trial.number}")
        if not math.isfinite(value):
            raise NonFiniteObjective(f"objective {objective} is {value} at epoch {metrics.epoch}")
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}")

    started, started_cpu = time.perf_counter(), time.process_time()
    resumed = _restorable(checkpoint_dir, config)

    def ended(state: optuna.trial.TrialState, **kwargs: Any) -> TrialRun:
        return TrialRun(
            state,
            history=history,
            train_seconds=time.perf_counter() - started,
            service_seconds=timings.get("report_s", 0.0) + timings.get("checkpoint_s", 0.0),
            service_cpu_seconds=timings.get("report_cpu_s", 0.0)
            + timings.get("checkpoint_cpu_s", 0.0),
            cpu_seconds=time.process_time() - started_cpu,
            resumed_from_epoch=len(resumed),
            **kwargs,
        )

    fail = optuna.trial.TrialState.FAIL
    try:
        if on_resume is not None:
            on_resume(len(resumed))
        for metrics in resumed:  # what the checkpoint holds becomes this trial's epochs 1..k
            record(metrics, live=False)
        if resumed and len(resumed) < config.epochs:
            # The pruner sees the restored curve before training goes on.
            with guard() if guard else contextlib.nullcontext():
                prune = write(should_prune, f"asking the pruner for trial {trial.number}")
            if prune:
                raise optuna.TrialPruned(f"pruned at epoch {len(resumed)}")
        result = train(
            config,
            device=device,
            on_epoch_end=lambda metrics: record(metrics, live=True),
            checkpoint_dir=checkpoint_dir,
            resume=bool(resumed),
            timings=timings,
            save_best=False,  # a trial's value is its last epoch: no best-epoch copy
            checkpoint_every_s=checkpoint_every_s,
        )
        if result.resumed_from_epoch != len(resumed):
            raise CheckpointError(
                f"training resumed after epoch {result.resumed_from_epoch}, but the checkpoint "
                f"read before it holds {len(resumed)} epochs"
            )
    except optuna.TrialPruned as e:
        return ended(optuna.trial.TrialState.PRUNED, reason=str(e))
    except NumericalError as e:
        return ended(fail, reason=f"NumericalError: {e}")
    except NonFiniteObjective as e:
        return ended(fail, reason=f"NonFiniteObjective: {e}")
    except torch.cuda.OutOfMemoryError as e:
        lines = str(e).strip().splitlines()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ended(fail, reason=f"CUDA out of memory: {lines[0] if lines else ''}".strip())
    except CheckpointError as e:
        return ended(fail, reason=f"CheckpointError: {e}")
    final = objective_value(result.final, objective)
    if not math.isfinite(final):
        return ended(fail, reason=f"NonFiniteObjective: objective {objective} is {final}")
    return ended(optuna.trial.TrialState.COMPLETE, value=final, checkpoint=result.checkpoint_path)


def _restorable(checkpoint_dir: Path | None, config: ExperimentConfig) -> list[EpochMetrics]:
    """The epochs saved in `checkpoint_dir` for `config` (empty: start from scratch). A checkpoint
    that cannot be read or holds another config is moved aside, never trained on."""
    if checkpoint_dir is None:
        return []
    path = checkpoint_dir / CHECKPOINT_FILE
    if not path.exists():
        return []
    try:
        state = load_checkpoint(path, "cpu")
        if state["config"] != config:
            raise CheckpointError(f"{path} holds another config")
        history = [EpochMetrics(**m) for m in state["history"]]
        if [m.epoch for m in history] != list(range(1, state["epoch"] + 1)):
            raise CheckpointError(f"{path}: history does not match epoch {state['epoch']}")
    except (CheckpointError, KeyError, TypeError) as e:
        _logger.warning("not resuming from %s (%s); starting from scratch", path, e)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return []
    return history
