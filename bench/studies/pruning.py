"""Pruning pays: epochs trained and best objective with and without a pruner.

Studies of the same preset, seed, sampler and budget through the real `hpo run`, one per pruner
(`--pruner none` last, as the reference); each gets a fresh SQLite store. A pruner is a name of
`hpo run --pruner`, or NAME:ETA for hyperband and asha with `--reduction-factor ETA`. Reports
finished/pruned counts, epochs trained (intermediate values stored), the best objective, the wall
time, and for each pruner the ratio of `none`'s epochs to its own.

The best objective of a study is the lowest of many noisy validation scores (128 scenes for
`quick`), so it is biased low by the selection itself; what a user gets is the best trial's model.
So the bench also scores each study's best trial (its kept final checkpoint) on `--test-scenes`
held-out test scenes that no trial saw: the same composite, on a set 8x larger. And it measures
the noise floor of the objective: `--replicas R` retrains the `none` run's best trial R times with
its learning rate nudged by 0.1 %, 0.2 %, ... (same data, same initial weights; only training's
chaos differs) and reports each replica's validation and test composite.

Target (issue 7): at least 3x fewer epochs for an equal best objective. From the `none` run's
full curves it also reports what any pruner has to go on: how well each epoch's objective ranks
the trials as the final one does (Spearman), where the five best final trials ranked after epochs
1 and 3, which parameters make a fast start and which a good finish, and how each validation
metric at epochs 1-3 ranks the final objective.

    python -m bench pruning [--preset quick] [--trials 60] [--workers 2] [--seed 0]
                            [--pruners hyperband asha:4 median] [--test-scenes 1024] [--replicas 4]
                            [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from bench import _harness as harness
from bench.studies._ranks import ranks, spearman
from hpo import ATTR_CHECKPOINT
from hpo.testing import environment


def early_epochs_predict(trials: list[optuna.trial.FrozenTrial]) -> dict:
    """How well each epoch's objective ranks the trials as their final objective does (Spearman
    rank correlation over the complete trials of the `none` run), and where the 5 best final
    trials ranked after epochs 1 and 3 (0 = best): what any rank-based pruner sees."""
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    epochs = min(len(t.intermediate_values) for t in complete)
    final = ranks([t.value for t in complete])
    by_epoch = {}
    for epoch in range(1, epochs + 1):
        at = ranks([t.intermediate_values[epoch] for t in complete])
        by_epoch[epoch] = spearman(at, final)
    best = np.argsort(final)[:5]
    ranks_at = {
        epoch: [int(ranks([t.intermediate_values[epoch] for t in complete])[i]) for i in best]
        for epoch in (1, 3)
        if epoch <= epochs
    }
    # Which parameters make a fast start, and which a good finish: Spearman of each searched
    # parameter with the epoch-1 objective and with the final one.
    first = ranks([t.intermediate_values[1] for t in complete])
    params = {}
    for name in complete[0].params:
        ranked = ranks([t.params[name] for t in complete])
        params[name] = [spearman(ranked, first), spearman(ranked, final)]
    # Would another per-epoch metric rank better? Spearman of each validation metric at epochs
    # 1-3 with the final objective (accuracies negated, so that lower is better for all).
    metrics = {}
    for key in ("val_loss", "val_nmse", "k_accuracy", "rmse_azimuth_deg", "rmse_elevation_deg",
                "rmse_range_m", "success_rate"):  # fmt: skip
        sign = -1.0 if key in ("k_accuracy", "success_rate") else 1.0
        metrics[key] = [
            spearman(ranks([sign * t.user_attrs["history"][e][key] for t in complete]), final)
            for e in range(min(3, epochs))
        ]
    return {"trials": len(complete), "spearman_epoch_vs_final": by_epoch,
            "ranks_of_5_best_finals_at_epoch": ranks_at,
            "param_spearman_with_epoch1_and_final": params,
            "metric_spearman_epochs_1_3_with_final": metrics}  # fmt: skip


def test_composite(checkpoint: str, scenes: int) -> float:
    """The composite of a trained model on `scenes` held-out test scenes (MUSIC on all of them)."""
    import torch

    from pipeline import load_model, load_split, replace, validate

    model, config, deployment = load_model(Path(checkpoint), torch.device("cpu"))
    config = replace(config, n_val_localize=scenes)
    test = load_split(config, deployment, "test", scenes)
    return validate(model, test, config, deployment)["composite"]


def replicas(params: dict, args: argparse.Namespace) -> list[dict]:
    """The best trial's config trained again with lr x (1 + 0.001 k), k = 1..R: what the same
    trial would score had training's rounding gone another way."""
    import torch

    from pipeline import preset, replace, train

    base = replace(preset(args.preset), **params)
    rows = []
    for k in range(1, args.replicas + 1):
        config = replace(base, lr=base.lr * (1 + 1e-3 * k))
        with tempfile.TemporaryDirectory() as tmp:
            result = train(config, device=torch.device("cpu"), checkpoint_dir=Path(tmp))
            test = test_composite(str(result.checkpoint_path), args.test_scenes)
        rows.append({"lr_nudge": f"+{k / 10:g} %",
                     "val_composite": round(result.final.composite, 4),
                     "test_composite": round(test, 4)})  # fmt: skip
        harness.emit(rows[-1])
    return rows


