"""Pruning pays: epochs trained and best objective with and without the pruner.

Two studies of the same preset, seed, sampler and budget through the real `hpo run`, one with
`--pruner hyperband` (the default) and one with `--pruner none`; each gets a fresh SQLite store.
Reports finished/pruned counts, epochs trained (intermediate values stored), the best objective
and the wall time. Target (issue 7): at least 3x fewer epochs for an equal best objective.

    python bench/pruning.py [--preset quick] [--trials 60] [--workers 2] [--seed 0]
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

import optuna


def run(pruner: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'pruning.db'}"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPO_STORAGE": "", "TZ": "UTC"}
        command = [sys.executable, "-m", "hpo.cli", "run", "--trials", str(args.trials),
                   "--preset", args.preset, "--pruner", pruner, "--seed", str(args.seed),
                   "--workers", str(args.workers), "--device", "cpu", "--storage", url,
                   "--study", "pruning", "--quiet"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True,
                                check=False)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"hpo run failed: {result.stderr.strip()}")
        study = optuna.load_study(study_name="pruning", storage=url)
        trials = study.get_trials(deepcopy=False)
        states = [t.state.name for t in trials]
        return {
            "pruner": pruner, "trials": len(trials), "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "epochs_trained": sum(len(t.intermediate_values) for t in trials),
            "best_value": round(study.best_value, 4), "best_trial": study.best_trial.number,
            "wall_s": round(wall, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: the launcher's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = [run(pruner, args) for pruner in ("hyperband", "none")]
    for row in rows:
        print(json.dumps(row))
    ratio = rows[1]["epochs_trained"] / max(1, rows[0]["epochs_trained"])
    print(json.dumps({"epochs_ratio_none_over_hyperband": round(ratio, 2), "target": ">= 3",
                      "best_hyperband": rows[0]["best_value"], "best_none": rows[1]["best_value"]}))


if __name__ == "__main__":
    main()
