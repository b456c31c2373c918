"""The typer application that every command module registers on; usage errors are one line."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup


class _OneLineErrors(TyperGroup):
    """Click's own usage errors (a value of the wrong type, one out of range or not among the
    choices, an unknown option) as one line "error: ..." and exit code 2, like every other
    error of `hpo`, instead of click's usage block."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # click's usage errors, as typer vendors them
            typer.echo(f"error: {_one_line(error)}", err=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(error: typer.TyperException) -> str:
    """The usage error's message, naming the value given where the parser's check did not."""
    message = " ".join(error.format_message().replace("Value error, ", "").split())
    errors = getattr(error.__cause__, "errors", None)  # pydantic's, from typer's checks
    if callable(errors) and "is not one of" not in message:
        given = (errors() or [{}])[0].get("input")
        if given is not None:
            message += f", but got {given}"
    return message


app = typer.Typer(
    name="hpo",
    cls=_OneLineErrors,
    help="Hyperparameter optimisation of the RIS covariance-learning pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show "[default: ...]" literally
)
