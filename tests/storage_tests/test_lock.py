"""store_lock excludes other processes, on SQLite and on PostgreSQL, and dies with its holder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from storage import StorageError, open_storage, store_lock

# Each process adds 1 to a counter file, n times, with a read-sleep-write race window that only
# the lock closes.
_INCREMENT = textwrap.dedent(
    """
    import sys, time
    from storage import open_storage, store_lock
    url, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage = open_storage(url, heartbeat=False)
    for _ in range(n):
        with store_lock(storage, 7):
            value = int(open(path).read())
            time.sleep(0.002)
            open(path, "w").write(str(value + 1))
    """
)

_HOLD = textwrap.dedent(
    """
    import sys, time
    from storage import open_storage, store_lock
    storage = open_storage(sys.argv[1], heartbeat=False)
    with store_lock(storage, 7):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lock.db'}"
    return request.getfixturevalue("postgres_url")


def test_lock_serialises_read_modify_write_across_processes(store_url, tmp_path):
    open_storage(store_url)  # create the tables once, before the racers
    counter = tmp_path / "counter"
    counter.write_text("0")
    racers = [
        subprocess.Popen([sys.executable, "-c", _INCREMENT, store_url, str(counter), "40"])
        for _ in range(3)
    ]
    assert [p.wait(timeout=120) for p in racers] == [0, 0, 0]
    assert counter.read_text() == "120"


def test_lock_times_out_while_held_and_is_released_when_the_holder_dies(store_url):
    storage = open_storage(store_url, heartbeat=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, store_url, "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StorageError, match="timed out"), store_lock(storage, 7, timeout_s=0.3):
            pass
        if "postgresql" in store_url:
            with store_lock(storage, 8, timeout_s=0.3):
                pass  # on PostgreSQL another key is another lock
    finally:
        holder.kill()  # no clean release: the server / kernel must drop the lock
        holder.wait()
    with store_lock(storage, 7, timeout_s=10):
        pass
