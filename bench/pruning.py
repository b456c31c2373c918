"""Pruning pays: epochs trained and best objective with and without a pruner.

Studies of the same preset, seed, sampler and budget through the real `hpo run`, one per pruner
(`--pruner none` last, as the reference); each gets a fresh SQLite store. Reports finished/pruned
counts, epochs trained (intermediate values stored), the best objective, the wall time, and for
each pruner the ratio of `none`'s epochs to its own. Target (issue 7): at least 3x fewer epochs
for an equal best objective. From the `none` run's full curves it also reports what any pruner
has to go on: how well each epoch's objective ranks the trials as the final one does (Spearman),
and where the five best final trials ranked after epochs 1 and 3.

    python bench/pruning.py [--preset quick] [--trials 60] [--workers 2] [--seed 0]
                            [--pruners hyperband asha median] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(values)))


def early_epochs_predict(trials: list[optuna.trial.FrozenTrial]) -> dict:
    """How well each epoch's objective ranks the trials as their final objective does (Spearman
    rank correlation over the complete trials of the `none` run), and where the 5 best final
    trials ranked after epochs 1 and 3 (0 = best): what any rank-based pruner sees."""
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    epochs = min(len(t.intermediate_values) for t in complete)
    final = _ranks([t.value for t in complete])
    spearman = {}
    for epoch in range(1, epochs + 1):
        at = _ranks([t.intermediate_values[epoch] for t in complete])
        spearman[epoch] = round(float(np.corrcoef(at, final)[0, 1]), 2)
    best = np.argsort(final)[:5]
    ranks_at = {
        epoch: [int(_ranks([t.intermediate_values[epoch] for t in complete])[i]) for i in best]
        for epoch in (1, 3)
        if epoch <= epochs
    }
    return {"trials": len(complete), "spearman_epoch_vs_final": spearman,
            "ranks_of_5_best_finals_at_epoch": ranks_at}  # fmt: skip


def run(pruner: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'pruning.db'}"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPO_STORAGE": "", "TZ": "UTC"}
        command = [sys.executable, "-m", "hpo.cli", "run", "--trials", str(args.trials),
                   "--preset", args.preset, "--pruner", pruner, "--seed", str(args.seed),
                   "--workers", str(args.workers), "--device", "cpu", "--storage", url,
                   "--study", "pruning", "--quiet"]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                                check=False)  # fmt: skip
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"hpo run failed: {result.stderr.strip()}")
        study = optuna.load_study(study_name="pruning", storage=url)
        trials = study.get_trials(deepcopy=False)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            optuna.copy_study(from_study_name="pruning", from_storage=url,
                              to_storage=f"sqlite:///{args.keep / f'{pruner}-seed{args.seed}.db'}")
        extra = {"early_epochs": early_epochs_predict(trials)} if pruner == "none" else {}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: the launcher's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruners", nargs="+", default=["hyperband"],
                        help="pruners to compare with --pruner none")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", type=Path, help="keep each run's study here (SQLite files)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for pruner in [*args.pruners, "none"]:
        rows.append(run(pruner, args))
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[-1]
    for row in rows[:-1]:
        row["epochs_ratio_none_over_pruner"] = round(
            reference["epochs_trained"] / max(1, row["epochs_trained"]), 2)
        row["best_minus_none_best"] = round(row["best_value"] - reference["best_value"], 4)
        print(json.dumps({k: row[k] for k in ("pruner", "epochs_ratio_none_over_pruner",
                                               "best_value", "best_minus_none_best")}))
    print(json.dumps({"target": "epochs ratio >= 3 for an equal best", "seed": args.seed,
                      "trials": args.trials, "preset": args.preset}))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
