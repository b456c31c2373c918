"""Classical references on the validation scenes, to put a trained model's numbers in context."""

from __future__ import annotations

import torch

from pipeline import _covariance as cov
from pipeline._config import ExperimentConfig
from pipeline._counting import mdl_estimate
from pipeline._data import load_split
from pipeline._music import evaluate_covariances
from pipeline._physics import Deployment


@torch.no_grad()
def reference_metrics(config: ExperimentConfig, device: torch.device) -> dict[str, dict]:
    """Metrics of covariances that need no training, on the same validation scenes as `train`.

    "identity": the uninformed trace-N guess (NMSE only). "R_samp (MDL K)": the classical
    pipeline, MUSIC on R_samp with MDL's source count. "R_samp (true K)": the same, told K.
    """
    deployment = Deployment.build(config, device)
    n_scenes = min(config.n_val, config.n_val_localize)
    val = load_split(config, deployment, "val", n_scenes)
    r_true = cov.true_covariance(val.steering, val.power)
    r_samp = cov.sample_covariance(val.fields)
    identity = torch.eye(config.n_elements, dtype=torch.complex64, device=device).expand_as(r_true)
    k_mdl = mdl_estimate(r_samp, config.n_snapshots).clamp(1, config.max_sources)
    return {
        "identity": {"val_nmse": float(cov.nmse(identity, r_true).mean())},
        "R_samp (MDL K)": {"val_nmse": float(cov.nmse(r_samp, r_true).mean()),
                           **evaluate_covariances(r_samp, k_mdl, val, deployment, config)},
        "R_samp (true K)": evaluate_covariances(r_samp, val.n_sources, val, deployment, config),
    }
