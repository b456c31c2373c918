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
    from pipeline._benchmark_eval import (
        SCENE_CHUNK,
        EvaluationResult,
        evaluate_model,
        evaluation_scenes,
    )
    from pipeline._counting import mdl_estimate
    from pipeline._crb import cramer_rao_bound
    from pipeline._data import SceneBatch, generate_scenes, iterate_batches, load_split
    from pipeline._diagnose import scale_report
    from pipeline._grid import music_grid
    from pipeline._losses import compute_loss
    from pipeline._metrics import Localization, localization_metrics
    from pipeline._model import build_model, count_parameters
    from pipeline._music import music_localize
    from pipeline._physics import Deployment
    from pipeline._pursuit import coded_dictionary, matching_pursuit
    from pipeline._references import reference_metrics
    from pipeline._sbl import SblSettings, sparse_bayesian_learning
    from pipeline._train import (
        CHECKPOINT_NAME,
        EpochMetrics,
        TrainResult,
        TrainStep,
        load_checkpoint,
        load_model,
        make_optimizer,
        resolve_device,
        train,
        validate,
    )

# Names that need torch are imported on first use, so that configs and errors (all the `hpo run`
# launcher and `hpo --help` need) load without it.
_LAZY = {
    "SCENE_CHUNK": "pipeline._benchmark_eval",
    "evaluation_scenes": "pipeline._benchmark_eval",
    "SceneBatch": "pipeline._data",
    "generate_scenes": "pipeline._data",
    "iterate_batches": "pipeline._data",
    "load_split": "pipeline._data",
    "scale_report": "pipeline._diagnose",
    "Localization": "pipeline._metrics",
    "localization_metrics": "pipeline._metrics",
    "mdl_estimate": "pipeline._counting",
    "music_grid": "pipeline._grid",
    "music_localize": "pipeline._music",
    "compute_loss": "pipeline._losses",
    "build_model": "pipeline._model",
    "count_parameters": "pipeline._model",
    "Deployment": "pipeline._physics",
    "coded_dictionary": "pipeline._pursuit",
    "reference_metrics": "pipeline._references",
    "make_optimizer": "pipeline._train",
    "validate": "pipeline._train",
    "EvaluationResult": "pipeline._benchmark_eval",
    "evaluate_model": "pipeline._benchmark_eval",
    "cramer_rao_bound": "pipeline._crb",
    "matching_pursuit": "pipeline._pursuit",
    "SblSettings": "pipeline._sbl",
    "sparse_bayesian_learning": "pipeline._sbl",
    "CHECKPOINT_NAME": "pipeline._train",
    "EpochMetrics": "pipeline._train",
    "TrainResult": "pipeline._train",
    "TrainStep": "pipeline._train",
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
    "SCENE_CHUNK",
    "CheckpointError",
    "ConfigError",
    "Deployment",
    "EpochMetrics",
    "EvaluationResult",
    "ExperimentConfig",
    "Localization",
    "NumericalError",
    "PipelineError",
    "SblSettings",
    "SceneBatch",
    "TrainResult",
    "TrainStep",
    "apply_overrides",
    "build_model",
    "coded_dictionary",
    "compute_loss",
    "config_from_dict",
    "config_to_dict",
    "count_parameters",
    "cramer_rao_bound",
    "evaluate_model",
    "evaluation_scenes",
    "field_names",
    "generate_scenes",
    "iterate_batches",
    "load_checkpoint",
    "load_model",
    "load_split",
    "localization_metrics",
    "make_optimizer",
    "matching_pursuit",
    "mdl_estimate",
    "music_grid",
    "music_localize",
    "preset",
    "reference_metrics",
    "replace",
    "resolve_device",
    "scale_report",
    "sparse_bayesian_learning",
    "train",
    "validate",
]
