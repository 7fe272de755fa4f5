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


# --- 2. a lost state ------------------------------------------------------------------------


def test_a_lost_state_is_rebuilt_by_adopting_with_no_write(repo, emulator_server, api_env):
    names = make_repo(repo, 3, shared=1)
    assert apply(repo, api_env).code == 0
    made = state_ids(repo)
    repo.state_path.unlink()
    writes = emulator_server.writes()

    plan = run_cli("plan", "--json", "-C", str(repo.root), env=api_env)
    assert plan.code == 0, plan.err
    assert {a["name"]: a["action"] for a in plan.json["actions"]} == {n: "adopt" for n in names}
    assert emulator_server.writes() == writes

    rebuilt = apply(repo, api_env)
    assert rebuilt.code == 0, rebuilt.out + rebuilt.err
    assert emulator_server.writes() == writes
    assert state_ids(repo) == made
    assert_converged(repo, emulator_server, api_env, names)


def test_a_state_older_than_the_server_adopts_the_replacement_it_missed(repo, emulator_server, api_env):
    """A state restored from a backup or an old commit: the replace it lacks already happened."""
    names = make_repo(repo, 1)
    assert apply(repo, api_env).code == 0
    old_state = repo.state_path.read_text()
    repo.spec("s0", metadata={"team": "ml"}, input="../data/s0.jsonl")
    assert apply(repo, api_env).code == 0
    repo.state_path.write_text(old_state)

    again = apply(repo, api_env)
    assert again.code == 0, again.out + again.err
    assert "already exists" in again.out
    assert len(batches_by_name(emulator_server)["s0"]) == 2  # the original and its one replacement
    assert writes_to(emulator_server, "/v1/batches") == 2
    check = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=api_env)
    assert check.code == 0, check.out


# --- 3. retries, 429s and errors that are not retried --------------------------------------


def test_429_every_third_request_still_applies_with_no_duplicate(repo, emulator_server, api_env):
    names = make_repo(repo, 5, shared=1)
    emulator_server.add_fault(Fault(action="reject", every=3, times=None, status=429, retry_after=0.05))
    result = apply(repo, api_env)
    assert result.code == 0, result.out + result.err
    rejected = [r for r in emulator_server.requests if r.status == 429]
    assert len(rejected) >= 3
    assert writes_to(emulator_server, "/v1/batches") - sum(r.path == "/v1/batches" for r in rejected) == 5
    emulator_server.clear_faults()
    assert_converged(repo, emulator_server, api_env, names)


@pytest.mark.parametrize("header", [{"retry_after": 0.4}, {"retry_after_ms": 400}], ids=["seconds", "ms"])
def test_a_429_pauses_every_request_for_as_long_as_the_server_asked(repo, emulator_server, api_env, header):
    names = make_repo(repo, 8)
    emulator_server.add_fault(Fault(action="reject", nth=4, times=2, status=429, **header))
    assert apply(repo, api_env).code == 0
    timeline = emulator_server.timeline()
    answers = [t.answered for t in timeline if t.request.status == 429]
    assert len(answers) == 2
    for answered in answers:
        # after the client heard the 429 (a little slack), nothing arrives until the pause is over
        quiet = [t.request for t in timeline if answered + 0.05 < t.arrived < answered + 0.38]
        assert quiet == [], quiet
        assert any(t.arrived >= answered + 0.38 for t in timeline)
    emulator_server.clear_faults()
    assert_converged(repo, emulator_server, api_env, names)


def test_a_400_is_not_retried_and_shows_message_type_and_param(repo, emulator_server, api_env):
    (repo.root / "batchplan.yaml").write_text(FAST_SETTINGS)
    repo.spec("bad", input_file_id="file-doesnotexist")
    result = apply(repo, api_env)
    assert result.code == 1
    output = result.out + result.err
    assert "Cannot find input file file-doesnotexist" in output
    assert "type=invalid_request_error" in output and "param=input_file_id" in output
    assert "Traceback" not in output
    assert writes_to(emulator_server, "/v1/batches") == 1


@pytest.mark.parametrize("fault", [dict(action="reject", status=503, times=2), dict(action="drop_after_commit")],
                         ids=["503", "dropped"])
def test_a_list_is_retried_on_5xx_and_lost_connections(repo, emulator_server, api_env, fault):
    make_repo(repo, 1)
    emulator_server.add_fault(Fault(method="GET", path="/v1/batches", **fault))
    result = run_cli("plan", "-C", str(repo.root), env=api_env)
    assert result.code == 0, result.err
    assert emulator_server.count("GET", "/v1/batches") == 1 + emulator_server.fault_status()[0]["fired"]


def test_retries_are_bounded_and_the_last_error_is_shown(repo, emulator_server, api_env):
    make_repo(repo, 1)  # max_retries: 2
    emulator_server.add_fault(Fault(action="reject", method="GET", status=500, times=None))
    started = time.monotonic()
    result = run_cli("plan", "-C", str(repo.root), env=api_env)
    assert result.code == 1
    assert "GET /batches: server answered 500" in result.err and "Traceback" not in result.err
    assert emulator_server.count("GET") == 3
    assert time.monotonic() - started < 5


def test_a_cancel_is_retried_on_5xx(repo, emulator_server_factory):
    from reconciler.sandbox import Timing

    server = emulator_server_factory(timing=Timing.uniform(30))  # the batch stays running
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    make_repo(repo, 2)
    assert apply(repo, env).code == 0
    repo.remove_spec("s1")
    server.add_fault(Fault(action="reject", method="POST", path_regex=r"/cancel$", status=503))
    result = apply(repo, env)
    assert result.code == 0, result.out + result.err
    assert "cancelled" in result.out
    assert server.count("POST", "/v1/batches/") == 2
    assert server.emulator.get_batch(batches_by_name(server)["s1"][0])["status"] in ("cancelling", "cancelled")
    assert set(repo.state()["entries"]) == {"s0"}
