"""Every use of Optuna's private API, fenced in one module and checked against Optuna's version.

Optuna offers no public way to write a trial's values in one transaction, to find the trials whose
heartbeat stopped without failing them, or to reach a study's storage and ids; `hpo` needs all of
these. They live here and nowhere else (tests/storage_tests/test_optuna_fence.py fails if another
module imports a private Optuna name or reads one of these private attributes), so an Optuna
release that moves them breaks one module, loudly, rather than leaving the pruner reading a wrong
view:

- At import, every private piece used is looked up. On an Optuna version these writes were not
  tested on (`TESTED_OPTUNA`), or where a piece is missing, `PRIVATE_WRITES` is False and the
  grouped writes fall back to Optuna's public one-at-a-time methods (correct, ~4x more store
  traffic); the accessors (`study_storage`, `study_id`, `trial_id`, `stale_trial_ids`) raise
  `StorageError` naming the version instead.
- The grouped writes: Optuna's `Trial` writes every suggested parameter, user attribute and
  reported value in its own transaction: a connection checkout (a pre-ping round trip), a lookup
  of the trial, the write and a commit, about 240 statements and 65 commits per `quick` trial with
  12 parameters and ~20 attributes (`python -m bench store_traffic`). Against a relational store
  these helpers write the same rows, through the same pieces of `RDBStorage` and with the same
  checks (the trial must still be RUNNING, a parameter's distribution must match the study's), in
  one transaction per group:
  - `set_user_attrs`: a dict of user attributes, all or none;
  - `report_epoch`: an epoch's intermediate value together with the attributes that go with it;
  - `batched_params`: the parameters suggested inside the `with` block, written when it ends.
  The trial object's own view (`trial.params`, `trial.user_attrs`, the values the pruner reads)
  is updated as Optuna's methods would update it. With any other storage they use Optuna's
  one-at-a-time methods.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # the table models: storage._schema cannot do without

try:
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError:  # moved: the grouped writes fall back to the public ones
    _create_scoped_session = None

from storage._errors import StorageError

# The Optuna releases (major.minor) whose private pieces below were tested (pyproject pins 5.0).
TESTED_OPTUNA = ("5.0",)
_PRIVATE_METHODS = (
    "_set_trial_attr_without_commit",
    "_set_trial_intermediate_value_without_commit",
    "_set_trial_param_without_commit",
    "_get_stale_trial_ids",
)


def _private_api_problem() -> str | None:
    """Why the private pieces cannot be trusted on this Optuna, or None if they can."""
    version = ".".join(optuna.__version__.split(".")[:2])
    if version not in TESTED_OPTUNA:
        return f"Optuna {optuna.__version__} (hpo was tested on {', '.join(TESTED_OPTUNA)})"
    missing = [name for name in _PRIVATE_METHODS if not hasattr(RDBStorage, name)]
    if _create_scoped_session is None:
        missing.append("_create_scoped_session (optuna.storages._rdb.storage)")
    if missing:
        return f"Optuna {optuna.__version__} lacks {', '.join(missing)}"
    return None


_PROBLEM = _private_api_problem()
# Whether the grouped writes use the private pieces (else Optuna's public one-at-a-time writes).
PRIVATE_WRITES = _PROBLEM is None
# Optuna's table models, for `storage._schema`.
MODELS = models


def _private(owner: object, name: str, what: str) -> Any:
    """`owner.<name>`, a private attribute of Optuna's; StorageError if this Optuna has none."""
    try:
        return getattr(owner, name)
    except AttributeError:
        problem = _PROBLEM or f"Optuna {optuna.__version__} has no {type(owner).__name__}.{name}"
        raise StorageError(f"cannot reach {what}: {problem}; install optuna 5.0") from None


def study_storage(study: optuna.Study) -> Any:
    """The storage `study` reads and writes through (Optuna's cache wrapper, usually)."""
    return _private(study, "_storage", "a study's storage")


def study_id(study: optuna.Study) -> int:
    """The store's id of `study`."""
    return _private(study, "_study_id", "a study's id")


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The store's id of `trial` (a live trial or a frozen one)."""
    return _private(trial, "_trial_id", "a trial's id")


