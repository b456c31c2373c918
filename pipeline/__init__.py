"""RIS near-field covariance learning: physics, data, model, losses, training, evaluation.

Knows nothing about Optuna, SQL or the command line: it takes a config and a device, and calls a
callback once per epoch.
"""

from __future__ import annotations

from pipeline._benchmark_eval import EvaluationResult, evaluate_model
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
from pipeline._crb import cramer_rao_bound
from pipeline._errors import CheckpointError, ConfigError, NumericalError, PipelineError
from pipeline._pursuit import matching_pursuit
from pipeline._train import (
    CHECKPOINT_NAME,
    EpochMetrics,
    TrainResult,
    load_checkpoint,
    load_model,
    resolve_device,
    train,
)

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
    "train",
]
