"""`hpo report` on a real smoke study: decodable PNG figures, a summary that agrees with the store,
and one-line errors for what cannot be reported."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from optuna.trial import TrialState
from PIL import Image

from hpo._figures import STATE_STYLE, _intermediate_values_mpl
from hpo.testing import assert_one_line_error, invoke
from tests.hpo_tests._results_study import results_study

pytestmark = pytest.mark.slow

FIGURES = ("history", "intermediate_values", "importances", "parallel_coordinate", "slice")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return results_study(tmp_path_factory)


@pytest.fixture(scope="module")
def report_dir(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    result = invoke("report", "--out", str(out), "--storage", study.url, "--study", study.name)
    assert result.exit_code == 0, result.output
    assert result.stderr == "", result.stderr  # no warnings, no notes: everything was drawn
    assert f"best: trial {study.load().best_trial.number}," in result.stdout
    return out


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_png_images_with_content(report_dir, name):
    path = report_dir / f"{name}.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # the file's structure and checksums
    with Image.open(path) as image:
        image.load()  # every pixel decodes
        width, height = image.size
        assert width >= 400 and height >= 250, image.size
        # A drawn chart, not a blank canvas: many distinct colours (axes, text, lines, markers).
        colours = image.convert("RGB").getcolors(maxcolors=width * height)
        assert len(colours) > 50


def test_summary_best_value_and_counts_equal_the_store(study, report_dir):
    stored = study.load()
    best = stored.best_trial
    trials = stored.get_trials()
    markdown = (report_dir / "summary.md").read_text()
    match = re.search(r"^\| best value \(composite\) \| (\S+) \|$", markdown, re.MULTILINE)
    assert match, markdown
    assert float(match.group(1)) == best.value  # printed at full precision: equal, not close
    assert re.search(rf"^\| trial \| {best.number} \|$", markdown, re.MULTILINE)
    for name, value in best.params.items():
        assert f"| {name} | {value!r} |" in markdown
    for state, label in ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"),
                         (TrialState.FAIL, "fail")):  # fmt: skip
        n = sum(1 for t in trials if t.state == state)
        assert f"| {label} | {n} |" in markdown
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for trial in failed:
        assert f"| {trial.number} | {trial.user_attrs['fail_reason']} |" in markdown

    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["best"]["value"] == best.value
    assert summary["best"]["number"] == best.number
    assert summary["best"]["params"] == best.params
    assert summary["best"]["metrics"] == best.user_attrs["metrics"]
    assert summary["counts"]["complete"] == sum(t.state == TrialState.COMPLETE for t in trials)
    assert set(summary["importances"]) == set(best.params)
    assert summary["notes"] == []


def test_interactive_page_loads_plotly_from_beside_it(report_dir):
    page = (report_dir / "plots.html").read_text()
    assert "<script src='plotly.min.js'></script>" in page
    assert (report_dir / "plotly.min.js").stat().st_size > 1_000_000  # the library itself
    for title in ("Optimisation history", "Intermediate values", "Parameter importances",
                  "Parallel coordinates", "Slices"):  # fmt: skip
        assert f"<h2>{title}</h2>" in page
    assert "cdn.plot.ly" not in page  # works offline


def test_intermediate_values_tell_pruned_from_complete(study):
    trials = study.load().get_trials()
    axes = _intermediate_values_mpl(trials, "composite", None)
    lines = axes.get_lines()
    with_values = [t for t in trials if t.intermediate_values]
    assert len(lines) == len(with_values)  # one line per trial that reported, nothing else
    for line, trial in zip(lines, with_values, strict=True):
        assert list(line.get_xdata()) == sorted(trial.intermediate_values)
        assert line.get_linestyle() == STATE_STYLE[trial.state]["linestyle"]
        assert line.get_color() == STATE_STYLE[trial.state]["color"]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    assert labels == [f"complete ({n_complete})", f"pruned ({n_pruned})"] or labels == [
        f"pruned ({n_pruned})",
        f"complete ({n_complete})",
    ]
    assert STATE_STYLE[TrialState.PRUNED]["linestyle"] != STATE_STYLE[TrialState.COMPLETE][
        "linestyle"
    ]


def _few_trials_store(tmp_path, n_complete: int, n_pruned: int) -> str:
    url = f"sqlite:///{tmp_path / 'few.db'}"
    study = optuna.create_study(study_name="few", storage=url)
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(n_complete):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 1e-3 * (i + 1)}, distributions=distributions, value=1.0 + i,
            intermediate_values={1: 2.0 + i, 2: 1.0 + i},
        ))  # fmt: skip
    for i in range(n_pruned):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 5e-3}, distributions=distributions, state=TrialState.PRUNED,
            intermediate_values={1: 9.0 + i},
        ))  # fmt: skip
    return url


def test_too_few_complete_trials_for_importances_is_said_not_crashed(tmp_path):
    url = _few_trials_store(tmp_path, n_complete=1, n_pruned=1)
    out = tmp_path / "out"
    result = invoke("report", "--out", str(out), "--storage", url)
    assert result.exit_code == 0, result.output
    assert not (out / "importances.png").exists()
    for name in ("history", "intermediate_values", "parallel_coordinate", "slice"):
        assert (out / f"{name}.png").is_file(), name
    markdown = (out / "summary.md").read_text()
    assert "need at least 2 complete trials; the study has 1" in markdown
    assert "| best value (objective) | 1.0 |" in markdown
    assert "need at least 2 complete trials" in result.stderr  # and said on the terminal


def test_only_pruned_trials_still_report_intermediate_values(tmp_path):
    url = _few_trials_store(tmp_path, n_complete=0, n_pruned=2)
    out = tmp_path / "out"
    result = invoke("report", "--out", str(out), "--storage", url)
    assert result.exit_code == 0, result.output
    assert (out / "intermediate_values.png").is_file()
    assert not (out / "history.png").exists()
    assert "No complete trial yet." in (out / "summary.md").read_text()


def test_study_that_does_not_exist(study, tmp_path):
    result = invoke("report", "--out", str(tmp_path), "--storage", study.url, "--study", "nope")
    assert_one_line_error(result, "no study named 'nope'", code=2)


def test_store_that_does_not_exist(tmp_path):
    result = invoke("report", "--out", str(tmp_path), "--storage", f"sqlite:///{tmp_path}/x.db")
    assert_one_line_error(result, "no study store at", code=2)
    assert not (tmp_path / "x.db").exists()


def test_empty_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = invoke("report", "--out", str(tmp_path / "out"), "--storage", url)
    assert_one_line_error(result, "study 'empty' has no trials yet; nothing to report", code=1)
    assert not (tmp_path / "out").exists()


def test_output_directory_that_cannot_be_written(study, tmp_path):
    # Tests run as root, for whom file modes do not stop a write; a regular file where a
    # directory must go stops anyone.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke(
        "report", "--out", str(blocker / "report"), "--storage", study.url, "--study", study.name
    )
    assert_one_line_error(result, f"cannot write to output directory {blocker / 'report'}", 2)
