"""RIS near-field covariance learning: physics, data, model, losses, training, evaluation.

Knows nothing about Optuna, SQL or the command line: it takes a config and a device, and calls a
callback once per epoch.
"""

from __future__ import annotations

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

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ExperimentConfig",
    "NumericalError",
    "PipelineError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "field_names",
    "preset",
    "replace",
]
