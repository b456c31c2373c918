"""Classical matching pursuit in the measurement domain (SYSTEM.md §4b and §5, a reference).

The measurements of one scene are y_l = Phi_l x_l + n_l with x_l = sum_k a(p_k) s_{k,l}, so a
source at p contributes the coded atom d_l(p) = Phi_l a(p) = G diag(c_l) a(p) to snapshot l with
its own unknown amplitude s_{k,l} in every snapshot. Orthogonal matching pursuit over that
dictionary:

1. Dictionary: the coded atoms of the MUSIC coarse grid (`pipeline._grid.music_grid`: uniform
   in azimuth, elevation and inverse range), (L, M, n_grid), built once per config and device.
2. Greedy steps, K_hat per scene: the atom that explains most residual energy,
   sum_l |d_l^H r_l|^2 / ||d_l||^2 (each snapshot's amplitude fitted freely), joins the support;
   then every picked atom is refitted by per-snapshot least squares on the measurements and the
   residual recomputed (the "orthogonal" step).
3. Off-grid refinement: `music_refine_steps + 5` rounds of a pattern search in which each
   picked atom scores a 3 x 3 x 3 stencil around itself (first at the grid step, halving once it
   stops moving) with the other picked atoms projected out, plus a quadratic fit as in MUSIC's
   refinement; all atoms of a chunk of scenes are scored together.
   This is the continuous counterpart of the refitting: without it the grid step (2 deg) would be
   the accuracy floor.

All scenes of a chunk run together; nothing here loops over scenes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from pipeline._config import ExperimentConfig
from pipeline._grid import MusicGrid, music_grid
from pipeline._linalg import squared_magnitude
from pipeline._metrics import Localization, localization_from_points
from pipeline._physics import Deployment
from pipeline._refine import local_offsets, quadratic_step

_STENCIL_POINTS = 3
# Rounds beyond MUSIC's music_refine_steps: MUSIC's first round is a 5-point stencil at half the
# grid step; here 3-point rounds start at the grid step, and a moving atom keeps its step, so a few
# more rounds buy the same reach and precision at less cost per round.
_EXTRA_ROUNDS = 5
_TINY = 1e-12

# key: ids of the grid and the operator; the value keeps both alive so that ids are not reused.
_DICTIONARY_CACHE: OrderedDict[tuple[int, int], tuple] = OrderedDict()
_DICTIONARY_CACHE_SIZE = 2


def coded_dictionary(config: ExperimentConfig, deployment: Deployment
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The coded atoms of the MUSIC coarse grid, conjugated, and their squared norms.

    Returns (L, M, n_grid) complex64 conj(Phi_l a(p_g)) and (L, n_grid) float32 ||Phi_l a(p_g)||^2,
    grid points in the order of `music_grid` (range, elevation, azimuth row-major). Cached.
    """
    grid = music_grid(config, deployment)
    key = (id(grid), id(deployment.operator))
    cached = _DICTIONARY_CACHE.get(key)
    if cached is not None:
        _DICTIONARY_CACHE.move_to_end(key)
        return cached[2], cached[3]
    # conj(Phi_l a) = conj(Phi_l) conj(a): (L, M, N) @ (N, n_grid).
    atoms_conj = deployment.operator.conj() @ grid.steering_conj.T
    norms = squared_magnitude(atoms_conj).sum(1)
    _DICTIONARY_CACHE[key] = (grid, deployment.operator, atoms_conj, norms)
    while len(_DICTIONARY_CACHE) > _DICTIONARY_CACHE_SIZE:
        _DICTIONARY_CACHE.popitem(last=False)
    return atoms_conj, norms


def _coded_atoms(points: torch.Tensor, deployment: Deployment) -> torch.Tensor:
    """Phi_l a(p) at points (..., 3) (az, el, 1/r); (..., L, M) complex64 for float32 points."""
    steering = deployment.steering(points[..., 0], points[..., 1], 1.0 / points[..., 2])
    n_snap, n_meas, n_elements = deployment.operator.shape
    operator = deployment.operator.to(steering.dtype)
    flat = steering.reshape(-1, n_elements) @ operator.reshape(n_snap * n_meas, n_elements).T
    return flat.reshape(*points.shape[:-1], n_snap, n_meas)


