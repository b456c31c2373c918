"""`hpo evaluate`: a smoke model against the references; files, determinism, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.stats import binomtest

from hpo.testing import assert_one_line_error, invoke

METHODS = {"learned", "samp", "pursuit", "sbl", "oracle", "crb"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("smoke") / "run"
    result = invoke("train", "--preset", "smoke", "--no-references", "--device", "cpu",
                    "--out", str(run))
    assert result.exit_code == 0, result.output
    return run / "checkpoint.pt"


@pytest.fixture(scope="module")
def evaluated(checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "seed3"
    result = invoke("evaluate", "--checkpoint", str(checkpoint), "--scenes", "40", "--seed", "3",
                    "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "SNR 15..20 dB" in result.stdout and "K = 1" in result.stdout
    assert "CRB" in result.stdout and "pursuit" in result.stdout and "SBL" in result.stdout
    assert "exact McNemar" in result.stdout and "vs SBL" in result.stdout
    return out


def test_writes_csv_json_and_a_png(evaluated: Path) -> None:
    rows = list(csv.DictReader((evaluated / "evaluation.csv").open()))
    assert {r["method"] for r in rows} == METHODS
    groups = {(r["group"], r["bin"]) for r in rows}
    assert ("all", "all") in groups
    snr_bins = {b for g, b in groups if g == "snr"}
    assert snr_bins and snr_bins <= {"-5..0", "0..5", "5..10", "10..15", "15..20"}
    assert {b for g, b in groups if g == "k"} <= {"1", "2", "3"}
    every = [r for r in rows if r["group"] == "all"]
    assert len(every) == len(METHODS) and all(r["n_scenes"] == "40" for r in every)
    for row in rows:
        if row["method"] == "crb":
            assert row["k_accuracy"] == ""  # not a localizer
            assert float(row["rmse_azimuth_deg"]) > 0
        else:
            assert 0.0 <= float(row["k_accuracy"]) <= 1.0
            assert float(row["k_over"]) + float(row["k_under"]) == pytest.approx(
                1.0 - float(row["k_accuracy"]))
            assert math.isfinite(float(row["composite"]))
    oracle = next(r for r in every if r["method"] == "oracle")
    assert float(oracle["k_accuracy"]) == 1.0  # told the true K

    payload = json.loads((evaluated / "evaluation.json").read_text())
    assert payload["n_scenes"] == 40 and payload["seed"] == 3
    assert len(payload["rows"]) == len(rows)
    assert payload["config"]["n_ris_rows"] == 6

    from matplotlib import image

    picture = image.imread(evaluated / "rmse_vs_snr.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300


def _rescore(record: dict, method: str) -> bool:
    """Success of one scene from scenes.jsonl alone: K right, then every true source within
    3 deg / 3 deg / 0.5 m of its estimate under the assignment of least summed distance in
    units of 5 deg / 5 deg / 1 m."""
    estimate = record["methods"][method]
    if estimate["n_sources"] != record["n_sources"]:
        return False
    found = np.array(estimate["estimates"], dtype=np.float64).reshape(-1, 3)
    truth = np.array(record["truth"], dtype=np.float64).reshape(-1, 3)
    scale = np.array([math.radians(5.0), math.radians(5.0), 1.0])
    cost = np.sqrt(np.square((found[:, None, :] - truth[None, :, :]) / scale).sum(-1))
    rows, cols = linear_sum_assignment(cost)
    error = np.abs(found[rows] - truth[cols])
    inside = ((np.degrees(error[:, 0]) <= 3.0) & (np.degrees(error[:, 1]) <= 3.0)
              & (error[:, 2] <= 0.5))
    return int(inside.sum()) == len(truth)


def test_scenes_jsonl_rescores_the_table(evaluated: Path) -> None:
    records = [json.loads(line) for line in (evaluated / "scenes.jsonl").read_text().splitlines()]
    assert [r["scene"] for r in records] == list(range(40))
    rows = list(csv.DictReader((evaluated / "evaluation.csv").open()))
    localizers = METHODS - {"crb"}
    for record in records:
        assert set(record["methods"]) == localizers
        assert len(record["truth"]) == record["n_sources"]
    successes = {}
    for method in localizers:
        successes[method] = np.array([_rescore(r, method) for r in records])
        for row in rows:
            if row["method"] != method:
                continue
            if row["group"] == "all":
                index = range(40)
            elif row["group"] == "k":
                index = [i for i, r in enumerate(records) if str(r["n_sources"]) == row["bin"]]
            else:
                low, high = (float(x) for x in row["bin"].split(".."))
                index = [i for i, r in enumerate(records)
                         if low <= r["snr_db"] < high or (high == 20.0 and r["snr_db"] == high)]
            assert len(index) == int(row["n_scenes"])
            assert float(row["success_rate"]) == pytest.approx(
                float(np.mean(successes[method][list(index)])), abs=1e-12), row
            k_right = [records[i]["methods"][method]["n_sources"] == records[i]["n_sources"]
                       for i in index]
            assert float(row["k_accuracy"]) == pytest.approx(float(np.mean(k_right)))
    assert successes["oracle"].any()  # the rescoring can say yes

    # The paired tests count the same discordant scenes and agree with scipy's exact binomial.
    payload = json.loads((evaluated / "evaluation.json").read_text())
    assert {t["versus"] for t in payload["paired"]} == {"samp", "pursuit", "sbl"}
    for test in payload["paired"]:
        other = successes[test["versus"]]
        assert test["learned_only"] == int((successes["learned"] & ~other).sum())
        assert test["versus_only"] == int((~successes["learned"] & other).sum())
        n = test["learned_only"] + test["versus_only"]
        expected = binomtest(test["learned_only"], n, 0.5).pvalue if n else 1.0
        assert test["p_value"] == pytest.approx(expected)


def test_same_seed_same_table_other_seed_other_scenes(checkpoint: Path, evaluated: Path,
                                                      tmp_path: Path) -> None:
    again = invoke("evaluate", "--checkpoint", str(checkpoint), "--scenes", "40", "--seed", "3",
                   "--device", "cpu", "--out", str(tmp_path / "again"), "--json")
    assert again.exit_code == 0, again.output
    for name in ("evaluation.csv", "scenes.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (evaluated / name).read_bytes()
    assert json.loads(again.stdout)["rows"] == json.loads(
        (evaluated / "evaluation.json").read_text())["rows"]
    other = invoke("evaluate", "--checkpoint", str(checkpoint), "--scenes", "20", "--seed", "4",
                   "--device", "cpu", "--out", str(tmp_path / "other"), "--json")
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout)["rows"] != json.loads(again.stdout)["rows"]


def test_bad_input_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("evaluate", "--checkpoint", str(tmp_path / "nope.pt")),
                          "no checkpoint file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(invoke("evaluate", "--checkpoint", str(corrupt), "--out",
                                 str(tmp_path / "o1")), "cannot read checkpoint")
    assert not (tmp_path / "o1").exists()  # nothing made for a run that cannot start
    assert_one_line_error(invoke("evaluate", "--checkpoint", str(checkpoint), "--scenes", "0"),
                          "'--scenes': Input should be greater than or equal to 1, but got 0")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(invoke("evaluate", "--checkpoint", str(checkpoint), "--out",
                                 str(blocker / "sub")), "cannot write to output directory")
    assert_one_line_error(invoke("evaluate"), "give --checkpoint")
    assert_one_line_error(invoke("evaluate", "--checkpoint", str(checkpoint), "--from-best"),
                          "not both")


def _study_with_best_trial(tmp_path: Path, attrs: dict) -> str:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="minimize")
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs=attrs))
    study.add_trial(optuna.trial.create_trial(value=5.0, user_attrs={}))
    return url


def test_from_best_without_a_saved_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    url = _study_with_best_trial(tmp_path, {"config": {}})
    assert_one_line_error(invoke("evaluate", "--from-best", "--storage", url),
                          "run `hpo train --from-best` first")
    (tmp_path / "gone").mkdir()
    url = _study_with_best_trial(tmp_path / "gone", {"checkpoint": str(tmp_path / "gone.pt")})
    assert_one_line_error(invoke("evaluate", "--from-best", "--storage", url),
                          "which is not there")


def test_from_best_uses_the_trial_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    url = _study_with_best_trial(tmp_path, {"checkpoint": str(checkpoint)})
    result = invoke("evaluate", "--from-best", "--storage", url, "--scenes", "10", "--device",
                    "cpu", "--out", str(tmp_path / "best"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(checkpoint)


def test_range_decision_can_be_turned_off_and_leaves_sbls_row_alone(checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    """--peak-range / --range-for-success override an sbl_count checkpoint's range_for_success:
    the choice is recorded, only the learned row's estimates change, and a model without the
    decision (the grid model) refuses the flag in one line."""
    run = tmp_path / "sbl_count"
    trained = invoke("train", "--preset", "smoke", "--set", "model=sbl_count",
                     "--set", "fresh_train=false", "--set", "lam_aux=0", "--set", "lam_det=0",
                     "--no-references", "--device", "cpu", "--out", str(run))
    assert trained.exit_code == 0, trained.output
    records = {}
    for flag, expected in (("--peak-range", False), ("--range-for-success", True)):
        out = tmp_path / flag.strip("-")
        result = invoke("evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--scenes", "40",
                        "--seed", "3", "--device", "cpu", "--out", str(out), "--json", flag)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["config"]["range_for_success"] is expected
        records[expected] = [json.loads(line) for line in (out / "scenes.jsonl").open()]
    on, off = records[True], records[False]
    assert [r["methods"]["sbl"] for r in on] == [r["methods"]["sbl"] for r in off]
    assert [r["methods"]["learned"]["n_sources"] for r in on] == [
        r["methods"]["learned"]["n_sources"] for r in off]
    assert any(a["methods"]["learned"] != b["methods"]["learned"] for a, b in zip(on, off))
    assert_one_line_error(invoke("evaluate", "--checkpoint", str(checkpoint), "--scenes", "4",
                                 "--peak-range", "--out", str(tmp_path / "grid")),
                          "apply to sbl_count models")
    assert not (tmp_path / "grid").exists()
