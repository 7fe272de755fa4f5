"""PostgreSQL for the tests: a real server, never a mock (registered in conftest.py).

The server is BATCHPLAN_TEST_PG_URL when set (.ci/run starts one and exports it); otherwise
this session starts a throwaway one with the same recipe (`.ci/postgres start`) and stops it
at the end, so plain `pytest` runs these tests too. When neither works the tests fail, with
the reason: they never skip.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest

CI_POSTGRES = Path(__file__).resolve().parent.parent / ".ci" / "postgres"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """The URL of a PostgreSQL server whose user may create databases."""
    given = os.environ.get("BATCHPLAN_TEST_PG_URL")
    if given:
        yield given
        return
    workdir = tempfile.mkdtemp(prefix="batchplan-test-pg-")
    started = subprocess.run([str(CI_POSTGRES), "start", workdir], capture_output=True, text=True)
    try:
        if started.returncode != 0:
            pytest.fail(f"could not start a PostgreSQL server for the tests with `.ci/postgres start` (or set "
                        f"BATCHPLAN_TEST_PG_URL to a server's URL):\n{started.stderr}", pytrace=False)
        yield started.stdout.strip()
    finally:
        subprocess.run([str(CI_POSTGRES), "stop", workdir], capture_output=True)


@pytest.fixture
def pg_url(pg_server_url) -> Iterator[str]:
    """The URL of a fresh, empty database on the test server, dropped after the test."""
    import psycopg

    name = f"batchplan_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield urlsplit(pg_server_url)._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # FORCE: ends sessions a test left open


@pytest.fixture
def pg_store(pg_url) -> Iterator[Callable[..., "PostgresStore"]]:  # noqa: F821
    """Make PostgresStores on the test's database: `pg_store(workspace="default")`; all closed after."""
    from reconciler.stores.postgres import PostgresStore

    made: list[PostgresStore] = []

    def make(workspace: str = "default", url: str | None = None) -> PostgresStore:
        made.append(PostgresStore(url or pg_url, workspace=workspace))
        return made[-1]

    yield make
    for store in made:
        store.close()