def _least_squares(atoms: torch.Tensor, measurements: torch.Tensor, active: torch.Tensor
                   ) -> torch.Tensor:
    """Per-snapshot amplitudes of the active atoms: argmin ||y_l - B_l s_l||.

    atoms: (b, L, M, K) complex, measurements (b, L, M), active (b, K) bool (inactive columns are
    ignored and get amplitude 0). Returns (b, L, K) complex.
    """
    weight = active.to(atoms.real.dtype)[:, None, None, :]
    columns = atoms * weight
    gram = columns.conj().transpose(-2, -1) @ columns  # (b, L, K, K)
    ridge = (1.0 - active.to(gram.real.dtype))[:, None, :]  # 1 on unused diagonals
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1, keepdim=True).clamp_min(_TINY)
    gram = gram + torch.diag_embed((ridge + 1e-9) * scale).to(gram.dtype)
    rhs = columns.conj().transpose(-2, -1) @ measurements[..., None]
    return torch.linalg.solve(gram, rhs).squeeze(-1)


def _greedy(measurements: torch.Tensor, n_sources: torch.Tensor, deployment: Deployment,
            grid: MusicGrid, atoms_conj: torch.Tensor, norms: torch.Tensor, k_max: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP on the grid: (b, k_max, 3) picked points (az, el, 1/r) and (b, k_max) active mask."""
    n_batch = measurements.shape[0]
    device = measurements.device
    residual = measurements
    # Unused slots hold the centre of the search box, a valid point (1/r = 0 would give NaN atoms).
    picked = (0.5 * (grid.lower + grid.upper)).expand(n_batch, k_max, 3).clone()
    atoms = torch.zeros(n_batch, *measurements.shape[1:], k_max, dtype=measurements.dtype,
                        device=device)
    active = torch.zeros(n_batch, k_max, dtype=torch.bool, device=device)
    inv_norms = 1.0 / norms.clamp_min(_TINY)
    for step in range(k_max):
        going = (n_sources > step).nonzero().squeeze(-1)  # only scenes still picking
        if going.numel() == 0:
            break
        # All snapshots in one batched GEMM: (L, b', M) @ (L, M, n_grid).
        correlation = torch.bmm(residual[going].transpose(0, 1), atoms_conj)
        score = (squared_magnitude(correlation) * inv_norms[:, None, :]).sum(0)
        flat = score.argmax(-1)
        picked[going, step] = grid.point_at(flat)
        atoms[going, ..., step] = atoms_conj[:, :, flat].permute(2, 0, 1).conj()
        active[going, step] = True
        amplitudes = _least_squares(atoms[going], measurements[going], active[going])
        residual = residual.index_put(
            (going,), measurements[going] - (atoms[going] @ amplitudes[..., None]).squeeze(-1))
    return picked, active


def _projected_scores(candidates: torch.Tensor, others: torch.Tensor, others_active: torch.Tensor,
                      measurements: torch.Tensor, deployment: Deployment) -> torch.Tensor:
    """Energy a candidate explains once the other atoms are projected out.

    candidates (P, S, 3) points; others (P, L, M, K) coded atoms of the other picked sources with
    others_active (P, K); measurements (P, L, M). Returns (P, S) float32:
    sum_l |d_l^H P_l y_l|^2 / ||P_l d_l||^2, P_l the projector orthogonal to the others.
    """
    weight = others_active.to(others.real.dtype)[:, None, None, :]
    columns = others * weight  # (P, L, M, K)
    gram = columns.conj().transpose(-2, -1) @ columns
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1, keepdim=True).clamp_min(_TINY)
    unused = (1.0 - others_active.to(gram.real.dtype))[:, None, :]
    gram = gram + torch.diag_embed((unused + 1e-6) * scale).to(gram.dtype)
    # P y = y - B G^-1 B^H y
    coeff = torch.linalg.solve(gram, columns.conj().transpose(-2, -1) @ measurements[..., None])
    orthogonal_y = measurements - (columns @ coeff).squeeze(-1)  # (P, L, M)

    atoms = _coded_atoms(candidates, deployment)  # (P, S, L, M)
    correlation = torch.einsum("pslm,plm->psl", atoms.conj(), orthogonal_y)
    overlap = torch.einsum("plmk,pslm->pslk", columns.conj(), atoms)  # B^H d
    solved = torch.einsum("plkj,pslj->pslk", torch.linalg.inv(gram), overlap)  # G^-1 B^H d
    projected = (overlap.conj() * solved).real.sum(-1)  # d^H B G^-1 B^H d, (P, S, L)
    energy = squared_magnitude(atoms).sum(-1)  # ||d||^2
    residual_norm = (energy - projected).clamp_min(1e-3 * energy)
    return (squared_magnitude(correlation) / residual_norm).sum(-1)


def _refine(picked: torch.Tensor, active: torch.Tensor, measurements: torch.Tensor,
            deployment: Deployment, grid: MusicGrid, n_rounds: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local off-grid search of every picked atom with the others projected out.

    Each round scores a 3 x 3 x 3 stencil around every atom (all atoms of
    the chunk in one batch), at first +-1 grid step; the atom moves to the best stencil point, or
    to the maximum of a quadratic fitted to the stencil where that scores higher (as MUSIC's
    refinement does). An atom that stayed at the centre, or took the quadratic's step, halves its
    step; one that moved to the stencil's edge keeps it (a pattern search). Atoms move together
    (Jacobi), each given the others' positions at the start of the round.
    picked (b, k_max, 3), active (b, k_max). Returns refined points (b, k_max, 3) and each atom's
    explained energy (b, k_max) (0 where inactive).
    """
    n_batch, k_max, _ = picked.shape
    energy = torch.zeros(n_batch, k_max, device=picked.device)
    scene, slot = active.nonzero(as_tuple=True)
    if scene.numel() == 0:
        return picked, energy
    slots = torch.arange(k_max, device=picked.device)
    others_active = active[scene] & (slots[None, :] != slot[:, None])
    y = measurements[scene]
    offsets = local_offsets(_STENCIL_POINTS, picked.device)
    middle = offsets.shape[0] // 2  # the stencil's centre point
    step = grid.step.expand(scene.numel(), 3).clone()  # per atom: +-1 grid cell at first
    for _ in range(n_rounds):
        others = _coded_atoms(picked, deployment)[scene].permute(0, 2, 3, 1)  # (P, L, M, k)
        # Points beyond the search box are clamped onto it (the centre is not shifted inwards:
        # a source at the box's edge must stay reachable). The quadratic fit may then see
        # uneven spacing, but its proposal is only taken where it scores higher.
        centre = picked[scene, slot]
        points = grid.clamp(centre[:, None, :] + offsets * step[:, None, :])  # (P, 27, 3)
        local = _projected_scores(points, others, others_active, y, deployment)  # (P, 27)
        value, best = local.max(dim=-1)
        moved = points.gather(1, best[:, None, None].expand(-1, 1, 3)).squeeze(1)
        newton = quadratic_step(local[:, None, :], best[:, None], _STENCIL_POINTS)[:, 0]
        proposal = grid.clamp(moved + newton * step)
        proposed = _projected_scores(proposal[:, None, :], others, others_active, y,
                                     deployment)[:, 0]
        better = proposed > value
        moved = torch.where(better[:, None], proposal, moved)
        picked = picked.index_put((scene, slot), moved)
        # Pattern search: an atom whose best point was the stencil's centre narrows its step;
        # one still moving keeps it, so a peak more than a step away is followed, not lost.
        # (No gain over the centre counts as settled: clamped points can duplicate it.)
        settled = (value <= local[:, middle]) | better
        step = torch.where(settled[:, None], step / 2.0, step)
    others = _coded_atoms(picked, deployment)[scene].permute(0, 2, 3, 1)
    values = _projected_scores(picked[scene, slot][:, None, :], others, others_active, y,
                               deployment)[:, 0]
    return picked, energy.index_put((scene, slot), values)


def matching_pursuit(measurements: torch.Tensor, n_sources: torch.Tensor, deployment: Deployment,
                     config: ExperimentConfig, *, chunk_size: int = 32) -> Localization:
    """Orthogonal matching pursuit of K_hat sources per scene over the coded dictionary.

    measurements: (B, L, M) complex, the BS measurements of each scene (any scale).
    n_sources: (B,) int, K_hat per scene, clipped to 0..config.max_sources.
    Returns a Localization with config.max_sources slots, the first K_hat valid, ordered by the
    energy each source explains (strongest first); `score` is that energy as a share of ||y||^2.
    """
    if measurements.ndim != 3:
        raise ValueError(f"measurements must be (B, L, M), but got {tuple(measurements.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, but got {chunk_size=}")
    k_max = config.max_sources
    device = measurements.device
    grid = music_grid(config, deployment)
    atoms_conj, norms = coded_dictionary(config, deployment)
    n_sources = n_sources.to(device=device, dtype=torch.long).clamp(0, k_max)
    measurements = measurements.to(torch.complex64)
    points, scores, masks = [], [], []
    with torch.no_grad():
        for start in range(0, measurements.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            y, k_hat = measurements[part], n_sources[part]
            picked, active = _greedy(y, k_hat, deployment, grid, atoms_conj, norms, k_max)
            picked, energy = _refine(picked, active, y, deployment, grid,
                                     config.music_refine_steps + _EXTRA_ROUNDS)
            total = squared_magnitude(y).sum(dim=(1, 2)).clamp_min(_TINY)
            share = torch.where(active, energy / total[:, None], -1.0)
            share, order = share.sort(dim=1, descending=True)
            points.append(picked.gather(1, order[..., None].expand(-1, -1, 3)))
            masks.append(share >= 0.0)
            scores.append(share.clamp_min(0.0))
    return localization_from_points(points, masks, scores, k_max, device)
