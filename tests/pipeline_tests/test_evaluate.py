"""Evaluation (SYSTEM.md §5): MUSIC on the true covariance, refinement, metrics, MDL."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline._config import ExperimentConfig, replace
from pipeline._counting import mdl_estimate
from pipeline._covariance import true_covariance
from pipeline._data import SceneBatch, generate_scenes
from pipeline._grid import music_grid
from pipeline._metrics import Localization, localization_metrics
from pipeline._music import evaluate_covariances, music_localize, music_spectrum
from pipeline._physics import Deployment

CONFIG = ExperimentConfig(range_max_m=4.0)  # full N = 144 array, K uniform on 1..5


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return Deployment.build(CONFIG)


@pytest.fixture(scope="module")
def scenes(deployment: Deployment) -> SceneBatch:
    return generate_scenes(CONFIG, deployment, 150, seed=2)


@pytest.fixture(scope="module")
def oracle(scenes: SceneBatch, deployment: Deployment) -> Localization:
    r_true = true_covariance(scenes.steering, scenes.power)
    return music_localize(r_true, scenes.n_sources, deployment, CONFIG)


def test_music_on_true_covariance_recovers_the_sources(scenes: SceneBatch,
                                                       oracle: Localization) -> None:
    metrics = localization_metrics(oracle, scenes, scenes.n_sources, config=CONFIG)
    assert metrics["k_accuracy"] == 1.0
    assert metrics["success_rate"] >= 0.95, metrics
    # Noise-free MUSIC converges onto the sources: typical errors are far inside the box.
    assert metrics["median_azimuth_deg"] < 0.1
    assert metrics["median_elevation_deg"] < 0.1
    assert metrics["median_range_m"] < 0.02


def test_music_fills_the_first_k_hat_slots(scenes: SceneBatch, oracle: Localization) -> None:
    expected = torch.arange(CONFIG.max_sources)[None, :] < scenes.n_sources[:, None]
    assert torch.equal(oracle.mask, expected)
    for tensor in (oracle.azimuth_rad, oracle.elevation_rad, oracle.range_m):
        assert tensor.dtype == torch.float32 and tensor.shape == expected.shape
        assert (tensor[~oracle.mask] == 0).all()
    assert (oracle.range_m[oracle.mask] >= CONFIG.range_min_m - 1e-4).all()
    assert (oracle.range_m[oracle.mask] <= CONFIG.range_max_m + 1e-4).all()


def test_chunking_does_not_change_the_result(scenes: SceneBatch, deployment: Deployment,
                                             oracle: Localization) -> None:
    part = scenes.select(slice(0, 12))
    r_true = true_covariance(part.steering, part.power)
    small = music_localize(r_true, part.n_sources, deployment, CONFIG, chunk_size=5)
    assert torch.equal(small.mask.sum(1), oracle.mask[:12].sum(1))

    # On noise-free R_true every refined peak scores ~1, so the order of the slots is a tie that
    # rounding settles differently per chunk: compare the estimates of each scene as a set.
    def by_azimuth(params: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        key = torch.where(mask, params[..., 0], float("inf"))
        return params.gather(1, key.argsort(1)[..., None].expand(-1, -1, 3))

    torch.testing.assert_close(by_azimuth(small.params(), small.mask),
                               by_azimuth(oracle.params()[:12], oracle.mask[:12]),
                               atol=1e-4, rtol=1e-4)


def test_fewer_estimates_than_sources(scenes: SceneBatch, deployment: Deployment) -> None:
    part = scenes.select(slice(0, 20))
    r_true = true_covariance(part.steering, part.power)
    k_hat = torch.ones_like(part.n_sources)
    k_hat[0] = 0
    found = music_localize(r_true, k_hat, deployment, CONFIG)
    assert torch.equal(found.n_sources, k_hat)
    metrics = localization_metrics(found, part, k_hat, config=CONFIG)
    assert metrics["n_pairs"] == 19
    assert metrics["k_accuracy"] == pytest.approx((part.n_sources == k_hat).float().mean().item())
    # The one estimate of a scene is one of its sources, so the matched errors stay small.
    assert metrics["median_azimuth_deg"] < 0.1


def _one_source(deployment: Deployment, azimuth_deg: float, elevation_deg: float,
                range_m: float) -> torch.Tensor:
    azimuth = torch.tensor([[math.radians(azimuth_deg)]])
    elevation = torch.tensor([[math.radians(elevation_deg)]])
    steering = deployment.steering(azimuth, elevation, torch.tensor([[range_m]]))
    return true_covariance(steering, torch.ones(1, 1))


def test_refinement_lands_between_grid_points(deployment: Deployment) -> None:
    # Grid: azimuth and elevation every 2 deg, inverse range every 0.219 / m; this is off all.
    azimuth_deg, elevation_deg, range_m = 10.7, -7.3, 1.37
    covariance = _one_source(deployment, azimuth_deg, elevation_deg, range_m)

    def errors(refine_steps: int) -> tuple[float, float, float]:
        config = replace(CONFIG, music_refine_steps=refine_steps)
        found = music_localize(covariance, torch.tensor([1]), deployment, config)
        return (abs(math.degrees(found.azimuth_rad[0, 0].item()) - azimuth_deg),
                abs(math.degrees(found.elevation_rad[0, 0].item()) - elevation_deg),
                abs(found.range_m[0, 0].item() - range_m))

    spectrum = music_spectrum(covariance, torch.tensor([1]), deployment, CONFIG)
    grid = music_grid(CONFIG, deployment)
    assert spectrum.shape == (1, *grid.shape)
    peak = spectrum[0].argmax().item()
    n_az, n_el = grid.shape[2], grid.shape[1]
    assert math.degrees(grid.azimuth_rad[peak % n_az].item()) == pytest.approx(10.0, abs=1e-4)
    assert math.degrees(grid.elevation_rad[(peak // n_az) % n_el].item()) == pytest.approx(
        -8.0, abs=1e-4)

    coarse = errors(0)
    refined = errors(CONFIG.music_refine_steps)
    assert coarse[0] > 0.5 and coarse[1] > 0.5  # the coarse grid alone is 0.7 deg off
    assert refined[0] < 0.05 and refined[1] < 0.05 and refined[2] < 0.01


def test_truth_against_itself_is_perfect(scenes: SceneBatch) -> None:
    truth = Localization.from_batch(scenes)
    metrics = localization_metrics(truth, scenes, config=CONFIG)
    assert metrics["k_accuracy"] == 1.0
    assert metrics["success_rate"] == 1.0
    for name in ("rmse_azimuth_deg", "rmse_elevation_deg", "rmse_range_m"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-9)
    assert metrics["composite"] == pytest.approx(-1.0, abs=1e-9)
    assert metrics["n_pairs"] == scenes.n_sources.sum().item()


def test_metrics_ignore_the_order_of_estimate_slots(scenes: SceneBatch) -> None:
    truth = Localization.from_batch(scenes)
    generator = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(CONFIG.max_sources, generator=generator)
                         for _ in range(scenes.size)])
    shuffled = Localization(**{f.name: getattr(truth, f.name).gather(1, order)
                               for f in dataclasses.fields(Localization)})
    metrics = localization_metrics(shuffled, truth, scenes.n_sources, config=CONFIG)
    assert metrics["success_rate"] == 1.0
    assert metrics["composite"] == pytest.approx(-1.0, abs=1e-9)


def test_wrong_count_and_errors_are_scored(scenes: SceneBatch) -> None:
    truth = Localization.from_batch(scenes)
    moved = dataclasses.replace(truth, azimuth_rad=truth.azimuth_rad + math.radians(2.0))
    metrics = localization_metrics(moved, scenes, config=CONFIG)
    assert metrics["rmse_azimuth_deg"] == pytest.approx(2.0, abs=1e-4)
    assert metrics["success_rate"] == 1.0  # 2 deg is inside the 3 deg box
    k_hat = (scenes.n_sources % CONFIG.max_sources) + 1  # never equal to K
    miscounted = localization_metrics(truth, scenes, k_hat, config=CONFIG)
    assert miscounted["k_accuracy"] == 0.0 and miscounted["success_rate"] == 0.0


def test_no_matched_pairs_gives_a_finite_penalty(scenes: SceneBatch) -> None:
    truth = Localization.from_batch(scenes)
    empty = dataclasses.replace(truth, mask=torch.zeros_like(truth.mask))
    metrics = localization_metrics(empty, scenes, scenes.n_sources, config=CONFIG)
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["rmse_azimuth_deg"] == 2 * CONFIG.azimuth_max_deg
    assert metrics["rmse_range_m"] == CONFIG.range_max_m - CONFIG.range_min_m
    assert metrics["success_rate"] == 0.0


def test_evaluate_covariances_matches_the_direct_path(scenes: SceneBatch,
                                                      deployment: Deployment) -> None:
    part = scenes.select(slice(0, 24))
    r_true = true_covariance(part.steering, part.power)
    loaded = replace(CONFIG, diag_loading=0.1)
    metrics = evaluate_covariances(r_true, part.n_sources, part, deployment, loaded)
    direct = localization_metrics(
        music_localize(r_true, part.n_sources, deployment, CONFIG), part, part.n_sources,
        config=CONFIG)
    assert metrics.keys() == direct.keys()
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["success_rate"] == direct["success_rate"]
    assert metrics["k_accuracy"] == 1.0


def test_mdl_counts_sources_at_high_snr(deployment: Deployment) -> None:
    # R_true has trace N (mean eigenvalue 1); white noise of power 1e-3 is 30 dB below that.
    batch = generate_scenes(CONFIG, deployment, 60, seed=5)
    batch = batch.select(batch.n_sources <= 3)
    covariance = true_covariance(batch.steering, batch.power)
    noise = 1e-3 * torch.eye(covariance.shape[-1], dtype=covariance.dtype)
    estimate = mdl_estimate(covariance + noise, CONFIG.n_snapshots,
                            max_sources=CONFIG.max_sources)
    assert estimate.dtype == torch.int64
    assert torch.equal(estimate, batch.n_sources)


def test_mdl_is_clipped_to_the_source_range() -> None:
    noise_only = torch.eye(16, dtype=torch.complex64).expand(3, 16, 16)
    assert torch.equal(mdl_estimate(noise_only, 16, max_sources=5), torch.ones(3, dtype=torch.long))
