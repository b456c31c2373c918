"""Real PostgreSQL servers for the tests and the benchmarks: fresh databases, throwaway clusters.

As `optuna.testing` does for Optuna, this module ships with the package so that the test suite and
`bench/` share one copy; nothing in the service imports it. PostgreSQL is a real dependency: when
it cannot be reached, or its binaries are missing, these helpers raise `ServerUnavailableError`
with the reason, so a test that needs it fails and is never skipped. $HPO_TEST_POSTGRES names an
admin URL; the default is the local server that scripts/test.sh starts (trust auth).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get("HPO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# Trust auth ignores passwords, so a made-up one travels through every layer without being needed:
# the tests check it never shows up in any output.
DUMMY_PASSWORD = "pw-" + secrets.token_hex(6)


class ServerUnavailableError(RuntimeError):
    """A PostgreSQL server or its binaries, needed by a test or a benchmark, are not there."""


def _admin_connection() -> psycopg2.extensions.connection:
    url = make_url(ADMIN_URL).set(drivername="postgresql")
    try:
        connection = psycopg2.connect(url.render_as_string(hide_password=False), connect_timeout=5)
    except psycopg2.OperationalError as e:
        raise ServerUnavailableError(
            f"PostgreSQL at {url.host}:{url.port or 5432} is not reachable ({str(e).strip()}); "
            "this needs it: start it (bash scripts/test.sh does) or point $HPO_TEST_POSTGRES at "
            "one"
        ) from None
    connection.autocommit = True
    return connection


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database; yields its URL (with a password if the admin URL has none)."""
    name = f"hpo_test_{secrets.token_hex(4)}"
    admin = _admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg2", database=name)
        if not url.password:
            url = url.set(password=DUMMY_PASSWORD)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_url_with(**parts: object) -> str:
    """The admin URL with some parts replaced (database=, username=, port=, password=)."""
    url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg2", **parts)
    return url.render_as_string(hide_password=False)


class PasswordRefusingServer:
    """Speaks just enough of the PostgreSQL wire protocol to ask for a password and refuse it
    with SQLSTATE 28P01, as a server with password authentication does for a wrong password.

    The local test server uses trust auth, where no password is ever wrong; this peer lets the
    wrong-password path run through the real client library (libpq via psycopg2).
    """

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.passwords: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with connection:
                try:
                    self._refuse(connection)
                except (OSError, struct.error):
                    pass

    def _refuse(self, connection: socket.socket) -> None:
        while True:  # SSL / GSS encryption requests come first: answer "no"
            length, code = struct.unpack("!II", _read(connection, 8))
            if code in (80877103, 80877104):
                connection.sendall(b"N")
                continue
            params = _read(connection, length - 8).split(b"\0")
            break
        user = params[params.index(b"user") + 1].decode() if b"user" in params else "?"
        connection.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        kind = _read(connection, 1)
        (size,) = struct.unpack("!I", _read(connection, 4))
        body = _read(connection, size - 4)
        if kind == b"p":
            self.passwords.append(body.rstrip(b"\0").decode())
        fields = (
            b"SFATAL\0VFATAL\0C28P01\0"
            + f'Mpassword authentication failed for user "{user}"'.encode()
            + b"\0\0"
        )
        connection.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)

    def close(self) -> None:
        self._socket.close()


def _read(connection: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = connection.recv(n - len(data))
        if not chunk:
            raise OSError("peer closed")
        data += chunk
    return data


class PrivateCluster:
    """A throwaway PostgreSQL cluster (initdb in a temporary directory, trust auth, a free port on
    127.0.0.1) that a test may restart or stop: the shared server on 5432 is never touched.

    The server binaries are a real dependency: without them this raises ServerUnavailableError.
    As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root).
    """

    def __init__(self) -> None:
        self.bin_dir = _postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres:{DUMMY_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _options(self) -> str:
        # fsync off: a throwaway cluster; a restart is still a real stop and start of the server.
        return f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / tool), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise ServerUnavailableError(f"{tool} {' '.join(args)} failed: {result.stderr}{log}")
        return result

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-o", self._options(), "-l", str(self.log),
                  "-w", "start")  # fmt: skip

    def restart(self) -> None:
        """Stop the server (fast: every session is terminated) and start it again."""
        self._run("pg_ctl", "-D", str(self.data), "-o", self._options(), "-l", str(self.log),
                  "-m", "fast", "-w", "restart")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        """Stop the server as a crash would: every session ends at once, nothing is shut down
        cleanly (the next start recovers from the write-ahead log)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def close(self) -> None:
        subprocess.run(
            [*(["runuser", "-u", "postgres", "--"] if self.as_postgres else []),
             str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    on_path = shutil.which("initdb")
    if found:
        return found[-1].parent
    if on_path:
        return Path(on_path).parent
    raise ServerUnavailableError(
        "initdb/pg_ctl not found (looked in /usr/lib/postgresql/*/bin and PATH); a private "
        "cluster needs the PostgreSQL server binaries (apt-get install postgresql)"
    )


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]
