"""`hpo dashboard` without a browser: the readable view of the store, and one-line errors.
The page itself is checked in Chromium by test_dashboard_browser.py."""

from __future__ import annotations

import socket

import optuna
import pytest
from optuna.trial import TrialState

from hpo._dashboard import ReadableStorage, flatten_attrs
from tests.hpo_tests._cli import invoke


def assert_one_line_error(result, fragment: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_flatten_opens_dicts_and_tables_of_rows():
    attrs = {
        "config": {"lr": 0.001, "epochs": 2},
        "metrics": {"composite": 3.5, "train_terms": {"cov": 1.0, "k": 0.5}},
        "history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
        "fail_reason": "NumericalError: non-finite total loss at epoch 1 batch 0",
        "mixed": [1, "a"],
        "empty": {},
    }
    assert flatten_attrs(attrs) == {
        "config.lr": 0.001,
        "config.epochs": 2,
        "metrics.composite": 3.5,
        "metrics.train_terms.cov": 1.0,
        "metrics.train_terms.k": 0.5,
        "history.epoch": [1, 2],
        "history.loss": [2.0, 1.5],
        "fail_reason": "NumericalError: non-finite total loss at epoch 1 batch 0",
        "mixed": [1, "a"],
        "empty": {},
    }
    assert flatten_attrs({"space": {"lr": {"low": 1, "high": 2}}}, max_depth=1) == {
        "space.lr": {"low": 1, "high": 2}
    }


def test_readable_view_reshapes_reads_and_leaves_the_store_alone(tmp_path):
    url = f"sqlite:///{tmp_path / 'view.db'}"
    study = optuna.create_study(study_name="view", storage=url)
    study.set_user_attr("hpo_settings", {"preset": "smoke", "epochs": 2})
    trial = study.ask()
    trial.set_user_attr("config", {"lr": 0.01, "seed": 0})
    study.tell(trial, state=TrialState.FAIL)
    inner = optuna.storages.RDBStorage(url)
    view = ReadableStorage(inner)
    study_id = inner.get_study_id_from_name("view")

    (seen,) = view.get_all_trials(study_id)
    assert seen.user_attrs == {"config.lr": 0.01, "config.seed": 0}
    assert view.get_trial(seen._trial_id).user_attrs == seen.user_attrs
    assert view.get_all_studies()[0].user_attrs == {
        "hpo_settings.preset": "smoke",
        "hpo_settings.epochs": 2,
    }
    # Nothing was written: the store still holds the nested attributes.
    (stored,) = optuna.load_study(study_name="view", storage=url).get_trials()
    assert stored.user_attrs == {"config": {"lr": 0.01, "seed": 0}}
    # With --allow-edit, writes from the dashboard (notes are study system attributes) go
    # through unchanged.
    editable = ReadableStorage(inner, allow_edit=True)
    editable.set_study_system_attr(study_id, "dashboard:note", "looked at")
    assert inner.get_study_system_attrs(study_id)["dashboard:note"] == "looked at"


@pytest.fixture
def store(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    optuna.create_study(study_name="only", storage=url)
    return url


def test_port_in_use(store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("dashboard", "--storage", store, "--port", str(port))
    assert_one_line_error(result, f"port {port} on 127.0.0.1 is already in use")


def test_store_that_does_not_exist(tmp_path):
    result = invoke("dashboard", "--storage", f"sqlite:///{tmp_path / 'none.db'}")
    assert_one_line_error(result, "no study store at")
    assert not (tmp_path / "none.db").exists()


def test_study_that_does_not_exist(store):
    result = invoke("dashboard", "--storage", store, "--study", "nope")
    assert_one_line_error(result, "no study named 'nope'; studies: only")


def test_address_that_is_not_this_machines(store):
    # 192.0.2.1 is TEST-NET-1: never assigned to a local interface, so binding to it fails.
    result = invoke("dashboard", "--storage", store, "--host", "192.0.2.1", "--port", "8080")
    assert_one_line_error(result, "cannot listen on host '192.0.2.1'")


def test_port_out_of_range(store):
    result = invoke("dashboard", "--storage", store, "--port", "70000")
    assert result.exit_code == 2 and "less than or equal to 65535" in result.output
