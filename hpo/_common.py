"""Pieces shared by the commands: config resolution and one-line error reporting."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from pipeline import ExperimentConfig, apply_overrides, preset, replace


def build_config(preset_name: str, assignments: list[str] | None = None, *,
                 epochs: int | None = None, seed: int | None = None) -> ExperimentConfig:
    """Preset, then --set overrides, then the --epochs / --seed shortcuts. ConfigError if bad."""
    config = apply_overrides(preset(preset_name), list(assignments or []))
    shortcuts = {name: value for name, value in (("epochs", epochs), ("seed", seed))
                 if value is not None}
    return replace(config, **shortcuts) if shortcuts else config


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit with `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    sys.stderr.flush()
    raise typer.Exit(code=code)
