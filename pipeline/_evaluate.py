"""Evaluation (SYSTEM.md §5): MUSIC localization, MDL source counting, matched metrics.

MUSIC searches the exact spherical steering manifold over (azimuth, elevation, 1/range):

1. Signal subspace: the K_hat strongest eigenvectors of each covariance (batched `eigh`).
2. Coarse spectrum: one complex GEMM of the cached grid steering matrix (n_grid x N) against the
   signal subspaces of a whole chunk of scenes stacked side by side (N x chunk*K_max). The score
   of a grid point is proj / N = ||E_s^H a||^2 / N in [0, 1]; the pseudo-spectrum
   1 / (1 - proj/N + eps) is a monotone function of it, so peaks are picked on the score.
3. Candidates: 3-D local maxima (a 3 x 3 x 3 max filter, i.e. max_pool3d-style non-maximum
   suppression, done separably) of the (range, elevation, azimuth) score volume; the best `K_hat + n_extra_candidates` of each scene go on.
4. Refinement: `music_refine_steps` rounds of a local 3 x 3 x 3 grid around every candidate (at
   half the coarse step, the step halving each round), all candidates of a chunk
   evaluated in one batched matmul. Each round also fits a quadratic to the 3 x 3 x 3 block
   around its best point and centres the next round (or, after the last, a final check) on the
   fitted maximum: sub-step accuracy at no extra steering evaluations.
5. The K_hat best refined candidates (duplicates that converged onto one peak removed) are the
   estimates.

Range is searched in inverse range u = 1/r. The near-field phase of element e for a source at
p = r * unit is -k0 (|p - e| - r) ~ k0 (unit . e) - k0 (|e|^2 - (unit . e)^2) / (2 r): the range
enters through 1/r only, so MUSIC's resolution cells are of equal width in 1/r (narrow in metres
near the array, wide far away). A grid uniform in 1/r spends its points where range is resolvable.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from pipeline._config import ExperimentConfig
from pipeline._covariance import LowRank, hermitian
from pipeline._data import SceneBatch
from pipeline._matching import EVALUATION_SCALES, hungarian_match
from pipeline._physics import Deployment

# SYSTEM.md §5 success box: every true source within 3 deg / 3 deg / 0.5 m.
SUCCESS_AZIMUTH_DEG = 3.0
SUCCESS_ELEVATION_DEG = 3.0
SUCCESS_RANGE_M = 0.5
# Composite normalisers (SYSTEM.md §5): RMSE_phi / 5 deg + RMSE_theta / 5 deg + RMSE_r / 1 m.
COMPOSITE_AZIMUTH_DEG = 5.0
COMPOSITE_ELEVATION_DEG = 5.0
COMPOSITE_RANGE_M = 1.0

# Local grid points per dimension: each refinement round searches +-1 of its own step (3 points),
# the first at half the coarse step, i.e. +-1/2 coarse step: the coarse peak's own cell. A 5-point
# first round (+-1 coarse step) found the same peaks (success within 0.5 % on 300 scenes, R_true
# and R_samp, quick and full) at 2-2.5x the cost; a third 3-point round buys more accuracy than
# it did, for less (bench/localize.py).
_FIRST_ROUND_POINTS = 3
_LATER_ROUND_POINTS = 3
_EPS = 1e-6


@dataclass(frozen=True)
class Localization:
    """Estimated (or true) source sets of B scenes.

    azimuth_rad, elevation_rad, range_m: (B, K_max) float32. mask: (B, K_max) bool, True for the
    valid slots (the first ones). score: (B, K_max) float32, the MUSIC score proj/N in [0, 1] of
    each estimate (1 for the truth), 0 where masked.
    """

    azimuth_rad: torch.Tensor
    elevation_rad: torch.Tensor
    range_m: torch.Tensor
    mask: torch.Tensor
    score: torch.Tensor

    @property
    def n_sources(self) -> torch.Tensor:
        """Valid slots per scene; (B,) int64."""
        return self.mask.sum(-1)

    def params(self) -> torch.Tensor:
        """(B, K_max, 3) float32: azimuth rad, elevation rad, range m."""
        return torch.stack([self.azimuth_rad, self.elevation_rad, self.range_m], dim=-1)

    @staticmethod
    def from_batch(batch: SceneBatch) -> Localization:
        """The true sources of a batch as a Localization."""
        return Localization(
            azimuth_rad=batch.azimuth_rad.float(), elevation_rad=batch.elevation_rad.float(),
            range_m=batch.range_m.float(), mask=batch.source_mask.bool(),
            score=batch.source_mask.float(),
        )


@dataclass(frozen=True)
class MusicGrid:
    """The coarse MUSIC grid of one (config, device), with its steering matrix.

    azimuth_rad (n_az,), elevation_rad (n_el,), inverse_range (n_r,) 1/m: float32 axes, inverse
    range ascending (far to near). steering_conj: (n_r * n_el * n_az, N) complex64, the conjugated
    steering vectors, rows in (range, elevation, azimuth) row-major order. step: (3,) float32
    grid spacing in (azimuth rad, elevation rad, 1/m); lower, upper: (3,) float32 search bounds.
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


