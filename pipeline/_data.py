"""Scenes (SYSTEM.md §2, §6): reproducible, generated in batches on the training device.

Randomness comes from three disjoint streams, `numpy.random.SeedSequence(seed).spawn(3)`: train,
val, test. Each batch of each stream has its own child seed, so a batch is a pure function of
(config, seed, split, epoch, batch index) and of nothing else: not of the device, the batch order or
the worker. Random draws are made by a CPU generator (identical on every machine) and moved to the
device in one copy; all arithmetic after that runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from pipeline._config import ExperimentConfig
from pipeline._physics import Deployment

SPLITS = ("train", "val", "test")
_REDRAWS = 32  # candidate redraws of a source too close to an earlier one


@dataclass(frozen=True)
class SceneBatch:
    """A batch of B scenes. K_max = config.max_sources; inactive source slots are zero/masked.

    measurements: (B, L, M) complex64, each scene scaled to unit RMS.
    fields: (B, L, N) complex64, back-projected RIS-domain field estimates x_hat_l = W_l y_l.
    n_sources: (B,) int64 in 1..K_max.
    source_mask: (B, K_max) bool, True for the first n_sources slots.
    azimuth_rad, elevation_rad, range_m, power: (B, K_max) float32 (power linear, 0 when masked).
    steering: (B, K_max, N) complex64, zero where masked.
    snr_db: (B,) float32, the SNR that was simulated.
    frontend: (B, D) float32, the packed SBL front end of model sbl_count, or None.
    located: (B,) float32, 1 where the front end's answer with the true K localizes every source
    (inside the success box), or None; the SBL count network's second head learns it.
    """

    measurements: torch.Tensor
    fields: torch.Tensor
    n_sources: torch.Tensor
    source_mask: torch.Tensor
    azimuth_rad: torch.Tensor
    elevation_rad: torch.Tensor
    range_m: torch.Tensor
    power: torch.Tensor
    steering: torch.Tensor
    snr_db: torch.Tensor
    frontend: torch.Tensor | None = None  # (B, D) packed SBL front end (pipeline._frontend)
    located: torch.Tensor | None = None  # (B,) float32 training label of model sbl_count

    @property
    def size(self) -> int:
        return self.n_sources.shape[0]

    def select(self, index: slice | torch.Tensor) -> SceneBatch:
        return SceneBatch(**{f.name: None if getattr(self, f.name) is None
                             else getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(batches: list[SceneBatch]) -> SceneBatch:
        def joined(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in batches]
            return None if any(part is None for part in parts) else torch.cat(parts)

        return SceneBatch(**{f.name: joined(f.name) for f in fields(SceneBatch)})


def _draw_sources(config: ExperimentConfig, batch: int, rng: torch.Generator
                  ) -> tuple[torch.Tensor, ...]:
    """Source counts and parameters, float64 on the CPU. Too-close pairs are redrawn."""
    k_max = config.max_sources
    n_sources = torch.randint(1, k_max + 1, (batch,), generator=rng, device=rng.device)
    az_max = math.radians(config.azimuth_max_deg)
    el_max = math.radians(config.elevation_max_deg)
    sep = math.radians(config.min_separation_deg)

    def uniform(low: float, high: float, shape: tuple[int, ...]) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=rng, dtype=torch.float64,
                                                device=rng.device)

    # Each slot gets 1 + _REDRAWS candidate positions, drawn at once; it takes the first that is
    # not within `sep` in both angles of an earlier slot. The draw count is fixed (so the scenes
    # are reproducible); a scene still too crowded after every candidate keeps the last one,
    # which at default settings has probability below 1e-12. Vectorised over the candidates:
    # the slot loop is K_max short steps, not K_max x 32 rounds of small operations.
    azimuth = uniform(-az_max, az_max, (batch, k_max, 1 + _REDRAWS))
    elevation = uniform(-el_max, el_max, (batch, k_max, 1 + _REDRAWS))
    azimuth, elevation = pick_separated(azimuth, elevation, sep)
    range_m = uniform(config.range_min_m, config.range_max_m, (batch, k_max))
    power_db = config.source_power_db_max - uniform(0.0, config.power_range_db, (batch, k_max))
    snr_db = uniform(config.snr_db_min, config.snr_db_max, (batch,))
    return n_sources, azimuth, elevation, range_m, 10.0 ** (power_db / 10.0), snr_db


def pick_separated(azimuth: torch.Tensor, elevation: torch.Tensor, separation: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's first candidate not within `separation` in both angles of an earlier slot.

    azimuth, elevation: (B, K, C) candidates per slot (C = 1 + redraws); slot 0 takes its first.
    A slot whose every candidate is too close takes its last. Returns (B, K) each. Vectorised over
    the candidates: K short steps instead of K x C rounds of small operations.
    """
    n_candidates = azimuth.shape[-1]
    chosen_az, chosen_el = [azimuth[:, 0, 0]], [elevation[:, 0, 0]]
    last = torch.arange(n_candidates, device=azimuth.device) == n_candidates - 1
    for slot in range(1, azimuth.shape[1]):
        earlier_az = torch.stack(chosen_az, dim=1)[:, None, :]  # (B, 1, slot)
        earlier_el = torch.stack(chosen_el, dim=1)[:, None, :]
        close = (((azimuth[:, slot, :, None] - earlier_az).abs() < separation)
                 & ((elevation[:, slot, :, None] - earlier_el).abs() < separation)).any(-1)
        free = ~close | last  # (B, C); the last candidate always qualifies
        first = free.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first True
        chosen_az.append(azimuth[:, slot].gather(1, first).squeeze(1))
        chosen_el.append(elevation[:, slot].gather(1, first).squeeze(1))
    return torch.stack(chosen_az, dim=1), torch.stack(chosen_el, dim=1)


