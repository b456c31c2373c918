"""The (1/range, elevation, azimuth) grid over the field of view: model, losses, MUSIC, pursuit, SBL.

Range is gridded in inverse range u = 1/r. The near-field phase of element e for a source at
p = r * unit is -k0 (|p - e| - r) ~ k0 (unit . e) - k0 (|e|^2 - (unit . e)^2) / (2 r): the range
enters through 1/r only, so resolution cells are of equal width in 1/r (narrow in metres near the
array, wide far away). A grid uniform in 1/r spends its points where range is resolvable.

`Grid` is the grid as numbers (bounds, shape, start, step), the same for every user: the model's
detection map (`Grid.feature`, the n_grid_* fields) and the search grid of MUSIC, the pursuit and
SBL (`Grid.search`, the music_grid_* fields). `MusicGrid` is a search grid on a device with its
steering matrix, built once per (config, device) by `music_grid`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.nn import functional

from pipeline._config import ExperimentConfig
from pipeline._physics import Deployment


def _start_step(low: float, high: float, n_points: int) -> tuple[float, float]:
    """First point and spacing of `axis`."""
    if n_points == 1:
        return 0.5 * (low + high), high - low
    return low, (high - low) / (n_points - 1)


def axis(low: float, high: float, n_points: int) -> tuple[torch.Tensor, float]:
    """n_points uniform over [low, high], both ends included, float64 on the CPU, and the step.

    One point sits at the midpoint, and its step is the whole width high - low: its one cell is
    the field of view, so what moves in units of the step (the model's cell offsets, MUSIC's
    refinement stencil, the pursuit's and SBL's pattern search) reaches across the field of view
    as it does with more points, and the step keeps the axis' unit.
    """
    if n_points < 1:
        raise ValueError(f"an axis needs at least one point, but got {n_points=}")
    if n_points == 1:
        return torch.tensor([0.5 * (low + high)], dtype=torch.float64, device="cpu"), high - low
    return (torch.linspace(low, high, n_points, dtype=torch.float64, device="cpu"),
            (high - low) / (n_points - 1))


@dataclass(frozen=True)
class Grid:
    """A grid uniform in inverse range (1/m), elevation (rad) and azimuth (rad), in that order.

    lower, upper: (3,) floats, the field of view in that order (1 / range_max_m first).
    shape: (n_r, n_el, n_az). Cell (i, j, k) is at start + (i, j, k) * step, axes as `axis` makes
    them.
    """

    lower: tuple[float, float, float]
    upper: tuple[float, float, float]
    shape: tuple[int, int, int]

    @staticmethod
    def over(config: ExperimentConfig, shape: tuple[int, int, int]) -> Grid:
        """The config's field of view with `shape` (n_r, n_el, n_az) points."""
        el_max = math.radians(config.elevation_max_deg)
        az_max = math.radians(config.azimuth_max_deg)
        return Grid(lower=(1.0 / config.range_max_m, -el_max, -az_max),
                    upper=(1.0 / config.range_min_m, el_max, az_max), shape=tuple(shape))

    @staticmethod
    def feature(config: ExperimentConfig) -> Grid:
        """The model's detection grid (n_grid_range, n_grid_elevation, n_grid_azimuth)."""
        return Grid.over(config, (config.n_grid_range, config.n_grid_elevation,
                                  config.n_grid_azimuth))

    @staticmethod
    def search(config: ExperimentConfig) -> Grid:
        """The coarse search grid of MUSIC, the pursuit and SBL (the music_grid_* fields)."""
        return Grid.over(config, (config.music_grid_range, config.music_grid_elevation,
                                  config.music_grid_azimuth))

    @property
    def start(self) -> tuple[float, float, float]:
        """The first point of each axis: the lower bound, or the midpoint of a one-point axis."""
        return tuple(_start_step(lo, hi, n)[0]
                     for lo, hi, n in zip(self.lower, self.upper, self.shape))

    @property
    def step(self) -> tuple[float, float, float]:
        """The spacing of each axis (the whole width for a one-point axis, see `axis`)."""
        return tuple(_start_step(lo, hi, n)[1]
                     for lo, hi, n in zip(self.lower, self.upper, self.shape))

    def axes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse range (1/m, ascending), elevation and azimuth (rad): float64 on the CPU."""
        return tuple(axis(lo, hi, n)[0] for lo, hi, n in zip(self.lower, self.upper, self.shape))

    def points(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Azimuth (rad), elevation (rad) and range (m) of every point, each (R, E, A) float64."""
        u, el, az = torch.meshgrid(*self.axes(), indexing="ij")
        return az, el, 1.0 / u

    def to_index(self, azimuth: torch.Tensor, elevation: torch.Tensor, range_m: torch.Tensor
                 ) -> torch.Tensor:
        """Continuous cell coordinates (..., 3) in (range, elevation, azimuth) order."""
        coords = (1.0 / range_m.clamp_min(1e-3), elevation, azimuth)
        return torch.stack([(c - s) / d for c, s, d in zip(coords, self.start, self.step)], -1)


