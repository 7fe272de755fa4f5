"""Shared pytest fixtures. Keep each one small and named for what it gives."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from reconciler.api import TEST_TRANSPORT
from reconciler.sandbox import Emulator, EmulatorServer, EmulatorTransport, Timing
from tests.helpers import env_for

FAST = Timing.uniform(0.05)
pytest_plugins = ["tests.conftest_pg"]  # pg_server_url, pg_url, pg_store: a real PostgreSQL

# The suite runs on several workers (pyproject.toml: -n, work stealing), and these tests take
# half of its time: the first starts at once, the others go last, where the first worker to
# run out of work takes them, so that no two of them wait for each other.
LONGEST = ("tests/test_kill.py",)


def pytest_collection_modifyitems(items) -> None:
    longest = [item for item in items if item.nodeid.startswith(LONGEST)]
    rest = [item for item in items if not item.nodeid.startswith(LONGEST)]
    items[:] = longest[:1] + rest + longest[1:]


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
def sandbox_factory(emulator_factory) -> Iterator[Callable[..., EmulatorTransport]]:
    """In-process sandboxes: `make(latency=..., emulator=..., **emulator_kwargs)`, no socket, no port.

    The last one made is where every Api of this test goes (api.TEST_TRANSPORT), so
    `run_cli` reaches it with `env_for(sandbox)`. Use emulator_server instead for
    what needs a real connection or a second process.
    """
    token = TEST_TRANSPORT.set(None)

    def make(*, emulator: Emulator | None = None, latency: float = 0.0, require_auth: bool = True,
             **emulator_kwargs) -> EmulatorTransport:
        transport = EmulatorTransport(emulator or emulator_factory(**emulator_kwargs), latency, require_auth)
        TEST_TRANSPORT.set(transport)
        return transport

    yield make
    TEST_TRANSPORT.reset(token)


@pytest.fixture
def sandbox(sandbox_factory) -> EmulatorTransport:
    """The emulator in this process (in-memory world, 0.05 s steps, auth required); every Api uses it."""
    return sandbox_factory()


@pytest.fixture
def sandbox_env(sandbox) -> dict:
    """Environment that points batchplan at `sandbox`, with colour off."""
    return env_for(sandbox)


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
    return env_for(emulator_server)
