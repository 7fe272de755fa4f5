"""Never two running batches of one spec (issues 18 and 19): the search through the uploads, the
keeper rule and the net, against the emulator's faults (a spurious 404, a skewed server clock, a
create that lands long after its client gave up, a replace killed half way).

The server's own listing is the truth each test checks: per spec, one batch that is not
cancelled, and the state naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from reconciler.sandbox import Fault, Timing
from tests.helpers import ENDPOINT, KEY, env_for, run_cli, spawn_cli
from tests.test_reliability import (apply, assert_quiet, batches_by_name, kept, make_repo, state_ids, wait_for,
                                    writes_to)

RUNNING = Timing.uniform(30)  # batches stay running for the whole test
QUICK = "timeout: 0.5\nmax_retries: 2\n"  # settling waits the client timeout: 0.5 s


def env_of(server) -> dict:
    return {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}


def plan_json(repo, env, *extra: str) -> dict:
    result = run_cli("plan", "--json", "-C", str(repo.root), *extra, env=env)
    assert result.code == 0, result.err
    return result.json


# --- item 1: a 404 for a batch the state recorded is looked for, never trusted ----------------


def test_a_404_for_a_recorded_batch_is_looked_for_in_the_list_and_nothing_is_made_again(repo,
                                                                                         emulator_server_factory):
    server = emulator_server_factory(timing=RUNNING)
    env = env_of(server)
    make_repo(repo, 2, settings=QUICK)
    assert apply(repo, env).code == 0
    ids = state_ids(repo)
    for batch_id in ids.values():  # every GET of either batch answers 404, for as long as the test runs
        server.add_fault(Fault(action="not_found", method="GET", path_regex=f"^/v1/batches/{batch_id}$", times=None))
    server.reset_log()

    assert {a["name"]: a["action"] for a in plan_json(repo, env)["actions"]} == {"s0": "noop", "s1": "noop"}
    status = run_cli("status", "--json", "-C", str(repo.root), env=env)  # a GET each, twice, then the list
    assert status.code == 0, status.err
    assert {row["name"]: row["status"] for row in status.json["batches"]} == {"s0": "validating", "s1": "validating"}
    assert server.count("GET", "/v1/batches/") == 4 and server.writes() == 0

    repo.remove_spec("s1")  # a removed spec's batch is read by id: cancelled, not forgotten as gone
    (cancel,) = [a for a in plan_json(repo, env)["actions"] if a["name"] == "s1"]
    assert (cancel["action"], cancel["reason_code"]) == ("cancel", "spec_removed")
    assert apply(repo, env).code == 0
    assert server.emulator.get_batch(ids["s1"])["status"] in ("cancelling", "cancelled")
    assert writes_to(server, "/v1/batches") == 0  # no create since the 404s began


# --- item 2: a server clock far from ours, and a lost create answer -------------------------


@pytest.mark.parametrize("skew", [-1000, 1000], ids=["server-behind", "server-ahead"])
def test_a_skewed_server_clock_and_a_lost_create_answer_make_one_batch(repo, emulator_server_factory, skew):
    server = emulator_server_factory(skew=skew)
    env = env_of(server)
    names = make_repo(repo, 3, settings=QUICK)
    server.add_fault(Fault(action="drop_after_commit", method="POST", path_regex=r"^/v1/batches$", nth=2))
    result = apply(repo, env)
    assert result.code == 0, result.out + result.err
    assert "found its lost create on the server" in result.out
    assert {n: len(ids) for n, ids in batches_by_name(server).items()} == {n: 1 for n in names}
    assert writes_to(server, "/v1/batches") == 3
    repo.state_path.unlink()  # and with no state at all, every one is found again
    assert {a["action"] for a in plan_json(repo, env)["actions"]} == {"adopt"}


# --- item 3: the net: a create that lands after its client's settling wait --------------------


def test_a_create_that_lands_late_is_cancelled_by_the_next_apply(repo, emulator_server_factory):
    server = emulator_server_factory(timing=RUNNING)
    env = env_of(server)
    names = make_repo(repo, 1, settings=QUICK)
    # held 2.5 s: past the 0.5 s timeout and the 0.5 s settling wait, so the client sends it again
    server.add_fault(Fault(action="stall", method="POST", path_regex=r"^/v1/batches$", seconds=2.5))
    first = apply(repo, env)
    assert first.code == 0, first.out + first.err
    assert server.wait_idle() and writes_to(server, "/v1/batches") == 2
    (kept_id, late_id) = sorted(batches_by_name(server)["s0"],
                                key=lambda b: server.emulator.get_batch(b)["created_at"])
    assert state_ids(repo) == {"s0": kept_id}

    plan = run_cli("plan", "-C", str(repo.root), env=env)
    assert plan.code == 0, plan.err
    assert plan.out == ("batchplan will perform these actions:\n\n"
                        f"  - s0  cancel   duplicate batch {late_id} (validating): same spec as {kept_id}, which is "
                        "kept (made by a create whose answer was lost, or by another checkout)\n\n"
                        "Plan: 1 to cancel, 1 unchanged.\n")
    second = apply(repo, env)
    assert second.code == 0, second.out + second.err
    assert server.emulator.get_batch(late_id)["status"] in ("cancelling", "cancelled")
    assert_quiet(repo, server, env, names)


def test_an_older_duplicate_is_kept_and_the_states_batch_cancelled(repo, emulator_server_factory):
    """Two checkouts, each with its own state, made one batch each: both keep the older one."""
    server = emulator_server_factory(timing=RUNNING)
    env = env_of(server)
    make_repo(repo, 1, settings=QUICK)
    assert apply(repo, env).code == 0
    first = server.emulator.get_batch(state_ids(repo)["s0"])
    with server_clock(server.emulator, 5):  # the other checkout's, a few seconds later
        second = server.emulator.create_batch({key: first[key] for key in ("input_file_id", "endpoint",
                                                                            "completion_window", "metadata")})
    state = repo.state()
    state["entries"]["s0"]["batch"]["id"] = second["id"]  # this checkout's state names the newer one
    repo.state_path.write_text(json.dumps(state))

    actions = [(a["action"], a["reason_code"]) for a in plan_json(repo, env)["actions"]]
    assert actions == [("adopt", "keep_oldest"), ("cancel", "duplicate")]
    assert apply(repo, env).code == 0
    assert state_ids(repo) == {"s0": first["id"]}
    assert server.emulator.get_batch(second["id"])["status"] in ("cancelling", "cancelled")
    assert_quiet(repo, server, env, ["s0"])


# --- a forced replace killed between its create and its cancel ------------------------------


def test_a_forced_replace_killed_before_its_cancel_converges_to_the_replacement(repo, emulator_server_factory):
    server = emulator_server_factory(timing=RUNNING, latency=0.02)
    env = env_of(server)
    names = make_repo(repo, 1, settings=QUICK)
    assert apply(repo, env).code == 0
    old = state_ids(repo)["s0"]
    server.add_fault(Fault(action="reject", method="POST", path_regex=r"/cancel$", status=500, times=None))
    proc = spawn_cli("apply", "--auto-approve", "--replace", "s0", "-C", str(repo.root), env=env)
    wait_for(lambda: server.count("POST", "/v1/batches/") >= 1, proc=proc)  # created; its cancel is refused
    proc.kill()
    proc.communicate()
    server.clear_faults()
    (new,) = [b for b in batches_by_name(server)["s0"] if b != old]  # same tags as the old one
    assert state_ids(repo) == {"s0": old} and repo.state()["entries"]["s0"]["intent"]

    result = apply(repo, env)  # no --replace: the intent it left says a replace is under way
    assert result.code == 0, result.out + result.err
    assert server.emulator.get_batch(old)["status"] in ("cancelling", "cancelled")
    assert server.emulator.get_batch(new)["status"] == "validating"
    assert [h["batch_id"] for h in repo.state()["entries"]["s0"]["history"]] == [old]
    assert_quiet(repo, server, env, names)
    assert kept(server) == {"s0": [new]}


# --- issue 19: found through the uploads, whatever the state's history ------------------------


@contextmanager
def server_clock(emulator, offset: float, timing: Timing | None = None) -> Iterator[None]:
    """The emulator's clock moved by `offset` seconds (and its batches' timing set) for a while."""
    clock, saved = emulator.clock, emulator.timing
    emulator.clock, emulator.timing = (lambda: clock() + offset), timing or saved
    try:
        yield
    finally:
        emulator.clock, emulator.timing = clock, saved


def _unrelated(sandbox, count: int, age: float = 60.0) -> None:
    """`count` batches someone else made `age` seconds ago (server clock); they stay validating."""
    emulator = sandbox.emulator
    with server_clock(emulator, -age, Timing.uniform(3600)):
        line = f'{{"custom_id":"x","method":"POST","url":"{ENDPOINT}","body":{{"model":"gpt-4o-mini"}}}}\n'
        file_id = emulator.upload_bytes(line.encode(), "other.jsonl", "batch")["id"]
        for i in range(count):
            emulator.create_batch({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h",
                                   "metadata": {"owner": "someone-else", "n": str(i)}})


def test_with_2000_unrelated_batches_and_no_state_a_plan_adopts_everything_in_two_requests(repo, sandbox):
    env = env_for(sandbox)
    _unrelated(sandbox, 2000)
    names = make_repo(repo, 20, settings=QUICK, shared=2)
    assert apply(repo, env).code == 0
    made = state_ids(repo)
    repo.state_path.unlink()
    sandbox.reset_log()

    document = plan_json(repo, env)
    assert {a["name"]: (a["action"], a["after"]["batch_id"]) for a in document["actions"]} == \
        {n: ("adopt", made[n]) for n in names}
    # the uploads, then one page of batches: ours are the newest 20, the page ends below the oldest upload
    assert sandbox.requests == [("GET", "/v1/files", 200), ("GET", "/v1/batches", 200)]
    assert apply(repo, env).code == 0 and state_ids(repo) == made and sandbox.writes() == 0


def test_state_rm_then_apply_adopts_the_batch_it_forgot(repo, sandbox):
    """The state's history does not change the answer: the batch is found through its upload."""
    env = env_for(sandbox)
    names = make_repo(repo, 2, settings=QUICK)
    assert apply(repo, env).code == 0
    made = state_ids(repo)
    _unrelated(sandbox, 150, age=0)  # made since, newer than ours: the walk goes past them
    assert run_cli("state", "rm", "s1", "-C", str(repo.root)).code == 0
    writes = sandbox.writes()
    assert [(a["name"], a["action"]) for a in plan_json(repo, env)["actions"]] == [("s0", "noop"), ("s1", "adopt")]
    assert apply(repo, env).code == 0
    assert sandbox.writes() == writes and state_ids(repo) == made
    assert_quiet(repo, sandbox, env, names)


