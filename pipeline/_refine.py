"""Off-grid refinement on the search grid: local stencils, quadratic steps, MUSIC's peak rounds."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from pipeline._grid import MusicGrid

# Local grid points per dimension: each refinement round searches +-1 of its own step (3 points),
# the first at half the coarse step, i.e. +-1/2 coarse step: the coarse peak's own cell. A 5-point
# first round (+-1 coarse step) found the same peaks (success within 0.5 % on 300 scenes, R_true
# and R_samp, quick and full) at 2-2.5x the cost; a third 3-point round buys more accuracy than
# it did, for less (python -m bench localize).
_FIRST_ROUND_POINTS = 3
_LATER_ROUND_POINTS = 3


def local_offsets(n_points: int, device: torch.device) -> torch.Tensor:
    """The n x n x n stencil in units of the step, (n^3, 3) float32, row-major (az, el, u)."""
    ticks = torch.arange(n_points, dtype=torch.float32, device=device)
    ticks = ticks - (n_points - 1) / 2
    mesh = torch.meshgrid(ticks, ticks, ticks, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


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


def quadratic_step(local: torch.Tensor, best: torch.Tensor, n_points: int) -> torch.Tensor:
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


def refine_peaks(centres: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor],
                 grid: MusicGrid, n_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local refinement of candidate peaks (P, 3) (az, el, 1/r) of a score.

    score: points (P, n, 3) -> (P, n) float32, candidate p's score at its n points.
    Each round halves the step and scores a local stencil around the current position
    (_FIRST_ROUND_POINTS a side in the first round, _LATER_ROUND_POINTS later), all candidates in
    one call; a quadratic fit to the 3 x 3 x 3 block around the best point proposes a sub-step
    position, on which the next round is centred. Returns positions (P, 3) and scores (P,).
    """
    step = grid.step
    proposal = centres
    values = score(centres[:, None, :])[:, 0]
    for round_index in range(n_rounds):
        n_points = _FIRST_ROUND_POINTS if round_index == 0 else _LATER_ROUND_POINTS
        step = step / 2.0
        offsets = local_offsets(n_points, centres.device)
        # The stencil is shifted inwards at the edge of the search box rather than clamped point
        # by point, so that its points keep the spacing the quadratic fit assumes.
        reach = step * ((n_points - 1) / 2)
        centre = torch.maximum(torch.minimum(proposal, grid.upper - reach), grid.lower + reach)
        points = grid.clamp(centre[:, None, :] + offsets * step)  # (P, n^3, 3)
        local = score(points)  # (P, n^3)
        values, best = local.max(dim=-1)
        centres = points.gather(1, best[:, None, None].expand(-1, 1, 3)).squeeze(1)
        proposal = grid.clamp(centres + quadratic_step(local, best, n_points) * step)
    if n_rounds:
        # The last proposal replaces the best stencil point where it scores higher.
        proposed = score(proposal[:, None, :])[:, 0]
        better = proposed > values
        centres = torch.where(better[:, None], proposal, centres)
        values = torch.where(better, proposed, values)
    return centres, values
