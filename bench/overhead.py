"""The HPO service's own overhead: wall time of `hpo run` not spent inside training, per trial.

For each store (SQLite file, PostgreSQL database) and each worker count, a fresh store gets one
`hpo run --trials N` of short trials (smoke preset, 1 epoch, no pruning), run through the real
CLI. Training time is what the workers measured around `pipeline.train` (the trial attribute
`train_time_s`). Reported per trial:

    overhead_s    = (wall - sum(train) / W) / N   wall-clock seconds per trial not training
    worker_s      = (W * wall - sum(train)) / N   worker-seconds per trial not training (= W x above)
    startup_s     = launch -> first trial starts  (interpreter, torch and optuna imports, store)
    tail_s        = last trial recorded -> `hpo run` has exited
    loop_ms       = per trial, worker time between the first trial's start and the last one's end
                    not spent training: claim, suggest, reports, tell, idling at the end

What the overhead holds: process start-up, opening the store, the claim (lock, count, ask),
suggesting, per-epoch reports and attributes, the final tell, and workers idling at the end while
the last trials finish. With W workers on fewer cores the training time itself grows; the
overhead formulae use the measured training time, so that growth is not counted as overhead.

    python bench/overhead.py [--trials 24] [--workers 1 2 4] [--stores sqlite postgresql]
                             [--preset smoke] [--epochs 1]
                             [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
from sqlalchemy.engine import make_url


@contextlib.contextmanager
def sqlite_store(directory: Path) -> Iterator[str]:
    yield f"sqlite:///{directory / 'bench.db'}"


@contextlib.contextmanager
def postgres_store(admin_url: str) -> Iterator[str]:
    admin = make_url(admin_url).set(drivername="postgresql")
    connection = psycopg2.connect(admin.render_as_string(hide_password=False))
    connection.autocommit = True
    name = f"hpo_bench_{secrets.token_hex(4)}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(admin_url).set(drivername="postgresql+psycopg2", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()


def measure(url: str, workers: int, trials: int, cwd: Path, preset: str = "smoke",
            epochs: int = 1) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPO_STORAGE": "", "TZ": "UTC"}
    args = [
        sys.executable, "-m", "hpo.cli", "run", "--trials", str(trials), "--preset", preset,
        "--epochs", str(epochs), "--pruner", "none", "--sampler", "random", "--seed", "0",
        "--workers", str(workers), "--device", "cpu", "--storage", url, "--study", "bench",
        "--quiet",
    ]  # fmt: skip
    launched = time.time()
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"hpo run failed ({result.returncode}): {result.stderr.strip()}")
    study = optuna.load_study(study_name="bench", storage=url)
    done = study.get_trials(deepcopy=False)
    assert len(done) == trials, len(done)
    train = sum(t.user_attrs["train_time_s"] for t in done)
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
        # Share of all worker time (start-up and tail included) not spent training.
        "overhead_share": round((workers * wall - train) / (workers * wall), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "HPO_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin URL; a fresh database is created (and dropped) for each measurement",
    )
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    rows = []
    for store in args.stores:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                cwd = Path(tmp)
                maker = sqlite_store(cwd) if store == "sqlite" else postgres_store(args.postgres)
                with maker as url:
                    row = {"store": store, "preset": args.preset, "epochs": args.epochs,
                           **measure(url, workers, args.trials, cwd, args.preset, args.epochs)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    print(
        f"cpus {os.cpu_count()}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}, optuna {optuna.__version__}"
    )
    header = ("store", "preset", "epochs", "workers", "trials", "wall_s", "train_s_per_trial",
              "overhead_s", "worker_s", "startup_s", "tail_s", "loop_ms",
              "overhead_share")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in header) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
