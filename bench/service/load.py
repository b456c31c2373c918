"""Many nodes on one PostgreSQL study: N `hpo run` nodes x W workers started at the same instant.

A fresh PostgreSQL database (optionally pre-filled with `--prefill` finished trials shaped like
hpo's, added through Optuna's public API as `python -m bench store_traffic` does) gets `--nodes`
real `hpo run` commands at once, each with `--workers` workers, its own HPO_HOST and working
directory, one shared checkpoint directory, all towards one budget of `--trials` more trials.
Reported:

    exit codes       every node must exit 0
    budget_exact     the study holds exactly the budget of finished trials, none RUNNING/WAITING
    service_failed   FAIL trials whose reason is not the pipeline's (NumericalError): must be 0;
                     voided claims are listed apart (they are counted nowhere)
    peak_connections pg_stat_activity on the study's database, sampled every 0.1 s, against
                     README's 3 x (workers + 1) x nodes
    store time per trial, early (the run's first quarter of trials) and late (its last quarter),
                     medians and 90th percentiles, in wall seconds:
        claim_s      a worker's previous trial told -> this trial started: the claim (waiting
                     for the store lock, failing stale trials, counting, creating, tagging)
        in_trial_s   started -> told, less training (train_time_s) plus the service's share of
                     training (service_time_s: reports, pruning questions, checkpoint writes):
                     suggesting, attributes, reports, tell
        store_s      the two together
    postgres_cpu_ms_per_trial   the server's CPU over the run, per finished trial

On a 2-core machine 16 workers share two cores, so wall figures include waiting for a core; the
growth from a fresh study to a full one is what they show.

The database is a fresh one on the server $HPO_TEST_POSTGRES names (an admin URL; by default the
local one scripts/test.sh starts), dropped afterwards.

    python -m bench load [--nodes 4] [--workers 4] [--trials 400] [--preset smoke] [--prefill 0]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy.engine import make_url

from bench import _harness as harness

STUDY = "load"


class _Connections:
    """Peak number of connections to one database, sampled every 0.1 s in a thread."""

    def __init__(self, url: str) -> None:
        parts = make_url(url)
        admin = parts.set(drivername="postgresql", database="postgres")
        self._connection = psycopg2.connect(admin.render_as_string(hide_password=False))
        self._connection.autocommit = True
        self._database = parts.database
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._connection.cursor() as cursor:
            while not self._stop.wait(0.1):
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                               (self._database,))
                self.peak = max(self.peak, cursor.fetchone()[0])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._connection.close()
        return self.peak


def _prefill(url: str, n: int, budget: int, preset_name: str) -> None:
    from bench.service.store_traffic import _seed_history
    from hpo import OBJECTIVES, REDUCTION_FACTOR, StudySettings, create_or_load_study, load_space
    from pipeline import preset
    from storage import open_storage

    base = preset(preset_name)
    space = load_space(None, base)
    store = open_storage(url)
    settings = StudySettings(preset=preset_name, objective="composite",
                             direction=OBJECTIVES["composite"], epochs=base.epochs)
    create_or_load_study(store, STUDY, settings, budget=budget)  # hpo run adds its spec
    _seed_history(store, STUDY, space, base, n, base.epochs, "hyperband", REDUCTION_FACTOR, 0)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "n": 0}
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
            "n": len(ordered)}


def _store_times(trials: list[Any]) -> dict[str, dict[str, Any]]:
    """Per trial: the claim before it (from the same worker's previous trial) and the service's
    time inside it; summarised for the first and the last quarter of trials by number."""
    by_worker: dict[tuple[str, int], list[Any]] = {}
    for t in trials:
        if t.datetime_start and t.datetime_complete and "worker_pid" in t.user_attrs:
            by_worker.setdefault((t.user_attrs["host"], t.user_attrs["worker_pid"]), []).append(t)
    rows = []
    for chain in by_worker.values():
        chain.sort(key=lambda t: t.datetime_start)
        for previous, t in zip([None, *chain[:-1]], chain, strict=True):
            duration = (t.datetime_complete - t.datetime_start).total_seconds()
            in_trial = (duration - t.user_attrs.get("train_time_s", 0.0)
                        + t.user_attrs.get("service_time_s", 0.0))
            claim = (None if previous is None else
                     (t.datetime_start - previous.datetime_complete).total_seconds())
            rows.append((t.number, claim, in_trial))
    rows.sort()
    quarter = max(len(rows) // 4, 1)
    out = {}
    for label, part in (("early", rows[:quarter]), ("late", rows[-quarter:])):
        claims = [c for _, c, _ in part if c is not None]
        out[label] = {
            "trials": f"{part[0][0]}-{part[-1][0]}",
            "claim_s": _quantiles(claims),
            "in_trial_s": _quantiles([i for _, _, i in part]),
            "store_s": _quantiles([c + i for _, c, i in part if c is not None]),
        }
    return out


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="workers per node")
    parser.add_argument("--trials", type=int, default=400, help="trials to run (after prefill)")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--prefill", type=int, default=0,
                        help="finished trials added to the study before the nodes start")
    args = parser.parse_args(argv)

    import optuna

    from hpo import count_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    harness.header(args)
    budget = args.prefill + args.trials
    with harness.postgres_store() as url, tempfile.TemporaryDirectory() as tmp:
        prefill_s = 0.0
        if args.prefill:
            began = time.perf_counter()
            _prefill(url, args.prefill, budget, args.preset)
            prefill_s = time.perf_counter() - began
        connections = _Connections(url)
        command = ["hpo", "run", "--trials", str(budget), "--preset", args.preset,
                   "--study", STUDY, "--storage", url, "--workers", str(args.workers),
                   "--threads", "1", "--quiet", "--checkpoint-dir", str(Path(tmp) / "ckpt")]
        nodes = []
        pg_before, began = harness.postgres_cpu_s(), time.perf_counter()
        for index in range(args.nodes):
            cwd = Path(tmp) / f"node-{index}"
            cwd.mkdir()
            env = {**os.environ, "HPO_HOST": f"node-{index}", "TZ": "UTC"}
            log = open(cwd / "hpo-run.txt", "w")  # noqa: SIM115 - closed after the wait
            nodes.append((subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log, cwd))
        codes = []
        for proc, log, _ in nodes:
            codes.append(proc.wait())
            log.close()
        wall = time.perf_counter() - began
        pg_cpu = harness.postgres_cpu_s() - pg_before
        peak = connections.stop()
        tails = {f"node-{i}": (cwd / "hpo-run.txt").read_text().strip().splitlines()[-1:]
                 for i, (_, _, cwd) in enumerate(nodes)}
        study = optuna.load_study(study_name=STUDY, storage=url)
        trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    run = [t for t in trials if t.number >= args.prefill]
    failed = [t for t in run if t.state.name == "FAIL"]
    voided = [t for t in failed if "void_reason" in t.user_attrs]
    pipeline_failed = [t for t in failed if "void_reason" not in t.user_attrs
                       and str(t.user_attrs.get("fail_reason", "")).startswith("NumericalError")]
    service_failed = [t for t in failed if t not in voided and t not in pipeline_failed]
    finished_in_run = counts.finished - args.prefill
    result = {
        "nodes": args.nodes, "workers_per_node": args.workers, "preset": args.preset,
        "prefill": args.prefill, "prefill_s": round(prefill_s, 1), "budget": budget,
        "exit_codes": codes, "last_lines": tails,
        "finished": counts.finished, "complete": counts.complete, "pruned": counts.pruned,
        "failed": counts.failed, "running": counts.running, "waiting": counts.waiting,
        "budget_exact": counts.finished == budget and counts.running == counts.waiting == 0,
        "service_failed": len(service_failed),
        "service_failed_reasons": sorted({str(t.user_attrs.get("fail_reason"))
                                          for t in service_failed})[:5],
        "pipeline_failed": len(pipeline_failed),
        "voided_claims": len(voided),
        "peak_connections": peak,
        "readme_formula_3x(workers+1)xnodes": 3 * (args.workers + 1) * args.nodes,
        "wall_s": round(wall, 1),
        "trials_per_min": round(60 * finished_in_run / wall, 1),
        "postgres_cpu_ms_per_trial": round(1000 * pg_cpu / max(finished_in_run, 1), 1),
        "store_time": _store_times(run),
    }
    harness.emit(result)
