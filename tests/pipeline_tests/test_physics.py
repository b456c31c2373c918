from __future__ import annotations

import math

import torch

from pipeline._physics import (
    Deployment,
    element_positions,
    planar_steering_vectors,
    ris_codes,
    steering_vectors,
)


def test_array_is_centred_half_wavelength_in_yz_plane(full_config):
    elements = element_positions(full_config, dtype=torch.float64)
    assert elements.shape == (144, 3)
    assert torch.allclose(elements.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.all(elements[:, 0] == 0)
    # Element (i, j) at (0, (i - 5.5) d, (j - 5.5) d) with d = 0.15 m.
    assert math.isclose(float(elements[0, 1]), -5.5 * 0.15, rel_tol=1e-9)
    assert math.isclose(float(elements[13, 2]), (1 - 5.5) * 0.15, rel_tol=1e-9)
    assert math.isclose(float(elements[1, 2] - elements[0, 2]), 0.15, rel_tol=1e-9)


def test_steering_unit_modulus_and_exact_spherical_phase(full_config):
    generator = torch.Generator().manual_seed(0)
    az = (torch.rand(200, generator=generator, dtype=torch.float64) - 0.5) * 2.0
    el = (torch.rand(200, generator=generator, dtype=torch.float64) - 0.5) * 1.0
    rng = 0.5 + 9.5 * torch.rand(200, generator=generator, dtype=torch.float64)
    elements = element_positions(full_config, dtype=torch.float64)
    a = steering_vectors(az, el, rng, elements, full_config.wavenumber)
    assert torch.allclose(a.abs(), torch.ones_like(a.abs()), atol=1e-12)
    # Reference: the path difference taken literally, |p - e_n| - |p|.
    p = torch.stack([rng * torch.cos(el) * torch.cos(az), rng * torch.cos(el) * torch.sin(az),
                     rng * torch.sin(el)], dim=-1)
    path = torch.linalg.norm(p[:, None, :] - elements[None], dim=-1) - torch.linalg.norm(p, dim=-1,
                                                                                        keepdim=True)
    expected = torch.exp(-1j * full_config.wavenumber * path)
    assert torch.allclose(a, expected, atol=1e-9)
    # float32 inputs stay accurate (no cancellation of two nearly equal ranges).
    a32 = steering_vectors(az.float(), el.float(), rng.float(), elements.float(),
                           full_config.wavenumber)
    assert (a32 - expected).abs().max() < 1e-4


def test_near_field_differs_from_planar_and_far_field_approaches_it(full_config):
    elements = element_positions(full_config, dtype=torch.float64)
    az = torch.tensor([0.3], dtype=torch.float64)
    el = torch.tensor([-0.2], dtype=torch.float64)

    def correlation(range_m: float) -> float:
        a = steering_vectors(az, el, torch.tensor([range_m], dtype=torch.float64), elements,
                             full_config.wavenumber)
        b = planar_steering_vectors(az, el, elements, full_config.wavenumber)
        return float((a.conj() * b).sum().abs() / 144)

    assert correlation(1.0) < 0.8  # near field: spherical wavefronts
    assert correlation(1e5) > 0.9999  # far beyond the 36 m Fraunhofer distance
    assert correlation(1.0) < correlation(5.0) < correlation(50.0) < correlation(1e5)


def test_codes_are_quantised_dft_beams(full_config):
    codes = ris_codes(full_config)
    assert codes.shape == (16, 144)
    assert torch.allclose(codes.abs(), torch.ones(16, 144, dtype=torch.float64))
    step = 2 * math.pi / 8
    phases = torch.angle(codes) / step
    assert torch.allclose(phases, phases.round(), atol=1e-9)
    # 16 distinct beams.
    assert len({tuple(c.round(decimals=6).tolist()) for c in torch.view_as_real(codes)
                .reshape(16, -1)}) == 16


def test_channel_is_rician_with_the_configured_k_factor(full_config):
    import dataclasses

    from pipeline._physics import bs_ris_channel

    strong = bs_ris_channel(dataclasses.replace(full_config, rician_k=1e6))
    assert strong.shape == (16, 144)
    assert torch.allclose(strong.abs(), torch.ones_like(strong.abs()), atol=5e-3)  # ~pure LOS
    # K = 1: half the power in the scattered part, so moduli spread widely.
    weak = bs_ris_channel(dataclasses.replace(full_config, rician_k=1.0))
    assert float(weak.abs().std()) > 0.2
    assert torch.equal(bs_ris_channel(full_config), bs_ris_channel(full_config))  # deployment fixed


def test_back_projection_inverts_the_operator_as_the_ridge_vanishes(full_config):
    import dataclasses

    deployment = Deployment.build(dataclasses.replace(full_config, ridge=1e-7))
    product = deployment.operator @ deployment.back_projection  # Phi_l W_l -> I_M
    eye = torch.eye(16, dtype=product.dtype).expand_as(product)
    assert (product - eye).abs().max() < 1e-3
    # With the default ridge the fields are shrunk, never amplified.
    default = Deployment.build(full_config)
    singular = torch.linalg.svdvals(default.operator @ default.back_projection)
    assert float(singular.max()) <= 1.0 + 1e-4
