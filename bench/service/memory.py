"""A worker's resident memory across trials: no growth from one trial to the next.

Runs the real `hpo run --trials N --workers 1` (fresh SQLite store, no pruning) and samples the
worker process's resident set size (VmRSS from /proc) while counting finished trials in the store;
the worker is the process its trials name (`worker_pid`), whether forked from the fork server or
started as a fresh interpreter. Also its private memory (USS: pages not shared with the fork
server or anyone else, from /proc/PID/smaps_rollup).
Reports the RSS once 5, 10, 20, 30, 40 and 49 trials have finished (the worker is recycled after
its 50th by design, so 49 is the last count it lives to see finished with certainty) and the
growth from 5 to the last.  Target (issue 7): within 10 %.

    python -m bench memory [--preset smoke] [--epochs 1] [--trials 50]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from bench import _harness as harness
from hpo.testing import environment


def _memory_mib(pid: int) -> tuple[float, float] | None:
    """(RSS, USS) of `pid` in MiB, or None if it is gone."""
    try:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    harness.header(args)
    marks = [m for m in (5, 10, 20, 30, 40, 49) if m < args.trials]
    with (tempfile.TemporaryDirectory() as tmp,
          harness.sqlite_store(Path(tmp), "memory.db") as url):
        driver = subprocess.Popen(
            [sys.executable, "-m", "hpo.cli", "run", "--trials", str(args.trials), "--preset",
             args.preset, "--epochs", str(args.epochs), "--pruner", "none", "--workers", "1",
             "--device", "cpu", "--storage", url, "--study", "memory", "--quiet"],
            cwd=tmp, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        rss_at: dict[int, float] = {}
        uss_at: dict[int, float] = {}
        worker_pid = None
        finished = 0
        while driver.poll() is None:
            try:
                trials = optuna.load_study(study_name="memory", storage=url).get_trials(
                    deepcopy=False
                )
            except KeyError:  # the study does not exist yet
                trials = []
            if worker_pid is None and trials and "worker_pid" in trials[0].user_attrs:
                worker_pid = trials[0].user_attrs["worker_pid"]
            finished = sum(t.state.is_finished() for t in trials)
            # Only while the first worker owns the trials: after its 50th it is recycled.
            own = all(t.user_attrs.get("worker_pid", worker_pid) == worker_pid for t in trials)
            memory = _memory_mib(worker_pid) if worker_pid and own else None
            reached = [m for m in marks if m <= finished]
            if memory is not None and reached:
                # The last sample from that count up to the next mark (trials of a fraction of
                # a second can finish between two samples).
                rss_at[reached[-1]], uss_at[reached[-1]] = memory
            time.sleep(0.2)
        if driver.returncode != 0:
            raise SystemExit(f"hpo run failed: {driver.stderr.read().strip()}")
    first, last = rss_at.get(marks[0]), rss_at.get(max(rss_at)) if rss_at else None
    harness.emit({
        "preset": args.preset, "epochs": args.epochs, "trials": args.trials,
        "worker_pid": worker_pid,
        "rss_mib_after_finished": {str(k): round(v, 1) for k, v in sorted(rss_at.items())},
        "uss_mib_after_finished": {str(k): round(v, 1) for k, v in sorted(uss_at.items())},
        "growth_from_5_to_last": round(last / first - 1, 4) if first and last else None,
        "uss_growth_from_5_to_last": round(uss_at[max(uss_at)] / uss_at[marks[0]] - 1, 4)
        if uss_at and marks[0] in uss_at else None,
        "target": "within 10 %",
    })
