"""Create or load a study, check that it is the same experiment, and keep its trial budget.

A study remembers what makes its trials comparable (`StudySettings`: preset, objective, direction,
epochs) in its user attributes; resuming it with other settings is a StudyError, checked before
anything is written.

The budget (`hpo run --trials N`) counts the study's finished trials: COMPLETE, PRUNED and FAIL.
A trial that failed because its run was interrupted (Ctrl-C, a worker that vanished) is re-queued
as a new WAITING trial with the same parameters and no longer counts; the re-queued copy counts
once it runs. RUNNING trials count as the slot they will fill. A worker claims a trial with
`claim_trial`, which counts and creates under a store-wide lock, so the total never overshoots.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from storage import store_lock

OBJECTIVES: dict[str, str] = {"composite": "minimize", "nmse": "minimize"}  # name -> direction
PRUNERS = ("hyperband", "median", "none")
SAMPLERS = ("tpe", "random")
MAX_RETRIES = 3  # an interrupted/stale trial is re-queued at most this many times in a chain

# User attribute keys, shared by the worker (writes), the launcher and the read-only commands.
ATTR_SETTINGS = "hpo_settings"  # study: StudySettings as a dict
ATTR_BUDGET = "hpo_budget"  # study: the last --trials
ATTR_SPACE = "hpo_space"  # study: the last search space
ATTR_RETRY_OF = "retry_of"  # trial: number of the interrupted trial it repeats
ATTR_FAIL_REASON = "fail_reason"  # trial: why it failed
ATTR_WORKER_PID = "worker_pid"
ATTR_HOST = "host"


class StudyError(Exception):
    """The study cannot be used as asked (missing, or created with other settings)."""


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
class StudyCounts:
    complete: int
    pruned: int
    failed: int  # FAIL trials that count (not re-queued)
    requeued: int  # FAIL trials replaced by a WAITING retry
    running: int
    waiting: int

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def used(self) -> int:
        """Budget slots taken: finished trials and the RUNNING ones that will finish."""
        return self.finished + self.running


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # Optuna 5 defaults: multivariate, constant liar (parallel workers spread out).
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(epochs, 1), reduction_factor=3
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


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
    space: dict[str, Any] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """The study `name`, created with `settings` if new; StudyError if it exists with others."""
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
    if space is not None:
        study.set_user_attr(ATTR_SPACE, space)
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


def best_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best COMPLETE trial (None if there is none yet); reads no store."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    pick = min if direction == "minimize" else max
    return pick(complete, key=lambda t: t.value)


def study_settings(study: optuna.Study) -> StudySettings | None:
    data = study.user_attrs.get(ATTR_SETTINGS)
    return StudySettings.from_attrs(data) if data else None


# ---------------------------------------------------------------------------------- the budget


def _requeued_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    return {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}


def count_trials(trials: Sequence[FrozenTrial]) -> StudyCounts:
    requeued = _requeued_numbers(trials)
    by_state = {state: 0 for state in TrialState}
    n_requeued = 0
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.number in requeued:
            n_requeued += 1
        else:
            by_state[trial.state] += 1
    return StudyCounts(
        complete=by_state[TrialState.COMPLETE],
        pruned=by_state[TrialState.PRUNED],
        failed=by_state[TrialState.FAIL],
        requeued=n_requeued,
        running=by_state[TrialState.RUNNING],
        waiting=by_state[TrialState.WAITING],
    )


def study_counts(study: optuna.Study) -> StudyCounts:
    return count_trials(study.get_trials(deepcopy=False))


def claim_trial(study: optuna.Study, budget: int) -> optuna.Trial | None:
    """A new RUNNING trial if the study has fewer than `budget` trials used, else None.

    Runs under the store lock: stale trials are failed (and re-queued) first, then the count and
    the creation happen with no other claim in between. A WAITING (re-queued) trial is taken
    before a new one is sampled. The trial is tagged with this process and host, and gets its
    first heartbeat, before the lock is released.
    """
    storage = study._storage  # Optuna has no public accessor
    with store_lock(_rdb(storage), study._study_id), warnings.catch_warnings():
        # Optuna flags fail_stale_trials as experimental and warns that heartbeats are meant for
        # optimize(); here they are recorded around ask/tell on purpose (see the worker).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        optuna.storages.fail_stale_trials(study)
        if study_counts(study).used >= budget:
            return None
        trial = study.ask()
        trial.set_user_attr(ATTR_WORKER_PID, os.getpid())
        trial.set_user_attr(ATTR_HOST, socket.gethostname())
        rdb = _rdb(storage)
        if rdb.heartbeat_interval:
            rdb.record_heartbeat(trial._trial_id)
        return trial


def fail_trial(study: optuna.Study, trial_id: int, reason: str, *, requeue: bool) -> bool:
    """Mark a RUNNING trial FAIL with `reason`; with `requeue`, queue a retry that takes its place.

    Returns False if the trial had already finished. Runs under the store lock so a claim never
    sees the FAIL without its replacement.
    """
    storage = study._storage
    with store_lock(_rdb(storage), study._study_id):
        trial = storage.get_trial(trial_id)
        if trial.state.is_finished():
            return False
        try:
            storage.set_trial_user_attr(trial_id, ATTR_FAIL_REASON, reason)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        if requeue:
            _enqueue_retry(study, storage.get_trial(trial_id))
        return True


def _retry_chain(trial: FrozenTrial) -> list[int]:
    return list(trial.user_attrs.get("retry_chain", [])) + [trial.number]


def _enqueue_retry(study: optuna.Study, failed: FrozenTrial) -> bool:
    chain = _retry_chain(failed)
    if len(chain) > MAX_RETRIES:
        return False  # the FAIL counts: a trial that keeps being interrupted is given up
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs={ATTR_RETRY_OF: failed.number, "retry_chain": chain},
        )
    )
    return True


class RequeueStaleTrial:
    """Heartbeat-stale trial callback: re-queue it like an interrupted one (bounded)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _enqueue_retry(study, trial)


def _rdb(storage: Any) -> RDBStorage:
    """The RDBStorage under Optuna's cache wrapper."""
    inner = getattr(storage, "_backend", storage)
    if not isinstance(inner, RDBStorage):
        raise StudyError("hpo needs an RDB (SQLite or PostgreSQL) store")
    return inner


def stale_local_trials(study: optuna.Study, alive: Any) -> list[FrozenTrial]:
    """RUNNING trials started on this host by a worker process `alive(pid)` says is gone."""
    host = socket.gethostname()
    gone = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(ATTR_WORKER_PID)
        if trial.user_attrs.get(ATTR_HOST) == host and pid is not None and not alive(pid):
            gone.append(trial)
    return gone