_GRID_CACHE: OrderedDict[tuple, MusicGrid] = OrderedDict()
_GRID_CACHE_SIZE = 4


def _axis(low: float, high: float, n_points: int) -> tuple[torch.Tensor, float]:
    """n_points uniform over [low, high] (the midpoint when n_points is 1), float64, and the step."""
    if n_points == 1:
        return torch.tensor([0.5 * (low + high)], dtype=torch.float64, device="cpu"), high - low
    return (torch.linspace(low, high, n_points, dtype=torch.float64, device="cpu"),
            (high - low) / (n_points - 1))


def music_grid(config: ExperimentConfig, deployment: Deployment) -> MusicGrid:
    """The coarse grid of `config` on the deployment's device, built once and cached.

    The cache key is every config field the grid depends on, the array (its element count and
    wavenumber, which follow from the config) and the device; a few grids are kept.
    """
    device = deployment.elements.device
    key = (config.azimuth_max_deg, config.elevation_max_deg, config.range_min_m,
           config.range_max_m, config.music_grid_azimuth, config.music_grid_elevation,
           config.music_grid_range, tuple(deployment.elements.shape), deployment.wavenumber,
           str(device))
    cached = _GRID_CACHE.get(key)
    if cached is not None:
        _GRID_CACHE.move_to_end(key)
        return cached
    az_max = math.radians(config.azimuth_max_deg)
    el_max = math.radians(config.elevation_max_deg)
    u_low, u_high = 1.0 / config.range_max_m, 1.0 / config.range_min_m
    azimuth, az_step = _axis(-az_max, az_max, config.music_grid_azimuth)
    elevation, el_step = _axis(-el_max, el_max, config.music_grid_elevation)
    inverse_range, u_step = _axis(u_low, u_high, config.music_grid_range)
    uu, ee, aa = torch.meshgrid(inverse_range, elevation, azimuth, indexing="ij")
    # Built in float64, stored in complex64: the grid is made once, so precision is free.
    steering = deployment.steering(
        aa.reshape(-1).to(device), ee.reshape(-1).to(device), (1.0 / uu).reshape(-1).to(device)
    )
    grid = MusicGrid(
        azimuth_rad=azimuth.to(device=device, dtype=torch.float32),
        elevation_rad=elevation.to(device=device, dtype=torch.float32),
        inverse_range=inverse_range.to(device=device, dtype=torch.float32),
        steering_conj=steering.conj().to(torch.complex64).contiguous(),
        step=torch.tensor([az_step, el_step, u_step], dtype=torch.float32, device=device),
        lower=torch.tensor([-az_max, -el_max, u_low], dtype=torch.float32, device=device),
        upper=torch.tensor([az_max, el_max, u_high], dtype=torch.float32, device=device),
    )
    _GRID_CACHE[key] = grid
    while len(_GRID_CACHE) > _GRID_CACHE_SIZE:
        _GRID_CACHE.popitem(last=False)
    return grid


