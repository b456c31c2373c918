"""The training loss of SYSTEM.md §4, computed in float32 / complex64 whatever the autocast state.

loss = lam_cov * NMSE(R_blend, R_true) + lam_k * CE(K) + lam_aux * matched(angles, range)
       + lam_det * detection(objectness map, offsets) + lam_gap * eigengap(R_blend)
lam_gap = 0 by default (Fix 3). The detection term supervises the map the source slots are read
from (see pipeline._model); the matched term supervises the slots themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pipeline import _covariance as cov
from pipeline._config import ExperimentConfig
from pipeline._data import SceneBatch
from pipeline._grid import Grid
from pipeline._matching import ERROR_SCALES, matched_parameter_loss
from pipeline._model import ModelOutput

TERMS = ("cov", "k", "aux", "det", "gap")
_HEATMAP_SIGMA_CELLS = 1.0


@dataclass(frozen=True)
class Covariances:
    """R_true, R_samp, R_pred, R_blend in factor form (`LowRank`), each of trace N.

    `.dense()` on any of them gives the (B, N, N) complex64 matrix; the loss never needs it.
    """

    true: cov.LowRank
    samp: cov.LowRank
    pred: cov.LowRank
    blend: cov.LowRank


@dataclass(frozen=True)
class LossTerms:
    """Scalar float32 tensors (batch means). `total` is the weighted sum that is minimised."""

    total: torch.Tensor
    cov: torch.Tensor
    k: torch.Tensor
    aux: torch.Tensor
    det: torch.Tensor
    gap: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TERMS}


def covariances(output: ModelOutput, batch: SceneBatch, config: ExperimentConfig) -> Covariances:
    """Every covariance of one batch, through the one covariance module (all four fixes)."""
    r_true = cov.true_low_rank(batch.steering, batch.power)
    r_samp = cov.sample_low_rank(batch.fields)
    r_pred = cov.predicted_low_rank(output.factor, output.shrinkage)
    return Covariances(true=r_true, samp=r_samp, pred=r_pred,
                       blend=cov.blend_low_rank(r_pred, r_samp, config.beta))


def detection_loss(objectness: torch.Tensor, offsets: torch.Tensor, batch: SceneBatch,
                   grid: Grid) -> torch.Tensor:
    """CenterNet focal loss on the objectness map plus smooth-L1 of the offsets at true cells.

    objectness: (B, R, E, A) logits; offsets: (B, 3, R, E, A) in cells. Each true source marks its
    nearest cell positive; other cells are negatives down-weighted by (1 - g)^4, g a Gaussian of
    the distance to the nearest source in cells. Returns (B,) float32.
    """
    n_batch = objectness.shape[0]
    shape = torch.tensor(grid.shape, device=objectness.device)
    index = grid.to_index(batch.azimuth_rad, batch.elevation_rad,
                          torch.where(batch.source_mask, batch.range_m, 1.0))  # (B, K, 3)
    cell = index.round().long().clamp(torch.zeros_like(shape), shape - 1)
    flat = (cell[..., 0] * shape[1] + cell[..., 1]) * shape[2] + cell[..., 2]  # (B, K)
    axes = [torch.arange(n, device=objectness.device, dtype=index.dtype) for n in grid.shape]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (G, 3)
    distance = (centres[None, None] - index[:, :, None]).square().sum(-1)  # (B, K, G)
    gaussian = torch.exp(-distance / (2 * _HEATMAP_SIGMA_CELLS ** 2))
    gaussian = torch.where(batch.source_mask[..., None], gaussian, 0.0).amax(1)  # (B, G)
    positive = torch.zeros_like(gaussian, dtype=torch.bool)
    positive.scatter_(1, torch.where(batch.source_mask, flat, 0), batch.source_mask)

    logits = objectness.reshape(n_batch, -1).float()
    prob = torch.sigmoid(logits)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = -(1 - prob).square() * log_p
    neg = -prob.square() * (1 - gaussian).pow(4) * log_not_p
    n_pos = positive.sum(1).clamp_min(1)
    focal = torch.where(positive, pos, neg).sum(1) / n_pos

    predicted = offsets.reshape(n_batch, 3, -1).float().gather(
        2, flat[:, None, :].expand(-1, 3, -1)).transpose(1, 2)  # (B, K, 3)
    target = index - cell.to(index.dtype)
    offset_error = F.smooth_l1_loss(predicted, target.clamp(-1, 1), reduction="none").sum(-1)
    offset_term = (offset_error * batch.source_mask).sum(1) / n_pos
    return focal + offset_term


def compute_loss(output: ModelOutput, batch: SceneBatch, config: ExperimentConfig
                 ) -> tuple[LossTerms, Covariances]:
    """The loss terms and the covariances they were computed from."""
    with torch.autocast(device_type=batch.fields.device.type, enabled=False):
        mats = covariances(output, batch, config)
        zero = torch.zeros((), device=batch.fields.device)
        cov_term = cov.nmse_low_rank(mats.blend, mats.true).mean()
        k_term = F.cross_entropy(output.k_logits.float(), batch.n_sources - 1)
        if output.locate_logits is not None and batch.located is not None:
            # the SBL count network's second head: does the answer with the true K localize?
            locate = output.locate_logits.float().gather(1, (batch.n_sources - 1)[:, None])
            k_term = k_term + F.binary_cross_entropy_with_logits(locate.squeeze(1),
                                                                 batch.located)
        aux_term = matched_parameter_loss(
            output.azimuth_rad.float(), output.elevation_rad.float(), output.range_m.float(),
            batch.azimuth_rad, batch.elevation_rad, batch.range_m, batch.source_mask,
            # errors in the units of the evaluation's matching (SYSTEM.md §5)
            scale_azimuth_rad=ERROR_SCALES[0], scale_elevation_rad=ERROR_SCALES[1],
            scale_range_m=ERROR_SCALES[2],
        ).mean()
        det_term = zero
        if output.objectness is not None and output.offsets is not None:
            det_term = detection_loss(output.objectness, output.offsets, batch,
                                      Grid.feature(config)).mean()
        gap_term = zero
        if config.lam_gap > 0:
            gap_term = cov.eigengap_loss(mats.blend.dense(), batch.n_sources).mean()
        total = (config.lam_cov * cov_term + config.lam_k * k_term + config.lam_aux * aux_term
                 + config.lam_det * det_term + config.lam_gap * gap_term)
    terms = LossTerms(total=total, cov=cov_term, k=k_term, aux=aux_term, det=det_term,
                      gap=gap_term)
    return terms, mats
