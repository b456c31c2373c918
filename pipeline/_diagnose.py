"""The scale table behind the four fixes, on one batch of a config's system (`hpo diagnose`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline import _covariance as cov
from pipeline._config import ExperimentConfig
from pipeline._data import iterate_batches
from pipeline._losses import TERMS, compute_loss
from pipeline._model import build_model
from pipeline._physics import Deployment


def _stats(matrix: torch.Tensor) -> dict[str, float]:
    """Batch means of trace and Frobenius norm of (B, N, N) matrices."""
    matrix = matrix.detach()
    return {
        "trace": float(cov.trace(matrix).mean()),
        "frobenius": float(torch.linalg.matrix_norm(matrix).mean()),
    }


def _grads_finite(model: torch.nn.Module, loss: torch.Tensor) -> bool:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()
               if p.grad is not None)


def scale_report(config: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    """Scales, self-NMSE, blend NMSE and finiteness of every loss term and gradient.

    Uses the first training batch of `config` and a freshly initialised network.
    """
    torch.manual_seed(config.seed)
    deployment = Deployment.build(config, device)
    batch = next(iterate_batches(config, deployment, "train", config.batch_size,
                                 config.batch_size, epoch=1))
    model = build_model(config, deployment)
    output = model(batch.measurements, batch.fields)
    terms, mats = compute_loss(output, batch, config)
    n_elements = config.n_elements

    report: dict[str, Any] = {
        "n_elements": n_elements,
        "batch_size": batch.size,
        "beta": config.beta,
        "R_true_unscaled": _stats(cov.true_covariance_unscaled(batch.steering, batch.power)),
        "R_true": _stats(mats.true.dense()),
        "R_samp_unscaled": _stats(cov.sample_covariance_unscaled(batch.fields)),
        "R_samp": _stats(mats.samp.dense()),
        "R_pred": _stats(mats.pred.dense()),
        "R_blend": _stats(mats.blend.dense()),
        # The straightforward dense NMSE, as a check on the factor-form one the loss uses.
        "nmse_true_vs_true": float(cov.nmse(mats.true.dense(), mats.true.dense()).mean()),
        "nmse_blend_vs_true": float(cov.nmse(mats.blend.dense(), mats.true.dense()).mean()
                                    .detach()),
        "nmse_samp_vs_true": float(cov.nmse(mats.samp.dense(), mats.true.dense()).mean()),
        "loss_terms": {name: float(value.detach()) for name, value in terms.as_dict().items()},
        "loss_total": float(terms.total.detach()),
        "loss_terms_finite": all(bool(torch.isfinite(v)) for v in terms.as_dict().values()),
        "gradients_finite": _grads_finite(model, terms.total),
        "eigengap_enabled": config.lam_gap > 0,
    }
    # Fix 3: the eigengap term, switched on, on this rank-deficient R_blend (R_pred has rank
    # <= K_max in N dimensions) must still give finite gradients.
    gap_config = dataclasses.replace(config, lam_gap=config.lam_gap or 1.0)
    gap_terms, _ = compute_loss(model(batch.measurements, batch.fields), batch, gap_config)
    report["eigengap_term"] = float(gap_terms.gap.detach())
    report["eigengap_gradients_finite"] = bool(torch.isfinite(gap_terms.gap)) and _grads_finite(
        model, gap_terms.total)
    report["terms"] = list(TERMS)
    return report
