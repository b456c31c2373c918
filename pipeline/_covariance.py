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

from dataclasses import dataclass

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


# --- Factor form -------------------------------------------------------------------------------
# Every covariance the loss and validation need is low rank plus a multiple of I: R_true has rank
# K, R_samp rank L, R_pred = (1 - g) F F^H + g I, and R_blend mixes them. Held as a factor P
# (B, N, r), column weights w (B, r) >= 0 and a diagonal c (B,), R = P diag(w) P^H + c I, they
# cost O(N r) instead of O(N^2) each, and the NMSE between two of them needs only r x r Gram
# matrices (G_PQ = P^H Q, <A, B> = sum_ij w_i v_j |G_PQ[i, j]|^2 for the low-rank parts):
#   ||R_P - R_Q||_F^2 = <P, P> + <Q, Q> - 2 <P, Q> + 2 (c - d) (tr_P - tr_Q) + (c - d)^2 N,
# tr_P = sum_i w_i ||p_i||^2 the trace of the low-rank part. The weights keep square roots out
# of the differentiable path (sqrt(1 - g) has an infinite slope where a sigmoid saturates at 1).
# The dense functions above are the straightforward definitions; tests hold the two together.


@dataclass(frozen=True)
class LowRank:
    """R = factor diag(weight) factor^H + identity * I.

    factor (B, N, r) complex64, weight (B, r) float32 >= 0, identity (B,) float32.
    """

    factor: torch.Tensor
    weight: torch.Tensor
    identity: torch.Tensor

    @property
    def n_elements(self) -> int:
        return self.factor.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.factor.device

    def __len__(self) -> int:
        return self.factor.shape[0]

    def dense(self) -> torch.Tensor:
        """The (B, N, N) complex64 matrix."""
        eye = torch.eye(self.n_elements, dtype=torch.complex64, device=self.factor.device)
        outer = (self.factor * self.weight[:, None, :]) @ self.factor.conj().transpose(-2, -1)
        return hermitian(outer) + self.identity.to(torch.float32)[:, None, None] * eye

    def low_rank_trace(self) -> torch.Tensor:
        """Trace of the low-rank part; (B,) float32."""
        return (_column_energy(self.factor) * self.weight).sum(-1)

    def trace(self) -> torch.Tensor:
        return self.low_rank_trace() + self.identity * self.n_elements

    def weighted_factor(self) -> torch.Tensor:
        """factor diag(sqrt(weight)): the same low-rank part as one plain factor (no gradient
        needed: for inference, e.g. MUSIC's subspace)."""
        return self.factor * self.weight.clamp_min(0).sqrt()[:, None, :]

    def select(self, index: slice | torch.Tensor) -> LowRank:
        return LowRank(self.factor[index], self.weight[index], self.identity[index])

    def detach(self) -> LowRank:
        return LowRank(self.factor.detach(), self.weight.detach(), self.identity.detach())

    def with_loading(self, loading: float) -> LowRank:
        """R + loading * I (diagonal loading, inference only)."""
        return LowRank(self.factor, self.weight, self.identity + loading)

    @staticmethod
    def cat(parts: list[LowRank]) -> LowRank:
        return LowRank(*(torch.cat([getattr(p, name) for p in parts])
                         for name in ("factor", "weight", "identity")))


def _column_energy(factor: torch.Tensor) -> torch.Tensor:
    """||column||^2 of each column; (B, r) float32."""
    return torch.view_as_real(factor).square().sum(dim=(-3, -1))


def _trace_n(factor: torch.Tensor, weight: torch.Tensor, identity: torch.Tensor | None = None
             ) -> LowRank:
    """The LowRank with its low-rank part scaled to trace N (weights scaled, no square root)."""
    n_elements = factor.shape[-2]
    energy = (_column_energy(factor) * weight).sum(-1, keepdim=True).clamp_min(1e-30)
    if identity is None:
        identity = torch.zeros(factor.shape[0], device=factor.device)
    return LowRank(factor, weight * (n_elements / energy), identity)


def true_low_rank(steering: torch.Tensor, power: torch.Tensor) -> LowRank:
    """Fix 4 in factor form: R_true = sum_k p_k a_k a_k^H scaled to trace N; factor (B, N, K)."""
    return _trace_n(_complex64(steering).transpose(-2, -1), power.to(torch.float32))


def sample_low_rank(fields: torch.Tensor) -> LowRank:
    """Fix 1 in factor form: R_samp = (1/L) X^T X^* scaled to trace N; factor (B, N, L).

    The 1/L drops out of the trace scaling; a matrix of the form X^T X^* is Hermitian PSD by
    construction.
    """
    factor = _complex64(fields).transpose(-2, -1)
    return _trace_n(factor, torch.ones(factor.shape[0], factor.shape[-1], device=factor.device))


def predicted_low_rank(factor: torch.Tensor, shrinkage: torch.Tensor | None = None) -> LowRank:
    """R_pred = (1 - g) F F^H + g I with F F^H at trace N, as `predicted_covariance`."""
    factor = _complex64(factor)
    ones = torch.ones(factor.shape[0], factor.shape[-1], device=factor.device)
    scaled = _trace_n(factor, ones)
    if shrinkage is None:
        return scaled
    gamma = shrinkage.to(torch.float32)
    return LowRank(factor, scaled.weight * (1.0 - gamma)[:, None], gamma)


def blend_low_rank(r_pred: LowRank, r_samp: LowRank, beta: float) -> LowRank:
    """Fix 2 in factor form: (1 - beta) R_pred + beta R_samp, never divided by its trace."""
    return LowRank(torch.cat([r_pred.factor, r_samp.factor], dim=-1),
                   torch.cat([(1.0 - beta) * r_pred.weight, beta * r_samp.weight], dim=-1),
                   (1.0 - beta) * r_pred.identity + beta * r_samp.identity)


def _inner(left: LowRank, right: LowRank) -> torch.Tensor:
    """<L, R>_F of the low-rank parts: sum_ij w_i v_j |(P^H Q)_ij|^2; (B,) float64."""
    gram = (left.factor.to(torch.complex128).conj().transpose(-2, -1)
            @ right.factor.to(torch.complex128))  # (B, r_left, r_right)
    magnitude = torch.view_as_real(gram).square().sum(-1)
    return (left.weight.double()[:, :, None] * magnitude
            * right.weight.double()[:, None, :]).sum(dim=(-2, -1))


def nmse_low_rank(estimate: LowRank, target: LowRank) -> torch.Tensor:
    """`nmse(estimate.dense(), target.dense())` from r x r Gram matrices; (B,) float32.

    The error is a difference of norms, ||A||^2 + ||B||^2 - 2 <A, B>; in float32 its rounding
    would leave ~1e-7 where A = B (the dense form gives exactly 0), so the r x r products and the
    sums run in float64 (r x r: cheap).
    """
    n = estimate.n_elements
    pp, qq, pq = _inner(estimate, estimate), _inner(target, target), _inner(estimate, target)
    c, d = estimate.identity.double(), target.identity.double()
    tp, tq = estimate.low_rank_trace().double(), target.low_rank_trace().double()
    target_norm = qq + 2 * d * tq + d * d * n
    error = pp + qq - 2 * pq + 2 * (c - d) * (tp - tq) + (c - d).square() * n
    return (error.clamp_min(0.0) / target_norm.clamp_min(_TINY)).float()
