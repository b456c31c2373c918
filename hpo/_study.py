"""Create or load a study, check that it is the same experiment, and keep its trial budget.

A study remembers what makes its trials comparable (`StudySettings`: preset, objective, direction,
epochs) in its user attributes; resuming it with other settings is a StudyError, checked before
anything is written.

The budget (`hpo run --trials N`) counts the study's finished trials: COMPLETE, PRUNED and FAIL.
A trial that failed because its run was interrupted (Ctrl-C, a worker that vanished) is re-queued
as a new WAITING trial with the same parameters and no longer counts; the re-queued copy counts
once it runs. RUNNING trials count as the slot they will fill once their claim is complete. A
worker claims a trial with `claim_trial`, which counts and creates under a store-wide lock, so the
total never overshoots. A claim is complete when its trial carries the claim stamp (worker, host,
`claimed_unix`), written only after the claimer has checked that it still holds the lock, so
since before its count. A RUNNING trial without the stamp counts nowhere: its claim was cut off
(a lost lock, a store that went away, a claimer that died), and the next claim, which holds the
lock and so knows no claim is under way, voids it: FAIL with `void_reason`, counted nowhere, and
a retry it had taken off the queue goes back on it. Nothing depends on the cut-off claim's own
undo succeeding, so a store that stays down while it is undone costs no budget.

Retries resume: a re-queued trial trains in the checkpoint directory of the first trial of its
chain (`checkpoint_dir_for`), so it continues from the last epoch its predecessor saved.
`prune_checkpoints` keeps the directories still needed (unfinished chains) and the final
checkpoints of the best `keep` COMPLETE trials, and deletes the rest.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hpo._errors import StudyError
from hpo._trial_writes import set_user_attrs
from storage import store_lock

_logger = logging.getLogger(__name__)

OBJECTIVES: dict[str, str] = {"composite": "minimize", "nmse": "minimize"}  # name -> direction
PRUNERS = ("hyperband", "asha", "median", "none")
ETA_PRUNERS = ("hyperband", "asha")  # the pruners with a reduction factor (eta)
REDUCTION_FACTOR = 3  # their default eta
SAMPLERS = ("tpe", "random")
MAX_RETRIES = 3  # an interrupted/stale trial is re-queued at most this many times in a chain

# User attribute keys, shared by the worker (writes), the launcher and the read-only commands.
ATTR_SETTINGS = "hpo_settings"  # study: StudySettings as a dict
ATTR_BUDGET = "hpo_budget"  # study: the last --trials
ATTR_SPACE = "hpo_space"  # study: the last search space
ATTR_RETRY_OF = "retry_of"  # trial: number of the interrupted trial it repeats
ATTR_RETRY_CHAIN = "retry_chain"  # trial: numbers of the trials it repeats, first one first
ATTR_RETRY_COUNT = "retry_count"  # trial: how many times its parameters were tried before
ATTR_RESUMED_FROM = "resumed_from_epoch"  # trial: last epoch of the checkpoint it started from
ATTR_CHECKPOINT = "checkpoint"  # trial: its final checkpoint file (COMPLETE trials)
ATTR_FAIL_REASON = "fail_reason"  # trial: why it failed
ATTR_VOID = "void_reason"  # trial: a claim undone because its lock was lost; counts nowhere
ATTR_WORKER_PID = "worker_pid"
ATTR_HOST = "host"  # trial: the node its worker ran on (node_name())
ATTR_PID_SPACE = "pid_space"  # trial: kernel boot and pid namespace its worker_pid is valid in
HOST_ENV_VAR = "HPO_HOST"  # names this node in the store [default: the hostname]
ATTR_CLAIMED_UNIX = "claimed_unix"  # trial: wall clock (s since the epoch) when it was claimed
# Store lock key for creating studies: Optuna's study ids, the claims' keys, start at 1.
CREATE_LOCK_KEY = 0
# The points between the statements of a claim, in order, as `claim_trial(on_step=)` names them.
CLAIM_STEPS = ("locked", "swept", "counted", "asked", "heartbeat", "checked", "stamped")



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
    running: int  # RUNNING trials, the ones being claimed included
    waiting: int
    void: int = 0  # claims undone after a lost lock (FAIL, never counted)
    claiming: int = 0  # of `running`: claims not (yet) complete, which take no slot

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def used(self) -> int:
        """Budget slots taken: finished trials and the claimed RUNNING ones that will finish."""
        return self.finished + self.running - self.claiming

    def to_dict(self) -> dict[str, int]:
        """The counts for JSON output (`hpo status --json`, `hpo report`'s summary)."""
        return {
            "finished": self.finished, "complete": self.complete, "pruned": self.pruned,
            "failed": self.failed, "requeued": self.requeued, "running": self.running,
            "waiting": self.waiting, "void": self.void, "claiming": self.claiming,
        }


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # Optuna 5 defaults: multivariate, constant liar (parallel workers spread out).
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, epochs: int,
                reduction_factor: int = REDUCTION_FACTOR) -> optuna.pruners.BasePruner:
    """The pruner `name` over `epochs`; `reduction_factor` (eta >= 2) is hyperband's and asha's."""
    if reduction_factor < 2:
        raise StudyError(f"the reduction factor must be at least 2, but got {reduction_factor}")
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(epochs, 1), reduction_factor=reduction_factor
        )
    if name == "asha":
        # Asynchronous successive halving: rungs at 1, eta, eta^2, ... epochs; a trial goes on
        # past a rung only while it is in the best 1/eta of the trials that reached that rung.
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=reduction_factor, min_early_stopping_rate=0
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


