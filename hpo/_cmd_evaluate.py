"""`hpo evaluate`: a trained model against MUSIC, pursuit, coded SBL, the oracle and the CRB.

The work is `pipeline._benchmark_eval.evaluate_model`; this module resolves the checkpoint, checks
the output directory before anything runs, prints the tables and the paired test of the learned
row against each classical row, and writes them as CSV, JSON, a plot of RMSE against SNR with the
CRB line, and scenes.jsonl: every scene's truth and each method's estimates and count, one JSON
line per scene, so that anyone can rescore a table without this project's code.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from hpo._app import app
from hpo._common import EXIT_INCOMPLETE, EXIT_USAGE, fail, open_study
from hpo._layout import Device
from pipeline import PipelineError

CSV_NAME = "evaluation.csv"
JSON_NAME = "evaluation.json"
PLOT_NAME = "rmse_vs_snr.png"
SCENES_NAME = "scenes.jsonl"

# Printed columns: (header, row key, format). The CSV and JSON hold every key.
_COLUMNS = (
    ("K acc", "k_accuracy", "{:.3f}"),
    ("over", "k_over", "{:.3f}"),
    ("under", "k_under", "{:.3f}"),
    ("rmse az", "rmse_azimuth_deg", "{:.2f}"),
    ("el", "rmse_elevation_deg", "{:.2f}"),
    ("r m", "rmse_range_m", "{:.3f}"),
    ("r/r", "rmse_range_relative", "{:.3f}"),
    ("med az", "median_azimuth_deg", "{:.2f}"),
    ("el", "median_elevation_deg", "{:.2f}"),
    ("r m", "median_range_m", "{:.3f}"),
    ("inl az", "inlier_rmse_azimuth_deg", "{:.2f}"),
    ("el", "inlier_rmse_elevation_deg", "{:.2f}"),
    ("r m", "inlier_rmse_range_m", "{:.3f}"),
    ("success", "success_rate", "{:.3f}"),
    ("score", "composite", "{:.2f}"),
    ("/crb az", "rmse_over_crb_azimuth_deg", "{:.1f}"),
    ("el", "rmse_over_crb_elevation_deg", "{:.1f}"),
    ("r", "rmse_over_crb_range_m", "{:.1f}"),
)
# What each row of the tables is, as evaluation.json records it.
METHODS = {
    "learned": "MUSIC on the learned R_blend, K from the K head",
    "samp": "MUSIC on R_samp, K from MDL",
    "pursuit": "orthogonal matching pursuit on the coded dictionary, K from MDL",
    "sbl": "coded sparse Bayesian learning with likelihood refinement, its own K (a threshold on "
           "each source's likelihood gain)",
    "oracle": "MUSIC on R_true, true K",
    "crb": "stochastic CRB, all positions, powers and noise variance unknown",
}
_SHORT_LABELS = {"learned": "learned", "samp": "R_samp", "pursuit": "pursuit", "sbl": "SBL",
                 "oracle": "R_true", "crb": "CRB"}


def _resolve_checkpoint(checkpoint: Path | None, from_best: bool, storage: str | None,
                        study: str | None) -> Path:
    if checkpoint is not None and from_best:
        fail("give either --checkpoint or --from-best, not both", EXIT_USAGE)
    if checkpoint is None and not from_best:
        fail("give --checkpoint PATH (a checkpoint of `hpo train`) or --from-best", EXIT_USAGE)
    if checkpoint is not None:
        if not checkpoint.is_file():
            fail(f"no checkpoint file at {checkpoint}", EXIT_USAGE)
        return checkpoint
    from hpo._attrs import ATTR_CHECKPOINT
    from hpo._studies import best_trial, direction_of

    _, the_study = open_study(storage, study)
    trial = best_trial(the_study.get_trials(deepcopy=False), direction_of(the_study))
    name = the_study.study_name
    if trial is None:
        fail(f"study {name!r} has no complete trial yet", EXIT_INCOMPLETE)
    saved = trial.user_attrs.get(ATTR_CHECKPOINT)
    if not saved:
        fail(f"best trial {trial.number} of study {name!r} has no saved checkpoint; run `hpo train --from-best` first and pass its "
             "checkpoint with --checkpoint", EXIT_USAGE)
    if not Path(saved).is_file():
        fail(f"best trial {trial.number} of study {name!r} saved {saved}, which is not there "
             "(another node's disk?); run `hpo train --from-best` first and pass its "
             "checkpoint with --checkpoint", EXIT_USAGE)
    return Path(saved)


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's own messages run to several lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _prepare_out(out: Path) -> None:
    """Create --out and prove it writable before any work, so a bad path costs nothing."""
    from hpo._errors import OutputNotWritable
    from hpo._outdir import prepare_out_dir

    try:
        prepare_out_dir(out)
    except OutputNotWritable as error:
        fail(str(error), EXIT_USAGE)


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def format_tables(rows: list[dict[str, Any]]) -> str:
    """The printed tables: all scenes, then one block per SNR bin, then one per K."""
    lines = []
    header = f"{'':<9}" + "".join(f"{name:>8}" for name, _, _ in _COLUMNS)
    titles = {"all": "all scenes", "snr": "SNR {} dB", "k": "K = {}"}
    seen: list[tuple[str, str]] = []
    for row in rows:
        if (row["group"], row["bin"]) not in seen:
            seen.append((row["group"], row["bin"]))
    for group, label in seen:
        block = [r for r in rows if r["group"] == group and r["bin"] == label]
        count = block[0]["n_scenes"]
        lines.append(f"{titles[group].format(label)} ({count} scenes, "
                     f"{block[0]['n_sources']} sources)")
        lines.append(header)
        for row in block:
            cells = "".join(f"{_cell(row.get(key), spec):>8}" for _, key, spec in _COLUMNS)
            lines.append(f"{_SHORT_LABELS[row['method']]:<9}{cells}")
        lines.append("")
    return "\n".join(lines)


def format_paired(paired: list[dict[str, Any]]) -> str:
    """The paired test of the learned row against each classical row, one line each."""
    lines = ["paired test on the same scenes (exact McNemar, two-sided):"]
    for test in paired:
        lines.append(
            f"  learned {test['success']:.3f} vs {_SHORT_LABELS[test['versus']]:<8}"
            f"{test['versus_success']:.3f}: only learned {test['learned_only']}, only "
            f"{_SHORT_LABELS[test['versus']]} {test['versus_only']}, p = {test['p_value']:.2g}")
    return "\n".join(lines)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    path.write_text(buffer.getvalue())


def _write_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """RMSE of azimuth, elevation and range against the SNR bin centre, with the CRB line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    snr_rows = [r for r in rows if r["group"] == "snr"]
    bins = list(dict.fromkeys(r["bin"] for r in snr_rows))
    centres = [sum(float(x) for x in b.split("..")) / 2 for b in bins]
    figure, axes = pyplot.subplots(1, 3, figsize=(14, 4.2))
    panels = (("rmse_azimuth_deg", "azimuth RMSE (deg)"),
              ("rmse_elevation_deg", "elevation RMSE (deg)"),
              ("rmse_range_m", "range RMSE (m)"))
    styles = {"learned": "o-", "samp": "s-", "pursuit": "^-", "sbl": "v-", "oracle": "d-",
              "crb": "k--"}
    for axis, (key, title) in zip(axes, panels):
        for method, style in styles.items():
            values = []
            for b in bins:
                match = [r.get(key) for r in snr_rows if r["method"] == method and r["bin"] == b]
                value = match[0] if match else None
                values.append(value if value is not None and value > 0 else math.nan)
            label = "sqrt(CRB)" if method == "crb" else _SHORT_LABELS[method]
            axis.semilogy(centres, values, style, label=label)
        axis.set_xlabel("SNR (dB, bin centre)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


@app.command()
def evaluate(
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", "-c", dir_okay=False,
                     help="Checkpoint written by `hpo train` (checkpoint.pt or best.pt)."),
    ] = None,
    from_best: Annotated[
        bool, typer.Option("--from-best", help="Use the checkpoint of the study's best trial.")
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option("--storage", help="Store URL for --from-best [default: $HPO_STORAGE, "
                     "else sqlite:///hpo.db].", show_default=False),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study for --from-best [default: the only one].")
    ] = None,
    scenes: Annotated[
        int, typer.Option("--scenes", min=1, help="Fresh test scenes to evaluate.")
    ] = 2000,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Evaluation seed: picks the test scenes (0 = the test "
                          "split itself); the same seed gives the same scenes and table.")
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", file_okay=False, help="Directory for evaluation.csv, "
                     "evaluation.json, scenes.jsonl (every scene's truth and estimates) and "
                     "rmse_vs_snr.png [default: <checkpoint dir>/evaluate-seed<S>-n<scenes>]."),
    ] = None,
    device: Annotated[
        Device, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")
    ] = Device.auto,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of the tables.")
    ] = False,
    range_for_success: Annotated[
        bool | None,
        typer.Option("--range-for-success/--peak-range", show_default=False,
                     help="sbl_count models: choose each source's range for the success box, "
                     "or keep the likelihood's peak as SBL's row does [default: the "
                     "checkpoint's range_for_success, on unless it was trained with it off]."),
    ] = None,
) -> None:
    """Evaluate a trained model on fresh test scenes against the references, per SNR bin and K."""
    path = _resolve_checkpoint(checkpoint, from_best, storage, study)
    model, config, deployment, torch_device = _load(path, device.value)
    if range_for_success is not None:
        if config.model != "sbl_count":
            fail(f"--range-for-success/--peak-range apply to sbl_count models, but this "
                 f"checkpoint's model is {config.model!r}", EXIT_USAGE)
        from pipeline import replace

        config = replace(config, range_for_success=range_for_success)
        model.config = config
    # Checked before the (minutes of) work, after the cheap checks, so no empty directory is
    # left behind for a bad checkpoint.
    run_dir = out or path.parent / f"evaluate-seed{seed}-n{scenes}"
    _prepare_out(run_dir)

    def progress(done: int, total: int) -> None:
        if not as_json:
            typer.echo(f"\r{done}/{total} scenes", err=True, nl=done >= total)

    if not as_json:
        typer.echo(f"evaluating {path} on {scenes} test scenes (seed {seed}) on {torch_device}")
    from pipeline import evaluate_model

    started = time.perf_counter()
    try:
        result = evaluate_model(model, config, deployment, n_scenes=scenes, seed=seed,
                                progress=progress)
    except PipelineError as error:
        fail(f"{type(error).__name__}: {_first_line(error)}", EXIT_INCOMPLETE)
    elapsed = time.perf_counter() - started
    payload = {
        "checkpoint": str(path), "n_scenes": result.n_scenes, "seed": result.seed,
        "device": str(torch_device), "seconds": {"total": elapsed, **result.seconds},
        "methods": METHODS, "rows": result.rows, "paired": result.paired, "config": result.config,
    }  # fmt: skip
    _write_results(run_dir, payload, result)
    if as_json:
        typer.echo(json.dumps(payload))
        return
    typer.echo(format_tables(result.rows))
    typer.echo("errors in deg / m; r/r: RMSE of range error relative to r; inl: RMSE of the "
               "pairs within 3 deg / 3 deg / 0.5 m; /crb: RMSE / sqrt(CRB) of the same pairs")
    typer.echo(format_paired(result.paired))
    typer.echo(f"{elapsed:.1f} s; wrote {run_dir / CSV_NAME}, {run_dir / JSON_NAME}, "
               f"{run_dir / SCENES_NAME}, {run_dir / PLOT_NAME}")


