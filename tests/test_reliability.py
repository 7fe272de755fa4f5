"""Never a duplicate batch, never a lost or corrupt state (issue 4).

Every test drives the real CLI against the emulator: on 127.0.0.1 where it injects the
server's faults (answers lost after a commit, 5xx, 429s, stalls past the client
timeout) or signals another process, in this process (the sandbox transport) for a
locked or broken state. The server's own listing is the truth each test checks:
exactly one batch per spec, and a state that matches it.
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
from reconciler.sandbox import EmulatorService, Fault
from reconciler.state import FORMAT_VERSION
from reconciler.stores.file import FileStore
from tests.helpers import KEY, Repo, run_cli, spawn_cli

FAST_SETTINGS = "timeout: 1\nmax_retries: 2\n"


# --- what the server holds ------------------------------------------------------------------


def server_batches(server: EmulatorService) -> list[dict]:
    """Every batch on the server, newest first (read from the emulator, not over HTTP)."""
    batches, after = [], None
    while True:
        page = server.emulator.list_batches(after=after, limit=100)
        batches += page["data"]
        if not page["has_more"]:
            return batches
        after = page["data"][-1]["id"]


def batches_by_name(server: EmulatorService) -> dict[str, list[str]]:
    """Spec name -> ids of every batch on the server carrying batchplan's tags for it."""
    named: dict[str, list[str]] = {}
    for batch in server_batches(server):
        name = (batch.get("metadata") or {}).get("batchplan_name")
        if name:
            named.setdefault(name, []).append(batch["id"])
    return named


def uploads_by_name(server: EmulatorService) -> Counter:
    """How many times each input was uploaded (its name carries its content hash)."""
    return Counter(f["filename"] for f in server.emulator.list_files(purpose="batch")["data"]
                   if ".batchplan-" in f["filename"])


def state_ids(repo: Repo) -> dict[str, str | None]:
    return {name: (entry["batch"] or {}).get("id") for name, entry in repo.state()["entries"].items()}


def assert_converged(repo: Repo, server: EmulatorService, env: dict, names: list[str]) -> None:
    """Exactly one batch per spec on the server, the state holds those ids, and plan is empty."""
    assert server.wait_idle(), "a request is still being handled"
    named = batches_by_name(server)
    assert {n: len(ids) for n, ids in named.items()} == {n: 1 for n in names}, named
    assert state_ids(repo) == {n: ids[0] for n, ids in named.items()}
    assert not any(e["intent"] for e in repo.state()["entries"].values())
    check = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=env)
    assert check.code == 0, check.out + check.err


def kept(server: EmulatorService) -> dict[str, list[str]]:
    """Spec name -> its tagged batches that were not cancelled (running or completed), newest first."""
    named: dict[str, list[str]] = {}
    for batch in server_batches(server):
        name = (batch.get("metadata") or {}).get("batchplan_name")
        if name and batch["status"] not in ("cancelling", "cancelled"):
            named.setdefault(name, []).append(batch["id"])
    return named


def assert_quiet(repo: Repo, server: EmulatorService, env: dict, names: list[str]) -> None:
    """The README's promise once every create has landed and one more apply ran: per spec exactly one
    batch that was not cancelled (a duplicate that landed late was cancelled), the state names it,
    no intent is left, and plan is empty."""
    assert server.wait_idle(), "a request is still being handled"
    alive = kept(server)
    assert {n: len(ids) for n, ids in alive.items()} == {n: 1 for n in names}, alive
    assert state_ids(repo) == {n: ids[0] for n, ids in alive.items()}
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


def writes_to(server: EmulatorService, path: str) -> int:
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
    first = apply(repo, api_env)  # it looks for the lost batch and adopts it, in the same apply
    assert first.code == 0, first.out + first.err
    assert "found its lost create on the server" in first.out
    assert emulator_server.fault_status()[0]["fired"] == 1
    assert_converged(repo, emulator_server, api_env, names)
    assert writes_to(emulator_server, "/v1/batches") == 3


