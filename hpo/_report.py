"""`hpo report`: a study's figures and a one-page summary, written without a browser.

PNG figures come from matplotlib (Agg, no display); the same figures as interactive plotly charts
go into one `plots.html` that loads `plotly.min.js` from beside it, so the report works offline.
`summary.md` holds the counts by state, the best trial's params and final metrics, the parameter
importances and the failure reasons; `summary.json` holds the same for scripts.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo._errors import NothingToReport, OutputNotWritable
from hpo._study import (
    ATTR_BUDGET,
    ATTR_CHECKPOINT,
    ATTR_FAIL_REASON,
    StudySettings,
    best_trial,
    count_trials,
    study_settings,
)

# PED-ANOVA compares complete trials: it needs two (the dashboard's rule too), and with a
# handful the ranking is rough (the summary says so).
MIN_COMPLETE_FOR_IMPORTANCE = 2
MAX_PLOTTED_PARAMS = 6  # parallel coordinates and slices: the most important ones
DPI = 100

STATE_STYLE: dict[TrialState, dict[str, Any]] = {
    TrialState.COMPLETE: {
        "color": "#1f77b4",
        "linestyle": "-",
        "marker": "o",
        "label": "complete",
    },
    TrialState.PRUNED: {"color": "#ff7f0e", "linestyle": "--", "marker": "x", "label": "pruned"},
    TrialState.FAIL: {"color": "#d62728", "linestyle": ":", "marker": "s", "label": "failed"},
    TrialState.RUNNING: {"color": "#7f7f7f", "linestyle": "-.", "marker": ".", "label": "running"},
}





@dataclass
class Report:
    """What `write_report` wrote, and the summary it wrote it from."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out, and why
    summary: dict[str, Any] = field(default_factory=dict)


def prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir` and check that a file can be written there; ReportError if not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".hpo-report-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputNotWritable(f"cannot write to output directory {out_dir}: {reason}") from None


def write_report(study: optuna.Study, out_dir: Path, *, store: str) -> Report:
    """Write the figures, `plots.html`, `summary.md` and `summary.json` of `study` to `out_dir`.

    `store` names the store in the summary (no password). ReportError if the study has no
    finished trial (NothingToReport) or `out_dir` cannot be written (OutputNotWritable).
    """
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    if not finished:
        raise NothingToReport(
            f"study {study.study_name!r} has no finished trial yet; nothing to report"
        )
    prepare_out_dir(out_dir)
    settings = study_settings(study)
    direction = settings.direction if settings else study.direction.name.lower()
    best = best_trial(trials, direction)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    report = Report(out_dir)

    importances = _importances(study, complete, report)
    plotted = _plotted_params(study, importances, complete)
    objective = settings.objective if settings else "objective"

    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_mpl

    def save(name: str, draw: Callable[[], Any], size: tuple[float, float]) -> None:
        try:
            with _quiet_plotting():
                axes = draw()
                figure = _figure_of(axes)
                figure.set_size_inches(*size)
                figure.savefig(out_dir / name, dpi=DPI, bbox_inches="tight")
        finally:
            plt.close("all")
        report.files.append(out_dir / name)

    if complete:
        save("history.png", lambda: optuna_mpl.plot_optimization_history(study), (9, 5))
    else:
        report.notes.append("history.png: no complete trial yet")
    save(
        "intermediate_values.png",
        lambda: _plot_intermediate_values_mpl(trials, objective, best),
        (9, 5),
    )
    if importances is not None:
        save(
            "importances.png",
            lambda: optuna_mpl.plot_param_importances(study, evaluator=_evaluator()),
            (8, 1.5 + 0.4 * len(importances)),
        )
    if complete and plotted:
        save(
            "parallel_coordinate.png",
            lambda: optuna_mpl.plot_parallel_coordinate(study, params=plotted),
            (3 + 1.6 * len(plotted), 6),
        )
        save(
            "slice.png",
            lambda: optuna_mpl.plot_slice(study, params=plotted),
            (3.2 * len(plotted), 3.6),
        )
    elif complete:
        report.notes.append("parallel_coordinate.png, slice.png: the study searches no parameter")
    else:
        report.notes.append("parallel_coordinate.png, slice.png: no complete trial yet")

    _write_plots_html(study, trials, objective, best, importances, plotted, report)
    report.summary = _summary(study, trials, settings, best, importances, store, report)
    (out_dir / "summary.json").write_text(json.dumps(report.summary, indent=2))
    (out_dir / "summary.md").write_text(_summary_markdown(report.summary))
    report.files += [out_dir / "summary.md", out_dir / "summary.json"]
    return report


# --------------------------------------------------------------------------------- the numbers


def _evaluator() -> optuna.importance.PedAnovaImportanceEvaluator:
    # Optuna 5's default and the dashboard's: deterministic, and needs no scikit-learn (fANOVA
    # would).
    return optuna.importance.PedAnovaImportanceEvaluator()


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
        with _quiet_plotting():
            values = optuna.importance.get_param_importances(study, evaluator=_evaluator())
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


# ------------------------------------------------------------------------------------ the plots


def _figure_of(axes: Any) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


class _quiet_plotting(warnings.catch_warnings):
    """Optuna flags its matplotlib plots as experimental, and matplotlib warns when a plotted
    parameter has one value among the trials (it widens the axis itself). Neither is news to
    whoever reads the report."""

    def __enter__(self) -> Any:
        result = super().__enter__()
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Attempting to set identical")
        return result


def _with_values(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.intermediate_values]


def _plot_intermediate_values_mpl(
    trials: Sequence[FrozenTrial], objective: str, best: FrozenTrial | None
) -> Any:
    """One line per trial over the epochs, styled by state, the best trial drawn on top."""
    import matplotlib.pyplot as plt

    _, axes = plt.subplots()
    labelled: set[TrialState] = set()
    for trial in _with_values(trials):
        style = dict(STATE_STYLE.get(trial.state, STATE_STYLE[TrialState.RUNNING]))
        label = style.pop("label")
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[step] for step in steps]
        count = sum(1 for t in _with_values(trials) if t.state == trial.state)
        axes.plot(
            steps,
            values,
            alpha=0.8,
            linewidth=1.2,
            markersize=4,
            label=f"{label} ({count})" if trial.state not in labelled else None,
            **style,
        )
        labelled.add(trial.state)
    if best is not None and best.intermediate_values:
        steps = sorted(best.intermediate_values)
        axes.plot(
            steps,
            [best.intermediate_values[s] for s in steps],
            color="#2ca02c",
            linewidth=2.5,
            marker="o",
            label=f"best (trial {best.number})",
        )
    if not labelled:
        axes.text(0.5, 0.5, "no trial reported a value yet", ha="center", transform=axes.transAxes)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(objective)
    axes.set_title("Intermediate values per epoch (pruned trials stop early)")
    axes.grid(alpha=0.3)
    if labelled:
        axes.legend()
    return axes


def _plot_intermediate_values_plotly(
    trials: Sequence[FrozenTrial], objective: str, best: FrozenTrial | None
) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for trial in _with_values(trials):
        style = STATE_STYLE.get(trial.state, STATE_STYLE[TrialState.RUNNING])
        steps = sorted(trial.intermediate_values)
        dash = {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}[style["linestyle"]]
        figure.add_trace(
            go.Scatter(
                x=steps,
                y=[trial.intermediate_values[s] for s in steps],
                mode="lines+markers",
                name=f"trial {trial.number} ({style['label']})",
                legendgroup=style["label"],
                line={"color": style["color"], "dash": dash, "width": 3 if trial is best else 1},
            )
        )
    figure.update_layout(
        title="Intermediate values per epoch (pruned trials stop early)",
        xaxis_title="epoch",
        yaxis_title=objective,
    )
    return figure


def _write_plots_html(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    objective: str,
    best: FrozenTrial | None,
    importances: dict[str, float] | None,
    plotted: list[str],
    report: Report,
) -> None:
    """plots.html: the figures as plotly charts (zoom, hover for trial numbers and params)."""
    import plotly.offline
    from optuna import visualization as optuna_plotly

    complete = any(t.state == TrialState.COMPLETE for t in trials)
    figures: list[tuple[str, Callable[[], Any]]] = []
    if complete:
        figures.append(
            ("Optimisation history", lambda: optuna_plotly.plot_optimization_history(study))
        )
    figures.append(
        ("Intermediate values", lambda: _plot_intermediate_values_plotly(trials, objective, best))
    )
    if importances is not None:
        figures.append(
            (
                "Parameter importances",
                lambda: optuna_plotly.plot_param_importances(study, evaluator=_evaluator()),
            )
        )
    if complete and plotted:
        figures.append(
            (
                "Parallel coordinates",
                lambda: optuna_plotly.plot_parallel_coordinate(study, params=plotted),
            )
        )
        figures.append(("Slices", lambda: optuna_plotly.plot_slice(study, params=plotted)))
    parts = []
    for title, make in figures:
        with _quiet_plotting():
            figure = make()
        parts.append(
            f"<h2>{title}</h2>\n" + figure.to_html(full_html=False, include_plotlyjs=False)
        )
    name = study.study_name
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{name}: plots</title>\n"
        "<script src='plotly.min.js'></script></head>\n"
        f"<body style='font-family: sans-serif'><h1>Study {name}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    (report.out_dir / "plotly.min.js").write_text(plotly.offline.get_plotlyjs())
    (report.out_dir / "plots.html").write_text(page)
    report.files += [report.out_dir / "plots.html", report.out_dir / "plotly.min.js"]


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
            "metrics": best.user_attrs.get("metrics"),
            # hpo run keeps the final checkpoints of the best few complete trials only
            "checkpoint": best.user_attrs.get(ATTR_CHECKPOINT),
            "checkpoint_on_disk": _on_disk(best.user_attrs.get(ATTR_CHECKPOINT)),
        },
        "importances": importances,
        "failures": [
            {"number": t.number, "reason": t.user_attrs.get(ATTR_FAIL_REASON, "no reason stored")}
            for t in trials
            if t.state == TrialState.FAIL
        ],
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