def pruning_steps(name: str, epochs: int,
                  reduction_factor: int = REDUCTION_FACTOR) -> frozenset[int] | None:
    """The epochs after which pruner `name` (as `make_pruner` builds it) can stop a trial, or None
    for any epoch. Hyperband's brackets and asha promote at rungs min_resource x eta^k, with
    min_resource 1: elsewhere their answer is always "go on", and asking costs a store read."""
    if name in ETA_PRUNERS:
        steps, step = set(), 1
        while step <= epochs:
            steps.add(step)
            step *= reduction_factor
        return frozenset(steps)
    if name == "none":
        return frozenset()
    return None


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
    """The study `name`, created with `settings` if new; StudyError if it exists with others.

    Check, creation and settings happen under the store lock `CREATE_LOCK_KEY`, so nodes that
    start together with different settings cannot both pass the check: the first records its
    settings and the others are refused, as a node that joins later is.
    """
    with store_lock(_rdb(storage), CREATE_LOCK_KEY):
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


def claimed(trial: FrozenTrial) -> bool:
    """Whether `trial` carries the claim stamp (its claim completed under the lock)."""
    # Both keys are written in one transaction; either one is the stamp.
    return ATTR_CLAIMED_UNIX in trial.user_attrs or ATTR_WORKER_PID in trial.user_attrs


def count_trials(trials: Sequence[FrozenTrial]) -> StudyCounts:
    requeued = _requeued_numbers(trials)
    by_state = {state: 0 for state in TrialState}
    n_requeued = 0
    n_void = 0
    n_claiming = 0
    for trial in trials:
        if trial.state == TrialState.FAIL and ATTR_VOID in trial.user_attrs:
            n_void += 1
        elif trial.state == TrialState.FAIL and trial.number in requeued:
            n_requeued += 1
        else:
            by_state[trial.state] += 1
            if trial.state == TrialState.RUNNING and not claimed(trial):
                n_claiming += 1
    return StudyCounts(
        complete=by_state[TrialState.COMPLETE],
        pruned=by_state[TrialState.PRUNED],
        failed=by_state[TrialState.FAIL],
        requeued=n_requeued,
        running=by_state[TrialState.RUNNING],
        waiting=by_state[TrialState.WAITING],
        void=n_void,
        claiming=n_claiming,
    )


def deadline_passed(deadline: float | None) -> bool:
    """Whether `deadline` (Unix time, `hpo run --timeout`; None: no limit) has passed."""
    return deadline is not None and time.time() >= deadline


