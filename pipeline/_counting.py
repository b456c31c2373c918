"""Classical source counting (SYSTEM.md §5): MDL on a covariance's eigenvalues."""

from __future__ import annotations

import math

import torch

from pipeline._config import ExperimentConfig
from pipeline._covariance import hermitian
from pipeline._linalg import eigh


def mdl_estimate(covariance: torch.Tensor, n_snapshots: int, *,
                 max_sources: int = ExperimentConfig.max_sources) -> torch.Tensor:
    """Source count by the MDL criterion (Wax-Kailath) on the eigenvalues; (B,) int64 in 1..K_max.

    covariance: (B, N, N) complex. Only the n = min(N, n_snapshots) largest eigenvalues take part:
    a covariance from L snapshots has rank <= L, and the zero eigenvalues beyond would make the
    noise-subspace geometric mean zero. MDL(k) = -L (n - k) log(geometric / arithmetic mean of
    eigenvalues k+1..n) + k (2n - k) log(L) / 2, minimised over k = 0..min(K_max, n - 1).
    """
    if n_snapshots < 2:
        raise ValueError(f"n_snapshots must be >= 2, but got {n_snapshots=}")
    eigenvalues, _ = eigh(hermitian(covariance.to(torch.complex64)), vectors=False)
    eigenvalues = eigenvalues.to(torch.float64).flip(-1)  # descending, (B, N)
    n_used = min(eigenvalues.shape[-1], n_snapshots)
    eigenvalues = eigenvalues[..., :n_used]
    floor = eigenvalues[..., :1].clamp_min(1e-30) * 1e-12
    eigenvalues = torch.maximum(eigenvalues, floor)
    k_top = min(max_sources, n_used - 1)
    criteria = []
    for k in range(k_top + 1):
        tail = eigenvalues[..., k:]
        n_tail = n_used - k
        log_geometric = tail.log().mean(-1)
        log_arithmetic = tail.mean(-1).log()
        likelihood = -n_snapshots * n_tail * (log_geometric - log_arithmetic)
        penalty = 0.5 * k * (2 * n_used - k) * math.log(n_snapshots)
        criteria.append(likelihood + penalty)
    estimate = torch.stack(criteria, dim=-1).argmin(-1)
    return estimate.clamp(1, max(max_sources, 1)).to(torch.long)
