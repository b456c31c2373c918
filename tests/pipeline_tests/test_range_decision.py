"""Each source's range chosen for the success box (pipeline._range_decision): the decision on
posteriors whose answer is known, its invariants on real scenes, and that it wins scenes."""

from __future__ import annotations

import pytest
import torch

from pipeline._config import preset, replace
from pipeline._data import load_split
from pipeline._grid import music_grid
from pipeline._metrics import localization_from_points, scene_success
from pipeline._physics import Deployment
from pipeline._pursuit import coded_dictionary
from pipeline._range_decision import (
    choose_in_window,
    range_line,
    ranges_for_success,
    window_mass,
)
from pipeline._sbl import SblSettings, _candidates, _localize_chunk, sbl_grid_config

MEDIUM = preset("medium")  # range 0.5-4 m


def _line() -> torch.Tensor:
    return range_line(MEDIUM, 400)


def _mass(log_posterior: torch.Tensor, line: torch.Tensor, centre_m: float) -> float:
    weight = torch.softmax(log_posterior.double(), -1)
    return float(weight[((1.0 / line.double()) - centre_m).abs() <= 0.5].sum())


def test_a_posterior_narrower_than_the_window_keeps_its_peak():
    line = _line()
    peak = line[150]
    log_posterior = -0.5 * ((line - peak) / 0.002) ** 2  # about 0.01 m wide at 2 m
    move, _ = choose_in_window(log_posterior[None], line, peak[None])
    assert not bool(move[0])


def test_a_posterior_symmetric_in_metres_keeps_its_peak_between_grid_points():
    """A posterior symmetric about its peak in metres, 0.2-0.5 m wide (as wide as the window):
    the peak's own window holds the most, wherever the peak falls between the line's points.
    Windows cut at whole points moved such peaks by a few cm in about half of the cases (the
    weight of one point at a window's edge is above the tie margin); spreading each point's
    weight over its cell makes the masses continuous."""
    line = range_line(MEDIUM, 200).double()
    for width in (0.2, 0.3, 0.5):
        for peak_m in torch.linspace(1.5, 3.4, 39, dtype=torch.float64):
            # density in 1/r = density in metres * r^2
            log_posterior = -0.5 * ((1.0 / line - peak_m) / width) ** 2 - 2.0 * torch.log(line)
            move, _ = choose_in_window(log_posterior[None], line, (1.0 / peak_m)[None])
            assert not bool(move[0]), (width, float(peak_m))


def test_window_mass_is_the_share_of_inverse_range_it_covers():
    """A posterior flat in 1/r: a window's mass is its width in 1/r over the line's, also for
    windows whose edges fall between points, and for one cut by the field of view."""
    line = range_line(MEDIUM, 200).double()
    weight = torch.full((1, 200), 1.0 / 200, dtype=torch.float64)
    centres_m = torch.tensor([2.5, 1.1, 3.37, 3.9], dtype=torch.float64)
    mass = window_mass(weight, line, (1.0 / centres_m)[None])[0]
    lower, upper = 1.0 / MEDIUM.range_max_m, 1.0 / MEDIUM.range_min_m
    near = (1.0 / (centres_m - 0.5)).clamp(max=upper)
    far = (1.0 / (centres_m + 0.5)).clamp(min=lower)
    span = upper - lower
    # the line's outer cells reach half a step beyond its ends
    torch.testing.assert_close(mass, (near - far) / span, atol=0.01, rtol=0.0)


def test_a_broad_block_outweighs_a_taller_spike():
    """30 % of the mass in a spike at 1 m, 70 % spread evenly over 2.6-3.4 m: the window that
    holds the block wins, although the spike is the peak."""
    line = _line()
    metres = 1.0 / line
    spike = (metres - 1.0).abs().argmin()
    block = (metres >= 2.6) & (metres <= 3.4)
    weight = torch.where(block, 0.7 / block.sum(), torch.zeros(()))
    weight[spike] = 0.3
    log_posterior = torch.log(weight.clamp_min(1e-30))
    assert float(log_posterior.argmax()) == float(spike)
    move, pick = choose_in_window(log_posterior[None], line, line[spike][None])
    assert bool(move[0])
    assert 2.9 <= float(metres[pick[0]]) <= 3.1
    assert _mass(log_posterior, line, float(metres[pick[0]])) >= 0.69


def test_a_posterior_flat_in_inverse_range_is_denser_near():
    """Flat in 1/r over 2-4 m (a range the likelihood cannot resolve): a metre of range holds
    more of 1/r the nearer it is, so the window 2-3 m holds the most, two thirds (1/2 - 1/3 of
    1/2 - 1/4), against 14 % for the window at the far end, where the flat posterior's first
    point (its argmax) sits."""
    line = _line()
    metres = 1.0 / line
    log_posterior = torch.where((metres >= 2.0) & (metres <= 4.0), 0.0, -torch.inf)
    peak = int(log_posterior.argmax())
    assert abs(float(metres[peak]) - 4.0) < 1e-3
    move, pick = choose_in_window(log_posterior[None], line, line[peak][None])
    assert bool(move[0])
    assert abs(float(metres[pick[0]]) - 2.5) <= 0.03  # within the tie margin of the best
    assert abs(_mass(log_posterior, line, float(metres[pick[0]])) - 2.0 / 3.0) < 0.02


