"""The errors of `hpo`: one root, `HpoError`, and one subclass per thing that can be wrong.

Each message is one line meant for the user; the CLI prints it after "error: ". Errors of the
packages below keep their own roots (`storage.StorageError`, `pipeline.PipelineError`).
"""

from __future__ import annotations


class HpoError(Exception):
    """Root of the errors `hpo` raises for a request it cannot carry out."""


class StudyError(HpoError):
    """The study cannot be used as asked (missing, or created with other settings)."""


class SpaceError(HpoError, ValueError):
    """The search space file is unreadable or names an unknown field or an impossible range."""


class LaunchError(HpoError, ValueError):
    """The worker layout asked for cannot be made on this machine (e.g. a GPU that is not there)."""


class ReportError(HpoError):
    """The report cannot be written."""


class NothingToReport(ReportError):
    """The study has no finished trial."""


class OutputNotWritable(HpoError):
    """The output directory of a command (train, evaluate, report) cannot be created or
    written."""


class DashboardError(HpoError):
    """The dashboard cannot be served as asked (e.g. the port is taken)."""


class NonFiniteObjective(HpoError, ArithmeticError):
    """A trial's objective came out NaN or infinite."""


class RunStopped(HpoError):
    """`hpo run` stopped before the study was done: its store was lost for good."""
