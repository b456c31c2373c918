"""Study settings, the budget's count, and claiming trials from several processes at once."""

from __future__ import annotations

import concurrent.futures
import secrets
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from hpo._budget import _void, claim_trial, count_trials
from hpo._checkpoints import checkpoint_dir_for, prune_checkpoints
from hpo._errors import StudyError
from hpo._requeue import RequeueStaleTrial, enqueue_retry, fail_trial
from hpo._strategies import make_pruner
from hpo._studies import (
    StudySettings,
    check_compatible,
    create_or_load_study,
    load_existing_study,
    store_of,
)
from storage import open_storage, set_user_attrs, store_lock, study_id, study_storage, trial_id

SETTINGS = StudySettings(preset="smoke", objective="composite", direction="minimize", epochs=2)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def test_resuming_with_other_settings_is_refused_before_anything_is_written(store_url):
    storage = open_storage(store_url)
    name = unique("settings")
    assert check_compatible(storage, name, SETTINGS) is False
    create_or_load_study(storage, name, SETTINGS, budget=5)
    assert check_compatible(storage, name, SETTINGS) is True
    for change in ({"objective": "nmse"}, {"epochs": 3}, {"preset": "quick"}):
        other = StudySettings(**{**SETTINGS.to_attrs(), **change})
        with pytest.raises(StudyError, match="was created with") as info:
            create_or_load_study(storage, name, other, budget=9)
        assert "\n" not in str(info.value)
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.user_attrs["hpo_settings"] == SETTINGS.to_attrs()
    assert study.user_attrs["hpo_budget"] == 5  # the refused runs changed nothing


def test_a_foreign_study_with_trials_is_not_adopted(store_url):
    storage = open_storage(store_url)
    name = unique("foreign")
    optuna.create_study(storage=storage, study_name=name).optimize(lambda t: 1.0, n_trials=1)
    with pytest.raises(StudyError, match="not created by hpo run"):
        check_compatible(storage, name, SETTINGS)


def test_load_existing_study_picks_the_only_one_or_asks(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(StudyError, match="holds no study"):
        load_existing_study(storage, None)
    create_or_load_study(storage, "a", SETTINGS, budget=1)
    assert load_existing_study(storage, None).study_name == "a"
    create_or_load_study(storage, "b", SETTINGS, budget=1)
    with pytest.raises(StudyError, match="several studies.*a, b"):
        load_existing_study(storage, None)
    with pytest.raises(StudyError, match="no study named 'c'; studies: a, b"):
        load_existing_study(storage, "c")


def test_interrupted_trials_are_requeued_with_their_params_and_leave_the_budget(store_url):
    storage = open_storage(store_url)
    study = create_or_load_study(storage, unique("requeue"), SETTINGS, budget=3)
    first = claim_trial(study)
    x = first.suggest_float("x", 0.0, 1.0)
    assert fail_trial(study, trial_id(first), "interrupted by SIGINT", requeue=True)
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.finished, counts.requeued, counts.waiting, counts.used) == (0, 1, 1, 0)
    retry = claim_trial(study)
    assert retry.suggest_float("x", 0.0, 1.0) == x  # the same parameters again
    assert retry.user_attrs["retry_of"] == first.number
    study.tell(retry, 0.5)
    for _ in range(2):
        trial = claim_trial(study)
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, state=TrialState.FAIL)  # a failure of the trial itself counts
    assert claim_trial(study) is None
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.complete, counts.failed, counts.requeued, counts.finished) == (1, 2, 1, 3)
    failed = study.get_trials(states=(TrialState.FAIL,))[0]
    assert failed.user_attrs["fail_reason"] == "interrupted by SIGINT"


