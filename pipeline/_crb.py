"""The Cramer-Rao bound of the RIS-coded measurement model (SYSTEM.md §2 and §5).

Model. Snapshot l sees y_l = Phi_l A s_l + n_l with Phi_l = G diag(c_l) (M x N, the real channel
and code), A = [a(p_1) ... a(p_K)] the exact spherical steering vectors, stochastic symbols
s_l ~ CN(0, P), P = diag(p_1..p_K) (the sources are uncorrelated), and n_l ~ CN(0, sigma^2 I_M).
The snapshots are independent but not identically distributed (each has its own code), so the
stacked measurement vector is zero-mean Gaussian with the block-diagonal covariance
blkdiag(R_1, ..., R_L), R_l = Phi_l A P A^H Phi_l^H + sigma^2 I_M.

Fisher information (Slepian-Bangs, for a zero-mean circular Gaussian):
    J_ij = sum_l Re tr(R_l^-1 dR_l/dtheta_i R_l^-1 dR_l/dtheta_j),
with analytic derivatives of the exact spherical steering vector with respect to azimuth (rad),
elevation (rad) and range (m).

Unknowns. theta = (azimuth, elevation, range of every source; the K source powers; the noise
variance). Two bounds are offered:
- "joint" (the default, the one the evaluation reports): every one of those is unknown. The bound
  of source k's location is the matching diagonal of the inverse of the whole (4K+1)-square
  Fisher matrix, so it is the bound of source k *given the others present*, their positions,
  powers and the noise level being estimated alongside. The symbols' correlations are known to be
  zero (P diagonal), as the simulator has it.
- "known_nuisance": the other sources' positions, all powers and the noise variance are known;
  only source k's own (azimuth, elevation, range) is estimated: the inverse of its 3 x 3 block.
  Never larger than "joint" (less to estimate), so a looser comparison for an estimator.

SNR. The simulator sets sigma^2 per scene from the realised signal power of that scene's
measurements; the bound uses its expectation, sigma^2 = mean_l sum_k p_k ||Phi_l a_k||^2 / M
divided by 10^(snr_db/10), which differs from the realised one by a few per cent.

Everything here runs in float64 / complex128 on the caller's device.
"""

from __future__ import annotations

from typing import Literal

import torch

from pipeline._config import ExperimentConfig
from pipeline._data import SceneBatch
from pipeline._physics import coded_operator, element_positions, source_positions

Nuisance = Literal["joint", "known_nuisance"]
NUISANCE_MODES = ("joint", "known_nuisance")
LOCATION_PARAMETERS = ("azimuth_rad", "elevation_rad", "range_m")
_CHUNK = 32  # scenes per Fisher evaluation: (chunk, L, 4K+1, M, M) complex128, ~50 MB at K = 5


