"""Permutation-invariant matching: the training set loss and the evaluation Hungarian match."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline._matching import hungarian_match, matched_parameter_loss

SCALES = {"scale_azimuth_rad": math.radians(5.0), "scale_elevation_rad": math.radians(5.0),
          "scale_range_m": 1.0}


def _random_sets(n_scenes: int, n_slots: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random predictions (3 x (B, K)), truth (3 x (B, K)) and a random mask (B, K)."""
    generator = torch.Generator().manual_seed(seed)

    def params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        azimuth = (torch.rand(n_scenes, n_slots, generator=generator) - 0.5) * 2.0
        elevation = (torch.rand(n_scenes, n_slots, generator=generator) - 0.5) * 1.0
        range_m = 0.5 + 3.5 * torch.rand(n_scenes, n_slots, generator=generator)
        return azimuth, elevation, range_m

    mask = torch.rand(n_scenes, n_slots, generator=generator) < 0.6
    mask[0] = False  # a scene without sources
    mask[1] = True  # a full scene
    return (*params(), *params(), mask)


def _loss(pred: tuple[torch.Tensor, ...], true: tuple[torch.Tensor, ...], mask: torch.Tensor,
          **options: object) -> torch.Tensor:
    return matched_parameter_loss(*pred, *true, mask, **SCALES, **options)


def _permute_slots(tensors: tuple[torch.Tensor, ...], generator: torch.Generator
                   ) -> tuple[torch.Tensor, ...]:
    """Apply one random slot permutation per scene to every tensor (B, K)."""
    n_scenes, n_slots = tensors[0].shape
    order = torch.stack([torch.randperm(n_slots, generator=generator) for _ in range(n_scenes)])
    return tuple(t.gather(1, order) for t in tensors)


@pytest.mark.parametrize("n_slots", [3, 5])
def test_loss_is_invariant_to_permuting_true_sources(n_slots: int) -> None:
    pa, pe, pr, ta, te, tr, mask = _random_sets(256, n_slots, seed=n_slots)
    pred = (pa, pe, pr)
    reference = _loss(pred, (ta, te, tr), mask)
    generator = torch.Generator().manual_seed(99)
    for _ in range(5):
        sa, se, sr, smask = _permute_slots((ta, te, tr, mask), generator)
        permuted = _loss(pred, (sa, se, sr), smask)
        torch.testing.assert_close(permuted, reference, rtol=1e-5, atol=1e-6)
    has_sources = mask.any(-1)
    assert (reference[~has_sources] == 0.0).all()  # no sources, no loss
    assert (reference[has_sources] > 0.0).all()


def test_loss_changes_when_a_prediction_moves() -> None:
    pa, pe, pr, ta, te, tr, _ = _random_sets(256, 4, seed=3)
    mask = torch.ones_like(ta, dtype=torch.bool)  # every predicted slot is matched to something
    reference = _loss((pa, pe, pr), (ta, te, tr), mask)
    moved = pa.clone()
    moved[:, 0] += math.radians(7.0)
    changed = _loss((moved, pe, pr), (ta, te, tr), mask)
    assert ((changed - reference).abs() > 1e-4).all()


@pytest.mark.parametrize("smooth_l1_beta", [1.0, 0.0])
def test_perfect_prediction_in_any_slot_order_has_zero_loss(smooth_l1_beta: float) -> None:
    _, _, _, ta, te, tr, mask = _random_sets(128, 5, seed=7)
    generator = torch.Generator().manual_seed(1)
    # Predicted slots hold the true sources in a random order; absent sources' slots hold junk.
    pa, pe, pr = _permute_slots((ta, te, tr), generator)
    loss = _loss((pa, pe, pr), (ta, te, tr), mask, smooth_l1_beta=smooth_l1_beta)
    assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("method", ["enumerate", "hungarian"])
@pytest.mark.parametrize("smooth_l1_beta", [1.0, 0.0])
def test_gradients_are_finite(method: str, smooth_l1_beta: float) -> None:
    pa, pe, pr, ta, te, tr, mask = _random_sets(64, 5, seed=11)
    pa[2] = ta[2]  # exact hits: the kink of |x| at zero
    pe[2], pr[2] = te[2], tr[2]
    pa[3] = 0.1  # tied predictions: several equally good assignments
    pred = tuple(t.clone().requires_grad_(True) for t in (pa, pe, pr))
    loss = _loss(pred, (ta, te, tr), mask, smooth_l1_beta=smooth_l1_beta, method=method)
    loss.mean().backward()
    for tensor in pred:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    assert pred[0].grad.abs().sum() > 0


