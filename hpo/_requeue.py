"""Failing trials and queueing their retries: interrupted, stale, and dead workers' trials.

A trial that failed because its run was interrupted (Ctrl-C, a worker that vanished, a heartbeat
that stopped) is re-queued as a new WAITING trial with the same parameters (`retry_record`), and
no longer counts; the re-queued copy counts once it runs. A chain is given up after MAX_RETRIES
tries, and its last FAIL then counts. Fails and re-queues run under the study's store lock, so a
claim never sees the FAIL without its replacement.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._attrs import (
    ATTR_FAIL_REASON,
    ATTR_HOST,
    ATTR_PID_SPACE,
    ATTR_WORKER_PID,
    node_name,
    pid_space,
    requeued_numbers,
    retry_chain,
    retry_record,
    void,
)
from hpo._studies import store_of
from storage import stale_trial_ids, store_lock, study_id, study_storage

MAX_RETRIES = 3  # an interrupted/stale trial is re-queued at most this many times in a chain


def fail_trial(study: optuna.Study, trial_id: int, reason: str, *, requeue: bool) -> bool:
    """Mark a RUNNING trial FAIL with `reason`; with `requeue`, queue a retry that takes its place.

    Returns False if the trial had already finished. Runs under the store lock so a claim never
    sees the FAIL without its replacement.
    """
    with store_lock(store_of(study), study_id(study)) as lease:
        done = fail_locked(study, trial_id, reason, requeue=requeue)
        lease.check()
        return done


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """FAIL (and re-queue) the RUNNING trials whose heartbeat stopped; their numbers."""
    with store_lock(store_of(study), study_id(study)):
        return fail_stale_locked(study)


def fail_stale_locked(study: optuna.Study) -> list[int]:
    """`fail_stale_trials`, for a caller that holds the study's store lock."""
    rdb = store_of(study)
    if not rdb.heartbeat_interval:
        return []
    failed = []
    # Optuna's fail_stale_trials records no reason; this one says whose heartbeat stopped.
    for trial_id in stale_trial_ids(rdb, study_id(study)):
        trial = rdb.get_trial(trial_id)
        reason = (
            f"no heartbeat for {rdb.grace_period} s (worker pid "
            f"{trial.user_attrs.get(ATTR_WORKER_PID)} on {trial.user_attrs.get(ATTR_HOST)}); "
            "re-queued"
        )
        if fail_locked(study, trial_id, reason, requeue=True):
            failed.append(trial.number)
    return failed


def fail_locked(study: optuna.Study, trial_id: int, reason: str, *, requeue: bool) -> bool:
    """`fail_trial`, for a caller that holds the study's store lock."""
    storage = study_storage(study)
    trial = storage.get_trial(trial_id)
    if trial.state.is_finished():
        # Already failed: a retry of this call after its commit was cut off still re-queues.
        if requeue and trial.state == TrialState.FAIL and not void(trial):
            enqueue_retry(study, trial)
        return False
    try:
        storage.set_trial_user_attr(trial_id, ATTR_FAIL_REASON, reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    if requeue:
        enqueue_retry(study, storage.get_trial(trial_id))
    return True


def enqueue_retry(study: optuna.Study, failed: FrozenTrial) -> bool:
    """Queue a WAITING copy of `failed` (same params), unless its chain is long enough or a
    copy is already queued. The FAIL of a trial not re-queued counts against the budget."""
    if len(retry_chain(failed)) > MAX_RETRIES:
        return False  # the FAIL counts: a trial that keeps being interrupted is given up
    if failed.number in requeued_numbers(study.get_trials(deepcopy=False)):
        return False
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=retry_record(failed),
        )
    )
    return True


class RequeueStaleTrial:
    """Heartbeat-stale trial callback, for Optuna's own `fail_stale_trials` (our claims use
    `fail_stale_trials` here, which also records why): re-queue it like an interrupted one."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        enqueue_retry(study, trial)


def stale_local_trials(study: optuna.Study, alive: Callable[[int], bool]) -> list[FrozenTrial]:
    """RUNNING trials started on this node by a worker process `alive(pid)` says is gone. A
    trial of another machine or container with the same node name (another pid space) is not."""
    host, space = node_name(), pid_space()
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
