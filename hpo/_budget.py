"""The budget and the claim: how many trials a study may finish, and taking a slot of it.

The budget (`hpo run --trials N`, kept in the study) counts the study's finished trials:
COMPLETE, PRUNED and FAIL. A FAIL that was re-queued no longer counts; its retry counts once it
runs. RUNNING trials count as the slot they will fill once their claim is complete. The claim is
the one place the budget is enforced: a worker claims a trial with `claim_trial`, which reads the
budget, counts and creates under a store-wide lock, so the total never overshoots.

A claim is complete when its trial carries the claim stamp (`claim_record`: worker, host,
`claimed_unix`), written only after the claimer has checked that it still holds the lock, so
since before its count. A RUNNING trial without the stamp counts nowhere: its claim was cut off
(a lost lock, a store that went away, a claimer that died), and the next claim, which holds the
lock and so knows no claim is under way, voids it: FAIL with `void_reason`, counted nowhere, and
a retry it had taken off the queue goes back on it. Nothing depends on the cut-off claim's own
undo succeeding, so a store that stays down while it is undone costs no budget.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._attrs import (
    ATTR_BUDGET,
    ATTR_RETRY_CHAIN,
    ATTR_RETRY_COUNT,
    ATTR_RETRY_OF,
    ATTR_VOID,
    claim_record,
    claimed,
    requeued_numbers,
    void,
)
from hpo._requeue import fail_stale_locked
from hpo._studies import store_of
from storage import (
    LockLostError,
    set_user_attrs,
    store_lock,
    study_id,
    study_storage,
    trial_id,
)

_logger = logging.getLogger(__name__)

# The points between the statements of a claim, in order, as `claim_trial(on_step=)` names them.
CLAIM_STEPS = ("locked", "swept", "counted", "asked", "heartbeat", "checked", "stamped")


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


def count_trials(trials: Sequence[FrozenTrial]) -> StudyCounts:
    requeued = requeued_numbers(trials)
    by_state = {state: 0 for state in TrialState}
    n_requeued = n_void = n_claiming = 0
    for trial in trials:
        if void(trial):
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


def study_budget(study: optuna.Study) -> int | None:
    """The study's budget as the store holds it now (None: no `hpo run` has set one)."""
    return study_storage(study).get_study_user_attrs(study_id(study)).get(ATTR_BUDGET)


def deadline_passed(deadline: float | None) -> bool:
    """Whether `deadline` (Unix time, `hpo run --timeout`; None: no limit) has passed."""
    return deadline is not None and time.time() >= deadline


def claim_trial(study: optuna.Study, deadline: float | None = None, *,
                on_step: Callable[[str], None] | None = None) -> optuna.Trial | None:
    """A new RUNNING trial if the study has fewer trials used than its budget, else None; also
    None once `deadline` (Unix time, `hpo run --timeout`) has passed when the lock is held.

    Runs under the store lock: claims that were cut off are voided and stale trials failed (and
    re-queued) first, then the budget is read, and the count and the creation happen with no other
    claim in between. A WAITING (re-queued) trial is taken before a new one is sampled. The trial
    gets its first heartbeat, then, once the lock is known to be still held, the claim stamp (this
    process and host). If the lock was lost (or any step after the creation fails), the trial is
    left unstamped, so it counts nowhere and the next claim voids it (this one voids it at once if
    it still holds the lock), and the error propagates: the caller retries the whole claim
    (storage.Reconnect does). `on_step` is called with each name of CLAIM_STEPS as the claim
    reaches it (tests stop the store there).
    """
    step = on_step or (lambda name: None)
    rdb = store_of(study)
    with store_lock(rdb, study_id(study)) as lease, warnings.catch_warnings():
        # Heartbeats are recorded around ask/tell on purpose (see the worker); Optuna warns that
        # they are meant for optimize().
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        step("locked")
        trials = study.get_trials(deepcopy=False)
        # Before the stale sweep: a cut-off claim is void, not a trial to run again.
        changed = _void_half_claims(study, trials)
        step("swept")
        if fail_stale_locked(study) or changed:
            trials = study.get_trials(deepcopy=False)  # read again only when it changed
        step("counted")
        budget = study_budget(study) or 0
        if count_trials(trials).used >= budget:
            return None
        if deadline_passed(deadline):  # checked under the lock: waiting for it may have taken long
            return None
        trial = study.ask()
        try:
            step("asked")
            if rdb.heartbeat_interval:  # first: a stamped trial always has a heartbeat
                rdb.record_heartbeat(trial_id(trial))
            step("heartbeat")
            # Held now, so held since before the count: no other claim counted in between, and
            # the trial is this claim's to stamp. Lost: it stays unstamped and counts nowhere.
            lease.check()
            step("checked")
            set_user_attrs(trial, claim_record())  # one transaction: all four or none
            step("stamped")
        except BaseException as error:
            if _still_held(lease):  # else another claim may be voiding it: leave it to the sweep
                _void(study, trial_id(trial), f"claim not confirmed: {type(error).__name__}")
                raise
            if isinstance(error, optuna.exceptions.UpdateFinishedTrialError):
                # The lock went with the store, and another claim's sweep voided this unstamped
                # trial before the stamp reached it: a lost lock, which the caller retries.
                raise LockLostError(
                    f"the store lock was lost and trial {trial.number} voided by another claim"
                ) from error
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
    storage = study_storage(study)
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
        and not void(other)
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
            _void_now(study, trial_id(trial), "claim cut off before it was stamped")
            voided = True
    return voided


@dataclass(frozen=True)
class BudgetState:
    """A study's counts against its budget, as read at one moment."""

    counts: StudyCounts
    budget: int

    @property
    def met(self) -> bool:
        """Every slot of the budget holds a finished trial: the study is done."""
        return self.counts.finished >= self.budget

    @property
    def claimable(self) -> bool:
        """A claim could succeed now: a slot of the budget is free (a re-queued trial frees the
        slot of the FAIL it replaces, which stops counting). Exactly the claim's own test."""
        return self.counts.used < self.budget


def budget_state(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
                 ) -> BudgetState:
    """The study's counts (of `trials`, if already read) and its budget (0 when none is set),
    read from the store."""
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    return BudgetState(count_trials(trials), study_budget(study) or 0)