@pytest.mark.parametrize("fault", LOST_ANSWERS, ids=list(LOST_ANSWERS))
def test_a_lost_upload_answer_is_found_again_by_its_hash(repo, emulator_server, api_env, fault):
    names = make_repo(repo, 2)
    emulator_server.add_fault(Fault(method="POST", path_regex=r"^/v1/files$", **LOST_ANSWERS[fault]))
    first = apply(repo, api_env)
    assert first.code == 0, first.out + first.err
    assert emulator_server.fault_status()[0]["fired"] == 1
    assert emulator_server.wait_idle()
    uploads = uploads_by_name(emulator_server)
    assert len(uploads) == 2 and set(uploads.values()) == {1}, uploads
    assert_converged(repo, emulator_server, api_env, names)


# --- 2. a lost state ------------------------------------------------------------------------


def test_a_lost_state_is_rebuilt_by_adopting_with_no_write(repo, sandbox, sandbox_env):
    names = make_repo(repo, 3, shared=1)
    assert apply(repo, sandbox_env).code == 0
    made = state_ids(repo)
    repo.state_path.unlink()
    writes = sandbox.writes()

    plan = run_cli("plan", "--json", "-C", str(repo.root), env=sandbox_env)
    assert plan.code == 0, plan.err
    assert {a["name"]: a["action"] for a in plan.json["actions"]} == {n: "adopt" for n in names}
    assert sandbox.writes() == writes

    rebuilt = apply(repo, sandbox_env)
    assert rebuilt.code == 0, rebuilt.out + rebuilt.err
    assert sandbox.writes() == writes
    assert state_ids(repo) == made
    assert_converged(repo, sandbox, sandbox_env, names)


def test_a_state_older_than_the_server_adopts_the_replacement_it_missed(repo, sandbox, sandbox_env):
    """A state restored from a backup or an old commit: the replace it lacks already happened."""
    make_repo(repo, 1)
    assert apply(repo, sandbox_env).code == 0
    old_state = repo.state_path.read_text()
    repo.spec("s0", metadata={"team": "ml"}, input="../data/s0.jsonl")
    assert apply(repo, sandbox_env).code == 0
    repo.state_path.write_text(old_state)

    again = apply(repo, sandbox_env)
    assert again.code == 0, again.out + again.err
    assert "already exists" in again.out
    assert len(batches_by_name(sandbox)["s0"]) == 2  # the original and its one replacement
    assert writes_to(sandbox, "/v1/batches") == 2
    check = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=sandbox_env)
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


def test_a_400_is_not_retried_and_shows_message_type_and_param(repo, sandbox, sandbox_env):
    (repo.root / "batchplan.yaml").write_text(FAST_SETTINGS)
    repo.spec("bad", input_file_id="file-doesnotexist")
    result = apply(repo, sandbox_env)
    assert result.code == 1
    output = result.out + result.err
    assert "Cannot find input file file-doesnotexist" in output
    assert "type=invalid_request_error" in output and "param=input_file_id" in output
    assert "Traceback" not in output
    assert writes_to(sandbox, "/v1/batches") == 1


@pytest.mark.parametrize("fault", [dict(action="reject", status=503, times=2), dict(action="drop_after_commit")],
                         ids=["503", "dropped"])
def test_a_list_is_retried_on_5xx_and_lost_connections(repo, emulator_server, api_env, fault):
    make_repo(repo, 1)
    emulator_server.add_fault(Fault(method="GET", path="/v1/batches", **fault))
    result = run_cli("plan", "--scan-all", "-C", str(repo.root), env=api_env)  # nothing uploaded: no walk else
    assert result.code == 0, result.err
    assert emulator_server.count("GET", "/v1/batches") == 1 + emulator_server.fault_status()[0]["fired"]


def test_retries_are_bounded_and_the_last_error_is_shown(repo, emulator_server, api_env):
    make_repo(repo, 1)  # max_retries: 2
    emulator_server.add_fault(Fault(action="reject", method="GET", status=500, times=None))
    started = time.monotonic()
    result = run_cli("plan", "--scan-all", "-C", str(repo.root), env=api_env)  # the one GET a plan sends
    assert result.code == 1
    assert "GET /batches: server answered 500" in result.err and "Traceback" not in result.err
    assert emulator_server.count("GET") == 3
    assert time.monotonic() - started < 15  # two short backoffs, not a long wait