def claim_trial(study: optuna.Study, budget: int, deadline: float | None = None, *,
                on_step: Callable[[str], None] | None = None) -> optuna.Trial | None:
    """A new RUNNING trial if the study has fewer than `budget` trials used, else None; also None
    once `deadline` (Unix time, `hpo run --timeout`) has passed when the lock is held.

    Runs under the store lock: claims that were cut off are voided and stale trials failed (and
    re-queued) first, then the count and the creation happen with no other claim in between. A
    WAITING (re-queued) trial is taken before a new one is sampled. The trial gets its first
    heartbeat, then, once the lock is known to be still held, the claim stamp (this process and
    host). If the lock was lost (or any step after the creation fails), the trial is left
    unstamped, so it counts nowhere and the next claim voids it (this one voids it at once if it
    still holds the lock), and the error propagates: the caller retries the whole claim
    (storage.Reconnect does). `on_step` is called with each name of CLAIM_STEPS as the claim
    reaches it (tests stop the store there).
    """
    step = on_step or (lambda name: None)
    storage = study._storage  # Optuna has no public accessor
    rdb = _rdb(storage)
    with store_lock(rdb, study._study_id) as lease, warnings.catch_warnings():
        # Heartbeats are recorded around ask/tell on purpose (see the worker); Optuna warns that
        # they are meant for optimize().
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        step("locked")
        trials = study.get_trials(deepcopy=False)
        # Before the stale sweep: a cut-off claim is void, not a trial to run again.
        changed = _void_half_claims(study, trials)
        step("swept")
        if _fail_stale_locked(study) or changed:
            trials = study.get_trials(deepcopy=False)  # read again only when it changed
        step("counted")
        if count_trials(trials).used >= budget:
            return None
        if deadline_passed(deadline):  # checked under the lock: waiting for it may have taken long
            return None
        trial = study.ask()
        try:
            step("asked")
            if rdb.heartbeat_interval:  # first: a stamped trial always has a heartbeat
                rdb.record_heartbeat(trial._trial_id)
            step("heartbeat")
            # Held now, so held since before the count: no other claim counted in between, and
            # the trial is this claim's to stamp. Lost: it stays unstamped and counts nowhere.
            lease.check()
            step("checked")
            claim = {
                ATTR_WORKER_PID: os.getpid(),
                ATTR_HOST: node_name(),
                ATTR_PID_SPACE: _pid_space(),
                ATTR_CLAIMED_UNIX: time.time(),  # present: the claim is complete
            }
            set_user_attrs(trial, claim)  # one transaction: all four or none
            step("stamped")
        except BaseException as error:
            if _still_held(lease):  # else another claim may be voiding it: leave it to the sweep
                _void(study, trial._trial_id, f"claim not confirmed: {type(error).__name__}")
            raise
        return trial


def _still_held(lease: Any) -> bool:
    try:
        lease.check()
    except Exception:  # noqa: BLE001  (lost, or the store is away: the same to the caller)
        return False
    return True


