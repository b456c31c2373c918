"""Suite-wide fixtures: the real PostgreSQL server and the stores the tests run on; tests marked
`gpu` need CUDA and are skipped without it. The SBL front-end cache of the whole session lives in
a temporary directory (never the user's ~/.cache)."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def _front_end_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test (and every worker process it starts) caches SBL front ends in a session
    directory."""
    from pipeline._frontend import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("frontend-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


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
