"""Localization results and their scores (SYSTEM.md §5): matched errors, success, the composite."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline._config import ExperimentConfig
from pipeline._data import SceneBatch
from pipeline._matching import (
    ERROR_SCALE_AZIMUTH_DEG,
    ERROR_SCALE_ELEVATION_DEG,
    ERROR_SCALE_RANGE_M,
    ERROR_SCALES,
    hungarian_match,
)

# SYSTEM.md §5 success box: every true source within 3 deg / 3 deg / 0.5 m.
SUCCESS_AZIMUTH_DEG = 3.0
SUCCESS_ELEVATION_DEG = 3.0
SUCCESS_RANGE_M = 0.5


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

    def select(self, index: slice | torch.Tensor) -> Localization:
        return Localization(self.azimuth_rad[index], self.elevation_rad[index],
                            self.range_m[index], self.mask[index], self.score[index])

    @staticmethod
    def cat(parts: list[Localization]) -> Localization:
        return Localization(*(torch.cat([getattr(p, name) for p in parts]) for name in
                              ("azimuth_rad", "elevation_rad", "range_m", "mask", "score")))

    def points(self) -> torch.Tensor:
        """(B, K_max, 3) float32 in the search grids' coordinates: azimuth rad, elevation rad,
        1 / range (1/m); 0 in masked slots."""
        inverse = torch.where(self.mask, 1.0 / self.range_m.clamp_min(1e-6), 0.0)
        return torch.stack([self.azimuth_rad, self.elevation_rad, inverse], dim=-1)

    @staticmethod
    def from_batch(batch: SceneBatch) -> Localization:
        """The true sources of a batch as a Localization."""
        return Localization(
            azimuth_rad=batch.azimuth_rad.float(), elevation_rad=batch.elevation_rad.float(),
            range_m=batch.range_m.float(), mask=batch.source_mask.bool(),
            score=batch.source_mask.float(),
        )


def localization_from_points(points: list[torch.Tensor], masks: list[torch.Tensor],
                             scores: list[torch.Tensor], k_max: int,
                             device: torch.device) -> Localization:
    """One Localization from chunks of (b, k_max, 3) points (az, el, 1/r), (b, k_max) masks and
    scores; empty (0, k_max) when there are no chunks. Masked-out slots hold zeros."""
    if not points:
        empty = torch.zeros(0, k_max, device=device)
        return Localization(empty, empty, empty, empty.bool(), empty)
    point, mask, score = torch.cat(points), torch.cat(masks), torch.cat(scores)
    zero = torch.zeros((), device=device)
    return Localization(
        azimuth_rad=torch.where(mask, point[..., 0], zero),
        elevation_rad=torch.where(mask, point[..., 1], zero),
        range_m=torch.where(mask, 1.0 / point[..., 2].clamp_min(1e-6), zero),
        mask=mask,
        score=torch.where(mask, score, zero),
    )


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
                            ERROR_SCALES)
    est = est_params[pairs.scene, pairs.est_slot]
    true = true_params[pairs.scene, pairs.true_slot]
    error = np.abs(est - true)
    return {
        "scene": pairs.scene, "est_slot": pairs.est_slot, "true_slot": pairs.true_slot,
        "azimuth_deg": np.degrees(error[:, 0]), "elevation_deg": np.degrees(error[:, 1]),
        "range_m": error[:, 2], "true_range_m": true[:, 2],
    }


def in_success_box(errors: dict[str, np.ndarray]) -> np.ndarray:
    """(n_pairs,) bool: the matched pairs of `matched_errors` within 3 deg / 3 deg / 0.5 m."""
    return ((errors["azimuth_deg"] <= SUCCESS_AZIMUTH_DEG)
            & (errors["elevation_deg"] <= SUCCESS_ELEVATION_DEG)
            & (errors["range_m"] <= SUCCESS_RANGE_M))


def _scene_success(errors: dict[str, np.ndarray], k_hat: np.ndarray, n_true: np.ndarray
                   ) -> np.ndarray:
    matched_inside = np.bincount(errors["scene"][in_success_box(errors)],
                                 minlength=n_true.shape[0])
    return (k_hat == n_true) & (matched_inside == n_true)


def scene_success(localization: Localization, k_hat: torch.Tensor, truth: SceneBatch
                  ) -> np.ndarray:
    """(B,) bool: K_hat = K and every true source matched within the success box.

    The per-scene form of `localization_metrics`' success_rate (same matching, same box).
    """
    return _scene_success(matched_errors(localization, truth), k_hat.cpu().numpy(),
                          truth.n_sources.cpu().numpy())


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
    inside = in_success_box(errors)
    success = _scene_success(errors, k_hat, n_true)
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
        + metrics["rmse_azimuth_deg"] / ERROR_SCALE_AZIMUTH_DEG
        + metrics["rmse_elevation_deg"] / ERROR_SCALE_ELEVATION_DEG
        + metrics["rmse_range_m"] / ERROR_SCALE_RANGE_M
        - success_rate
    )
    metrics["n_pairs"] = float(errors["scene"].size)
    metrics["n_scenes"] = float(n_scenes)
    return metrics
