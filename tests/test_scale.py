"""Issue 5: the round trips a plan costs do not grow with the account, only with what it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from reconciler.sandbox import Timing
from tests.helpers import ENDPOINT, env_for, run_cli

RUNNING = Timing.uniform(3600)  # batches stay in flight for the whole test


def _unrelated_batches(sandbox, count: int, age: float = 60.0) -> None:
    """Batches someone else made, already in the account, `age` seconds ago by the server's clock."""
    line = f'{{"custom_id":"x","method":"POST","url":"{ENDPOINT}","body":{{"model":"m"}}}}\n'
    clock, sandbox.emulator.clock = sandbox.emulator.clock, lambda: time.time() - age
    try:
        file_id = sandbox.emulator.upload_bytes(line.encode(), "other.jsonl", "batch")["id"]
        for _ in range(count):
            sandbox.emulator.create_batch({"input_file_id": file_id, "endpoint": ENDPOINT,
                                           "completion_window": "24h", "metadata": {"owner": "someone-else"}})
    finally:
        sandbox.emulator.clock = clock


@pytest.fixture
def busy_sandbox(sandbox_factory):
    return sandbox_factory(timing=RUNNING)


def test_a_no_change_plan_reads_the_uploads_and_one_list_page_for_its_running_batches(repo, busy_sandbox):
    _unrelated_batches(busy_sandbox, 150)  # older than ours
    for i in range(30):
        repo.spec(f"s{i:02d}")
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=env_for(busy_sandbox)).code == 0
    busy_sandbox.reset_log()

    result = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=env_for(busy_sandbox))

    assert result.code == 0, result.out + result.err
    # the uploads, for the net's search (a running batch may have a duplicate), then the 30 running
    # batches, newest first, down to their oldest upload: not the 180 batches of the account
    assert busy_sandbox.requests == [("GET", "/v1/files", 200), ("GET", "/v1/batches", 200)]


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
    # no spec and no state: no provider has anything to be asked, so no client is made at all
    assert _loaded(["plan", "-C", str(repo.root)], repo.root, heavy, offline) == []
