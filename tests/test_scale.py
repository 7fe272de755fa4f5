"""Issue 5: the round trips a plan costs do not grow with the account, only with what it needs."""

from __future__ import annotations

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

