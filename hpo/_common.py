"""What the commands share: options, exit codes, config resolution and one-line errors."""

from __future__ import annotations

import sys
from typing import Annotated, Any, NoReturn

import typer

from pipeline import ExperimentConfig, apply_overrides, preset, replace

EXIT_USAGE = 2  # bad input: nothing was done
EXIT_INCOMPLETE = 1  # the request was fine but could not be carried out (yet)
EXIT_INTERRUPTED = 130

StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Store URL, e.g. postgresql+psycopg2://user:pass@host:5432/db "
        "[default: $HPO_STORAGE, else sqlite:///hpo.db in the working directory].",
        show_default=False,
    ),
]
ExistingStudyOption = Annotated[
    str | None, typer.Option("--study", help="Study name [default: the store's only one].")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def build_config(preset_name: str, assignments: list[str] | None = None, *,
                 epochs: int | None = None, seed: int | None = None) -> ExperimentConfig:
    """Preset, then --set overrides, then the --epochs / --seed shortcuts. ConfigError if bad."""
    config = apply_overrides(preset(preset_name), list(assignments or []))
    shortcuts = {name: value for name, value in (("epochs", epochs), ("seed", seed))
                 if value is not None}
    return replace(config, **shortcuts) if shortcuts else config


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit with `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    sys.stderr.flush()
    raise typer.Exit(code=code)


def open_study(storage: str | None, study: str | None) -> tuple[Any, Any]:
    """(store location, study) for a read-only command, or one line and exit 2."""
    from hpo._errors import HpoError
    from hpo._studies import open_existing_study
    from storage import StorageError

    try:
        return open_existing_study(storage, study)
    except (StorageError, HpoError) as error:
        fail(str(error), EXIT_USAGE)