@dataclass(frozen=True)
class MusicGrid:
    """A search grid on one device, with its steering matrix (MUSIC, pursuit, SBL).

    azimuth_rad (n_az,), elevation_rad (n_el,), inverse_range (n_r,) 1/m: float32 axes, inverse
    range ascending (far to near). steering_conj: (n_r * n_el * n_az, N) complex64, the conjugated
    steering vectors, rows in (range, elevation, azimuth) row-major order. Points are (azimuth rad,
    elevation rad, 1/m), and so are step, the (3,) float32 grid spacing, and lower, upper, the (3,)
    float32 search bounds.
    """

    azimuth_rad: torch.Tensor
    elevation_rad: torch.Tensor
    inverse_range: torch.Tensor
    steering_conj: torch.Tensor
    step: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.inverse_range.numel(), self.elevation_rad.numel(),
                self.azimuth_rad.numel())

    def point_at(self, flat: torch.Tensor) -> torch.Tensor:
        """Points (..., 3) (az, el, 1/r) of flat grid indices (...) in steering row order."""
        n_az, n_el = self.azimuth_rad.numel(), self.elevation_rad.numel()
        return torch.stack([self.azimuth_rad[flat % n_az],
                            self.elevation_rad[(flat // n_az) % n_el],
                            self.inverse_range[flat // (n_az * n_el)]], dim=-1)

    def clamp(self, points: torch.Tensor) -> torch.Tensor:
        """Points (..., 3) clamped to the search box."""
        return torch.maximum(torch.minimum(points, self.upper), self.lower)


_GRID_CACHE: OrderedDict[tuple, MusicGrid] = OrderedDict()
_GRID_CACHE_SIZE = 4


def music_grid(config: ExperimentConfig, deployment: Deployment) -> MusicGrid:
    """The coarse search grid of `config` (`Grid.search`) on the deployment's device, cached.

    The cache key is the grid, the array (its element count and wavenumber, which follow from the
    config) and the device; a few grids are kept.
    """
    device = deployment.elements.device
    grid = Grid.search(config)
    key = (grid, tuple(deployment.elements.shape), deployment.wavenumber, str(device))
    cached = _GRID_CACHE.get(key)
    if cached is not None:
        _GRID_CACHE.move_to_end(key)
        return cached
    inverse_range, elevation, azimuth = grid.axes()
    u_step, el_step, az_step = grid.step
    uu, ee, aa = torch.meshgrid(inverse_range, elevation, azimuth, indexing="ij")
    # Built in float64, stored in complex64: the grid is made once, so precision is free.
    steering = deployment.steering(
        aa.reshape(-1).to(device), ee.reshape(-1).to(device), (1.0 / uu).reshape(-1).to(device)
    )
    music = MusicGrid(
        azimuth_rad=azimuth.to(device=device, dtype=torch.float32),
        elevation_rad=elevation.to(device=device, dtype=torch.float32),
        inverse_range=inverse_range.to(device=device, dtype=torch.float32),
        steering_conj=steering.conj().to(torch.complex64).contiguous(),
        step=torch.tensor([az_step, el_step, u_step], dtype=torch.float32, device=device),
        lower=torch.tensor(grid.lower[::-1], dtype=torch.float32, device=device),
        upper=torch.tensor(grid.upper[::-1], dtype=torch.float32, device=device),
    )
    _GRID_CACHE[key] = music
    while len(_GRID_CACHE) > _GRID_CACHE_SIZE:
        _GRID_CACHE.popitem(last=False)
    return music


def local_maxima(volume: torch.Tensor) -> torch.Tensor:
    """True where a point of volume (b, D, H, W) is >= its 26 neighbours; (b, D, H, W) bool.

    A 3 x 3 x 3 max filter is separable: three 1-D maxima of shifted views, several times faster
    on the CPU than max_pool3d.
    """
    pooled = volume
    for dim in (1, 2, 3):
        padding = [0] * 6
        padding[2 * (3 - dim)] = padding[2 * (3 - dim) + 1] = 1
        padded = functional.pad(pooled, padding, value=-math.inf)
        size = pooled.shape[dim]
        pooled = torch.maximum(torch.maximum(padded.narrow(dim, 0, size),
                                             padded.narrow(dim, 1, size)),
                               padded.narrow(dim, 2, size))
    return volume >= pooled
