"""What one trial costs the study store: round trips, commits and CPU, per trial and per epoch.

One worker (`hpo.WorkerLoop`, in this process, the real loop: claim, suggest, start attributes,
per-epoch reports and pruning questions, end attributes and tell, checkpoint pruning) runs
`--trials` trials of a preset against a fresh PostgreSQL database, with `hpo run`'s sampler
and pruner. Counted from SQLAlchemy's events: statements sent, connection checkouts (each one a
pre-ping round trip while pre-ping is on) and commits. Measured: the worker's CPU seconds outside
training (its process CPU minus every trial's `train_cpu_s`: suggesting, claiming, attribute
writes, reports, pruning questions, tells, checkpoints) and the PostgreSQL server's CPU seconds,
both per trial, and the worker's CPU by phase (claim, suggestion, attributes, epoch reports,
pruning questions, the end and tell, the rest). The 8-worker end-to-end share is
`python -m bench overhead`'s; this one says where it comes from and what a change to the store
traffic saves.

A fresh study is not what a worker meets late in a 200-trial study with 8 workers: `--history N`
first adds N finished trials shaped like hpo's (the preset's parameters drawn at random, per-epoch
values and `history`, the same attributes, completed rungs; 35 % complete, the rest stopped at a
rung), and `--others R` keeps R trials RUNNING beside the worker's, claimed and suggested as a
worker does, one epoch reported, their heartbeats kept (by a child process, not counted in this
one's CPU or statements). The worker's own trials are then measured against that state.

The database is a fresh one on the server $HPO_TEST_POSTGRES names (an admin URL; by default the
local one scripts/test.sh starts), dropped afterwards.

    python -m bench store_traffic [--trials 30] [--preset quick] [--pruner hyperband]
                                  [--history 0] [--others 0]
"""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event

from bench import _harness as harness


def _kind(statement: str) -> str:
    words = statement.split()
    verb = words[0].upper() if words else "?"
    if verb in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        return verb
    return "other"


class _Phases:
    """CPU seconds of this process by phase; a phase inside another counts to the outer one."""

    def __init__(self) -> None:
        self.cpu: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._depth = 0

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self._depth:
            yield
            return
        self._depth += 1
        began = time.process_time()
        try:
            yield
        finally:
            self.cpu[name] += time.process_time() - began
            self.calls[name] += 1
            self._depth -= 1


def _seed_history(store: Any, study_name: str, space: Any, base: Any, n: int, epochs: int,
                  pruner: str, eta: int, seed: int) -> None:
    """`n` finished trials shaped like a worker's (see the module docstring). A stopped trial
    stopped at one of the pruner's rung epochs, and has `completed_rung_k` for the k-th of them
    it reached: Hyperband's brackets would start some trials' rungs later, so the values the
    worker's trials compete with are this study's, not a real one's."""
    import random

    import optuna
    from optuna.trial import TrialState, create_trial

    from hpo import pruning_steps, suggest_config
    from pipeline import config_to_dict

    rng = random.Random(seed)
    study = optuna.load_study(study_name=study_name, storage=store)
    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rungs = sorted(s for s in (pruning_steps(pruner, epochs, eta) or ()) if s < epochs)
    for index in range(n):
        drawn = scratch.ask()
        config = suggest_config(drawn, space, base)
        last = epochs if rng.random() < 0.35 else rng.choice(rungs or [epochs])
        # Curves like quick's: 10-16 after epoch 1, falling to half to all of that by the end.
        start = 10.0 + 6.0 * rng.random()
        end = start * (0.5 + 0.5 * rng.random())
        values = {e: start + (end - start) * (e - 1) / max(epochs - 1, 1)
                  for e in range(1, last + 1)}
        history = [{"epoch": e, "train_loss": rng.random(), "train_terms": {
            k: rng.random() for k in ("cov", "k", "aux", "det", "gap")},
            **{k: rng.random() for k in ("val_loss", "val_nmse", "k_accuracy",
                                         "rmse_azimuth_deg", "rmse_elevation_deg",
                                         "rmse_range_m", "success_rate")},
            "composite": v, "lr": 1e-3, "seconds": 0.9} for e, v in values.items()]
        now = time.time()
        attrs = {
            "worker_pid": 1000 + index % 8, "host": platform.node(), "pid_space": "bench",
            "claimed_unix": now, "config": config_to_dict(config), "seed": config.seed,
            "worker_index": index % 8, "started_unix": now, "pruner": pruner,
            "reduction_factor": eta, "device": "cpu", "threads": 1, "retry_count": 0,
            "checkpoint_dir": f"/tmp/checkpoints/{index}", "history": history,
            "wall_time_s": 4.0, "train_time_s": 3.5, "service_time_s": 0.1,
            "train_cpu_s": 3.4, "metrics": history[-1],
        }
        complete = last == epochs
        attrs["checkpoint" if complete else "pruned_reason"] = (
            f"/tmp/checkpoints/{index}/final.pt" if complete else f"pruned at epoch {last}")
        study.add_trial(create_trial(
            state=TrialState.COMPLETE if complete else TrialState.PRUNED,
            value=values[last], params=drawn.params, distributions=drawn.distributions,
            user_attrs=attrs, intermediate_values=values,
            system_attrs={f"completed_rung_{k}": values[s]
                          for k, s in enumerate(rungs) if s <= last},
        ))


def _beat(url: str, trial_ids: list[int], interval_s: float) -> None:
    """Another process's heartbeats for `trial_ids`, until it is terminated."""
    from storage import open_storage

    store = open_storage(url)
    while True:
        time.sleep(interval_s)
        for trial_id in trial_ids:
            store.record_heartbeat(trial_id)