def test_stale_trials_are_failed_and_requeued_by_the_next_claim(tmp_path):
    url = f"sqlite:///{tmp_path / 'stale.db'}"
    storage = open_storage(
        url, stale_trial_callback=RequeueStaleTrial(), heartbeat_interval_s=1, grace_period_s=1
    )
    study = create_or_load_study(storage, "stale", SETTINGS, budget=2)
    lost = claim_trial(study)  # its worker "vanishes": no more heartbeats
    lost.suggest_int("n", 0, 100)
    time.sleep(2.5)
    retry = claim_trial(study)
    assert retry.user_attrs["retry_of"] == lost.number
    assert retry.params == study.get_trials()[lost.number].params
    assert study.get_trials()[lost.number].state == TrialState.FAIL
    assert "no heartbeat for 1 s" in study.get_trials()[lost.number].user_attrs["fail_reason"]
    assert retry.user_attrs["retry_count"] == 1 and retry.user_attrs["retry_chain"] == [0]


def test_a_voided_claim_counts_nowhere_and_gives_its_retry_back(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'void.db'}")
    study = create_or_load_study(storage, "void", SETTINGS, budget=2)
    first = claim_trial(study)
    first.suggest_int("n", 0, 100)
    assert fail_trial(study, trial_id(first), "interrupted", requeue=True)
    retry = claim_trial(study)  # takes the queued retry...
    _void(study, trial_id(retry), "claim not confirmed: LockLostError")  # ...and loses its lock
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.finished, counts.void, counts.waiting, counts.running) == (0, 1, 1, 0)
    again = claim_trial(study)
    assert again.user_attrs["retry_of"] == first.number and again.params == first.params


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_cut_off_claim_counts_nowhere_and_the_next_claim_voids_it_at_once(store_url):
    # A claim cut off between creating its trial and stamping it (its store went away, its
    # lock was lost, its process died) leaves a RUNNING trial without the stamp.
    storage = open_storage(store_url)
    study = create_or_load_study(storage, unique("cut"), SETTINGS, budget=1)
    cut = study.ask()
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.running, counts.claiming, counts.used) == (1, 1, 0)
    trial = claim_trial(study)  # the cut-off claim took no slot...
    assert trial is not None and trial.user_attrs["claimed_unix"] > 0
    voided = study_storage(study).get_trial(trial_id(cut))  # ...and is void now, not in two minutes
    assert voided.state == TrialState.FAIL and "void_reason" in voided.user_attrs
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.running, counts.claiming, counts.void, counts.used) == (1, 0, 1, 1)
    assert claim_trial(study) is None


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_cut_off_claim_of_a_retry_gives_the_retry_back_once(tmp_path, monkeypatch):
    storage = open_storage(f"sqlite:///{tmp_path / 'cut.db'}")
    study = create_or_load_study(storage, "cut", SETTINGS, budget=2)
    first = claim_trial(study)
    first.suggest_int("n", 0, 100)
    assert fail_trial(study, trial_id(first), "interrupted", requeue=True)
    cut = study.ask()  # takes the queued retry, and is cut off before its stamp
    assert cut.user_attrs["retry_of"] == first.number
    # Its claimer's undo is cut off too, after putting the retry back on the queue.
    with monkeypatch.context() as patch:
        patch.setattr(study_storage(study), "set_trial_user_attr", _store_gone)
        _void(study, trial_id(cut), "claim not confirmed")
    assert study_storage(study).get_trial(trial_id(cut)).state == TrialState.RUNNING
    # The next claim voids it without queueing the retry a second time, and takes the copy.
    again = claim_trial(study)
    assert again.user_attrs["retry_of"] == first.number and again.params == first.params
    assert study_storage(study).get_trial(trial_id(cut)).state == TrialState.FAIL
    trials = study.get_trials(deepcopy=False)
    repeats = [t for t in trials if t.user_attrs.get("retry_of") == first.number]
    assert sorted(t.state.name for t in repeats) == ["FAIL", "RUNNING"]
    counts = count_trials(trials)
    assert (counts.used, counts.waiting, counts.claiming, counts.void) == (1, 0, 0, 1)


def _store_gone(*args, **kwargs):
    raise ConnectionError("the store went away")