def test_an_upload_without_a_batch_is_reused_and_the_batch_made_once(repo, sandbox):
    env = env_for(sandbox)
    names = make_repo(repo, 1, settings=QUICK)
    sandbox.add_fault(Fault(action="reject", method="POST", path_regex=r"^/v1/batches$", status=400))
    assert apply(repo, env).code == 1  # uploaded, then the create was refused: no batch
    assert sandbox.count("POST", "/v1/files") == 1
    assert [a["action"] for a in plan_json(repo, env)["actions"]] == ["create"]
    sandbox.clear_faults()
    assert apply(repo, env).code == 0
    assert sandbox.count("POST", "/v1/files") == 1  # the upload on the server was reused
    assert_quiet(repo, sandbox, env, names)


def test_an_input_file_id_spec_is_found_through_its_file(repo, sandbox):
    env = env_for(sandbox)
    (repo.root / "batchplan.yaml").write_text(QUICK)
    line = f'{{"custom_id":"q","method":"POST","url":"{ENDPOINT}","body":{{"model":"gpt-4o-mini","messages":[]}}}}\n'
    file_id = sandbox.emulator.upload_bytes(line.encode(), "mine.jsonl", "batch")["id"]
    repo.spec("by-id", input_file_id=file_id)
    assert apply(repo, env).code == 0
    made = state_ids(repo)
    _unrelated(sandbox, 150, age=0)
    repo.state_path.unlink()
    sandbox.reset_log()
    assert [a["action"] for a in plan_json(repo, env)["actions"]] == ["adopt"]
    assert sandbox.count("GET", f"/v1/files/{file_id}") == 1  # its created_at: the walk's floor
    assert apply(repo, env).code == 0 and state_ids(repo) == made
    sandbox.emulator.delete_file(file_id)
    repo.state_path.unlink()
    # the file is gone, so the search cannot reach the batch made from it: a create, refused
    # by the server (no such file), never a second batch
    assert [a["action"] for a in plan_json(repo, env)["actions"]] == ["create"]
