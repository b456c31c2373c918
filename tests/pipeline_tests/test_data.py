from __future__ import annotations

import dataclasses
import math

import torch

from pipeline import PRESETS
from pipeline._data import generate_scenes, iterate_batches, load_split, split_seeds
from pipeline._physics import Deployment


def _keys(batch) -> set[tuple]:
    """Scenes identified by their first source's parameters (continuous draws never collide)."""
    params = torch.stack([batch.azimuth_rad[:, 0], batch.elevation_rad[:, 0], batch.range_m[:, 0],
                          batch.snr_db], dim=-1)
    return {tuple(row) for row in params.tolist()}


def test_no_scene_appears_in_two_splits(smoke_config):
    config = dataclasses.replace(smoke_config, fresh_train=True)
    deployment = Deployment.build(config)
    train = set()
    for epoch in (1, 2, 3):
        for batch in iterate_batches(config, deployment, "train", 300, 64, epoch=epoch):
            train |= _keys(batch)
    val = _keys(load_split(config, deployment, "val", 300))
    test = _keys(load_split(config, deployment, "test", 300))
    assert len(train) == 900 and len(val) == 300 and len(test) == 300
    assert not (train & val) and not (train & test) and not (val & test)


def test_data_are_a_pure_function_of_config_and_seed(smoke_config):
    deployment = Deployment.build(smoke_config)
    first = load_split(smoke_config, deployment, "val", 100)
    second = load_split(smoke_config, deployment, "val", 100)
    assert torch.equal(first.measurements, second.measurements)
    # Chunking does not change the scenes: batch b is seeded by its own index.
    a = list(iterate_batches(smoke_config, deployment, "train", 96, 32, epoch=2))
    b = list(iterate_batches(smoke_config, deployment, "train", 96, 32, epoch=2))
    assert all(torch.equal(x.fields, y.fields) for x, y in zip(a, b))
    other = load_split(dataclasses.replace(smoke_config, seed=1), deployment, "val", 100)
    assert not torch.equal(first.measurements, other.measurements)


def test_fresh_training_scenes_each_epoch_unless_fixed(smoke_config):
    deployment = Deployment.build(smoke_config)
    fresh = [next(iterate_batches(smoke_config, deployment, "train", 32, 32, epoch=e))
             for e in (1, 2)]
    assert not _keys(fresh[0]) & _keys(fresh[1])
    fixed_config = dataclasses.replace(smoke_config, fresh_train=False)
    fixed = [next(iterate_batches(fixed_config, deployment, "train", 32, 32, epoch=e))
             for e in (1, 2)]
    assert _keys(fixed[0]) == _keys(fixed[1])


def test_scene_statistics_follow_the_config(full_config, full_deployment):
    batch = generate_scenes(full_config, full_deployment, 2000, 11)
    counts = torch.bincount(batch.n_sources, minlength=6)[1:].float()
    assert counts.min() > 300  # K uniform on 1..5
    assert torch.equal(batch.source_mask.sum(1), batch.n_sources)
    mask = batch.source_mask
    assert float(batch.azimuth_rad[mask].abs().max()) <= math.radians(60)
    assert float(batch.elevation_rad[mask].abs().max()) <= math.radians(30)
    assert 0.5 <= float(batch.range_m[mask].min()) and float(batch.range_m[mask].max()) <= 10
    power_db = 10 * torch.log10(batch.power[mask])
    assert 10 - 1e-3 <= float(power_db.min()) and float(power_db.max()) <= 20 + 1e-3
    assert float(batch.power[~mask].abs().max()) == 0.0
    assert -5 <= float(batch.snr_db.min()) and float(batch.snr_db.max()) <= 20
    # Each scene's measurements are scaled to unit RMS.
    rms = batch.measurements.abs().square().mean(dim=(1, 2)).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)
    # Sources in one scene are separated in angle.
    sep = math.radians(full_config.min_separation_deg)
    for scene in range(200):
        k = int(batch.n_sources[scene])
        for i in range(k):
            for j in range(i):
                close_az = abs(float(batch.azimuth_rad[scene, i] - batch.azimuth_rad[scene, j]))
                close_el = abs(float(batch.elevation_rad[scene, i]
                                     - batch.elevation_rad[scene, j]))
                assert close_az >= sep or close_el >= sep


def test_snr_label_is_the_simulated_snr(full_config, full_deployment):
    # Simulate twice with the same draws, once noise-free, to measure the realised SNR.
    config = dataclasses.replace(full_config, snr_db_min=200.0, snr_db_max=200.0)
    clean = generate_scenes(config, full_deployment, 200, 3)
    noisy = generate_scenes(dataclasses.replace(full_config, snr_db_min=10.0, snr_db_max=10.0),
                            full_deployment, 200, 3)
    # After unit-RMS scaling, noisy = (clean * s + n) with |n|^2 / |clean s|^2 = 10^-1 on average.
    scale = (noisy.measurements * clean.measurements.conj()).sum(dim=(1, 2)) / clean.measurements \
        .abs().square().sum(dim=(1, 2))
    noise = noisy.measurements - scale[:, None, None] * clean.measurements
    snr = 10 * torch.log10((scale.abs().square() * clean.measurements.abs().square().sum(dim=(1, 2)))
                           / noise.abs().square().sum(dim=(1, 2)))
    assert abs(float(snr.median()) - 10.0) < 0.5


def test_split_streams_are_disjoint_seed_sequences():
    seeds = split_seeds(0)
    states = [tuple(s.generate_state(4)) for s in seeds.values()]
    assert len(set(states)) == 3


def test_scenes_generate_on_the_deployment_device(smoke_config):
    deployment = Deployment.build(PRESETS["smoke"], torch.device("cpu"))
    batch = generate_scenes(smoke_config, deployment, 8, 0)
    assert batch.fields.device.type == "cpu" and batch.fields.dtype == torch.complex64
    assert batch.fields.shape == (8, 8, 36) and batch.measurements.shape == (8, 8, 8)