def run(pruner: str, args: argparse.Namespace) -> dict:
    name, _, eta = pruner.partition(":")
    with (tempfile.TemporaryDirectory() as tmp,
          harness.sqlite_store(Path(tmp), "pruning.db") as url):
        command = [sys.executable, "-m", "hpo.cli", "run", "--trials", str(args.trials),
                   "--preset", args.preset, "--pruner", name, "--seed", str(args.seed),
                   "--workers", str(args.workers), "--device", "cpu", "--storage", url,
                   "--study", "pruning", "--quiet"]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        if eta:
            command += ["--reduction-factor", eta]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=tmp, env=environment(), capture_output=True,
                                text=True, check=False)  # fmt: skip
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"hpo run failed: {result.stderr.strip()}")
        study = optuna.load_study(study_name="pruning", storage=url)
        trials = study.get_trials(deepcopy=False)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            kept = args.keep / f"{name}{eta}-seed{args.seed}.db"
            optuna.copy_study(from_study_name="pruning", from_storage=url,
                              to_storage=f"sqlite:///{kept}")
        extra = {"early_epochs": early_epochs_predict(trials)} if name == "none" else {}
        best = study.best_trial
        checkpoint = best.user_attrs.get(ATTR_CHECKPOINT)
        if args.test_scenes and checkpoint:
            extra["best_trial_test_composite"] = round(test_composite(checkpoint,
                                                                      args.test_scenes), 4)
        if name == "none" and args.replicas:
            extra["replicas_of_best"] = replicas(best.params, args)
        states = [t.state.name for t in trials]
        stopped_after: dict[int, int] = {}
        for t in trials:
            steps = len(t.intermediate_values)
            stopped_after[steps] = stopped_after.get(steps, 0) + 1
        return {
            "pruner": pruner, "trials": len(trials), "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "epochs_trained": sum(len(t.intermediate_values) for t in trials),
            "trials_by_epochs_trained": dict(sorted(stopped_after.items())),
            "best_value": round(study.best_value, 4), "best_trial": study.best_trial.number,
            "wall_s": round(wall, 1), **extra,
        }  # fmt: skip


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: the launcher's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruners", nargs="+", default=["hyperband"],
                        help="pruners to compare with --pruner none")
    parser.add_argument("--test-scenes", type=int, default=1024,
                        help="held-out scenes to score each study's best trial on (0: none)")
    parser.add_argument("--replicas", type=int, default=0,
                        help="retrain the none run's best trial this many times (noise floor)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", type=Path, help="keep each run's study here (SQLite files)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    harness.header(args)
    rows = []
    for pruner in [*args.pruners, "none"]:
        rows.append(run(pruner, args))
        harness.emit(rows[-1])
    reference = rows[-1]
    for row in rows[:-1]:
        row["epochs_ratio_none_over_pruner"] = round(
            reference["epochs_trained"] / max(1, row["epochs_trained"]), 2)
        row["best_minus_none_best"] = round(row["best_value"] - reference["best_value"], 4)
        if "best_trial_test_composite" in row and "best_trial_test_composite" in reference:
            row["test_minus_none_test"] = round(row["best_trial_test_composite"]
                                                - reference["best_trial_test_composite"], 4)
        harness.emit({k: row.get(k) for k in ("pruner", "epochs_ratio_none_over_pruner",
                                              "best_value", "best_minus_none_best",
                                              "best_trial_test_composite",
                                              "test_minus_none_test")})
    harness.emit({"target": "epochs ratio >= 3 for an equal best", "seed": args.seed,
                  "trials": args.trials, "preset": args.preset})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