def test_no_trial_is_claimed_once_the_deadline_has_passed_even_after_waiting_for_the_lock(
    tmp_path,
):
    storage = open_storage(f"sqlite:///{tmp_path / 'deadline.db'}")
    study = create_or_load_study(storage, "deadline", SETTINGS, budget=5)
    assert claim_trial(study, deadline=time.time() - 1) is None
    # Another claimer holds the lock across the deadline: the claim waiting for it gets the lock
    # after the deadline and must not start a trial then.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store_lock(store_of(study), study_id(study)):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        deadline = time.time() + 0.3
        threading.Timer(0.8, release.set).start()
        assert claim_trial(study, deadline=deadline) is None
        assert time.time() > deadline  # it did wait for the lock
    finally:
        release.set()
        holder.join()
    assert study.get_trials() == []
    trial = claim_trial(study, deadline=time.time() + 60)
    assert trial is not None and trial.number == 0


def test_prune_checkpoints_keeps_unfinished_chains_and_the_best_complete(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'ckpt.db'}")
    study = create_or_load_study(storage, "ckpt", SETTINGS, budget=10)
    root = tmp_path / "checkpoints"
    for value in (3.0, 1.0, 2.0):  # trials 0, 1, 2
        trial = claim_trial(study)
        study.tell(trial, value)
    pruned = claim_trial(study)  # 3
    study.tell(pruned, state=TrialState.PRUNED)
    running = claim_trial(study)  # 4
    interrupted = claim_trial(study)  # 5, re-queued: its retry will need the checkpoint
    fail_trial(study, trial_id(interrupted), "interrupted", requeue=True)
    for number in range(6):
        checkpoint_dir_for(root, "ckpt", number).mkdir(parents=True)
    removed = prune_checkpoints(study, root, keep=2)
    assert sorted(int(p.name.split("-")[1]) for p in removed) == [0, 3]
    left = sorted(int(p.name.split("-")[1]) for p in (root / "ckpt").iterdir())
    assert left == [1, 2, 4, 5]
    assert running.number == 4


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_prune_checkpoints_never_sees_a_failure_without_its_retry(store_url, tmp_path):
    # fail_trial fails a trial and queues its retry in two commits under the store lock; a
    # prune between them (the chain finished, no retry yet) would delete what the retry resumes.
    storage = open_storage(store_url)
    name = unique("race")
    study = create_or_load_study(storage, name, SETTINGS, budget=5)
    trial = claim_trial(study)
    chain = checkpoint_dir_for(tmp_path, name, trial.number)
    chain.mkdir(parents=True)
    result: dict[str, list] = {}
    with store_lock(store_of(study), study_id(study)):
        study_storage(study).set_trial_state_values(trial_id(trial), state=TrialState.FAIL)
        pruner = threading.Thread(
            target=lambda: result.update(removed=prune_checkpoints(study, tmp_path, keep=0))
        )
        pruner.start()
        time.sleep(1.0)
        assert pruner.is_alive()  # waiting for the lock
        enqueue_retry(study, study_storage(study).get_trial(trial_id(trial)))
    pruner.join(timeout=30)
    assert result["removed"] == []
    assert chain.is_dir()


_CLAIMER = textwrap.dedent(
    """
    import random, sys, warnings
    import optuna
    from optuna.trial import TrialState
    from hpo._budget import claim_trial
    from storage import open_storage
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url, name, budget, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    n = 0
    while (trial := claim_trial(study)) is not None:
        x = trial.suggest_float("x", -1, 1)
        state = rng.choice([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
        if state == TrialState.PRUNED:
            trial.report(x, 1)
        study.tell(trial, x * x if state == TrialState.COMPLETE else None, state=state)
        n += 1
    print(n)
    """
)