def _load(path: Path, device: str) -> tuple[Any, Any, Any, Any]:
    """(model, config, deployment, device) from a checkpoint, or one line and exit 2."""
    from pipeline import load_model, resolve_device

    try:
        torch_device = resolve_device(device)
        model, config, deployment = load_model(path, torch_device)
    except PipelineError as error:
        fail(_first_line(error), EXIT_USAGE)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        # A checkpoint of an older model: load_state_dict lists every mismatched tensor.
        fail(f"checkpoint {path} does not fit this version of the model: {_first_line(error)}",
             EXIT_USAGE)
    return model, config, deployment, torch_device


def _write_results(run_dir: Path, payload: dict[str, Any], result: Any) -> None:
    """evaluation.json, scenes.jsonl, evaluation.csv and the plot; one line and exit 1 if not."""
    try:
        (run_dir / JSON_NAME).write_text(json.dumps(payload, indent=1))
        (run_dir / SCENES_NAME).write_text(
            "".join(json.dumps(record) + "\n" for record in result.scenes))
        _write_csv(result.rows, run_dir / CSV_NAME)
        _write_plot(result.rows, run_dir / PLOT_NAME)
    except OSError as error:
        fail(f"cannot write the results to {run_dir}: {error.strerror or error}", EXIT_INCOMPLETE)
