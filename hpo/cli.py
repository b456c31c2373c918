"""`hpo`: the command line. Commands live in hpo/_cmd_*.py and register on one typer app."""

from __future__ import annotations

from hpo import (  # noqa: F401  (importing registers the commands)
    _cmd_dashboard,
    _cmd_evaluate,
    _cmd_report,
    _cmd_run,
    _cmd_status,
    _cmd_train,
)
from hpo._app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
