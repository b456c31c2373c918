from __future__ import annotations

import pytest
import torch

from pipeline import PRESETS, ExperimentConfig
from pipeline._data import SceneBatch, generate_scenes
from pipeline._physics import Deployment


@pytest.fixture(scope="session")
def full_config() -> ExperimentConfig:
    return PRESETS["full"]


@pytest.fixture(scope="session")
def full_deployment(full_config: ExperimentConfig) -> Deployment:
    return Deployment.build(full_config, torch.device("cpu"))


@pytest.fixture(scope="session")
def full_batch(full_config: ExperimentConfig, full_deployment: Deployment) -> SceneBatch:
    return generate_scenes(full_config, full_deployment, 64, 7)


@pytest.fixture(scope="session")
def smoke_config() -> ExperimentConfig:
    return PRESETS["smoke"]
