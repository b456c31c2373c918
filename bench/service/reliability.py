"""Fault injection against `hpo run` on a real PostgreSQL server: what is lost, what overshoots,
and how long a dead worker's trial waits before it resumes.

Everything runs on a private throwaway cluster (initdb in a temporary directory, a free port), so
the server can be restarted without touching anyone else's. Faults, each in its own study:

    worker-kill   kill -9 of a worker mid-trial (after >= 1 checkpointed epoch: the kills run
                  with --checkpoint-every 0, a save after every epoch); its launcher
                  lives, sees the exit status, re-queues the trial; a replacement resumes it
    node-loss     kill -9 of a whole node (driver and worker) mid-trial; the other node only
                  sees the heartbeat stop, and re-queues it after the grace period
    pg-restart    `pg_ctl restart -m fast` while trials train (every session is cut)

Reported per fault: trials lost (a trial running at the fault whose parameters never finished in
a retry, or anything left RUNNING/WAITING), budget overshoot (finished trials beyond the budget),
and for the kills the seconds from the kill to the retry being claimed and to its training
starting again, with the epoch it resumed after.

    python -m bench reliability [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import time
from pathlib import Path

from bench import _harness as harness
from hpo import count_trials
from hpo.testing import StoreReader, finish, mid_trial, start_node
from storage.testing import PrivateCluster

EPOCHS = 4
HEARTBEAT_S, GRACE_S = 2, 10


def outcome(reader: StoreReader, budget: int, faulted: list[int]) -> dict:
    trials = reader.trials()
    counts = count_trials(trials)
    by_number = {t.number: t for t in trials}
    lost = counts.running + counts.waiting
    for number in faulted:
        chain = [t for t in trials if number in t.user_attrs.get("retry_chain", [])]
        if by_number[number].state.is_finished() and by_number[number].state.name != "FAIL":
            continue
        if not any(t.state.is_finished() and t.state.name != "FAIL" for t in chain):
            lost += 1
    return {
        "budget": budget,
        "finished": counts.finished,
        "overshoot": counts.finished - budget,
        "lost": lost,
        "retried": counts.requeued,
    }


def resume_times(reader: StoreReader, victim_number: int, killed_at: float) -> dict:
    [retry] = [t for t in reader.trials() if t.user_attrs.get("retry_of") == victim_number]
    attrs = retry.user_attrs
    return {
        "death_to_claim_s": round(attrs["claimed_unix"] - killed_at, 2),
        "death_to_training_s": round(attrs["started_unix"] - killed_at, 2),
        "resumed_from_epoch": attrs.get("resumed_from_epoch"),
        "retry_state": retry.state.name,
    }


def worker_kill(url: str, work: Path, space: str) -> dict:
    name, budget = f"kill-{secrets.token_hex(3)}", 4
    node = start_node(
        url, name, "--trials", str(budget), "--workers", "2", "--epochs", str(EPOCHS),
        "--pruner", "none", "--space", space, "--checkpoint-every", "0", cwd=work / name,
    )  # fmt: skip
    reader = StoreReader(url, name)
    victim = reader.wait_for(mid_trial(1, EPOCHS - 2), timeout_s=600, nodes=[node], what="a trial")
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    killed_at = time.time()
    code, _, err = finish(node, 900)
    assert code == 0, err
    return {
        "fault": "worker-kill",
        **outcome(reader, budget, [victim.number]),
        **resume_times(reader, victim.number, killed_at),
    }


def node_loss(url: str, work: Path, space: str) -> dict:
    name, budget = f"node-{secrets.token_hex(3)}", 4
    common = (
        "--trials", str(budget), "--workers", "1", "--epochs", str(EPOCHS), "--pruner", "none",
        "--space", space, "--heartbeat-interval", str(HEARTBEAT_S), "--checkpoint-every", "0",
        "--grace-period", str(GRACE_S), "--checkpoint-dir", str(work / name / "shared"),
    )  # fmt: skip
    node_b = start_node(url, name, *common, cwd=work / name / "b", host="node-b")
    reader = StoreReader(url, name)
    victim = reader.wait_for(mid_trial(1, EPOCHS - 2), timeout_s=600, nodes=[node_b], what="b")
    node_a = start_node(url, name, *common, cwd=work / name / "a", host="node-a")
    node_b.kill()
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    killed_at = time.time()
    node_b.communicate()
    code, _, err = finish(node_a, 900)
    assert code == 0, err
    return {
        "fault": f"node-loss (heartbeat {HEARTBEAT_S} s, grace {GRACE_S} s)",
        **outcome(reader, budget, [victim.number]),
        **resume_times(reader, victim.number, killed_at),
    }


def pg_restart(cluster: PrivateCluster, work: Path, space: str) -> dict:
    name, budget = f"restart-{secrets.token_hex(3)}", 6
    node = start_node(
        cluster.url, name, "--trials", str(budget), "--workers", "2", "--epochs", str(EPOCHS),
        "--pruner", "none", "--space", space, "--heartbeat-interval", str(HEARTBEAT_S),
        "--grace-period", "60", cwd=work / name,
    )  # fmt: skip
    reader = StoreReader(cluster.url, name)
    faulted: list[int] = []
    outages = []
    for _ in range(2):
        reader.wait_for(mid_trial(1, EPOCHS - 1), timeout_s=600, nodes=[node], what="a trial")
        faulted += [t.number for t in reader.trials() if t.state.name == "RUNNING"]
        started = time.monotonic()
        cluster.restart()
        outages.append(round(time.monotonic() - started, 2))
    code, _, err = finish(node, 900)
    assert code == 0, err
    return {
        "fault": "pg-restart x2",
        **outcome(reader, budget, faulted),
        "restart_s": outages,
    }


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kill fault")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    harness.header(args)
    cluster = PrivateCluster()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="hpo-reliability-") as tmp:
            work = Path(tmp)
            space = work / "space.toml"
            space.write_text("n_train = 2048\n")  # about a second per epoch on a free core
            for _ in range(args.repeats):
                results.append(worker_kill(cluster.url, work, str(space)))
                harness.emit(results[-1])
                results.append(node_loss(cluster.url, work, str(space)))
                harness.emit(results[-1])
            results.append(pg_restart(cluster, work, str(space)))
            harness.emit(results[-1])
    finally:
        cluster.close()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": harness.machine_info(),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    harness.emit({"faults": len(results),
                  "lost": sum(r["lost"] for r in results),
                  "overshoot": sum(r["overshoot"] for r in results)})
