"""Fast paths against the straightforward computations they replace (issue 7).

Scene generation (the vectorised redraw of crowded sources; the batched measurement model), and
MUSIC's coarse spectrum as one GEMM of the grid against every scene's subspace. The factor-form
covariances and loss have their own file (test_factor_form.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import ExperimentConfig
from pipeline import _covariance as cov
from pipeline._data import generate_scenes, pick_separated
from pipeline._grid import music_grid
from pipeline._music import _coarse_scores, signal_subspace
from pipeline._physics import Deployment


def _pick_separated_loop(azimuth: np.ndarray, elevation: np.ndarray, separation: float):
    """The straightforward rule, one scene, slot and candidate at a time."""
    n_scenes, n_slots, n_candidates = azimuth.shape
    out_az, out_el = np.zeros((n_scenes, n_slots)), np.zeros((n_scenes, n_slots))
    for b in range(n_scenes):
        for k in range(n_slots):
            for c in range(n_candidates):
                az, el = azimuth[b, k, c], elevation[b, k, c]
                close = any(abs(az - out_az[b, j]) < separation
                            and abs(el - out_el[b, j]) < separation for j in range(k))
                if not close or c == n_candidates - 1:
                    out_az[b, k], out_el[b, k] = az, el
                    break
    return out_az, out_el


def test_vectorised_redraw_picks_what_the_candidate_loop_picks():
    generator = torch.Generator().manual_seed(0)
    # A separation this wide makes conflicts, and exhausted candidate lists, common.
    azimuth = torch.rand(200, 5, 4, generator=generator, dtype=torch.float64) * 2 - 1
    elevation = torch.rand(200, 5, 4, generator=generator, dtype=torch.float64) * 0.6 - 0.3
    fast = pick_separated(azimuth, elevation, 0.3)
    slow = _pick_separated_loop(azimuth.numpy(), elevation.numpy(), 0.3)
    assert np.array_equal(fast[0].numpy(), slow[0]) and np.array_equal(fast[1].numpy(), slow[1])
    # The test is not vacuous: many slots needed a redraw, and some ran out of candidates.
    assert float((fast[0] != azimuth[:, :, 0]).float().mean()) > 0.2


def test_batched_measurements_follow_the_model_scene_by_scene():
    # y_l = G diag(c_l) sum_k a_k s_kl (+ noise), x_hat_l = W_l y_l: at 200 dB SNR the noise is
    # negligible, and the symbols are recovered from the generated field by least squares.
    config = ExperimentConfig(n_ris_rows=6, n_ris_cols=6, n_bs_antennas=8, n_snapshots=8,
                              max_sources=3, snr_db_min=200.0, snr_db_max=200.0)
    deployment = Deployment.build(config)
    batch = generate_scenes(config, deployment, 6, 11)
    operator = deployment.operator.to(torch.complex128).numpy()  # (L, M, N)
    back = deployment.back_projection.to(torch.complex128).numpy()  # (L, N, M)
    for b in range(batch.size):
        k = int(batch.n_sources[b])
        steering = batch.steering[b, :k].to(torch.complex128).numpy()  # (k, N)
        y = batch.measurements[b].to(torch.complex128).numpy()  # (L, M)
        for snapshot in range(config.n_snapshots):
            # The clean measurement lies in the span of the k columns Phi_l a_k: fit and compare.
            basis = operator[snapshot] @ steering.T  # (M, k)
            symbols, *_ = np.linalg.lstsq(basis, y[snapshot], rcond=None)
            assert np.allclose(basis @ symbols, y[snapshot], atol=1e-4 * np.abs(y).max())
            expected_field = back[snapshot] @ y[snapshot]
            assert np.allclose(batch.fields[b, snapshot].numpy(), expected_field,
                               atol=1e-4 * np.abs(expected_field).max())


def test_one_gemm_coarse_spectrum_equals_scoring_each_point_of_each_scene():
    config = ExperimentConfig(range_max_m=4.0, music_grid_azimuth=13, music_grid_elevation=7,
                              music_grid_range=4)
    deployment = Deployment.build(config)
    batch = generate_scenes(config, deployment, 5, 4)
    subspace = signal_subspace(cov.sample_covariance(batch.fields), batch.n_sources, 5)
    grid = music_grid(config, deployment)
    fast = _coarse_scores(subspace, grid)  # (b, n_r, n_el, n_az)
    n = config.n_elements
    for b in range(batch.size):
        e = subspace[b].to(torch.complex128)
        for i_r, u in enumerate(grid.inverse_range):
            for i_e, el in enumerate(grid.elevation_rad):
                for i_a, az in enumerate(grid.azimuth_rad[::3]):
                    a = deployment.steering(az[None].double(), el[None].double(),
                                            (1.0 / u)[None].double())[0]
                    expected = float((e.conj().T @ a).abs().square().sum()) / n
                    assert math.isclose(float(fast[b, i_r, i_e, 3 * i_a]), expected,
                                        rel_tol=1e-4, abs_tol=1e-6)
