"""The SBL count network (model sbl_count): its covariance, its count, its loss, its cache, and
a learning check sized for CI."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import _covariance as cov
from pipeline._config import preset, replace
from pipeline._counting import mdl_estimate
from pipeline._data import load_split
from pipeline._frontend import (
    FrontEnd,
    cache_key,
    cached_front_end,
    front_end,
    refined_sources,
    rule_count,
    sbl_from_front_end,
    with_front_end,
)
from pipeline._losses import compute_loss, covariances
from pipeline._metrics import localization_from_points
from pipeline._model import build_model, predicted_count
from pipeline._music import music_localize
from pipeline._physics import Deployment
from pipeline._train import load_model, train

SMOKE = replace(preset("smoke"), model="sbl_count", fresh_train=False, lam_aux=0.0, lam_det=0.0,
                model_width=32, model_depth=2)


@pytest.fixture(scope="module")
def scenes():
    deployment = Deployment.build(SMOKE)
    batch = with_front_end(load_split(SMOKE, deployment, "val", 24), deployment, SMOKE, "val")
    front, powers = front_end(batch.measurements, deployment, SMOKE, keep_powers=True)
    assert torch.equal(batch.frontend, front.pack())
    assert batch.located is not None and 0 < float(batch.located.mean()) < 1
    return deployment, batch, front, powers


def test_front_end_packs_and_unpacks_exactly(scenes):
    _, batch, front, _ = scenes
    back = FrontEnd.unpack(batch.frontend, SMOKE.max_sources)
    for name in ("points", "power", "noise", "gain", "ratio"):
        assert torch.equal(getattr(back, name), getattr(front, name).float()), name
    assert torch.equal(back.active, front.active)
    # stage k holds exactly k active sources
    counts = front.active.sum(-1)
    assert torch.equal(counts, torch.arange(1, SMOKE.max_sources + 1).expand_as(counts))


@pytest.mark.parametrize("training", [True, False])
def test_r_pred_is_hermitian_psd_with_trace_n(scenes, training):
    deployment, batch, _, _ = scenes
    torch.manual_seed(0)
    model = build_model(SMOKE, deployment).train(training)
    output = model(batch.measurements, batch.fields, batch.frontend)
    mats = covariances(output, batch, SMOKE)
    r_pred = mats.pred.dense().detach().to(torch.complex128)
    n = SMOKE.n_elements
    assert torch.allclose(r_pred, r_pred.conj().transpose(-2, -1), atol=1e-5)
    trace = torch.diagonal(r_pred, dim1=-2, dim2=-1).real.sum(-1)
    assert torch.allclose(trace, torch.full_like(trace, n), rtol=1e-4)
    assert torch.linalg.eigvalsh(r_pred).min() > -1e-4 * n
    # R_blend = (1 - beta) R_pred + beta R_samp, not renormalised (Fix 2): trace N as well
    blend = mats.blend.dense().detach().to(torch.complex128)
    expected = (1 - SMOKE.beta) * r_pred + SMOKE.beta * mats.samp.dense().to(torch.complex128)
    assert torch.allclose(blend, expected, atol=1e-4)


def test_gradients_are_finite_and_reach_both_heads(scenes):
    deployment, batch, _, _ = scenes
    torch.manual_seed(0)
    model = build_model(SMOKE, deployment).train()
    terms, _ = compute_loss(model(batch.measurements, batch.fields, batch.frontend), batch, SMOKE)
    terms.total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the covariance term alone also reaches the logits (R_pred = sum_k P(k) R_k)
    model.zero_grad()
    terms, _ = compute_loss(model(batch.measurements, batch.fields, batch.frontend), batch,
                            replace(SMOKE, lam_k=0.0))
    terms.cov.backward()
    assert float(model.count.weight.grad.abs().sum()) > 0
    assert model.locate.weight.grad is None  # the locate head learns from its label alone


def test_loss_does_not_change_when_the_true_sources_are_permuted(scenes):
    deployment, batch, _, _ = scenes
    torch.manual_seed(0)
    model = build_model(SMOKE, deployment).train()
    output = model(batch.measurements, batch.fields, batch.frontend)
    terms, _ = compute_loss(output, batch, replace(SMOKE, lam_aux=1.0))
    k_max = SMOKE.max_sources
    generator = torch.Generator().manual_seed(1)
    order = torch.stack([torch.cat([torch.randperm(int(k), generator=generator),
                                    torch.arange(int(k), k_max)])
                         for k in batch.n_sources])
    permuted = batch
    for name in ("azimuth_rad", "elevation_rad", "range_m", "power"):
        permuted = replace_field(permuted, name, getattr(batch, name).gather(1, order))
    permuted = replace_field(permuted, "steering", batch.steering.gather(
        1, order[..., None].expand_as(batch.steering)))
    assert not torch.equal(permuted.azimuth_rad, batch.azimuth_rad)
    again, _ = compute_loss(output, permuted, replace(SMOKE, lam_aux=1.0))
    for name in ("total", "cov", "k", "aux"):
        assert math.isclose(float(getattr(again, name).detach()), float(getattr(terms, name).detach()),
                            rel_tol=1e-5, abs_tol=1e-6), name


def replace_field(batch, name, value):
    import dataclasses

    return dataclasses.replace(batch, **{name: value})


@pytest.mark.parametrize("cached", [True, False])
def test_count_and_set_agree(scenes, cached):
    deployment, batch, _, _ = scenes
    torch.manual_seed(0)
    model = build_model(SMOKE, deployment).eval()
    with torch.no_grad():
        output = model(batch.measurements, batch.fields, batch.frontend if cached else None)
    k_hat = predicted_count(output)
    assert torch.equal(output.weight.sum(-1).long(), k_hat)
    # the factor has exactly K_hat non-zero columns: rank K_hat
    energy = output.factor.abs().square().sum(-2)
    assert torch.equal((energy > 1e-6).sum(-1), k_hat)


def test_inference_refines_the_counted_sources_as_sbl_does(scenes):
    deployment, batch, _, powers = scenes
    k = batch.n_sources
    points, power, active = refined_sources(batch.measurements, k, powers, deployment, SMOKE)
    from pipeline._sbl import sparse_bayesian_learning

    sbl = sparse_bayesian_learning(batch.measurements, deployment, SMOKE, n_sources=k)
    mine = localization_from_points([points], [active], [power], SMOKE.max_sources, points.device)
    for name in ("azimuth_rad", "elevation_rad", "range_m"):
        ours = getattr(mine, name).sort(-1).values
        theirs = getattr(sbl, name).sort(-1).values
        assert torch.allclose(ours, theirs, atol=1e-5), name


def test_sbl_row_read_off_the_front_end_is_sbls_own_answer(scenes):
    """hpo evaluate reads SBL's row off the learned row's front end instead of running SBL
    again: the count, positions and scores must be exactly what SBL itself returns on these
    scenes (its default settings refine the counted peaks again from the same powers). Without
    that refinement the answer is the drop path's stage, refined over other scenes' batches: the
    same up to float rounding."""
    from pipeline._sbl import SblSettings, sparse_bayesian_learning

    deployment, batch, _, _ = scenes
    for chunk in (32, 10):  # one chunk, and chunks with a partial last one
        front, powers = front_end(batch.measurements, deployment, SMOKE, chunk_size=chunk,
                                  keep_powers=True)
        for settings in (SblSettings(), SblSettings(count_threshold=2.0, refine_counted=False)):
            own = sparse_bayesian_learning(batch.measurements, deployment, SMOKE,
                                           settings=settings, chunk_size=chunk)
            read = sbl_from_front_end(batch.measurements, front, powers, deployment, SMOKE,
                                      settings, chunk_size=chunk)
            assert torch.equal(rule_count(front, settings), own.n_sources)
            assert len(set(own.n_sources.tolist())) > 1  # the counts differ across the scenes
            assert torch.equal(read.mask, own.mask)
            for name in ("azimuth_rad", "elevation_rad", "range_m", "score"):
                if settings.refine_counted:
                    assert torch.equal(getattr(read, name), getattr(own, name)), (chunk, name)
                else:
                    torch.testing.assert_close(getattr(read, name), getattr(own, name),
                                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size=32"):  # powers of other chunks
        sbl_from_front_end(batch.measurements, front, powers, deployment, SMOKE)


def test_music_on_r_blend_gives_back_the_models_positions():
    """MUSIC on R_blend with K_hat (its search also started from the network's sources)
    reproduces the positions R_pred was built from: within 0.2 deg for >= 99 % of sources, on
    the medium system at its preset's beta (48 validation scenes), and keeps the ranges that
    were chosen for the success box (`range_for_success`): within 0.1 m for >= 95 %. The count is the true one,
    as a trained network's mostly is (an untrained one asks for sources the scene lacks, whose
    tiny powers R_samp's share then outweighs)."""
    config = preset("medium")
    deployment = Deployment.build(config)
    batch = load_split(config, deployment, "val", 48)
    model = build_model(config, deployment).eval()
    k_hat = batch.n_sources
    with torch.no_grad():
        _, powers = front_end(batch.measurements, deployment, config, keep_powers=True)
        sources = refined_sources(batch.measurements, k_hat, powers, deployment, config,
                                  for_success=config.range_for_success)
        output = model.output(*sources, logits=torch.zeros(batch.size, config.max_sources))
        mats = covariances(output, batch, config)
    ours = model.localization(output)
    assert torch.equal(ours.mask.sum(-1), k_hat)
    found = music_localize(mats.blend, k_hat, deployment, config, seeds=ours)
    assert torch.equal(found.mask.sum(-1), k_hat)
    errors, ranges = [], []
    for b in range(batch.size):
        mine = ours.params()[b][ours.mask[b]]
        music = found.params()[b][found.mask[b]]
        gap = (mine[:, None, :2] - music[None, :, :2]).abs().amax(-1)
        errors.append(gap.amin(1))  # nearest MUSIC source
        nearest = gap.argmin(1)
        ranges.append((mine[:, 2] - music[nearest, 2]).abs())
    degrees = torch.rad2deg(torch.cat(errors))
    assert float((degrees <= 0.2).float().mean()) >= 0.99, degrees.sort().values[-5:]
    metres = torch.cat(ranges)
    assert float((metres <= 0.1).float().mean()) >= 0.95, metres.sort().values[-5:]


def test_front_end_cache_is_shared_and_keyed_by_the_scenes(tmp_path, monkeypatch, scenes):
    deployment, batch, _, _ = scenes
    monkeypatch.setenv("RIS_HPO_CACHE", str(tmp_path))
    first = cached_front_end(batch.measurements, deployment, SMOKE, "val")
    assert torch.equal(first, batch.frontend)
    # a second call reads the file: it never computes again
    monkeypatch.setattr("pipeline._frontend._compute_packed",
                        lambda *a, **k: pytest.fail("computed twice"))
    assert torch.equal(cached_front_end(batch.measurements, deployment, SMOKE, "val"), first)
    # trials that differ only in the model, loss or optimiser share the file ...
    assert cache_key(replace(SMOKE, lr=1e-4, model_width=7, beta=0.5, epochs=3, model="grid",
                             fresh_train=True, count_for_success=0.5), "val", 24) \
        == cache_key(SMOKE, "val", 24)
    # ... scenes of another system, seed, split or count do not
    for other in (cache_key(replace(SMOKE, seed=1), "val", 24),
                  cache_key(replace(SMOKE, snr_db_min=0.0), "val", 24),
                  cache_key(SMOKE, "train", 24), cache_key(SMOKE, "val", 25)):
        assert other != cache_key(SMOKE, "val", 24)


def test_front_end_over_processes_equals_one_process(tmp_path, monkeypatch):
    from pipeline import _frontend

    deployment = Deployment.build(SMOKE)
    batch = load_split(SMOKE, deployment, "train", 64)
    monkeypatch.setattr(_frontend, "_SCENES_PER_PROCESS", 16)
    monkeypatch.setattr(_frontend.os, "sched_getaffinity", lambda pid: {0, 1})
    pooled = _frontend._compute_packed(batch.measurements, deployment, SMOKE, None)
    # Two parts of 32 scenes: each process runs one chunk of 32 on one torch thread, as the
    # reference below does. More threads, or other batches (uneven parts), may round differently
    # on some hosts (they do on an Intel Xeon here), so the reference matches both.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, _ = front_end(batch.measurements, deployment, SMOKE)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pooled, single.pack())


def test_model_learns_to_count_better_than_mdl(tmp_path):
    """Learning check (CI-sized): on smoke, a few hundred steps; held-out K accuracy must beat
    MDL on R_samp and the untrained network. It fails if the model learns nothing."""
    config = replace(SMOKE, n_train=1024, n_val=256, n_val_localize=64, epochs=25,
                     batch_size=64, lr=3e-3, warmup_frac=0.05)  # 400 steps
    train(config, device=torch.device("cpu"), checkpoint_dir=tmp_path, save_best=False)
    deployment = Deployment.build(config)
    val = with_front_end(load_split(config, deployment, "val", config.n_val), deployment, config,
                         "val")
    r_samp = cov.sample_low_rank(val.fields).dense()
    mdl = float((mdl_estimate(r_samp, config.n_snapshots, max_sources=config.max_sources)
                 == val.n_sources).float().mean())
    torch.manual_seed(config.seed)
    untrained = build_model(config, deployment).eval()
    with torch.no_grad():
        logits = untrained(val.measurements, val.fields, val.frontend).k_logits
    before = float(((logits.argmax(-1) + 1) == val.n_sources).float().mean())
    trained, _, _ = load_model(tmp_path / "checkpoint.pt", torch.device("cpu"))
    with torch.no_grad():
        logits = trained(val.measurements, val.fields, val.frontend).k_logits
    after = float(((logits.argmax(-1) + 1) == val.n_sources).float().mean())
    assert after > mdl + 0.05, (after, mdl)
    assert after > before + 0.05, (after, before)
