"""The HPO service's own overhead: the share of the run's time not spent training.

For each store (SQLite file, PostgreSQL database) and each worker count, a fresh store gets one
`hpo run --trials N` through the real CLI (by default the `quick` preset with `hpo run`'s own
sampler and pruner, TPE and Hyperband). Each trial records its training time (`train_time_s`,
around `pipeline.train`), the service's share of it (`service_time_s`: per-epoch reports, pruning
questions and checkpoint writes) and the worker's CPU seconds training without that share
(`train_cpu_s`). Reported:

    share_wall  = 1 - sum(train - service) / (W * wall)
                  of all worker time (W workers for the whole run), the share not training:
                  start-up, claims, suggesting, reports, checkpoints, tells, and workers idling
                  at the start and end of the run
    share_cpu   = 1 - sum(train_cpu) / (C * wall), C = min(cores, W x threads)
                  of the cores' time, the share not training; on a CPU with more workers than
                  cores this is the share that counts (an idle worker's core is not lost while
                  another worker uses it). Split into: `hpo run`'s processes outside training
                  (launcher, fork server, workers' start-up, sampler, store traffic,
                  checkpoints; sampled from /proc every second), the PostgreSQL server's
                  processes, idle cores, and the rest of the machine (other services, kernel)
    startup_s   = launch -> first trial starts  (interpreter, imports, store, fork server)
    tail_s      = last trial recorded -> `hpo run` has exited
    service_ms  = per trial, the service's share of training (reports, pruning, checkpoints)

Each store is fresh: a SQLite file in the run's temporary directory, or a new PostgreSQL database
on the server $HPO_TEST_POSTGRES names (an admin URL; by default the local one scripts/test.sh
starts), dropped afterwards. One JSON line per measurement; a Markdown table of them on stderr.

    python -m bench overhead [--trials 24] [--workers 1 2 4] [--stores sqlite postgresql]
                             [--preset quick] [--epochs E] [--sampler tpe] [--pruner hyperband]
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

from bench import _harness as harness
from hpo.testing import environment


class _TreeCPU:
    """CPU seconds of a process and all its descendants (the launcher, the fork server, the
    workers), sampled every second from /proc: a process's last sample before it exits counts."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, float] = {}
        self.parent: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for pid, _, fields in harness.processes():
            parents[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime stime
        tree = {self.root}
        grew = True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree & cpu.keys():
            self.seen[pid] = max(self.seen.get(pid, 0.0), cpu[pid])
            self.parent[pid] = parents[pid]

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())

    def by_role(self) -> dict[str, float]:
        """CPU seconds of the launcher (`hpo run` itself), of the processes that start workers
        (the fork server and its helpers: children of the launcher that are not workers) and of
        the workers (the rest: the processes that ran trials, forked from the fork server or
        started as fresh interpreters)."""
        children = {pid for pid, parent in self.parent.items() if parent == self.root}
        starters = {pid for pid in children if pid in self.parent.values()}
        roles = {"launcher": 0.0, "starter": 0.0, "workers": 0.0}
        for pid, cpu in self.seen.items():
            role = ("launcher" if pid == self.root else
                    "starter" if pid in starters else
                    "workers")
            roles[role] += cpu
        return roles


