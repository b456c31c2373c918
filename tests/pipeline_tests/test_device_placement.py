"""Every tensor the training step and validation make names its device.

On CUDA a tensor made without a device lands on the CPU, and the first operation that meets a
CUDA tensor fails, or copies to the host in the middle of the step. No GPU runs in CI, so this
test makes such a tensor fail on the CPU instead: the model, data and optimizer live on the CPU
while the default device is `meta`, so a tensor that names no device is a meta tensor, and the
first operation mixing it with real ones raises, naming the line.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline import _covariance as cov
from pipeline import _evaluate, _matching, preset
from pipeline._data import load_split
from pipeline._evaluate import localization_metrics, mdl_estimate, music_localize
from pipeline._model import build_model
from pipeline._physics import Deployment
from pipeline._train import _grad_scaler, _train_epoch, make_optimizer, validate


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"cov_head": "free"},
        {"coherent_symbols": True},
    ],
    ids=["default", "free-factor-head", "coherent-symbols"],
)
def test_the_step_and_validation_make_no_tensor_on_the_default_device(changes):
    # Cached device tensors (grids, assignment tables, the quadratic fit) are made afresh, so
    # their construction is checked too, whatever ran before in this process.
    _evaluate._GRID_CACHE.clear()
    _evaluate._quadratic_design.cache_clear()
    _matching._assignments.cache_clear()
    config = dataclasses.replace(preset("smoke"), **changes)
    device = torch.device("cpu")
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    optimizer, scheduler = make_optimizer(model, config)
    scaler = _grad_scaler(config, device)
    val = load_split(config, deployment, "val", 64)
    with torch.device("meta"):
        terms = _train_epoch(model, optimizer, scheduler, scaler, config, deployment, device, 1)
        metrics = validate(model, val, config, deployment)
        again = load_split(config, deployment, "val", 64)
    assert all(math.isfinite(v) for v in terms.values())
    assert math.isfinite(metrics["composite"])
    assert torch.equal(again.fields, val.fields)  # the scenes do not depend on the default device


def test_the_check_catches_a_tensor_made_without_a_device():
    # The same set-up fails for code that forgets the device, as the pipeline once did.
    real = torch.ones(3)
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        _ = (real + torch.arange(3)).sum().item()


def test_localizing_a_scene_makes_no_tensor_on_the_default_device():
    # What bench/localize.py and `hpo evaluate` run: the covariances, MDL's count, MUSIC with
    # refinement, and the metrics.
    _evaluate._GRID_CACHE.clear()
    _evaluate._quadratic_design.cache_clear()
    _matching._assignments.cache_clear()
    config = preset("smoke")
    deployment = Deployment.build(config, torch.device("cpu"))
    scenes = load_split(config, deployment, "test", 16)
    with torch.device("meta"):
        r_samp = cov.sample_covariance(scenes.fields)
        r_true = cov.true_covariance(scenes.steering, scenes.power)
        k_hat = mdl_estimate(r_samp, config.n_snapshots, max_sources=config.max_sources)
        for matrix, count in ((r_samp, k_hat), (r_true, scenes.n_sources)):
            located = music_localize(matrix, count, deployment, config)
            metrics = localization_metrics(located, scenes, count, config=config)
            assert math.isfinite(metrics["composite"])
    assert k_hat.device.type == "cpu"
