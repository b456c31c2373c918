"""Where trials checkpoint, and deleting the checkpoints no longer needed.

Retries resume: a re-queued trial trains in the checkpoint directory of the first trial of its
chain (`checkpoint_dir_for`), so it continues from the last epoch its predecessor saved.
`prune_checkpoints` keeps the directories still needed (unfinished chains) and the final
checkpoints of the best `keep` COMPLETE trials, and deletes the rest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo._attrs import chain_root, requeued_numbers
from hpo._studies import direction_of, store_of
from storage import store_lock, study_id


def checkpoint_dir_for(root_dir: Path, study_name: str, root: int) -> Path:
    """Where the trials of the chain starting at trial number `root` keep their checkpoints."""
    return root_dir / study_name / f"trial-{root}"


def prune_checkpoints_or_warn(study: optuna.Study, root_dir: Path | str | None, *, keep: int,
                              retry: Callable[..., Any], warn: Callable[[str], None]) -> None:
    """`prune_checkpoints` through the store's reconnecting `retry`; a failure is passed to
    `warn` as one line, never raised: disk housekeeping must not stop the study."""
    if root_dir is None:
        return
    try:
        retry(lambda: prune_checkpoints(study, Path(root_dir), keep=keep), "pruning checkpoints")
    except Exception as e:  # noqa: BLE001
        warn(f"could not prune checkpoints: {e}")


def prune_checkpoints(study: optuna.Study, root_dir: Path, *, keep: int) -> list[Path]:
    """Delete the checkpoint directories no longer needed; the ones deleted.

    Kept: chains with a trial not yet finished (or a FAIL whose retry is queued), and the final
    checkpoints of the `keep` best COMPLETE trials. Safe to run from several processes at once.
    """
    base = root_dir / study.study_name
    if not base.is_dir():
        return []
    # The directories first: each one existed before the trials are read, so its claim is among
    # them (a directory made after the read belongs to a trial the read has not seen).
    paths = list(base.glob("trial-*"))
    # Under the store lock: a trial is failed and its retry queued in two commits under that
    # lock, and a chain read in between (its FAIL without the retry) would lose its checkpoint.
    with store_lock(store_of(study), study_id(study)):
        trials = study.get_trials(deepcopy=False)
    requeued = requeued_numbers(trials)
    needed: set[int] = set()
    for trial in trials:
        if not trial.state.is_finished() or trial.number in requeued:
            needed.add(chain_root(trial))
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    ranked = sorted(complete, key=lambda t: t.value, reverse=direction_of(study) == "maximize")
    needed.update(chain_root(t) for t in ranked[: max(keep, 0)])
    removed = []
    for path in paths:
        try:
            root = int(path.name.removeprefix("trial-"))
        except ValueError:
            continue
        if root not in needed:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
