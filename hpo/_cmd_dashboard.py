"""`hpo dashboard`: optuna-dashboard on the study store, served from this process."""

from __future__ import annotations

from typing import Annotated

import typer

from hpo._app import app
from hpo._common import EXIT_USAGE, StorageOption, fail


@app.command()
def dashboard(
    storage: StorageOption = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for every interface.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")
    ] = 8080,
    study: Annotated[
        str | None,
        typer.Option("--study", help="Print the address of this study's page (it must exist)."),
    ] = None,
    allow_edit: Annotated[
        bool,
        typer.Option(
            "--allow-edit",
            help="Let the page change the store: delete studies, mark trials failed or complete, "
            "set trial attributes, write notes. Without it anyone who reaches the port can "
            "only look; a change is refused (HTTP 403) and the page says so.",
        ),
    ] = False,
) -> None:
    """Serve optuna-dashboard on the study store until Ctrl-C: live history, intermediate values
    per epoch, importances, and each trial's config, metrics and failure reason. Read-only
    unless --allow-edit."""
    import optuna

    from hpo._dashboard import bind, dashboard_app
    from hpo._errors import HpoError
    from hpo._studies import load_existing_study
    from storage import StorageError, open_storage, resolve_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        location = resolve_url(storage)
        store = open_storage(location, create=False, heartbeat=False)
        page = "/dashboard"
        if study is not None:
            name = load_existing_study(store, study).study_name
            page = f"/dashboard/studies/{store.get_study_id_from_name(name)}"
        server = bind(dashboard_app(store, allow_edit=allow_edit), host, port)
    except (StorageError, HpoError) as error:
        fail(str(error), EXIT_USAGE)
    shown_host = f"[{host}]" if ":" in host else host
    typer.echo(f"dashboard of {location.describe()}: http://{shown_host}:{port}{page}")
    if not allow_edit:
        typer.echo(
            "read-only: the page cannot change the store (--allow-edit to let it)", err=True
        )
    typer.echo("Ctrl-C to stop", err=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        server.server_close()