def _void(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Undo a claim: FAIL the trial with `void_reason` (counted nowhere); a retry it had taken off
    the queue goes back on it. Best effort: if the store is away, the trial stays unstamped and
    the next claim's sweep voids it."""
    try:
        _void_now(study, trial_id, reason)
    except Exception as e:  # noqa: BLE001  (see the docstring)
        _logger.warning("could not void trial id %d: %s", trial_id, e)


def _void_now(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """`_void`, raising on a store error. Safe to repeat after a partial run: the retry goes
    back on the queue first (unless a copy already is there), then the trial is failed."""
    storage = study._storage
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return False  # voided already, or finished by its claimer after all
    retry_of = trial.user_attrs.get(ATTR_RETRY_OF)
    if retry_of is not None and not _retry_queued_elsewhere(study, trial):
        keys = (ATTR_RETRY_OF, ATTR_RETRY_CHAIN, ATTR_RETRY_COUNT)
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={k: trial.user_attrs[k] for k in keys if k in trial.user_attrs},
            )
        )
    try:
        storage.set_trial_user_attr(trial_id, ATTR_VOID, reason)
        return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _retry_queued_elsewhere(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Whether another live trial repeats the same interrupted one as `trial` (a copy queued by
    an earlier, partial void of it)."""
    retry_of = trial.user_attrs[ATTR_RETRY_OF]
    return any(
        other.number != trial.number
        and other.user_attrs.get(ATTR_RETRY_OF) == retry_of
        and not (other.state == TrialState.FAIL and ATTR_VOID in other.user_attrs)
        for other in study.get_trials(deepcopy=False)
    )


def _void_half_claims(study: optuna.Study, trials: Sequence[FrozenTrial]) -> bool:
    """Under the lock: void every RUNNING trial without the claim stamp. This process holds the
    lock, so no claim is under way: each one is a claim that was cut off (its lock lost, its
    store gone, its claimer dead) and would otherwise stay RUNNING. `trials` is the study's
    trials as just read; True if any was voided. A store error propagates, so that the claim
    does not count before they are void."""
    voided = False
    for trial in trials:
        if trial.state == TrialState.RUNNING and not claimed(trial):
            _void_now(study, trial._trial_id, "claim cut off before it was stamped")
            voided = True
    return voided


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """FAIL (and re-queue) the RUNNING trials whose heartbeat stopped; their numbers."""
    with store_lock(_rdb(study._storage), study._study_id):
        return _fail_stale_locked(study)


def _fail_stale_locked(study: optuna.Study) -> list[int]:
    rdb = _rdb(study._storage)
    if not rdb.heartbeat_interval:
        return []
    failed = []
    # Optuna's fail_stale_trials records no reason; this one says whose heartbeat stopped.
    for trial_id in rdb._get_stale_trial_ids(study._study_id):
        trial = rdb.get_trial(trial_id)
        reason = (
            f"no heartbeat for {rdb.grace_period} s (worker pid "
            f"{trial.user_attrs.get(ATTR_WORKER_PID)} on {trial.user_attrs.get(ATTR_HOST)}); "
            "re-queued"
        )
        if _fail_locked(study, trial_id, reason, requeue=True):
            failed.append(trial.number)
    return failed


def fail_trial(study: optuna.Study, trial_id: int, reason: str, *, requeue: bool) -> bool:
    """Mark a RUNNING trial FAIL with `reason`; with `requeue`, queue a retry that takes its place.

    Returns False if the trial had already finished. Runs under the store lock so a claim never
    sees the FAIL without its replacement.
    """
    with store_lock(_rdb(study._storage), study._study_id) as lease:
        done = _fail_locked(study, trial_id, reason, requeue=requeue)
        lease.check()
        return done


def _fail_locked(study: optuna.Study, trial_id: int, reason: str, *, requeue: bool) -> bool:
    storage = study._storage
    trial = storage.get_trial(trial_id)
    if trial.state.is_finished():
        # Already failed: a retry of this call after its commit was cut off still re-queues.
        if requeue and trial.state == TrialState.FAIL and ATTR_VOID not in trial.user_attrs:
            _enqueue_retry(study, trial)
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
    return list(trial.user_attrs.get(ATTR_RETRY_CHAIN, [])) + [trial.number]


def _enqueue_retry(study: optuna.Study, failed: FrozenTrial) -> bool:
    """Queue a WAITING copy of `failed` (same params), unless its chain is long enough or a
    copy is already queued. The FAIL of a trial not re-queued counts against the budget."""
    chain = _retry_chain(failed)
    if len(chain) > MAX_RETRIES:
        return False  # the FAIL counts: a trial that keeps being interrupted is given up
    if failed.number in _requeued_numbers(study.get_trials(deepcopy=False)):
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs={
                ATTR_RETRY_OF: failed.number,
                ATTR_RETRY_CHAIN: chain,
                ATTR_RETRY_COUNT: len(chain),
            },
        )
    )
    return True


class RequeueStaleTrial:
    """Heartbeat-stale trial callback, for Optuna's own `fail_stale_trials` (our claims use
    `fail_stale_trials` here, which also records why): re-queue it like an interrupted one."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _enqueue_retry(study, trial)


