"""The network (SYSTEM.md §4): measurements in; covariance factor, K logits and source slots out.

Physics first: the sensing operator Phi_l = G diag(c_l) is known, so each scene's measurements are
matched-filtered against the coded dictionary Phi_l a(p) over a (1/range, elevation, azimuth) grid.
That spectrum, a blurred picture of where the energy comes from, is what the network sees, beside
the MUSIC pseudo-spectrum of R_samp on the same grid (sharper peaks, more spurious ones) and
R_samp's eigenvalue profile; it never has to rediscover the geometry from raw 16 x 16 measurements.

A residual convolutional trunk turns the spectrum into a detection map (CenterNet-style): per grid
cell an objectness logit and a sub-cell offset in each coordinate. The K_max source slots are the
K_max strongest local maxima of the map, each placed at its cell centre plus its offset. Convolutions
share their weights across the field of view, so a source is detected the same way wherever it is;
that is what makes this learn from thousands of scenes rather than hundreds of thousands.

The covariance head carries the steering-vector manifold (SYSTEM.md §4b): with cov_head="manifold"
the factor is F[:, k] = sqrt(w_k) a(p_k) (w_k the slot's objectness), built from the exact
spherical steering vectors, so F F^H is a sum of physically possible sources; a learned per-scene
shrinkage gamma then forms R_pred = (1 - gamma) F F^H (trace N) + gamma I, the MMSE-style hedge of an
uncertain estimate (gamma -> 0 for a confident one, so a perfect prediction still has zero loss;
I has the eigenvectors of no source, so MUSIC's subspaces are unaffected). cov_head="free" predicts
an unstructured N x r factor from pooled features instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline._config import ExperimentConfig
from pipeline._grid import Grid
from pipeline._metrics import Localization
from pipeline._physics import Deployment, steering_vectors

_MIN_WEIGHT = 1e-8  # floor of a slot's weight under the square root of the factor


@dataclass(frozen=True)
class ModelOutput:
    """factor: (B, N, r) complex64. k_logits: (B, K_max) for K = 1..K_max.
    azimuth_rad, elevation_rad, range_m, weight: (B, K_max) float32 slot predictions (weight in
    (0, 1), the slot's objectness). shrinkage: (B,) float32 gamma in [0, 1), or None.
    objectness: (B, R, E, A) logits; offsets: (B, 3, R, E, A) in cells (None for the free head).
    locate_logits, k_score: (B, K_max) or None (see below).
    """

    factor: torch.Tensor
    k_logits: torch.Tensor
    azimuth_rad: torch.Tensor
    elevation_rad: torch.Tensor
    range_m: torch.Tensor
    weight: torch.Tensor
    shrinkage: torch.Tensor | None = None
    objectness: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    # SBL count network: logits that the answer with k sources localizes every source (trained
    # where k = K), and the scores K_hat is the argmax of (`predicted_count`).
    locate_logits: torch.Tensor | None = None
    k_score: torch.Tensor | None = None


class MatchedFilterSpectrum(nn.Module):
    """y (B, L, M) complex -> log matched-filter spectrum (B, R, E, A) float32.

    P(g) = (1/L) sum_l |d_{l,g}^H y_l|^2 with d_{l,g} = Phi_l a(g) / ||Phi_l a(g)||, then
    log(P / mean_g P + 1e-3). One batched matrix product over snapshots; the dictionary is a buffer.
    """

    def __init__(self, config: ExperimentConfig, deployment: Deployment, grid: Grid
                 ) -> None:
        super().__init__()
        self.grid_shape = grid.shape
        device = deployment.operator.device
        az, el, rng = (t.reshape(-1).to(device=device, dtype=torch.float32)
                       for t in grid.points())
        atoms = deployment.steering(az, el, rng)  # (G, N)
        coded = torch.einsum("lmn,gn->lmg", deployment.operator, atoms)  # (L, M, G)
        coded = coded / torch.linalg.vector_norm(coded, dim=1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("dictionary", coded.conj().contiguous(), persistent=False)

    def forward(self, measurements: torch.Tensor) -> torch.Tensor:
        projected = torch.bmm(measurements.transpose(0, 1), self.dictionary)  # (L, B, G)
        power = projected.real.square().add(projected.imag.square()).mean(dim=0)  # (B, G)
        power = power / power.mean(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.log(power + 1e-3).reshape(-1, *self.grid_shape)


class SubspaceSpectrum(nn.Module):
    """x_hat (B, L, N) complex -> MUSIC log pseudo-spectrum of R_samp (B, R, E, A) and the
    2 K_max largest eigenvalues of R_samp over N (B, 2 K_max), both float32, no gradient.

    The signal subspace is the K_max strongest eigenvectors of R_samp (at most L of them);
    proj(g) = ||E_s^H a(g)||^2 / N and the feature is -log(1 - proj + 1e-3): one GEMM of the grid's
    steering matrix against every scene's subspace. The eigenvalue profile is what MDL counts
    sources from, handed to the K head.
    """

    def __init__(self, config: ExperimentConfig, deployment: Deployment, grid: Grid
                 ) -> None:
        super().__init__()
        self.grid_shape = grid.shape
        self.n_signal = min(config.max_sources, config.n_elements - 1)
        self.n_eigen = min(2 * config.max_sources, config.n_elements)
        device = deployment.operator.device
        az, el, rng = (t.reshape(-1).to(device=device, dtype=torch.float32)
                       for t in grid.points())
        self.register_buffer("atoms", deployment.steering(az, el, rng).conj().contiguous(),
                             persistent=False)  # (G, N)

    @torch.no_grad()
    def forward(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=fields.device.type, enabled=False):
            snapshots = fields.to(torch.complex64).transpose(-2, -1)  # (B, N, L)
            batch, n_elements, n_snapshots = snapshots.shape
            # R_samp = A A^H / L has rank <= L: its eigenpairs follow from the L x L Gram matrix
            # A^H A (eigenvalues w, vectors V) as U = A V / sqrt(w), far cheaper than an N x N eigh.
            gram = snapshots.conj().transpose(-2, -1) @ snapshots  # (B, L, L)
            eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
            eigenvalues = eigenvalues.flip(-1).clamp_min(0.0)
            n_signal = min(self.n_signal, n_snapshots)
            top = vectors.flip(-1)[..., :n_signal]
            signal = (snapshots @ top) / eigenvalues[:, None, :n_signal].sqrt().clamp_min(1e-12)
            stacked = signal.transpose(0, 1).reshape(n_elements, -1)  # (N, B*K)
            proj = (self.atoms @ stacked).abs().square().reshape(-1, batch, n_signal)
            proj = proj.sum(-1).T / n_elements  # (B, G)
            music = -torch.log((1.0 - proj).clamp_min(0.0) + 1e-3)
            # Eigenvalues of R_samp scaled to trace N, over N: w / sum(w).
            profile = eigenvalues / eigenvalues.sum(-1, keepdim=True).clamp_min(1e-30)
            profile = F.pad(profile, (0, max(0, self.n_eigen - n_snapshots)))[..., : self.n_eigen]
        return music.reshape(-1, *self.grid_shape), profile


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class CovarianceNet(nn.Module):
    def __init__(self, config: ExperimentConfig, deployment: Deployment) -> None:
        super().__init__()
        self.config = config
        self.grid = Grid.feature(config)
        self.spectrum = MatchedFilterSpectrum(config, deployment, self.grid)
        self.subspace = SubspaceSpectrum(config, deployment, self.grid)
        self.register_buffer("elements", deployment.elements.clone(), persistent=False)
        self.wavenumber = deployment.wavenumber
        n_range = self.grid.shape[0]
        channels = config.conv_channels
        self.stem = nn.Conv2d(2 * n_range, channels, 3, padding=1)
        # Dilations 1, 2, 4, ... widen the receptive field to cover sidelobes of the spectrum.
        self.blocks = nn.Sequential(*[_ResidualBlock(channels, 2 ** (i % 3))
                                      for i in range(config.model_depth)])
        self.dropout = nn.Dropout2d(config.dropout)
        self.detect = nn.Conv2d(channels, 4 * n_range, 1)
        k_max = config.max_sources
        # The pooled head also sees the 2 K_max strongest peak logits of the map (counting
        # sources is then counting confident detections) and R_samp's eigenvalue profile.
        self.pooled = nn.Sequential(nn.Linear(2 * channels + 2 * k_max + self.subspace.n_eigen,
                                              config.model_width),
                                    nn.GELU(), nn.Dropout(config.dropout))
        self.k_head = nn.Linear(config.model_width, k_max)
        self.shrink_head = nn.Linear(config.model_width, 1)
        self.factor_head = (nn.Linear(config.model_width, 2 * config.n_elements
                                      * config.factor_rank)
                            if config.cov_head == "free" else None)
        # Start with few detections: objectness ~ 1 %, as in CenterNet.
        nn.init.constant_(self.detect.bias[:n_range], -4.6)
        nn.init.zeros_(self.detect.bias[n_range:])

    def forward(self, measurements: torch.Tensor, fields: torch.Tensor,
                frontend: torch.Tensor | None = None) -> ModelOutput:
        """measurements: (B, L, M) complex64; fields: (B, L, N) complex64 (from SceneBatch);
        frontend: unused (model sbl_count's precomputed input)."""
        n_range, n_el, n_az = self.grid.shape
        music, profile = self.subspace(fields)
        features = torch.cat([self.spectrum(measurements), music], dim=1)
        hidden = self.dropout(self.blocks(self.stem(features)))
        # The heads run in float32 even under autocast: the slots are a top-k of the map, and
        # half-precision noise there would reorder near-tied peaks.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = F.gelu(hidden.float())
            maps = self.detect(hidden)
            objectness = maps[:, :n_range]  # (B, R, E, A)
            offsets = torch.tanh(maps[:, n_range:]).reshape(-1, 3, n_range, n_el, n_az)
            return self._heads(hidden, objectness, offsets, profile)

    def _heads(self, hidden: torch.Tensor, objectness: torch.Tensor, offsets: torch.Tensor,
               profile: torch.Tensor) -> ModelOutput:
        config = self.config
        azimuth, elevation, range_m, weight, peaks = self._slots(objectness, offsets)
        pooled = self.pooled(torch.cat([hidden.mean(dim=(-2, -1)), hidden.amax(dim=(-2, -1)),
                                        peaks, profile.float()], dim=-1))
        k_logits = self.k_head(pooled)
        shrinkage = torch.sigmoid(self.shrink_head(pooled).squeeze(-1) - 2.0)

        if self.factor_head is None:
            steering = steering_vectors(azimuth, elevation, range_m, self.elements,
                                        self.wavenumber)
            # sqrt has an infinite slope at 0, and a slot's weight (a sigmoid) underflows to
            # exactly 0 once its logit is below about -88: floor it so the gradient stays finite.
            amplitude = weight.clamp_min(_MIN_WEIGHT).sqrt()
            factor = (steering * amplitude[..., None]).transpose(-2, -1)  # (B, N, K_max)
        else:
            raw = self.factor_head(pooled).reshape(
                -1, config.n_elements, config.factor_rank, 2)
            factor = torch.complex(raw[..., 0], raw[..., 1])
            shrinkage = None
        return ModelOutput(factor=factor, k_logits=k_logits, azimuth_rad=azimuth,
                           elevation_rad=elevation, range_m=range_m, weight=weight,
                           shrinkage=shrinkage, objectness=objectness, offsets=offsets)

    def _slots(self, objectness: torch.Tensor, offsets: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
        """The K_max strongest local maxima of the objectness map, placed at cell + offset.

        Returns azimuth, elevation, range, weight (B, K_max) and the 2 K_max strongest peak
        logits (B, 2 K_max), descending.
        """
        batch = objectness.shape[0]
        k_max = self.config.max_sources
        logits = objectness.unsqueeze(1)  # (B, 1, R, E, A)
        peak = logits == F.max_pool3d(logits, 3, stride=1, padding=1)
        ranked = torch.where(peak, logits, logits - 1e4).reshape(batch, -1)
        n_peaks = min(2 * k_max, ranked.shape[-1])
        peak_logits, top = ranked.topk(n_peaks, dim=-1)
        peak_logits = F.pad(peak_logits.clamp_min(-20.0), (0, 2 * k_max - n_peaks), value=-20.0)
        top = top[:, :k_max]  # (B, K_max)
        weight = torch.sigmoid(objectness.reshape(batch, -1).gather(1, top))
        _, n_el, n_az = self.grid.shape
        cell = torch.stack([top // (n_el * n_az), (top // n_az) % n_el, top % n_az], -1)
        offset = offsets.reshape(batch, 3, -1).gather(2, top[:, None, :].expand(-1, 3, -1))
        coords = cell.to(offset.dtype) + offset.transpose(1, 2)  # (B, K_max, 3) in cells
        start = torch.tensor(self.grid.start, dtype=coords.dtype, device=coords.device)
        step = torch.tensor(self.grid.step, dtype=coords.dtype, device=coords.device)
        values = start + coords * step
        lower, upper = self.grid.lower, self.grid.upper  # the field of view, (1/r, el, az)
        inverse_range = values[..., 0].clamp(lower[0], upper[0])
        return (values[..., 2].clamp(lower[2], upper[2]), values[..., 1].clamp(lower[1], upper[1]),
                1.0 / inverse_range, weight, peak_logits)


def build_model(config: ExperimentConfig, deployment: Deployment) -> nn.Module:
    """The network of `config.model`, on the deployment's device: the detection-map network
    ("grid", this module) or the SBL count network ("sbl_count", `pipeline._sbl_net`)."""
    if config.model == "sbl_count":
        from pipeline._sbl_net import SblCountNet  # it builds on this module's ModelOutput

        return SblCountNet(config, deployment).to(deployment.operator.device)
    return CovarianceNet(config, deployment).to(deployment.operator.device)


def predicted_count(output: ModelOutput) -> torch.Tensor:
    """K_hat (B,) int64 in 1..K_max: the argmax of the output's decision scores, or of its K
    logits where it has none."""
    scores = output.k_score if output.k_score is not None else output.k_logits
    return scores.argmax(-1) + 1


def music_seeds(model: nn.Module, output: ModelOutput) -> Localization | None:
    """The positions MUSIC on R_blend starts from besides its grid: the SBL count network's own
    sources (MUSIC then gives them back where R_blend peaks there); None for the grid network,
    whose slots are its map's peaks and which MUSIC searches from scratch."""
    localization = getattr(model, "localization", None)
    return localization(output) if localization is not None else None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