QUICK = preset("quick")  # the same field of view on the smaller array: SBL is cheaper there


@pytest.fixture(scope="module")
def quick_state():
    """SBL's refined answer, its own count, on 512 quick validation scenes."""
    deployment = Deployment.build(QUICK)
    batch = load_split(QUICK, deployment, "val", 512)
    settings = SblSettings()
    grid_config = sbl_grid_config(QUICK, settings)
    grid = music_grid(grid_config, deployment)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    y = batch.measurements.to(torch.complex64)
    parts = []
    with torch.no_grad():
        for start in range(0, batch.size, 32):
            parts.append(_localize_chunk(y[start:start + 32], None, deployment, grid, atoms_conj,
                                         QUICK.max_sources, settings))
    state = type(parts[0])(*(torch.cat([getattr(p, name) for p in parts])
                            for name in ("points", "power", "active", "noise")))
    return deployment, batch, y, state


def test_only_ranges_of_active_sources_move_and_stay_in_the_field_of_view(quick_state):
    deployment, _, y, state = quick_state
    points, power = ranges_for_success(state.points, state.power, state.active, state.noise, y,
                                       deployment, QUICK)
    assert torch.equal(points[..., :2], state.points[..., :2])  # angles
    moved = (points != state.points).any(-1)
    assert not bool((moved & ~state.active).any())
    assert 0 < int(moved.sum()) < int(state.active.sum())  # some move, most keep their peak
    assert torch.equal(power[~moved], state.power[~moved])
    assert bool((power[moved] > 0).all())
    inverse = points[state.active][:, 2]
    assert float(inverse.min()) >= 1.0 / QUICK.range_max_m - 1e-6
    assert float(inverse.max()) <= 1.0 / QUICK.range_min_m + 1e-6


def test_permuting_the_source_slots_permutes_the_decision(quick_state):
    deployment, _, y, state = quick_state
    order = torch.tensor([2, 0, 1])
    points, power = ranges_for_success(state.points, state.power, state.active, state.noise, y,
                                       deployment, QUICK)
    shuffled, shuffled_power = ranges_for_success(
        state.points[:, order], state.power[:, order], state.active[:, order], state.noise, y,
        deployment, QUICK)
    # the same sources move, to the same range up to one point of the line: a pick at the edge
    # of the near-best set may shift by one with float rounding of another summation order
    moved = (points != state.points).any(-1)
    assert torch.equal((shuffled != state.points[:, order]).any(-1), moved[:, order])
    step = float(range_line(QUICK)[1] - range_line(QUICK)[0])
    gap = (shuffled - points[:, order]).abs()
    assert float(gap[..., :2].max()) == 0.0
    assert float(gap[..., 2].max()) <= step + 1e-6
    assert float((gap[..., 2] == 0).float().mean()) >= 0.95
    same = (gap == 0).all(-1)
    torch.testing.assert_close(shuffled_power[same], power[:, order][same], rtol=1e-4, atol=0.0)


def test_high_snr_sources_keep_the_likelihoods_peak():
    """At 30 dB on medium's array the posterior is far narrower than the window: no source
    moves, so the estimate stays the maximum-likelihood one that the Cramer-Rao rows measure
    (12 scenes, the true K). (Quick's smaller array leaves range broad at 3-4 m even there.)"""
    config = replace(MEDIUM, snr_db_min=30.0, snr_db_max=30.0)
    deployment = Deployment.build(config)
    batch = load_split(config, deployment, "val", 12)
    settings = SblSettings()
    grid_config = sbl_grid_config(config, settings)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    y = batch.measurements.to(torch.complex64)
    with torch.no_grad():
        state = _candidates(y, batch.n_sources, deployment, music_grid(grid_config, deployment),
                            atoms_conj, config.max_sources, settings)
        points, power = ranges_for_success(state.points, state.power, state.active,
                                           state.noise, y, deployment, config)
    assert int(state.active.sum()) == int(batch.n_sources.sum())
    assert torch.equal(points, state.points)
    assert torch.equal(power, state.power)


def test_the_decision_wins_more_scenes_than_it_loses(quick_state):
    """On these 512 scenes (SBL's own count) the window's range succeeds on more scenes than the
    likelihood's peak, and never turns a success into a failure by more than it gains."""
    deployment, batch, y, state = quick_state
    points, power = ranges_for_success(state.points, state.power, state.active, state.noise, y,
                                       deployment, QUICK)
    k_hat = state.active.sum(-1)

    def success(found_points, found_power):
        found = localization_from_points([found_points], [state.active], [found_power],
                                         QUICK.max_sources, "cpu")
        return torch.as_tensor(scene_success(found, k_hat, batch))

    before, after = success(state.points, state.power), success(points, power)
    won, lost = int((after & ~before).sum()), int((before & ~after).sum())
    assert won >= 2 and won > 2 * lost, (won, lost)
