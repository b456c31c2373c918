"""The fast factor-form covariances against the straightforward dense definitions.

The loss and validation hold R_true, R_samp, R_pred and R_blend as P P^H + c I (pipeline.
_covariance.LowRank) and never build N x N matrices; these tests hold every fast path to the
dense one it replaces: the matrices, the NMSE and its gradients, and MUSIC's signal subspace and
estimates.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import _covariance as cov
from pipeline._music import music_localize, signal_subspace


def _random_factor(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(*shape, 2, generator=generator) * scale
    return torch.complex(raw[..., 0], raw[..., 1])


@pytest.fixture(scope="module")
def prediction(full_batch):
    factor = _random_factor(1, (full_batch.size, 144, 5))
    shrinkage = torch.rand(full_batch.size, generator=torch.Generator().manual_seed(2)) * 0.6
    return factor, shrinkage


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_each_factor_form_equals_its_dense_definition(full_batch, prediction):
    factor, shrinkage = prediction
    pairs = {
        "true": (cov.true_low_rank(full_batch.steering, full_batch.power),
                 cov.true_covariance(full_batch.steering, full_batch.power)),
        "samp": (cov.sample_low_rank(full_batch.fields),
                 cov.sample_covariance(full_batch.fields)),
        "pred": (cov.predicted_low_rank(factor, shrinkage),
                 cov.predicted_covariance(factor, shrinkage)),
        "pred, no shrinkage": (cov.predicted_low_rank(factor), cov.predicted_covariance(factor)),
    }
    pairs["blend"] = (cov.blend_low_rank(pairs["pred"][0], pairs["samp"][0], 0.3),
                      cov.blend(pairs["pred"][1], pairs["samp"][1], 0.3))
    for name, (low_rank, dense) in pairs.items():
        assert _relative(low_rank.dense(), dense) < 1e-5, name
        # Fixes 1, 2 and 4 hold in factor form too: every trace is N, the blend is not rescaled.
        assert torch.allclose(low_rank.trace(), torch.full((full_batch.size,), 144.0),
                              rtol=1e-5), name


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_factor_form_nmse_and_its_gradients_equal_the_dense_ones(full_batch, prediction, beta):
    factor, shrinkage = prediction

    def loss(fast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = factor.clone().requires_grad_(True)
        g = shrinkage.clone().requires_grad_(True)
        if fast:
            blended = cov.blend_low_rank(cov.predicted_low_rank(f, g),
                                         cov.sample_low_rank(full_batch.fields), beta)
            value = cov.nmse_low_rank(
                blended, cov.true_low_rank(full_batch.steering, full_batch.power))
        else:
            blended = cov.blend(cov.predicted_covariance(f, g),
                                cov.sample_covariance(full_batch.fields), beta)
            value = cov.nmse(blended, cov.true_covariance(full_batch.steering, full_batch.power))
        value.mean().backward()
        return value.detach(), f.grad, g.grad

    fast, dense = loss(True), loss(False)
    assert torch.allclose(fast[0], dense[0], rtol=1e-5, atol=1e-6)
    assert float(dense[0].min()) > 0.05  # a real error, not a cancellation to zero
    if beta < 1.0:
        assert _relative(fast[1], dense[1]) < 1e-4
        assert _relative(fast[2], dense[2]) < 1e-4


def test_factor_form_nmse_of_a_covariance_with_itself_is_zero(full_batch):
    r_true = cov.true_low_rank(full_batch.steering, full_batch.power)
    assert float(cov.nmse_low_rank(r_true, r_true).abs().max()) < 1e-6
    zero = cov.LowRank(r_true.factor, torch.zeros_like(r_true.weight),
                       torch.zeros(full_batch.size))
    assert torch.allclose(cov.nmse_low_rank(zero, r_true), torch.ones(full_batch.size))


def test_low_rank_signal_subspace_spans_the_dense_one(full_batch, prediction):
    factor, shrinkage = prediction
    covariances = [
        cov.true_low_rank(full_batch.steering, full_batch.power),
        cov.sample_low_rank(full_batch.fields),
        cov.blend_low_rank(cov.predicted_low_rank(factor, shrinkage),
                           cov.sample_low_rank(full_batch.fields), 0.2),
    ]
    for low_rank in covariances:
        fast = signal_subspace(low_rank, full_batch.n_sources, 5)
        dense = signal_subspace(low_rank.dense(), full_batch.n_sources, 5)
        # Eigenvectors are defined up to phase: compare the projectors onto them.
        projector = [e @ e.conj().transpose(-2, -1) for e in (fast, dense)]
        assert float((projector[0] - projector[1]).abs().max()) < 1e-4


def test_music_on_the_factor_form_finds_what_music_on_the_dense_matrix_finds(
        full_config, full_deployment, full_batch):
    r_samp = cov.sample_low_rank(full_batch.fields)
    fast = music_localize(r_samp, full_batch.n_sources, full_deployment, full_config)
    dense = music_localize(r_samp.dense(), full_batch.n_sources, full_deployment, full_config)
    assert torch.equal(fast.mask, dense.mask)
    for name in ("azimuth_rad", "elevation_rad", "range_m"):
        same = torch.isclose(getattr(fast, name), getattr(dense, name), rtol=1e-4, atol=1e-5)
        assert float(same.float().mean()) > 0.99, name  # a near-tie may pick another peak


def test_gradients_stay_finite_where_the_shrinkage_saturates_at_one(full_batch, prediction):
    # sigmoid(30) is exactly 1.0 in float32: R_pred = I. A square root of (1 - g) on the
    # differentiable path would have an infinite slope there (a NaN gradient seen in training).
    factor = prediction[0].clone().requires_grad_(True)
    logits = torch.full((full_batch.size,), 30.0, requires_grad=True)
    shrinkage = torch.sigmoid(logits)
    assert float(shrinkage.detach().min()) == 1.0
    blended = cov.blend_low_rank(cov.predicted_low_rank(factor, shrinkage),
                                 cov.sample_low_rank(full_batch.fields), 0.2)
    loss = cov.nmse_low_rank(blended, cov.true_low_rank(full_batch.steering, full_batch.power))
    loss.mean().backward()
    assert torch.isfinite(factor.grad).all() and torch.isfinite(logits.grad).all()


def test_gradients_stay_finite_when_every_slot_weight_underflows_to_zero(full_config,
                                                                         full_batch):
    from pipeline._losses import compute_loss
    from pipeline._model import build_model
    from pipeline._physics import Deployment

    torch.manual_seed(0)
    model = build_model(full_config, Deployment.build(full_config))
    with torch.no_grad():  # objectness logits of -200: every slot's sigmoid weight is exactly 0
        model.detect.bias[: full_config.n_grid_range] = -200.0
    output = model(full_batch.measurements, full_batch.fields)
    assert float(output.weight.detach().max()) == 0.0
    terms, _ = compute_loss(output, full_batch, full_config)
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
