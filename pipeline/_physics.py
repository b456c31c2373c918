"""RIS near-field physics (SYSTEM.md §1-2): geometry, steering vectors, channel, codes, operator.

Everything here is a pure function of the config (and of a seeded generator where random). Tensors
are created on the caller's device; no function here picks a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline._config import ExperimentConfig


def element_positions(config: ExperimentConfig, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RIS element positions, centred on the origin in the y-z plane.

    Element (i, j) sits at (0, (i - (rows-1)/2) d, (j - (cols-1)/2) d), d = wavelength / 2,
    flattened row-major (index i * cols + j). Returns (n_elements, 3) float.
    """
    spacing = config.wavelength_m / 2.0
    rows = torch.arange(config.n_ris_rows, device=device, dtype=torch.float64)
    cols = torch.arange(config.n_ris_cols, device=device, dtype=torch.float64)
    y = (rows - (config.n_ris_rows - 1) / 2.0) * spacing
    z = (cols - (config.n_ris_cols - 1) / 2.0) * spacing
    yy, zz = torch.meshgrid(y, z, indexing="ij")
    positions = torch.stack([torch.zeros_like(yy), yy, zz], dim=-1).reshape(-1, 3)
    return positions.to(dtype)


def source_positions(azimuth_rad: torch.Tensor, elevation_rad: torch.Tensor,
                     range_m: torch.Tensor) -> torch.Tensor:
    """Cartesian positions p = r (cos th cos ph, cos th sin ph, sin th); shape (..., 3)."""
    cos_el = torch.cos(elevation_rad)
    return torch.stack(
        [range_m * cos_el * torch.cos(azimuth_rad), range_m * cos_el * torch.sin(azimuth_rad),
         range_m * torch.sin(elevation_rad)],
        dim=-1,
    )


def steering_vectors(azimuth_rad: torch.Tensor, elevation_rad: torch.Tensor, range_m: torch.Tensor,
                     elements: torch.Tensor, wavenumber: float) -> torch.Tensor:
    """Exact spherical near-field steering vectors a_n(p) = exp(-j k0 (|p - e_n| - |p|)).

    azimuth_rad, elevation_rad, range_m: same shape (...), float32 or float64.
    elements: (n_elements, 3). Returns (..., n_elements) complex (complex64 for float32 input).
    The path difference is formed in the input dtype; for float32 inputs it is computed as
    (|e|^2 - 2 p.e) / (|p - e| + |p|), which avoids the cancellation of two nearly equal ranges.
    """
    position = source_positions(azimuth_rad, elevation_rad, range_m)  # (..., 3)
    elements = elements.to(device=position.device, dtype=position.dtype)
    dot = position @ elements.T  # (..., N)
    elem_sq = (elements * elements).sum(-1)  # (N,)
    dist = torch.sqrt(torch.clamp(range_m.unsqueeze(-1) ** 2 - 2.0 * dot + elem_sq, min=0.0))
    path_difference = (elem_sq - 2.0 * dot) / (dist + range_m.unsqueeze(-1))
    phase = -wavenumber * path_difference
    # complex(cos, sin) rather than polar(1, phase): 2.5x faster on the CPU, same values.
    return torch.complex(torch.cos(phase), torch.sin(phase))


def planar_steering_vectors(azimuth_rad: torch.Tensor, elevation_rad: torch.Tensor,
                            elements: torch.Tensor, wavenumber: float) -> torch.Tensor:
    """Far-field (planar wave) model exp(+j k0 u . e_n), the limit of the spherical one."""
    unit = source_positions(azimuth_rad, elevation_rad, torch.ones_like(azimuth_rad))
    phase = wavenumber * (unit @ elements.to(unit.dtype).T)
    return torch.polar(torch.ones_like(phase), phase)


