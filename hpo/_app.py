"""The typer application that every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hpo",
    help="Hyperparameter optimisation of the RIS covariance-learning pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show "[default: ...]" literally
)