def test_a_read_and_a_cancel_are_retried_on_5xx(repo, emulator_server_factory):
    from reconciler.sandbox import Timing

    server = emulator_server_factory(timing=Timing.uniform(30))  # the batch stays running
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    make_repo(repo, 2)
    assert apply(repo, env).code == 0
    server.reset_log()
    server.add_fault(Fault(action="reject", method="GET", path_regex=r"^/v1/batches/batch_", status=502))
    assert run_cli("status", "-C", str(repo.root), env=env).code == 0  # a GET of each running batch
    assert [r.status for r in server.requests].count(502) == 1 and server.count("GET", "/v1/batches/") == 3
    server.clear_faults()
    repo.remove_spec("s1")
    server.add_fault(Fault(action="reject", method="POST", path_regex=r"/cancel$", status=503))
    result = apply(repo, env)
    assert result.code == 0, result.out + result.err
    assert "cancelled" in result.out
    assert server.count("POST", "/v1/batches/") == 2
    assert server.emulator.get_batch(batches_by_name(server)["s1"][0])["status"] in ("cancelling", "cancelled")
    assert set(repo.state()["entries"]) == {"s0"}


# --- 4. one apply at a time ------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from reconciler.stores.base import LockInfo
from reconciler.stores.file import FileStore
store = FileStore(Path(sys.argv[1]))
store.lock(LockInfo.new("batchplan apply --auto-approve"), 0)
print("locked", flush=True)
time.sleep(60)
"""


def hold_lock_in_a_process(state_path: Path):
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(state_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_apply_fails_fast_saying_who_holds_the_lock(repo, sandbox, sandbox_env):
    make_repo(repo, 1)
    holder = hold_lock_in_a_process(repo.state_path)
    try:
        started = time.monotonic()
        result = apply(repo, sandbox_env)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.code == 1
    message = result.err
    assert "locked" in message and f"pid {holder.pid}" in message and os.uname().nodename in message
    assert "(batchplan apply --auto-approve)" in message and "since 20" in message
    assert "--lock-timeout" in message and "stop it: its lock is released the moment it exits" in message
    assert took < 10 and sandbox.requests == []  # no wait for the lock


def test_lock_timeout_waits_for_the_holder_to_finish(repo, sandbox, sandbox_env):
    names = make_repo(repo, 1)
    held = threading.Event()

    def hold() -> None:
        with FileStore(repo.state_path).transaction("batchplan apply"):
            held.set()
            time.sleep(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    result = apply(repo, sandbox_env, "--lock-timeout", "10")
    holder.join()
    assert result.code == 0, result.err
    assert_converged(repo, sandbox, sandbox_env, names)


def test_a_lock_left_by_a_killed_process_blocks_nothing_and_force_unlock_clears_it(repo, sandbox, sandbox_env):
    names = make_repo(repo, 1)
    holder = hold_lock_in_a_process(repo.state_path)
    holder.kill()
    holder.wait()
    info = repo.state_path.with_name("batchplan.state.json.lock.info")
    assert json.loads(info.read_text())["pid"] == holder.pid  # its note is left behind

    wrong = run_cli("force-unlock", "not-the-id", "-C", str(repo.root))
    assert wrong.code == 1 and "nothing was changed" in wrong.err and info.exists()
    lock_id = json.loads(info.read_text())["id"]
    unlocked = run_cli("force-unlock", lock_id, "-C", str(repo.root))
    assert unlocked.code == 0 and f"pid {holder.pid}" in unlocked.out
    assert not info.exists()

    holder = hold_lock_in_a_process(repo.state_path)
    holder.kill()
    holder.wait()
    result = apply(repo, sandbox_env)  # a dead holder's lock does not block
    assert result.code == 0, result.err
    assert_converged(repo, sandbox, sandbox_env, names)


def test_two_applies_at_once_make_one_batch_per_spec_and_the_loser_says_locked(repo, emulator_server_factory):
    server = emulator_server_factory(latency=0.1)
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    names = make_repo(repo, 3)
    procs = [spawn_cli("apply", "--auto-approve", "-C", str(repo.root), env=env) for _ in range(2)]
    results = [(p.wait(timeout=30), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, _, err in results if code == 1)
    assert "is locked by pid" in loser and "--lock-timeout" in loser
    assert_converged(repo, server, env, names)


# --- 5. state integrity ---------------------------------------------------------------------


def test_a_truncated_state_is_refused_untouched_and_nothing_is_sent(repo, sandbox, sandbox_env):
    make_repo(repo, 2)
    assert apply(repo, sandbox_env).code == 0
    text = repo.state_path.read_bytes()
    repo.state_path.write_bytes(text[: len(text) // 2])
    broken = repo.state_path.read_bytes()
    sandbox.reset_log()
    for command in (["plan"], ["apply", "--auto-approve"], ["plan", "--json"]):
        result = run_cli(*command, "-C", str(repo.root), env=sandbox_env)
        assert result.code == 1, command
        assert str(repo.state_path) in result.err and "not valid JSON" in result.err
        assert "backup" in result.err and "Traceback" not in result.err
        assert repo.state_path.read_bytes() == broken
    assert sandbox.requests == []


def test_a_state_from_a_newer_batchplan_asks_for_an_upgrade(repo, sandbox, sandbox_env):
    make_repo(repo, 1)
    assert apply(repo, sandbox_env).code == 0
    newer = {**repo.state(), "format_version": FORMAT_VERSION + 1}
    repo.state_path.write_text(json.dumps(newer))
    before = repo.state_path.read_bytes()
    sandbox.reset_log()
    result = apply(repo, sandbox_env)
    assert result.code == 1 and "upgrade batchplan" in result.err and str(repo.state_path) in result.err
    assert repo.state_path.read_bytes() == before and sandbox.requests == []


def test_the_backup_holds_the_state_as_it_was_before_the_last_apply(repo, sandbox, sandbox_env):
    make_repo(repo, 1)
    assert apply(repo, sandbox_env).code == 0
    before = repo.state_path.read_bytes()
    repo.spec("s1")
    assert apply(repo, sandbox_env).code == 0  # saves several times: the intent, the batch, the end
    assert repo.state_path.with_name("batchplan.state.json.backup").read_bytes() == before
    assert repo.state()["serial"] > json.loads(before)["serial"] + 1
    assert json.loads(before)["lineage"] == repo.state()["lineage"]
    assert not list(repo.state_path.parent.glob(".*.tmp"))


# --- 6. Ctrl-C and SIGTERM --------------------------------------------------------------------


def wait_for(condition, timeout: float = 20.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, proc and proc.communicate()
        time.sleep(0.005)


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT], [signal.SIGINT, signal.SIGINT],
                                     [signal.SIGINT] * 10],  # the later ones land while it closes and reports
                         ids=["SIGTERM", "SIGINT", "SIGINT-twice", "SIGINT-ten-times"])
def test_a_signal_during_apply_saves_what_was_done_and_the_next_apply_converges(repo, emulator_server_factory,
                                                                                  signals):
    server = emulator_server_factory(latency=0.1)
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    names = make_repo(repo, 6)
    proc = spawn_cli("apply", "--auto-approve", "--parallelism", "1", "-C", str(repo.root), env=env)
    wait_for(lambda: server.count("POST", "/v1/batches") >= 1, proc=proc)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=20)
    # a second Ctrl-C that lands after the state was saved may end the process by SIGINT
    # itself while it exits: a shell shows 130 for that too
    assert proc.returncode in ((130, -signal.SIGINT) if len(signals) > 1 else (130,)), out + err
    assert "interrupted" in err and "run `batchplan apply` again" in err and "Traceback" not in err
    server.wait_idle()
    recorded = {n: e["batch"]["id"] for n, e in repo.state()["entries"].items() if e["batch"]}
    on_server = {n: ids[0] for n, ids in batches_by_name(server).items()}
    assert 1 <= len(on_server) < 6
    if len(signals) == 1:  # the request in flight was let finish, and recorded
        assert recorded == on_server
    else:  # abandoned in flight: not recorded, but its intent is, so the next apply adopts it
        assert recorded.items() <= on_server.items()
    result = apply(repo, env)
    assert result.code == 0, result.out + result.err
    assert_converged(repo, server, env, names)


# --- 8. the key stays secret; 9. never in clear to another host ------------------------------


def test_the_api_key_is_in_no_file_and_no_output(repo, emulator_server, api_env):
    make_repo(repo, 3, shared=1)
    outputs = []

    def run(*args: str, env: dict = api_env):
        result = run_cli(*args, "-C", str(repo.root), env=env)
        outputs.append(result.out + result.err)
        return result

    emulator_server.add_fault(Fault(action="drop_after_commit", method="POST", path_regex=r"^/v1/batches$"))
    run("apply", "--auto-approve", "--debug")
    run("plan", "--json", "--debug")
    repo.spec("s3")
    run("plan", "--out", str(repo.root / "tfplan"))
    run("apply", str(repo.root / "tfplan"), "--debug")
    repo.spec("bad", input_file_id="file-doesnotexist")
    assert run("apply", "--auto-approve", "--debug").code == 1  # a 400, with its traceback
    repo.remove_spec("bad")
    dead = {**api_env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # nothing listens on port 9
    # --scan-all: always asks the server (even once every batch has finished): a transport error
    assert run("plan", "--scan-all", "--debug", env=dead).code == 1
    with FileStore(repo.state_path).transaction("batchplan apply"):
        assert run("apply", "--auto-approve", "--debug").code == 1  # locked
        assert KEY not in repo.state_path.with_name("batchplan.state.json.lock.info").read_text()
    proc = spawn_cli("apply", "--auto-approve", "--debug", "--replace", "s0", "-C", str(repo.root), env=api_env)
    outputs += proc.communicate(timeout=30)
    repo.state_path.write_text("{")
    assert run("plan", "--debug").code == 1
    assert any("Traceback" in text for text in outputs)  # --debug output was really looked at

    for text in outputs:
        assert KEY not in text
    files = [p for p in repo.root.rglob("*") if p.is_file()]
    assert {"batchplan.state.json", "batchplan.state.json.backup", "tfplan"} <= {p.name for p in files}
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_plain_http_to_another_host_is_refused_before_anything_is_sent(repo):
    make_repo(repo, 1)
    env = {"OPENAI_BASE_URL": "http://example.invalid/v1", "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    for command in (["plan"], ["apply", "--auto-approve"]):
        started = time.monotonic()
        result = run_cli(*command, "-C", str(repo.root), env=env)
        assert result.code == 1
        assert "plain http" in result.err and "--allow-insecure-http" in result.err and "example.invalid" in result.err
        assert KEY not in result.out + result.err and "Traceback" not in result.err
        assert time.monotonic() - started < 10  # no connection attempted, no retries
    assert not repo.state_path.exists()


def test_which_base_urls_may_carry_the_key():
    for url in ("http://127.0.0.1:8089/v1", "http://localhost:1/v1", "http://[::1]:1/v1", "https://example.invalid/v1"):
        assert check_base_url(url) == url
    for url in ("http://example.invalid/v1", "http://10.1.2.3/v1", "http://localhost.example.invalid/v1"):
        with pytest.raises(ConfigError, match="--allow-insecure-http"):
            check_base_url(url)
        assert check_base_url(url, allow_insecure=True) == url
    with pytest.raises(ConfigError, match="not an http"):
        check_base_url("ftp://127.0.0.1/v1")


# --- a replace stopped between making the new batch and cancelling the old one ---------------


def test_a_replace_whose_cancel_failed_cancels_on_the_next_apply(repo, emulator_server_factory):
    from reconciler.sandbox import Timing

    server = emulator_server_factory(timing=Timing.uniform(30))  # batches stay running
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    make_repo(repo, 1)
    assert apply(repo, env).code == 0
    (old,) = batches_by_name(server)["s0"]
    repo.spec("s0", metadata={"team": "ml"}, input="../data/s0.jsonl")
    server.add_fault(Fault(action="reject", method="POST", path_regex=r"/cancel$", status=500, times=None))
    failed = apply(repo, env)
    assert failed.code == 1 and "server answered 500" in failed.out + failed.err
    assert server.emulator.get_batch(old)["status"] == "validating"

    server.clear_faults()
    result = apply(repo, env)
    assert result.code == 0, result.out + result.err
    assert server.emulator.get_batch(old)["status"] in ("cancelling", "cancelled")
    new = [b for b in batches_by_name(server)["s0"] if b != old]
    assert len(new) == 1 and state_ids(repo) == {"s0": new[0]}
    assert [h["batch_id"] for h in repo.state()["entries"]["s0"]["history"]] == [old]
    check = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=env)
    assert check.code == 0, check.out
