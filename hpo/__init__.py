"""The study driver: search space, objective, worker processes, the `hpo` command line.

This face names what other packages and the benchmarks may use; everything else is private to
`hpo`. Names are imported on first use, so that `hpo --help` and the launcher load neither torch
nor Optuna until they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hpo._errors import (
    DashboardError,
    HpoError,
    LaunchError,
    NonFiniteObjective,
    NothingToReport,
    OutputNotWritable,
    ReportError,
    RunStopped,
    SpaceError,
    StudyError,
)

if TYPE_CHECKING:
    from hpo._attrs import ATTR_CHECKPOINT
    from hpo._budget import StudyCounts, budget_state, claim_trial, count_trials
    from hpo._requeue import RequeueStaleTrial, fail_trial
    from hpo._run import RunRequest, run_study
    from hpo._search_space import SearchSpace, default_space, load_space, suggest_config
    from hpo._strategies import (
        OBJECTIVES,
        PRUNERS,
        REDUCTION_FACTOR,
        SAMPLERS,
        make_pruner,
        make_sampler,
        pruning_steps,
    )
    from hpo._studies import (
        StudySettings,
        StudySpec,
        best_trial,
        create_or_load_study,
        load_existing_study,
    )
    from hpo._worker import WorkerSpec
    from hpo._worker_loop import WorkerLoop

_LAZY = {
    "RequeueStaleTrial": "hpo._requeue",
    "WorkerSpec": "hpo._worker",
    "WorkerLoop": "hpo._worker_loop",
    "fail_trial": "hpo._requeue",
    "budget_state": "hpo._budget",
    "run_study": "hpo._run",
    "RunRequest": "hpo._run",
    "SAMPLERS": "hpo._strategies",
    "PRUNERS": "hpo._strategies",
    "StudySpec": "hpo._studies",
    "SearchSpace": "hpo._search_space",
    "default_space": "hpo._search_space",
    "load_space": "hpo._search_space",
    "suggest_config": "hpo._search_space",
    "ATTR_CHECKPOINT": "hpo._attrs",
    "OBJECTIVES": "hpo._strategies",
    "REDUCTION_FACTOR": "hpo._strategies",
    "StudyCounts": "hpo._budget",
    "StudySettings": "hpo._studies",
    "best_trial": "hpo._studies",
    "claim_trial": "hpo._budget",
    "count_trials": "hpo._budget",
    "create_or_load_study": "hpo._studies",
    "load_existing_study": "hpo._studies",
    "make_pruner": "hpo._strategies",
    "make_sampler": "hpo._strategies",
    "pruning_steps": "hpo._strategies",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ATTR_CHECKPOINT",
    "OBJECTIVES",
    "PRUNERS",
    "REDUCTION_FACTOR",
    "SAMPLERS",
    "DashboardError",
    "HpoError",
    "LaunchError",
    "NonFiniteObjective",
    "NothingToReport",
    "OutputNotWritable",
    "ReportError",
    "RequeueStaleTrial",
    "RunRequest",
    "RunStopped",
    "SearchSpace",
    "SpaceError",
    "StudyCounts",
    "StudyError",
    "StudySettings",
    "StudySpec",
    "WorkerLoop",
    "WorkerSpec",
    "best_trial",
    "budget_state",
    "claim_trial",
    "count_trials",
    "create_or_load_study",
    "default_space",
    "fail_trial",
    "load_existing_study",
    "load_space",
    "make_pruner",
    "make_sampler",
    "pruning_steps",
    "run_study",
    "suggest_config",
]
