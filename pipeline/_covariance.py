"""The one covariance module (SYSTEM.md §3): R_true, R_samp, R_pred, R_blend and their losses.

The four normalization fixes live here and nowhere else:
  Fix 1  R_samp is made Hermitian and scaled to trace N          (`sample_covariance`)
  Fix 2  R_blend is NOT renormalised by its own trace            (`blend`)
  Fix 3  the eigengap term is off by default and, when used, takes eigenvalue-only gradients
         (`eigvalsh`), never `eigh` eigenvectors                  (`eigengap_loss`)
  Fix 4  R_true is scaled to trace N                              (`true_covariance`)
All arithmetic here runs in complex64 / float32, also when called under autocast.
"""

from __future__ import annotations

import torch

_TINY = 1e-12


def hermitian(matrix: torch.Tensor) -> torch.Tensor:
    """(A + A^H) / 2 over the last two dims."""
    return 0.5 * (matrix + matrix.conj().transpose(-2, -1))


def trace(matrix: torch.Tensor) -> torch.Tensor:
    """Real part of the trace over the last two dims; (...,) float."""
    return torch.diagonal(matrix, dim1=-2, dim2=-1).real.sum(-1)


def scale_to_trace(matrix: torch.Tensor, target: float) -> torch.Tensor:
    """matrix * target / trace(matrix), per batch element."""
    return matrix * (target / trace(matrix).clamp_min(_TINY))[..., None, None]


def _complex64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.complex64)


def true_covariance_unscaled(steering: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """sum_k p_k a_k a_k^H. steering (B, K, N) complex, power (B, K) float (0 for absent slots).

    Returns (B, N, N) complex64 at the simulator's physical scale (trace = N sum_k p_k).
    """
    steering = _complex64(steering)
    weighted = steering * power.to(torch.float32)[..., None]
    return hermitian(torch.einsum("bkn,bkm->bnm", weighted, steering.conj()))


def true_covariance(steering: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """Fix 4: R_true scaled to trace N. (B, N, N) complex64, Hermitian PSD."""
    raw = true_covariance_unscaled(steering, power)
    return scale_to_trace(raw, raw.shape[-1])


def sample_covariance_unscaled(fields: torch.Tensor) -> torch.Tensor:
    """(1/L) sum_l x_hat_l x_hat_l^H from fields (B, L, N) complex; (B, N, N) complex64."""
    fields = _complex64(fields)
    return hermitian(torch.einsum("bln,blm->bnm", fields, fields.conj()) / fields.shape[1])


def sample_covariance(fields: torch.Tensor) -> torch.Tensor:
    """Fix 1: R_samp made Hermitian and scaled to trace N. (B, N, N) complex64, PSD."""
    raw = sample_covariance_unscaled(fields)
    return scale_to_trace(raw, raw.shape[-1])


def predicted_covariance(factor: torch.Tensor, shrinkage: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """R_pred = F F^H scaled to trace N, optionally shrunk towards I: (1 - g) F F^H + g I.

    factor: (B, N, r) complex; shrinkage: (B,) in [0, 1] or None. Returns (B, N, N) complex64,
    Hermitian PSD with trace N. The shrunk form is itself F' F'^H with F' = [sqrt(1-g) F, sqrt(g) I].
    The scale is taken from ||F||_F^2 (= trace F F^H) so that a factor of any magnitude, 1e-6
    included, gives the same R_pred: the division is by a sum of squares, not by a difference.
    """
    factor = _complex64(factor)
    n_elements = factor.shape[-2]
    energy = factor.abs().square().sum(dim=(-2, -1)).clamp_min(1e-30)
    factor = factor * torch.sqrt(n_elements / energy)[..., None, None]
    r_pred = hermitian(factor @ factor.conj().transpose(-2, -1))
    if shrinkage is None:
        return r_pred
    gamma = shrinkage.to(torch.float32)[..., None, None]
    eye = torch.eye(n_elements, dtype=r_pred.dtype, device=r_pred.device)
    return (1.0 - gamma) * r_pred + gamma * eye


def blend(r_pred: torch.Tensor, r_samp: torch.Tensor, beta: float | torch.Tensor,
          diag_loading: float = 0.0) -> torch.Tensor:
    """Fix 2: R_blend = (1 - beta) R_pred + beta R_samp (+ delta I); never divided by its trace.

    Both inputs have trace N, so R_blend has trace N (N (1 + delta) with loading). Diagonal loading
    is for inference only (evaluation, MUSIC); training calls this with diag_loading=0, so a
    perfect prediction has zero loss.
    """
    mixed = (1.0 - beta) * _complex64(r_pred) + beta * _complex64(r_samp)
    if diag_loading:
        eye = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed + diag_loading * eye
    return mixed


def nmse(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||estimate - target||_F^2 / ||target||_F^2 per scene; (B,) float32."""
    estimate, target = _complex64(estimate), _complex64(target)
    error = (estimate - target).abs().square().sum(dim=(-2, -1))
    return error / target.abs().square().sum(dim=(-2, -1)).clamp_min(_TINY)


def eigengap_loss(covariance: torch.Tensor, n_sources: torch.Tensor) -> torch.Tensor:
    """Fix 3: -log of the normalised gap between eigenvalue K and K+1; (B,) float32.

    Uses `torch.linalg.eigvalsh`, whose backward needs no eigenvalue differences, so gradients stay
    finite on rank-deficient (repeated-eigenvalue) matrices where `eigh`'s backward gives NaN.
    n_sources: (B,) int64 in 1..N-1.
    """
    eigenvalues = torch.linalg.eigvalsh(hermitian(_complex64(covariance)))  # ascending, (B, N)
    descending = eigenvalues.flip(-1)
    index = n_sources.long().clamp(1, descending.shape[-1] - 1)[:, None]
    lam_k = descending.gather(-1, index - 1).squeeze(-1)
    lam_k1 = descending.gather(-1, index).squeeze(-1)
    gap = (lam_k - lam_k1) / trace(covariance).clamp_min(_TINY)
    return -torch.log(gap.clamp_min(1e-6))
