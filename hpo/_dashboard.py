"""optuna-dashboard on the study store: a readable view of our attributes, read-only unless asked,
and a server that fails in one line when it cannot listen.

optuna-dashboard shows each user attribute as one text cell and cuts it at 1,024 characters
(`optuna_dashboard._serializer.MAX_ATTR_LENGTH`). A trial's `config` (about 1,250 characters of
JSON) and its per-epoch `history` would be shown cut mid-way, as invalid JSON. `ReadableStorage`
wraps the store for the dashboard only and flattens nested attributes into one cell per field
(`config.lr`, `metrics.composite`, `history.val_nmse` = one number per epoch), so every field is
whole, and numeric ones become sortable columns of the trials table. Nothing in the store is
changed by the view.

optuna-dashboard lets anyone who reaches its port delete studies, mark trials failed or complete,
set trial attributes, write notes, upload artifacts. Unless `allow_edit` is given, the dashboard
refuses all of that at two depths: every request other than GET/HEAD/OPTIONS is answered 403 with
`READ_ONLY_MESSAGE` before optuna-dashboard sees it (the page shows that reason in its error
message where it shows one), and every write method of the storage it is given raises
`ReadOnlyError`, so a route that wrote on a GET could not change the store either.
"""

from __future__ import annotations

import copy
import errno
import json
import socket
import socketserver
from collections.abc import Container, Sequence
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from bottle import HTTPError
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo._errors import DashboardError

_Study = TypeVar("_Study")  # optuna's FrozenStudy, whose module is private
READ_ONLY_MESSAGE = "this dashboard is read-only; start it with --allow-edit to change studies"



class ReadOnlyError(HTTPError):
    """A write through a read-only dashboard's storage. A bottle HTTPError, so that
    optuna-dashboard's API views answer it as 403 with `READ_ONLY_MESSAGE` as the reason (any other
    exception becomes a bare 500 "internal server error")."""

    def __init__(self) -> None:
        super().__init__(403, READ_ONLY_MESSAGE)


def flatten_attrs(attrs: dict[str, Any], max_depth: int = 8) -> dict[str, Any]:
    """Nested dicts become dotted keys; a list of dicts with the same keys becomes one list per
    key (`history` -> `history.val_nmse: [..per epoch..]`). Other values are kept as they are.

    `max_depth` bounds how many levels are opened (1: only the top-level dicts).
    """
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any, depth: int) -> None:
        if depth < max_depth and isinstance(value, dict) and value:
            for key, item in value.items():
                visit(f"{prefix}.{key}", item, depth + 1)
            return
        if depth < max_depth and _is_table(value):
            for key in value[0]:
                visit(f"{prefix}.{key}", [row[key] for row in value], depth + 1)
            return
        flat[prefix] = value

    for key, value in attrs.items():
        visit(key, value, 0)
    return flat


def _is_table(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(row, dict) for row in value)
        and all(row.keys() == value[0].keys() for row in value)
    )


def _readable_trial(trial: FrozenTrial) -> FrozenTrial:
    view = copy.copy(trial)
    view.user_attrs = flatten_attrs(trial.user_attrs)
    return view


def _readable_study(study: _Study) -> _Study:
    view = copy.copy(study)
    view.user_attrs = flatten_attrs(study.user_attrs, max_depth=1)
    return view


