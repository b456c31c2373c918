"""The evaluation's scenes (pipeline._benchmark_eval): test stream, disjoint from training."""

from __future__ import annotations

import pytest
import torch

from pipeline import _benchmark_eval, _data
from pipeline._benchmark_eval import SCENE_CHUNK, evaluation_scenes
from pipeline._config import PRESETS, replace
from pipeline._data import SceneBatch, iterate_batches, load_split
from pipeline._physics import Deployment

CONFIG = replace(PRESETS["smoke"], n_train=64, epochs=3)


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    return Deployment.build(CONFIG)


def _seed_states(monkeypatch, module, run) -> set[tuple[int, ...]]:
    """The SeedSequence states handed to generate_scenes while `run()` draws scenes."""
    states: set[tuple[int, ...]] = set()
    original = _data.generate_scenes

    def recording(config, deployment, n_scenes, seed):
        states.add(tuple(int(x) for x in seed.generate_state(4)))
        return original(config, deployment, n_scenes, seed)

    monkeypatch.setattr(module, "generate_scenes", recording)
    run()
    monkeypatch.undo()
    return states


def test_evaluation_streams_are_disjoint_from_training_and_validation(
        monkeypatch, deployment: Deployment) -> None:
    def training_and_validation() -> None:
        for epoch in range(1, CONFIG.epochs + 1):
            list(iterate_batches(CONFIG, deployment, "train", CONFIG.n_train, CONFIG.batch_size,
                                 epoch=epoch))
        load_split(CONFIG, deployment, "val", CONFIG.n_val)

    used = _seed_states(monkeypatch, _data, training_and_validation)
    assert len(used) == CONFIG.epochs * 2 + 1
    for seed in (0, 1, 2):
        evaluation = _seed_states(monkeypatch, _benchmark_eval,
                                  lambda s=seed: evaluation_scenes(CONFIG, deployment, 300, s))
        assert len(evaluation) == 2  # two chunks of SCENE_CHUNK
        assert not evaluation & used
    # And on the scenes themselves: no validation source reappears.
    val = load_split(CONFIG, deployment, "val", CONFIG.n_val)
    test = SceneBatch.concat(evaluation_scenes(CONFIG, deployment, 300, 0))
    assert not set(val.azimuth_rad[val.source_mask].tolist()) & set(
        test.azimuth_rad[test.source_mask].tolist())


def test_seed_zero_is_the_test_split_and_prefixes_are_stable(deployment: Deployment) -> None:
    n_scenes = SCENE_CHUNK + 10
    chunks = evaluation_scenes(CONFIG, deployment, n_scenes, 0)
    assert [c.size for c in chunks] == [SCENE_CHUNK, 10]
    scenes = SceneBatch.concat(chunks)
    # Whole chunks of seed 0 are the test split drawn in chunks of SCENE_CHUNK.
    split = load_split(CONFIG, deployment, "test", SCENE_CHUNK, chunk=SCENE_CHUNK)
    assert torch.equal(scenes.measurements[:SCENE_CHUNK], split.measurements)
    # A last, partial chunk is the head of a whole one, so a smaller evaluation is a prefix.
    longer = SceneBatch.concat(evaluation_scenes(CONFIG, deployment, 2 * SCENE_CHUNK, 0))
    assert torch.equal(longer.measurements[:n_scenes], scenes.measurements)
    shorter = SceneBatch.concat(evaluation_scenes(CONFIG, deployment, 5, 0))
    assert torch.equal(shorter.measurements, scenes.measurements[:5])
    other = SceneBatch.concat(evaluation_scenes(CONFIG, deployment, 5, 1))
    assert not torch.equal(other.azimuth_rad, shorter.azimuth_rad)


def test_bad_counts_are_rejected(deployment: Deployment) -> None:
    with pytest.raises(ValueError, match="n_scenes"):
        evaluation_scenes(CONFIG, deployment, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        evaluation_scenes(CONFIG, deployment, 5, -1)


def test_mcnemar_exact_is_the_two_sided_binomial_on_discordant_pairs() -> None:
    from pipeline._benchmark_eval import mcnemar_exact, paired_tests

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 9) == mcnemar_exact(9, 1)
    # Past 1,023 discordant pairs (2.0 ** n overflows a float), still a probability:
    assert mcnemar_exact(600, 600) == 1.0
    assert 0.0 <= mcnemar_exact(7, 1190) < 1e-300
    assert mcnemar_exact(480, 620) == pytest.approx(2.7131381093e-5, rel=1e-9)  # scipy binomtest
    learned = torch.tensor([True, True, False, True, False]).numpy()
    other = torch.tensor([False, True, False, False, True]).numpy()
    (test,) = paired_tests({"learned": learned, "sbl": other}, classical=("sbl",))
    assert (test["learned_only"], test["versus_only"]) == (2, 1)
    assert test["success"] == 0.6 and test["versus_success"] == 0.4
    assert test["p_value"] == 1.0


def test_sbl_count_checkpoints_share_one_sbl_per_scene(monkeypatch) -> None:
    """For the SBL count network the evaluation runs SBL once per scene (the learned row's front
    end); its SBL row is still exactly SBL's own answer, and the learned row still the model's."""
    from pipeline import _sbl, build_model, sparse_bayesian_learning
    from pipeline._model import predicted_count

    config = replace(PRESETS["smoke"], model="sbl_count", fresh_train=False, lam_aux=0.0,
                     lam_det=0.0)
    deployment = Deployment.build(config)
    torch.manual_seed(0)
    model = build_model(config, deployment).eval()
    scenes = SceneBatch.concat(evaluation_scenes(config, deployment, 40, 0))
    own = sparse_bayesian_learning(scenes.measurements, deployment, config)
    with torch.no_grad():
        learned_k = predicted_count(model(scenes.measurements, scenes.fields))
    runs = []
    original = _sbl._sbl_powers
    monkeypatch.setattr(_sbl, "_sbl_powers", lambda *a, **k: runs.append(1) or original(*a, **k))
    monkeypatch.setattr("pipeline._frontend._sbl_powers", _sbl._sbl_powers)
    result = _benchmark_eval.evaluate_model(model, config, deployment, n_scenes=40, seed=0)
    assert len(runs) == 2  # the evaluation's 40 scenes are two SBL chunks of 32, run once each
    for index, record in enumerate(result.scenes):
        sbl = record["methods"]["sbl"]
        assert sbl["n_sources"] == int(own.n_sources[index])
        points = torch.stack([own.azimuth_rad, own.elevation_rad, own.range_m], -1)[index]
        assert sbl["estimates"] == points[own.mask[index]].tolist()
        assert record["methods"]["learned"]["n_sources"] == int(learned_k[index])
