"""RIS near-field covariance learning: physics, data, model, losses, training, evaluation.

Knows nothing about Optuna, SQL or the command line: it takes a config and a device, and calls a
callback once per epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline._config import (
    PRESETS,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    field_names,
    preset,
    replace,
)
from pipeline._errors import CheckpointError, ConfigError, NumericalError, PipelineError

if TYPE_CHECKING:
    from pipeline._benchmark_eval import EvaluationResult, evaluate_model
    from pipeline._crb import cramer_rao_bound
    from pipeline._pursuit import matching_pursuit
    from pipeline._sbl import SblSettings, sparse_bayesian_learning
    from pipeline._train import (
        CHECKPOINT_NAME,
        EpochMetrics,
        TrainResult,
        load_checkpoint,
        load_model,
        resolve_device,
        train,
    )

# Names that need torch are imported on first use, so that configs and errors (all the `hpo run`
# launcher and `hpo --help` need) load without it.
_LAZY = {
    "EvaluationResult": "pipeline._benchmark_eval",
    "evaluate_model": "pipeline._benchmark_eval",
    "cramer_rao_bound": "pipeline._crb",
    "matching_pursuit": "pipeline._pursuit",
    "SblSettings": "pipeline._sbl",
    "sparse_bayesian_learning": "pipeline._sbl",
    "CHECKPOINT_NAME": "pipeline._train",
    "EpochMetrics": "pipeline._train",
    "TrainResult": "pipeline._train",
    "load_checkpoint": "pipeline._train",
    "load_model": "pipeline._train",
    "resolve_device": "pipeline._train",
    "train": "pipeline._train",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CHECKPOINT_NAME",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "EpochMetrics",
    "EvaluationResult",
    "ExperimentConfig",
    "NumericalError",
    "PipelineError",
    "SblSettings",
    "TrainResult",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "cramer_rao_bound",
    "evaluate_model",
    "field_names",
    "load_checkpoint",
    "load_model",
    "matching_pursuit",
    "preset",
    "replace",
    "resolve_device",
    "sparse_bayesian_learning",
    "train",
]
