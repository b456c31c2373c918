"""Suite-wide fixtures: the real PostgreSQL server and the stores the tests run on; tests marked
`gpu` need CUDA and are skipped without it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from storage.testing import PasswordRefusingServer, ServerUnavailableError, fresh_postgres_database


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session, dropped afterwards. Fails (never
    skips) with the reason when the server cannot be reached."""
    try:
        with fresh_postgres_database() as url:
            yield url
    except ServerUnavailableError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request, tmp_path) -> str:
    """The embedded store (a file in tmp_path) and the real PostgreSQL server, in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpo.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def password_refusing_server() -> Iterator[PasswordRefusingServer]:
    server = PasswordRefusingServer()
    yield server
    server.close()
