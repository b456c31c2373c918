"""The grouped store writes (storage._optuna) and the pruner's rungs (hpo._strategies.pruning_steps):
the same rows and decisions as Optuna's one-at-a-time path, in fewer transactions."""

from __future__ import annotations

import random
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
import pytest
from sqlalchemy import event

from hpo._search_space import default_space, suggest_config
from hpo._strategies import PRUNERS, make_pruner, pruning_steps
from pipeline import preset
from storage import batched_params, open_storage, report_epoch

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


@contextmanager
def write_transactions(storage, table: str = "") -> Iterator[list[int]]:
    """Counts the committed transactions that wrote to a table whose name starts with `table`
    (any table by default; reads commit too, and are not counted)."""
    engine = storage.engine
    wrote = [False]
    count = [0]

    def statement(conn, cursor, text, parameters, context, executemany):
        words = text.split()
        verb = words[0].upper() if words else ""
        target = {"INSERT": 2, "UPDATE": 1, "DELETE": 2}.get(verb)
        if target is not None and len(words) > target and words[target].startswith(table):
            wrote[0] = True

    def commit(conn):
        if wrote[0]:
            count[0] += 1
        wrote[0] = False

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        yield count
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)


def _study(storage, seed: int = 0) -> optuna.Study:
    return optuna.create_study(study_name=f"writes-{secrets.token_hex(3)}", storage=storage,
                               sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=2))


def _stored(store_url: str, study: optuna.Study) -> list[tuple[dict, dict]]:
    trials = optuna.load_study(study_name=study.study_name, storage=store_url).trials
    return [(t.params, t.distributions) for t in trials]


def test_batched_params_write_what_optuna_writes_in_one_transaction(store_url):
    storage = open_storage(store_url)
    base = preset("smoke")  # the grid model: the larger default space
    space = default_space(base)
    n_params = len(space.searched())
    assert n_params >= 10
    batched, plain = _study(storage), _study(storage)
    for number in range(4):  # past TPE's start-up trials: the model-based draws too
        for study, batch in ((batched, True), (plain, False)):
            trial = study.ask()
            with write_transactions(storage, "trial_params") as writes:
                if batch:
                    with batched_params(trial):
                        config = suggest_config(trial, space, base)
                else:
                    config = suggest_config(trial, space, base)
            assert writes[0] == (1 if batch else n_params)
            assert config.lr == trial.params["lr"]
            study.tell(trial, float(number) + config.lr)
    # The same seeded draws, stored as the same values with the same distributions.
    assert _stored(store_url, batched) == _stored(store_url, plain)
    assert len(_stored(store_url, batched)[3][0]) == n_params


