"""The pipeline's error hierarchy: one root, so callers can catch everything the pipeline raises."""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A config field, preset or override is invalid. The message names the field."""


class NumericalError(PipelineError, FloatingPointError):
    """A loss term or gradient became non-finite. The message names the term, epoch and batch."""

    def __init__(self, message: str, *, term: str, epoch: int, batch: int) -> None:
        super().__init__(message)
        self.term = term
        self.epoch = epoch
        self.batch = batch


class CheckpointError(PipelineError):
    """A checkpoint is missing, unreadable or belongs to another config."""
