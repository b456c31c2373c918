"""`hpo`: the command line. Commands live in hpo/_cmd_*.py and register on one typer app."""

from __future__ import annotations

from hpo import _cmd_dashboard, _cmd_evaluate, _cmd_report, _cmd_study, _cmd_train  # noqa: F401  (importing registers the commands)
from hpo._app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
