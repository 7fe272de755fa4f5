"""SIGKILL `batchplan apply` at every point of a run; re-running apply must converge.

A clean run first counts the requests a full apply makes (N). Then, each time on a
fresh server and a fresh repo, apply runs as a separate process and is killed with
SIGKILL as soon as the server has logged its k-th request (k = 1..N: the next request
is usually in flight, and lands after its client is dead), while an upload or a create
is stalled on the server (it lands while the next apply already runs), at a few
random times, and between the shards of a spec split into three (an upload and a create each).
After each kill, apply is re-run until it succeeds, every create in flight lands, and
apply runs once more (the net, as in model/apply.pml's last applier); then the server
must hold exactly one batch per spec that was not cancelled, and each input uploaded
once, the state must name those batches, and `plan --detailed-exitcode` must find
nothing to do. A kill point whose re-run starts with nothing in flight must have made
no second batch at all; one whose re-run starts while a create is held on the server
may (under load, the held create can land after the re-run's settling wait): the apply
after it cancels that one.

Both tests run on each state backend: the state file, and a workspace of its own per
kill point in PostgreSQL (a killed apply's database session ends, and its lock with it).
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from reconciler.sandbox import Fault
from tests.helpers import PgRepo, Repo, run_cli, spawn_cli
from tests.test_reliability import (KEY, apply, assert_converged, assert_quiet, batches_by_name, make_repo,
                                    state_ids, uploads_by_name, wait_for)

SETTINGS = "timeout: 0.5\nmax_retries: 2\n"  # a short timeout keeps the settling waits short
CLEAN_SETTINGS = "timeout: 10\nmax_retries: 2\n"
SPECS = 5  # s0 and s1 share one input: 4 uploads, 5 creates
LATENCY = 0.03
RANDOM_KILLS = 4
STALLED = [("/v1/files", 2), ("/v1/batches", 1), ("/v1/batches", 3), ("/v1/batches", 5)]  # (path, nth)


@pytest.fixture(params=["file", "postgresql"])
def new_repo(request, tmp_path):
    """Make a fresh repo per kill point: `new_repo(label)`, its state a file or a PostgreSQL workspace."""
    if request.param == "file":
        return lambda label: Repo(tmp_path / label)
    url = request.getfixturevalue("pg_url")
    return lambda label: PgRepo(tmp_path / label, url, workspace=label.replace("/", "-"))


def settings_of(repo: Repo, settings: str = SETTINGS) -> str:
    return repo.settings(settings) if isinstance(repo, PgRepo) else settings


def start(new_repo, make_server, label: str, settings: str = SETTINGS):
    server = make_server(latency=LATENCY)
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
    repo = new_repo(label)
    names = make_repo(repo, SPECS, settings=settings_of(repo, settings), shared=1)
    return repo, server, env, names


def spawn_apply(repo: Repo, env: dict, *extra: str):
    return spawn_cli("apply", "--auto-approve", "-C", str(repo.root), *extra, env=env)


def apply_until_it_succeeds(repo: Repo, env: dict) -> None:
    for _ in range(3):
        result = apply(repo, env)
        if result.code == 0:
            break
    assert result.code == 0, result.out + result.err


def converge(repo: Repo, server, env: dict, names: list[str], settled: bool = True) -> None:
    """`settled`: nothing is in flight when the re-run starts, so no second batch may ever be made."""
    if settled:
        server.wait_idle()
    apply_until_it_succeeds(repo, env)
    server.wait_idle()  # every create in flight has landed
    apply_until_it_succeeds(repo, env)  # the net: a create that landed late is cancelled
    assert_quiet(repo, server, env, names)
    if settled:
        assert_converged(repo, server, env, names)
    uploads = uploads_by_name(server)
    assert len(uploads) == SPECS - 1 and set(uploads.values()) == {1}, uploads


def kill(proc) -> bool:
    """SIGKILL it; True when it was still running (a kill point really covered)."""
    proc.kill()
    proc.communicate()
    return proc.returncode == -signal.SIGKILL


def test_sigkill_at_every_request_and_at_random_times(new_repo, emulator_server_factory, record_property):
    started = time.monotonic()
    # the clean run counts the requests of an apply with no fault: a generous timeout, so that on a
    # loaded machine no answer comes too late (a look for a lost create would add requests)
    repo, server, env, names = start(new_repo, emulator_server_factory, "clean", CLEAN_SETTINGS)
    clean_started = time.monotonic()
    clean = spawn_apply(repo, env, "--parallelism", "1")
    out, err = clean.communicate(timeout=30)
    assert clean.returncode == 0, out + err
    clean_seconds = time.monotonic() - clean_started
    full = len(server.requests)
    assert full == 1 + 1 + (SPECS - 1) + SPECS  # list uploads (plan), list uploads (apply), uploads, creates

    covered = []
    for k in range(1, full + 1):
        repo, server, env, names = start(new_repo, emulator_server_factory, f"k{k}")
        proc = spawn_apply(repo, env, "--parallelism", "1")
        wait_for(lambda: len(server.requests) >= k or proc.poll() is not None)
        if kill(proc):
            covered.append(f"after request {k}")
        converge(repo, server, env, names)

    for path, nth in STALLED:
        repo, server, env, names = start(new_repo, emulator_server_factory, f"stalled{path[4:]}{nth}")
        server.add_fault(Fault(action="stall", method="POST", path_regex=f"^{path}$", nth=nth, seconds=0.3))
        proc = spawn_apply(repo, env, "--parallelism", "1")
        wait_for(lambda: server.fault_status()[0]["fired"] or proc.poll() is not None)
        if kill(proc):
            covered.append(f"POST {path} #{nth} in flight")
        converge(repo, server, env, names, settled=False)  # re-run while it is still on its way

    rng = random.Random(4)
    for i in range(RANDOM_KILLS):
        repo, server, env, names = start(new_repo, emulator_server_factory, f"random{i}")
        proc = spawn_apply(repo, env)  # full parallelism: several requests in flight at once
        wait_for(lambda: len(server.requests) >= 1 or proc.poll() is not None)
        time.sleep(rng.uniform(0, LATENCY * 6))
        if kill(proc):
            covered.append(f"random {i}")
        converge(repo, server, env, names)

    record_property("kill_points", len(covered))
    print(f"\n{len(covered)} kill points covered: {', '.join(covered)}")
    assert len(covered) >= full - 1 + len(STALLED) + RANDOM_KILLS - 1
    # 60 s on this shared 2-core machine; more when it is busier, as measured by the clean run (~2 s)
    assert time.monotonic() - started < max(60.0, 30 * clean_seconds)


def test_sigkill_at_every_request_of_a_replace(new_repo, emulator_server_factory, record_property):
    """Replacing running batches: the new batch made once, the old one cancelled, whatever the kill."""
    from reconciler.sandbox import Timing

    def start_replace(label: str):
        server = emulator_server_factory(latency=LATENCY, timing=Timing.uniform(60))  # batches stay running
        env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
        repo = new_repo(label)
        names = make_repo(repo, 2, settings=settings_of(repo))
        assert apply(repo, env).code == 0
        old = {n: ids[0] for n, ids in batches_by_name(server).items()}
        for name in names:
            repo.spec(name, metadata={"team": "ml"}, input=f"../data/{name}.jsonl")
        server.reset_log()
        return repo, server, env, old

    repo, server, env, old = start_replace("clean")
    clean = spawn_apply(repo, env, "--parallelism", "1")
    out, err = clean.communicate(timeout=30)
    assert clean.returncode == 0, out + err
    full = len(server.requests)
    assert [r.method for r in server.requests].count("POST") == 4  # two creates, two cancels

    covered = 0
    for k in range(1, full + 1):
        repo, server, env, old = start_replace(f"k{k}")
        proc = spawn_apply(repo, env, "--parallelism", "1")
        wait_for(lambda: len(server.requests) >= k or proc.poll() is not None)
        covered += kill(proc)
        server.wait_idle()
        apply_until_it_succeeds(repo, env)
        server.wait_idle()
        named = batches_by_name(server)
        new = {n: [b for b in ids if b != old[n]] for n, ids in named.items()}
        assert {n: len(ids) for n, ids in new.items()} == {n: 1 for n in old}, named
        assert state_ids(repo) == {n: ids[0] for n, ids in new.items()}
        assert all(server.emulator.get_batch(b)["status"] in ("cancelling", "cancelled") for b in old.values())
        assert run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=env).code == 0

    record_property("kill_points", covered)
    print(f"\n{covered} kill points covered in a replace of {len(old)} running batches")
    assert covered >= full - 1


def test_sigkill_between_the_shards_of_one_spec(new_repo, emulator_server_factory, record_property):
    """A spec split into 3 shards: 3 uploads and 3 creates, each a kill point between two shards.
    After every kill: exactly one batch per shard, each shard uploaded once, an empty plan."""
    def start_sharded(label: str):
        server = emulator_server_factory(latency=LATENCY, max_requests=2)  # the sandbox refuses bigger batches
        env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}
        repo = new_repo(label)
        (repo.root / "batchplan.yaml").write_text(settings_of(repo))
        repo.spec("big", input=repo.data("big.jsonl", count=6), shard={"max_requests": 2})
        return repo, server, env

    shards = ["big[0]", "big[1]", "big[2]"]
    repo, server, env = start_sharded("clean")
    clean = spawn_apply(repo, env, "--parallelism", "1")
    out, err = clean.communicate(timeout=30)
    assert clean.returncode == 0, out + err
    full = len(server.requests)
    assert full == 1 + 1 + 3 + 3  # list batches, list files, an upload and a create per shard

    covered = 0
    for k in range(1, full + 1):
        repo, server, env = start_sharded(f"shards-k{k}")
        proc = spawn_apply(repo, env, "--parallelism", "1")
        wait_for(lambda: len(server.requests) >= k or proc.poll() is not None)
        covered += kill(proc)
        server.wait_idle()
        apply_until_it_succeeds(repo, env)
        assert_converged(repo, server, env, shards)
        uploads = uploads_by_name(server)
        assert len(uploads) == 3 and set(uploads.values()) == {1}, uploads

    record_property("kill_points", covered)
    print(f"\n{covered} kill points covered between the shards of one spec")
    assert covered >= full - 1
