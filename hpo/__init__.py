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
    SpaceError,
    StudyError,
)

if TYPE_CHECKING:
    from hpo._search_space import SearchSpace, default_space, load_space, suggest_config
    from hpo._study import (
        ATTR_CHECKPOINT,
        OBJECTIVES,
        REDUCTION_FACTOR,
        StudyCounts,
        StudySettings,
        best_trial,
        claim_trial,
        count_trials,
        create_or_load_study,
        load_existing_study,
        make_pruner,
        make_sampler,
        pruning_steps,
    )

_LAZY = {
    "SearchSpace": "hpo._search_space",
    "default_space": "hpo._search_space",
    "load_space": "hpo._search_space",
    "suggest_config": "hpo._search_space",
    "ATTR_CHECKPOINT": "hpo._study",
    "OBJECTIVES": "hpo._study",
    "REDUCTION_FACTOR": "hpo._study",
    "StudyCounts": "hpo._study",
    "StudySettings": "hpo._study",
    "best_trial": "hpo._study",
    "claim_trial": "hpo._study",
    "count_trials": "hpo._study",
    "create_or_load_study": "hpo._study",
    "load_existing_study": "hpo._study",
    "make_pruner": "hpo._study",
    "make_sampler": "hpo._study",
    "pruning_steps": "hpo._study",
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
    "REDUCTION_FACTOR",
    "DashboardError",
    "HpoError",
    "LaunchError",
    "NonFiniteObjective",
    "NothingToReport",
    "OutputNotWritable",
    "ReportError",
    "SearchSpace",
    "SpaceError",
    "StudyCounts",
    "StudyError",
    "StudySettings",
    "best_trial",
    "claim_trial",
    "count_trials",
    "create_or_load_study",
    "default_space",
    "load_existing_study",
    "load_space",
    "make_pruner",
    "make_sampler",
    "pruning_steps",
    "suggest_config",
]
