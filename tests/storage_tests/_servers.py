"""Real servers for the storage tests: a fresh PostgreSQL database, and a password-refusing peer.

PostgreSQL is a real dependency here: when it cannot be reached the tests fail (with the reason),
they are never skipped. $HPO_TEST_POSTGRES names an admin URL; the default is the local server
that .ci/run starts (trust auth).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import threading
from collections.abc import Iterator

import psycopg2
import pytest
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get("HPO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# Trust auth ignores passwords, so a made-up one travels through every layer without being needed:
# the tests check it never shows up in any output.
DUMMY_PASSWORD = "pw-" + secrets.token_hex(6)


def _admin_connection() -> psycopg2.extensions.connection:
    url = make_url(ADMIN_URL).set(drivername="postgresql")
    try:
        connection = psycopg2.connect(url.render_as_string(hide_password=False), connect_timeout=5)
    except psycopg2.OperationalError as e:
        pytest.fail(
            f"PostgreSQL at {url.host}:{url.port or 5432} is not reachable ({str(e).strip()}); "
            "these tests need it: start it (.ci/run does) or point $HPO_TEST_POSTGRES at one",
            pytrace=False,
        )
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
