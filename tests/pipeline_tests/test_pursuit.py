"""Matching pursuit in the measurement domain (pipeline._pursuit), a classical reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline._config import ExperimentConfig, replace
from pipeline._data import SceneBatch, generate_scenes
from pipeline._grid import music_grid
from pipeline._metrics import localization_metrics, matched_errors
from pipeline._physics import Deployment
from pipeline._pursuit import _greedy, coded_dictionary, matching_pursuit

# The `quick` system (8 x 8 RIS, M = L = 8, K <= 3; its default 2 deg / 1/r MUSIC grid) at an
# SNR where noise is negligible: a third of the real array's cost, the same code paths.
CONFIG = ExperimentConfig(n_ris_rows=8, n_ris_cols=8, n_bs_antennas=8, n_snapshots=8,
                          max_sources=3, range_max_m=4.0, snr_db_min=60.0, snr_db_max=60.0)
SMOKE = ExperimentConfig(n_ris_rows=6, n_ris_cols=6, n_bs_antennas=8, n_snapshots=8,
                         max_sources=3, range_max_m=4.0, music_grid_azimuth=13,
                         music_grid_elevation=7, music_grid_range=4)


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return Deployment.build(CONFIG)


@pytest.fixture(scope="module")
def scenes(deployment: Deployment) -> SceneBatch:
    return generate_scenes(CONFIG, deployment, 40, seed=5)


@pytest.fixture(scope="module")
def found(scenes: SceneBatch, deployment: Deployment):
    return matching_pursuit(scenes.measurements, scenes.n_sources, deployment, CONFIG)


def test_first_pick_is_the_best_atom_of_the_dictionary() -> None:
    """The batched GEMM search agrees with a plain loop over grid points and snapshots."""
    deployment = Deployment.build(SMOKE)
    batch = generate_scenes(SMOKE, deployment, 4, seed=1)
    grid = music_grid(SMOKE, deployment)
    atoms_conj, norms = coded_dictionary(SMOKE, deployment)
    picked, active = _greedy(batch.measurements, torch.ones(4, dtype=torch.long), deployment,
                             grid, atoms_conj, norms, SMOKE.max_sources)
    assert active[:, 0].all() and not active[:, 1:].any()
    operator = deployment.operator.numpy().astype(np.complex128)
    steering = grid.steering_conj.conj().resolve_conj().numpy().astype(np.complex128)
    for scene in range(4):
        y = batch.measurements[scene].numpy().astype(np.complex128)  # (L, M)
        scores = np.zeros(steering.shape[0])
        for point in range(steering.shape[0]):
            for snapshot in range(SMOKE.n_snapshots):
                atom = operator[snapshot] @ steering[point]
                scores[point] += abs(np.vdot(atom, y[snapshot])) ** 2 / np.vdot(atom, atom).real
        best = int(scores.argmax())
        n_az, n_el = grid.azimuth_rad.numel(), grid.elevation_rad.numel()
        expected = [grid.azimuth_rad[best % n_az], grid.elevation_rad[(best // n_az) % n_el],
                    grid.inverse_range[best // (n_az * n_el)]]
        torch.testing.assert_close(picked[scene, 0], torch.stack(expected))


def test_slots_counts_and_order(scenes: SceneBatch, found) -> None:
    expected = torch.arange(CONFIG.max_sources)[None, :] < scenes.n_sources[:, None]
    assert torch.equal(found.mask, expected)
    for tensor in (found.azimuth_rad, found.elevation_rad, found.range_m, found.score):
        assert (tensor[~found.mask] == 0).all()
    assert (found.score[:, :-1] >= found.score[:, 1:]).all()  # strongest source first
    assert (found.range_m[found.mask] >= CONFIG.range_min_m - 1e-4).all()
    assert (found.range_m[found.mask] <= CONFIG.range_max_m + 1e-4).all()


def test_single_sources_are_found_off_grid(scenes: SceneBatch, found) -> None:
    """Noise-free single sources lie between grid points (2 deg apart); the refinement lands on
    them far closer than the grid step."""
    single = (scenes.n_sources == 1).nonzero().squeeze(-1)
    assert single.numel() >= 3
    truth = scenes.select(single)
    errors = matched_errors(found.__class__(*(t[single] for t in (
        found.azimuth_rad, found.elevation_rad, found.range_m, found.mask, found.score))), truth)
    assert np.max(errors["azimuth_deg"]) < 0.2
    assert np.max(errors["elevation_deg"]) < 0.2
    assert np.max(errors["range_m"]) < 0.05


def test_few_sources_are_found_at_high_snr(scenes: SceneBatch, found) -> None:
    """Noise-free scenes of one or two sources. Greedy pursuit can still take a sidelobe of two
    overlapping coded atoms for a source (on the real array 13 of 15 such scenes succeeded), so
    the bar is 80 %; MUSIC on R_true succeeds on all of them."""
    few = (scenes.n_sources <= 2).nonzero().squeeze(-1)
    part = found.__class__(*(t[few] for t in (found.azimuth_rad, found.elevation_rad,
                                               found.range_m, found.mask, found.score)))
    metrics = localization_metrics(part, scenes.select(few), config=CONFIG)
    assert metrics["success_rate"] >= 0.8, metrics


def test_deterministic_and_nearly_invariant_to_scale_and_chunking(
        scenes: SceneBatch, deployment: Deployment) -> None:
    part = scenes.select(slice(0, 8))
    first = matching_pursuit(part.measurements, part.n_sources, deployment, CONFIG)
    again = matching_pursuit(part.measurements, part.n_sources, deployment, CONFIG)
    for name in ("azimuth_rad", "elevation_rad", "range_m", "mask", "score"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name
    # Another scale or chunking changes float32 rounding only. Where two candidate atoms are
    # nearly tied (crowded scenes) that can tip a pick, so the check is on counts and typical
    # positions, not every digit.
    for variant in (matching_pursuit(part.measurements * 1e3, part.n_sources, deployment,
                                     CONFIG),
                    matching_pursuit(part.measurements, part.n_sources, deployment, CONFIG,
                                     chunk_size=3)):
        assert torch.equal(variant.mask, first.mask)
        difference = (variant.params() - first.params()).abs()[first.mask]
        assert float(difference.median()) < 1e-3
        assert (localization_metrics(variant, part, config=CONFIG)["success_rate"]
                == localization_metrics(first, part, config=CONFIG)["success_rate"])


def test_source_counts_are_clipped(scenes: SceneBatch, deployment: Deployment) -> None:
    part = scenes.select(slice(0, 3))
    k_hat = part.n_sources.clone()
    k_hat[0] = 0
    k_hat[1] = 99  # clipped to max_sources
    counted = matching_pursuit(part.measurements, k_hat, deployment, CONFIG)
    assert counted.n_sources.tolist() == [0, CONFIG.max_sources, int(part.n_sources[2])]


def test_bad_input_is_rejected(deployment: Deployment) -> None:
    with pytest.raises(ValueError, match="measurements must be"):
        matching_pursuit(torch.zeros(3, 4, dtype=torch.complex64), torch.ones(3), deployment,
                         CONFIG)
    with pytest.raises(ValueError, match="chunk_size"):
        matching_pursuit(torch.zeros(1, 16, 16, dtype=torch.complex64), torch.ones(1),
                         deployment, CONFIG, chunk_size=0)


def test_low_snr_is_harder(deployment: Deployment, scenes: SceneBatch, found) -> None:
    noisy_config = replace(CONFIG, snr_db_min=-5.0, snr_db_max=-5.0)
    noisy = generate_scenes(noisy_config, deployment, 40, seed=5).select(slice(0, 16))
    scenes = scenes.select(slice(0, 16))
    # Same sources (same seed and draws), far more noise: the errors must grow.
    assert torch.equal(noisy.azimuth_rad, scenes.azimuth_rad)
    result = matching_pursuit(noisy.measurements, noisy.n_sources, deployment, noisy_config)
    clean = localization_metrics(found.__class__(*(t[:16] for t in (
        found.azimuth_rad, found.elevation_rad, found.range_m, found.mask, found.score))),
        scenes, config=CONFIG)
    dirty = localization_metrics(result, noisy, config=noisy_config)
    assert dirty["median_azimuth_deg"] > clean["median_azimuth_deg"]
