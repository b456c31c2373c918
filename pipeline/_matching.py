"""Permutation-invariant matching of source sets (SYSTEM.md §4 and §5).

Source slots have no natural order, so two things here match a set of estimates to a set of true
sources before comparing them:

- `matched_parameter_loss`, the differentiable training term: the minimum over one-to-one
  assignments of a normalised smooth-L1 cost. Exact on the device for up to six slots (every
  permutation enumerated, no host sync), `scipy.optimize.linear_sum_assignment` above that.
- `hungarian_match`, for evaluation: per scene, the Hungarian assignment on a cost normalised by
  5 deg / 5 deg / 1 m, returned as index arrays of matched pairs.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# Enumerating permutations costs K_pred! / (K_pred - K_true)! gathers per scene: 720 at six slots,
# 5040 at seven. Above six the Hungarian algorithm on the host is cheaper.
MAX_ENUMERATED_SLOTS = 6

# SYSTEM.md §5: a localization error is measured in units of 5 deg / 5 deg / 1 m. The evaluation's
# matching cost, the composite score and the training's matched loss all divide by these.
ERROR_SCALE_AZIMUTH_DEG = 5.0
ERROR_SCALE_ELEVATION_DEG = 5.0
ERROR_SCALE_RANGE_M = 1.0
# The same in the units of a source's parameters: (azimuth rad, elevation rad, range m).
ERROR_SCALES = (math.radians(ERROR_SCALE_AZIMUTH_DEG), math.radians(ERROR_SCALE_ELEVATION_DEG),
                ERROR_SCALE_RANGE_M)


@functools.lru_cache(maxsize=32)
def _assignments(n_pred: int, n_true: int, device: torch.device) -> torch.Tensor:
    """Every injective map of true slots to predicted slots; (n_assign, n_true) int64.

    Row p assigns true slot j to predicted slot `result[p, j]`. Cached per device so that the
    index tensor is copied to the device once, not on every call.
    """
    rows = list(itertools.permutations(range(n_pred), n_true))
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), n_true)


def _smooth_l1(difference: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise smooth-L1 (Huber / beta); plain L1 when beta is 0."""
    magnitude = difference.abs()
    if beta <= 0.0:
        return magnitude
    return torch.where(magnitude < beta, 0.5 * difference.square() / beta, magnitude - 0.5 * beta)


def pairwise_parameter_cost(pred_azimuth_rad: torch.Tensor, pred_elevation_rad: torch.Tensor,
                            pred_range_m: torch.Tensor, true_azimuth_rad: torch.Tensor,
                            true_elevation_rad: torch.Tensor, true_range_m: torch.Tensor, *,
                            scale_azimuth_rad: float, scale_elevation_rad: float,
                            scale_range_m: float, smooth_l1_beta: float = 1.0) -> torch.Tensor:
    """Cost of giving predicted slot i to true slot j; (B, K_pred, K_true) float32.

    Predictions (B, K_pred) and truth (B, K_true) float; each difference is divided by its scale,
    passed through smooth-L1 (beta in normalised units) and the three are summed.
    """
    cost = torch.zeros((), dtype=torch.float32, device=pred_azimuth_rad.device)
    for pred, true, scale in (
        (pred_azimuth_rad, true_azimuth_rad, scale_azimuth_rad),
        (pred_elevation_rad, true_elevation_rad, scale_elevation_rad),
        (pred_range_m, true_range_m, scale_range_m),
    ):
        difference = (pred.float()[:, :, None] - true.float()[:, None, :]) / scale
        cost = cost + _smooth_l1(difference, smooth_l1_beta)
    return cost


def matched_parameter_loss(pred_azimuth_rad: torch.Tensor, pred_elevation_rad: torch.Tensor,
                           pred_range_m: torch.Tensor, true_azimuth_rad: torch.Tensor,
                           true_elevation_rad: torch.Tensor, true_range_m: torch.Tensor,
                           true_mask: torch.Tensor, *, scale_azimuth_rad: float,
                           scale_elevation_rad: float, scale_range_m: float,
                           smooth_l1_beta: float = 1.0,
                           method: Literal["auto", "enumerate", "hungarian"] = "auto"
                           ) -> torch.Tensor:
    """Permutation-invariant set loss of predicted source slots against the true sources.

    pred_*: (B, K_pred) float, every slot a candidate. true_*: (B, K_true) float with
    true_mask (B, K_true) bool marking the present sources (in any slots); K_true <= K_pred.
    The present true sources are assigned to distinct predicted slots so as to minimise the summed
    `pairwise_parameter_cost`; the loss of a scene is that minimum divided by its number of present
    sources (0 for a scene with none). Returns (B,) float32, computed in float32 also under
    autocast. Gradients flow through the cost of the chosen assignment.

    method: "enumerate" takes the minimum over every assignment on the device (exact, no host
    sync); "hungarian" solves each scene with scipy on detached costs; "auto" enumerates when
    K_pred <= MAX_ENUMERATED_SLOTS.
    """
    if true_mask.shape != true_azimuth_rad.shape:
        raise ValueError(
            f"true_mask must have the shape of the truth, but got {tuple(true_mask.shape)} "
            f"and {tuple(true_azimuth_rad.shape)}"
        )
    n_pred, n_true = pred_azimuth_rad.shape[-1], true_azimuth_rad.shape[-1]
    if n_true > n_pred:
        raise ValueError(f"need n_true <= n_pred slots, but got {n_true=} > {n_pred=}")
    if method not in ("auto", "enumerate", "hungarian"):
        raise ValueError(f"method must be auto, enumerate or hungarian, but got {method=}")
    device = pred_azimuth_rad.device
    with torch.autocast(device_type=device.type, enabled=False):
        cost = pairwise_parameter_cost(
            pred_azimuth_rad, pred_elevation_rad, pred_range_m, true_azimuth_rad,
            true_elevation_rad, true_range_m, scale_azimuth_rad=scale_azimuth_rad,
            scale_elevation_rad=scale_elevation_rad, scale_range_m=scale_range_m,
            smooth_l1_beta=smooth_l1_beta,
        )  # (B, K_pred, K_true)
        weight = true_mask.to(torch.float32)
        n_present = weight.sum(-1)
        if method == "enumerate" or (method == "auto" and n_pred <= MAX_ENUMERATED_SLOTS):
            assignments = _assignments(n_pred, n_true, device)  # (P, K_true)
            true_slots = torch.arange(n_true, device=device)
            per_assignment = cost[:, assignments, true_slots]  # (B, P, K_true)
            total = (per_assignment * weight[:, None, :]).sum(-1).min(dim=-1).values
        else:
            total = _hungarian_total(cost, true_mask)
        return total / n_present.clamp_min(1.0)


