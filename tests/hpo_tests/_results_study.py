"""One small finished study, made by the real `hpo run` once per test session, for the tests of
the commands that read results (dashboard, report, best, train --from-best).

Every test module that needs it asks for it through a fixture that calls `results_study`; the
first call runs the study (about 20 s) and the others reuse it. Tests must not write to it.
`results_study(..., url=...)` makes the same study in another store (a PostgreSQL database), once
per URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.testing import hpo

STUDY = "results-smoke"
N_TRIALS = 7
# With one worker and this seed the random sampler draws the same trials every run. Whether a
# trial fails depends on the draws alone: trial 2 draws fault_nonfinite_epoch=1 (a NaN loss in
# its first batch: FAIL, with the reason). Which of the others Hyperband prunes depends on their
# scores, so on the pipeline's code: with it as of this writing three complete and three are
# pruned after epoch 1. The tests need at least two complete (history, importances), one
# pruned and one failed; `results_study` checks that first and says so if a change breaks it.
SAMPLER_SEED = "3"
SPACE = "fault_nonfinite_epoch = { choices = [0, 1] }\nn_train = 64\n"


@dataclass(frozen=True)
class ResultsStudy:
    url: str
    name: str
    directory: Path

    def load(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.url)


_made: dict[str, ResultsStudy] = {}


def results_study(
    tmp_path_factory: pytest.TempPathFactory, url: str | None = None
) -> ResultsStudy:
    """The study in a new SQLite file, or in the store at `url`."""
    key = url or "study"
    if key in _made:
        return _made[key]
    directory = tmp_path_factory.mktemp("results-study")
    url = url or f"sqlite:///{directory / 'hpo.db'}"
    (directory / "space.toml").write_text(SPACE)
    result = hpo(
        "run", "--trials", str(N_TRIALS), "--preset", "smoke", "--workers", "1",
        "--threads", "1", "--sampler", "random", "--seed", SAMPLER_SEED, "--space",
        "space.toml", "--storage", url, "--study", STUDY, "--quiet", cwd=directory,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    made = ResultsStudy(url=url, name=STUDY, directory=directory)
    states = [t.state for t in made.load().get_trials()]
    assert states.count(TrialState.COMPLETE) >= 2 and TrialState.PRUNED in states, (
        f"the results study needs two complete trials and a pruned one, got {states}; the "
        "pipeline's scores changed: pick another SAMPLER_SEED in tests/hpo_tests/_results_study.py"
    )
    assert TrialState.FAIL in states, f"no failed trial among {states}: the search space changed"
    _made[key] = made
    return made
