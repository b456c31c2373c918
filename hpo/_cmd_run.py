"""`hpo run`: options in, `run_study` (hpo._run) does the work, the outcome out."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hpo._app import app
from hpo._common import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_USAGE, StorageOption, fail
from hpo._layout import Device
from hpo._strategies import Objective, Pruner, Sampler
from hpo._worker import CHECKPOINT_EVERY_S, KEEP_CHECKPOINTS
from pipeline import PRESETS
from storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, RECONNECT_S

if TYPE_CHECKING:
    from hpo._launch import LaunchResult
    from hpo._run import RunRequest

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)  # type: ignore[misc]


@app.command(
    epilog="Environment: HPO_STORAGE (store URL, instead of --storage); HPO_HOST (this node's "
    "name in the store [default: the host name]); HPO_WORKER_START=forkserver|exec (workers "
    "forked from a server that imported torch once [default], or fresh interpreters)."
)
def run(
    trials: Annotated[
        int,
        typer.Option(
            "--trials",
            min=1,
            help="The study's total of finished (complete, pruned, failed) trials to reach; "
            "a study that already has some gets only the rest.",
        ),
    ],
    storage: StorageOption = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study name [default: ris-<preset>].")
    ] = None,
    preset: Annotated[
        Preset, typer.Option("--preset", "-p", help="Base config.")
    ] = Preset.quick,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            help="Start no trial once this many seconds have passed since the command started; "
            "the trials running then finish and are recorded, and the command exits 0 with the "
            "budget not yet used up (run it again to go on) [default: no limit].",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Epochs per trial [default: the preset's]."),
    ] = None,
    objective: Annotated[
        Objective | None,
        typer.Option(
            "--objective",
            help="composite (localization score, SYSTEM.md §5) or nmse (validation NMSE), "
            "both minimised; or success (share of validation scenes localized), maximised "
            "[default: success for the SBL count network (quick, medium), else composite].",
            show_default=False,
        ),
    ] = None,
    pruner: Annotated[
        Pruner,
        typer.Option(
            "--pruner",
            help="hyperband (over the epochs), asha (asynchronous successive halving), median "
            "or none.",
        ),
    ] = Pruner.hyperband,
    reduction_factor: Annotated[
        int | None,
        typer.Option(
            "--reduction-factor",
            min=2,
            help="eta of hyperband and asha: a trial goes on past epochs 1, eta, eta^2, ... only "
            "while it is in the best 1/eta of the trials there (>= 2) [default: 3].",
            show_default=False,
        ),
    ] = None,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="tpe or random.")] = Sampler.tpe,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seeds the sampler of every worker.")
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            "--space", help="TOML file overriding ranges or fixing values.", dir_okay=False
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Worker processes [default: one per GPU, or one "
                     "per core (at most 8) on CPU]."),
    ] = None,
    gpus: Annotated[
        str | None, typer.Option("--gpus", help="GPUs to use, e.g. 0,1,3 [default: all].")
    ] = None,
    workers_per_gpu: Annotated[
        int | None, typer.Option("--workers-per-gpu", min=1, help="Workers sharing each GPU.")
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="auto, cpu or cuda.")] = Device.auto,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Torch threads per worker [default: the cores divided among the workers].",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No live progress line (for logs).")
    ] = False,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir",
            envvar="HPO_CHECKPOINT_DIR",
            file_okay=False,
            help="Where trials checkpoint, so a retried trial resumes; on several "
            "nodes a path they all share [default: runs/checkpoints].",
            show_default=False,
        ),
    ] = None,
    checkpoint_every: Annotated[
        float,
        typer.Option(
            "--checkpoint-every",
            metavar="SECONDS",
            help="Save a trial's training state once this many seconds of training have passed "
            "since its last save, and after its last epoch: a retried trial redoes at most "
            "that much. 0 saves after every epoch.",
        ),
    ] = CHECKPOINT_EVERY_S,
    keep_checkpoints: Annotated[
        int,
        typer.Option(
            "--keep-checkpoints", min=0,
            help="Final checkpoints of the best complete trials to keep.",
        ),
    ] = KEEP_CHECKPOINTS,
    heartbeat_interval: Annotated[
        int,
        typer.Option(
            "--heartbeat-interval",
            min=1,
            envvar="HPO_HEARTBEAT_INTERVAL",
            help="Seconds between a running trial's heartbeats (the same on every node).",
        ),
    ] = HEARTBEAT_INTERVAL_S,
    grace_period: Annotated[
        int,
        typer.Option(
            "--grace-period",
            envvar="HPO_GRACE_PERIOD",
            help="Seconds without a heartbeat after which a trial's worker counts as dead and "
            "the trial is retried.",
        ),
    ] = GRACE_PERIOD_S,
    reconnect_timeout: Annotated[
        float,
        typer.Option(
            "--reconnect-timeout",
            min=0,
            envvar="HPO_RECONNECT_TIMEOUT",
            help="Seconds a worker waits for a lost store (e.g. a restarting server) before "
            "giving up.",
        ),
    ] = RECONNECT_S,
) -> None:
    """Run trials until the study holds --trials finished ones, or until --timeout passes."""
    started = time.time()  # --timeout counts from here: imports and set-up are part of it
    from hpo._errors import HpoError, RunStopped
    from hpo._run import RunRequest, run_study
    from pipeline import ConfigError
    from storage import StorageError

    request = RunRequest(
        trials=trials, storage=storage, study=study, preset=preset.value, timeout_s=timeout,
        epochs=epochs, objective=objective.value if objective else None, pruner=pruner.value,
        reduction_factor=reduction_factor, sampler=sampler.value, seed=seed, space=space,
        workers=workers, gpus=gpus, workers_per_gpu=workers_per_gpu, device=device.value,
        threads=threads, quiet=quiet, checkpoint_dir=checkpoint_dir,
        checkpoint_every_s=checkpoint_every, keep_checkpoints=keep_checkpoints,
        heartbeat_interval_s=heartbeat_interval, grace_period_s=grace_period,
        reconnect_s=reconnect_timeout, started=started,
    )  # fmt: skip
    try:
        result = run_study(request, say=lambda line: typer.echo(line, err=True))
    except RunStopped as error:
        fail(f"stopped: {error}", EXIT_INCOMPLETE)
    except (HpoError, ConfigError, StorageError) as error:
        fail(str(error), EXIT_USAGE)
    report_outcome(request, result)


def report_outcome(request: RunRequest, result: LaunchResult) -> None:
    """The closing lines of `hpo run`, and its exit code."""
    name, trials, timeout = request.study_name, result.budget, request.timeout_s
    counts = result.counts
    best = f"; best {result.best.value:.5g} (trial {result.best.number})" if result.best else ""
    typer.echo(
        f"study {name!r}: {counts.finished}/{trials} finished ({counts.complete} complete, "
        f"{counts.pruned} pruned, {counts.failed} failed) in {result.elapsed_s:.1f} s{best}"
    )
    if result.interrupted:
        typer.echo(
            f"interrupted: {counts.requeued} trial(s) re-queued; run the same command again "
            "to finish the budget",
            err=True,
        )
        raise typer.Exit(code=EXIT_INTERRUPTED)
    if result.gave_up:
        typer.echo(f"error: stopped early: {result.gave_up}", err=True)
        raise typer.Exit(code=EXIT_INCOMPLETE)
    if result.timed_out:
        waiting = (
            f"; {counts.waiting} re-queued trial(s) wait for the next run" if counts.waiting else ""
        )
        typer.echo(
            f"time limit of {timeout:g} s reached: no trial was started after it{waiting}; run "
            "the same command again to finish the budget",
            err=True,
        )
    if counts.finished < trials and counts.running:
        typer.echo(
            f"note: {counts.running} trial(s) are still running in other processes", err=True
        )