def _complex_normal(shape: tuple[int, ...], generator: torch.Generator,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """CN(0, 1) samples drawn from `generator` (on the generator's device)."""
    parts = torch.randn((*shape, 2), generator=generator, dtype=dtype,
                        device=generator.device)
    return torch.complex(parts[..., 0], parts[..., 1]) / math.sqrt(2.0)


def bs_ris_channel(config: ExperimentConfig) -> torch.Tensor:
    """Rician BS-RIS channel G, (n_bs_antennas, n_elements) complex128, drawn from deployment_seed.

    Line of sight: exact spherical propagation between each BS antenna (a half-wavelength ULA along
    y, centred at bs_distance_m in direction bs_azimuth_deg) and each RIS element, unit modulus.
    Scattered part: i.i.d. CN(0, 1). G = sqrt(K/(K+1)) G_los + sqrt(1/(K+1)) G_nlos, K a power ratio.
    """
    elements = element_positions(config, dtype=torch.float64)
    azimuth = math.radians(config.bs_azimuth_deg)
    centre = torch.tensor([config.bs_distance_m * math.cos(azimuth),
                           config.bs_distance_m * math.sin(azimuth), 0.0], dtype=torch.float64)
    offsets = (torch.arange(config.n_bs_antennas, dtype=torch.float64)
               - (config.n_bs_antennas - 1) / 2.0) * config.wavelength_m / 2.0
    # The BS array is broadside to the RIS: its axis is perpendicular to the BS direction.
    axis = torch.tensor([-math.sin(azimuth), math.cos(azimuth), 0.0], dtype=torch.float64)
    antennas = centre + offsets[:, None] * axis
    distance = torch.linalg.norm(antennas[:, None, :] - elements[None, :, :], dim=-1)
    los = torch.polar(torch.ones_like(distance), -config.wavenumber * distance)
    generator = torch.Generator().manual_seed(config.deployment_seed)
    nlos = _complex_normal((config.n_bs_antennas, config.n_elements), generator)
    k_factor = config.rician_k
    return math.sqrt(k_factor / (k_factor + 1.0)) * los + math.sqrt(1.0 / (k_factor + 1.0)) * nlos


def ris_codes(config: ExperimentConfig) -> torch.Tensor:
    """RIS phase profiles c_l, (n_snapshots, n_elements) complex128, unit modulus.

    Each is a column of the 2-D DFT codebook (beam (u, v) of the rows x cols array), its phases
    quantised to code_bits bits. The n_snapshots beams are a seeded draw without replacement
    (deployment_seed), repeating the codebook if more snapshots than beams are asked for.
    """
    rows, cols = config.n_ris_rows, config.n_ris_cols
    rng = np.random.default_rng(config.deployment_seed + 1)
    n_beams = rows * cols
    picks = np.concatenate([rng.permutation(n_beams)
                            for _ in range(math.ceil(config.n_snapshots / n_beams))])
    picks = torch.as_tensor(picks[: config.n_snapshots])
    u, v = picks // cols, picks % cols
    i = torch.arange(rows, dtype=torch.float64)
    j = torch.arange(cols, dtype=torch.float64)
    phase = 2.0 * math.pi * (u[:, None, None] * i[None, :, None] / rows
                             + v[:, None, None] * j[None, None, :] / cols)
    step = 2.0 * math.pi / (2 ** config.code_bits)
    phase = torch.round(phase / step) * step
    return torch.polar(torch.ones_like(phase), phase).reshape(config.n_snapshots, -1)


def coded_operator(config: ExperimentConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sensing operator Phi_l = G diag(c_l) of the config's deployment; (L, M, N) complex128.

    Snapshot l sees y_l = Phi_l x_l + n_l. Every user of Phi takes it from here, through
    `Deployment.operator` (complex64, on the deployment's device) or directly (the CRB, complex128).
    """
    operator = bs_ris_channel(config)[None, :, :] * ris_codes(config)[:, None, :]
    return operator.to(device)


@dataclass(frozen=True)
class Deployment:
    """The known (calibrated) sensing operator of one deployment, on one device.

    elements: (N, 3) float32. channel: (M, N) complex64. codes: (L, N) complex64.
    operator: Phi_l = G diag(c_l), (L, M, N) complex64.
    back_projection: W_l = Phi_l^H (Phi_l Phi_l^H + rho I)^-1, (L, N, M) complex64; x_hat_l = W_l y_l.
    """

    elements: torch.Tensor
    wavenumber: float
    channel: torch.Tensor
    codes: torch.Tensor
    operator: torch.Tensor
    back_projection: torch.Tensor

    @staticmethod
    def build(config: ExperimentConfig, device: torch.device | str = "cpu") -> Deployment:
        channel = bs_ris_channel(config)
        codes = ris_codes(config)
        operator = coded_operator(config)  # (L, M, N) complex128
        gram = operator @ operator.conj().transpose(-2, -1)  # (L, M, M)
        scale = torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)  # mean eigenvalue per l
        eye = torch.eye(config.n_bs_antennas, dtype=gram.dtype)
        regularised = gram + config.ridge * scale[:, None, None] * eye
        back_projection = operator.conj().transpose(-2, -1) @ torch.linalg.inv(regularised)
        return Deployment(
            elements=element_positions(config, device=device),
            wavenumber=config.wavenumber,
            channel=channel.to(device=device, dtype=torch.complex64),
            codes=codes.to(device=device, dtype=torch.complex64),
            operator=operator.to(device=device, dtype=torch.complex64),
            back_projection=back_projection.to(device=device, dtype=torch.complex64),
        )

    def steering(self, azimuth_rad: torch.Tensor, elevation_rad: torch.Tensor,
                 range_m: torch.Tensor) -> torch.Tensor:
        """Steering vectors of this array; (..., N) complex64 for float32 input."""
        return steering_vectors(azimuth_rad, elevation_rad, range_m, self.elements,
                                self.wavenumber)
