"""A real PostgreSQL restart (a private throwaway cluster, never the shared server): Reconnect
rides through it, and gives up with one clear line when the server stays down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import optuna
import pytest

from storage import Reconnect, StorageUnreachableError, open_storage, parse_url, store_lock
from storage.testing import DUMMY_PASSWORD, PrivateCluster

pytestmark = pytest.mark.postgres


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    server = PrivateCluster()
    yield server
    server.close()


def test_operations_ride_through_a_restart_and_a_lost_lock_is_noticed(cluster):
    storage = open_storage(cluster.url, heartbeat=False)
    study = optuna.create_study(storage=storage, study_name="restart")
    retry = Reconnect(deadline_s=60)
    with store_lock(storage, 1) as lease:
        lease.check()
        cluster.restart()  # ends every session, the one holding the lock included
        with pytest.raises(Exception, match="lock was lost"):
            lease.check()
    # Pooled connections died with the restart; the operations still succeed.
    trial = retry(study.ask, "asking")
    retry(lambda: study.tell(trial, 1.0), "telling")
    assert retry(lambda: len(study.get_trials()), "reading") == 1


def test_an_operation_waits_for_a_server_that_comes_back(cluster):
    storage = open_storage(cluster.url, heartbeat=False)
    study = optuna.create_study(storage=storage, study_name="down")
    cluster.stop()
    threading.Timer(3.0, cluster.start).start()
    started = time.monotonic()
    retry = Reconnect(deadline_s=60)
    assert retry(lambda: len(study.get_trials()), "reading") == 0
    assert time.monotonic() - started >= 2.5
    assert retry.n_retries >= 1


def test_a_server_that_stays_down_is_one_clear_error(cluster):
    storage = open_storage(cluster.url, heartbeat=False)
    study = optuna.create_study(storage=storage, study_name="gone")
    cluster.stop()
    retry = Reconnect(parse_url(cluster.url), deadline_s=2)
    started = time.monotonic()
    with pytest.raises(StorageUnreachableError) as raised:
        retry(study.get_trials, "reading the trials")
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert "lost while reading the trials and not back after" in message
    assert f"127.0.0.1:{cluster.port}" in message and "\n" not in message
    assert DUMMY_PASSWORD not in message
