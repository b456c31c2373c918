"""MUSIC (SYSTEM.md §5): signal subspaces, the spectrum on the search grid, localization.

MUSIC searches the exact spherical steering manifold over the search grid of `pipeline._grid`
(uniform in azimuth, elevation and inverse range):

1. Signal subspace: the K_hat strongest eigenvectors of each covariance (batched `eigh`).
2. Coarse spectrum: one complex GEMM of the cached grid steering matrix (n_grid x N) against the
   signal subspaces of a whole chunk of scenes stacked side by side (N x chunk*K_max). The score
   of a grid point is proj / N = ||E_s^H a||^2 / N in [0, 1]; the pseudo-spectrum
   1 / (1 - proj/N + eps) is a monotone function of it, so peaks are picked on the score.
3. Candidates: 3-D local maxima (a 3 x 3 x 3 max filter, i.e. max_pool3d-style non-maximum
   suppression, done separably) of the (range, elevation, azimuth) score volume; the best
   `K_hat + n_extra_candidates` of each scene go on.
4. Refinement (`pipeline._refine.refine_peaks`): `music_refine_steps` rounds of a local 3 x 3 x 3
   grid around every candidate (at half the coarse step, the step halving each round), all
   candidates of a chunk evaluated in one batched matmul. Each round also fits a quadratic to the
   3 x 3 x 3 block around its best point and centres the next round (or, after the last, a final
   check) on the fitted maximum: sub-step accuracy at no extra steering evaluations.
5. The K_hat best refined candidates (duplicates that converged onto one peak removed) are the
   estimates.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from pipeline._config import ExperimentConfig
from pipeline._covariance import LowRank, hermitian
from pipeline._data import SceneBatch
from pipeline._grid import MusicGrid, local_maxima, music_grid
from pipeline._linalg import eigh, squared_magnitude
from pipeline._metrics import Localization, localization_from_points, localization_metrics
from pipeline._physics import Deployment
from pipeline._refine import refine_peaks

_EPS = 1e-6


def _low_rank_eigenvectors(covariance: LowRank, k_max: int) -> torch.Tensor:
    """The k_max strongest eigenvectors of P P^H + c I, strongest first; (B, N, k_max).

    P = factor diag(sqrt(weight)). c I moves no eigenvector, and those of P P^H with non-zero
    eigenvalue lie in the span of P: with P = Q T (thin QR, Q orthonormal N x r),
    P P^H = Q (T T^H) Q^H, so the eigenvectors are Q times those of the r x r matrix T T^H.
    Orthonormal whatever the rank of P.
    """
    factor = covariance.weighted_factor().to(torch.complex64)
    n_elements, rank = factor.shape[-2:]
    if rank < k_max:  # pad with zero columns: QR still gives orthonormal Q of k_max columns
        factor = functional.pad(factor, (0, k_max - rank))
    if rank > n_elements:
        return signal_subspace(covariance.dense(), torch.full((len(covariance),), k_max),
                               k_max)
    q, t = torch.linalg.qr(factor)
    _, vectors = eigh(hermitian(t @ t.conj().transpose(-2, -1)))
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
        _, vectors = eigh(hermitian(covariance.to(torch.complex64)))
        strongest = vectors[..., -k_max:].flip(-1)
    keep = torch.arange(k_max, device=covariance.device)[None, :] < n_sources[:, None]
    return strongest * keep[:, None, :].to(strongest.dtype)


def _score_points(points: torch.Tensor, subspace: torch.Tensor, deployment: Deployment
                  ) -> torch.Tensor:
    """MUSIC score ||E_s^H a||^2 / N at points (P, n, 3) (az, el, 1/r) against subspaces
    (P, N, k_max); (P, n) float32."""
    steering = deployment.steering(points[..., 0], points[..., 1], 1.0 / points[..., 2])
    projection = torch.bmm(steering.conj(), subspace)  # (P, n, k_max)
    return squared_magnitude(projection).sum(-1) / steering.shape[-1]


def _coarse_scores(subspace: torch.Tensor, grid: MusicGrid) -> torch.Tensor:
    """Scores proj/N on the coarse grid; subspace (b, N, k_max) -> (b, n_r, n_el, n_az) float32.

    ONE GEMM for all scenes: (n_grid x N) @ (N x b*k_max), the scenes' subspaces side by side
    (columns beyond K_hat are zero and add nothing).
    """
    n_scenes, n_elements, k_max = subspace.shape
    stacked = subspace.permute(1, 0, 2).reshape(n_elements, n_scenes * k_max)
    projection = grid.steering_conj @ stacked  # (n_grid, b*k_max)
    score = squared_magnitude(projection).view(-1, n_scenes, k_max).sum(-1) / n_elements
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


def _localize_chunk(covariance: torch.Tensor, n_sources: torch.Tensor, deployment: Deployment,
                    grid: MusicGrid, k_max: int, n_extra: int, n_rounds: int,
                    seeds: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MUSIC on one chunk: (b, k_max, 3) points, (b, k_max) score, (b, k_max) bool mask."""
    device = covariance.device
    subspace = signal_subspace(covariance, n_sources, k_max)  # (b, N, k_max)

    volume = _coarse_scores(subspace, grid)  # (b, n_r, n_el, n_az)

    # Candidates: the K_hat + n_extra best 3-D local maxima of each scene.
    peaks = torch.where(local_maxima(volume), volume, -1.0).flatten(1)
    n_slots = max(k_max, min(k_max + n_extra, peaks.shape[1]))
    if n_slots > peaks.shape[1]:
        peaks = functional.pad(peaks, (0, n_slots - peaks.shape[1]), value=-1.0)
    values, flat = peaks.topk(n_slots, dim=1)  # (b, C)
    n_grid = grid.steering_conj.shape[0]
    flat = flat.clamp_max(n_grid - 1)  # padded slots point anywhere; they are invalid
    centres = grid.point_at(flat)  # (b, C, 3)
    rank = torch.arange(n_slots, device=device)[None, :]
    refine = (values >= 0.0) & (rank < (n_sources[:, None] + n_extra)) & (n_sources[:, None] > 0)
    if seeds is not None:  # more starting points, refined and ranked like the grid's own
        seed_points, seed_mask = seeds
        seed_values = torch.where(seed_mask, _score_points(seed_points, subspace, deployment),
                                  -1.0)
        centres = torch.cat([seed_points.to(centres.dtype), centres], 1)
        values = torch.cat([seed_values, values], 1)
        refine = torch.cat([seed_mask & (n_sources[:, None] > 0), refine], 1)
        n_slots = centres.shape[1]
        rank = torch.arange(n_slots, device=device)[None, :]

    # Refinement of the chosen candidates only, all of the chunk at once.
    scene_index, slot_index = refine.nonzero(as_tuple=True)
    chosen = subspace[scene_index]
    refined, refined_values = refine_peaks(
        centres[scene_index, slot_index],
        lambda points: _score_points(points, chosen, deployment), grid, n_rounds)
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


