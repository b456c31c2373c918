"""What one trial costs the study store: round trips, commits and CPU, per trial and per epoch.

One worker (`hpo._worker`, in this process, the real loop: claim, suggest, start attributes,
per-epoch reports and pruning questions, end attributes and tell, checkpoint pruning) runs
`--trials` trials of a preset against a fresh PostgreSQL database, with `hpo run`'s sampler
and pruner. Counted from SQLAlchemy's events: statements sent, connection checkouts (each one a
pre-ping round trip while pre-ping is on) and commits. Measured: the worker's CPU seconds outside
training (its process CPU minus every trial's `train_cpu_s`: suggesting, claiming, attribute
writes, reports, pruning questions, tells, checkpoints) and the PostgreSQL server's CPU seconds,
both per trial. The 8-worker end-to-end share is bench/overhead.py's; this one says where it
comes from and what a change to the store traffic saves.

    python bench/store_traffic.py [--trials 30] [--preset quick] [--pruner hyperband]
                                  [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy
from overhead import _postgres_cpu_s, postgres_store  # bench/overhead.py
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _kind(statement: str) -> str:
    words = statement.split()
    verb = words[0].upper() if words else "?"
    if verb in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        return verb
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--pruner", default="hyperband")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    import optuna

    from hpo._search_space import load_space
    from hpo._study import (
        OBJECTIVES,
        REDUCTION_FACTOR,
        RequeueStaleTrial,
        StudySettings,
        create_or_load_study,
    )
    from hpo._worker import WorkerSpec, _Signals, _Worker
    from pipeline import preset
    from storage import open_storage

    counts: collections.Counter[str] = collections.Counter()

    @event.listens_for(sqlalchemy.engine.Engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, parameters, context, executemany):
        counts[_kind(statement)] += 1

    @event.listens_for(sqlalchemy.engine.Engine, "commit")
    def _commit(conn):
        counts["commits"] += 1

    @event.listens_for(sqlalchemy.pool.Pool, "checkout")
    def _checkout(*_):
        counts["checkouts"] += 1

    base = preset(args.preset)
    space = load_space(None, base)
    objective = "composite"
    with postgres_store(args.postgres) as url, tempfile.TemporaryDirectory() as tmp:
        os.environ["HPO_STORAGE"] = url
        store = open_storage(url, stale_trial_callback=RequeueStaleTrial())
        settings = StudySettings(preset=args.preset, objective=objective,
                                 direction=OBJECTIVES[objective], epochs=base.epochs)
        create_or_load_study(store, "traffic", settings, budget=args.trials,
                             space=space.to_dict())
        spec = WorkerSpec(
            study="traffic", budget=args.trials, preset=args.preset, epochs=base.epochs,
            objective=objective, pruner=args.pruner, sampler=args.sampler,
            sampler_seed=args.seed, space=space.to_dict(), device="cpu", threads=1, index=0,
            parent_pid=os.getpid(), checkpoint_dir=str(Path(tmp) / "checkpoints"),
            reduction_factor=REDUCTION_FACTOR,
        )
        worker = _Worker(spec, _Signals())
        counts.clear()
        pg_before, cpu_before, began = _postgres_cpu_s(), time.process_time(), time.perf_counter()
        worker.loop()
        wall = time.perf_counter() - began
        cpu = time.process_time() - cpu_before
        pg = _postgres_cpu_s() - pg_before
        trials = worker.study.get_trials(deepcopy=False)
        epochs = sum(len(t.intermediate_values) for t in trials)
        train_cpu = sum(t.user_attrs.get("train_cpu_s", 0.0) for t in trials)
        states = collections.Counter(t.state.name for t in trials)
    n = len(trials)
    result = {
        "trials": n,
        "states": dict(states),
        "epochs": epochs,
        "wall_s": round(wall, 1),
        "statements_per_trial": round(sum(counts[k] for k in
                                          ("SELECT", "INSERT", "UPDATE", "DELETE", "other")) / n, 1),
        **{f"{k.lower()}_per_trial": round(counts[k] / n, 1)
           for k in ("SELECT", "INSERT", "UPDATE", "DELETE")},
        "commits_per_trial": round(counts["commits"] / n, 1),
        "checkouts_per_trial": round(counts["checkouts"] / n, 1),
        "worker_cpu_outside_training_ms_per_trial": round(1000 * (cpu - train_cpu) / n, 1),
        "postgres_cpu_ms_per_trial": round(1000 * pg / n, 1),
        "training_cpu_s_per_trial": round(train_cpu / n, 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "optuna": optuna.__version__,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
