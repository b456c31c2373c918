"""The four normalization fixes (SYSTEM.md §3), each guarded by a test that fails without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import _covariance as cov
from pipeline._losses import compute_loss
from pipeline._model import ModelOutput


def _assert_hermitian_psd_trace(matrix: torch.Tensor, n: int) -> None:
    assert torch.allclose(matrix, matrix.conj().transpose(-2, -1), atol=1e-5 * n)
    eigenvalues = torch.linalg.eigvalsh(matrix.to(torch.complex128))
    assert float(eigenvalues.min()) > -1e-4 * n
    traces = cov.trace(matrix.to(torch.complex128))
    assert torch.allclose(traces, torch.full_like(traces, float(n)), rtol=1e-5, atol=0)


def test_r_true_is_hermitian_psd_with_trace_n_and_the_fix_does_work(full_batch):
    r_true = cov.true_covariance(full_batch.steering, full_batch.power)
    _assert_hermitian_psd_trace(r_true, 144)
    # Fix 4 is doing work: the simulator's physical trace is orders of magnitude away from N.
    raw = cov.trace(cov.true_covariance_unscaled(full_batch.steering, full_batch.power))
    assert float(raw.min()) > 10 * 144


def test_r_samp_is_hermitian_psd_with_trace_n_and_the_fix_does_work(full_batch):
    r_samp = cov.sample_covariance(full_batch.fields)
    _assert_hermitian_psd_trace(r_samp, 144)
    raw = cov.trace(cov.sample_covariance_unscaled(full_batch.fields))
    assert float(raw.max()) < 144 / 10  # unscaled it is far below N (Fix 1 matters)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_r_pred_has_trace_n_for_any_factor_scale(scale):
    generator = torch.Generator().manual_seed(1)
    factor = torch.randn(8, 144, 5, 2, generator=generator)
    factor = torch.complex(factor[..., 0], factor[..., 1]) * scale
    _assert_hermitian_psd_trace(cov.predicted_covariance(factor), 144)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_r_blend_has_trace_n_for_any_beta(full_batch, beta):
    r_samp = cov.sample_covariance(full_batch.fields)
    factor = full_batch.steering.transpose(-2, -1)[:, :, :3] + 0.1
    r_blend = cov.blend(cov.predicted_covariance(factor), r_samp, beta)
    _assert_hermitian_psd_trace(r_blend, 144)


def test_r_blend_is_not_renormalised_by_its_own_trace(full_batch):
    # Fix 2: the blend is linear in its inputs. A blend that divided by its own trace would map
    # (2 A, B) to a trace-N matrix, not to (1 - beta) 2A + beta B.
    r_samp = cov.sample_covariance(full_batch.fields)
    r_true = cov.true_covariance(full_batch.steering, full_batch.power)
    blended = cov.blend(2.0 * r_true, r_samp, 0.25)
    assert torch.allclose(blended, 0.75 * 2.0 * r_true + 0.25 * r_samp, atol=1e-4)
    assert torch.allclose(cov.trace(blended), torch.full((64,), 1.75 * 144), rtol=1e-5)


def test_tiny_factor_keeps_norms_and_loss_finite_and_of_order_n(full_config, full_batch):
    # The original failure: R_pred from a nearly-zero factor made R_blend 1e12 too large and the
    # loss 1e25. Now a factor of scale 1e-6 gives ordinary numbers.
    generator = torch.Generator().manual_seed(2)
    raw = torch.randn(64, 144, 5, 2, generator=generator) * 1e-6
    factor = torch.complex(raw[..., 0], raw[..., 1]).requires_grad_(True)
    zeros = torch.zeros(64, 5)
    output = ModelOutput(factor=factor, k_logits=torch.zeros(64, 5), azimuth_rad=zeros,
                         elevation_rad=zeros, range_m=zeros + 1.0, weight=zeros + 1.0)
    terms, mats = compute_loss(output, full_batch, full_config)
    for low_rank in (mats.pred, mats.blend, mats.samp, mats.true):
        matrix = low_rank.dense()
        assert torch.isfinite(matrix).all()
        matrix = matrix.detach()
        assert 0.1 * 144 < float(cov.trace(matrix).mean()) < 10 * 144
        norm = float(torch.linalg.matrix_norm(matrix).mean())
        assert 1.0 < norm < 144  # Frobenius between sqrt(N)=12 (white) and N (rank one)
    assert torch.isfinite(terms.total) and float(terms.total.detach()) < 100
    terms.total.backward()
    assert torch.isfinite(factor.grad).all()


def test_nmse_reference_values(full_batch):
    r_true = cov.true_covariance(full_batch.steering, full_batch.power)
    assert float(cov.nmse(r_true, r_true).abs().max()) == 0.0
    assert torch.allclose(cov.nmse(torch.zeros_like(r_true), r_true), torch.ones(64))
    assert float(cov.nmse(2 * r_true, r_true).mean()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("diag_loading", [0.0, 0.5])
def test_perfect_prediction_has_zero_covariance_loss(full_config, full_batch, diag_loading):
    # The factor sqrt(p_k) a_k reproduces R_true; with beta = 0 the covariance loss is exactly the
    # NMSE of R_true against itself, and inference-only diagonal loading leaves no floor.
    config = dataclasses.replace(full_config, beta=0.0, diag_loading=diag_loading)
    factor = (full_batch.steering * full_batch.power.sqrt()[..., None]).transpose(-2, -1)
    output = ModelOutput(factor=factor, k_logits=torch.zeros(64, 5),
                         azimuth_rad=full_batch.azimuth_rad,
                         elevation_rad=full_batch.elevation_rad, range_m=full_batch.range_m,
                         weight=full_batch.power)
    terms, _ = compute_loss(output, full_batch, config)
    assert float(terms.cov) < 1e-10
    assert float(terms.aux) < 1e-6


def test_eigengap_is_off_by_default(full_config):
    assert full_config.lam_gap == 0.0


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_eigengap_gradients_are_finite_on_rank_deficient_predictions(rank):
    # Fix 3: R_pred has rank <= 5 in 144 dimensions, so most eigenvalues repeat (at zero).
    generator = torch.Generator().manual_seed(rank)
    raw = torch.randn(4, 144, rank, 2, generator=generator)
    factor = torch.complex(raw[..., 0], raw[..., 1]).requires_grad_(True)
    r_pred = cov.predicted_covariance(factor)
    n_sources = torch.full((4,), rank)
    loss = cov.eigengap_loss(r_pred, n_sources).mean() + cov.eigengap_loss(
        r_pred, n_sources.clamp(max=4) + 1).mean()  # gaps inside the repeated zero block too
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(factor.grad).all()
    assert float(factor.grad.abs().sum()) > 0
