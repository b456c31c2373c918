"""`hpo report`: a study's figures and a one-page summary, written without a browser.

PNG figures come from matplotlib (Agg, no display); the same figures as interactive plotly charts
go into one `plots.html` that loads `plotly.min.js` from beside it, so the report works offline.
`summary.md` holds the counts by state, the best trial's params and final metrics, the parameter
importances and the failure reasons; `summary.json` holds the same for scripts.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._attrs import ATTR_BUDGET, ATTR_CHECKPOINT, ATTR_METRICS, failures
from hpo._budget import count_trials
from hpo._errors import NothingToReport
from hpo._figures import evaluator, plan_figures, plots_html, quiet_plotting, save_png
from hpo._outdir import prepare_out_dir
from hpo._studies import StudySettings, best_trial, direction_of, study_settings

# PED-ANOVA compares complete trials: it needs two (the dashboard's rule too), and with a
# handful the ranking is rough (the summary says so).
MIN_COMPLETE_FOR_IMPORTANCE = 2
MAX_PLOTTED_PARAMS = 6  # parallel coordinates and slices: the most important ones


@dataclass
class Report:
    """What `write_report` wrote, and the summary it wrote it from."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out, and why
    summary: dict[str, Any] = field(default_factory=dict)


def write_report(study: optuna.Study, out_dir: Path, *, store: str) -> Report:
    """Write the figures, `plots.html`, `summary.md` and `summary.json` of `study` to `out_dir`.

    `store` names the store in the summary (no password). NothingToReport if the study has no
    finished trial, OutputNotWritable if `out_dir` cannot be written.
    """
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    if not finished:
        raise NothingToReport(
            f"study {study.study_name!r} has no finished trial yet; nothing to report"
        )
    prepare_out_dir(out_dir)
    settings = study_settings(study)
    best = best_trial(trials, direction_of(study))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    report = Report(out_dir)

    importances = _importances(study, complete, report)
    plotted = _plotted_params(study, importances, complete)
    objective = settings.objective if settings else "objective"

    figures, notes = plan_figures(study, trials, objective=objective, best=best,
                                  importances=importances, plotted=plotted)  # fmt: skip
    report.notes += notes
    report.files += [save_png(figure, out_dir) for figure in figures]
    report.files += plots_html(figures, study.study_name, out_dir)
    report.summary = _summary(study, trials, settings, best, importances, store, report)
    (out_dir / "summary.json").write_text(json.dumps(report.summary, indent=2))
    (out_dir / "summary.md").write_text(_summary_markdown(report.summary))
    report.files += [out_dir / "summary.md", out_dir / "summary.json"]
    return report


# --------------------------------------------------------------------------------- the numbers


def _importances(
    study: optuna.Study, complete: Sequence[FrozenTrial], report: Report
) -> dict[str, float] | None:
    if len(complete) < MIN_COMPLETE_FOR_IMPORTANCE:
        report.notes.append(
            f"importances.png: parameter importances need at least "
            f"{MIN_COMPLETE_FOR_IMPORTANCE} complete trials; the study has {len(complete)}"
        )
        return None
    try:
        with quiet_plotting():
            values = optuna.importance.get_param_importances(study, evaluator=evaluator())
    except (ValueError, RuntimeError) as error:  # e.g. no parameter varies among the trials
        report.notes.append(f"importances.png: not computed ({error})")
        return None
    if not values:
        report.notes.append("importances.png: the complete trials share no searched parameter")
        return None
    return {name: float(value) for name, value in values.items()}


def _plotted_params(
    study: optuna.Study, importances: dict[str, float] | None, complete: Sequence[FrozenTrial]
) -> list[str]:
    if importances:
        return list(importances)[:MAX_PLOTTED_PARAMS]
    names: list[str] = []
    for trial in complete:
        names += [name for name in trial.params if name not in names]
    return names[:MAX_PLOTTED_PARAMS]


# ---------------------------------------------------------------------------------- the summary


