"""`hpo evaluate`: a smoke model against the references; files, determinism, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import optuna
import pytest

from tests.hpo_tests._cli import invoke

METHODS = {"learned", "samp", "pursuit", "sbl", "oracle", "crb"}


def assert_one_line_error(result, fragment: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


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


def test_same_seed_same_table_other_seed_other_scenes(checkpoint: Path, evaluated: Path,
                                                      tmp_path: Path) -> None:
    again = invoke("evaluate", "--checkpoint", str(checkpoint), "--scenes", "40", "--seed", "3",
                   "--device", "cpu", "--out", str(tmp_path / "again"), "--json")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "evaluation.csv").read_bytes() == (
        evaluated / "evaluation.csv").read_bytes()
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
                          "--scenes must be >= 1")
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
