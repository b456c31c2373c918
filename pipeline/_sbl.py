"""Coded sparse Bayesian learning (SBL), the strongest classical reference (SYSTEM.md §5).

Snapshot l of a scene is y_l = Phi_l x_l + n_l with Phi_l = G diag(c_l). SBL models the field as
a sum over grid points g of a(p_g) s_{g,l}, s_{g,l} ~ CN(0, gamma_g) independent across
snapshots, with ONE set of grid powers gamma shared by all L snapshots; snapshot l sees it through
its own dictionary D_l = Phi_l A(grid) (the pursuit's coded dictionary, `coded_dictionary`), so

    y_l ~ CN(0, Sigma_l),   Sigma_l = D_l diag(gamma) D_l^H + sigma^2 I_M.

1. Evidence fixed point (multi-dictionary SBL, Nannuru et al. arXiv 1704.00436):
   gamma_g <- gamma_g * sum_l |d_lg^H Sigma_l^-1 y_l|^2 / sum_l d_lg^H Sigma_l^-1 d_lg,
   the stationarity condition of the likelihood in gamma_g; the noise sigma^2 is re-estimated
   each iteration from the residual outside the strongest peaks (Gerstoft et al., arXiv
   1602.09120). On the full grid, Sigma_l and the denominators are two real GEMMs of the scenes'
   gamma (resp. Sigma^-1) against one cached basis of the atoms' outer products; after
   `prune_after` iterations only the `n_kept` strongest grid points of each scene stay.
2. Candidates: the strongest local maxima of gamma on the grid.
3. Off-grid refinement by maximum likelihood, each source's power shared across snapshots: a
   source's gain is max_p sum_l [p q_l / (1 + p s_l) - log(1 + p s_l)], the drop in the negative
   log-likelihood sum_l (log det Sigma_l + y_l^H Sigma_l^-1 y_l) it buys with the others fixed
   (q_l = |d_l^H Q_l^-1 y_l|^2, s_l = d_l^H Q_l^-1 d_l, Q_l the model without it). A pattern
   search over a 3 x 3 x 3 stencil with a quadratic step (as in the pursuit) climbs it; a sweep
   lets each source jump to a kept grid point of higher gain, which repairs peaks that SBL split.
   With a given K, and after the count when `refine_counted`, `grid_sweeps` more let each
   source jump to any point of the whole grid, for scenes where SBL's pruning dropped the right
   point.
4. Count (when K is not given): start from max_sources refined candidates and drop the source of
   least gain while that gain is below count_threshold + count_slope * log10(P / sigma^2) nats
   (P the measurements' mean power, sigma^2 the current noise estimate), refining the rest after
   each drop. Then (refine_counted) the K_hat strongest peaks are refined again with K_hat
   sources active, as for a given K.

Every scene of a chunk runs together; the device is the measurements'.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from pipeline._config import ExperimentConfig, replace
from pipeline._errors import PipelineError
from pipeline._grid import MusicGrid, local_maxima, music_grid
from pipeline._linalg import squared_magnitude
from pipeline._metrics import Localization, localization_from_points
from pipeline._physics import Deployment
from pipeline._pursuit import _coded_atoms, coded_dictionary
from pipeline._refine import local_offsets, quadratic_step

_TINY = 1e-12
_STENCIL_POINTS = 3
_SHORTLIST = 32  # grid points per source that `_grid_jump` maximises over the power exactly
_JUMP_MARGIN = 1e-4  # nats a whole-grid jump must gain over staying


@dataclass(frozen=True, kw_only=True)
class SblSettings:
    """Knobs of coded SBL; defaults chosen on validation scenes (python -m bench sbl_tune, RESULTS.md)."""

    grid_step_deg: float = 3.0  # azimuth and elevation spacing of the SBL grid, degrees
    n_grid_range: int = 6  # SBL grid points in inverse range
    n_iterations: int = 25  # evidence fixed-point iterations in all
    prune_after: int = 4  # iterations on the full grid before pruning
    n_kept: int = 300  # grid points kept per scene after pruning
    refine_rounds: int = 8  # pattern-search rounds of the likelihood refinement
    count_threshold: float = 7.0  # nats: a source whose gain is below this is dropped ...
    count_slope: float = 6.0  # ... plus this many nats per decade of power / noise (est.)
    # Once counted, refine the K_hat strongest peaks again with only K_hat sources active, from
    # the same SBL powers (what n_sources=K_hat gives), instead of keeping the drop path's state:
    # +0.021 success on 2,000 medium validation scenes (RESULTS.md, "Probe: a learned count").
    refine_counted: bool = True
    # With a given K (so after the count when refine_counted), sweeps in which each source may
    # jump to any point of the whole grid where the likelihood is higher (`_grid_jump`), each
    # followed by the refinement of the scenes that moved: +0.008 success with SBL's own count
    # and +0.010 with the true K on 1,000 medium validation scenes with one sweep, nothing more
    # with two (RESULTS.md, "Session 13").
    grid_sweeps: int = 1

    def __post_init__(self) -> None:
        if not self.grid_step_deg > 0:
            raise ValueError(f"grid_step_deg must be > 0, but got {self.grid_step_deg=}")
        for name in ("n_grid_range", "n_iterations", "n_kept"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, but got {getattr(self, name)}")
        if not 0 <= self.prune_after <= self.n_iterations:
            raise ValueError(f"prune_after must be in 0..n_iterations, but got "
                             f"{self.prune_after=}")
        if self.grid_sweeps < 0:
            raise ValueError(f"grid_sweeps must be >= 0, but got {self.grid_sweeps=}")
        if self.refine_rounds < 0:
            raise ValueError(f"refine_rounds must be >= 0, but got {self.refine_rounds=}")


def sbl_grid_config(config: ExperimentConfig, settings: SblSettings) -> ExperimentConfig:
    """The config whose MUSIC grid is SBL's grid (same field of view, SBL's spacing)."""

    def points(half_width_deg: float) -> int:
        return max(1, round(2.0 * half_width_deg / settings.grid_step_deg) + 1)

    return replace(config, music_grid_azimuth=points(config.azimuth_max_deg),
                   music_grid_elevation=points(config.elevation_max_deg),
                   music_grid_range=settings.n_grid_range)


# key: ids of the grid's atoms; the value keeps them alive so that ids are not reused.
_BASIS_CACHE: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_BASIS_CACHE_SIZE = 2


def _upper(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(n, n, 1, device=device)
    return rows, cols


def _outer_basis(atoms_conj: torch.Tensor) -> torch.Tensor:
    """Real basis of the atoms' outer products d d^H: (L * M^2, n_grid) float32, cached.

    Per snapshot the M^2 rows are |d_m|^2 (M rows), then Re and Im of d_m conj(d_n) for m < n,
    so Sigma_l = sum_g gamma_g d_g d_g^H is basis @ gamma and sum_mn conj(d_m) S_mn d_n is the
    matching weighting of the basis for Hermitian S.
    """
    key = id(atoms_conj)
    cached = _BASIS_CACHE.get(key)
    if cached is not None:
        _BASIS_CACHE.move_to_end(key)
        return cached[1]
    atoms = atoms_conj.conj().resolve_conj()  # (L, M, G)
    rows, cols = _upper(atoms.shape[1], atoms.device)
    outer = atoms[:, rows, :] * atoms_conj[:, cols, :]  # d_m conj(d_n), (L, P, G)
    basis = torch.cat([squared_magnitude(atoms), outer.real, outer.imag], dim=1)
    basis = basis.reshape(-1, atoms.shape[-1]).contiguous()
    _BASIS_CACHE[key] = (atoms_conj, basis)
    while len(_BASIS_CACHE) > _BASIS_CACHE_SIZE:
        _BASIS_CACHE.popitem(last=False)
    return basis


def _hermitian_from_basis(flat: torch.Tensor, n_snap: int, n_meas: int, noise: torch.Tensor
                          ) -> torch.Tensor:
    """(b, L * M^2) basis coordinates -> (b, L, M, M) complex64 matrix, plus noise (b,) * I."""
    n_batch = flat.shape[0]
    flat = flat.view(n_batch, n_snap, n_meas * n_meas)
    n_pairs = n_meas * (n_meas - 1) // 2
    diag = flat[..., :n_meas] + noise[:, None, None]
    upper = torch.complex(flat[..., n_meas:n_meas + n_pairs], flat[..., n_meas + n_pairs:])
    rows, cols = _upper(n_meas, flat.device)
    matrix = torch.zeros(n_batch, n_snap, n_meas, n_meas, dtype=torch.complex64,
                         device=flat.device)
    matrix[..., rows, cols] = upper
    matrix[..., cols, rows] = upper.conj()
    index = torch.arange(n_meas, device=flat.device)
    matrix[..., index, index] = diag.to(torch.complex64)
    return matrix


def _basis_weights(inverse: torch.Tensor) -> torch.Tensor:
    """Hermitian (b, L, M, M) -> (b, L * M^2) with (weights @ basis)_g = sum_l d^H S_l d."""
    n_meas = inverse.shape[-1]
    rows, cols = _upper(n_meas, inverse.device)
    diag = torch.diagonal(inverse, dim1=-2, dim2=-1).real
    upper = inverse[..., rows, cols]
    return torch.cat([diag, 2.0 * upper.real, 2.0 * upper.imag], dim=-1).flatten(1)


def _inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of Hermitian positive definite matrices (..., M, M) via Cholesky.

    In float32 a strong source over a tiny noise floor can leave a matrix numerically
    indefinite; those get a diagonal load of 1e-6, then 1e-4, of their mean diagonal.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    for load in (1e-6, 1e-4):
        failed = info != 0
        if not failed.any():
            break
        scale = torch.diagonal(matrix, dim1=-2, dim2=-1).real.mean(-1)
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        loaded = matrix + (load * scale * failed)[..., None, None] * eye
        factor, info = torch.linalg.cholesky_ex(loaded)
    if (info != 0).any():
        raise PipelineError("coded SBL: a model covariance is not positive definite")
    return torch.cholesky_inverse(factor)


def _top_peaks(gamma: torch.Tensor, shape: tuple[int, int, int], n_peaks: int) -> torch.Tensor:
    """Flat grid indices (b, n_peaks) of the strongest local maxima of gamma (b, n_grid)."""
    volume = gamma.view(-1, *shape)
    peaks = local_maxima(volume).view(gamma.shape)
    return torch.where(peaks, gamma, -1.0).topk(n_peaks, dim=-1).indices


def _gather_atoms(dictionary: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Atoms (L, M, n_grid) at flat grid indices (b, n) -> (b, L, M, n)."""
    return dictionary[:, :, index].permute(2, 0, 1, 3)