def _summary(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    settings: StudySettings | None,
    best: FrozenTrial | None,
    importances: dict[str, float] | None,
    store: str,
    report: Report,
) -> dict[str, Any]:
    counts = count_trials(trials)
    order = (
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    )
    by_state = {state.name.lower(): 0 for state in order}
    for trial in trials:
        by_state[trial.state.name.lower()] += 1
    return {
        "study": study.study_name,
        "store": store,
        "written_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings.to_attrs() if settings else None,
        "budget": study.user_attrs.get(ATTR_BUDGET),
        "n_trials": len(trials),
        "by_state": by_state,
        "counts": counts.to_dict(),
        "best": None
        if best is None
        else {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "metrics": best.user_attrs.get(ATTR_METRICS),
            # hpo run keeps the final checkpoints of the best few complete trials only
            "checkpoint": best.user_attrs.get(ATTR_CHECKPOINT),
            "checkpoint_on_disk": _on_disk(best.user_attrs.get(ATTR_CHECKPOINT)),
        },
        "importances": importances,
        "failures": failures(trials),
        "files": [p.name for p in report.files],
        "notes": list(report.notes),
    }


def _on_disk(path: Any) -> bool | None:
    return Path(path).is_file() if isinstance(path, str) else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # full precision: the number in the store, not a rounding of it
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value) + "`"
    return str(value).replace("|", "\\|")


def _summary_markdown(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    counts = summary["counts"]
    lines = [f"# Study `{summary['study']}`", ""]
    lines.append(f"- store: {summary['store']}")
    if settings:
        lines.append(
            f"- preset `{settings['preset']}`, objective `{settings['objective']}` "
            f"({settings['direction']}), {settings['epochs']} epochs per trial"
        )
    of_budget = f" of a budget of {summary['budget']}" if summary["budget"] else ""
    lines.append(
        f"- {counts['finished']} finished trials{of_budget}: {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['failed']} failed; {counts['running']} running, "
        f"{counts['waiting']} waiting, {counts['requeued']} failed and re-queued"
    )
    lines.append(f"- written {summary['written_utc']} UTC")
    lines += ["", "## Best trial", ""]
    best = summary["best"]
    if best is None:
        lines.append("No complete trial yet.")
    else:
        objective = settings["objective"] if settings else "objective"
        lines += ["| | |", "|---|---|", f"| trial | {best['number']} |"]
        lines.append(f"| best value ({objective}) | {_cell(best['value'])} |")
        if best["checkpoint"]:
            where = "" if best["checkpoint_on_disk"] else " (not on this machine)"
            lines.append(f"| checkpoint | `{best['checkpoint']}`{where} |")
        lines.append(
            f"| retrain | `hpo train --from-best --study {summary['study']} --epochs N` |"
        )
        lines += ["", "Params:", "", "| param | value |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in best["params"].items()]
        metrics = best["metrics"] or {}
        epoch = metrics.get("epoch")
        lines += [
            "",
            f"Metrics at the last epoch ({epoch}):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_cell(value)} |" for name, value in metrics.items()]
    lines += ["", "## Trials by state", "", "| state | trials |", "|---|---|"]
    lines += [f"| {state} | {n} |" for state, n in summary["by_state"].items()]
    lines += ["", "## Parameter importances", ""]
    if summary["importances"] is None:
        lines.append(
            "Not computed: "
            + "; ".join(
                note.split(": ", 1)[1]
                for note in summary["notes"]
                if note.startswith("importances")
            )
            + "."
        )
    else:
        n_complete = counts["complete"]
        lines += [
            (
                f"PED-ANOVA over {n_complete} complete trials (as in the dashboard; with few "
                "trials, a rough ranking)."
            ),
            "",
            "| param | importance |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.3f} |" for name, value in summary["importances"].items()]
    if summary["failures"]:
        lines += ["", "## Failed trials", "", "| trial | reason |", "|---|---|"]
        lines += [f"| {f['number']} | {_cell(f['reason'])} |" for f in summary["failures"]]
    lines += ["", "## Figures", ""]
    for name in summary["files"]:
        if name.endswith(".png"):
            lines.append(f"![{name[:-4].replace('_', ' ')}]({name})")
            lines.append("")
    lines.append("Interactive versions: [plots.html](plots.html).")
    if summary["notes"]:
        lines += ["", "Left out:", ""]
        lines += [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"
