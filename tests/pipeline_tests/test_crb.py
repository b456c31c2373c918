"""The Cramer-Rao bound of the RIS-coded measurement model (pipeline._crb).

Checked against an independent finite-difference Fisher information (the Hessian of the
Kullback-Leibler divergence between the model's Gaussians, which uses neither the analytic
derivatives nor the Slepian-Bangs formula), against the textbook closed form of a far-field
uniform linear array with one source, for its 1/SNR fall at high SNR, and against oracle MUSIC.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline._config import ExperimentConfig, replace
from pipeline._covariance import true_covariance
from pipeline._crb import (
    bound_from_fisher,
    cramer_rao_bound,
    expected_noise_variance,
    steering_with_derivatives,
    stochastic_fisher,
)
from pipeline._data import SceneBatch, generate_scenes
from pipeline._metrics import localization_metrics, matched_errors
from pipeline._music import music_localize
from pipeline._physics import Deployment, coded_operator, element_positions, steering_vectors

SMOKE = ExperimentConfig(n_ris_rows=6, n_ris_cols=6, n_bs_antennas=8, n_snapshots=8,
                         max_sources=3, range_max_m=4.0)
QUICK = ExperimentConfig(range_max_m=4.0)  # the real array, N = 144, K uniform on 1..5


def test_steering_derivatives_match_finite_differences() -> None:
    elements = element_positions(QUICK, dtype=torch.float64)
    azimuth = torch.tensor([0.3, -0.9], dtype=torch.float64)
    elevation = torch.tensor([0.1, -0.4], dtype=torch.float64)
    range_m = torch.tensor([0.7, 3.5], dtype=torch.float64)
    steering, derivative = steering_with_derivatives(azimuth, elevation, range_m, elements,
                                                     QUICK.wavenumber)
    torch.testing.assert_close(
        steering, steering_vectors(azimuth, elevation, range_m, elements, QUICK.wavenumber),
        rtol=0, atol=1e-12)
    step = 1e-6
    for axis in range(3):
        shift = [torch.zeros(2, dtype=torch.float64) for _ in range(3)]
        shift[axis] = shift[axis] + step
        plus = steering_vectors(azimuth + shift[0], elevation + shift[1], range_m + shift[2],
                                elements, QUICK.wavenumber)
        minus = steering_vectors(azimuth - shift[0], elevation - shift[1], range_m - shift[2],
                                 elements, QUICK.wavenumber)
        numeric = (plus - minus) / (2 * step)
        error = (numeric - derivative[:, axis]).abs().max() / derivative[:, axis].abs().max()
        assert error < 1e-7, (axis, float(error))


def _model_covariances(theta: torch.Tensor, operator: torch.Tensor, elements: torch.Tensor,
                       wavenumber: float, n_sources: int) -> torch.Tensor:
    """R_l(theta) = Phi_l A P A^H Phi_l^H + sigma^2 I, built directly; (L, M, M) complex128.

    theta = (az_1, el_1, r_1, ..., az_K, el_K, r_K, p_1..p_K, sigma^2).
    """
    location = theta[:3 * n_sources].reshape(n_sources, 3)
    power = theta[3 * n_sources:4 * n_sources]
    noise = theta[-1]
    steering = steering_vectors(location[:, 0], location[:, 1], location[:, 2], elements,
                                wavenumber)  # (K, N)
    coded = operator @ steering.T  # (L, M, K)
    eye = torch.eye(operator.shape[1], dtype=torch.complex128)
    return (coded * power) @ coded.conj().transpose(-2, -1) + noise * eye


def _kl(theta: torch.Tensor, reference: torch.Tensor, *args) -> float:
    """KL(N(0, R(reference)) || N(0, R(theta))) summed over the snapshots."""
    r_ref = _model_covariances(reference, *args)
    r_theta = _model_covariances(theta, *args)
    product = torch.linalg.solve(r_theta, r_ref)
    trace = torch.diagonal(product, dim1=-2, dim2=-1).sum(-1).real
    log_det = torch.linalg.slogdet(product).logabsdet
    return float((trace - log_det - r_ref.shape[-1]).sum())


def test_fisher_information_matches_a_finite_difference_of_the_likelihood() -> None:
    """Fisher = Hessian of the KL divergence at the truth; taken by central differences."""
    elements = element_positions(SMOKE, dtype=torch.float64)
    operator = coded_operator(SMOKE)
    azimuth = torch.tensor([0.35, -0.5], dtype=torch.float64)
    elevation = torch.tensor([0.2, -0.1], dtype=torch.float64)
    range_m = torch.tensor([1.2, 2.5], dtype=torch.float64)
    power = torch.tensor([1.0, 0.4], dtype=torch.float64)
    noise = torch.tensor(0.3, dtype=torch.float64)
    steering, derivative = steering_with_derivatives(azimuth, elevation, range_m, elements,
                                                     SMOKE.wavenumber)
    analytic = stochastic_fisher(operator, steering[None], derivative[None], power[None],
                                 noise[None])[0]

    theta = torch.cat([torch.stack([azimuth, elevation, range_m], -1).reshape(-1), power,
                       noise[None]])
    steps = torch.cat([torch.full((6,), 1e-4, dtype=torch.float64), 1e-4 * power,
                       1e-4 * noise[None]])
    args = (theta, operator, elements, SMOKE.wavenumber, 2)
    n_params = theta.numel()
    numeric = torch.zeros(n_params, n_params, dtype=torch.float64)
    for i in range(n_params):
        for j in range(i, n_params):
            total = 0.0
            for si, sj, sign in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
                shifted = theta.clone()
                shifted[i] += si * steps[i]
                shifted[j] += sj * steps[j]
                total += sign * _kl(shifted, *args)
            numeric[i, j] = numeric[j, i] = total / (4 * steps[i] * steps[j])
    # Compare in correlation form: the parameters' units differ by orders of magnitude.
    scale = analytic.diagonal().rsqrt()
    torch.testing.assert_close(numeric * scale[:, None] * scale[None, :],
                               analytic * scale[:, None] * scale[None, :], rtol=0, atol=2e-4)
    assert (analytic.diagonal() > 0).all()


def _ula_closed_form(n_elements: int, n_snapshots: int, snr: float, azimuth: float) -> float:
    """Stochastic CRB of one source on a half-wavelength ULA, unknown power and noise:
    6 / (L N (N^2 - 1) pi^2 cos^2 phi) * (1 / SNR) * (1 + 1 / (N SNR))  (Stoica & Nehorai 1990)."""
    n = n_elements
    return (6.0 / (n_snapshots * n * (n * n - 1) * math.pi ** 2 * math.cos(azimuth) ** 2)
            / snr * (1.0 + 1.0 / (n * snr)))


@pytest.mark.parametrize("snr_db,azimuth", [(-5.0, 0.0), (10.0, 0.6), (30.0, -1.0)])
def test_far_field_linear_array_matches_the_closed_form(snr_db: float, azimuth: float) -> None:
    """A 12 x 1 'RIS' (a ULA along y), measured directly (Phi_l = I), source far away at
    elevation 0: the exact spherical steering and its derivative, through the same Fisher and
    inversion code as the real model, reproduce the textbook bound of a ULA."""
    config = ExperimentConfig(n_ris_rows=12, n_ris_cols=1)
    n_elements, n_snapshots = 12, 16
    elements = element_positions(config, dtype=torch.float64)
    steering, derivative = steering_with_derivatives(
        torch.tensor([azimuth], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
        torch.tensor([1e6], dtype=torch.float64), elements, config.wavenumber)
    operator = torch.eye(n_elements, dtype=torch.complex128).expand(n_snapshots, -1, -1)
    snr = 10.0 ** (snr_db / 10.0)
    fisher = stochastic_fisher(operator, steering[None], derivative[None, :, :1], # azimuth only
                               torch.tensor([[snr]]), torch.tensor([1.0]))
    bound = float(bound_from_fisher(fisher, 1, 1)[0, 0, 0])
    assert bound == pytest.approx(_ula_closed_form(n_elements, n_snapshots, snr, azimuth),
                                  rel=1e-4)


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return Deployment.build(QUICK)


@pytest.fixture(scope="module")
def scenes(deployment: Deployment) -> SceneBatch:
    config = replace(QUICK, snr_db_min=15.0, snr_db_max=20.0)
    return generate_scenes(config, deployment, 100, seed=5)


def test_bound_falls_as_one_over_snr_at_high_snr(scenes: SceneBatch) -> None:
    part = scenes.select(slice(0, 30))
    bounds = [cramer_rao_bound(dataclasses.replace(part, snr_db=torch.full_like(part.snr_db, s)),
                               QUICK)[part.source_mask] for s in (20.0, 30.0, 40.0)]
    # The slope of log CRB against log SNR, per source and parameter, between 30 and 40 dB.
    slope = torch.log10(bounds[2] / bounds[1]) / 1.0
    assert ((slope > -1.05) & (slope < -0.95)).all(), slope
    assert (bounds[0] > bounds[1]).all() and (bounds[1] > bounds[2]).all()


def test_bound_layout_grouping_and_nuisance(scenes: SceneBatch) -> None:
    part = scenes.select(slice(0, 20))
    joint = cramer_rao_bound(part, QUICK)
    assert joint.shape == (20, QUICK.max_sources, 3) and joint.dtype == torch.float64
    assert torch.isnan(joint[~part.source_mask]).all()
    assert (torch.isfinite(joint[part.source_mask]) & (joint[part.source_mask] > 0)).all()
    # A scene's bound does not depend on which other scenes it is computed with.
    alone = cramer_rao_bound(part.select(slice(3, 4)), QUICK)
    torch.testing.assert_close(alone[0], joint[3], equal_nan=True, rtol=1e-9, atol=0)
    # Estimating the other sources, the powers and the noise too can only raise the bound.
    known = cramer_rao_bound(part, QUICK, nuisance="known_nuisance")
    valid = part.source_mask
    assert (joint[valid] >= known[valid] * (1 - 1e-9)).all()


def test_expected_noise_variance_is_the_mean_signal_power_over_the_snr(
        scenes: SceneBatch) -> None:
    """The simulator sets sigma^2 = (realised mean |Phi_l A s_l|^2) / SNR; the bound uses the
    expectation over the symbols. Averaged over many symbol draws the two agree."""
    part = scenes.select(slice(0, 4))
    coded = torch.einsum("lmn,bkn->blmk", coded_operator(QUICK),
                         part.steering.to(torch.complex128))  # (B, L, M, K)
    generator = torch.Generator().manual_seed(0)
    draws = 4000
    symbols = torch.complex(torch.randn(draws, *part.power.shape, QUICK.n_snapshots,
                                        generator=generator, dtype=torch.float64),
                            torch.randn(draws, *part.power.shape, QUICK.n_snapshots,
                                        generator=generator, dtype=torch.float64)) / math.sqrt(2)
    amplitudes = symbols * part.power.to(torch.float64).sqrt()[None, :, :, None]
    clean = torch.einsum("blmk,dbkl->dblm", coded, amplitudes)
    realised = clean.abs().square().mean(dim=(2, 3)).mean(0)  # (B,)
    snr = 10.0 ** (part.snr_db.to(torch.float64) / 10.0)
    expected = expected_noise_variance(coded, part.power, part.snr_db) * snr
    torch.testing.assert_close(realised, expected, rtol=0.03, atol=0)


def test_oracle_music_succeeds_and_is_within_a_small_factor_of_the_bound(
        scenes: SceneBatch, deployment: Deployment) -> None:
    """High SNR (15-20 dB): MUSIC on R_true finds >= 95 % of scenes, and its inlier RMSE is no
    worse than 2 sqrt(CRB): the search's own (grid and refinement) error is not what limits it."""
    oracle = music_localize(true_covariance(scenes.steering, scenes.power), scenes.n_sources,
                            deployment, QUICK)
    metrics = localization_metrics(oracle, scenes, scenes.n_sources, config=QUICK)
    assert metrics["success_rate"] >= 0.95, metrics
    errors = matched_errors(oracle, scenes)
    bound = cramer_rao_bound(scenes, QUICK).numpy()[errors["scene"], errors["true_slot"]]
    bound[:, :2] *= (180.0 / math.pi) ** 2
    inside = (errors["azimuth_deg"] <= 3) & (errors["elevation_deg"] <= 3) & (
        errors["range_m"] <= 0.5)
    for axis, name in enumerate(("azimuth_deg", "elevation_deg", "range_m")):
        rmse = np.sqrt(np.mean(np.square(errors[name][inside])))
        root_crb = np.sqrt(np.mean(bound[inside, axis]))
        assert rmse <= 2.0 * root_crb, (name, rmse, root_crb)