def _residual_noise(y: torch.Tensor, atoms: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """sigma^2 = mean_l ||P_perp y_l||^2 / (M - K): the residual outside the K active atoms.

    y (b, L, M), atoms (b, L, M, K), active (b, K). Returns (b,) float32, floored at 1e-5 of
    the measurements' power. Two sources on one point make the normal equations singular, so
    they carry a small ridge (1e-4 of the mean diagonal), which leaves the residual as it is.
    """
    columns = atoms * active[:, None, None, :].to(atoms.dtype)
    gram = columns.conj().transpose(-2, -1) @ columns  # (b, L, K, K)
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1).real
    scale = diagonal.sum(-1, keepdim=True) / active.sum(-1).clamp_min(1)[:, None, None]
    unused = (1.0 - active.to(gram.real.dtype))[:, None, :]
    gram = gram + torch.diag_embed((unused + 1e-4) * scale.clamp_min(_TINY)).to(gram.dtype)
    rhs = columns.conj().transpose(-2, -1) @ y[..., None]
    amplitudes = torch.linalg.solve(gram, rhs)
    residual = y - (columns @ amplitudes).squeeze(-1)
    n_meas = y.shape[-1]
    dof = (n_meas - active.sum(-1)).clamp_min(1).to(torch.float32)
    power = squared_magnitude(y).mean(dim=(1, 2))
    noise = squared_magnitude(residual).sum(-1).mean(-1) / dof
    return torch.maximum(noise, 1e-5 * power)


