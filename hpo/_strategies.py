"""The study's strategies: objectives, samplers and pruners, by name, and the pruners' rungs.

Optuna is imported on first use: the command line builds its choices from this module.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from hpo._errors import StudyError

if TYPE_CHECKING:
    import optuna

    from pipeline import ExperimentConfig


class Objective(str, Enum):
    """What a study optimises: the localization score (SYSTEM.md §5) or the validation NMSE,
    both minimised, or the share of validation scenes localized (success), maximised."""

    composite = "composite"
    nmse = "nmse"
    success = "success"


def default_objective(base: ExperimentConfig) -> str:
    """A study's objective when `hpo run` is given none: success for the SBL count network,
    whose trials differ in how they count and blend, which success scores directly (the
    composite preferred trials whose larger beta moves MUSIC off the sources: on `quick` the best
    of 200 such trials localized fewer test scenes than SBL, RESULTS.md); composite otherwise."""
    return "success" if base.model == "sbl_count" else "composite"


class Pruner(str, Enum):
    """Which pruner stops bad trials early."""

    hyperband = "hyperband"
    asha = "asha"
    median = "median"
    none = "none"


class Sampler(str, Enum):
    """Which sampler proposes the parameters."""

    tpe = "tpe"
    random = "random"


OBJECTIVES: dict[str, str] = {"composite": "minimize", "nmse": "minimize",
                              "success": "maximize"}  # name -> direction
PRUNERS = tuple(p.value for p in Pruner)
ETA_PRUNERS = ("hyperband", "asha")  # the pruners with a reduction factor (eta)
REDUCTION_FACTOR = 3  # their default eta
SAMPLERS = tuple(s.value for s in Sampler)


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    if name == "tpe":
        # Optuna 5 defaults: multivariate, constant liar (parallel workers spread out).
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, epochs: int,
                reduction_factor: int = REDUCTION_FACTOR) -> optuna.pruners.BasePruner:
    """The pruner `name` over `epochs`; `reduction_factor` (eta >= 2) is hyperband's and asha's."""
    import optuna

    if reduction_factor < 2:
        raise StudyError(f"the reduction factor must be at least 2, but got {reduction_factor}")
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(epochs, 1), reduction_factor=reduction_factor
        )
    if name == "asha":
        # Asynchronous successive halving: rungs at 1, eta, eta^2, ... epochs; a trial goes on
        # past a rung only while it is in the best 1/eta of the trials that reached that rung.
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=reduction_factor, min_early_stopping_rate=0
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


def pruning_steps(name: str, epochs: int,
                  reduction_factor: int = REDUCTION_FACTOR) -> frozenset[int] | None:
    """The epochs after which pruner `name` (as `make_pruner` builds it) can stop a trial, or None
    for any epoch. Hyperband's brackets and asha promote at rungs min_resource x eta^k, with
    min_resource 1: elsewhere their answer is always "go on", and asking costs a store read."""
    if name in ETA_PRUNERS:
        steps, step = set(), 1
        while step <= epochs:
            steps.add(step)
            step *= reduction_factor
        return frozenset(steps)
    if name == "none":
        return frozenset()
    return None
