"""Studies: create, check and load them, and the settings and specification each one keeps.

A study remembers what makes its trials comparable (`StudySettings`: preset, objective, direction,
epochs); resuming it with other settings is a StudyError, checked before anything is written. It
also holds what its workers run (`StudySpec`: the base config, the search space, the pruner and
the sampler) and its budget, both written by every `hpo run` that joins it (the latest wins):
a worker learns all of it from the store, and the claim reads the budget there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hpo._attrs import ATTR_BUDGET, ATTR_SETTINGS, ATTR_SPEC
from hpo._errors import StudyError
from storage import rdb_storage, store_lock

# Store lock key for creating studies: Optuna's study ids, the claims' keys, start at 1.
CREATE_LOCK_KEY = 0


@dataclass(frozen=True)
class StudySettings:
    """What must stay the same for the trials of one study to be comparable."""

    preset: str
    objective: str
    direction: str
    epochs: int

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, data: dict[str, Any]) -> StudySettings:
        return cls(**{key: data[key] for key in ("preset", "objective", "direction", "epochs")})


@dataclass(frozen=True)
class StudySpec:
    """What every worker of the study runs: written into the store by `hpo run`, read back by
    each worker when it starts (the sampler seed and the device are the worker's own)."""

    config: dict[str, Any]  # the base ExperimentConfig (the preset, with --epochs) as a dict
    space: dict[str, Any]  # SearchSpace.to_dict()
    pruner: str
    reduction_factor: int  # eta of hyperband and asha
    sampler: str

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, data: dict[str, Any]) -> StudySpec:
        return cls(**data)


def store_of(study: optuna.Study) -> RDBStorage:
    """The relational store `study` lives in; StudyError for any other kind of storage."""
    from storage import study_storage

    rdb = rdb_storage(study_storage(study))
    if rdb is None:
        raise StudyError("hpo needs an RDB (SQLite or PostgreSQL) store")
    return rdb


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def check_compatible(storage: RDBStorage, name: str, settings: StudySettings) -> bool:
    """True if study `name` exists with these settings, False if it does not exist.

    StudyError if it exists with other settings or was not made by `hpo run` (and has trials).
    Writes nothing.
    """
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return False
    attrs = storage.get_study_user_attrs(study_id)
    if ATTR_SETTINGS not in attrs:
        if storage.get_all_trials(study_id, deepcopy=False):
            raise StudyError(
                f"study {name!r} exists but was not created by hpo run; choose another --study"
            )
        return True  # created but never set up (an interrupted first run): adopt it
    stored = StudySettings.from_attrs(attrs[ATTR_SETTINGS])
    for field in ("objective", "preset", "epochs", "direction"):
        old, new = getattr(stored, field), getattr(settings, field)
        if old != new:
            raise StudyError(
                f"study {name!r} was created with {field} {old}, not {new}; resume it with "
                f"--{field} {old} or start a new study with --study NAME"
            )
    return True


def create_or_load_study(
    storage: RDBStorage,
    name: str,
    settings: StudySettings,
    *,
    budget: int,
    spec: StudySpec | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """The study `name`, created with `settings` if new; StudyError if it exists with others.
    Records `budget` and `spec` (the latest `hpo run`'s) for the workers and the claim.

    Check, creation and settings happen under the store lock `CREATE_LOCK_KEY`, so nodes that
    start together with different settings cannot both pass the check: the first records its
    settings and the others are refused, as a node that joins later is.
    """
    with store_lock(storage, CREATE_LOCK_KEY):
        check_compatible(storage, name, settings)
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=settings.direction,
            load_if_exists=True,
            sampler=sampler,
            pruner=pruner,
        )
        if ATTR_SETTINGS not in study.user_attrs:
            study.set_user_attr(ATTR_SETTINGS, settings.to_attrs())
        study.set_user_attr(ATTR_BUDGET, budget)
        if spec is not None:
            study.set_user_attr(ATTR_SPEC, spec.to_attrs())
    return study


def load_existing_study(storage: RDBStorage, name: str | None) -> optuna.Study:
    """The named study, or the store's only study when `name` is None; StudyError otherwise."""
    names = study_names(storage)
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise StudyError("the store holds no study yet; start one with hpo run")
        else:
            raise StudyError(
                f"the store holds several studies; pick one with --study: {', '.join(names)}"
            )
    if name not in names:
        known = f"; studies: {', '.join(names)}" if names else "; the store holds no study"
        raise StudyError(f"no study named {name!r}{known}")
    return optuna.load_study(study_name=name, storage=storage)


def open_existing_study(url: str | None, name: str | None) -> tuple[Any, optuna.Study]:
    """(store location, study) for the read-only commands: the store must exist (nothing is
    created) and no heartbeat is started. StorageError or StudyError, one line each."""
    from storage import open_storage, resolve_url

    location = resolve_url(url)
    store = open_storage(location, create=False, heartbeat=False)
    return location, load_existing_study(store, name)


def study_settings(study: optuna.Study) -> StudySettings | None:
    data = study.user_attrs.get(ATTR_SETTINGS)
    return StudySettings.from_attrs(data) if data else None


def direction_of(study: optuna.Study) -> str:
    """The direction the study optimises: its settings', or Optuna's for one not made by
    `hpo run`."""
    settings = study_settings(study)
    return settings.direction if settings else study.direction.name.lower()


def best_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best COMPLETE trial (None if there is none yet); reads no store."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    pick = min if direction == "minimize" else max
    return pick(complete, key=lambda t: t.value)


def read_plan(storage: RDBStorage, name: str) -> tuple[StudySettings, StudySpec]:
    """What study `name` runs, as a worker reads it before loading the study: its settings and
    its specification. StudyError if the study or either record is missing."""
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        raise StudyError(f"no study named {name!r}") from None
    if ATTR_SETTINGS not in attrs or ATTR_SPEC not in attrs:
        raise StudyError(f"study {name!r} has no specification; start it with hpo run")
    return StudySettings.from_attrs(attrs[ATTR_SETTINGS]), StudySpec.from_attrs(attrs[ATTR_SPEC])
