"""Shared pytest fixtures. Keep each one small and named for what it gives."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from reconciler.sandbox import Emulator, EmulatorServer, Timing

FAST = Timing.uniform(0.05)
pytest_plugins = ["tests.conftest_pg"]  # pg_server_url, pg_url, pg_store: a real PostgreSQL


@pytest.fixture
def emulator_factory(tmp_path) -> Iterator[Callable[..., Emulator]]:
    """Make Emulators (fast Timing unless given); all are closed after the test."""
    made: list[Emulator] = []

    def make(**kwargs) -> Emulator:
        kwargs.setdefault("timing", FAST)
        made.append(Emulator(**kwargs))
        return made[-1]

    yield make
    for emulator in made:
        emulator.close()


@pytest.fixture
def emulator_server_factory(emulator_factory) -> Iterator[Callable[..., EmulatorServer]]:
    """Start EmulatorServers on 127.0.0.1: `make(latency=..., emulator=..., **emulator_kwargs)`."""
    started: list[EmulatorServer] = []

    def make(*, emulator: Emulator | None = None, latency: float = 0.0, require_auth: bool = True,
             **emulator_kwargs) -> EmulatorServer:
        emulator = emulator or emulator_factory(**emulator_kwargs)
        started.append(EmulatorServer(emulator, latency=latency, require_auth=require_auth).start())
        return started[-1]

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def emulator_server(emulator_server_factory) -> EmulatorServer:
    """A started sandbox (in-memory world, 0.05 s steps, auth required) at `emulator_server.url`."""
    return emulator_server_factory()


@pytest.fixture
def repo(tmp_path) -> "Repo":
    """An empty GitOps repo (specs/, data/) in a temp dir; see tests/helpers.py."""
    from tests.helpers import Repo

    return Repo(tmp_path / "repo")


@pytest.fixture
def api_env(emulator_server) -> dict:
    """Environment that points batchplan at `emulator_server`, with colour off."""
    return {"OPENAI_BASE_URL": emulator_server.url, "OPENAI_API_KEY": "sk-test-secret-key", "NO_COLOR": "1"}
