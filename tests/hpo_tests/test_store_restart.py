"""PostgreSQL restarted (twice) while `hpo run` trains: the workers reconnect, and the study
ends with exactly its budget, nothing lost and nothing left RUNNING. The server is a private
throwaway cluster (the shared one on 5432 is never restarted)."""

from __future__ import annotations

import datetime
import secrets

import pytest

from hpo import count_trials
from hpo.testing import FINISHED, StoreReader, finish, mid_trial, start_node
from storage.testing import DUMMY_PASSWORD, PrivateCluster

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_run_completes_its_budget_across_server_restarts(tmp_path):
    cluster = PrivateCluster()
    node = None
    try:
        name = f"restart-{secrets.token_hex(3)}"
        budget = 4
        space = tmp_path / "space.toml"
        space.write_text("n_train = 768\n")
        node = start_node(
            cluster.url, name, "--trials", str(budget), "--workers", "2", "--epochs", "3",
            "--pruner", "none", "--space", str(space), "--heartbeat-interval", "1",
            "--grace-period", "30", cwd=tmp_path,
        )  # fmt: skip
        reader = StoreReader(cluster.url, name)
        restarts = []
        for _ in range(2):
            reader.wait_for(mid_trial(1, 2), timeout_s=240, nodes=[node], what="a trial running")
            restarts.append(datetime.datetime.now(datetime.UTC).replace(tzinfo=None))
            cluster.restart()
        code, out, err = finish(node, 300)
        assert code == 0, err
        trials = reader.trials()
    finally:
        if node is not None and node.poll() is None:
            node.kill()
        cluster.close()
    counts = count_trials(trials)
    assert (counts.finished, counts.running, counts.waiting) == (budget, 0, 0)
    assert all(t.state in FINISHED for t in trials)
    assert f"{budget}/{budget} finished" in out
    # Trials were training while the server went down and came back, and finished after it.
    spanning = [
        t
        for t in trials
        if t.datetime_complete
        and any(t.datetime_start < r < t.datetime_complete for r in restarts)
    ]
    assert spanning
    logs = "\n".join(p.read_text() for p in (tmp_path / "runs").rglob("*.log"))
    assert DUMMY_PASSWORD not in logs + out + err