def _sbl_powers(y: torch.Tensor, atoms_conj: torch.Tensor, grid: MusicGrid, n_peaks: int,
                settings: SblSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evidence iterations on one chunk.

    y (b, L, M) complex64. Returns gamma on the kept points (b, n_kept), their flat grid indices
    (b, n_kept), and the noise estimate (b,).
    """
    n_batch, n_snap, n_meas = y.shape
    n_grid = atoms_conj.shape[-1]
    basis = _outer_basis(atoms_conj)
    dictionary = atoms_conj.conj().resolve_conj()
    norms = squared_magnitude(atoms_conj).sum(1)  # (L, G)
    # Start: each point's power as a lone source would explain it, noise a tenth of the power.
    correlation = torch.bmm(y.transpose(0, 1), atoms_conj)  # (L, b, G)
    gamma = (squared_magnitude(correlation) / norms[:, None, :].square()).mean(0)
    power = squared_magnitude(y).mean(dim=(1, 2))
    noise = 0.1 * power
    kept = torch.arange(n_grid, device=y.device).expand(n_batch, n_grid)
    # The kept points' atoms (b, L, M, n_kept) once pruned, in the layouts the iterations use.
    packed = conj_atoms = adjoint = None
    for iteration in range(settings.n_iterations):
        if iteration == settings.prune_after and settings.n_kept < n_grid:
            gamma, order = gamma.topk(settings.n_kept, dim=-1)
            kept = order
            atoms = _gather_atoms(dictionary, kept)  # a permuted view
            # Fixed from here on: the matmuls' operand laid out once (each matmul would copy the
            # permuted view in every iteration), the conjugates materialised once. conj_atoms
            # keeps the view's layout on purpose: the denominator's sum then reduces in the same
            # order as before, so the results stay the same bit for bit.
            packed = atoms.contiguous()
            conj_atoms = atoms.conj().resolve_conj()
            adjoint = conj_atoms.transpose(-2, -1).contiguous()  # (b, L, n_kept, M)
        if packed is None:
            sigma = _hermitian_from_basis(gamma @ basis.T, n_snap, n_meas, noise)
            inverse = _inverse(sigma)
            denominator = _basis_weights(inverse) @ basis  # (b, G)
            weighted = (inverse @ y[..., None]).squeeze(-1)  # (b, L, M)
            numerator = squared_magnitude(
                torch.bmm(weighted.transpose(0, 1), atoms_conj)).sum(0)
        else:
            inverse = _inverse(_model_covariance(packed, gamma, noise, adjoint=adjoint))
            solved = inverse @ packed  # (b, L, M, n_kept)
            denominator = (conj_atoms * solved).real.sum(dim=(1, 2))
            weighted = (inverse @ y[..., None]).squeeze(-1)
            numerator = squared_magnitude(
                (weighted[..., None, :].conj() @ packed).squeeze(-2)).sum(1)
        gamma = gamma * numerator / denominator.clamp_min(_TINY)
        # Noise from the residual outside the strongest peaks (on the kept points' volume).
        full = gamma.new_zeros(n_batch, n_grid).scatter(1, kept, gamma)
        peaks = _top_peaks(full, grid.shape, n_peaks)  # (b, n_peaks)
        peak_atoms = _gather_atoms(dictionary, peaks)
        active = torch.ones(n_batch, n_peaks, dtype=torch.bool, device=y.device)
        noise = _residual_noise(y, peak_atoms, active)
    return gamma, kept, noise


def _model_covariance(atoms: torch.Tensor, power: torch.Tensor, noise: torch.Tensor, *,
                      adjoint: torch.Tensor | None = None) -> torch.Tensor:
    """Sigma_l = sum_k p_k d_k d_k^H + sigma^2 I.

    atoms (b, L, M, K), power (b, K), noise (b,) -> (b, L, M, M) complex64. `adjoint`: the
    atoms' conjugate transpose (b, L, K, M), if already materialised (the same values).
    """
    if adjoint is None:
        adjoint = atoms.conj().transpose(-2, -1)
    sigma = (atoms * power[:, None, None, :].to(atoms.dtype)) @ adjoint
    index = torch.arange(atoms.shape[2], device=atoms.device)
    sigma[..., index, index] += noise[:, None, None].to(sigma.dtype)
    return sigma


def _leave_one_out(atoms: torch.Tensor, power: torch.Tensor, noise: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q_k^-1 and Q_k^-1 y for every source k, Q_k the model without k.

    atoms (b, L, M, K), power (b, K) (0 where inactive), noise (b,), y (b, L, M).
    Returns (b, K, L, M, M) and (b, K, L, M).
    """
    n_sources = atoms.shape[-1]
    keep = 1.0 - torch.eye(n_sources, device=atoms.device)  # (K, K): row k drops source k
    powers = power[:, None, :] * keep  # (b, K, K)
    flat_atoms = atoms[:, None].expand(-1, n_sources, -1, -1, -1).flatten(0, 1)
    sigma = _model_covariance(flat_atoms, powers.flatten(0, 1), noise.repeat_interleave(n_sources))
    inverse = _inverse(sigma).view(atoms.shape[0], n_sources, *sigma.shape[1:])
    weighted = (inverse @ y[:, None, :, :, None]).squeeze(-1)
    return inverse, weighted


def _gains(inverse: torch.Tensor, weighted: torch.Tensor, candidates: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's likelihood gain and power against a model without it.

    inverse (P, L, M, M) = Q^-1, weighted (P, L, M) = Q^-1 y, candidates (P, S, L, M) coded atoms
    (or (1, S, L, M): the same candidates for every P, broadcast).
    Returns gain (P, S) in nats, max over p >= 0 of sum_l [p q_l/(1 + p s_l) - log(1 + p s_l)],
    and the maximising power (P, S).
    """
    solved = torch.einsum("plmn,psln->pslm", inverse, candidates)
    s = (candidates.conj() * solved).real.sum(-1)  # (P, S, L)
    q = squared_magnitude(torch.einsum("pslm,plm->psl", candidates.conj(), weighted))
    return _best_power(s, q)


def _best_power(s: torch.Tensor, q: torch.Tensor, dim: int = -1, steps: int = 6
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gain and power of `_gains` from s_l = d_l^H Q_l^-1 d_l and q_l = |d_l^H Q_l^-1 y_l|^2,
    float32 with the snapshots l along `dim`: the gain and the maximising power, `dim` summed.
    `steps`: fixed-point steps after the closed-form start (0: the start's gain, a lower bound)."""
    s = s.clamp_min(_TINY)
    # Start from the optimum for equal s_l, then fixed-point steps of the exact condition
    # sum_l q_l / (1 + p s_l)^2 = sum_l s_l / (1 + p s_l).
    p = ((q - s).sum(dim) / s.square().sum(dim)).clamp_min(0.0)
    for _ in range(steps):
        denominator = 1.0 + p.unsqueeze(dim) * s
        p = p * (q / denominator.square()).sum(dim) / (s / denominator).sum(dim)
    ps = p.unsqueeze(dim) * s
    gain = (p.unsqueeze(dim) * q / (1.0 + ps) - torch.log1p(ps)).sum(dim)
    return gain.clamp_min(0.0), p


def _refine(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor, noise: torch.Tensor,
            y: torch.Tensor, deployment: Deployment, grid: MusicGrid, n_rounds: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pattern search of every active source on its likelihood gain, the others fixed (Jacobi).

    points (b, K, 3), power (b, K), active (b, K), noise (b,). The stencil starts at +-1 grid step;
    a source whose best point is the centre (or that took the quadratic's step) halves its step.
    After each round the noise is re-estimated from the residual. Returns points, power, noise.
    """
    scene, slot = active.nonzero(as_tuple=True)
    if scene.numel() == 0 or n_rounds == 0:
        return points, power, noise
    offsets = local_offsets(_STENCIL_POINTS, points.device)
    middle = offsets.shape[0] // 2
    step = grid.step.expand(scene.numel(), 3).clone()
    for _ in range(n_rounds):
        atoms = _coded_atoms(points, deployment).permute(0, 2, 3, 1)  # (b, L, M, K)
        inverse, weighted = _leave_one_out(atoms, power * active, noise, y)
        inverse, weighted = inverse[scene, slot], weighted[scene, slot]
        centre = points[scene, slot]
        candidates = grid.clamp(centre[:, None, :] + offsets * step[:, None, :])
        local, local_power = _gains(inverse, weighted, _coded_atoms(candidates, deployment))
        value, best = local.max(dim=-1)
        moved = candidates.gather(1, best[:, None, None].expand(-1, 1, 3)).squeeze(1)
        moved_power = local_power.gather(1, best[:, None]).squeeze(1)
        newton = quadratic_step(local[:, None, :], best[:, None], _STENCIL_POINTS)[:, 0]
        proposal = grid.clamp(moved + newton * step)
        proposed, proposed_power = _gains(inverse, weighted,
                                          _coded_atoms(proposal[:, None, :], deployment))
        better = proposed[:, 0] > value
        moved = torch.where(better[:, None], proposal, moved)
        moved_power = torch.where(better, proposed_power[:, 0], moved_power)
        points = points.index_put((scene, slot), moved)
        power = power.index_put((scene, slot), moved_power)
        settled = (value <= local[:, middle]) | better
        step = torch.where(settled[:, None], step / 2.0, step)
        atoms = _coded_atoms(points, deployment).permute(0, 2, 3, 1)
        noise = _residual_noise(y, atoms, active)
    return points, power, noise


def _jump(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor, noise: torch.Tensor,
          y: torch.Tensor, deployment: Deployment, kept_points: torch.Tensor,
          kept_atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sweep over the sources in turn (Gauss-Seidel): each moves to the kept grid point of
    highest gain where that beats its own gain, the others fixed.

    kept_points (b, n_kept, 3) and kept_atoms (b, n_kept, L, M): the grid points SBL kept (or
    kept_atoms (1, n, L, M), candidates shared by every scene, broadcast by `_gains`).
    Returns points and power.
    """
    for k in range(points.shape[1]):
        if not active[:, k].any():
            continue
        atoms = _coded_atoms(points, deployment).permute(0, 2, 3, 1)
        others = power * active
        others[:, k] = 0.0
        sigma = _model_covariance(atoms, others, noise)
        inverse = _inverse(sigma)
        weighted = (inverse @ y[..., None]).squeeze(-1)
        own, own_power = _gains(inverse, weighted, atoms[..., k].unsqueeze(1))
        grid_gain, grid_power = _gains(inverse, weighted, kept_atoms)
        best_gain, best = grid_gain.max(-1)
        better = active[:, k] & (best_gain > own[:, 0])
        target = kept_points.gather(1, best[:, None, None].expand(-1, 1, 3)).squeeze(1)
        points[:, k] = torch.where(better[:, None], target, points[:, k])
        power[:, k] = torch.where(better, grid_power.gather(1, best[:, None]).squeeze(1),
                                  own_power[:, 0])
    return points, power


def _grid_jump(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor,
               noise: torch.Tensor, y: torch.Tensor, deployment: Deployment,
               dictionary: torch.Tensor, grid_points: torch.Tensor, norms: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_jump` with every point of the grid as a candidate, at a fraction of its cost.

    dictionary (L, M, G) coded atoms of the whole grid, grid_points (G, 3), norms (L, G) their
    squared norms. The model without source k is Q = sigma^2 I + B W B^H (B the other r active
    sources' atoms, W their powers). With B W^1/2 = U S V^H (thin SVD, r columns),
    Q^-1 = (I - U diag(w) U^H) / sigma^2, w_i = S_i^2 / (sigma^2 + S_i^2), so a candidate d has
    s_l = (||d||^2 - sum_i |w_i^1/2 U_i^H d|^2) / sigma^2 and q_l = |e^H d|^2 / sigma^4 with
    e = y - U diag(w) U^H y: r + 1 inner products of length M per candidate (one real GEMM with
    the dictionary per group of scenes), instead of an M x M solve. U is orthonormal and w in
    [0, 1], so float32 loses no more here than the solve does; s_l is floored at
    ||d||^2 / (sigma^2 + S_1^2), its exact lower bound. The power is maximised exactly on the
    `_SHORTLIST` points of highest gain at its closed-form start, not on all G. Scenes go in
    groups of equal source count, so that r is exact. A jump must gain `_JUMP_MARGIN` nats.
    Returns points and power; unlike `_jump`, a source that does not move keeps its power.
    """
    n_sources = power.shape[1]
    n_snap, n_meas, _ = dictionary.shape
    atoms = _coded_atoms(points, deployment)  # (b, K, L, M)
    stacked = torch.cat([dictionary.real, dictionary.imag], dim=1)  # (L, 2M, G)
    n_active = active.sum(-1)
    for k in range(n_sources):
        for count in n_active[active[:, k]].unique().tolist():
            scene = (active[:, k] & (n_active == count)).nonzero().squeeze(-1)
            rows, floor = _jump_rows(atoms[scene], (power * active)[scene], k, count - 1,
                                     noise[scene], y[scene])
            sigma = noise[scene]
            own_atom = atoms[scene, k].transpose(0, 1)[..., None]  # (L, n, M, 1)
            own = rows @ own_atom  # (L, n, r + 1, 1)
            own_s, own_q = _jump_terms(torch.stack([own.real, own.imag], 2),
                                       squared_magnitude(own_atom).sum(-2), sigma, floor)
            own_gain, _ = _best_power(own_s, own_q, dim=0)
            # Real GEMM: [Re; Im] of rows @ d from [[Re, -Im], [Im, Re]] @ [Re d; Im d].
            real = torch.cat([torch.cat([rows.real, -rows.imag], -1),
                              torch.cat([rows.imag, rows.real], -1)], -2)  # (L, n, 2(r+1), 2M)
            n_rows = rows.shape[-2]
            product = (real.reshape(n_snap, -1, 2 * n_meas) @ stacked).view(
                n_snap, scene.numel(), 2, n_rows, -1)
            grid_s, grid_q = _jump_terms(product, norms[:, None, :], sigma, floor)
            # The closed-form start ranks the grid; the fixed point runs on the best few only.
            start, _ = _best_power(grid_s, grid_q, dim=0, steps=0)
            shortlist = start.topk(min(_SHORTLIST, start.shape[-1]), dim=-1).indices
            index = shortlist[None].expand(n_snap, -1, -1)
            gain, best_power = _best_power(grid_s.gather(2, index), grid_q.gather(2, index),
                                           dim=0)
            best_gain, best = gain.max(-1)
            best_power = best_power.gather(1, best[:, None]).squeeze(1)
            best = shortlist.gather(1, best[:, None]).squeeze(1)
            # A jump must gain more than rounding: a source on a grid point would otherwise
            # "jump" onto itself, its own gain and the grid's computed in different orders.
            better = best_gain > own_gain[:, 0] + _JUMP_MARGIN
            # Only a jump changes a source: one that stays keeps its power as it came.
            points[scene, k] = torch.where(better[:, None], grid_points[best], points[scene, k])
            power[scene, k] = torch.where(better, best_power, power[scene, k])
            moved = scene[better]
            if moved.numel():
                atoms[moved, k] = _coded_atoms(points[moved, k], deployment)
    return points, power


def _jump_rows(atoms: torch.Tensor, power: torch.Tensor, k: int, rank: int, noise: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_grid_jump`'s rows for leaving source k out of n scenes with rank + 1 active sources:
    atoms (n, K, L, M), power (n, K) (0 where inactive), noise (n,), y (n, L, M).
    Returns rows (L, n, rank + 1, M) complex64, the first rank w_i^1/2 U_i^H, the last e^H, and
    floor (L, n), 1 / lambda_max(Q)."""
    others = power.clamp_min(0.0)
    others[:, k] = 0.0
    y = y.transpose(0, 1)  # (L, n, M)
    # The SVD runs in double: it is small (M x K), and float32 would blur a nearly collinear pair.
    weighted = atoms.permute(2, 0, 3, 1).to(torch.complex128)  # (L, n, M, K)
    weighted = weighted * others.sqrt()[:, None, :].to(weighted.dtype)
    basis, values, _ = torch.linalg.svd(weighted, full_matrices=False)
    basis = basis[..., :rank].to(y.dtype)  # U: the others' r directions (L, n, M, r)
    values = values[..., :rank].square().float()
    share = values / (noise[:, None] + values)  # w (L, n, r)
    floor = 1.0 / (noise + values.amax(-1)) if rank else (1.0 / noise).expand(y.shape[0], -1)
    adjoint = basis.transpose(-2, -1).conj()  # U^H (L, n, r, M)
    residual = y - (basis @ (share * (adjoint @ y[..., None]).squeeze(-1))[..., None]).squeeze(-1)
    rows = torch.cat([share.sqrt().to(y.dtype)[..., None] * adjoint,
                      residual.conj()[..., None, :]], dim=-2)
    return rows, floor


def _jump_terms(product: torch.Tensor, norm: torch.Tensor, noise: torch.Tensor,
                floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s_l and q_l of `_grid_jump` from rows d as (L, n, 2, r + 1, S) real (Re, Im) and ||d||^2
    (L, n or 1, S): each (L, n, S)."""
    explained = product[:, :, :, :-1].square().sum((2, 3))
    s = torch.maximum((norm - explained) / noise[:, None], norm * floor[..., None])
    return s, product[:, :, :, -1].square().sum(2) / noise[:, None].square()


def _source_gains(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor,
                  noise: torch.Tensor, y: torch.Tensor, deployment: Deployment) -> torch.Tensor:
    """Each active source's leave-one-out gain in nats (b, K); +inf where inactive."""
    atoms = _coded_atoms(points, deployment).permute(0, 2, 3, 1)  # (b, L, M, K)
    inverse, weighted = _leave_one_out(atoms, power * active, noise, y)
    own = atoms.permute(0, 3, 1, 2)  # (b, K, L, M)
    gain, _ = _gains(inverse.flatten(0, 1), weighted.flatten(0, 1), own.flatten(0, 1)[:, None])
    gain = gain.view(points.shape[:2])
    return torch.where(active, gain, math.inf)


@dataclass(frozen=True)
class _State:
    """A chunk's sources: points (b, k_max, 3), power and active (b, k_max), noise (b,)."""

    points: torch.Tensor
    power: torch.Tensor
    active: torch.Tensor
    noise: torch.Tensor


def _candidates(y: torch.Tensor, n_sources: torch.Tensor | None, deployment: Deployment,
                grid: MusicGrid, atoms_conj: torch.Tensor, k_max: int, settings: SblSettings,
                *, powers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> _State:
    """SBL, then the refined, swept candidates: n_sources of them, or k_max when None; with
    n_sources, then `settings.grid_sweeps` whole-grid sweeps (`_grid_sweep`).
    `powers`: SBL's (gamma, kept, noise) of these scenes, if already computed."""
    n_batch = y.shape[0]
    gamma, kept, noise = powers if powers is not None else _sbl_powers(
        y, atoms_conj, grid, k_max, settings)
    n_grid = atoms_conj.shape[-1]
    full = gamma.new_zeros(n_batch, n_grid).scatter(1, kept, gamma)
    peaks = _top_peaks(full, grid.shape, k_max)
    points = grid.point_at(peaks)  # (b, k_max, 3)
    power = full.gather(1, peaks)
    slots = torch.arange(k_max, device=y.device)
    if n_sources is None:
        active = torch.ones(n_batch, k_max, dtype=torch.bool, device=y.device)
    else:
        active = slots[None, :] < n_sources[:, None]
    power = power * active
    kept_points = grid.point_at(kept)
    dictionary = atoms_conj.conj().resolve_conj()
    kept_atoms = _gather_atoms(dictionary, kept).permute(0, 3, 1, 2)  # (b, n_kept, L, M)
    rounds = settings.refine_rounds
    points, power, noise = _refine(points, power, active, noise, y, deployment, grid, rounds)
    points, power = _jump(points, power, active, noise, y, deployment, kept_points, kept_atoms)
    points, power, noise = _refine(points, power, active, noise, y, deployment, grid, rounds)
    if n_sources is not None:
        for _ in range(settings.grid_sweeps):
            points, power, noise = _grid_sweep(points, power, active, noise, y, deployment,
                                               grid, dictionary, atoms_conj, rounds)
    return _State(points, power * active, active, noise)


def _grid_sweep(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor,
                noise: torch.Tensor, y: torch.Tensor, deployment: Deployment, grid: MusicGrid,
                dictionary: torch.Tensor, atoms_conj: torch.Tensor, rounds: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One whole-grid jump (`_grid_jump`), then the refinement of the scenes where a source
    moved; the other scenes come back as they went in, bit for bit."""
    everywhere = grid.point_at(torch.arange(dictionary.shape[-1], device=y.device))
    norms = squared_magnitude(atoms_conj).sum(1)  # (L, G)
    jumped, jumped_power = _grid_jump(points.clone(), power.clone(), active, noise, y,
                                      deployment, dictionary, everywhere, norms)
    moved = ((jumped != points).any(-1) & active).any(-1).nonzero().squeeze(-1)
    if moved.numel() == 0:
        return points, power, noise
    refined, refined_power, refined_noise = _refine(
        jumped[moved], jumped_power[moved], active[moved], noise[moved], y[moved], deployment,
        grid, rounds)
    points, power, noise = points.clone(), power.clone(), noise.clone()
    points[moved], power[moved], noise[moved] = refined, refined_power, refined_noise
    return points, power, noise


def _count(state: _State, y: torch.Tensor, deployment: Deployment, grid: MusicGrid,
           settings: SblSettings, *, path: list[tuple[_State, torch.Tensor, torch.Tensor]]
           | None = None) -> _State:
    """Drop the source of least gain while it is below the threshold; the rest are refined.

    A scene that keeps its weakest source stops there. With `path` given, every scene instead
    drops down to one source and each stage is appended as (state, weakest gain (b,),
    log10(P / sigma^2) (b,)): a scene's count under any threshold is then its first stage whose
    weakest gain clears it, the state this function returns for that threshold (a stopped
    scene is not touched again, and scenes do not interact). python -m bench sbl_tune tunes so.
    """
    points, power, active, noise = state.points, state.power, state.active, state.noise
    total = squared_magnitude(y).mean(dim=(1, 2))
    going = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    rounds = max(1, settings.refine_rounds // 4)
    for _ in range(active.shape[1]):
        gain = _source_gains(points, power, active, noise, y, deployment)
        weakest, slot = gain.min(-1)
        ratio = torch.log10(total / noise).clamp_min(0.0)
        if path is not None:
            path.append((_State(points, power * active, active, noise), weakest, ratio))
            drop = active.sum(-1) > 1
        else:
            threshold = settings.count_threshold + settings.count_slope * ratio
            drop = going & (weakest < threshold) & (active.sum(-1) > 1)
        going = drop
        if not drop.any():
            break
        active = active.clone()
        active[drop, slot[drop]] = False
        power = power * active
        moved, power_moved, noise_moved = _refine(points, power, active & drop[:, None], noise,
                                                  y, deployment, grid, rounds)
        points = torch.where(drop[:, None, None], moved, points)
        power = torch.where(drop[:, None], power_moved, power)
        noise = torch.where(drop, noise_moved, noise)
    return _State(points, power * active, active, noise)


def _stop_path(path: list[tuple[_State, torch.Tensor, torch.Tensor]], settings: SblSettings
               ) -> _State:
    """Each scene's stage on a full drop path (`_count` with `path`) where `settings`' count
    rule stops it: what `_count` returns for those settings."""
    first = path[0][0]
    points, power = first.points.clone(), first.power.clone()
    active, noise = first.active.clone(), first.noise.clone()
    decided = torch.zeros_like(noise, dtype=torch.bool)
    for state, weakest, ratio in path:
        threshold = settings.count_threshold + settings.count_slope * ratio
        stop = ~decided & ((weakest >= threshold) | (state.active.sum(-1) <= 1))
        points[stop], power[stop] = state.points[stop], state.power[stop]
        active[stop], noise[stop] = state.active[stop], state.noise[stop]
        decided |= stop
    return _State(points, power, active, noise)


def _localize_chunk(y: torch.Tensor, n_sources: torch.Tensor | None, deployment: Deployment,
                    grid: MusicGrid, atoms_conj: torch.Tensor, k_max: int,
                    settings: SblSettings) -> _State:
    """SBL, refinement and, without n_sources, the count (then, with `refine_counted`, the
    refinement again with the count's K_hat active); with n_sources given, or after the count
    with `refine_counted`, the whole-grid sweeps; on one chunk of scenes."""
    powers = _sbl_powers(y, atoms_conj, grid, k_max, settings)
    state = _candidates(y, n_sources, deployment, grid, atoms_conj, k_max, settings,
                        powers=powers)  # fmt: skip
    if n_sources is None:
        state = _count(state, y, deployment, grid, settings)
        if settings.refine_counted:
            state = _candidates(y, state.active.sum(-1), deployment, grid, atoms_conj, k_max,
                                settings, powers=powers)  # fmt: skip
    return state


def sparse_bayesian_learning(measurements: torch.Tensor, deployment: Deployment,
                             config: ExperimentConfig, *, n_sources: torch.Tensor | None = None,
                             settings: SblSettings | None = None, chunk_size: int = 32
                             ) -> Localization:
    """Coded SBL with likelihood refinement; its own count unless n_sources is given.

    measurements: (B, L, M) complex, the BS measurements of each scene (any scale).
    n_sources: None (SBL counts, rule of the module docstring) or (B,) int, the count to use,
    clipped to 0..config.max_sources.
    Returns a Localization with config.max_sources slots, the first K_hat valid, strongest first;
    `score` is each source's share of the measurement power, p_k mean_l ||Phi_l a_k||^2 /
    mean_l ||y_l||^2, clipped to [0, 1] (noise can push an estimate just above 1).
    Runs on the measurements' device, in float32 / complex64.
    """
    if measurements.ndim != 3:
        raise ValueError(f"measurements must be (B, L, M), but got {tuple(measurements.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, but got {chunk_size=}")
    settings = settings or SblSettings()
    k_max = config.max_sources
    device = measurements.device
    grid_config = sbl_grid_config(config, settings)
    grid = music_grid(grid_config, deployment)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    if n_sources is not None:
        n_sources = n_sources.to(device=device, dtype=torch.long).clamp(0, k_max)
    measurements = measurements.to(torch.complex64)
    states = []
    with torch.no_grad():
        for start in range(0, measurements.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            k_hat = None if n_sources is None else n_sources[part]
            state = _localize_chunk(measurements[part], k_hat, deployment, grid, atoms_conj,
                                    k_max, settings)
            states.append((state.points, state.power, state.active))
    return localization_of_states(states, measurements, deployment, k_max)


def localization_of_states(states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                           measurements: torch.Tensor, deployment: Deployment, k_max: int
                           ) -> Localization:
    """SBL's answer from its final sources, (points (b, K, 3), power (b, K), active (b, K)) per
    chunk of scenes in order: the active ones, strongest first, each scored by its share of the
    measurement power."""
    points, scores, masks = [], [], []
    start = 0
    for point, power, active in states:
        y = measurements[start:start + point.shape[0]]
        start += point.shape[0]
        energy = squared_magnitude(_coded_atoms(point, deployment)).sum(-1).mean(-1)
        total = squared_magnitude(y).sum(-1).mean(-1).clamp_min(_TINY)
        share = torch.where(active, power * energy / total[:, None], -1.0)
        share, order = share.sort(dim=1, descending=True)
        points.append(point.gather(1, order[..., None].expand(-1, -1, 3)))
        masks.append(share >= 0.0)
        scores.append(share.clamp(0.0, 1.0))
    return localization_from_points(points, masks, scores, k_max, measurements.device)
