"""`hpo dashboard` without a browser: the readable view of the store, one-line errors, and the
refusal of every change unless --allow-edit, over HTTP against SQLite and PostgreSQL. The page
itself is checked in Chromium by test_dashboard_browser.py."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from hpo._dashboard import (
    READ_ONLY_MESSAGE,
    ReadableStorage,
    ReadOnlyError,
    bind,
    dashboard_app,
    flatten_attrs,
)
from hpo.testing import assert_one_line_error, invoke
from storage import trial_id
from tests.hpo_tests._dashboard_store import EditStudy, edit_study, snapshot


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
    assert view.get_trial(trial_id(seen)).user_attrs == seen.user_attrs
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


# ---------------------------------------------------------------- read-only unless --allow-edit

# A body each mutating route of optuna-dashboard 0.21 would accept, so that the route, were it
# let through, would change the store rather than stop at a 400 of its own. Routes not named here
# get `{}`.
_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/studies"): {"study_name": "made-by-the-page", "directions": ["minimize"]},
    ("POST", "/api/studies/<study_id:int>/rename"): {"study_name": "renamed-by-the-page"},
    ("PUT", "/api/studies/<study_id:int>/note"): {"version": 1, "body": "a note"},
    ("PUT", "/api/studies/<study_id:int>/<trial_id:int>/note"): {"version": 1, "body": "a note"},
    ("POST", "/api/trials/<trial_id:int>/tell"): {"state": "Fail"},
    ("POST", "/api/trials/<trial_id:int>/user-attrs"): {"user_attrs": {"edited": "yes"}},
    ("POST", "/api/studies/<study_id:int>/preference"): {
        "mode": "ChooseWorst",
        "candidates": [0, 1],
        "clicked": 0,
    },
    ("PUT", "/api/studies/<study_id:int>/preference_feedback_component"): {"output_type": "note"},
    ("POST", "/api/artifacts/<study_id:int>"): {
        "file": "data:text/plain;base64,aGk=",
        "filename": "a.txt",
    },
    ("POST", "/api/artifacts/<study_id:int>/<trial_id:int>"): {
        "file": "data:text/plain;base64,aGk=",
        "filename": "a.txt",
    },
}
# What optuna-dashboard 0.21 can change, from its source: these must be among the routes tried.
_KNOWN_MUTATING = {
    ("DELETE", "/api/studies/<study_id:int>"),
    ("POST", "/api/studies/<study_id:int>/rename"),
    ("PUT", "/api/studies/<study_id:int>/note"),
    ("PUT", "/api/studies/<study_id:int>/<trial_id:int>/note"),
    ("POST", "/api/trials/<trial_id:int>/tell"),
    ("POST", "/api/trials/<trial_id:int>/user-attrs"),
    ("POST", "/api/artifacts/<study_id:int>/<trial_id:int>"),
    ("DELETE", "/api/studies/<study_id:int>/preference/<history_id>"),
    ("POST", "/incompatible-rdb-schema"),
}
_PLACEHOLDER = re.compile(r"<(\w+)(?::[^>]*)?>")


def mutating_routes(storage: BaseStorage) -> list[tuple[str, str]]:
    """(method, rule) of every route of optuna-dashboard's app that is not a GET, read from the
    app itself, so that a route added by a new version is tried too."""
    from optuna_dashboard._app import create_app

    routes = {(r.method, r.rule) for r in create_app(ReadableStorage(storage)).routes}
    return sorted(route for route in routes if route[0] != "GET")


def request(base: str, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of one request."""
    data = None if body is None else json.dumps(body).encode()
    sent = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(sent, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` served on a free local port by the dashboard's own server, in a thread."""
    server = bind(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def route_path(rule: str, made: EditStudy) -> str:
    values = {
        "study_id": made.study_id,
        "trial_id": made.running_trial_id,
        "artifact_id": "0a1b2c3d",
        "history_id": "0a1b2c3d",
    }
    return _PLACEHOLDER.sub(lambda match: str(values[match[1]]), rule)


def test_every_mutating_route_is_refused_and_the_store_is_unchanged(store_url):
    made = edit_study(store_url)
    inner = optuna.storages.RDBStorage(store_url)
    routes = mutating_routes(inner)
    assert _KNOWN_MUTATING <= set(routes), sorted(_KNOWN_MUTATING - set(routes))
    # Methods optuna-dashboard has no route for, and a page, are refused just the same.
    tried = [*routes, ("PATCH", f"/api/studies/{made.study_id}"), ("POST", "/dashboard")]
    before = snapshot(store_url)
    with serving(dashboard_app(inner)) as base:
        for method, rule in tried:
            body = _BODIES.get((method, rule), {})
            status, answer = request(base, method, route_path(rule, made), body)
            assert (status, answer) == (403, {"reason": READ_ONLY_MESSAGE}), (method, rule)
        # Reading still works.
        status, answer = request(base, "GET", f"/api/studies/{made.study_id}", None)
        assert status == 200 and len(answer["trials"]) == 3
    assert snapshot(store_url) == before
    inner.engine.dispose()


def test_writes_through_the_storage_are_refused_even_past_the_http_guard(store_url):
    """The second depth: optuna-dashboard's own app, without the HTTP guard, on the read-only
    view: whatever a route writes is refused with the same 403, and nothing is written."""
    import optuna_dashboard

    made = edit_study(store_url)
    inner = optuna.storages.RDBStorage(store_url)
    before = snapshot(store_url)
    with serving(optuna_dashboard.wsgi(ReadableStorage(inner))) as base:
        for method, rule in [
            ("DELETE", "/api/studies/<study_id:int>"),
            ("POST", "/api/trials/<trial_id:int>/tell"),
            ("POST", "/api/trials/<trial_id:int>/user-attrs"),
            ("PUT", "/api/studies/<study_id:int>/<trial_id:int>/note"),
            ("POST", "/api/studies"),
        ]:
            body = _BODIES.get((method, rule), {})
            status, answer = request(base, method, route_path(rule, made), body)
            assert (status, answer) == (403, {"reason": READ_ONLY_MESSAGE}), (method, rule)
    assert snapshot(store_url) == before
    # Every writer of Optuna's storage interface, called directly: all that is not a reader.
    view = ReadableStorage(inner)
    readers = ("get_", "check_", "remove_session")
    writers = [
        name
        for name, _ in inspect.getmembers(BaseStorage, inspect.isfunction)
        if not name.startswith(("_", *readers))
    ]
    assert len(writers) >= 10, writers
    for name in writers:
        method = getattr(view, name)
        n_args = len(inspect.signature(method).parameters)
        with pytest.raises(ReadOnlyError):
            method(*[None] * n_args)
    assert snapshot(store_url) == before
    inner.engine.dispose()


def test_allow_edit_lets_the_page_change_the_store(store_url):
    made = edit_study(store_url)
    inner = optuna.storages.RDBStorage(store_url)
    with serving(dashboard_app(inner, allow_edit=True)) as base:
        note = f"/api/studies/{made.study_id}/{made.finished_trial_id}/note"
        assert request(base, "PUT", note, {"version": 1, "body": "looked at"})[0] == 204
        # Optuna sets attributes of unfinished trials only: before the tell.
        attrs = f"/api/trials/{made.running_trial_id}/user-attrs"
        assert request(base, "POST", attrs, {"user_attrs": {"edited": "yes"}})[0] == 204
        tell = f"/api/trials/{made.running_trial_id}/tell"
        assert request(base, "POST", tell, {"state": "Fail"})[0] == 204
        study = optuna.load_study(study_name=made.name, storage=store_url)
        trials = {trial_id(t): t for t in study.get_trials()}
        assert trials[made.running_trial_id].state == TrialState.FAIL
        assert trials[made.running_trial_id].user_attrs["edited"] == "yes"
        notes = inner.get_study_system_attrs(made.study_id)
        assert "looked at" in json.dumps(notes)
        assert request(base, "DELETE", f"/api/studies/{made.study_id}", {})[0] == 204
    assert made.name not in snapshot(store_url)
    inner.engine.dispose()