@pytest.mark.parametrize("n_slots", [1, 2, 5, 6])
def test_enumeration_equals_scipy_hungarian(n_slots: int) -> None:
    pa, pe, pr, ta, te, tr, mask = _random_sets(200, n_slots, seed=20 + n_slots)
    pred = tuple(t.clone().requires_grad_(True) for t in (pa, pe, pr))
    exact = _loss(pred, (ta, te, tr), mask, method="enumerate")
    grads_exact = torch.autograd.grad(exact.sum(), pred)
    scipy_loss = _loss(pred, (ta, te, tr), mask, method="hungarian")
    grads_scipy = torch.autograd.grad(scipy_loss.sum(), pred)
    torch.testing.assert_close(exact, scipy_loss, rtol=1e-5, atol=1e-6)
    for left, right in zip(grads_exact, grads_scipy):
        torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-6)


def test_many_slots_fall_back_to_scipy_and_agree_with_enumeration() -> None:
    pa, pe, pr, ta, te, tr, mask = _random_sets(8, 7, seed=5)
    auto = _loss((pa, pe, pr), (ta, te, tr), mask)  # 7 slots: scipy
    exact = _loss((pa, pe, pr), (ta, te, tr), mask, method="enumerate")
    torch.testing.assert_close(auto, exact, rtol=1e-5, atol=1e-6)


def test_more_predicted_slots_than_true_slots() -> None:
    pa, pe, pr, ta, te, tr, mask = _random_sets(32, 5, seed=8)
    truth = (ta[:, :3], te[:, :3], tr[:, :3])
    exact = _loss((pa, pe, pr), truth, mask[:, :3], method="enumerate")
    scipy_loss = _loss((pa, pe, pr), truth, mask[:, :3], method="hungarian")
    torch.testing.assert_close(exact, scipy_loss, rtol=1e-5, atol=1e-6)


def test_loss_is_float32_under_autocast() -> None:
    pa, pe, pr, ta, te, tr, mask = _random_sets(16, 5, seed=2)
    low = tuple(t.to(torch.bfloat16) for t in (pa, pe, pr))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = _loss(low, (ta, te, tr), mask)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()


def test_hungarian_match_finds_the_optimal_pairing() -> None:
    deg = math.radians(1.0)
    # Scene 0: greedy nearest-first would pair estimate 0 with truth 1 (1.5 deg) and leave
    # estimate 1 for truth 0 (7 deg), 8.5 deg in all; the optimum is 2.5 + 3 = 5.5 deg.
    # Scene 1: slot 1 of the estimates is masked out although it sits exactly on truth 2.
    # Scene 2: no valid estimates, so no pairs. Scene 3: more estimates than true sources.
    est = np.zeros((4, 3, 3))
    true = np.zeros((4, 3, 3))
    est_mask = np.zeros((4, 3), dtype=bool)
    true_mask = np.zeros((4, 3), dtype=bool)
    est[0, :2, 0] = [2.5 * deg, 7.0 * deg]
    true[0, :2, 0] = [0.0, 4.0 * deg]
    est_mask[0, :2] = true_mask[0, :2] = True
    est[1, :, 2] = [1.0, 2.0, 3.05]
    true[1, :, 2] = [3.0, 1.1, 2.0]
    est_mask[1] = [True, False, True]
    true_mask[1] = True
    true_mask[2, 0] = True
    est[3, :, 1] = [10 * deg, -10 * deg, 0.0]
    true[3, 0, 1] = -9 * deg
    est_mask[3] = True
    true_mask[3, 0] = True
    pairs = hungarian_match(est, est_mask, true, true_mask)
    np.testing.assert_array_equal(pairs.scene, [0, 0, 1, 1, 3])
    np.testing.assert_array_equal(pairs.true_slot, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(pairs.est_slot, [0, 1, 2, 0, 1])


def test_hungarian_match_accepts_tensors() -> None:
    est = torch.tensor([[[0.1, 0.0, 1.0], [0.0, 0.0, 2.0]]])
    true = torch.tensor([[[0.0, 0.0, 2.1], [0.1, 0.0, 1.1]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    pairs = hungarian_match(est, mask, true, mask)
    np.testing.assert_array_equal(pairs.est_slot, [1, 0])
    np.testing.assert_array_equal(pairs.true_slot, [0, 1])
