"""Several local processes writing one SQLite store at once never see "database is locked"."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optuna

from storage import open_storage

_WORKER = textwrap.dedent(
    """
    import sys, warnings
    import optuna
    from storage import open_storage
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(sys.argv[1])
    study = optuna.load_study(study_name="race", storage=storage)
    for _ in range(int(sys.argv[2])):
        trial = study.ask()
        x = trial.suggest_float("x", -1.0, 1.0)
        for step in range(5):
            trial.report(x * x + step, step)
            trial.set_user_attr(f"a{step}", step)
        study.tell(trial, x * x)
    """
)


def test_six_processes_hammer_one_file_without_lock_errors(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    optuna.create_study(storage=open_storage(url), study_name="race")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, "25"], stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0] * 6, "\n".join(errors)
    assert not any("locked" in e for e in errors)
    study = optuna.load_study(study_name="race", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 150
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(len(t.intermediate_values) == 5 for t in trials)
