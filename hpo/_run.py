"""What `hpo run` does, as one testable function: `run_study(request)`.

Everything the request can be wrong about is checked before anything is written, in this order:
numbers and names, the preset, the space file, the worker layout, the store URL, the store, the
study's settings; each failure is an HpoError, StorageError or ConfigError with a one-line message,
and no half-made study is left. Then the study's settings, specification and budget are written
into the store once, and the launcher runs the workers, which read them from there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpo._errors import HpoError, RunStopped
from hpo._launch import LaunchResult
from hpo._worker import CHECKPOINT_EVERY_S, KEEP_CHECKPOINTS
from storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, RECONNECT_S, StorageError


@dataclass(frozen=True)
class RunRequest:
    """What `hpo run` was asked; the defaults are the command's."""

    trials: int
    storage: str | None = None
    study: str | None = None  # [default: ris-<preset>]
    preset: str = "quick"
    timeout_s: float | None = None
    epochs: int | None = None
    objective: str | None = None  # None: the default for the preset's model (default_objective)
    pruner: str = "hyperband"
    reduction_factor: int | None = None
    sampler: str = "tpe"
    seed: int | None = None
    space: Path | None = None
    workers: int | None = None
    gpus: str | None = None
    workers_per_gpu: int | None = None
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False
    checkpoint_dir: Path | None = None  # [default: runs/checkpoints]
    checkpoint_every_s: float = CHECKPOINT_EVERY_S
    keep_checkpoints: int = KEEP_CHECKPOINTS
    heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S
    grace_period_s: int = GRACE_PERIOD_S
    reconnect_s: float = RECONNECT_S
    started: float = field(default_factory=time.time)  # --timeout counts from here

    @property
    def study_name(self) -> str:
        return self.study or f"ris-{self.preset}"


def check_request(request: RunRequest) -> None:
    """The checks the parser cannot make (relations between options, NaN); HpoError."""
    from hpo._strategies import ETA_PRUNERS

    if request.timeout_s is not None and not 0 < request.timeout_s < math.inf:  # refuses nan
        raise HpoError(f"--timeout must be a number of seconds > 0, but got {request.timeout_s:g}")
    if not request.checkpoint_every_s >= 0:  # also refuses nan
        raise HpoError("--checkpoint-every must be >= 0 seconds, but got "
                       f"{request.checkpoint_every_s}")  # fmt: skip
    if request.grace_period_s < 2 * request.heartbeat_interval_s:
        raise HpoError(
            "--grace-period must be at least twice --heartbeat-interval "
            f"({request.heartbeat_interval_s}), but got {request.grace_period_s}"
        )
    if request.reduction_factor is not None and request.pruner not in ETA_PRUNERS:
        raise HpoError(f"--reduction-factor is for --pruner {' or '.join(ETA_PRUNERS)}, not "
                       f"{request.pruner}")  # fmt: skip


def run_study(request: RunRequest, *, say: Callable[[str], None]) -> LaunchResult:
    """Check `request`, create or join its study, and run workers until the study is done (or
    interrupted, or past --timeout). `say` gets the one-line messages for the user. Bad input
    raises HpoError, StorageError or ConfigError before anything is written; a store lost for
    good while running raises RunStopped."""
    import optuna

    from hpo._budget import count_trials
    from hpo._launch import Launcher
    from hpo._layout import plan_slots, visible_gpu_count
    from hpo._processes import start_method, warm_up
    from hpo._requeue import RequeueStaleTrial
    from hpo._search_space import load_space
    from hpo._strategies import ETA_PRUNERS, OBJECTIVES, REDUCTION_FACTOR, default_objective
    from hpo._studies import StudySettings, StudySpec, create_or_load_study
    from hpo._worker import WorkerSpec
    from pipeline import config_to_dict, preset, replace
    from storage import open_storage, resolve_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_request(request)
    eta = request.reduction_factor or REDUCTION_FACTOR
    base = preset(request.preset)
    if request.epochs is not None:
        base = replace(base, epochs=request.epochs)
    search_space = load_space(request.space, base)
    slots = plan_slots(
        device=request.device, workers=request.workers, gpus=request.gpus,
        workers_per_gpu=request.workers_per_gpu, n_gpus=visible_gpu_count(request.device),
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"), n_cpus=len(os.sched_getaffinity(0)),
        threads=request.threads,
    )  # fmt: skip
    method = start_method()
    location = resolve_url(request.storage)
    objective = request.objective or default_objective(base)
    settings = StudySettings(preset=request.preset, objective=objective,
                             direction=OBJECTIVES[objective], epochs=base.epochs)
    spec = StudySpec(config=config_to_dict(base), space=search_space.to_dict(),
                     pruner=request.pruner, reduction_factor=eta, sampler=request.sampler)
    store = open_storage(
        location,
        stale_trial_callback=RequeueStaleTrial(),
        heartbeat_interval_s=request.heartbeat_interval_s,
        grace_period_s=request.grace_period_s,
    )
    method = warm_up(method, warn=say)  # the fork server imports torch while the study opens
    name = request.study_name
    study = create_or_load_study(store, name, settings, budget=request.trials, spec=spec)

    finished = count_trials(study.get_trials(deepcopy=False)).finished
    log_dir = Path("runs") / f"hpo-{name}"
    checkpoints = (request.checkpoint_dir or Path("runs") / "checkpoints").absolute()
    if not request.quiet:
        where = (
            f"{len(slots)} CPU worker(s), {slots[0].threads} thread(s) each"
            if slots[0].device == "cpu"
            else f"{len(slots)} GPU worker(s) on CUDA_VISIBLE_DEVICES "
            + ",".join(s.cuda_visible_devices for s in slots)
        )
        judged_by = f"{request.pruner} pruner" + (
            f" (eta {eta})" if request.pruner in ETA_PRUNERS else "")
        timeout = request.timeout_s
        say(f"study {name!r} in {location.describe()}: {finished}/{request.trials} finished; "
            f"{where}; {request.sampler} sampler, {judged_by}; "
            + (f"no trial starts after {timeout:g} s; " if timeout is not None else "")
            + f"worker logs in {log_dir}/; checkpoints in {checkpoints}/")  # fmt: skip
    worker = WorkerSpec(
        study=name, sampler_seed=request.seed, device="cpu", threads=1, index=0,
        parent_pid=os.getpid(), checkpoint_dir=str(checkpoints),
        keep_checkpoints=request.keep_checkpoints, checkpoint_every_s=request.checkpoint_every_s,
        heartbeat_interval_s=request.heartbeat_interval_s,
        grace_period_s=request.grace_period_s, reconnect_s=request.reconnect_s,
    )  # fmt: skip
    launcher = Launcher(
        location=location, study=study, spec=worker, slots=slots, seed=request.seed,
        log_dir=log_dir, quiet=request.quiet, direction=settings.direction, method=method,
        deadline=None if request.timeout_s is None else request.started + request.timeout_s,
    )  # fmt: skip
    try:
        return launcher.run()
    except StorageError as error:
        raise RunStopped(str(error)) from error
