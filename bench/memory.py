"""A worker's resident memory across trials: no growth from one trial to the next.

Runs the real `hpo run --trials N --workers 1` (fresh SQLite store, no pruning) and samples the
worker process's resident set size (VmRSS from /proc) while counting finished trials in the store.
Reports the RSS once 5, 10, 20, 30, 40 and 49 trials have finished (the worker is recycled after
its 50th by design, so 49 is the last count it lives to see finished with certainty) and the
growth from 5 to the last.  Target (issue 7): within 10 %.

    python bench/memory.py [--preset smoke] [--epochs 1] [--trials 50]
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


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    marks = [m for m in (5, 10, 20, 30, 40, 49) if m < args.trials]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'memory.db'}"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPO_STORAGE": "", "TZ": "UTC"}
        driver = subprocess.Popen(
            [sys.executable, "-m", "hpo.cli", "run", "--trials", str(args.trials), "--preset",
             args.preset, "--epochs", str(args.epochs), "--pruner", "none", "--workers", "1",
             "--device", "cpu", "--storage", url, "--study", "memory", "--quiet"],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rss_at: dict[int, float] = {}
        worker_pid = None
        finished = 0
        while driver.poll() is None:
            workers = _children(driver.pid)
            if workers:
                if worker_pid is None:
                    worker_pid = workers[0]
                rss = _rss_mib(worker_pid) if worker_pid in workers else None
                try:
                    study = optuna.load_study(study_name="memory", storage=url)
                    finished = sum(t.state.is_finished()
                                   for t in study.get_trials(deepcopy=False))
                except KeyError:  # the study does not exist yet
                    finished = 0
                if rss is not None and finished in marks:
                    rss_at[finished] = rss  # the last sample at that count
            time.sleep(0.2)
        if driver.returncode != 0:
            raise SystemExit(f"hpo run failed: {driver.stderr.read().strip()}")
    first, last = rss_at.get(marks[0]), rss_at.get(max(rss_at)) if rss_at else None
    print(json.dumps({
        "preset": args.preset, "epochs": args.epochs, "trials": args.trials,
        "worker_pid": worker_pid,
        "rss_mib_after_finished": {str(k): round(v, 1) for k, v in sorted(rss_at.items())},
        "growth_from_5_to_last": round(last / first - 1, 4) if first and last else None,
        "target": "within 10 %",
    }))


if __name__ == "__main__":
    main()
