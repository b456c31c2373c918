"""One trial: config -> pipeline.train, reporting the objective after every epoch.

The objective is computed from validation metrics only, never from the training loss, so it does
not depend on any searched loss weight: `composite` is the localization score of SYSTEM.md §5
(lower is better), `nmse` the validation covariance NMSE. A trial's value is the objective at its
last epoch (the model it ends with; the cosine schedule makes that the intended end point).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from pipeline import EpochMetrics, ExperimentConfig, NumericalError, train


def objective_value(metrics: EpochMetrics, objective: str) -> float:
    """The number a study minimises, from one epoch's validation metrics."""
    if objective == "composite":
        return float(metrics.composite)
    if objective == "nmse":
        return float(metrics.val_nmse)
    raise ValueError(f"unknown objective {objective!r}")


@dataclass
class TrialRun:
    """What happened in one trial, for the worker to record."""

    state: optuna.trial.TrialState
    value: float | None = None
    reason: str | None = None  # why it failed or was pruned
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time inside pipeline.train


class NonFiniteObjective(ArithmeticError):
    pass


def run_trial(
    trial: optuna.Trial,
    config: ExperimentConfig,
    *,
    device: torch.device,
    objective: str,
    guard: Callable[[], Any] | None = None,
) -> TrialRun:
    """Train `config`, report the objective each epoch, prune when the pruner says so.

    `guard` is entered around each epoch's reporting (the worker uses it to hold off signals
    while the store is written). Numerical failures and CUDA out-of-memory end the trial as FAIL
    with their reason; anything raised by `guard` or a KeyboardInterrupt-like BaseException
    propagates to the caller.
    """
    history: list[dict[str, Any]] = []

    def on_epoch_end(metrics: EpochMetrics) -> None:
        value = objective_value(metrics, objective)
        with guard() if guard else contextlib.nullcontext():
            history.append(metrics.to_dict())
            trial.set_user_attr("history", history)
            if not math.isfinite(value):
                raise NonFiniteObjective(
                    f"objective {objective} is {value} at epoch {metrics.epoch}"
                )
            trial.report(value, metrics.epoch)
            # After the last epoch there is no training left to save: the trial completes.
            if metrics.epoch < config.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}")

    started = time.perf_counter()

    def ended(state: optuna.trial.TrialState, **kwargs: Any) -> TrialRun:
        return TrialRun(
            state, history=history, train_seconds=time.perf_counter() - started, **kwargs
        )

    fail = optuna.trial.TrialState.FAIL
    try:
        result = train(config, device=device, on_epoch_end=on_epoch_end)
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
    final = objective_value(result.final, objective)
    if not math.isfinite(final):
        return ended(fail, reason=f"NonFiniteObjective: objective {objective} is {final}")
    return ended(optuna.trial.TrialState.COMPLETE, value=final)
