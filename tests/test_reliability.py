"""Never a duplicate batch, never a lost or corrupt state (issue 4).

Every test drives the real CLI against the emulator on 127.0.0.1 and injects the
server's faults: answers lost after a commit, 5xx, 429s, stalls past the client
timeout, a locked or broken state, signals. The server's own listing is the truth
each test checks: exactly one batch per spec, and a state that matches it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from reconciler.api import check_base_url
from reconciler.errors import ConfigError
from reconciler.sandbox import EmulatorServer, Fault
from reconciler.state import FORMAT_VERSION, StateLock
from tests.helpers import Repo, run_cli, spawn_cli

KEY = "sk-test-secret-key"
FAST_SETTINGS = "timeout: 1\nmax_retries: 2\n"


# --- what the server holds ------------------------------------------------------------------


def server_batches(server: EmulatorServer) -> list[dict]:
    """Every batch on the server, newest first (read from the emulator, not over HTTP)."""
    batches, after = [], None
    while True:
        page = server.emulator.list_batches(after=after, limit=100)
        batches += page["data"]
        if not page["has_more"]:
            return batches
        after = page["data"][-1]["id"]


def batches_by_name(server: EmulatorServer) -> dict[str, list[str]]:
    """Spec name -> ids of every batch on the server carrying batchplan's tags for it."""
    named: dict[str, list[str]] = {}
    for batch in server_batches(server):
        name = (batch.get("metadata") or {}).get("batchplan_name")
        if name:
            named.setdefault(name, []).append(batch["id"])
    return named


def uploads_by_name(server: EmulatorServer) -> Counter:
    return Counter(f["filename"] for f in server.emulator.list_files()["data"])


def state_ids(repo: Repo) -> dict[str, str | None]:
    return {name: (entry["batch"] or {}).get("id") for name, entry in repo.state()["entries"].items()}


def assert_converged(repo: Repo, server: EmulatorServer, env: dict, names: list[str]) -> None:
    """Exactly one batch per spec on the server, the state holds those ids, and plan is empty."""
    assert server.wait_idle(), "a request is still being handled"
    named = batches_by_name(server)
    assert {n: len(ids) for n, ids in named.items()} == {n: 1 for n in names}, named
    assert state_ids(repo) == {n: ids[0] for n, ids in named.items()}
    assert not any(e["intent"] for e in repo.state()["entries"].values())
    check = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=env)
    assert check.code == 0, check.out + check.err


def make_repo(repo: Repo, count: int, settings: str = FAST_SETTINGS, shared: int = 0) -> list[str]:
    """`count` specs s0..; the first `shared + 1` of them read one input file."""
    (repo.root / "batchplan.yaml").write_text(settings)
    names = [f"s{i}" for i in range(count)]
    for i, name in enumerate(names):
        if i <= shared and shared:
            repo.spec(name, input=repo.data("shared.jsonl"), metadata={"which": name})
        else:
            repo.spec(name)
    return names


def apply(repo: Repo, env: dict, *extra: str):
    return run_cli("apply", "--auto-approve", "-C", str(repo.root), *extra, env=env)


def writes_to(server: EmulatorServer, path: str) -> int:
    return sum(1 for r in server.requests if r.method == "POST" and r.path == path)


# --- 1. a create whose answer is lost -------------------------------------------------------

LOST_ANSWERS = {
    "dropped": dict(action="drop_after_commit"),
    "500": dict(action="error_after_commit", status=500),
    "stall": dict(action="stall", seconds=1.5),
}


@pytest.mark.parametrize("fault", LOST_ANSWERS, ids=list(LOST_ANSWERS))
def test_a_lost_create_answer_is_adopted_not_repeated(repo, emulator_server, api_env, fault):
    names = make_repo(repo, 3)
    emulator_server.add_fault(Fault(method="POST", path_regex=r"^/v1/batches$", nth=2, **LOST_ANSWERS[fault]))
    first = apply(repo, api_env)
    if first.code != 0:  # allowed to give up, but then the next apply must finish the job
        second = apply(repo, api_env)
        assert second.code == 0, second.out + second.err
    assert emulator_server.fault_status()[0]["fired"] == 1
    assert_converged(repo, emulator_server, api_env, names)
    assert writes_to(emulator_server, "/v1/batches") == 3


@pytest.mark.parametrize("fault", LOST_ANSWERS, ids=list(LOST_ANSWERS))
def test_a_lost_upload_answer_is_found_again_by_its_hash(repo, emulator_server, api_env, fault):
    names = make_repo(repo, 2)
    emulator_server.add_fault(Fault(method="POST", path_regex=r"^/v1/files$", **LOST_ANSWERS[fault]))
    first = apply(repo, api_env)
    if first.code != 0:
        second = apply(repo, api_env)
        assert second.code == 0, second.out + second.err
    assert emulator_server.fault_status()[0]["fired"] == 1
    assert emulator_server.wait_idle()
    uploads = uploads_by_name(emulator_server)
    assert len(uploads) == 2 and set(uploads.values()) == {1}, uploads
    assert all(".batchplan-" in name for name in uploads)
    assert_converged(repo, emulator_server, api_env, names)
