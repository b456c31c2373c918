"""`hpo train` and `hpo diagnose`: one configuration, no study."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from hpo._app import app
from hpo._common import EXIT_INCOMPLETE, JsonOption, build_config, fail, open_study
from hpo._errors import OutputNotWritable
from hpo._layout import Device
from hpo._outdir import prepare_out_dir
from pipeline import PRESETS, ExperimentConfig, PipelineError

PresetOption = Annotated[
    str, typer.Option("--preset", "-p", help=f"Named config: {', '.join(PRESETS)}.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="FIELD=VALUE",
                 help="Override one config field; repeatable. Unknown fields are listed."),
]
EpochsOption = Annotated[
    int | None, typer.Option("--epochs", min=1, help="Shortcut for --set epochs=N.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Shortcut for --set seed=S.")]
DeviceOption = Annotated[
    Device, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]


def _format_epoch(metrics: dict, n_epochs: int) -> str:
    terms = metrics["train_terms"]
    return (
        f"epoch {metrics['epoch']:>3}/{n_epochs}  loss {metrics['train_loss']:.4f} "
        f"(cov {terms['cov']:.3f} k {terms['k']:.3f} aux {terms['aux']:.3f} "
        f"det {terms['det']:.3f} "
        f"gap {terms['gap']:.3f})  |  val nmse {metrics['val_nmse']:.4f}  "
        f"K acc {metrics['k_accuracy']:.3f}  rmse az {metrics['rmse_azimuth_deg']:.2f} deg "
        f"el {metrics['rmse_elevation_deg']:.2f} deg r {metrics['rmse_range_m']:.3f} m  "
        f"success {metrics['success_rate']:.3f}  score {metrics['composite']:.3f}  |  "
        f"lr {metrics['lr']:.2e}  {metrics['seconds']:.1f} s"
    )


def _config_from_file(path: Path) -> ExperimentConfig:
    """The config in `path`: the output of `hpo best --json` (its "config"), the metrics.json of
    a run, or a bare config object. Exits with one line if it is unreadable or invalid."""
    from pipeline import config_from_dict

    try:
        text = path.read_text()
    except OSError as error:
        fail(f"cannot read config file {path}: {error.strerror or error}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"config file {path} is not JSON: {error.msg} at line {error.lineno}")
    if isinstance(data, dict) and "config" in data:
        data = data["config"]
    if not isinstance(data, dict) or not data:
        fail(f"config file {path} holds no config; expected the output of hpo best --json "
             "or a JSON object of config fields")
    try:
        return config_from_dict(data)
    except PipelineError as error:
        fail(f"config file {path}: {error}")
    except (TypeError, ValueError) as error:  # a value of the wrong type, e.g. "lr": "fast"
        fail(f"config file {path}: a field has a value of the wrong type ({error})")


def _config_from_best(storage: str | None, study: str | None) -> tuple[ExperimentConfig, dict]:
    """The config stored on the study's best trial, and where it came from."""
    from hpo._attrs import ATTR_CONFIG
    from hpo._studies import best_trial, direction_of
    from pipeline import config_from_dict

    location, the_study = open_study(storage, study)
    name = the_study.study_name
    trial = best_trial(the_study.get_trials(deepcopy=False), direction_of(the_study))
    if trial is None:
        fail(f"study {name!r} has no complete trial yet; nothing to retrain", EXIT_INCOMPLETE)
    data = trial.user_attrs.get(ATTR_CONFIG)
    if not isinstance(data, dict):
        fail(f"best trial {trial.number} of study {name!r} has no stored config", EXIT_INCOMPLETE)
    try:
        config = config_from_dict(data)
    except (PipelineError, TypeError, ValueError) as error:
        fail(f"best trial {trial.number} of study {name!r} has a config this version cannot "
             f"use: {error}", EXIT_INCOMPLETE)
    source = {"study": name, "trial": trial.number, "value": trial.value,
              "params": trial.params, "storage": location.redacted_url}
    return config, source