def generate_scenes(config: ExperimentConfig, deployment: Deployment, n_scenes: int,
                    seed: np.random.SeedSequence | int) -> SceneBatch:
    """n_scenes scenes drawn from `seed`, on the deployment's device. Pure in (config, seed)."""
    entropy = seed.generate_state(2) if isinstance(seed, np.random.SeedSequence) else [seed]
    rng = torch.Generator(device="cpu").manual_seed(
        int(np.uint64(entropy[0]) ^ (np.uint64(entropy[-1]) << 1)))
    device = deployment.operator.device
    k_max, n_snap = config.max_sources, config.n_snapshots

    n_sources, azimuth, elevation, range_m, power, snr_db = _draw_sources(config, n_scenes, rng)
    if config.coherent_symbols:
        symbols = torch.randn((n_scenes, k_max, 1, 2), generator=rng, device=rng.device
                              ).expand(-1, -1, n_snap, -1)
    else:
        symbols = torch.randn((n_scenes, k_max, n_snap, 2), generator=rng, device=rng.device)
    noise = torch.randn((n_scenes, n_snap, config.n_bs_antennas, 2), generator=rng,
                        device=rng.device)

    # One host-to-device copy of all draws; everything below runs on the device.
    mask = (torch.arange(k_max, device=n_sources.device)[None, :] < n_sources[:, None]).to(device)
    azimuth, elevation, range_m, power, snr_db = (
        t.to(device=device, dtype=torch.float32)
        for t in (azimuth, elevation, range_m, power, snr_db))
    power = power * mask
    symbols = torch.view_as_complex(symbols.contiguous().to(device)) / math.sqrt(2.0)
    noise = torch.view_as_complex(noise.contiguous().to(device)) / math.sqrt(2.0)

    steering = deployment.steering(azimuth, elevation, range_m) * mask[..., None]  # (B, K, N)
    amplitudes = symbols * power.sqrt()[..., None]  # (B, K, L) with E|s|^2 = p_k
    field = torch.einsum("bkn,bkl->bln", steering, amplitudes)  # x_l, (B, L, N)
    clean = torch.einsum("lmn,bln->blm", deployment.operator, field)  # (B, L, M)
    signal_power = clean.abs().square().mean(dim=(1, 2))
    noise_power = signal_power / 10.0 ** (snr_db / 10.0)
    measurements = clean + noise * noise_power.sqrt()[:, None, None]
    rms = measurements.abs().square().mean(dim=(1, 2)).sqrt().clamp_min(1e-30)
    measurements = measurements / rms[:, None, None]
    fields = torch.einsum("lnm,blm->bln", deployment.back_projection, measurements)
    return SceneBatch(
        measurements=measurements, fields=fields, n_sources=n_sources.to(device),
        source_mask=mask, azimuth_rad=azimuth * mask, elevation_rad=elevation * mask,
        range_m=range_m * mask, power=power, steering=steering, snr_db=snr_db,
    )


def split_seeds(seed: int) -> dict[str, np.random.SeedSequence]:
    """The three disjoint streams of SYSTEM.md §6."""
    return dict(zip(SPLITS, np.random.SeedSequence(seed).spawn(3)))


def _batch_seed(root: np.random.SeedSequence, *path: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, *path))


def iterate_batches(config: ExperimentConfig, deployment: Deployment, split: str, n_scenes: int,
                    batch_size: int, *, epoch: int = 0) -> Iterator[SceneBatch]:
    """Batches of a split. Train with fresh_train draws new scenes per epoch; val/test never vary.

    Batch b of a split is seeded by (split stream, epoch or 0, b), so the scenes do not depend on
    how many batches were drawn before or on the device.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, but got {split!r}")
    root = split_seeds(config.seed)[split]
    epoch_key = epoch if (split == "train" and config.fresh_train) else 0
    for index, start in enumerate(range(0, n_scenes, batch_size)):
        size = min(batch_size, n_scenes - start)
        yield generate_scenes(config, deployment, size, _batch_seed(root, epoch_key, index))


def load_split(config: ExperimentConfig, deployment: Deployment, split: str, n_scenes: int,
               *, chunk: int = 1024) -> SceneBatch:
    """A whole fixed split as one SceneBatch (for validation and test sets)."""
    return SceneBatch.concat(list(iterate_batches(config, deployment, split, n_scenes, chunk)))