def _idle_cpu_s() -> float:
    """Idle CPU seconds of the whole machine so far (idle + iowait, all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, workers: int, trials: int, cwd: Path, args: argparse.Namespace) -> dict:
    env = environment()  # no GPU, no store URL from the caller's environment, UTC
    command = [
        sys.executable, "-m", "hpo.cli", "run", "--trials", str(trials), "--preset", args.preset,
        "--pruner", args.pruner, "--sampler", args.sampler, "--seed", "0",
        "--workers", str(workers), "--device", "cpu", "--storage", url, "--study", "bench",
        "--quiet",
    ]  # fmt: skip
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    launched = time.time()
    pg_before, idle_before = harness.postgres_cpu_s(), _idle_cpu_s()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    tree = _TreeCPU(process.pid)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    hpo_cpu = tree.stop()
    roles = tree.by_role()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    pg_cpu, idle = harness.postgres_cpu_s() - pg_before, _idle_cpu_s() - idle_before
    if result.returncode != 0:
        raise SystemExit(f"hpo run failed ({result.returncode}): {result.stderr.strip()}")
    study = optuna.load_study(study_name="bench", storage=url)
    done = study.get_trials(deepcopy=False)
    assert len(done) == trials, len(done)
    train = sum(t.user_attrs["train_time_s"] for t in done)
    service = sum(t.user_attrs["service_time_s"] for t in done)
    train_cpu = sum(t.user_attrs["train_cpu_s"] for t in done)
    threads = done[0].user_attrs["threads"]
    cores = min(len(os.sched_getaffinity(0)), workers * threads)
    in_worker = sum(t.user_attrs["wall_time_s"] for t in done)
    first_start = min(t.user_attrs["started_unix"] for t in done)
    last_end = max(
        calendar.timegm(t.datetime_complete.timetuple()) + t.datetime_complete.microsecond / 1e6
        for t in done
    )  # naive UTC
    span = last_end - first_start
    return {
        "workers": workers,
        "trials": trials,
        "wall_s": round(wall, 2),
        "train_s_total": round(train, 2),
        "train_s_per_trial": round(train / trials, 3),
        "overhead_s": round((wall - train / workers) / trials, 3),
        "worker_s": round((workers * wall - train) / trials, 3),
        "in_trial_overhead_s": round((in_worker - train) / trials, 3),
        "startup_s": round(first_start - launched, 2),
        "tail_s": round(launched + wall - last_end, 2),
        "loop_ms": round(1000 * (workers * span - train) / trials, 1),
        "service_ms": round(1000 * service / trials, 1),
        "epochs": sum(len(t.intermediate_values) for t in done),
        "cores": cores,
        # Share of all worker time (start-up and tail included) not spent training.
        "share_wall": round(1 - (train - service) / (workers * wall), 4),
        # Share of the cores' time not spent training, and what it went to: `hpo run`'s own
        # processes outside training (launcher, fork server, workers' start-up, sampler, store
        # traffic, checkpoints), the database server, idle cores, and the rest of the machine
        # (other services, the kernel).
        "share_cpu": round(1 - train_cpu / (cores * wall), 4),
        "cpu_train_s": round(train_cpu, 1),
        "cpu_hpo_other_s": round(hpo_cpu - train_cpu, 1),
        # ...of which the launcher's, the fork server's, and the workers' outside training
        "cpu_launcher_s": round(roles["launcher"], 1),
        "cpu_starter_s": round(roles["starter"], 1),
        "cpu_workers_other_s": round(roles["workers"] - train_cpu, 1),
        "cpu_postgres_s": round(pg_cpu, 1),
        "cpu_idle_s": round(idle, 1),
        "cpu_rest_s": round(len(os.sched_getaffinity(0)) * wall - idle - pg_cpu - hpo_cpu, 1),
    }


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"],
                        help="a fresh store of each kind for each measurement "
                             "(PostgreSQL: on the server $HPO_TEST_POSTGRES names)")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--epochs", type=int, default=0, help="0: the preset's")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--pruner", default="hyperband")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    harness.header(args)

    rows = []
    for store in args.stores:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                cwd = Path(tmp)
                maker = (harness.sqlite_store(cwd) if store == "sqlite" else
                         harness.postgres_store())
                with maker as url:
                    row = {"store": store, "preset": args.preset, "sampler": args.sampler,
                           "pruner": args.pruner,
                           **measure(url, workers, args.trials, cwd, args)}
            rows.append(row)
            harness.emit(row)

    header = ("store", "preset", "workers", "cores", "trials", "epochs", "wall_s",
              "train_s_per_trial", "service_ms", "startup_s", "tail_s", "share_wall",
              "share_cpu", "cpu_train_s", "cpu_hpo_other_s", "cpu_launcher_s", "cpu_starter_s",
              "cpu_workers_other_s", "cpu_postgres_s", "cpu_idle_s", "cpu_rest_s")  # fmt: skip
    harness.note("| " + " | ".join(header) + " |")
    harness.note("|" + "---|" * len(header))
    for row in rows:
        harness.note("| " + " | ".join(str(row[key]) for key in header) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
