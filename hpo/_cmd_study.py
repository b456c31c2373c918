"""`hpo run`, `hpo status`, `hpo best`: the study commands.

Everything a command can be wrong about is checked before anything is written, in this order:
numbers and names, the preset, the space file, the worker layout, the store URL, the store, the
study's settings. Each failure is one line on stderr and exit code 2; no half-made study is left.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hpo._app import app
from hpo._common import fail
from hpo._worker import CHECKPOINT_EVERY_S

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

EXIT_USAGE = 2
EXIT_INCOMPLETE = 1
EXIT_INTERRUPTED = 130


def _choice(option: str, value: str, choices: Any) -> str:
    if value not in choices:
        fail(f"{option} must be one of {', '.join(choices)}, but got {value!r}", EXIT_USAGE)
    return value


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
            help="The study's total of finished (complete, pruned, failed) trials to reach; "
            "a study that already has some gets only the rest.",
        ),
    ],
    storage: StorageOption = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study name [default: ris-<preset>].")
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="Base config: smoke, quick, medium or full.")
    ] = "quick",
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
        int | None, typer.Option("--epochs", help="Epochs per trial [default: the preset's].")
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="composite (localization score, SYSTEM.md §5) or nmse (validation NMSE); "
            "both minimised.",
        ),
    ] = "composite",
    pruner: Annotated[
        str,
        typer.Option(
            "--pruner",
            help="hyperband (over the epochs), asha (asynchronous successive halving), median "
            "or none.",
        ),
    ] = "hyperband",
    reduction_factor: Annotated[
        int | None,
        typer.Option(
            "--reduction-factor",
            help="eta of hyperband and asha: a trial goes on past epochs 1, eta, eta^2, ... only "
            "while it is in the best 1/eta of the trials there (>= 2) [default: 3].",
            show_default=False,
        ),
    ] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe or random.")] = "tpe",
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
        typer.Option("--workers", help="Worker processes [default: one per GPU, or one per core (at most 8) on CPU]."),
    ] = None,
    gpus: Annotated[
        str | None, typer.Option("--gpus", help="GPUs to use, e.g. 0,1,3 [default: all].")
    ] = None,
    workers_per_gpu: Annotated[
        int | None, typer.Option("--workers-per-gpu", help="Workers sharing each GPU.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
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
            "--keep-checkpoints", help="Final checkpoints of the best complete trials to keep."
        ),
    ] = 3,
    heartbeat_interval: Annotated[
        int,
        typer.Option(
            "--heartbeat-interval",
            envvar="HPO_HEARTBEAT_INTERVAL",
            help="Seconds between a running trial's heartbeats (the same on every node).",
        ),
    ] = 20,
    grace_period: Annotated[
        int,
        typer.Option(
            "--grace-period",
            envvar="HPO_GRACE_PERIOD",
            help="Seconds without a heartbeat after which a trial's worker counts as dead and "
            "the trial is retried.",
        ),
    ] = 300,
    reconnect_timeout: Annotated[
        float,
        typer.Option(
            "--reconnect-timeout",
            envvar="HPO_RECONNECT_TIMEOUT",
            help="Seconds a worker waits for a lost store (e.g. a restarting server) before "
            "giving up.",
        ),
    ] = 300.0,
) -> None:
    """Run trials until the study holds --trials finished ones, or until --timeout passes."""
    started = time.time()  # --timeout counts from here: imports and set-up are part of it
    import optuna

    from hpo._launch import Launcher, LaunchError, plan_slots, start_method, warm_up
    from hpo._search_space import SpaceError, load_space
    from hpo._study import (
        ETA_PRUNERS,
        OBJECTIVES,
        PRUNERS,
        REDUCTION_FACTOR,
        SAMPLERS,
        RequeueStaleTrial,
        StudyError,
        StudySettings,
        count_trials,
        create_or_load_study,
    )
    from hpo._worker import WorkerSpec
    from pipeline import ConfigError, replace
    from pipeline import preset as preset_config
    from storage import StorageError, open_storage, resolve_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if trials < 1:
        fail(f"--trials must be >= 1, but got {trials}", EXIT_USAGE)
    if epochs is not None and epochs < 1:
        fail(f"--epochs must be >= 1, but got {epochs}", EXIT_USAGE)
    if timeout is not None and not 0 < timeout < math.inf:  # also refuses nan
        fail(f"--timeout must be a number of seconds > 0, but got {timeout:g}", EXIT_USAGE)
    if not checkpoint_every >= 0:  # also refuses nan
        fail(f"--checkpoint-every must be >= 0 seconds, but got {checkpoint_every}", EXIT_USAGE)
    if keep_checkpoints < 0:
        fail(f"--keep-checkpoints must be >= 0, but got {keep_checkpoints}", EXIT_USAGE)
    if heartbeat_interval < 1:
        fail(f"--heartbeat-interval must be >= 1, but got {heartbeat_interval}", EXIT_USAGE)
    if grace_period < 2 * heartbeat_interval:
        fail(
            f"--grace-period must be at least twice --heartbeat-interval ({heartbeat_interval}), "
            f"but got {grace_period}",
            EXIT_USAGE,
        )
    if reconnect_timeout < 0:
        fail(f"--reconnect-timeout must be >= 0, but got {reconnect_timeout}", EXIT_USAGE)
    _choice("--objective", objective, OBJECTIVES)
    _choice("--pruner", pruner, PRUNERS)
    if reduction_factor is not None and pruner not in ETA_PRUNERS:
        fail(f"--reduction-factor is for --pruner {' or '.join(ETA_PRUNERS)}, not {pruner}",
             EXIT_USAGE)
    if reduction_factor is not None and reduction_factor < 2:
        fail(f"--reduction-factor must be at least 2, but got {reduction_factor}", EXIT_USAGE)
    eta = reduction_factor or REDUCTION_FACTOR
    _choice("--sampler", sampler, SAMPLERS)
    try:
        base = preset_config(preset)
        if epochs is not None:
            base = replace(base, epochs=epochs)
        search_space = load_space(space, base)
        slots = plan_slots(
            device=device,
            workers=workers,
            gpus=gpus,
            workers_per_gpu=workers_per_gpu,
            n_gpus=_visible_gpu_count(device),
            visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
            n_cpus=len(os.sched_getaffinity(0)),
            threads=threads,
        )
        method = start_method()
        location = resolve_url(storage)
        settings = StudySettings(
            preset=preset,
            objective=objective,
            direction=OBJECTIVES[objective],
            epochs=base.epochs,
        )
        name = study or f"ris-{preset}"
        store = open_storage(
            location,
            stale_trial_callback=RequeueStaleTrial(),
            heartbeat_interval_s=heartbeat_interval,
            grace_period_s=grace_period,
        )
        # The fork server imports torch while the study is opened.
        method = warm_up(method, warn=lambda line: typer.echo(line, err=True))
        the_study = create_or_load_study(
            store, name, settings, budget=trials, space=search_space.to_dict()
        )
    except (ConfigError, SpaceError, LaunchError, StorageError, StudyError) as error:
        fail(str(error), EXIT_USAGE)

    before = count_trials(the_study.get_trials(deepcopy=False))
    log_dir = Path("runs") / f"hpo-{name}"
    checkpoints = (checkpoint_dir or Path("runs") / "checkpoints").absolute()
    if not quiet:
        kind = slots[0].device
        where = (
            f"{len(slots)} CPU worker(s), {slots[0].threads} thread(s) each"
            if kind == "cpu"
            else f"{len(slots)} GPU worker(s) on CUDA_VISIBLE_DEVICES "
            + ",".join(s.cuda_visible_devices for s in slots)
        )
        judged_by = f"{pruner} pruner" + (f" (eta {eta})" if pruner in ETA_PRUNERS else "")
        typer.echo(
            f"study {name!r} in {location.describe()}: {before.finished}/{trials} finished; "
            f"{where}; {sampler} sampler, {judged_by}; "
            + (f"no trial starts after {timeout:g} s; " if timeout is not None else "")
            + f"worker logs in {log_dir}/; checkpoints in {checkpoints}/",
            err=True,
        )
    spec = WorkerSpec(
        study=name,
        budget=trials,
        preset=preset,
        epochs=base.epochs,
        objective=objective,
        pruner=pruner,
        reduction_factor=eta,
        sampler=sampler,
        sampler_seed=seed,
        space=search_space.to_dict(),
        device="cpu",
        threads=1,
        index=0,
        parent_pid=os.getpid(),
        checkpoint_dir=str(checkpoints),
        keep_checkpoints=keep_checkpoints,
        checkpoint_every_s=checkpoint_every,
        heartbeat_interval_s=heartbeat_interval,
        grace_period_s=grace_period,
        reconnect_s=reconnect_timeout,
    )
    launcher = Launcher(
        location=location,
        study=the_study,
        spec=spec,
        slots=slots,
        seed=seed,
        log_dir=log_dir,
        quiet=quiet,
        direction=settings.direction,
        method=method,
        deadline=None if timeout is None else started + timeout,
    )
    try:
        result = launcher.run()
    except StorageError as error:
        fail(f"stopped: {error}", EXIT_INCOMPLETE)
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


def _visible_gpu_count(device: str) -> int:
    """GPUs torch sees. With `auto` and no sign of an NVIDIA driver, 0 without importing torch
    (1-2 s) in the launcher; `cuda` always asks torch, since sandboxes such as gVisor show the
    GPU's device files but may have no /proc/driver/nvidia."""
    if device == "cpu" or (device == "auto" and not _nvidia_driver_visible()):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _nvidia_driver_visible(root: Path = Path("/")) -> bool:
    dev = root / "dev"
    return ((root / "proc" / "driver" / "nvidia").exists() or (dev / "nvidiactl").exists()
            or any(dev.glob("nvidia[0-9]*")))


