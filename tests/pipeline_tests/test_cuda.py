"""The CUDA path: skipped on machines without a GPU (CI), run where one is lent."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline import preset, train
from pipeline._data import load_split
from pipeline._physics import Deployment

pytestmark = pytest.mark.gpu


def test_scenes_on_cuda_equal_scenes_on_cpu():
    config = preset("smoke")
    cpu = load_split(config, Deployment.build(config, "cpu"), "val", 64)
    cuda = load_split(config, Deployment.build(config, "cuda"), "val", 64)
    assert cuda.fields.device.type == "cuda"
    assert torch.allclose(cuda.fields.cpu(), cpu.fields, atol=1e-4)


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_training_on_cuda_with_autocast_is_finite_and_close_to_fp32(amp_dtype):
    config = dataclasses.replace(preset("smoke"), amp_dtype=amp_dtype)
    mixed = train(config, device=torch.device("cuda"))
    full = train(dataclasses.replace(config, amp=False), device=torch.device("cuda"))
    assert all(math.isfinite(m.train_loss) for m in mixed.history)
    assert mixed.history[0].train_loss == pytest.approx(full.history[0].train_loss, rel=0.05)
