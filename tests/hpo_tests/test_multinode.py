"""Two `hpo run` drivers ("nodes", two workers each) on one PostgreSQL study: the budget is met
exactly (no overshoot by parallel workers, no node stopping short), trials come from both nodes,
and `hpo status` reports what runs on each node."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from hpo import count_trials
from hpo.testing import FINISHED, StoreReader, finish, start_node

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_two_nodes_share_one_budget_exactly(postgres_url, tmp_path):
    name = f"nodes-{secrets.token_hex(3)}"
    budget = 16
    space = tmp_path / "space.toml"
    space.write_text("n_train = 384\n")  # trials of a few seconds: both nodes get some
    common = ("--trials", str(budget), "--workers", "2", "--space", str(space))
    nodes = [
        start_node(postgres_url, name, *common, cwd=tmp_path / host, host=host)
        for host in ("node-a", "node-b")
    ]
    reader = StoreReader(postgres_url, name)
    try:

        def both_running(trials):
            hosts = {t.user_attrs.get("host") for t in trials if t.user_attrs.get("history")}
            return {"node-a", "node-b"} <= hosts

        reader.wait_for(both_running, timeout_s=180, nodes=nodes, what="trials on both nodes")
        status = subprocess.run(
            [sys.executable, "-m", "hpo.cli", "status", "--storage", postgres_url,
             "--study", name, "--json"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        results = [finish(node, 300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for code, out, err in results:
        assert code == 0, err
        assert f"{budget}/{budget} finished" in out  # neither node stopped short
    trials = reader.trials()
    counts = count_trials(trials)
    assert (counts.finished, counts.running, counts.waiting) == (budget, 0, 0)
    assert len(trials) == budget and all(t.state in FINISHED for t in trials)
    assert {t.user_attrs["host"] for t in trials} == {"node-a", "node-b"}
    # Four workers in all; each trial belongs to one of them.
    assert 2 < len({(t.user_attrs["host"], t.user_attrs["worker_pid"]) for t in trials})
    payload = json.loads(status.stdout)
    for entry in payload["running"]:
        assert entry["host"] in ("node-a", "node-b") and entry["pid"] > 0
        assert 0 <= entry["epoch"] <= 2
    assert sum(payload["hosts"].values()) == len(payload["running"]) <= 4