def _eigh(matrix: torch.Tensor, *, vectors: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched Hermitian eigendecomposition, ascending; on the CPU with one LAPACK thread.

    The matrices are small (N = 144) and many, so one thread per matrix loses little, while the
    threaded solver collapses when other processes hold the cores (HPO workers side by side):
    for 64 matrices on a shared 2-core machine, 0.08-0.18 s with one thread against 0.7-8 s with
    two. The thread count is restored afterwards.
    """
    if matrix.device.type != "cpu":
        if vectors:
            return torch.linalg.eigh(matrix)
        return torch.linalg.eigvalsh(matrix), None
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if vectors:
            return torch.linalg.eigh(matrix)
        return torch.linalg.eigvalsh(matrix), None
    finally:
        torch.set_num_threads(n_threads)


def _low_rank_eigenvectors(covariance: LowRank, k_max: int) -> torch.Tensor:
    """The k_max strongest eigenvectors of P P^H + c I, strongest first; (B, N, k_max).

    P = factor diag(sqrt(weight)). c I moves no eigenvector, and those of P P^H with non-zero eigenvalue lie in the span of P:
    with P = Q T (thin QR, Q orthonormal N x r), P P^H = Q (T T^H) Q^H, so the eigenvectors are Q
    times those of the r x r matrix T T^H. Orthonormal whatever the rank of P.
    """
    factor = covariance.weighted_factor().to(torch.complex64)
    n_elements, rank = factor.shape[-2:]
    if rank < k_max:  # pad with zero columns: QR still gives orthonormal Q of k_max columns
        factor = functional.pad(factor, (0, k_max - rank))
    if rank > n_elements:
        return signal_subspace(covariance.dense(), torch.full((len(covariance),), k_max),
                               k_max)
    q, t = torch.linalg.qr(factor)
    _, vectors = _eigh(hermitian(t @ t.conj().transpose(-2, -1)))
    return q @ vectors[..., -k_max:].flip(-1)


def signal_subspace(covariance: torch.Tensor | LowRank, n_sources: torch.Tensor, k_max: int
                    ) -> torch.Tensor:
    """The K_hat strongest eigenvectors, strongest first, zero beyond K_hat; (B, N, k_max).

    covariance: (B, N, N) complex (made Hermitian here) or a `LowRank` (its factor's QR and an
    r x r `eigh` instead of an N x N one); n_sources: (B,) int, clipped to 0..k_max.
    """
    if isinstance(covariance, LowRank):
        strongest = _low_rank_eigenvectors(covariance, k_max)
    else:
        _, vectors = _eigh(hermitian(covariance.to(torch.complex64)))
        strongest = vectors[..., -k_max:].flip(-1)
    keep = torch.arange(k_max, device=covariance.device)[None, :] < n_sources[:, None]
    return strongest * keep[:, None, :].to(strongest.dtype)


def _squared_magnitude(values: torch.Tensor) -> torch.Tensor:
    """|z|^2 of a complex tensor without the square root of abs(); real, same shape."""
    return torch.view_as_real(values).square().sum(-1)


def _score_points(points: torch.Tensor, subspace: torch.Tensor, deployment: Deployment
                  ) -> torch.Tensor:
    """MUSIC score ||E_s^H a||^2 / N at points (P, n, 3) (az, el, 1/r) against subspaces
    (P, N, k_max); (P, n) float32."""
    steering = deployment.steering(points[..., 0], points[..., 1], 1.0 / points[..., 2])
    projection = torch.bmm(steering.conj(), subspace)  # (P, n, k_max)
    return _squared_magnitude(projection).sum(-1) / steering.shape[-1]


def _local_maxima(volume: torch.Tensor) -> torch.Tensor:
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


def _coarse_scores(subspace: torch.Tensor, grid: MusicGrid) -> torch.Tensor:
    """Scores proj/N on the coarse grid; subspace (b, N, k_max) -> (b, n_r, n_el, n_az) float32.

    ONE GEMM for all scenes: (n_grid x N) @ (N x b*k_max), the scenes' subspaces side by side
    (columns beyond K_hat are zero and add nothing).
    """
    n_scenes, n_elements, k_max = subspace.shape
    stacked = subspace.permute(1, 0, 2).reshape(n_elements, n_scenes * k_max)
    projection = grid.steering_conj @ stacked  # (n_grid, b*k_max)
    score = _squared_magnitude(projection).view(-1, n_scenes, k_max).sum(-1) / n_elements
    return score.T.reshape(n_scenes, *grid.shape)


def music_spectrum(covariance: torch.Tensor, n_sources: torch.Tensor, deployment: Deployment,
                   config: ExperimentConfig) -> torch.Tensor:
    """The MUSIC pseudo-spectrum 1 / (1 - proj/N + eps) on the coarse grid, for inspection.

    covariance (B, N, N) complex, n_sources (B,) int. Returns (B, n_r, n_el, n_az) float32 over
    `music_grid(config, deployment)` (inverse range ascending, then elevation, then azimuth).
    """
    n_sources = n_sources.to(device=covariance.device, dtype=torch.long)
    n_sources = n_sources.clamp(0, config.max_sources)
    with torch.no_grad():
        subspace = signal_subspace(covariance, n_sources, config.max_sources)
        score = _coarse_scores(subspace, music_grid(config, deployment))
    return 1.0 / (1.0 - score.clamp_max(1.0) + _EPS)


def _local_offsets(n_points: int, device: torch.device) -> torch.Tensor:
    """The n x n x n stencil in units of the step, (n^3, 3) float32, row-major (az, el, u)."""
    ticks = torch.arange(n_points, dtype=torch.float32, device=device)
    ticks = ticks - (n_points - 1) / 2
    mesh = torch.meshgrid(ticks, ticks, ticks, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


def _clamp(points: torch.Tensor, grid: MusicGrid) -> torch.Tensor:
    """Points (..., 3) clamped to the search box of the grid."""
    return torch.maximum(torch.minimum(points, grid.upper), grid.lower)


@functools.lru_cache(maxsize=8)
def _quadratic_design(device: torch.device) -> torch.Tensor:
    """Least-squares solver of a 3-D quadratic on the 3 x 3 x 3 stencil; (10, 27) float32.

    Coefficients order: 1, x, y, z, x^2, y^2, z^2, xy, xz, yz, with x, y, z in steps.
    """
    ticks = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, device="cpu")
    x, y, z = (m.reshape(-1) for m in torch.meshgrid(ticks, ticks, ticks, indexing="ij"))
    design = torch.stack([torch.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z],
                         dim=-1)
    return torch.linalg.pinv(design).to(device=device, dtype=torch.float32)


def _quadratic_step(local: torch.Tensor, best: torch.Tensor, n_points: int) -> torch.Tensor:
    """Newton step, in units of the local step, from a quadratic fit around the best point.

    local: (b, C, n^3) scores on the n x n x n stencil (n = n_points >= 3); best: (b, C) index of
    its maximum.
    The fit uses the 3 x 3 x 3 block around the best point (moved inwards at the stencil's edge);
    the step is to the fitted maximum where the fit is concave and that maximum lies within one
    step of the best point, else zero. Returns (b, C, 3) float32.
    """
    n = n_points
    index = torch.stack([best // (n * n), (best // n) % n, best % n], dim=-1)  # (b, C, 3)
    corner = index.clamp(1, n - 2)
    ticks = torch.tensor([-1, 0, 1], device=local.device)
    da, de, du = (m.reshape(-1) for m in torch.meshgrid(ticks, ticks, ticks, indexing="ij"))
    block = ((corner[..., 0:1] + da) * n * n + (corner[..., 1:2] + de) * n
             + corner[..., 2:3] + du)  # (b, C, 27)
    coefficient = local.gather(-1, block) @ _quadratic_design(local.device).T  # (b, C, 10)
    gradient = coefficient[..., 1:4]
    c = coefficient
    hessian = torch.stack([
        torch.stack([2 * c[..., 4], c[..., 7], c[..., 8]], dim=-1),
        torch.stack([c[..., 7], 2 * c[..., 5], c[..., 9]], dim=-1),
        torch.stack([c[..., 8], c[..., 9], 2 * c[..., 6]], dim=-1),
    ], dim=-2)  # (b, C, 3, 3)
    # Maximum of the fit: solve (-H) x = g, which needs -H positive definite.
    factor, info = torch.linalg.cholesky_ex(-hessian)
    ok = info == 0
    safe = torch.where(ok[..., None, None], factor, torch.eye(3, device=local.device))
    offset = torch.cholesky_solve(gradient[..., None], safe).squeeze(-1)
    offset = offset + (corner - index).to(offset.dtype)  # relative to the best point
    ok = ok & (offset.abs() <= 1.0).all(-1) & torch.isfinite(offset).all(-1)
    return torch.where(ok[..., None], offset, torch.zeros_like(offset))


def _refine(centres: torch.Tensor, subspace: torch.Tensor, deployment: Deployment,
            grid: MusicGrid, n_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local refinement of candidate peaks (P, 3) with their scenes' subspaces (P, N, k_max).

    Each round halves the step and scores a local stencil around the current position
    (_FIRST_ROUND_POINTS a side in the first round, 3 later), all candidates in one batched matmul; a quadratic fit to
    the 3 x 3 x 3 block around the best point proposes a sub-step position, on which the next
    round is centred. Returns positions (P, 3) and scores (P,).
    """
    step = grid.step
    proposal = centres
    values = _score_points(centres[:, None, :], subspace, deployment)[:, 0]
    for round_index in range(n_rounds):
        n_points = _FIRST_ROUND_POINTS if round_index == 0 else _LATER_ROUND_POINTS
        step = step / 2.0
        offsets = _local_offsets(n_points, centres.device)
        # The stencil is shifted inwards at the edge of the search box rather than clamped point
        # by point, so that its points keep the spacing the quadratic fit assumes.
        reach = step * ((n_points - 1) / 2)
        centre = torch.maximum(torch.minimum(proposal, grid.upper - reach), grid.lower + reach)
        points = _clamp(centre[:, None, :] + offsets * step, grid)  # (P, n^3, 3)
        local = _score_points(points, subspace, deployment)  # (P, n^3)
        values, best = local.max(dim=-1)
        centres = points.gather(1, best[:, None, None].expand(-1, 1, 3)).squeeze(1)
        proposal = _clamp(centres + _quadratic_step(local, best, n_points) * step, grid)
    if n_rounds:
        # The last proposal replaces the best stencil point where it scores higher.
        proposed = _score_points(proposal[:, None, :], subspace, deployment)[:, 0]
        better = proposed > values
        centres = torch.where(better[:, None], proposal, centres)
        values = torch.where(better, proposed, values)
    return centres, values


def _localize_chunk(covariance: torch.Tensor, n_sources: torch.Tensor, deployment: Deployment,
                    grid: MusicGrid, k_max: int, n_extra: int, n_rounds: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MUSIC on one chunk: (b, k_max, 3) points, (b, k_max) score, (b, k_max) bool mask."""
    device = covariance.device
    subspace = signal_subspace(covariance, n_sources, k_max)  # (b, N, k_max)

    volume = _coarse_scores(subspace, grid)  # (b, n_r, n_el, n_az)

    # Candidates: the K_hat + n_extra best 3-D local maxima of each scene.
    peaks = torch.where(_local_maxima(volume), volume, -1.0).flatten(1)
    n_slots = max(k_max, min(k_max + n_extra, peaks.shape[1]))
    if n_slots > peaks.shape[1]:
        peaks = functional.pad(peaks, (0, n_slots - peaks.shape[1]), value=-1.0)
    values, flat = peaks.topk(n_slots, dim=1)  # (b, C)
    n_az, n_el, n_r = grid.azimuth_rad.numel(), grid.elevation_rad.numel(), grid.shape[0]
    flat = flat.clamp_max(n_az * n_el * n_r - 1)  # padded slots point anywhere; they are invalid
    centres = torch.stack([grid.azimuth_rad[flat % n_az],
                           grid.elevation_rad[(flat // n_az) % n_el],
                           grid.inverse_range[flat // (n_az * n_el)]], dim=-1)  # (b, C, 3)
    rank = torch.arange(n_slots, device=device)[None, :]
    refine = (values >= 0.0) & (rank < (n_sources[:, None] + n_extra)) & (n_sources[:, None] > 0)

    # Refinement of the chosen candidates only, all of the chunk at once.
    scene_index, slot_index = refine.nonzero(as_tuple=True)
    refined, refined_values = _refine(centres[scene_index, slot_index], subspace[scene_index],
                                      deployment, grid, n_rounds)
    centres = centres.index_put((scene_index, slot_index), refined)
    values = torch.full_like(values, -1.0).index_put((scene_index, slot_index), refined_values)

    # Candidates that converged onto one peak: keep the best of them only.
    order = values.argsort(dim=1, descending=True)
    values = values.gather(1, order)
    centres = centres.gather(1, order[..., None].expand(-1, -1, 3))
    close = ((centres[:, :, None, :] - centres[:, None, :, :]).abs()
             < 0.5 * grid.step).all(-1)  # (b, C, C)
    keep = values >= 0.0
    for index in range(1, n_slots):
        shadowed = (close[:, index, :index] & keep[:, :index]).any(-1)
        keep[:, index] = keep[:, index] & ~shadowed
    values = torch.where(keep, values, -1.0)
    values, pick = values.topk(k_max, dim=1)
    centres = centres.gather(1, pick[..., None].expand(-1, -1, 3))
    mask = (values >= 0.0) & (rank[:, :k_max] < n_sources[:, None])
    return centres, values.clamp_min(0.0), mask


def _rows(covariance: torch.Tensor | LowRank, part: slice) -> torch.Tensor | LowRank:
    return covariance.select(part) if isinstance(covariance, LowRank) else covariance[part]


def music_localize(covariance: torch.Tensor | LowRank, n_sources: torch.Tensor, deployment: Deployment,
                   config: ExperimentConfig, *, chunk_size: int = 64,
                   n_extra_candidates: int = 3) -> Localization:
    """MUSIC localization of K_hat sources per scene (SYSTEM.md §5), on the covariance's device.

    covariance: (B, N, N) complex (Hermitian; any scale) or a `LowRank`. n_sources: (B,) int, K_hat per scene,
    clipped to 0..config.max_sources. Returns a Localization with K_max = config.max_sources slots,
    the first K_hat valid (fewer only if the spectrum has fewer local maxima), strongest peak
    first. Scenes are processed `chunk_size` at a time to bound memory; `n_extra_candidates`
    peaks beyond K_max are refined too, so that a true source whose coarse peak ranks just below
    a sidelobe is still found.
    """
    if isinstance(covariance, LowRank):
        device, n_scenes = covariance.factor.device, len(covariance)
    elif covariance.ndim != 3 or covariance.shape[-1] != covariance.shape[-2]:
        raise ValueError(f"covariance must be (B, N, N), but got {tuple(covariance.shape)}")
    else:
        device, n_scenes = covariance.device, covariance.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, but got {chunk_size=}")
    k_max = config.max_sources
    grid = music_grid(config, deployment)
    n_sources = n_sources.to(device=device, dtype=torch.long).clamp(0, k_max)
    points, scores, masks = [], [], []
    with torch.no_grad():
        for start in range(0, n_scenes, chunk_size):
            part = slice(start, start + chunk_size)
            chunk_points, chunk_score, chunk_mask = _localize_chunk(
                _rows(covariance, part), n_sources[part], deployment, grid, k_max,
                n_extra_candidates, config.music_refine_steps,
            )
            points.append(chunk_points)
            scores.append(chunk_score)
            masks.append(chunk_mask)
    point = torch.cat(points) if points else torch.zeros(0, k_max, 3, device=device)
    mask = torch.cat(masks) if masks else torch.zeros(0, k_max, dtype=torch.bool,
                                                      device=device)
    score = torch.cat(scores) if scores else torch.zeros(0, k_max, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return Localization(
        azimuth_rad=torch.where(mask, point[..., 0], zero),
        elevation_rad=torch.where(mask, point[..., 1], zero),
        range_m=torch.where(mask, 1.0 / point[..., 2].clamp_min(_EPS), zero),
        mask=mask,
        score=torch.where(mask, score, zero),
    )


def mdl_estimate(covariance: torch.Tensor, n_snapshots: int, *,
                 max_sources: int = ExperimentConfig.max_sources) -> torch.Tensor:
    """Source count by the MDL criterion (Wax-Kailath) on the eigenvalues; (B,) int64 in 1..K_max.

    covariance: (B, N, N) complex. Only the n = min(N, n_snapshots) largest eigenvalues take part:
    a covariance from L snapshots has rank <= L, and the zero eigenvalues beyond would make the
    noise-subspace geometric mean zero. MDL(k) = -L (n - k) log(geometric / arithmetic mean of
    eigenvalues k+1..n) + k (2n - k) log(L) / 2, minimised over k = 0..min(K_max, n - 1).
    """
    if n_snapshots < 2:
        raise ValueError(f"n_snapshots must be >= 2, but got {n_snapshots=}")
    eigenvalues, _ = _eigh(hermitian(covariance.to(torch.complex64)), vectors=False)
    eigenvalues = eigenvalues.to(torch.float64).flip(-1)  # descending, (B, N)
    n_used = min(eigenvalues.shape[-1], n_snapshots)
    eigenvalues = eigenvalues[..., :n_used]
    floor = eigenvalues[..., :1].clamp_min(1e-30) * 1e-12
    eigenvalues = torch.maximum(eigenvalues, floor)
    k_top = min(max_sources, n_used - 1)
    criteria = []
    for k in range(k_top + 1):
        tail = eigenvalues[..., k:]
        n_tail = n_used - k
        log_geometric = tail.log().mean(-1)
        log_arithmetic = tail.mean(-1).log()
        likelihood = -n_snapshots * n_tail * (log_geometric - log_arithmetic)
        penalty = 0.5 * k * (2 * n_used - k) * math.log(n_snapshots)
        criteria.append(likelihood + penalty)
    estimate = torch.stack(criteria, dim=-1).argmin(-1)
    return estimate.clamp(1, max(max_sources, 1)).to(torch.long)


def matched_errors(localization: Localization, truth: Localization | SceneBatch
                   ) -> dict[str, np.ndarray]:
    """Per matched pair errors (Hungarian on 5 deg / 5 deg / 1 m, SYSTEM.md §5); numpy arrays.

    Keys: scene, est_slot, true_slot (int64); azimuth_deg, elevation_deg, range_m (absolute
    errors); true_range_m (for errors relative to range and by range bucket). All (n_pairs,).
    """
    if isinstance(truth, SceneBatch):
        truth = Localization.from_batch(truth)
    est_params = localization.params().detach().cpu().double().numpy()
    true_params = truth.params().detach().cpu().double().numpy()
    pairs = hungarian_match(est_params, localization.mask, true_params, truth.mask,
                            EVALUATION_SCALES)
    est = est_params[pairs.scene, pairs.est_slot]
    true = true_params[pairs.scene, pairs.true_slot]
    error = np.abs(est - true)
    return {
        "scene": pairs.scene, "est_slot": pairs.est_slot, "true_slot": pairs.true_slot,
        "azimuth_deg": np.degrees(error[:, 0]), "elevation_deg": np.degrees(error[:, 1]),
        "range_m": error[:, 2], "true_range_m": true[:, 2],
    }


def _rms(values: np.ndarray, penalty: float) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if values.size else penalty


def _median(values: np.ndarray, penalty: float) -> float:
    return float(np.median(values)) if values.size else penalty


def localization_metrics(localization: Localization, truth: Localization | SceneBatch,
                         n_sources_hat: torch.Tensor | None = None, *,
                         config: ExperimentConfig | None = None) -> dict[str, float]:
    """Localization metrics of SYSTEM.md §5 over a batch; every value a finite float.

    localization: the estimates; truth: the true sources (a SceneBatch or a Localization).
    n_sources_hat: (B,) int, the K estimate; default the valid slots of `localization`.
    config: supplies the field of view for the no-pair penalty (default ExperimentConfig()).

    Errors are taken over Hungarian-matched pairs (min(K_hat, K) per scene):
      k_accuracy            share of scenes with K_hat == K
      rmse_azimuth_deg, rmse_elevation_deg, rmse_range_m   RMSE over all matched pairs
      median_azimuth_deg, median_elevation_deg, median_range_m, median_range_relative
      inlier_rmse_*         RMSE over the pairs inside the success box
      success_rate          share of scenes with K_hat == K and every true source matched within
                            3 deg / 3 deg / 0.5 m
      composite             (1 - k_accuracy) + rmse_az/5 + rmse_el/5 + rmse_r/1 - success_rate
      n_pairs, n_scenes
    With no matched pairs an RMSE or median is the width of the field of view in that parameter
    (2 azimuth_max_deg, 2 elevation_max_deg, range_max_m - range_min_m; 1 for the relative range):
    the worst error an estimate inside the field of view can make, and never NaN.
    """
    config = config or ExperimentConfig()
    if isinstance(truth, SceneBatch):
        truth = Localization.from_batch(truth)
    n_true = truth.mask.sum(-1).detach().cpu().numpy()
    if n_sources_hat is None:
        n_sources_hat = localization.n_sources
    k_hat = n_sources_hat.detach().cpu().numpy().astype(np.int64).reshape(-1)
    n_scenes = n_true.shape[0]
    if k_hat.shape[0] != n_scenes or localization.mask.shape[0] != n_scenes:
        raise ValueError(
            f"estimates and truth must cover the same scenes, but got {k_hat.shape[0]}, "
            f"{localization.mask.shape[0]} and {n_scenes}"
        )
    errors = matched_errors(localization, truth)
    inside = ((errors["azimuth_deg"] <= SUCCESS_AZIMUTH_DEG)
              & (errors["elevation_deg"] <= SUCCESS_ELEVATION_DEG)
              & (errors["range_m"] <= SUCCESS_RANGE_M))
    matched_inside = np.bincount(errors["scene"][inside], minlength=n_scenes)
    success = (k_hat == n_true) & (matched_inside == n_true)
    k_accuracy = float(np.mean(k_hat == n_true)) if n_scenes else 0.0
    success_rate = float(np.mean(success)) if n_scenes else 0.0

    penalty = {"azimuth_deg": 2.0 * config.azimuth_max_deg,
               "elevation_deg": 2.0 * config.elevation_max_deg,
               "range_m": config.range_max_m - config.range_min_m}
    metrics: dict[str, float] = {"k_accuracy": k_accuracy, "success_rate": success_rate}
    for name, worst in penalty.items():
        metrics[f"rmse_{name}"] = _rms(errors[name], worst)
        metrics[f"median_{name}"] = _median(errors[name], worst)
        metrics[f"inlier_rmse_{name}"] = _rms(errors[name][inside], worst)
    metrics["median_range_relative"] = _median(errors["range_m"] / errors["true_range_m"], 1.0)
    metrics["composite"] = (
        (1.0 - k_accuracy)
        + metrics["rmse_azimuth_deg"] / COMPOSITE_AZIMUTH_DEG
        + metrics["rmse_elevation_deg"] / COMPOSITE_ELEVATION_DEG
        + metrics["rmse_range_m"] / COMPOSITE_RANGE_M
        - success_rate
    )
    metrics["n_pairs"] = float(errors["scene"].size)
    metrics["n_scenes"] = float(n_scenes)
    return metrics


def evaluate_covariances(covariance: torch.Tensor | LowRank, n_sources_hat: torch.Tensor,
                         batch: SceneBatch, deployment: Deployment, config: ExperimentConfig
                         ) -> dict[str, float]:
    """MUSIC on `covariance` with K_hat sources, scored against the batch's true sources.

    covariance: (B, N, N) complex or a `LowRank`, e.g. R_blend. config.diag_loading * I is added first (loading
    is inference-only, SYSTEM.md §3; it shifts every eigenvalue equally, so it leaves MUSIC's
    eigenvectors unchanged and only matters to eigenvalue-based steps). n_sources_hat: (B,) int,
    clipped to 1..K_max. Returns `localization_metrics`.
    """
    if isinstance(covariance, LowRank):
        covariance = covariance.with_loading(config.diag_loading)
        device = covariance.factor.device
    else:
        covariance = covariance.to(torch.complex64)
        if config.diag_loading:
            eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype,
                            device=covariance.device)
            covariance = covariance + config.diag_loading * eye
        device = covariance.device
    k_hat = n_sources_hat.to(device=device, dtype=torch.long)
    k_hat = k_hat.clamp(1, config.max_sources)
    localization = music_localize(covariance, k_hat, deployment, config)
    return localization_metrics(localization, batch, k_hat, config=config)