class ReadableStorage(BaseStorage):
    """A view of `inner` whose trials and studies carry flattened user attributes.

    The readers delegate to `inner`, and those of trials and studies flatten what they return.
    The writers raise `ReadOnlyError` unless `allow_edit`; then they delegate too. Used for
    display only: samplers never see this view.
    """

    def __init__(self, inner: BaseStorage, *, allow_edit: bool = False) -> None:
        self._inner = inner
        self._allow_edit = allow_edit

    def _writable(self) -> BaseStorage:
        if not self._allow_edit:
            raise ReadOnlyError()
        return self._inner

    # --- readers that reshape
    def get_trial(self, trial_id: int) -> FrozenTrial:
        return _readable_trial(self._inner.get_trial(trial_id))

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        trials = self._inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [_readable_trial(trial) for trial in trials]

    def get_all_studies(self) -> list[Any]:
        return [_readable_study(study) for study in self._inner.get_all_studies()]

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return flatten_attrs(self._inner.get_study_user_attrs(study_id), max_depth=1)

    # --- other readers as they are
    def get_study_id_from_name(self, study_name: str) -> int:
        return self._inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._inner.get_study_directions(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_system_attrs(study_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def remove_session(self) -> None:
        self._inner.remove_session()

    # --- writers: refused unless allow_edit
    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        return self._writable().create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._writable().delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._writable().set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._writable().set_study_system_attr(study_id, key, value)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._writable().create_new_trial(study_id, template_trial)

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        self._writable().set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        return self._writable().set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._writable().set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._writable().set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._writable().set_trial_system_attr(trial_id, key, value)


# ---------------------------------------------------------------------------------- the server


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request (the page polls every few seconds); errors still print."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    # The page loads several API endpoints at once; parameter importances take a while.
    daemon_threads = True


def bind(app: Any, host: str, port: int) -> WSGIServer:
    """A server for `app` already listening on host:port; DashboardError in one line if not."""
    try:
        return make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise DashboardError(
                f"port {port} on {host} is already in use; pick another with --port"
            ) from None
        if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
            raise DashboardError(f"cannot listen on host {host!r}: {error.strerror}") from None
        if error.errno == errno.EACCES:
            raise DashboardError(
                f"no permission to listen on port {port}; use a port above 1023"
            ) from None
        raise DashboardError(f"cannot listen on {host}:{port}: {error.strerror}") from None


# Methods that only read (RFC 9110's safe methods). optuna-dashboard's page reads with GET only.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DRAIN_CHUNK_BYTES = 1 << 16


# Shown on every page of a read-only dashboard, top right over the (empty there) app bar:
# optuna-dashboard's own message for a refused study deletion does not give the server's reason.
# Plain HTML and an inline style, which the page's Content-Security-Policy allows (no script);
# above the app bar and drawer (z-index 1100, 1200), below dialogs and messages (1300, 1400);
# clicks pass through it.
READ_ONLY_BANNER = "Read-only: start hpo dashboard with --allow-edit to change studies"
_BANNER_HTML = (
    '<div id="hpo-read-only" role="status" style="position:fixed;top:16px;right:24px;'
    "z-index:1250;pointer-events:none;padding:6px 14px;border-radius:16px;background:#fff3cd;"
    'color:#5c4400;font:500 14px/20px Roboto,Helvetica,Arial,sans-serif">'
    f"{READ_ONLY_BANNER}</div>"
).encode()


def refuse_writes(app: Any) -> Any:
    """`app` behind a guard that answers every request other than GET/HEAD/OPTIONS with 403 and
    `{"reason": READ_ONLY_MESSAGE}` (the JSON shape of optuna-dashboard's own errors), and puts
    `READ_ONLY_BANNER` on its pages."""

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD", "GET").upper() in _SAFE_METHODS:
            if environ.get("PATH_INFO", "").startswith("/dashboard"):
                return _with_banner(app, environ, start_response)
            return app(environ, start_response)
        _drain(environ)
        body = json.dumps({"reason": READ_ONLY_MESSAGE}).encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return guarded


def _with_banner(app: Any, environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The page's HTML with the banner as the first element of its body. Never answered 304
    from the browser's cache, which may hold the page of an --allow-edit dashboard on this port."""
    for header in ("HTTP_IF_MODIFIED_SINCE", "HTTP_IF_NONE_MATCH"):
        environ.pop(header, None)
    answer: list[Any] = []

    def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answer[:] = [status, headers, exc_info]
        return lambda data: None  # bottle never writes through this

    result = app(environ, keep)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    status, headers, exc_info = answer
    html = any(k.lower() == "content-type" and "text/html" in v for k, v in headers)
    if status.startswith("200") and html and b"<body>" in body:
        body = body.replace(b"<body>", b"<body>" + _BANNER_HTML, 1)
        dropped = {"content-length", "last-modified", "etag", "cache-control"}
        headers = [(k, v) for k, v in headers if k.lower() not in dropped]
        headers += [("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    start_response(status, headers, exc_info)
    return [body]


def _drain(environ: dict[str, Any]) -> None:
    """Read the refused request's body: a server that closes a socket with unread data sends a
    reset, and the browser may then lose the 403 and report a network error instead."""
    try:
        left = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    stream = environ["wsgi.input"]
    while left > 0:
        chunk = stream.read(min(left, _DRAIN_CHUNK_BYTES))
        if not chunk:
            return
        left -= len(chunk)


def dashboard_app(
    storage: BaseStorage, artifact_store: Any | None = None, *, allow_edit: bool = False
) -> Any:
    """optuna-dashboard's WSGI app on the readable view of `storage`; read-only unless
    `allow_edit` (see the module's docstring)."""
    import optuna_dashboard

    view = ReadableStorage(storage, allow_edit=allow_edit)
    app = optuna_dashboard.wsgi(view, artifact_store=artifact_store)
    return app if allow_edit else refuse_writes(app)