def steering_with_derivatives(azimuth_rad: torch.Tensor, elevation_rad: torch.Tensor,
                              range_m: torch.Tensor, elements: torch.Tensor, wavenumber: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact spherical steering vectors and their derivatives, in complex128.

    a_n(p) = exp(-j k0 (|p - e_n| - |p|)), p = r (cos el cos az, cos el sin az, sin el).
    d a_n / d xi = -j k0 ((p - e_n) . dp/dxi / |p - e_n| - u . dp/dxi) a_n, u = p / r.
    Inputs (...) float; elements (N, 3). Returns a (..., N) and da (..., 3, N), the derivative
    axis ordered (azimuth rad, elevation rad, range m).
    """
    azimuth, elevation, range_m = (t.to(torch.float64) for t in (azimuth_rad, elevation_rad,
                                                                  range_m))
    elements = elements.to(device=azimuth.device, dtype=torch.float64)
    unit = source_positions(azimuth, elevation, torch.ones_like(range_m))  # (..., 3)
    position = unit * range_m[..., None]
    cos_az, sin_az = torch.cos(azimuth), torch.sin(azimuth)
    cos_el, sin_el = torch.cos(elevation), torch.sin(elevation)
    zero = torch.zeros_like(azimuth)
    d_position = torch.stack([
        torch.stack([-range_m * cos_el * sin_az, range_m * cos_el * cos_az, zero], dim=-1),
        torch.stack([-range_m * sin_el * cos_az, -range_m * sin_el * sin_az,
                     range_m * cos_el], dim=-1),
        unit,
    ], dim=-2)  # (..., 3 parameters, 3 coordinates)
    offset = position[..., None, :] - elements  # (..., N, 3)
    distance = torch.linalg.norm(offset, dim=-1)  # (..., N)
    phase = -wavenumber * (distance - range_m[..., None])
    steering = torch.polar(torch.ones_like(phase), phase)
    d_distance = torch.einsum("...nc,...pc->...pn", offset, d_position) / distance[..., None, :]
    d_range = torch.einsum("...c,...pc->...p", unit, d_position)  # d|p|/dxi: 0, 0, 1
    d_phase = -wavenumber * (d_distance - d_range[..., None])
    return steering, 1j * d_phase * steering[..., None, :]


def stochastic_fisher(operator: torch.Tensor, steering: torch.Tensor, derivatives: torch.Tensor,
                      power: torch.Tensor, noise_variance: torch.Tensor) -> torch.Tensor:
    """Fisher information of the stochastic model y_l = Phi_l A s_l + n_l (Slepian-Bangs).

    operator: (L, M, N) complex, Phi_l per snapshot. steering: (B, K, N) complex, a(p_k).
    derivatives: (B, K, D, N) complex, d a(p_k) / d xi_{k,d} for D location parameters per source.
    power: (B, K) float, p_k > 0. noise_variance: (B,) float, sigma^2 > 0.
    Returns (B, K*D + K + 1, K*D + K + 1) float64, parameters ordered source-major
    (xi_{1,1..D}, xi_{2,1..D}, ...), then the powers p_1..p_K, then sigma^2.
    """
    operator = operator.to(torch.complex128)
    steering = steering.to(torch.complex128)
    derivatives = derivatives.to(torch.complex128)
    power = power.to(torch.float64)
    noise_variance = noise_variance.to(torch.float64)
    n_batch, n_sources, n_loc, _ = derivatives.shape
    n_snap, n_meas, _ = operator.shape
    coded = torch.einsum("lmn,bkn->blmk", operator, steering)  # Phi_l a_k, (B, L, M, K)
    d_coded = torch.einsum("lmn,bkdn->blkdm", operator, derivatives)  # (B, L, K, D, M)
    eye = torch.eye(n_meas, dtype=torch.complex128, device=operator.device)
    covariance = (coded * power[:, None, None, :]) @ coded.conj().transpose(-2, -1)
    covariance = covariance + noise_variance[:, None, None, None] * eye
    inverse = torch.linalg.inv(covariance)  # (B, L, M, M)

    # dR/dxi_{k,d} = p_k (d b_{k,d} b_k^H + b_k d b_{k,d}^H), b_k = Phi_l a_k.
    b = coded.permute(0, 1, 3, 2)  # (B, L, K, M)
    outer = d_coded[..., :, None] * b.conj()[:, :, :, None, None, :]  # (B, L, K, D, M, M)
    d_location = power[:, None, :, None, None, None] * (outer + outer.conj().transpose(-2, -1))
    d_location = d_location.reshape(n_batch, n_snap, n_sources * n_loc, n_meas, n_meas)
    d_power = b[..., :, None] * b.conj()[..., None, :]  # (B, L, K, M, M)
    d_noise = eye.expand(n_batch, n_snap, 1, n_meas, n_meas)
    derivative = torch.cat([d_location, d_power, d_noise], dim=2)  # (B, L, P, M, M)

    # J_ij = sum_l Re tr(Q_i Q_j), Q_i = R_l^-1 dR/dtheta_i; tr(Q_i Q_j) = sum_ab Q_i[a,b] Q_j[b,a].
    q = inverse[:, :, None] @ derivative  # (B, L, P, M, M)
    n_params = q.shape[2]
    flat = q.reshape(n_batch * n_snap, n_params, n_meas * n_meas)
    flat_t = q.transpose(-2, -1).reshape(n_batch * n_snap, n_params, n_meas * n_meas)
    fisher = (flat @ flat_t.transpose(-2, -1)).real.reshape(n_batch, n_snap, n_params, n_params)
    fisher = fisher.sum(1)
    return 0.5 * (fisher + fisher.transpose(-2, -1))


def bound_from_fisher(fisher: torch.Tensor, n_sources: int, n_location: int,
                      nuisance: Nuisance = "joint") -> torch.Tensor:
    """Location variances from a Fisher matrix laid out as `stochastic_fisher` returns it.

    fisher: (B, P, P) float64 with P = n_sources * n_location + n_sources + 1.
    Returns (B, n_sources, n_location) float64 variances; +inf where the matrix is singular
    (a parameter the measurements cannot pin down).
    """
    if nuisance not in NUISANCE_MODES:
        raise ValueError(f"nuisance must be one of {NUISANCE_MODES}, but got {nuisance=}")
    n_batch = fisher.shape[0]
    n_loc_params = n_sources * n_location
    if nuisance == "joint":
        matrix = fisher
    else:  # each source's own block, everything else known
        blocks = fisher[:, :n_loc_params, :n_loc_params].reshape(
            n_batch, n_sources, n_location, n_sources, n_location)
        index = torch.arange(n_sources, device=fisher.device)
        matrix = blocks[:, index, :, index, :].permute(1, 0, 2, 3)  # (B, K, D, D)
    # Equilibrate before inverting: the parameters' units differ by orders of magnitude.
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).clamp_min(1e-300).rsqrt()
    scaled = matrix * scale[..., :, None] * scale[..., None, :]
    inverse, info = torch.linalg.inv_ex(scaled)
    variance = torch.diagonal(inverse, dim1=-2, dim2=-1) * scale.square()
    bad = (info != 0)[..., None] | ~torch.isfinite(variance) | (variance <= 0)
    variance = torch.where(bad, torch.full_like(variance, float("inf")), variance)
    if nuisance == "joint":
        return variance[:, :n_loc_params].reshape(n_batch, n_sources, n_location)
    return variance


def expected_noise_variance(coded: torch.Tensor, power: torch.Tensor, snr_db: torch.Tensor
                            ) -> torch.Tensor:
    """sigma^2 of SYSTEM.md §2 in expectation: mean signal power per measurement over the SNR.

    coded: (B, L, M, K) complex, Phi_l a_k. power: (B, K) float. snr_db: (B,).
    E|y_lm|^2 (noise-free) averaged over l and m is sum_k p_k ||Phi_l a_k||^2 / M averaged over l.
    Returns (B,) float64.
    """
    energy = coded.abs().square().sum(-2).to(torch.float64)  # ||Phi_l a_k||^2, (B, L, K)
    signal = (energy * power.to(torch.float64)[:, None, :]).sum(-1).mean(-1) / coded.shape[-2]
    return signal / 10.0 ** (snr_db.to(torch.float64) / 10.0)


@torch.no_grad()
def cramer_rao_bound(batch: SceneBatch, config: ExperimentConfig, *,
                     nuisance: Nuisance = "joint") -> torch.Tensor:
    """CRB of every true source of a batch: (B, K_max, 3) float64 variances, on the batch's device.

    The last axis is (azimuth rad^2, elevation rad^2, range m^2); masked slots are NaN. Each scene
    is bounded at its own sources, powers and simulated SNR (see the module docstring for what is
    known and unknown). Scenes are grouped by K, so each Fisher matrix has exactly 4K+1 rows.
    """
    device = batch.azimuth_rad.device
    operator = coded_operator(config, device)
    elements = element_positions(config, device=device, dtype=torch.float64)
    out = torch.full((batch.size, config.max_sources, 3), float("nan"), dtype=torch.float64,
                     device=device)
    for n_sources in batch.n_sources.unique().tolist():
        scenes = (batch.n_sources == n_sources).nonzero().squeeze(-1)
        for start in range(0, scenes.numel(), _CHUNK):
            index = scenes[start:start + _CHUNK]
            k = slice(0, n_sources)
            steering, derivatives = steering_with_derivatives(
                batch.azimuth_rad[index, k], batch.elevation_rad[index, k],
                batch.range_m[index, k], elements, config.wavenumber)
            power = batch.power[index, k].to(torch.float64)
            coded = torch.einsum("lmn,bkn->blmk", operator, steering)
            noise = expected_noise_variance(coded, power, batch.snr_db[index])
            fisher = stochastic_fisher(operator, steering, derivatives, power, noise)
            out[index, :n_sources] = bound_from_fisher(fisher, n_sources, 3, nuisance)
    return out