@app.command()
def train(
    preset: Annotated[
        str | None,
        typer.Option("--preset", "-p", show_default=False,
                     help=f"Named config: {', '.join(PRESETS)} [default: quick, unless "
                     "--from-best or --config gives the config]."),
    ] = None,
    from_best: Annotated[
        bool, typer.Option("--from-best", help="Start from the config of the best trial of "
                           "--study in --storage (as hpo best shows it).")] = False,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", dir_okay=False, show_default=False,
                     help="Start from the config in this JSON file (hpo best --json > best.json, "
                     "or a run's metrics.json)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", show_default=False,
                                 help="With --from-best: the study [default: the store's only "
                                 "one].")] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", show_default=False,
                                 help="With --from-best: the store URL [default: $HPO_STORAGE, "
                                 "else sqlite:///hpo.db in the working directory].")] = None,
    assignments: SetOption = None,
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    device: DeviceOption = Device.auto,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory for checkpoints and metrics "
                     "[default: runs/train-<preset, best-<study> or file name>-<time>]."),
    ] = None,
    references: Annotated[
        bool, typer.Option("--references/--no-references",
                           help="Also score the classical references (R_samp, identity) on the "
                           "same validation scenes.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Train one configuration, print one line per epoch and save a checkpoint.

    The config is a preset, the best trial of a study (--from-best) or a JSON file (--config);
    --set, --epochs and --seed apply on top of it.
    """
    from pipeline import config_to_dict, reference_metrics, resolve_device
    from pipeline import train as run_training

    config, label, run_name, source = _resolve_config(
        preset, from_best, config_file, study, storage, assignments, epochs, seed)
    try:
        torch_device = resolve_device(device.value)
    except PipelineError as error:
        fail(str(error))
    run_dir = out or Path("runs") / f"train-{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        prepare_out_dir(run_dir)  # before training: a bad --out costs nothing
    except OutputNotWritable as error:
        fail(str(error))

    def report(metrics) -> None:
        line = _format_epoch(metrics.to_dict(), config.epochs)
        typer.echo(line, err=as_json)

    if not as_json:
        typer.echo(f"training {label} on {torch_device} -> {run_dir}")
    try:
        result = run_training(config, device=torch_device, on_epoch_end=report,
                              checkpoint_dir=run_dir)
        refs = reference_metrics(config, torch_device) if references else None
    except PipelineError as error:
        fail(f"{type(error).__name__}: {error}", code=1)
    summary = {
        "preset": preset or (None if from_best or config_file is not None else "quick"),
        "source": source,  # the study and trial, or the file, the config came from
        "device": str(torch_device),
        "final": result.final.to_dict(),
        "best": result.best.to_dict(),
        "history": [m.to_dict() for m in result.history],
        "references": refs,
        "checkpoint": str(result.checkpoint_path),
        "config": config_to_dict(config),
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    best = result.best
    typer.echo(f"best epoch {best.epoch}: score {best.composite:.3f}, val nmse {best.val_nmse:.4f}"
               f", success {best.success_rate:.3f}")
    if refs:
        for name, values in refs.items():
            typer.echo(f"reference {name}: " + ", ".join(
                f"{key} {value:.3f}" for key, value in values.items()))
    typer.echo(f"checkpoint: {result.checkpoint_path}")


def _resolve_config(preset: str | None, from_best: bool, config_file: Path | None,
                    study: str | None, storage: str | None, assignments: list[str] | None,
                    epochs: int | None, seed: int | None) -> tuple[ExperimentConfig, str, str, dict | None]:
    """(config, label, run name, source) from a preset, the best trial or a file, with --set,
    --epochs and --seed on top; one line and exit 2 if the options disagree or a value is bad."""
    from pipeline import apply_overrides, replace

    if from_best and config_file is not None:
        fail("--from-best and --config both give the config; use one")
    if preset is not None and (from_best or config_file is not None):
        fail("--preset cannot be combined with --from-best or --config, which give the config")
    if not from_best and (study is not None or storage is not None):
        fail("--study and --storage choose the study for --from-best; add --from-best")
    source: dict | None = None
    if from_best:
        base, source = _config_from_best(storage, study)
        label = f"best trial {source['trial']} of study {source['study']!r}"
        run_name = f"best-{source['study']}"
    elif config_file is not None:
        base = _config_from_file(config_file)
        source = {"config_file": str(config_file)}
        label = f"config from {config_file}"
        run_name = config_file.stem
    else:
        preset = preset or "quick"
        label = f"preset {preset}"
        run_name = preset
    try:
        if source is None:
            config = build_config(preset, assignments, epochs=epochs, seed=seed)
        else:
            config = apply_overrides(base, list(assignments or []))
            shortcuts = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
            config = replace(config, **shortcuts) if shortcuts else config
    except PipelineError as error:
        fail(str(error))
    return config, label, run_name, source


@app.command()
def diagnose(
    preset: PresetOption = "full",
    assignments: SetOption = None,
    seed: SeedOption = None,
    device: DeviceOption = Device.auto,
    as_json: JsonOption = False,
) -> None:
    """Print the scale table behind the four normalization fixes on one batch."""
    from pipeline import resolve_device, scale_report

    try:
        config = build_config(preset, assignments, seed=seed)
        report = scale_report(config, resolve_device(device.value))
    except PipelineError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps(report))
        return
    n = report["n_elements"]
    typer.echo(f"one batch of {report['batch_size']} scenes, N = {n}, beta = {report['beta']}")
    typer.echo(f"{'matrix':<18}{'trace':>14}{'Frobenius':>14}")
    rows = [("R_true (unscaled)", "R_true_unscaled"), ("R_true  [fix 4]", "R_true"),
            ("R_samp (unscaled)", "R_samp_unscaled"), ("R_samp  [fix 1]", "R_samp"),
            ("R_pred", "R_pred"), ("R_blend [fix 2]", "R_blend")]
    for label, key in rows:
        typer.echo(f"{label:<18}{report[key]['trace']:>14.6g}{report[key]['frobenius']:>14.6g}")
    typer.echo(f"NMSE(R_true, R_true)  = {report['nmse_true_vs_true']:.3g}")
    typer.echo(f"NMSE(R_blend, R_true) = {report['nmse_blend_vs_true']:.4f}")
    typer.echo(f"NMSE(R_samp, R_true)  = {report['nmse_samp_vs_true']:.4f}")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in report["loss_terms"].items())
    typer.echo(f"loss {report['loss_total']:.4g} ({terms}); all terms finite: "
               f"{report['loss_terms_finite']}; gradients finite: {report['gradients_finite']}")
    state = "on" if report["eigengap_enabled"] else "off by default [fix 3]"
    typer.echo(f"eigengap term: {state}; switched on it gives {report['eigengap_term']:.4g} "
               f"with finite gradients: {report['eigengap_gradients_finite']}")