def test_four_processes_claiming_at_once_never_overshoot_the_budget(store_url):
    storage = open_storage(store_url)
    name = unique("race")
    create_or_load_study(storage, name, SETTINGS, budget=30)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, store_url, name, "30", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    outputs = [r.communicate(timeout=240) for r in racers]
    assert [r.returncode for r in racers] == [0] * 4, [err for _, err in outputs]
    per_process = [int(out) for out, _ in outputs]
    assert sum(per_process) == 30
    assert sum(n > 0 for n in per_process) >= 2  # they really raced
    trials = optuna.load_study(study_name=name, storage=store_url).get_trials()
    assert len(trials) == 30
    counts = count_trials(trials)
    assert (counts.finished, counts.running, counts.waiting) == (30, 0, 0)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_set_user_attrs_writes_all_in_one_transaction_or_none(store_url):
    storage = open_storage(store_url)
    name = f"attrs-{secrets.token_hex(3)}"
    study = optuna.create_study(study_name=name, storage=storage)
    trial = study.ask()
    set_user_attrs(trial, {"a": 1, "b": [1.5, "x"], "c": {"nested": True}})
    assert trial.user_attrs == {"a": 1, "b": [1.5, "x"], "c": {"nested": True}}
    stored = optuna.load_study(study_name=name, storage=store_url).trials[0].user_attrs
    assert stored == {"a": 1, "b": [1.5, "x"], "c": {"nested": True}}
    # A value that cannot be stored fails the whole write: nothing of it lands, not even the
    # keys before it, and the earlier attributes are untouched.
    with pytest.raises(TypeError):
        set_user_attrs(trial, {"a": 2, "d": object()})
    stored = optuna.load_study(study_name=name, storage=store_url).trials[0].user_attrs
    assert stored == {"a": 1, "b": [1.5, "x"], "c": {"nested": True}}
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"late": 1})  # a finished trial is refused, as by set_user_attr


@pytest.mark.parametrize(("reduction_factor", "pruned"), [(2, False), (4, True)])
def test_the_reduction_factor_sets_how_few_trials_go_on_past_a_rung(reduction_factor, pruned):
    # Eight trials reached epoch 1 with values 1..8. A ninth with 3.5 is fourth of nine: in the
    # best half (eta 2) it goes on, in the best quarter (eta 4) it does not.
    study = optuna.create_study(pruner=make_pruner("asha", 9, reduction_factor))
    for value in range(1, 9):
        trial = study.ask()
        trial.report(float(value), 1)
        trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    trial = study.ask()
    trial.report(3.5, 1)
    assert trial.should_prune() is pruned


def test_nodes_creating_one_study_together_with_other_settings_agree_on_one(store_url):
    # Eight nodes reach an empty study at one instant, each with its own epochs: one records its
    # settings, the seven others are refused as a later node would be (none overwrites them).
    name = unique("together")
    storages = [open_storage(store_url) for _ in range(8)]
    barrier = threading.Barrier(len(storages))

    def create(index: int) -> int | str:
        settings = StudySettings(**{**SETTINGS.to_attrs(), "epochs": 2 + index})
        barrier.wait()
        try:
            create_or_load_study(storages[index], name, settings, budget=5)
        except StudyError as error:
            return str(error)
        return index

    with concurrent.futures.ThreadPoolExecutor(len(storages)) as pool:
        outcomes = list(pool.map(create, range(len(storages))))
    winners = [o for o in outcomes if isinstance(o, int)]
    assert len(winners) == 1, outcomes
    assert all("was created with epochs" in o for o in outcomes if isinstance(o, str))
    stored = optuna.load_study(study_name=name, storage=storages[0]).user_attrs["hpo_settings"]
    assert stored["epochs"] == 2 + winners[0]


def test_the_claim_reads_the_budget_from_the_store_each_time(tmp_path):
    # The budget lives in the study alone: a node that raises it (hpo run --trials N on another
    # node) lets every worker's next claim go on, and lowering it stops them, with no restart.
    from hpo._attrs import ATTR_BUDGET

    storage = open_storage(f"sqlite:///{tmp_path / 'budget.db'}")
    study = create_or_load_study(storage, "budget", SETTINGS, budget=1)
    first = claim_trial(study)
    assert first is not None and claim_trial(study) is None
    study.set_user_attr(ATTR_BUDGET, 3)
    assert claim_trial(study) is not None
    study.set_user_attr(ATTR_BUDGET, 2)
    assert claim_trial(study) is None


