"""`hpo report`: figures and a one-page summary of a study, for reading without a browser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hpo._app import app
from hpo._common import (
    EXIT_INCOMPLETE,
    EXIT_USAGE,
    ExistingStudyOption,
    JsonOption,
    StorageOption,
    fail,
    open_study,
)


@app.command()
def report(
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory for the PNG figures, plots.html and summary.md."),
    ],
    storage: StorageOption = None,
    study: ExistingStudyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the optimisation history, intermediate values, importances, parallel coordinates
    and slices as PNG (and plots.html), and summary.md with the best trial and the counts."""
    import json

    import optuna

    from hpo._errors import OutputNotWritable, ReportError
    from hpo._report import write_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    location, the_study = open_study(storage, study)
    if not the_study.get_trials(deepcopy=False):
        fail(
            f"study {the_study.study_name!r} has no trials yet; nothing to report", EXIT_INCOMPLETE
        )
    try:
        result = write_report(the_study, out, store=location.describe())  # checks --out first
    except OutputNotWritable as error:
        fail(str(error), EXIT_USAGE)
    except ReportError as error:
        fail(str(error), EXIT_INCOMPLETE)
    if as_json:
        typer.echo(json.dumps({**result.summary, "out": str(out)}))
        return
    summary = result.summary
    best = summary["best"]
    typer.echo(f"report of study {the_study.study_name!r} in {out}/:")
    for path in result.files:
        typer.echo(f"  {path.name}")
    if best:
        typer.echo(f"best: trial {best['number']}, value {best['value']:.6g}")
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
