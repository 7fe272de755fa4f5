"""Issue 5: the round trips a plan costs do not grow with the account, only with what it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from reconciler.sandbox import Timing
from tests.helpers import ENDPOINT, run_cli

RUNNING = Timing.uniform(3600)  # batches stay in flight for the whole test


def _unrelated_batches(url: str, count: int) -> None:
    """Batches someone else made, already in the account."""
    with httpx.Client(base_url=url + "/", headers={"Authorization": "Bearer sk-other"}) as client:
        line = f'{{"custom_id":"x","method":"POST","url":"{ENDPOINT}","body":{{"model":"m"}}}}\n'
        file_id = client.post("files", files={"file": ("other.jsonl", line.encode())},
                              data={"purpose": "batch"}).raise_for_status().json()["id"]
        for i in range(count):
            client.post("batches", json={"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h",
                                         "metadata": {"owner": "someone-else"}}).raise_for_status()


@pytest.fixture
def busy_server(emulator_server_factory):
    return emulator_server_factory(timing=RUNNING)


def _env(server) -> dict:
    return {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}


def test_a_no_change_plan_reads_one_list_page_for_its_running_batches(repo, busy_server):
    _unrelated_batches(busy_server.url, 150)  # older than ours, created seconds before
    for i in range(30):
        repo.spec(f"s{i:02d}")
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=_env(busy_server)).code == 0
    busy_server.reset_log()

    result = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=_env(busy_server))

    assert result.code == 0, result.out + result.err
    assert busy_server.requests == [("GET", "/v1/batches", 200)]  # not the 180 batches of the account



PROBE = """
import json, sys
from reconciler.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _loaded(args: list[str], cwd, heavy: tuple[str, ...], env: dict | None = None) -> list[str]:
    """Which of `heavy` a batchplan command imports, run in a fresh process."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=heavy), *args], cwd=cwd, timeout=60,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})}, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_starts_without_the_heavy_libraries(tmp_path):
    assert _loaded(["--help"], tmp_path, ("pydantic", "yaml", "asyncio", "httpx", "rich", "deepdiff")) == []


def test_a_plan_loads_only_what_a_plan_uses(repo):
    """Not deepdiff (only replaces diff fields), nor what httpx and httpcore load when installed:
    httpx's own command line (rich, pygments) and trio."""
    offline = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-test"}  # nothing to ask
    heavy = ("deepdiff", "rich", "pygments", "trio", "httpx._main", "httpx")
    assert _loaded(["plan", "-C", str(repo.root)], repo.root, heavy, offline) == ["httpx"]
