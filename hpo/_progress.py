"""The live progress of `hpo run`: one line rewritten in a terminal, a line per change in a log."""

from __future__ import annotations

import time
from typing import IO

import optuna

from hpo._budget import StudyCounts, budget_state
from hpo._studies import best_trial


class Progress:
    """Writes `hpo run`'s progress and messages to `out` (a terminal or a log)."""

    def __init__(self, out: IO[str], *, quiet: bool, direction: str) -> None:
        self.out = out
        self.quiet = quiet
        self.direction = direction
        self._last_line = ""
        self._last_key: list[str] = []
        self._last_print = 0.0

    def say(self, text: str) -> None:
        """One message on its own line (after the progress line, in a terminal)."""
        if self.out.isatty() and self._last_line:
            self.out.write("\n")
            self._last_line = ""
        self.out.write(text + "\n")
        self.out.flush()

    def show(self, study: optuna.Study, started: float, finished_before: int, *,
             force: bool = False) -> None:
        """The progress line, at most once a second (terminal) or every 2 s (log)."""
        if self.quiet:
            return
        now = time.monotonic()
        tty = self.out.isatty()
        if not force and now - self._last_print < (1.0 if tty else 2.0):
            return
        self._last_print = now
        try:
            trials = study.get_trials(deepcopy=False)
            state = budget_state(study, trials)
        except Exception:  # noqa: BLE001  (the store is away: the next poll shows progress)
            return
        line = format_progress(
            state.counts,
            state.budget,
            best=best_trial(trials, self.direction),
            elapsed_s=now - started,
            finished_before=finished_before,
        )
        if tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
            self._last_line = line
            return
        # In a log: a line when the counts or the best change, not one per poll.
        key = line.split(" | trials/h")[0].split(" | ")[:2]
        if force or key != self._last_key:
            self.out.write(line + "\n")
            self.out.flush()
            self._last_key = key

    def end(self) -> None:
        if not self.quiet and self.out.isatty():
            self.out.write("\n")


def format_progress(
    counts: StudyCounts,
    budget: int,
    *,
    best: optuna.trial.FrozenTrial | None,
    elapsed_s: float,
    finished_before: int,
) -> str:
    """finished / pruned / failed / running out of the budget, best, trials per hour, ETA."""
    finished = (
        f"{counts.finished}/{budget} finished ({counts.complete} complete, {counts.pruned} "
        f"pruned, {counts.failed} failed), {counts.running} running"
    )
    parts = [finished]
    parts.append(f"best {best.value:.4g} (trial {best.number})" if best else "best -")
    done_now = counts.finished - finished_before
    if done_now > 0 and elapsed_s > 0:
        per_hour = done_now / elapsed_s * 3600
        remaining = max(budget - counts.finished, 0)
        parts.append(f"{per_hour:.0f} trials/h")
        parts.append(f"ETA {_duration(remaining / per_hour * 3600)}")
    else:
        parts.append("-- trials/h")
    parts.append(f"elapsed {_duration(elapsed_s)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
