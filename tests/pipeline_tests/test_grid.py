"""The one (1/range, elevation, azimuth) grid: the model's detection grid and the search grid of
MUSIC, the pursuit and SBL are the same grid for the same shape, a one-point axis included."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import PRESETS, replace
from pipeline._covariance import true_covariance
from pipeline._data import generate_scenes
from pipeline._grid import Grid, axis, music_grid
from pipeline._losses import compute_loss
from pipeline._model import build_model
from pipeline._music import music_localize
from pipeline._physics import Deployment

SMOKE = PRESETS["smoke"]


def _same_shape(shape: tuple[int, int, int]):
    """Smoke with both grids of `shape` (n_r, n_el, n_az)."""
    n_r, n_el, n_az = shape
    return replace(SMOKE, n_grid_range=n_r, n_grid_elevation=n_el, n_grid_azimuth=n_az,
                   music_grid_range=n_r, music_grid_elevation=n_el, music_grid_azimuth=n_az)


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return Deployment.build(SMOKE)


@pytest.mark.parametrize("shape", [(5, 13, 25), (3, 7, 13), (1, 7, 13), (4, 1, 13), (1, 1, 3)])
def test_the_model_and_music_see_the_same_grid(shape, deployment):
    config = _same_shape(shape)
    feature, search = Grid.feature(config), Grid.search(config)
    assert feature == search
    model = build_model(config, deployment)
    music = music_grid(config, deployment)
    assert model.grid == feature
    assert music.shape == feature.shape == shape
    # The points: the model's cells against MUSIC's axes (MUSIC keeps them in float32).
    azimuth, elevation, range_m = feature.points()
    uu, ee, aa = torch.meshgrid(music.inverse_range, music.elevation_rad, music.azimuth_rad,
                                indexing="ij")
    assert torch.equal(aa, azimuth.float())
    assert torch.equal(ee, elevation.float())
    assert torch.equal(uu, (1.0 / range_m).float())
    # The steps and the bounds, which MUSIC keeps in (azimuth, elevation, 1/r) order.
    assert music.step.tolist() == pytest.approx(feature.step[::-1], rel=1e-6)
    assert music.lower.tolist() == pytest.approx(feature.lower[::-1], rel=1e-6)
    assert music.upper.tolist() == pytest.approx(feature.upper[::-1], rel=1e-6)
    # Every grid point and every flat index name the same place for both.
    flat = torch.arange(math.prod(shape))
    points = music.point_at(flat)
    assert torch.equal(points[:, 0], azimuth.reshape(-1).float())
    assert torch.equal(points[:, 2], (1.0 / range_m).reshape(-1).float())


def test_a_one_point_axis_is_the_midpoint_and_its_step_spans_the_field_of_view():
    values, step = axis(-0.5, 0.5, 1)
    assert values.tolist() == [0.0]
    assert step == 1.0
    values, step = axis(0.25, 2.0, 1)
    assert values.tolist() == [1.125]
    assert step == 1.75  # the width, in the axis' unit (1/m here), not a unit foreign to it
    grid = Grid.feature(_same_shape((1, 1, 13)))
    # Cell coordinates: the field of view's edges are half a cell either side of the one point.
    edges = grid.to_index(torch.tensor([0.0, 0.0]), torch.tensor(grid.lower[1:2] + grid.upper[1:2]),
                          1.0 / torch.tensor([grid.lower[0], grid.upper[0]]))
    assert edges[:, 0].tolist() == pytest.approx([-0.5, 0.5])
    assert edges[:, 1].tolist() == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError, match="n_points=0"):
        axis(0.0, 1.0, 0)


def test_axes_include_both_ends_of_the_field_of_view():
    for name in ("smoke", "quick", "medium", "full"):
        for grid in (Grid.feature(PRESETS[name]), Grid.search(PRESETS[name])):
            for values, low, high in zip(grid.axes(), grid.lower, grid.upper):
                assert values[0].item() == low and values[-1].item() == high


def test_one_point_axes_train_and_localize(deployment):
    # The model's offsets and MUSIC's refinement move in units of the step; with a one-point
    # axis both still reach across the field of view and stay inside it.
    config = _same_shape((1, 1, 13))
    batch = generate_scenes(config, deployment, 8, 3)
    torch.manual_seed(0)
    model = build_model(config, deployment)
    output = model(batch.measurements, batch.fields)
    terms, _ = compute_loss(output, batch, config)
    assert torch.isfinite(terms.total)
    assert (output.range_m >= config.range_min_m - 1e-5).all()
    assert (output.range_m <= config.range_max_m + 1e-4).all()
    assert (output.elevation_rad.abs() <= math.radians(config.elevation_max_deg) + 1e-6).all()
    found = music_localize(true_covariance(batch.steering, batch.power), batch.n_sources,
                           deployment, config)
    valid = found.mask
    assert (found.n_sources <= batch.n_sources).all() and found.n_sources.sum() > 0
    assert (found.range_m[valid] >= config.range_min_m - 1e-5).all()
    assert (found.range_m[valid] <= config.range_max_m + 1e-4).all()
    elevation = found.elevation_rad[valid]
    assert (elevation.abs() <= math.radians(config.elevation_max_deg) + 1e-6).all()
    assert (elevation != 0.0).any()  # refinement leaves the one elevation point