def _rdb(storage: Any) -> RDBStorage:
    """The RDBStorage under Optuna's cache wrapper."""
    inner = getattr(storage, "_backend", storage)
    if not isinstance(inner, RDBStorage):
        raise StudyError("hpo needs an RDB (SQLite or PostgreSQL) store")
    return inner


def node_name() -> str:
    """This node's name in the store: $HPO_HOST, else the hostname."""
    return os.environ.get(HOST_ENV_VAR) or socket.gethostname()


def _pid_space() -> str | None:
    """Where this process's pids mean something: the kernel boot and the pid namespace (two
    containers, or two machines, with the same node name never share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def stale_local_trials(study: optuna.Study, alive: Any) -> list[FrozenTrial]:
    """RUNNING trials started on this node by a worker process `alive(pid)` says is gone. A
    trial of another machine or container with the same node name (another pid space) is not."""
    host, space = node_name(), _pid_space()
    gone = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        pid = attrs.get(ATTR_WORKER_PID)
        if attrs.get(ATTR_HOST) != host or pid is None:
            continue
        if attrs.get(ATTR_PID_SPACE) not in (None, space):
            continue
        if not alive(pid):
            gone.append(trial)
    return gone


# --------------------------------------------------------------------------------- checkpoints


def chain_root(trial: FrozenTrial | optuna.Trial) -> int:
    """The number of the first trial of `trial`'s retry chain (its own number if not a retry)."""
    attrs = trial.user_attrs
    chain = attrs.get(ATTR_RETRY_CHAIN)
    return int(chain[0]) if chain else trial.number


def checkpoint_dir_for(root_dir: Path, study_name: str, root: int) -> Path:
    """Where the trials of the chain starting at trial number `root` keep their checkpoints."""
    return root_dir / study_name / f"trial-{root}"


def prune_checkpoints_or_warn(study: optuna.Study, root_dir: Path | str | None, *, keep: int,
                              retry: Callable[..., Any], warn: Callable[[str], None]) -> None:
    """`prune_checkpoints` through the store's reconnecting `retry`; a failure is passed to
    `warn` as one line, never raised: disk housekeeping must not stop the study."""
    if root_dir is None:
        return
    try:
        retry(lambda: prune_checkpoints(study, Path(root_dir), keep=keep), "pruning checkpoints")
    except Exception as e:  # noqa: BLE001
        warn(f"could not prune checkpoints: {e}")


def prune_checkpoints(study: optuna.Study, root_dir: Path, *, keep: int) -> list[Path]:
    """Delete the checkpoint directories no longer needed; the ones deleted.

    Kept: chains with a trial not yet finished (or a FAIL whose retry is queued), and the final
    checkpoints of the `keep` best COMPLETE trials. Safe to run from several processes at once.
    """
    base = root_dir / study.study_name
    if not base.is_dir():
        return []
    # The directories first: each one existed before the trials are read, so its claim is among
    # them (a directory made after the read belongs to a trial the read has not seen).
    paths = list(base.glob("trial-*"))
    # Under the store lock: a trial is failed and its retry queued in two commits under that
    # lock, and a chain read in between (its FAIL without the retry) would lose its checkpoint.
    with store_lock(_rdb(study._storage), study._study_id):
        trials = study.get_trials(deepcopy=False)
    requeued = _requeued_numbers(trials)
    needed: set[int] = set()
    for trial in trials:
        if not trial.state.is_finished() or trial.number in requeued:
            needed.add(chain_root(trial))
    settings = study_settings(study)
    direction = settings.direction if settings else "minimize"
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    ranked = sorted(complete, key=lambda t: t.value, reverse=direction == "maximize")
    needed.update(chain_root(t) for t in ranked[: max(keep, 0)])
    removed = []
    for path in paths:
        try:
            root = int(path.name.removeprefix("trial-"))
        except ValueError:
            continue
        if root not in needed:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
