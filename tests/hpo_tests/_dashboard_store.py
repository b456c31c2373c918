"""A small study for the tests that try to change a store through the dashboard, and a snapshot
of a whole store to compare before and after."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from storage import study_id, trial_id


@dataclass(frozen=True)
class EditStudy:
    url: str
    name: str
    study_id: int
    running_trial_id: int  # a trial the page offers to mark failed or complete
    running_trial_number: int
    finished_trial_id: int  # a trial whose note the page lets one edit
    finished_trial_number: int


def edit_study(url: str) -> EditStudy:
    """A study in the store at `url` (a unique name, so several can share a database): two
    COMPLETE trials with intermediate values, attributes and a note's worth of system attributes,
    and one trial left RUNNING."""
    name = f"edit-{secrets.token_hex(3)}"
    study = optuna.create_study(study_name=name, storage=url)
    study.set_user_attr("hpo_settings", {"preset": "smoke", "epochs": 2})
    for value in (0.5, 0.25):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.report(value * 2, 1)
        trial.report(value, 2)
        trial.set_user_attr("metrics", {"composite": value})
        study.tell(trial, value)
    running = study.ask()
    running.suggest_float("lr", 1e-4, 1e-2, log=True)
    running.report(0.75, 1)
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))[0]
    return EditStudy(
        url=url,
        name=name,
        study_id=study_id(study),
        running_trial_id=trial_id(running),
        running_trial_number=running.number,
        finished_trial_id=trial_id(finished),
        finished_trial_number=finished.number,
    )


def snapshot(url: str) -> dict[str, Any]:
    """Everything the dashboard could change in the store at `url`: each study's directions and
    attributes (notes and artifacts are study/trial system attributes), and each trial's state,
    values, params, attributes and intermediate values."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return {
            study.study_name: {
                "directions": study.directions,
                "user_attrs": study.user_attrs,
                "system_attrs": storage.get_study_system_attrs(study_id(study)),
                "trials": [
                    (
                        trial.number,
                        trial.state,
                        trial.values,
                        trial.params,
                        trial.user_attrs,
                        trial.system_attrs,
                        trial.intermediate_values,
                    )
                    for trial in storage.get_all_trials(study_id(study))
                ],
            }
            for study in storage.get_all_studies()
        }
    finally:
        storage.engine.dispose()
