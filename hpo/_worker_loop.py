"""A worker's loop: claim a trial within the budget, train it, record its outcome, until done.

Everything about the study comes from the store: its settings (objective, epochs), its
specification (base config, search space, pruner, sampler) and, at each claim, its budget. The
process (`hpo._worker`) adds only its own part: device, threads, sampler seed, checkpoint place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from hpo._attrs import (
    ATTR_CUDA_VISIBLE,
    ATTR_DEVICE,
    ATTR_GPU_NAME,
    ATTR_RESUMED_FROM,
    ATTR_RETRY_COUNT,
    ATTR_THREADS,
    chain_root,
    end_record,
    start_record,
)
from hpo._budget import claim_trial, deadline_passed
from hpo._checkpoints import checkpoint_dir_for, prune_checkpoints_or_warn
from hpo._objective import run_trial
from hpo._requeue import RequeueStaleTrial, fail_trial
from hpo._search_space import SearchSpace, suggest_config
from hpo._strategies import ETA_PRUNERS, make_pruner, make_sampler, pruning_steps
from hpo._studies import read_plan
from hpo._worker import (
    EXIT_DONE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_RECYCLE,
    MAX_CONSECUTIVE_ERRORS,
    Heartbeat,
    Signals,
    WorkerInterrupted,
    WorkerSpec,
)
from pipeline import config_from_dict, config_to_dict, resolve_device
from storage import (
    Reconnect,
    StorageError,
    batched_params,
    open_storage,
    resolve_url,
    set_user_attrs,
    trial_id,
)

_logger = logging.getLogger("hpo.worker")


class WorkerLoop:
    """One worker's loop. `phase(name)`, if given, is entered around each of its store phases
    (claim, suggest, start attributes, epoch reports, pruning questions, end attributes and
    tell, checkpoint pruning): `python -m bench store_traffic` times them with it."""

    def __init__(self, spec: WorkerSpec, signals: Signals | None = None, *,
                 phase: Callable[[str], AbstractContextManager[Any]] | None = None) -> None:
        self.phase = phase or (lambda name: contextlib.nullcontext())
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.signals = signals or Signals()
        self.location = resolve_url(None)  # $HPO_STORAGE, set by the launcher
        self.retry = Reconnect(self.location, deadline_s=spec.reconnect_s)
        self.storage = open_storage(
            self.location,
            stale_trial_callback=RequeueStaleTrial(),
            heartbeat_interval_s=spec.heartbeat_interval_s,
            grace_period_s=spec.grace_period_s,
            patience_s=spec.reconnect_s,  # started while the server restarts: wait for it
        )
        self.heartbeat_s = spec.heartbeat_interval_s
        settings, plan = self.retry(lambda: read_plan(self.storage, spec.study),
                                    "reading the study's specification")  # fmt: skip
        self.objective = settings.objective
        self.plan = plan
        self.study = self.retry(
            lambda: optuna.load_study(
                study_name=spec.study,
                storage=self.storage,
                sampler=make_sampler(plan.sampler, spec.sampler_seed),
                pruner=make_pruner(plan.pruner, settings.epochs, plan.reduction_factor),
            ),
            "loading the study",
        )
        # Read the study's trials once, outside the store lock: Optuna keeps the finished ones,
        # so each claim's read under the lock fetches only what changed since. In a study of
        # 10,000 trials that first read took 17 CPU-s; made under the lock by 16 new workers at
        # once, it kept claims waiting past the lock's timeout (`python -m bench load`).
        self.retry(lambda: self.study.get_trials(deepcopy=False), "reading the study")
        # The epochs after which the pruner can stop a trial: it is asked there only.
        self.prune_steps = pruning_steps(plan.pruner, settings.epochs, plan.reduction_factor)
        self.base = config_from_dict(plan.config)
        self.space = SearchSpace.from_dict(plan.space)
        self.device = resolve_device(spec.device)
        self.device_info: dict[str, Any] = {ATTR_DEVICE: str(self.device),
                                            ATTR_THREADS: spec.threads}  # fmt: skip
        if self.device.type == "cuda":
            self.device_info[ATTR_CUDA_VISIBLE] = os.environ.get("CUDA_VISIBLE_DEVICES")
            self.device_info[ATTR_GPU_NAME] = torch.cuda.get_device_name(self.device)

    def loop(self) -> int:
        n_trials = 0
        n_errors = 0
        deadline = self.spec.deadline
        while True:
            if self.signals.received is not None:
                return EXIT_INTERRUPTED
            if n_trials >= self.spec.max_trials:
                _logger.info("recycling after %d trials", n_trials)
                return EXIT_RECYCLE
            with self.phase("claim"):
                trial = self.retry(lambda: claim_trial(self.study, deadline), "claiming a trial")
            if trial is None:
                if deadline_passed(deadline):
                    _logger.info("time limit of hpo run (%s) reached; exiting",
                                 datetime.fromtimestamp(deadline, UTC).isoformat())
                else:
                    _logger.info("budget of the study used up; exiting")
                return EXIT_DONE
            n_trials += 1
            unexpected = self._run(trial)
            n_errors = n_errors + 1 if unexpected else 0
            if n_errors >= MAX_CONSECUTIVE_ERRORS:
                _logger.error("%d unexpected trial errors in a row; giving up", n_errors)
                return EXIT_ERROR

    def _checkpoint_dir(self, trial: Any) -> Path | None:
        if self.spec.checkpoint_dir is None:
            return None
        return checkpoint_dir_for(
            Path(self.spec.checkpoint_dir), self.spec.study, chain_root(trial)
        )

    def _set_attrs(self, trial: Any, attrs: dict[str, Any], what: str) -> None:
        self.retry(lambda: set_user_attrs(trial, attrs), f"{what} of trial {trial.number}")

    def _start(self, trial: Any, started: float, checkpoint_dir: Path | None) -> Any:
        """Suggest the trial's config (one transaction) and record its start; the config."""

        def suggest() -> Any:
            with self.phase("suggest"), batched_params(trial):  # one transaction for them all
                return suggest_config(trial, self.space, self.base)

        config = self.retry(suggest, "suggesting parameters")
        pruner = self.plan.pruner
        record = start_record(
            config=config_to_dict(config), seed=config.seed, worker_index=self.spec.index,
            started_unix=started, pruner=pruner,
            reduction_factor=self.plan.reduction_factor if pruner in ETA_PRUNERS else None,
            device_info=self.device_info,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            first_try=ATTR_RETRY_COUNT not in trial.user_attrs,
        )  # fmt: skip
        with self.phase("start attributes"):
            self._set_attrs(trial, record, "recording the start")
        _logger.info("trial %d: %s", trial.number, trial.params)
        return config

    def _run(self, trial: Any) -> bool:
        """Run one claimed trial to its recorded end. True if it failed unexpectedly."""
        started = time.time()
        heartbeat = Heartbeat(self.storage, trial_id(trial), self.heartbeat_s)
        checkpoint_dir = self._checkpoint_dir(trial)
        try:
            config = self._start(trial, started, checkpoint_dir)
            with self.signals.armed():
                run = run_trial(
                    trial,
                    config,
                    device=self.device,
                    objective=self.objective,
                    guard=self.signals.held,
                    checkpoint_dir=checkpoint_dir,
                    store=self.retry,
                    on_resume=lambda epoch: self._set_attrs(
                        trial, {ATTR_RESUMED_FROM: epoch}, "recording the resume"
                    ),
                    checkpoint_every_s=self.spec.checkpoint_every_s,
                    prune_steps=self.prune_steps,
                    phase=self.phase,
                )
        except WorkerInterrupted as e:
            heartbeat.stop()
            reason = f"interrupted by {e} (worker pid {os.getpid()}); re-queued"
            self.retry(
                lambda: fail_trial(self.study, trial_id(trial), reason, requeue=True),
                f"re-queueing trial {trial.number}",
            )
            _logger.info("trial %d: %s", trial.number, reason)
            raise
        except UpdateFinishedTrialError:
            heartbeat.stop()
            # Declared stale (no heartbeat for the grace period) and failed by another process,
            # which queued its retry: stop working on it.
            _logger.warning("trial %d was finished by another process; dropping it", trial.number)
            return False
        except StorageError as e:
            heartbeat.stop()
            # The store stayed away past reconnect_s: the trial is left to its heartbeat.
            _logger.error("trial %d: %s", trial.number, e)
            raise
        except Exception as e:  # noqa: BLE001  (recorded as the trial's failure reason)
            heartbeat.stop()
            _logger.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
            first = (str(e).strip().splitlines() or [""])[0]
            failed = end_record(state=TrialState.FAIL, wall_time_s=time.time() - started,
                                reason=f"{type(e).__name__}: {first}", trained=False)
            self._finish(trial, TrialState.FAIL, None, failed)
            return True
        heartbeat.stop()
        record = end_record(
            state=run.state,
            wall_time_s=time.time() - started,
            train_time_s=run.train_seconds,
            service_time_s=run.service_seconds,
            train_cpu_s=run.cpu_seconds - run.service_cpu_seconds,
            metrics=run.history[-1] if run.history else None,
            checkpoint=None if run.checkpoint is None else str(run.checkpoint),
            reason=run.reason,
        )
        with self.phase("end attributes and tell"):
            recorded = self._finish(trial, run.state, run.value, record)
        if recorded:
            _logger.info(
                "trial %d: %s%s%s in %.1f s",
                trial.number,
                run.state.name,
                f" value {run.value:.5g}" if run.value is not None else f" ({run.reason})",
                f", resumed after epoch {run.resumed_from_epoch}"
                if run.resumed_from_epoch
                else "",
                time.time() - started,
            )
        if recorded and run.state != TrialState.COMPLETE and checkpoint_dir is not None:
            # A pruned or failed trial ends its chain (only an interrupted or stale one is
            # re-queued, and not here): its directory goes, and the ranking the other
            # directories are kept by has not changed, so there is nothing else to prune.
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        elif checkpoint_dir is not None:
            with self.phase("checkpoint pruning"):
                prune_checkpoints_or_warn(self.study, self.spec.checkpoint_dir,
                                          keep=self.spec.keep_checkpoints, retry=self.retry,
                                          warn=_logger.warning)  # fmt: skip
        return False

    def _finish(self, trial: Any, state: Any, value: float | None, attrs: dict[str, Any]) -> bool:
        """Record the outcome (attributes, then the state); False if another process finished
        the trial first (it went stale and was re-queued)."""

        def tell() -> bool:
            if self.storage.get_trial(trial_id(trial)).state.is_finished():
                return False  # a retry after a commit whose answer was lost, or a stale trial
            set_user_attrs(trial, attrs)
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=state)
            return True

        try:
            return self.retry(tell, f"recording the end of trial {trial.number}")
        except UpdateFinishedTrialError:
            _logger.warning("trial %d was already finished by another process", trial.number)
            return False
