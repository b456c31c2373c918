"""The report's figures: which ones a study gets, decided once, drawn as PNG and as plotly HTML.

`plan_figures` lists the figures (and the notes for those left out); each `Figure` can draw
itself with matplotlib (`save_png`) and with plotly (`plots_html`), so the two renderings
always show the same set.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

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


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its PNG file, its title in plots.html, its PNG size (inches),
    and how to draw it with matplotlib (returns axes) and with plotly (returns a figure)."""

    name: str
    title: str
    size: tuple[float, float]
    matplotlib: Callable[[], Any]
    plotly: Callable[[], Any]


def evaluator() -> optuna.importance.PedAnovaImportanceEvaluator:
    """Optuna 5's default and the dashboard's: deterministic, and needs no scikit-learn (fANOVA
    would)."""
    return optuna.importance.PedAnovaImportanceEvaluator()


def plan_figures(study: optuna.Study, trials: Sequence[FrozenTrial], *, objective: str,
                 best: FrozenTrial | None, importances: dict[str, float] | None,
                 plotted: list[str]) -> tuple[list[Figure], list[str]]:
    """The figures `study` gets, and a note for each one left out (why)."""
    from optuna import visualization as ov
    from optuna.visualization import matplotlib as om

    complete = any(t.state == TrialState.COMPLETE for t in trials)
    figures, notes = [], []
    if complete:
        figures.append(Figure("history.png", "Optimisation history", (9, 5),
                              lambda: om.plot_optimization_history(study),
                              lambda: ov.plot_optimization_history(study)))
    else:
        notes.append("history.png: no complete trial yet")
    figures.append(Figure("intermediate_values.png", "Intermediate values", (9, 5),
                          lambda: _intermediate_values_mpl(trials, objective, best),
                          lambda: _intermediate_values_plotly(trials, objective, best)))
    if importances is not None:
        figures.append(Figure(
            "importances.png", "Parameter importances", (8, 1.5 + 0.4 * len(importances)),
            lambda: om.plot_param_importances(study, evaluator=evaluator()),
            lambda: ov.plot_param_importances(study, evaluator=evaluator())))
    if complete and plotted:
        figures.append(Figure(
            "parallel_coordinate.png", "Parallel coordinates", (3 + 1.6 * len(plotted), 6),
            lambda: om.plot_parallel_coordinate(study, params=plotted),
            lambda: ov.plot_parallel_coordinate(study, params=plotted)))
        figures.append(Figure(
            "slice.png", "Slices", (3.2 * len(plotted), 3.6),
            lambda: om.plot_slice(study, params=plotted),
            lambda: ov.plot_slice(study, params=plotted)))
    elif complete:
        notes.append("parallel_coordinate.png, slice.png: the study searches no parameter")
    else:
        notes.append("parallel_coordinate.png, slice.png: no complete trial yet")
    return figures, notes  # fmt: skip


def save_png(figure: Figure, out_dir: Path) -> Path:
    """Draw `figure` with matplotlib (Agg: files only, never a window) into out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with quiet_plotting():
            drawn = _figure_of(figure.matplotlib())
            drawn.set_size_inches(*figure.size)
            drawn.savefig(out_dir / figure.name, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close("all")
    return out_dir / figure.name


def plots_html(figures: Sequence[Figure], study_name: str, out_dir: Path) -> list[Path]:
    """plots.html: the figures as plotly charts (zoom, hover for trial numbers and params),
    with plotly.min.js beside it so that the page works offline."""
    import plotly.offline

    parts = []
    for figure in figures:
        with quiet_plotting():
            drawn = figure.plotly()
        parts.append(f"<h2>{figure.title}</h2>\n"
                     + drawn.to_html(full_html=False, include_plotlyjs=False))  # fmt: skip
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{study_name}: plots</title>\n"
        "<script src='plotly.min.js'></script></head>\n"
        f"<body style='font-family: sans-serif'><h1>Study {study_name}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    (out_dir / "plotly.min.js").write_text(plotly.offline.get_plotlyjs())
    (out_dir / "plots.html").write_text(page)
    return [out_dir / "plots.html", out_dir / "plotly.min.js"]


def _figure_of(axes: Any) -> Any:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


class quiet_plotting(warnings.catch_warnings):
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


def _intermediate_values_mpl(
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


def _intermediate_values_plotly(
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