def music_localize(covariance: torch.Tensor | LowRank, n_sources: torch.Tensor,
                   deployment: Deployment, config: ExperimentConfig, *, chunk_size: int = 64,
                   n_extra_candidates: int = 3, seeds: Localization | None = None
                   ) -> Localization:
    """MUSIC localization of K_hat sources per scene (SYSTEM.md §5), on the covariance's device.

    covariance: (B, N, N) complex (Hermitian; any scale) or a `LowRank`. n_sources: (B,) int,
    K_hat per scene, clipped to 0..config.max_sources. Returns a Localization with
    K_max = config.max_sources slots, the first K_hat valid (fewer only if the spectrum has fewer
    local maxima), strongest peak first. Scenes are processed `chunk_size` at a time to bound
    memory; `n_extra_candidates` peaks beyond K_max are refined too, so that a true source whose
    coarse peak ranks just below a sidelobe is still found. `seeds` (a Localization of the same
    scenes, e.g. a model's own positions) adds its valid sources as starting points beside the
    grid's peaks: refined and ranked by the spectrum like them, so MUSIC keeps a seed only where
    the covariance peaks there, and finds a peak the coarse grid merges with a neighbour.
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
            chunk_seeds = None
            if seeds is not None:
                chunk_seeds = (seeds.points()[part].to(device), seeds.mask[part].to(device))
            chunk_points, chunk_score, chunk_mask = _localize_chunk(
                _rows(covariance, part), n_sources[part], deployment, grid, k_max,
                n_extra_candidates, config.music_refine_steps, chunk_seeds,
            )
            points.append(chunk_points)
            scores.append(chunk_score)
            masks.append(chunk_mask)
    return localization_from_points(points, masks, scores, k_max, device)


def evaluate_covariances(covariance: torch.Tensor | LowRank, n_sources_hat: torch.Tensor,
                         batch: SceneBatch, deployment: Deployment, config: ExperimentConfig,
                         *, seeds: Localization | None = None) -> dict[str, float]:
    """MUSIC on `covariance` with K_hat sources, scored against the batch's true sources.

    covariance: (B, N, N) complex or a `LowRank`, e.g. R_blend. config.diag_loading * I is added
    first (loading is inference-only, SYSTEM.md §3; it shifts every eigenvalue equally, so it
    leaves MUSIC's eigenvectors unchanged and only matters to eigenvalue-based steps).
    n_sources_hat: (B,) int, clipped to 1..K_max. `seeds`: as `music_localize`'s.
    Returns `localization_metrics`.
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
    localization = music_localize(covariance, k_hat, deployment, config, seeds=seeds)
    return localization_metrics(localization, batch, k_hat, config=config)
