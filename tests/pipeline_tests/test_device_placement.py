"""The CUDA path's habits, checked on the CPU: every tensor the training step and validation make
names its device, and a training epoch reads values back to the host only once, at its end.

On CUDA a tensor made without a device lands on the CPU, and the first operation that meets a
CUDA tensor fails, or copies to the host in the middle of the step. No GPU runs in CI, so this
test makes such a tensor fail on the CPU instead: the model, data and optimizer live on the CPU
while the default device is `meta`, so a tensor that names no device is a meta tensor, and the
first operation mixing it with real ones raises, naming the line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline import _covariance as cov
from pipeline import _grid, _matching, _refine, preset
from pipeline._counting import mdl_estimate
from pipeline._data import load_split
from pipeline._metrics import localization_metrics
from pipeline._model import build_model
from pipeline._music import music_localize
from pipeline._physics import Deployment
from pipeline._train import _grad_scaler, _train_epoch, make_optimizer, validate


def _clear_device_caches() -> None:
    """Cached device tensors (grids, assignment tables, the quadratic fit) are made afresh, so
    their construction is checked too, whatever ran before in this process."""
    _grid._GRID_CACHE.clear()
    _refine._quadratic_design.cache_clear()
    _matching._assignments.cache_clear()


def _cpu_training(config):
    """The deployment, the model and one training epoch of `config` on the CPU."""
    device = torch.device("cpu")
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    optimizer, scheduler = make_optimizer(model, config)
    scaler = _grad_scaler(config, device)

    def epoch() -> dict[str, float]:
        return _train_epoch(model, optimizer, scheduler, scaler, config, deployment, device, 1)

    return deployment, model, epoch


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
    _clear_device_caches()
    config = dataclasses.replace(preset("smoke"), **changes)
    deployment, model, epoch = _cpu_training(config)
    val = load_split(config, deployment, "val", 64)
    with torch.device("meta"):
        terms = epoch()
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
    # What python -m bench localize and `hpo evaluate` run: the covariances, MDL's count, MUSIC with
    # refinement, and the metrics.
    _clear_device_caches()
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


_T = torch.Tensor
# Calls that bring a tensor's values to the host: on CUDA each one waits for the GPU.
_HOST_READS = {_T.item, _T.tolist, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.cpu,
               _T.numpy, _T.nonzero, torch.nonzero, _T.masked_select, torch.masked_select,
               torch.unique, _T.unique, torch.argwhere, _T.repeat_interleave,
               torch.repeat_interleave}


class _CountHostReads(TorchFunctionMode):
    """Counts host reads made by pipeline code, leaving out those inside torch.optim (AdamW reads
    its step counters, which live on the CPU also when training runs on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = func in _HOST_READS or (func is torch.where and len(args) == 1)
        if func is _T.__getitem__ and len(args) > 1:  # boolean-mask indexing
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            read = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if read:
            stack = traceback.extract_stack()[:-1]
            if not any("torch/optim/" in frame.filename for frame in stack):
                where = [f for f in stack if f"{os.sep}pipeline{os.sep}" in f.filename]
                if where:
                    self.sites.append(f"{Path(where[-1].filename).name}:{where[-1].lineno}")
        return func(*args, **kwargs)


def test_a_training_epoch_reads_back_to_the_host_once_whatever_its_number_of_steps():
    # No host synchronisation inside the step: the loss means and the finiteness flags stay on
    # the device and are read after the last step. Epochs of 2 and of 6 steps make the same
    # reads.
    sites = {}
    for n_steps in (2, 6):
        config = dataclasses.replace(preset("smoke"), n_train=n_steps * 16, batch_size=16)
        _, _, epoch = _cpu_training(config)
        with _CountHostReads() as counter:
            epoch()
        sites[n_steps] = counter.sites
    assert sites[2] == sites[6], sites
    assert len(sites[6]) == 2, sites  # the flags, then the loss means, after the last step
