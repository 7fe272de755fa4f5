"""Every command ends in bounded time, and every bad input is one clear message (issue 18).

A misbehaving server is the emulator with a fault armed (a huge Retry-After, pages that never
end, an answer that drips or is huge), on 127.0.0.1; Ctrl-C and SIGTERM are sent to batchplan
run as its own process. Each test also bounds how long the command took.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from reconciler.planfile import PLANFILE_VERSION
from reconciler.api import Api
from reconciler.errors import BadAnswer, Interrupted, LockError
from reconciler.sandbox import Fault, Timing
from reconciler.stores.base import LockInfo
from reconciler.stores.file import FileStore
from tests.helpers import KEY, Repo, env_for, run_cli, spawn_cli

SETTINGS = "timeout: 1\nmax_retries: 2\n"

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
               for p, c in zip(["", *"abcdefgh"], "abcdefghi"))  # 9 ** 9 values once expanded


def make_repo(repo: Repo, count: int = 1, settings: str = SETTINGS) -> list[str]:
    (repo.root / "batchplan.yaml").write_text(settings)
    names = [f"s{i}" for i in range(count)]
    for name in names:
        repo.spec(name)
    return names


def cli(repo: Repo, *args: str, env: dict | None = None):
    return run_cli(*args, "-C", str(repo.root), env=env)


# Every bound below is far under the hang its test guards against (a wait of 30 s or more, or forever) and far
# over a command's start on a busy two-core machine, so a loaded CI machine cannot fail a test that is right.
PROMPTLY = 15.0


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def wait_until(condition, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)


# -- 9. YAML alias bombs ---------------------------------------------------------------------------


def test_an_alias_bomb_in_a_spec_is_refused_before_any_walk(repo):
    make_repo(repo)
    (repo.root / "specs" / "bomb.yaml").write_text(f"{BOMB}name: bomb\n")
    for command in ("validate", "plan", "apply"):
        result, took = timed(lambda: cli(repo, command, "--sandbox", *(["--auto-approve"] * (command == "apply")))
                             if command != "validate" else cli(repo, command))
        assert result.code == 1 and took < PROMPTLY, (command, took, result.err)
        assert ("specs/bomb.yaml:2: YAML anchors and aliases (&name, *name) are not allowed in a spec; write the "
                "value out, so that a reviewer sees what the batch gets") in result.err, result.err


def test_a_spec_with_any_alias_is_refused_naming_its_line(repo):
    make_repo(repo)
    (repo.root / "specs" / "s1.yaml").write_text("name: s1\nendpoint: &e /v1/embeddings\ninput: ../data/s0.jsonl\n"
                                                 "metadata:\n  team: *e\n")
    result = cli(repo, "validate")
    assert result.err == ("Error: 1 problem found; nothing was sent or written\nspecs/s1.yaml:5: YAML anchors and "
                          "aliases (&name, *name) are not allowed in a spec; write the value out, so that a reviewer "
                          "sees what the batch gets\n")


@pytest.mark.parametrize("text, line", [(BOMB, 4), ("loop: &a [*a]\n", 1)], ids=["bomb", "loop"])
def test_batchplan_yaml_allows_a_few_aliases_but_not_a_bomb_or_a_loop(repo, text, line):
    make_repo(repo)
    (repo.root / "batchplan.yaml").write_text("timeout: &t 5\nmax_wait: *t\n")
    assert cli(repo, "validate").code == 0
    (repo.root / "batchplan.yaml").write_text(text)
    result, took = timed(lambda: cli(repo, "validate"))
    assert took < PROMPTLY and result.err == (f"Error: batchplan.yaml:{line}: YAML aliases here repeat more than 1,000 "
                                       "values in all (an alias bomb, or a loop such as &a [*a]); write the values "
                                       "out\n")


# -- 10. a Retry-After longer than batchplan waits; Ctrl-C during a wait -----------------------------


def test_a_retry_after_longer_than_max_wait_gives_up_at_once_with_a_clear_message(repo, emulator_server):
    make_repo(repo)
    emulator_server.add_fault(Fault(action="reject", method="GET", path="/v1/files", retry_after=999999,
                                    times=None))
    result, took = timed(lambda: cli(repo, "plan", env=env_for(emulator_server)))
    assert took < PROMPTLY and result.code == 1
    assert result.err == ("Error: GET /files: server answered 429: asked to wait 999999 s before trying again "
                          "(Retry-After), longer than batchplan waits (60 s, `max_wait:` in batchplan.yaml); "
                          "nothing more was sent. Try again later\n")
    assert emulator_server.count("GET") == 1


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_one_ctrl_c_cuts_a_long_retry_after_wait_and_exits_130(repo, emulator_server, command):
    make_repo(repo, settings="max_wait: 600\n")
    emulator_server.add_fault(Fault(action="reject", method="GET", path="/v1/files", retry_after=100, times=None))
    proc = spawn_cli(command, *(["--auto-approve"] * (command == "apply")), "-C", str(repo.root),
                     env=env_for(emulator_server))
    wait_until(lambda: emulator_server.count("GET") >= 1, proc)
    time.sleep(0.3)  # into the 100 s wait
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - sent < PROMPTLY, (out, err)
    assert "Traceback" not in err


# -- 11. pagination that never ends ------------------------------------------------------------------


def test_a_server_that_ignores_the_cursor_is_stopped_at_the_repeated_page(repo, emulator_server):
    names = make_repo(repo)
    env = env_for(emulator_server)
    assert cli(repo, "apply", "--auto-approve", env=env).code == 0
    (repo.root / "state" / "batchplan.state.json").unlink()  # plan must walk the list to find it again
    emulator_server.add_fault(Fault(action="endless_pages", method="GET", path="/v1/batches", times=None))
    listed_before = emulator_server.count("GET", "/v1/batches")
    result = cli(repo, "plan", env=env)
    # stopped at the first repeated page: counted in requests, not seconds, so a busy machine cannot fail it
    assert emulator_server.count("GET", "/v1/batches") - listed_before == 2
    assert result.code == 1 and names
    batch_id = emulator_server.emulator.list_batches(limit=1)["data"][0]["id"]
    assert result.err == (f"Error: GET /batches: unexpected answer from the server: a page ended with {batch_id!r} "
                          "again: the server ignores `after` and would list the same items forever; stopped "
                          "listing\n")


def test_a_list_that_never_stops_saying_has_more_ends_at_the_page_cap(emulator_server):
    emulator_server.emulator.upload_bytes(b'{"custom_id": "a"}\n', "a.jsonl", "batch")
    emulator_server.add_fault(Fault(action="endless_pages", method="GET", path="/v1/files", fresh_ids=True,
                                    times=None))

    async def run() -> list[dict]:
        async with Api(emulator_server.url, KEY, max_pages=20) as api:
            return await api.list_files()

    with pytest.raises(BadAnswer, match=r"^GET /files: unexpected answer from the server: still more after 20 "
                                        r"pages; stopped listing"):
        asyncio.run(run())
    assert emulator_server.count("GET", "/v1/files") == 20


def test_sigterm_stops_an_apply_that_lists_files_forever(repo, emulator_server):
    make_repo(repo)
    emulator_server.emulator.upload_bytes(b'{"custom_id": "a"}\n', "a.jsonl", "batch")
    emulator_server.add_fault(Fault(action="endless_pages", method="GET", path="/v1/files", fresh_ids=True,
                                    times=None))
    proc = spawn_cli("apply", "--auto-approve", "-C", str(repo.root), env=env_for(emulator_server))
    wait_until(lambda: emulator_server.count("GET", "/v1/files") >= 20, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - sent < PROMPTLY, (out, err)
    assert emulator_server.count("POST", "/v1/files") == 0 and emulator_server.count("POST", "/v1/batches") == 0


# -- 12, 13, 15. a dripping answer, a huge answer, a tiny timeout ------------------------------------


def test_an_answer_that_drips_ends_at_the_whole_requests_deadline(repo, emulator_server):
    make_repo(repo, settings="timeout: 1\nmax_retries: 0\n")
    emulator_server.add_fault(Fault(action="drip", method="GET", path="/v1/files", seconds=0.05, times=None))
    result, took = timed(lambda: cli(repo, "plan", env=env_for(emulator_server)))
    # each byte beats the 1 s read timeout, but not the whole request's deadline
    assert result.code == 1 and took < PROMPTLY, (took, result.err)
    assert result.err == (f"Error: GET /files: no answer from {emulator_server.url} (the request timed out after "
                          "1 s (`timeout:` in batchplan.yaml))\n")


def test_a_huge_json_answer_is_refused_without_being_read(repo, emulator_server):
    make_repo(repo)
    emulator_server.add_fault(Fault(action="huge_body", method="GET", path="/v1/files", size=300 << 20,
                                    times=None))
    result, took = timed(lambda: cli(repo, "plan", env=env_for(emulator_server)))
    assert result.code == 1 and took < PROMPTLY
    assert result.err == ("Error: GET /files: unexpected answer from the server: the answer is larger than 32 MB, "
                          "more than batchplan reads for one JSON answer; stopped reading (is OPENAI_BASE_URL an "
                          "OpenAI-compatible API?)\n")


def test_a_tiny_timeout_says_the_connection_timed_out(repo, emulator_server):
    make_repo(repo, settings="timeout: 1e-9\nmax_retries: 0\n")
    result = cli(repo, "plan", env=env_for(emulator_server))
    assert result.code == 1
    assert result.err in (f"Error: GET /files: cannot reach {emulator_server.url}: the connection timed out "
                          "after 1e-09 s\n",
                          f"Error: GET /files: no answer from {emulator_server.url} (the request timed out after "
                          "1e-09 s (`timeout:` in batchplan.yaml))\n")


def test_sandbox_serve_on_a_port_in_use_is_one_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn_cli("sandbox", "serve", "--port", str(port))
        out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (1, "")
    assert err == (f"Error: sandbox serve: cannot listen on 127.0.0.1:{port}: another program is listening there; "
                   "pick another port with --port (or stop that program)\n")


# -- 16. format_version compared strictly ------------------------------------------------------------


@pytest.mark.parametrize("version, said", [
    ("2", "written by a newer batchplan (state format 2, this one reads 1); upgrade batchplan"),
    (2.0, "written by a newer batchplan (state format 2.0, this one reads 1); upgrade batchplan"),
    ("1", "format_version: '1' is not a state format this batchplan reads (the integer 1)"),
    (True, "format_version: True is not a state format this batchplan reads (the integer 1)"),
])
def test_a_state_format_version_is_compared_strictly(repo, sandbox, sandbox_env, version, said):
    make_repo(repo)
    repo.state_path.parent.mkdir(parents=True)
    repo.state_path.write_text(json.dumps({"format_version": version, "lineage": "x", "serial": 1}))
    before = repo.state_path.read_bytes()
    result = cli(repo, "plan", env=sandbox_env)
    assert result.code == 1 and result.err.startswith(f"Error: {repo.state_path}: {said}"), result.err
    assert repo.state_path.read_bytes() == before and sandbox.requests == []


@pytest.mark.parametrize("version, said", [
    (str(PLANFILE_VERSION), f"format_version: '{PLANFILE_VERSION}' is not a plan file format this batchplan reads "
                            f"(the integer {PLANFILE_VERSION}); make a new plan with this batchplan"),
    (PLANFILE_VERSION + 1.0, f"written by a newer batchplan (plan file format {PLANFILE_VERSION + 1.0}, this one reads "
                             f"{PLANFILE_VERSION}); apply it with that batchplan, or make a new plan with this one"),
])
def test_a_plan_file_format_version_is_compared_strictly(repo, sandbox, sandbox_env, version, said):
    make_repo(repo)
    assert cli(repo, "plan", "--out", "p.json", env=sandbox_env).code == 0
    saved = json.loads((repo.root / "p.json").read_text())
    (repo.root / "p.json").write_text(json.dumps({**saved, "format_version": version}))
    result = cli(repo, "apply", "p.json", env=sandbox_env)
    assert result.err == f"Error: {repo.root / 'p.json'}: {said}\n"
    assert sandbox.writes() == 0


# -- 17. force-unlock ----------------------------------------------------------------------------------


def test_force_unlock_needs_the_id_refuses_a_live_holder_and_takes_it_with_force(repo, sandbox, sandbox_env):
    make_repo(repo)
    holder, info = FileStore(repo.state_path), LockInfo.new("batchplan apply")
    holder.lock(info, 0)
    try:
        assert cli(repo, "force-unlock").code == 1  # the id is required
        refused = cli(repo, "force-unlock", info.id)
        assert refused.code == 1 and "which is still running; nothing was changed" in refused.err
        assert "`force-unlock --force` takes the lock from it anyway" in refused.err
        forced = cli(repo, "force-unlock", info.id, "--force")
        assert forced.code == 0
        assert forced.err == (f"Note: {info.describe()} still holds the lock on {repo.state_path}; --force removes "
                              "it while that process runs on: its next save fails if another command saves first\n")
        assert forced.out == f"Removed the lock on {repo.state_path} (held by {info.describe()}).\n"
        assert cli(repo, "apply", "--auto-approve", env=sandbox_env).code == 0  # locks a new lock file
    finally:
        holder.unlock()
    assert FileStore(repo.state_path).holder() is None  # the old holder's unlock left the new notes alone


def test_force_unlock_with_no_note_refuses_any_id(tmp_path):
    store = FileStore(tmp_path / "s.json")
    holder = FileStore(tmp_path / "s.json")
    holder.lock(LockInfo.new("batchplan apply"), 0)
    holder.info_path.unlink()  # a note lost (a full disk, a hand)
    try:
        with pytest.raises(LockError, match="is locked by a process that left no note, so there is no lock "
                                            "made-up to remove; nothing was changed"):
            store.force_unlock("made-up")
        assert store.lock_path.exists() and store.holder_alive(LockInfo.new("x"))
    finally:
        holder.unlock()
    with pytest.raises(LockError, match="is not locked, so there is no lock made-up to remove"):
        store.force_unlock("made-up")


# -- 18. credentials in OPENAI_BASE_URL ---------------------------------------------------------------


def test_credentials_in_the_base_url_are_never_shown(repo):
    make_repo(repo, settings="max_retries: 0\n")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    env = {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": f"http://alice:s3cret@127.0.0.1:{port}/v1", "NO_COLOR": "1"}
    result = cli(repo, "plan", env=env)
    assert result.code == 1 and "s3cret" not in result.err and "alice" not in result.err
    assert f"cannot reach http://***@127.0.0.1:{port}/v1" in result.err
    insecure = cli(repo, "plan", env={**env, "OPENAI_BASE_URL": "http://alice:s3cret@example.com/v1"})
    assert insecure.err.startswith("Error: OPENAI_BASE_URL='http://***@example.com/v1' uses plain http")


# -- also: prevent_cancel, a failed cancel of a replace, uploads that leave files open ----------------


def test_every_prevent_cancel_refusal_is_shown_at_once(repo, sandbox_factory):
    sandbox = sandbox_factory(timing=Timing.uniform(60))  # the batches stay running
    env = env_for(sandbox)
    make_repo(repo, 2)
    for name in ("s0", "s1"):
        repo.spec(name, lifecycle={"prevent_cancel": True})
    assert cli(repo, "apply", "--auto-approve", env=env).code == 0
    for name in ("s0", "s1"):
        repo.spec(name, lifecycle={"prevent_cancel": True}, metadata={"v": "2"})
    result = cli(repo, "plan", env=env)
    head, *lines = result.err.splitlines()
    assert head == "Error: 2 changes are refused; nothing was sent or written"
    assert [line.split(":")[0] for line in lines] == ["s0", "s1"]
    assert all("lifecycle.prevent_cancel" in line for line in lines)


def test_a_replace_whose_cancel_fails_is_reported_failed_only(repo, sandbox_factory):
    sandbox = sandbox_factory(timing=Timing.uniform(60))
    env = env_for(sandbox)
    make_repo(repo)
    assert cli(repo, "apply", "--auto-approve", env=env).code == 0
    repo.spec("s0", metadata={"v": "2"})
    sandbox.add_fault(Fault(action="reject", method="POST", path_regex="/cancel$", status=400))
    result = cli(repo, "apply", "--auto-approve", env=env)
    assert result.code == 1
    assert "Apply finished with errors: 0 done, 1 failed" in result.err, result.err


def test_an_upload_retried_after_429s_leaves_no_file_open(emulator_server, tmp_path):
    opened = []

    class Tracked(type(Path())):
        def open(self, *args, **kwargs):
            opened.append(super().open(*args, **kwargs))
            return opened[-1]

    source = Tracked(tmp_path / "in.jsonl")
    source.write_bytes(b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n')
    opened.clear()
    emulator_server.add_fault(Fault(action="reject", method="POST", path="/v1/files", retry_after=0.01, times=3))

    async def run() -> dict:
        async with Api(emulator_server.url, KEY, backoff=0.01) as api:
            return await api.upload_file(source, "in.jsonl")

    assert asyncio.run(run())["bytes"] == source.stat().st_size
    assert len(opened) == 4 and all(fh.closed for fh in opened)


def test_a_read_waiting_out_a_429_is_interrupted_when_apply_stops(emulator_server):
    emulator_server.add_fault(Fault(action="reject", method="GET", path="/v1/batches", retry_after=30, times=None))

    async def run() -> None:
        async with Api(emulator_server.url, KEY, max_wait=60) as api:
            asyncio.get_running_loop().call_later(0.3, api.stopping.set)
            await api.retrieve_batch("batch_abc")

    result, took = timed(lambda: pytest.raises(Interrupted, asyncio.run, run()))
    assert took < PROMPTLY and str(result.value) == "GET /batches/{id}: not sent, batchplan is stopping"