def test_a_failed_batch_writes_nothing_and_a_retry_writes_all(store_url):
    storage = open_storage(store_url)
    study = _study(storage)
    trial = study.ask()
    with pytest.raises(RuntimeError), batched_params(trial):
        trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_int("n", 1, 9)
        raise RuntimeError("the rest of the suggestion failed")
    assert trial.params == {}  # forgotten, so that a retry suggests and writes them
    assert _stored(store_url, study) == [({}, {})]
    with batched_params(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        n = trial.suggest_int("n", 1, 9)
    assert _stored(store_url, study)[0][0] == {"x": x, "n": n}


def test_a_batch_with_a_distribution_the_study_contradicts_is_refused_whole(store_url):
    storage = open_storage(store_url)
    study = _study(storage)
    first = study.ask()
    with batched_params(first):
        first.suggest_float("x", 0.0, 1.0)
    study.tell(first, 1.0)
    # Another process's view: Optuna's cache has not seen "x", so the store's first record of
    # it is what the new distribution is checked against.
    other = optuna.load_study(study_name=study.study_name, storage=open_storage(store_url))
    trial = other.ask()
    with pytest.raises(ValueError, match="different distribution"), batched_params(trial):
        trial.suggest_int("y", 1, 3)
        trial.suggest_categorical("x", ["a", "b"])
    assert _stored(store_url, study)[1] == ({}, {})  # neither y nor x


def test_report_epoch_writes_the_value_and_attributes_together(store_url):
    storage = open_storage(store_url)
    study = _study(storage)
    trial = study.ask()
    with write_transactions(storage) as writes:
        report_epoch(trial, 0.5, 1, {"history": [{"epoch": 1}]})
    assert writes[0] == 1
    assert trial.user_attrs["history"] == [{"epoch": 1}]
    with pytest.warns(UserWarning, match="already reported"):
        report_epoch(trial, 0.7, 1, {"history": [{"epoch": 1, "again": True}]})
    report_epoch(trial, 0.25, 2, {"history": [{"epoch": 2}]})
    stored = optuna.load_study(study_name=study.study_name, storage=store_url).trials[0]
    assert stored.intermediate_values == {1: 0.5, 2: 0.25}  # a step keeps its first value
    assert stored.user_attrs == {"history": [{"epoch": 2}]}
    assert trial._cached_frozen_trial.intermediate_values == {1: 0.5, 2: 0.25}  # what pruners see
    study.tell(trial, 0.25)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        report_epoch(trial, 0.1, 3, {"late": True})
    stored = optuna.load_study(study_name=study.study_name, storage=store_url).trials[0]
    assert 3 not in stored.intermediate_values and "late" not in stored.user_attrs


def test_the_writes_fall_back_to_optuna_on_other_storages():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    with batched_params(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
    report_epoch(trial, 0.5, 1, {"a": 1})
    frozen = study.trials[0]
    assert (frozen.params, frozen.intermediate_values, frozen.user_attrs) == (
        {"x": x}, {1: 0.5}, {"a": 1})
    # A FixedTrial (a config replayed without any store) suggests through it unchanged.
    base = preset("smoke")  # the grid model: the larger default space
    fixed = optuna.trial.FixedTrial({"lr": 1e-3, "batch_size": 64})
    space = default_space(base)
    fixed_space = type(space)({k: v for k, v in space.params.items()
                               if k in ("lr", "batch_size")})
    with batched_params(fixed):
        config = suggest_config(fixed, fixed_space, base)
    assert (config.lr, config.batch_size) == (1e-3, 64)


def _prune_epochs(name: str, epochs: int, eta: int, *, only_rungs: bool, seed: int) -> list:
    """The epoch each of 40 trials with noisy decreasing curves was pruned at (None: completed)."""
    rng = random.Random(seed)
    study = optuna.create_study(study_name="rungs", pruner=make_pruner(name, epochs, eta))
    steps = pruning_steps(name, epochs, eta)
    outcome = []
    for _ in range(40):
        trial = study.ask()
        level = rng.random()
        pruned = None
        for epoch in range(1, epochs + 1):
            value = level + rng.random() * 0.5 / epoch
            trial.report(value, epoch)
            asked = not only_rungs or steps is None or epoch in steps
            if epoch < epochs and asked and trial.should_prune():
                pruned = epoch
                break
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned else study.tell(
            trial, value)
        outcome.append(pruned)
    return outcome


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize(("epochs", "eta"), [(2, 2), (5, 3), (9, 3), (12, 4), (12, 2)])
def test_asking_the_pruner_only_at_its_rungs_prunes_the_same_trials(name, epochs, eta):
    if name not in ("hyperband", "asha") and (epochs, eta) != (12, 4):
        pytest.skip("eta is hyperband's and asha's; one case is enough for the others")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        every = _prune_epochs(name, epochs, eta, only_rungs=False, seed=epochs * eta)
        at_rungs = _prune_epochs(name, epochs, eta, only_rungs=True, seed=epochs * eta)
    assert at_rungs == every
    if name in ("hyperband", "asha"):
        assert any(every), "the case must prune something to show anything"
        assert set(filter(None, every)) <= pruning_steps(name, epochs, eta)


def test_pruning_steps_are_the_powers_of_eta_up_to_the_epochs():
    assert pruning_steps("hyperband", 12, 3) == {1, 3, 9}
    assert pruning_steps("asha", 16, 2) == {1, 2, 4, 8, 16}
    assert pruning_steps("none", 12) == frozenset()
    assert pruning_steps("median", 12) is None  # any epoch
