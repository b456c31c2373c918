"""From a study to a trained model: `hpo best --json` agrees with Optuna, and `hpo train
--from-best` / `--config best.json` train exactly the best trial's config."""

from __future__ import annotations

import json

import optuna
import pytest

from hpo.testing import assert_one_line_error, hpo, invoke
from pipeline import load_checkpoint
from tests.hpo_tests._results_study import results_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return results_study(tmp_path_factory)


def best_json(study) -> dict:
    result = invoke("best", "--json", "--storage", study.url, "--study", study.name)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def saved_configs(run_dir) -> tuple[dict, dict]:
    """The config a run wrote to metrics.json and the one inside its checkpoint."""
    from pipeline import config_to_dict

    summary = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    return summary["config"], config_to_dict(checkpoint["config"])


def test_best_json_agrees_with_optuna(study):
    payload = best_json(study)
    best = optuna.load_study(study_name=study.name, storage=study.url).best_trial
    assert payload["value"] == best.value
    assert payload["number"] == best.number
    assert payload["params"] == best.params
    assert payload["metrics"] == best.user_attrs["metrics"]
    assert payload["config"] == best.user_attrs["config"]
    assert payload["metrics"]["composite"] == best.value  # the objective is the final composite


def test_train_from_best_trains_the_best_trials_config(study, tmp_path):
    best = study.load().best_trial
    run_dir = tmp_path / "run"
    result = hpo(
        "train", "--from-best", "--storage", study.url, "--study", study.name, "--epochs", "1",
        "--out", str(run_dir), "--no-references", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = {**best.user_attrs["config"], "epochs": 1}
    in_metrics, in_checkpoint = saved_configs(run_dir)
    assert in_metrics == expected
    assert in_checkpoint == expected
    for name, value in best.params.items():  # the searched values, field by field
        assert in_metrics[name] == value, name
    summary = json.loads(result.stdout)
    assert summary["source"]["study"] == study.name
    assert summary["source"]["trial"] == best.number
    assert summary["source"]["value"] == best.value
    assert summary["final"]["epoch"] == 1


def test_train_from_best_json_file_with_overrides(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best_file = tmp_path / "best.json"
    best_file.write_text(json.dumps(best_json(study)))  # hpo best --json > best.json
    result = invoke(
        "train", "--config", str(best_file), "--epochs", "1", "--set", "seed=7",
        "--out", str(tmp_path / "run"), "--no-references", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    best = study.load().best_trial
    expected = {**best.user_attrs["config"], "epochs": 1, "seed": 7}
    assert saved_configs(tmp_path / "run") == (expected, expected)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read config file"),
        ("{", "is not JSON: Expecting property name"),
        ('{"value": 1.0, "config": null}', "holds no config"),
        ("[1, 2]", "holds no config"),
        ('{"config": {"lr": 0.001, "bogus_field": 3}}', "unknown config field(s) bogus_field"),
        ('{"config": {"lr": -1.0}}', "lr must be > 0, but got -1.0"),
        ('{"lr": "fast"}', "a field has a value of the wrong type"),
    ],
)
def test_bad_config_file(tmp_path, content, fragment):
    path = tmp_path / "best.json"
    if content is not None:
        path.write_text(content)
    result = invoke("train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, fragment, code=2)
    assert not (tmp_path / "run").exists()


def test_from_best_on_a_study_that_does_not_exist(study, tmp_path):
    result = invoke("train", "--from-best", "--storage", study.url, "--study", "nope",
                    "--out", str(tmp_path / "run"))  # fmt: skip
    assert_one_line_error(result, "no study named 'nope'; studies: results-smoke", code=2)


def test_from_best_on_a_store_that_does_not_exist(tmp_path):
    result = invoke("train", "--from-best", "--storage", f"sqlite:///{tmp_path / 'x.db'}")
    assert_one_line_error(result, "no study store at", code=2)


def test_from_best_on_an_empty_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = invoke("train", "--from-best", "--storage", url, "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "study 'empty' has no complete trial yet", code=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--from-best", "--config", "best.json"), "--from-best and --config both give"),
        (("--from-best", "--preset", "smoke"), "--preset cannot be combined"),
        (("--config", "best.json", "--preset", "smoke"), "--preset cannot be combined"),
        (("--study", "x"), "add --from-best"),
    ],
)
def test_conflicting_options(args, fragment):
    assert_one_line_error(invoke("train", *args), fragment, code=2)
