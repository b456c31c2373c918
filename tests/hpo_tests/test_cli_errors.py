"""Bad input to `hpo run` / `status` / `best`: one line on stderr, a non-zero exit, no traceback,
and no study (nor store file) left behind."""

from __future__ import annotations

import functools
import json

import optuna
import pytest

from hpo._budget import claim_trial
from hpo._studies import StudySettings, create_or_load_study
from hpo.testing import assert_one_line_error as _one_line_error
from hpo.testing import invoke
from storage import open_storage
from storage.testing import postgres_url_with

SECRET = "hunter2-secret"
# Every error here must also keep this password out of the output.
assert_one_line_error = functools.partial(_one_line_error, secret=SECRET)


@pytest.fixture
def sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store and runs/ land here, if anywhere
    return tmp_path / "hpo.db"


SMOKE_RUN = ("run", "--trials", "3", "--preset", "smoke", "--quiet")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--trials", "0"), "'--trials': Input should be greater than or equal to 1, but got 0"),
        (("--trials", "x"), "'--trials': Input should be a valid integer"),
        (("--epochs", "0"), "'--epochs': Input should be greater than or equal to 1"),
        (("--pruner", "patient"),
         "'--pruner': 'patient' is not one of 'hyperband', 'asha', 'median', 'none'"),
        (("--reduction-factor", "1"),
         "'--reduction-factor': Input should be greater than or equal to 2, but got 1"),
        (("--pruner", "median", "--reduction-factor", "4"),
         "--reduction-factor is for --pruner hyperband or asha, not median"),
        (("--timeout", "0"), "--timeout must be a number of seconds > 0, but got 0"),
        (("--timeout", "-5"), "--timeout must be a number of seconds > 0, but got -5"),
        (("--timeout", "nan"), "--timeout must be a number of seconds > 0, but got nan"),
        (("--timeout", "inf"), "--timeout must be a number of seconds > 0, but got inf"),
        (("--checkpoint-every", "-1"), "--checkpoint-every must be >= 0 seconds, but got -1"),
        (("--checkpoint-every", "nan"), "--checkpoint-every must be >= 0 seconds, but got nan"),
        (("--sampler", "grid"), "'--sampler': 'grid' is not one of 'tpe', 'random'"),
        (("--objective", "loss"), "'--objective': 'loss' is not one of 'composite', 'nmse', 'success'"),
        (("--preset", "huge"), "'huge' is not one of 'smoke', 'quick', 'medium', 'full'"),
        (("--gpus", "99"), "--gpus"),
        (("--workers", "0"), "'--workers': Input should be greater than or equal to 1"),
        (("--device", "tpu"), "'--device': 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
        (("--no-such-option",), "No such option: --no-such-option"),
        (("--storage", f"postgresql//u:{SECRET}@h/db"), "is not a URL"),
        (("--storage", f"mysql://u:{SECRET}@h/db"), "'mysql' is not supported"),
        (("--storage", "sqlite:///no/such/dir/hpo.db"), "directory"),
        (("--space", "absent.toml"), "space file absent.toml does not exist"),
    ],
)
def test_bad_run_arguments(sqlite_file, extra, fragment):
    result = invoke(*SMOKE_RUN, *extra)
    assert_one_line_error(result, fragment)
    assert not sqlite_file.exists()  # nothing was created
    assert not (sqlite_file.parent / "runs").exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("lr = { low = 1e-3, high = ", "is not valid TOML"),
        ("learning_rate = { low = 1e-4, high = 1e-2 }", "unknown parameter 'learning_rate'"),
        ("dropout = { low = 0.0, high = 2.0 }", "dropout=2.0 is not a valid config"),
    ],
)
def test_bad_space_files(sqlite_file, text, fragment):
    (sqlite_file.parent / "space.toml").write_text(text)
    result = invoke(*SMOKE_RUN, "--space", "space.toml")
    assert_one_line_error(result, fragment)
    assert not sqlite_file.exists()


def test_environment_url_is_used_and_checked(sqlite_file):
    result = invoke(*SMOKE_RUN, env={"HPO_STORAGE": f"postgres://u:{SECRET}@h/db"})
    assert_one_line_error(result, "use postgresql+psycopg2://")


