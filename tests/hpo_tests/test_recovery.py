"""A worker killed with SIGKILL mid-trial, and a whole node lost: the trial is retried with the
same parameters, resumes after its checkpointed epoch, and the study ends with exactly its budget.

Real PostgreSQL, real processes, a real kill -9; everything asserted is read back from the store
through a separate connection.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from hpo import count_trials
from hpo.testing import FINISHED, StoreReader, finish, mid_trial, start_node

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

EPOCHS = 4


def slow_space(tmp_path: Path) -> str:
    # About half a second per epoch on one free core: slow enough to be caught mid-trial.
    path = tmp_path / "slow.toml"
    path.write_text("n_train = 1024\n")
    return str(path)


def check_resumed(trials, killed, retry, *, killed_steps: dict[int, float]) -> None:
    """The retry continues the killed trial: same params, one report per epoch, the restored
    epochs equal to what the killed trial reported, and training resumed after them."""
    assert retry.params == killed.params
    assert retry.user_attrs["retry_of"] == killed.number
    assert retry.user_attrs["retry_count"] == 1
    resumed = retry.user_attrs["resumed_from_epoch"]
    # With --checkpoint-every 0 the checkpoint is written before each report, so it holds at
    # least the reported epochs.
    assert 1 <= max(killed_steps) <= resumed <= EPOCHS
    assert sorted(retry.intermediate_values) == list(range(1, EPOCHS + 1))  # no step twice
    for step, value in killed_steps.items():
        assert retry.intermediate_values[step] == value
    history = retry.user_attrs["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    # The epochs before the resume were restored, not trained again: even their wall times are
    # the killed trial's.
    before = killed.user_attrs["history"]
    assert history[: len(before)] == before
    assert retry.state == TrialState.COMPLETE
    assert Path(retry.user_attrs["checkpoint"]).is_file()
    # A trial's value is its last epoch: it writes no best-epoch copy beside it.
    assert not Path(retry.user_attrs["checkpoint"]).with_name("best.pt").exists()


def test_kill_9_of_a_worker_mid_trial_resumes_from_its_checkpoint(postgres_url, tmp_path):
    name = f"kill9-{secrets.token_hex(3)}"
    budget = 3
    node = start_node(
        postgres_url, name, "--trials", str(budget), "--workers", "2", "--epochs", str(EPOCHS),
        "--pruner", "none", "--space", slow_space(tmp_path), "--keep-checkpoints", "10",
        "--checkpoint-every", "0", cwd=tmp_path,
    )  # fmt: skip
    reader = StoreReader(postgres_url, name)
    try:
        victim = reader.wait_for(
            mid_trial(1, EPOCHS - 2), timeout_s=240, nodes=[node], what="a trial mid-training"
        )
        killed_steps = dict(victim.intermediate_values)
        pid = victim.user_attrs["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        code, _, err = finish(node, 300)
    finally:
        if node.poll() is None:
            node.kill()
    assert code == 0, err
    trials = reader.trials()
    counts = count_trials(trials)
    assert (counts.finished, counts.running, counts.waiting) == (budget, 0, 0)
    assert all(t.state in FINISHED for t in trials)
    [killed] = [t for t in trials if t.number == victim.number]
    assert killed.state == TrialState.FAIL
    assert f"{pid} was killed by SIGKILL" in killed.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    check_resumed(trials, killed, retry, killed_steps=killed_steps)
    assert retry.user_attrs["claimed_unix"] - killed_at < 60
    print(f"death -> retry claimed: {retry.user_attrs['claimed_unix'] - killed_at:.1f} s")
    status = subprocess.run(
        [sys.executable, "-m", "hpo.cli", "status", "--storage", postgres_url, "--study", name,
         "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    payload = json.loads(status.stdout)
    assert {
        "number": retry.number,
        "retry_of": killed.number,
        "retry_count": 1,
        "resumed_from_epoch": retry.user_attrs["resumed_from_epoch"],
        "state": "COMPLETE",
    } in payload["retries"]
    [failure] = [f for f in payload["failures"] if f["number"] == killed.number]
    assert failure["requeued"] and "SIGKILL" in failure["reason"]


def test_a_lost_node_is_noticed_by_heartbeat_and_its_trial_resumes_elsewhere(
    postgres_url, tmp_path
):
    """Node B (driver and worker) dies at once, as when a machine is lost: node A, which only
    sees B's heartbeats stop, re-queues B's trial after the grace period and resumes it."""
    name = f"lost-{secrets.token_hex(3)}"
    budget = 3
    common = (
        "--trials", str(budget), "--workers", "1", "--epochs", str(EPOCHS), "--pruner", "none",
        "--space", slow_space(tmp_path), "--keep-checkpoints", "10", "--checkpoint-every", "0",
        "--heartbeat-interval", "1", "--grace-period", "6",
        "--checkpoint-dir", str(tmp_path / "shared-checkpoints"),
    )  # fmt: skip
    node_b = start_node(postgres_url, name, *common, cwd=tmp_path / "b", host="node-b")
    reader = StoreReader(postgres_url, name)
    node_a = None
    try:
        victim = reader.wait_for(
            mid_trial(1, EPOCHS - 2), timeout_s=240, nodes=[node_b], what="node b mid-trial"
        )
        node_a = start_node(postgres_url, name, *common, cwd=tmp_path / "a", host="node-a")
        killed_steps = dict(victim.intermediate_values)
        node_b.kill()  # SIGKILL to the driver, then its worker: nothing records anything
        os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
        killed_at = time.time()
        node_b.communicate()
        code, _, err = finish(node_a, 300)
    finally:
        for node in (node_a, node_b):
            if node is not None and node.poll() is None:
                node.kill()
    assert code == 0, err
    trials = reader.trials()
    counts = count_trials(trials)
    assert (counts.finished, counts.running, counts.waiting) == (budget, 0, 0)
    [killed] = [t for t in trials if t.number == victim.number]
    assert killed.state == TrialState.FAIL
    assert "no heartbeat for 6 s" in killed.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.user_attrs["host"] == "node-a"
    check_resumed(trials, killed, retry, killed_steps=killed_steps)
    waited = retry.user_attrs["claimed_unix"] - killed_at
    # Not before the grace period (6 s) after the last heartbeat, which came at most one
    # heartbeat interval (1 s) before the kill; soon after it.
    assert 6 - 1 <= waited < 90
    print(f"node lost -> retry claimed: {waited:.1f} s")