def _start_others(store: Any, url: str, study_name: str, plan: Any, space: Any, base: Any,
                  r: int, seed: int, heartbeat_s: float) -> Any:
    """`r` trials claimed, suggested and one epoch into training, as other workers leave them.
    Their heartbeats go on in a child process (the returned one, to terminate), so that neither
    this process's CPU nor its statement counts include them."""
    import multiprocessing

    import optuna

    from hpo import claim_trial, make_pruner, make_sampler, suggest_config
    from pipeline import config_to_dict
    from storage import batched_params, report_epoch, set_user_attrs, trial_id

    study = optuna.load_study(
        study_name=study_name, storage=store,
        sampler=make_sampler(plan.sampler, seed + 1),
        pruner=make_pruner(plan.pruner, base.epochs, plan.reduction_factor))
    trial_ids = []
    for index in range(r):
        trial = claim_trial(study)
        with batched_params(trial):
            config = suggest_config(trial, space, base)
        set_user_attrs(trial, {"config": config_to_dict(config), "seed": config.seed,
                               "worker_index": index + 1, "started_unix": time.time(),
                               "pruner": plan.pruner, "device": "cpu", "threads": 1,
                               "retry_count": 0})
        report_epoch(trial, 10.0, 1, {"history": [{"epoch": 1, "composite": 10.0}]})
        trial_ids.append(trial_id(trial))
    beating = multiprocessing.get_context("spawn").Process(
        target=_beat, args=(url, trial_ids, heartbeat_s), daemon=True)
    beating.start()
    return beating


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--pruner", default="hyperband")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--history", type=int, default=0,
                        help="finished trials in the study before the worker starts")
    parser.add_argument("--others", type=int, default=0,
                        help="trials kept RUNNING beside the worker's (other workers' claims)")
    args = parser.parse_args(argv)

    from hpo import (
        OBJECTIVES,
        REDUCTION_FACTOR,
        RequeueStaleTrial,
        StudySettings,
        StudySpec,
        WorkerLoop,
        WorkerSpec,
        create_or_load_study,
        load_space,
    )
    from pipeline import config_to_dict, preset
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
    harness.header(args)
    with harness.postgres_store() as url, tempfile.TemporaryDirectory() as tmp:
        os.environ["HPO_STORAGE"] = url
        store = open_storage(url, stale_trial_callback=RequeueStaleTrial())
        settings = StudySettings(preset=args.preset, objective=objective,
                                 direction=OBJECTIVES[objective], epochs=base.epochs)
        budget = args.history + args.others + args.trials
        plan = StudySpec(config=config_to_dict(base), space=space.to_dict(), pruner=args.pruner,
                         reduction_factor=REDUCTION_FACTOR, sampler=args.sampler)
        create_or_load_study(store, "traffic", settings, budget=budget, spec=plan)
        _seed_history(store, "traffic", space, base, args.history, base.epochs, args.pruner,
                      REDUCTION_FACTOR, args.seed)
        spec = WorkerSpec(
            study="traffic", sampler_seed=args.seed, device="cpu", threads=1, index=0,
            parent_pid=os.getpid(), checkpoint_dir=str(Path(tmp) / "checkpoints"),
        )
        beating = _start_others(store, url, "traffic", plan, space, base, args.others,
                                args.seed, spec.heartbeat_interval_s)
        mine_from = args.history + args.others  # the worker's trials are numbered from here
        phases = _Phases()
        worker = WorkerLoop(spec, phase=phases.span)
        # Warm its cache of finished trials, as a worker that saw the study fill up has it.
        worker.study.get_trials(deepcopy=False)
        counts.clear()
        pg_before, cpu_before = harness.postgres_cpu_s(), time.process_time()
        began = time.perf_counter()
        worker.loop()
        wall = time.perf_counter() - began
        cpu = time.process_time() - cpu_before
        pg = harness.postgres_cpu_s() - pg_before
        beating.terminate()
        beating.join()
        trials = [t for t in worker.study.get_trials(deepcopy=False) if t.number >= mine_from]
        epochs = sum(len(t.intermediate_values) for t in trials)
        train_cpu = sum(t.user_attrs.get("train_cpu_s", 0.0) for t in trials)
        states = collections.Counter(t.state.name for t in trials)
    n = len(trials)
    result = {
        "trials": n,
        "states": dict(states),
        "epochs": epochs,
        "wall_s": round(wall, 1),
        "statements_per_trial": round(
            sum(counts[k] for k in ("SELECT", "INSERT", "UPDATE", "DELETE", "other")) / n, 1),
        **{f"{k.lower()}_per_trial": round(counts[k] / n, 1)
           for k in ("SELECT", "INSERT", "UPDATE", "DELETE")},
        "commits_per_trial": round(counts["commits"] / n, 1),
        "checkouts_per_trial": round(counts["checkouts"] / n, 1),
        "worker_cpu_outside_training_ms_per_trial": round(1000 * (cpu - train_cpu) / n, 1),
        "postgres_cpu_ms_per_trial": round(1000 * pg / n, 1),
        "training_cpu_s_per_trial": round(train_cpu / n, 2),
        "history": args.history,
        "others_running": args.others,
        "worker_cpu_ms_per_trial_by_phase": {
            **{name: round(1000 * phases.cpu[name] / n, 1) for name in sorted(phases.cpu)},
            "the rest (checkpoints, set-up, logging)": round(
                1000 * (cpu - train_cpu - sum(phases.cpu.values())) / n, 1),
        },
        "phase_calls_per_trial": {name: round(phases.calls[name] / n, 2)
                                  for name in sorted(phases.calls)},
    }
    harness.emit(result)