def test_unknown_worker_start_method(sqlite_file):
    result = invoke(*SMOKE_RUN, env={"HPO_WORKER_START": "spawn"})
    assert_one_line_error(result, "HPO_WORKER_START must be one of forkserver, exec")
    assert not sqlite_file.exists()


def test_unreachable_postgres_names_host_port_and_database(sqlite_file):
    url = postgres_url_with(port=1, password=SECRET, database="studies")
    result = invoke(*SMOKE_RUN, "--storage", url)
    line = assert_one_line_error(result, "127.0.0.1:1")
    assert "'studies'" in line and "unreachable after 3 attempts" in line


def test_missing_postgres_database(sqlite_file):
    url = postgres_url_with(database="hpo_absent_db", password=SECRET)
    assert_one_line_error(invoke(*SMOKE_RUN, "--storage", url), "database does not exist")


def test_unknown_postgres_role(sqlite_file):
    url = postgres_url_with(username="hpo_absent_role", password=SECRET)
    assert_one_line_error(invoke(*SMOKE_RUN, "--storage", url), "authentication refused")


def test_wrong_postgres_password(sqlite_file, password_refusing_server):
    url = f"postgresql+psycopg2://alice:{SECRET}@127.0.0.1:{password_refusing_server.port}/db"
    line = assert_one_line_error(invoke(*SMOKE_RUN, "--storage", url), "authentication refused")
    assert "password authentication failed" in line


def test_resuming_with_another_objective_changes_nothing(store_url, sqlite_file):
    storage = open_storage(store_url)
    settings = StudySettings(preset="smoke", objective="composite", direction="minimize", epochs=2)
    name = f"resume-{sqlite_file.parent.name}"
    create_or_load_study(storage, name, settings, budget=3)
    before = [s.study_name for s in optuna.get_all_study_summaries(store_url)]
    result = invoke(*SMOKE_RUN, "--storage", store_url, "--study", name, "--objective", "nmse")
    assert_one_line_error(result, f"study '{name}' was created with objective composite, not nmse")
    for extra, fragment in ((("--epochs", "3"), "epochs 2, not 3"),):
        result = invoke(*SMOKE_RUN, "--storage", store_url, "--study", name, *extra)
        assert_one_line_error(result, fragment)
    assert [s.study_name for s in optuna.get_all_study_summaries(store_url)] == before
    study = optuna.load_study(study_name=name, storage=store_url)
    assert study.trials == [] and study.user_attrs["hpo_budget"] == 3


def test_status_and_best_on_a_store_that_does_not_exist(sqlite_file):
    assert_one_line_error(invoke("status"), "no study store at SQLite file")
    assert_one_line_error(invoke("best", "--json"), "no study store at SQLite file")
    assert not sqlite_file.exists()


def test_status_names_the_studies_when_asked_for_another(sqlite_file):
    storage = open_storage(f"sqlite:///{sqlite_file}")
    settings = StudySettings(preset="smoke", objective="nmse", direction="minimize", epochs=2)
    create_or_load_study(storage, "only", settings, budget=3)
    assert_one_line_error(
        invoke("status", "--study", "other"), "no study named 'other'; studies: only"
    )
    assert_one_line_error(invoke("best"), "study 'only' has no complete trial yet", code=1)
    assert invoke("status").exit_code == 0


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_status_shows_a_trial_being_claimed_apart_from_the_running_ones(sqlite_file):
    # Between a claim's creation of its trial and the commit that tags it with host and worker,
    # `hpo status` must not show it running on an unknown host.
    storage = open_storage(f"sqlite:///{sqlite_file}")
    settings = StudySettings(preset="smoke", objective="nmse", direction="minimize", epochs=2)
    study = create_or_load_study(storage, "only", settings, budget=3)
    claimed = claim_trial(study)
    half = study.ask()  # created, not yet tagged
    result = invoke("status", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [entry["number"] for entry in payload["running"]] == [claimed.number]
    assert payload["running"][0]["host"] and payload["running"][0]["pid"]
    assert payload["claiming"] == [half.number]
    assert payload["counts"]["running"] == 2
    text = invoke("status")
    assert f"being claimed: trial(s) {half.number}" in text.stdout
    assert "running on ?" not in text.stdout