def _open_study(storage: str | None, study: str | None) -> tuple[Any, Any]:
    from hpo._study import StudyError, load_existing_study
    from storage import StorageError, open_storage, resolve_url

    try:
        location = resolve_url(storage)
        store = open_storage(location, create=False, heartbeat=False)
        return location, load_existing_study(store, study)
    except (StorageError, StudyError) as error:
        fail(str(error), EXIT_USAGE)


def _running_summary(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "host": attrs.get("host"),
        "pid": attrs.get("worker_pid"),
        "epoch": max(trial.intermediate_values, default=0),  # last epoch reported
        "retry_count": attrs.get("retry_count", 0),
        "resumed_from_epoch": attrs.get("resumed_from_epoch"),
        "device": attrs.get("device"),
    }


def _retry_summary(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "retry_of": attrs.get("retry_of"),
        "retry_count": attrs.get("retry_count", len(attrs.get("retry_chain", []))),
        "resumed_from_epoch": attrs.get("resumed_from_epoch"),
        "state": trial.state.name,
    }


def _trial_summary(trial: Any) -> dict[str, Any]:
    return {"value": trial.value, "number": trial.number, "params": trial.params}


@app.command()
def status(
    storage: StorageOption = None,
    study: ExistingStudyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the study's trial counts against its budget, its best trial, what runs on each
    host (trial, worker pid, epoch), and the retried trials with the epoch each resumed from."""
    from optuna.trial import TrialState

    from hpo._study import (
        ATTR_BUDGET,
        ATTR_CLAIMED_UNIX,
        ATTR_FAIL_REASON,
        ATTR_VOID,
        best_trial,
        count_trials,
        study_settings,
    )

    location, the_study = _open_study(storage, study)
    trials = the_study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    settings = study_settings(the_study)
    direction = settings.direction if settings else "minimize"
    best = best_trial(trials, direction)
    budget = the_study.user_attrs.get(ATTR_BUDGET)
    requeued = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    failures = [
        {
            "number": t.number,
            "reason": t.user_attrs.get(ATTR_FAIL_REASON, "no heartbeat (stale)"),
            "requeued": t.number in requeued,
        }
        for t in trials
        if t.state == TrialState.FAIL and ATTR_VOID not in t.user_attrs
    ]
    # A trial whose claim is still being written (created, not yet tagged with its host and
    # worker: a moment, or a claim cut off by a lost store) runs nowhere yet.
    running = [
        _running_summary(t)
        for t in trials
        if t.state == TrialState.RUNNING and ATTR_CLAIMED_UNIX in t.user_attrs
    ]
    claiming = [
        t.number
        for t in trials
        if t.state == TrialState.RUNNING and ATTR_CLAIMED_UNIX not in t.user_attrs
    ]
    retries = [_retry_summary(t) for t in trials if "retry_of" in t.user_attrs]
    hosts: dict[str, list[dict[str, Any]]] = {}
    for entry in running:
        hosts.setdefault(entry["host"] or "?", []).append(entry)
    if as_json:
        payload = {
            "study": the_study.study_name,
            "storage": location.redacted_url,
            "settings": settings.to_attrs() if settings else None,
            "budget": budget,
            "counts": counts.to_dict(),
            "best": _trial_summary(best) if best else None,
            "failures": failures,
            "running": running,
            "claiming": claiming,
            "hosts": {host: len(entries) for host, entries in hosts.items()},
            "retries": retries,
        }
        typer.echo(json.dumps(payload))
        return
    typer.echo(f"study {the_study.study_name!r} in {location.describe()}")
    if settings:
        typer.echo(
            f"  preset {settings.preset}, objective {settings.objective} ({settings.direction}), "
            f"{settings.epochs} epochs per trial"
        )
    of_budget = f"/{budget}" if budget else ""
    typer.echo(
        f"  {counts.finished}{of_budget} finished: {counts.complete} complete, {counts.pruned} "
        f"pruned, {counts.failed} failed; {counts.running} running, {counts.waiting} waiting, "
        f"{counts.requeued} re-queued"
    )
    if best:
        typer.echo(f"  best: trial {best.number}, value {best.value:.6g}")
        typer.echo(f"  params: {_format_params(best.params)}")
    else:
        typer.echo("  best: no complete trial yet")
    epochs = f"/{settings.epochs}" if settings else ""
    for host, entries in sorted(hosts.items()):
        typer.echo(f"  running on {host}:")
        for entry in entries:
            retry = (
                f", retry {entry['retry_count']} resumed after epoch {entry['resumed_from_epoch']}"
                if entry["retry_count"]
                else ""
            )
            typer.echo(
                f"    trial {entry['number']}: worker pid {entry['pid']}, epoch "
                f"{entry['epoch']}{epochs}{retry}"
            )
    if claiming:
        typer.echo(f"  being claimed: trial(s) {', '.join(map(str, claiming))}")
    for entry in retries[-5:]:
        typer.echo(
            f"  trial {entry['number']} retries trial {entry['retry_of']} (retry "
            f"{entry['retry_count']}), resumed after epoch {entry['resumed_from_epoch']}: "
            f"{entry['state']}"
        )
    for failure in failures[-5:]:
        again = " (re-queued)" if failure["requeued"] else ""
        typer.echo(f"  failed trial {failure['number']}{again}: {failure['reason']}")


@app.command()
def best(
    storage: StorageOption = None,
    study: ExistingStudyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the best trial: value, number, params, final metrics and full config."""
    from hpo._study import best_trial, study_settings

    _, the_study = _open_study(storage, study)
    trials = the_study.get_trials(deepcopy=False)
    settings = study_settings(the_study)
    trial = best_trial(trials, settings.direction if settings else "minimize")
    if trial is None:
        fail(f"study {the_study.study_name!r} has no complete trial yet", EXIT_INCOMPLETE)
    payload = {
        **_trial_summary(trial),
        "objective": settings.objective if settings else None,
        "metrics": trial.user_attrs.get("metrics"),
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "config": trial.user_attrs.get("config"),
        "study": the_study.study_name,
    }
    if as_json:
        typer.echo(json.dumps(payload))
        return
    objective = payload["objective"] or "value"
    typer.echo(
        f"best trial {trial.number} of study {the_study.study_name!r}: "
        f"{objective} {trial.value:.6g}"
    )
    typer.echo(f"params: {_format_params(trial.params)}")
    metrics = payload["metrics"] or {}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if shown:
        typer.echo("metrics: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    if payload["config"]:
        typer.echo("config: " + json.dumps(payload["config"], sort_keys=True))
    sys.stdout.flush()


def _fmt(value: float) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={_fmt(value)}" for name, value in params.items()) or "(none)"
