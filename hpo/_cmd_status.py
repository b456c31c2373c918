"""`hpo status` and `hpo best`: read a study back from the store."""

from __future__ import annotations

import json
import sys

import typer

from hpo._app import app
from hpo._common import (
    EXIT_INCOMPLETE,
    ExistingStudyOption,
    JsonOption,
    StorageOption,
    fail,
    open_study,
)


@app.command()
def status(
    storage: StorageOption = None,
    study: ExistingStudyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the study's trial counts against its budget, its best trial, what runs on each
    host (trial, worker pid, epoch), and the retried trials with the epoch each resumed from."""
    from hpo._summary import status_lines, status_payload

    location, the_study = open_study(storage, study)
    payload = status_payload(the_study, location.redacted_url)
    if as_json:
        typer.echo(json.dumps(payload))
        return
    for line in status_lines(payload, location.describe()):
        typer.echo(line)


@app.command()
def best(
    storage: StorageOption = None,
    study: ExistingStudyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the best trial: value, number, params, final metrics and full config."""
    from hpo._summary import best_payload, fmt, format_params

    _, the_study = open_study(storage, study)
    payload = best_payload(the_study)
    if payload is None:
        fail(f"study {the_study.study_name!r} has no complete trial yet", EXIT_INCOMPLETE)
    if as_json:
        typer.echo(json.dumps(payload))
        return
    objective = payload["objective"] or "value"
    typer.echo(
        f"best trial {payload['number']} of study {the_study.study_name!r}: "
        f"{objective} {payload['value']:.6g}"
    )
    typer.echo(f"params: {format_params(payload['params'])}")
    metrics = payload["metrics"] or {}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if shown:
        typer.echo("metrics: " + ", ".join(f"{k} {fmt(v)}" for k, v in shown.items()))
    if payload["config"]:
        typer.echo("config: " + json.dumps(payload["config"], sort_keys=True))
    sys.stdout.flush()