def rdb_storage(storage: Any) -> RDBStorage | None:
    """The relational store under Optuna's cache wrapper, or None for another kind of storage."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def stale_trial_ids(rdb: RDBStorage, study: int) -> list[int]:
    """The RUNNING trials of study id `study` whose heartbeat stopped (Optuna's own sweep fails
    them without a reason; hpo records one)."""
    return list(_private(rdb, "_get_stale_trial_ids", "the stale trials")(study))


def _backend(trial: Any) -> RDBStorage | None:
    """The relational store to write `trial` through in groups, or None: another kind of storage,
    a FixedTrial (no storage), or an Optuna whose private pieces are not trusted."""
    if not PRIVATE_WRITES:
        return None
    return rdb_storage(getattr(trial, "storage", None))


@contextlib.contextmanager
def _transaction(backend: RDBStorage) -> Iterator[Any]:
    with _create_scoped_session(backend.scoped_session, True) as session:
        yield session


def _write_user_attrs(backend: RDBStorage, session: Any, trial_id: int,
                      attrs: dict[str, Any]) -> None:
    """Upsert `attrs` as the trial's user attributes: on PostgreSQL and SQLite one lookup of the
    trial and one multi-row INSERT ... ON CONFLICT statement; elsewhere Optuna's per-key write."""

    if not attrs:
        return
    model = models.TrialUserAttributeModel
    dialect = backend.engine.name
    upserts = dialect == "postgresql" or (
        dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0)
    )
    if not upserts:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(session, model, trial_id, key, value)
        return
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
    backend.check_trial_is_updatable(trial_id, trial.state)
    rows = [
        {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
        for key, value in attrs.items()
    ]
    statement = insert(model).values(rows)
    session.execute(statement.on_conflict_do_update(
        index_elements=[model.trial_id, model.key],
        set_={"value_json": statement.excluded.value_json},
    ))


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Set every attribute of `attrs` on `trial` in one transaction: all of them or none."""
    if not attrs:
        return
    backend = _backend(trial)
    if backend is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    with _transaction(backend) as session:
        _write_user_attrs(backend, session, trial._trial_id, attrs)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what trial.user_attrs returns


def report_epoch(trial: optuna.Trial, value: float, step: int,
                 attrs: dict[str, Any] | None = None) -> None:
    """`trial.report(value, step)` and `set_user_attrs(trial, attrs)` in one transaction.

    As with `Trial.report`, a step already reported keeps its first value (with Optuna's
    warning); the attributes are written all the same."""
    attrs = attrs or {}
    value, step = float(value), int(step)
    if step < 0:
        raise ValueError(f"step must be non-negative, but got {step}")
    backend = _backend(trial)
    if backend is None:
        set_user_attrs(trial, attrs)
        trial.report(value, step)
        return
    known = step in trial._cached_frozen_trial.intermediate_values
    if known:
        trial.report(value, step)  # only warns: the first value stays
    with _transaction(backend) as session:
        _write_user_attrs(backend, session, trial._trial_id, attrs)
        if not known:
            backend._set_trial_intermediate_value_without_commit(
                session, trial._trial_id, step, value
            )
    trial._cached_frozen_trial.user_attrs.update(attrs)
    if not known:
        trial._cached_frozen_trial.intermediate_values[step] = value


class _DeferredParams:
    """Stands in for the trial's storage while it suggests: parameter writes are queued, anything
    else goes to the real storage."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.queued: list[tuple[int, str, float, Any]] = []

    def set_trial_param(self, trial_id: int, name: str, value_internal: float,
                        distribution: Any) -> None:
        self.queued.append((trial_id, name, value_internal, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@contextlib.contextmanager
def batched_params(trial: Any) -> Iterator[None]:
    """Inside the block, `trial.suggest_*` samples as usual and the trial's view holds the values
    at once; the parameters reach the store in one transaction when the block ends. If the block
    raises or the write fails, nothing is written and the trial forgets the values too."""
    backend = _backend(trial)
    if backend is None:  # includes a FixedTrial, which has no storage at all
        yield
        return
    storage = trial.storage
    deferred = _DeferredParams(storage)

    def forget() -> None:
        # Not written: the trial forgets them too, so that suggesting again (a retry) samples
        # and writes them, as after a failed write of Optuna's own.
        for _, name, _, _ in deferred.queued:
            trial._cached_frozen_trial.params.pop(name, None)
            trial._cached_frozen_trial.distributions.pop(name, None)

    trial.storage = deferred  # type: ignore[assignment]
    try:
        yield
    except BaseException:
        forget()
        raise
    finally:
        trial.storage = storage
    if not deferred.queued:
        return
    # Optuna's cache remembers each parameter's distribution in the study; the store checks a
    # new one against it (or against the study's first record when the cache has none).
    study_info = getattr(storage, "_studies", {}).get(trial.study._study_id)
    known = study_info.param_distribution if study_info is not None else {}
    try:
        with _transaction(backend) as session:
            for trial_id, name, value, distribution in deferred.queued:
                backend._set_trial_param_without_commit(
                    session, trial_id, name, value, distribution, known.get(name)
                )
    except BaseException:
        forget()
        raise
    if study_info is not None:
        for _, name, _, distribution in deferred.queued:
            known.setdefault(name, distribution)
