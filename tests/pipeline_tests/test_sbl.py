"""Coded sparse Bayesian learning (pipeline._sbl), the strongest classical reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline._config import ExperimentConfig
from pipeline._data import SceneBatch, generate_scenes
from pipeline._metrics import Localization, localization_metrics, matched_errors
from pipeline._physics import Deployment
from pipeline._pursuit import coded_dictionary, matching_pursuit
from pipeline._sbl import SblSettings, _outer_basis, sbl_grid_config, sparse_bayesian_learning

# The `quick` system (8 x 8 RIS, M = L = 8, K <= 3): a third of the real array's cost, the same
# code paths.
CONFIG = ExperimentConfig(n_ris_rows=8, n_ris_cols=8, n_bs_antennas=8, n_snapshots=8,
                          max_sources=3, range_max_m=4.0)
# Well separated sources, none on the SBL grid (3 deg, 6 points in 1/r): (az deg, el deg, r m).
SOURCES = ((-31.3, 10.6, 1.13), (22.7, -14.2, 1.71), (46.1, 21.3, 0.83))


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return Deployment.build(CONFIG)


def _select(found: Localization, index) -> Localization:
    return Localization(found.azimuth_rad[index], found.elevation_rad[index],
                        found.range_m[index], found.mask[index], found.score[index])


def _noise_free(deployment: Deployment, n_sources: list[int], seed: int = 0
                ) -> tuple[torch.Tensor, Localization]:
    """Noise-free measurements of scenes holding the first n of SOURCES, and their truth."""
    generator = torch.Generator().manual_seed(seed)
    k_max, n_snap = CONFIG.max_sources, CONFIG.n_snapshots
    mask = torch.arange(k_max)[None, :] < torch.tensor(n_sources)[:, None]
    table = torch.tensor(SOURCES, dtype=torch.float32)
    azimuth = torch.deg2rad(table[:, 0]).expand(len(n_sources), -1) * mask
    elevation = torch.deg2rad(table[:, 1]).expand(len(n_sources), -1) * mask
    range_m = table[:, 2].expand(len(n_sources), -1) * mask
    steering = deployment.steering(azimuth, elevation, range_m.clamp_min(0.5))  # (B, K, N)
    parts = torch.randn(len(n_sources), k_max, n_snap, 2, generator=generator)
    symbols = torch.view_as_complex(parts) * mask[..., None]
    field = torch.einsum("bkn,bkl->bln", steering, symbols)
    measurements = torch.einsum("lmn,bln->blm", deployment.operator, field)
    truth = Localization(azimuth, elevation, range_m, mask, mask.float())
    return measurements, truth


def test_noise_free_sources_are_recovered_exactly(deployment: Deployment) -> None:
    """1, 2 and 3 well separated off-grid sources, noise-free, true K: found far inside the
    grid step (3 deg), as exact as float32 allows."""
    counts = [1, 2, 3, 3]
    measurements, truth = _noise_free(deployment, counts)
    found = sparse_bayesian_learning(measurements, deployment, CONFIG,
                                     n_sources=torch.tensor(counts))
    assert found.n_sources.tolist() == counts
    errors = matched_errors(found, truth)
    assert len(errors["azimuth_deg"]) == sum(counts)
    assert np.max(errors["azimuth_deg"]) < 0.05, errors["azimuth_deg"]
    assert np.max(errors["elevation_deg"]) < 0.05, errors["elevation_deg"]
    assert np.max(errors["range_m"]) < 0.01, errors["range_m"]


def test_noise_free_count_is_right(deployment: Deployment) -> None:
    """Its own count (no K given) on noise-free scenes of 1, 2 and 3 sources."""
    counts = [1, 2, 3, 1, 2, 3]
    measurements, truth = _noise_free(deployment, counts, seed=1)
    found = sparse_bayesian_learning(measurements, deployment, CONFIG)
    assert found.n_sources.tolist() == counts
    metrics = localization_metrics(found, truth, found.n_sources, config=CONFIG)
    assert metrics["success_rate"] == 1.0, metrics


@pytest.fixture(scope="module")
def high_snr(deployment: Deployment) -> SceneBatch:
    config = ExperimentConfig(**{**CONFIG.__dict__, "snr_db_min": 25.0, "snr_db_max": 25.0})
    return generate_scenes(config, deployment, 48, seed=3)


def test_agrees_with_matching_pursuit_on_single_sources(high_snr: SceneBatch,
                                                        deployment: Deployment) -> None:
    single = (high_snr.n_sources == 1).nonzero().squeeze(-1)
    assert single.numel() >= 8
    part = high_snr.select(single)
    ones = torch.ones(part.size, dtype=torch.long)
    sbl = sparse_bayesian_learning(part.measurements, deployment, CONFIG, n_sources=ones)
    pursuit = matching_pursuit(part.measurements, ones, deployment, CONFIG)
    difference = (sbl.params() - pursuit.params())[:, 0].abs()
    assert float(difference[:, 0].max()) < math.radians(0.3)
    assert float(difference[:, 1].max()) < math.radians(0.3)
    assert float(difference[:, 2].max()) < 0.1
    # And both are right.
    assert localization_metrics(sbl, part, config=CONFIG)["success_rate"] == 1.0


def test_outputs_are_shaped_and_typed_as_documented(high_snr: SceneBatch,
                                                    deployment: Deployment) -> None:
    part = high_snr.select(slice(0, 6))
    for given in (None, part.n_sources):
        found = sparse_bayesian_learning(part.measurements, deployment, CONFIG, n_sources=given)
        for name in ("azimuth_rad", "elevation_rad", "range_m", "score"):
            tensor = getattr(found, name)
            assert tensor.shape == (6, CONFIG.max_sources) and tensor.dtype == torch.float32
            assert (tensor[~found.mask] == 0).all()
        assert found.mask.dtype == torch.bool
        slots = torch.arange(CONFIG.max_sources)[None, :]
        assert torch.equal(found.mask, slots < found.n_sources[:, None])  # first slots valid
        assert (found.n_sources >= 1).all()
        if given is not None:
            assert torch.equal(found.n_sources, given)
        assert (found.score[:, :-1] >= found.score[:, 1:]).all()  # strongest first
        assert (found.score[found.mask] > 0).all() and (found.score <= 1.0 + 1e-4).all()
        assert (found.range_m[found.mask] >= CONFIG.range_min_m - 1e-4).all()
        assert (found.range_m[found.mask] <= CONFIG.range_max_m + 1e-4).all()
        assert (found.azimuth_rad.abs() <= math.radians(CONFIG.azimuth_max_deg) + 1e-6).all()


def test_a_batch_equals_its_scenes_one_at_a_time(high_snr: SceneBatch,
                                                 deployment: Deployment) -> None:
    part = high_snr.select(slice(0, 5))
    together = sparse_bayesian_learning(part.measurements, deployment, CONFIG)
    alone = [sparse_bayesian_learning(part.measurements[i:i + 1], deployment, CONFIG)
             for i in range(part.size)]
    assert torch.equal(together.mask, torch.cat([a.mask for a in alone]))
    # Batched GEMMs round differently from single ones, and the likelihood is flat in range, so
    # the pattern search may stop a little elsewhere: float32 noise far below the grid step
    # (3 deg) and the success box (3 deg, 0.5 m).
    one_by_one = torch.cat([a.params() for a in alone])
    difference = (together.params() - one_by_one).abs()
    assert float(difference[..., :2].max()) < math.radians(0.1)
    assert float(difference[..., 2].max()) < 0.03
    chunked = sparse_bayesian_learning(part.measurements, deployment, CONFIG, chunk_size=2)
    assert torch.equal(together.mask, chunked.mask)


def test_a_threshold_stops_the_drop_path_where_the_count_stops(deployment: Deployment) -> None:
    """python -m bench sbl_tune scores every count threshold from one drop path; that must be what
    the count itself returns for each threshold."""
    from pipeline._grid import music_grid
    from pipeline._sbl import _candidates, _count, _stop_path

    scenes = generate_scenes(CONFIG, deployment, 8, seed=9)  # SNR -5..20 dB, K 1..3
    y = scenes.measurements
    settings = SblSettings()
    grid_config = sbl_grid_config(CONFIG, settings)
    grid = music_grid(grid_config, deployment)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    state = _candidates(y, None, deployment, grid, atoms_conj, CONFIG.max_sources, settings)
    path: list = []
    _count(state, y, deployment, grid, settings, path=path)
    assert [int(s.active.sum(-1).max()) for s, _, _ in path] == [3, 2, 1]
    counts = set()
    for threshold, slope in ((1.0, 0.0), (10.0, 0.0), (10.0, 3.0), (60.0, 0.0)):
        rule = SblSettings(count_threshold=threshold, count_slope=slope)
        direct = _count(state, y, deployment, grid, rule)
        stopped = _stop_path(path, rule)
        assert torch.equal(direct.active, stopped.active), (threshold, slope)
        torch.testing.assert_close(direct.points, stopped.points)
        counts.add(tuple(direct.active.sum(-1).tolist()))
    assert len(counts) > 1  # the thresholds differ in their counts


def test_outer_basis_rebuilds_the_model_covariance(deployment: Deployment) -> None:
    """The real basis gives sum_g gamma_g d_g d_g^H and sum_mn conj(d_m) S_mn d_n exactly."""
    from pipeline._sbl import _basis_weights, _hermitian_from_basis

    atoms_conj, _ = coded_dictionary(sbl_grid_config(CONFIG, SblSettings()), deployment)
    atoms = atoms_conj.conj().resolve_conj().to(torch.complex128)
    basis = _outer_basis(atoms_conj).to(torch.float64)
    n_snap, n_meas, n_grid = atoms.shape
    gamma = torch.rand(2, n_grid, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = _hermitian_from_basis((gamma @ basis.T).float(), n_snap, n_meas,
                                  torch.full((2,), 0.5))
    expected = torch.einsum("lmg,bg,lng->blmn", atoms, gamma.to(atoms.dtype), atoms.conj())
    expected = expected + 0.5 * torch.eye(n_meas)
    torch.testing.assert_close(sigma.to(torch.complex128), expected, rtol=1e-4, atol=1e-2)
    weights = torch.linalg.inv(expected)
    quadratic = torch.einsum("lmg,blmn,lng->bg", atoms.conj(), weights, atoms).real
    torch.testing.assert_close(_basis_weights(weights) @ basis, quadratic)


def test_bad_input_is_rejected(deployment: Deployment) -> None:
    with pytest.raises(ValueError, match="measurements must be"):
        sparse_bayesian_learning(torch.zeros(3, 4, dtype=torch.complex64), deployment, CONFIG)
    with pytest.raises(ValueError, match="chunk_size"):
        sparse_bayesian_learning(torch.zeros(1, 8, 8, dtype=torch.complex64), deployment,
                                 CONFIG, chunk_size=0)
    with pytest.raises(ValueError, match="prune_after"):
        SblSettings(prune_after=30, n_iterations=10)
    with pytest.raises(ValueError, match="n_kept"):
        SblSettings(n_kept=0)
    with pytest.raises(ValueError, match="grid_sweeps"):
        SblSettings(grid_sweeps=-1)


def _whole_grid(deployment: Deployment):
    from pipeline._grid import music_grid

    grid_config = sbl_grid_config(CONFIG, SblSettings())
    grid = music_grid(grid_config, deployment)
    atoms_conj, norms = coded_dictionary(grid_config, deployment)
    dictionary = atoms_conj.conj().resolve_conj()
    points = grid.point_at(torch.arange(dictionary.shape[-1]))
    return grid, atoms_conj, dictionary, points, norms


def test_grid_jump_moves_as_the_exact_solve_over_the_whole_grid(deployment: Deployment) -> None:
    """`_grid_jump` (r + 1 inner products per candidate after a thin SVD of the other sources)
    takes the jumps of `_jump` given every grid point as a candidate (an M x M solve per
    candidate), on SBL's refined answers with the true K, and a source that jumps gets the
    solve's power. A near-tie between two grid points may go either way in float32 on another
    host, so one scene of 48 may differ."""
    from pipeline._sbl import _candidates, _grid_jump, _jump

    scenes = generate_scenes(CONFIG, deployment, 48, seed=21)  # SNR -5..20 dB, K 1..3
    y = scenes.measurements
    grid, atoms_conj, dictionary, points, norms = _whole_grid(deployment)
    settings = SblSettings(grid_sweeps=0)
    state = _candidates(y, scenes.n_sources, deployment, grid, atoms_conj, CONFIG.max_sources,
                        settings)
    exact, exact_power = _jump(state.points.clone(), state.power.clone(), state.active,
                               state.noise, y, deployment, points.expand(y.shape[0], -1, -1),
                               dictionary.permute(2, 0, 1)[None])
    fast, fast_power = _grid_jump(state.points.clone(), state.power.clone(), state.active,
                                  state.noise, y, deployment, dictionary, points, norms)
    moved = (exact != state.points).any(-1) & state.active
    assert moved.sum() >= 2  # the comparison is not vacuous
    differs = (fast != exact).any(-1).any(-1)
    assert int(differs.sum()) <= 1, differs.nonzero()
    # The first source of each scene sees the same others in both; later ones see the first's
    # power, which `_jump` re-estimates even where it stays.
    first = moved[:, 0] & ~differs
    assert first.any()
    torch.testing.assert_close(fast_power[first, 0], exact_power[first, 0], rtol=1e-3, atol=0.0)


def test_grid_jump_finds_a_source_far_from_its_start(deployment: Deployment) -> None:
    """Noise-free, two sources: the second starts 40+ deg away from its truth, where no local
    refinement could bring it back; one whole-grid jump puts it within a grid step, and the
    sweep's refinement then on the truth."""
    from pipeline._sbl import _grid_jump, _grid_sweep

    measurements, truth = _noise_free(deployment, [2])
    y = measurements.to(torch.complex64)
    grid, atoms_conj, dictionary, points, norms = _whole_grid(deployment)
    start = torch.stack([truth.azimuth_rad, truth.elevation_rad,
                         1.0 / truth.range_m.clamp_min(0.5)], -1)
    start[0, 1] = torch.tensor([math.radians(-40.0), math.radians(25.0), 1.0 / 3.0])
    active = truth.mask
    power = torch.tensor([[2.0, 2.0, 0.0]])
    noise = 1e-4 * y.abs().square().mean(dim=(1, 2))
    jumped, _ = _grid_jump(start.clone(), power.clone(), active, noise, y, deployment,
                           dictionary, points, norms)
    angles = torch.stack([truth.azimuth_rad, truth.elevation_rad], -1)[0, :2]
    step = math.radians(SblSettings().grid_step_deg)
    # Both within a grid step (the first, off-grid, may snap to its nearest grid point).
    assert float((jumped[0, :2, :2] - angles).abs().max()) <= step
    refined, _, _ = _grid_sweep(start, power, active, noise, y, deployment, grid, dictionary,
                                atoms_conj, SblSettings().refine_rounds)
    assert float((refined[0, :2, :2] - angles).abs().max()) < math.radians(0.05)
    ranges = 1.0 / refined[0, :2, 2]
    assert float((ranges - truth.range_m[0, :2]).abs().max()) < 0.01


def test_grid_sweep_leaves_scenes_without_a_jump_as_they_were(deployment: Deployment) -> None:
    """SBL with one whole-grid sweep against none: the scenes where no source jumped come back
    bit for bit; the others differ."""
    scenes = generate_scenes(CONFIG, deployment, 48, seed=21)
    found = {sweeps: sparse_bayesian_learning(scenes.measurements, deployment, CONFIG,
                                              n_sources=scenes.n_sources,
                                              settings=SblSettings(grid_sweeps=sweeps))
             for sweeps in (0, 1)}
    changed = (found[0].params() != found[1].params()).flatten(1).any(-1)
    assert 1 <= int(changed.sum()) < scenes.size // 2
    same = (~changed).nonzero().squeeze(-1)
    assert torch.equal(found[0].score[same], found[1].score[same])