def test_a_worker_runs_what_the_study_holds_not_what_its_argv_says(tmp_path, monkeypatch):
    # The worker's argv carries only its own part (device, seed, checkpoints); the config, the
    # space, the pruner and the sampler come from the study's spec in the store.
    import os

    from hpo._search_space import default_space
    from hpo._studies import StudySpec, read_plan
    from hpo._worker import WorkerSpec
    from hpo._worker_loop import WorkerLoop
    from pipeline import config_to_dict, preset, replace

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    base = replace(preset("smoke"), epochs=1, n_train=64, n_val=32)
    space = default_space(base).to_dict()
    space["lr"] = {"kind": "Fixed", "value": 0.0025}  # a value no preset has
    plan = StudySpec(config=config_to_dict(base), space=space, pruner="none",
                     reduction_factor=3, sampler="random")  # fmt: skip
    settings = StudySettings(preset="smoke", objective="nmse", direction="minimize", epochs=1)
    study = create_or_load_study(open_storage(url), "plan", settings, budget=1, spec=plan)
    assert read_plan(open_storage(url), "plan") == (settings, plan)
    monkeypatch.setenv("HPO_STORAGE", url)
    worker = WorkerLoop(WorkerSpec(study="plan", sampler_seed=0, device="cpu", threads=1,
                                   index=0, parent_pid=os.getpid()))  # fmt: skip
    assert worker.loop() == 0
    (trial,) = optuna.load_study(study_name="plan", storage=url).get_trials()
    assert trial.state == TrialState.COMPLETE
    stored = trial.user_attrs["config"]
    assert stored["lr"] == 0.0025 and stored["n_train"] == 64 and stored["epochs"] == 1
    assert trial.user_attrs["pruner"] == "none"
    assert trial.value == trial.user_attrs["metrics"]["val_nmse"]  # the study's objective
    assert study.user_attrs["hpo_budget"] == 1


def test_the_launcher_sees_a_slot_exactly_when_a_claim_can_take_it(tmp_path):
    # budget_state.claimable is what the launcher starts workers on: it must agree with the
    # claim, also when a lowered budget leaves a re-queued trial waiting (no slot for it).
    from hpo._attrs import ATTR_BUDGET
    from hpo._budget import budget_state

    storage = open_storage(f"sqlite:///{tmp_path / 'slots.db'}")
    study = create_or_load_study(storage, "slots", SETTINGS, budget=2)
    first, second = claim_trial(study), claim_trial(study)
    assert not budget_state(study).claimable and claim_trial(study) is None
    assert fail_trial(study, trial_id(first), "interrupted", requeue=True)
    state = budget_state(study)
    assert state.counts.waiting == 1 and state.claimable  # the retry has the FAIL's slot
    study.set_user_attr(ATTR_BUDGET, 1)  # another node lowers the budget
    state = budget_state(study)
    assert state.counts.waiting == 1 and not state.claimable
    assert claim_trial(study) is None
    study.tell(second, 1.0)
    assert budget_state(study).met


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_claim_whose_trial_is_voided_after_its_lock_is_lost_fails_as_a_lost_lock(postgres_url):
    """The store restarts between the claim's lock check and its stamp: the lock goes with the
    connection, another claim's sweep voids the unstamped trial, and the stamp then meets a
    finished trial. That must reach the caller as a lost lock (retried), not as Optuna's
    UpdateFinishedTrialError (which stopped a worker: test_claim_store_loss, once)."""
    import sqlalchemy

    from hpo._budget import _void_now
    from storage import LockLostError, is_transient
    from storage._lock import _ADVISORY_NAMESPACE

    url = postgres_url
    storage = open_storage(url)
    name = unique("voided")
    study = create_or_load_study(storage, name, SETTINGS, budget=3)
    other = optuna.load_study(study_name=name, storage=open_storage(url))

    def lose_the_lock_then_be_voided(step: str) -> None:
        if step != "checked":
            return
        with storage.engine.connect() as connection:  # the lock's session ends...
            connection.execute(sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND granted AND classid = :space AND objid = :key"),
                {"space": _ADVISORY_NAMESPACE, "key": study_id(study)})
            connection.commit()
        running = other.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        assert len(running) == 1  # ...and another claim voids the unstamped trial
        assert _void_now(other, running[0]._trial_id, "claim not confirmed: test")

    with pytest.raises(LockLostError, match="voided by another claim") as info:
        claim_trial(study, on_step=lose_the_lock_then_be_voided)
    assert is_transient(info.value)
    assert claim_trial(study).user_attrs["claimed_unix"] > 0  # the retry claims a new trial
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.void, counts.running, counts.used) == (1, 1, 1)