def _hungarian_total(cost: torch.Tensor, true_mask: torch.Tensor) -> torch.Tensor:
    """Summed cost of the optimal assignment per scene, differentiable in `cost`; (B,) float32."""
    cost_host = cost.detach().cpu().numpy()
    mask_host = true_mask.detach().cpu().numpy().astype(bool)
    scenes, pred_slots, true_slots = [], [], []
    for scene in range(cost_host.shape[0]):
        present = np.flatnonzero(mask_host[scene])
        if present.size == 0:
            continue
        rows, cols = linear_sum_assignment(cost_host[scene][:, present])
        scenes.append(np.full(rows.size, scene))
        pred_slots.append(rows)
        true_slots.append(present[cols])
    total = torch.zeros(cost.shape[0], dtype=cost.dtype, device=cost.device)
    if not scenes:
        return total + 0.0 * cost.sum()  # keeps the graph connected
    index = [torch.as_tensor(np.concatenate(part), dtype=torch.long, device=cost.device)
             for part in (scenes, pred_slots, true_slots)]
    return total.index_add(0, index[0], cost[index[0], index[1], index[2]])


class MatchedPairs(NamedTuple):
    """Matched (estimate, truth) pairs over a batch; each field (n_pairs,) int64 numpy."""

    scene: np.ndarray
    est_slot: np.ndarray
    true_slot: np.ndarray


def _as_numpy(array: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def hungarian_match(est_params: np.ndarray | torch.Tensor, est_mask: np.ndarray | torch.Tensor,
                    true_params: np.ndarray | torch.Tensor,
                    true_mask: np.ndarray | torch.Tensor,
                    scales: tuple[float, float, float] = ERROR_SCALES) -> MatchedPairs:
    """Per-scene Hungarian matching of estimates to true sources (SYSTEM.md §5).

    est_params (B, K_est, 3) and true_params (B, K_true, 3): (azimuth rad, elevation rad, range m).
    est_mask (B, K_est) and true_mask (B, K_true) bool mark valid slots. scales: the normalisers of
    the three parameters (default 5 deg, 5 deg, 1 m, in radians and metres). The cost of a pair is
    the Euclidean norm of the normalised differences; each scene yields min(#est, #true) pairs.
    Pairs are ordered by scene, then by true slot.
    """
    est = _as_numpy(est_params, np.float64)
    true = _as_numpy(true_params, np.float64)
    est_valid = _as_numpy(est_mask, bool)
    true_valid = _as_numpy(true_mask, bool)
    if est.ndim != 3 or true.ndim != 3 or est.shape[-1] != 3 or true.shape[-1] != 3:
        raise ValueError(
            f"params must be (B, K, 3), but got {est.shape=} and {true.shape=}"
        )
    scale = np.asarray(scales, dtype=np.float64)
    scenes, est_slots, true_slots = [], [], []
    for scene in range(est.shape[0]):
        est_index = np.flatnonzero(est_valid[scene])
        true_index = np.flatnonzero(true_valid[scene])
        if est_index.size == 0 or true_index.size == 0:
            continue
        difference = (est[scene][est_index][:, None, :] - true[scene][true_index][None, :, :]) / scale
        rows, cols = linear_sum_assignment(np.sqrt(np.square(difference).sum(-1)))
        order = np.argsort(true_index[cols], kind="stable")
        scenes.append(np.full(rows.size, scene, dtype=np.int64))
        est_slots.append(est_index[rows][order])
        true_slots.append(true_index[cols][order])
    if not scenes:
        empty = np.zeros(0, dtype=np.int64)
        return MatchedPairs(empty, empty.copy(), empty.copy())
    return MatchedPairs(*(np.concatenate(part).astype(np.int64)
                          for part in (scenes, est_slots, true_slots)))
