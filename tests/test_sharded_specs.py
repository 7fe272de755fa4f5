"""Issue 10, wired: a spec whose input is over a batch's limits is one batch per shard, end to end.

Every test drives the real CLI against the sandbox, which enforces the API's limits (here a small
`max_requests`, matched by the spec's `shard.max_requests`): apply -> wait -> one merged download
in input order; plans of appends and re-shards; --target and --replace of one shard; the state,
the JSON plan and status addressing each shard `NAME[K]`; adoption of shards by their tags.
"""

from __future__ import annotations

import json
import re

import pytest

from reconciler.sandbox import Timing
from reconciler.shards import ShardLimits, split_input
from tests.helpers import ENDPOINT, Repo, cli, env_for, request_line, write_jsonl
from tests.test_reliability import batches_by_name, server_batches, state_ids, uploads_by_name

LIMIT = 4  # requests per batch, on the sandbox and in the spec's shard: block


def big_input(repo: Repo, count: int) -> None:
    write_jsonl(repo.root / "data" / "big.jsonl", [request_line(f"q-{i}") for i in range(count)])


def big_spec(repo: Repo, count: int | None = 10, max_requests: int | None = LIMIT, **fields) -> None:
    if count is not None:
        big_input(repo, count)
    if max_requests is not None:
        fields["shard"] = {"max_requests": max_requests}
    repo.spec("big", input="../data/big.jsonl", **fields)


def ok(repo: Repo, env: dict, *args: str):
    result = cli(repo, env, *args)
    assert result.code == 0, result.out + result.err
    return result


def plan_lines(repo: Repo, env: dict, *args: str) -> list[str]:
    """The plan's head lines (symbol, address, action), batch ids and hashes blanked out."""
    out = cli(repo, env, "plan", *args).out
    return [re.sub(r"batch_[0-9a-f]+", "batch_…", line.strip()) for line in out.splitlines()
            if line.startswith("  ") and not line.startswith("      ")]


@pytest.fixture
def limited(sandbox_factory):
    """A sandbox that refuses a batch of more than LIMIT requests, as the API refuses 50,000."""
    return sandbox_factory(max_requests=LIMIT)


def test_a_spec_over_the_limit_is_applied_waited_and_downloaded_as_one(repo, limited):
    env = env_for(limited)
    big_spec(repo, 10)
    assert ok(repo, env, "validate").out == ("1 spec(s) valid; 1 input file(s), 10 request(s).\n"
                                              "  big: 10 requests: 3 shards of <=4\n")
    ok(repo, env, "apply", "--auto-approve")
    assert sorted(batches_by_name(limited)) == ["big[0]", "big[1]", "big[2]"]
    assert len(uploads_by_name(limited)) == 3  # each shard's own bytes, named by its own sha256
    assert ok(repo, env, "wait", "--interval", "0.05").out.endswith("All 3 batch(es) completed.\n")
    download = ok(repo, env, "download").out
    assert "big: wrote results/big/output.jsonl from 3 shards, in input order" in download
    merged = (repo.root / "results" / "big" / "output.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in merged] == [f"q-{i}" for i in range(10)]
    again = ok(repo, env, "download").out
    assert "big: results/big/output.jsonl already merged from 3 shards" in again
    assert again.endswith("Downloaded 0 file(s); 4 already there.\n")


def test_without_the_shard_block_the_limited_sandbox_fails_the_batch(repo, limited):
    """The sandbox really enforces the limit: the shards above are what makes the batches pass."""
    env = env_for(limited)
    big_spec(repo, 10, max_requests=None)
    ok(repo, env, "apply", "--auto-approve")
    assert cli(repo, env, "wait", "--interval", "0.05").code == 1
    (batch,) = server_batches(limited)
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "too_many_tasks"


def test_state_json_plan_and_tags_address_each_shard(repo, sandbox, sandbox_env):
    big_spec(repo, 6)
    document = json.loads(ok(repo, sandbox_env, "plan", "--json").out)
    assert [(a["name"], a["spec"], a["shard"]) for a in document["actions"]] == [
        ("big[0]", "big", 0), ("big[1]", "big", 1)]
    ok(repo, sandbox_env, "apply", "--auto-approve")
    entries = repo.state()["entries"]
    assert list(entries) == ["big[0]", "big[1]"]
    assert entries["big[1]"]["shard"] == {"index": 1, "start": entries["big[0]"]["shard"]["end"],
                                         "end": (repo.root / "data" / "big.jsonl").stat().st_size,
                                         "first_line": 5, "last_line": 6}
    for batch in server_batches(sandbox):
        tags = batch["metadata"]
        assert entries[tags["batchplan_name"]]["spec_hash"] == tags["batchplan_spec"]


def test_a_spec_that_fits_one_batch_keeps_its_plain_name_and_entry(repo, sandbox, sandbox_env):
    big_spec(repo, 3)
    ok(repo, sandbox_env, "apply", "--auto-approve")
    assert list(repo.state()["entries"]) == ["big"]
    assert "shard" not in repo.state()["entries"]["big"]  # states of specs that fit one batch do not change


def test_an_append_replaces_only_the_last_shard_and_creates_new_ones(repo, sandbox, sandbox_env):
    big_spec(repo, 6)
    ok(repo, sandbox_env, "apply", "--auto-approve")
    ok(repo, sandbox_env, "wait", "--interval", "0.05")
    big_input(repo, 13)
    assert plan_lines(repo, sandbox_env) == [
        "± big[1]  replace  changed: input_sha256",
        "+ big[2]  create   no batch for this shard in the state or on the server",
        "+ big[3]  create   no batch for this shard in the state or on the server"]
    ok(repo, sandbox_env, "apply", "--auto-approve")
    assert cli(repo, sandbox_env, "plan", "--detailed-exitcode").code == 0


def test_growing_past_the_limit_and_changing_shard_plan_the_right_changes(repo, sandbox_factory):
    env = env_for(sandbox_factory(timing=Timing.uniform(60)))  # batches stay running: cancels, not forgets
    big_spec(repo, 3)
    ok(repo, env, "apply", "--auto-approve")
    big_input(repo, 9)
    assert plan_lines(repo, env) == [
        "- big     cancel   big now makes 3 shards (big[0]..big[2]), so big goes; batch batch_… is validating",
        "+ big[0]  create   no batch for this shard in the state or on the server",
        "+ big[1]  create   no batch for this shard in the state or on the server",
        "+ big[2]  create   no batch for this shard in the state or on the server"]
    ok(repo, env, "apply", "--auto-approve")
    big_spec(repo, None, max_requests=5)
    assert plan_lines(repo, env) == [
        "± big[0]  replace  changed: input_sha256; batch batch_… is validating and will be cancelled",
        "± big[1]  replace  changed: input_sha256; batch batch_… is validating and will be cancelled",
        "- big[2]  cancel   big now makes 2 shards (big[0]..big[1]), so big[2] goes; batch batch_… is validating"]
    document = json.loads(cli(repo, env, "plan", "--json").out)
    assert [a["reason_code"] for a in document["actions"]] == ["input_changed", "input_changed", "resharded"]
    ok(repo, env, "apply", "--auto-approve")
    assert cli(repo, env, "plan", "--detailed-exitcode").code == 0


def test_target_and_replace_one_shard(repo, sandbox, sandbox_env):
    big_spec(repo, 10)
    assert plan_lines(repo, sandbox_env, "--target", "big[2]") == [
        "+ big[2]  create   no batch for this shard in the state or on the server"]
    ok(repo, sandbox_env, "apply", "--auto-approve", "--target", "big[2]")
    assert list(repo.state()["entries"]) == ["big[2]"]
    ok(repo, sandbox_env, "apply", "--auto-approve")
    before = state_ids(repo)
    (line,) = plan_lines(repo, sandbox_env, "--replace", "big[1]")
    assert line.startswith("± big[1]  replace  forced by --replace")
    ok(repo, sandbox_env, "apply", "--auto-approve", "--replace", "big[1]")
    after = state_ids(repo)
    assert [n for n in after if after[n] != before[n]] == ["big[1]"]
    assert len(plan_lines(repo, sandbox_env, "--replace", "big")) == 3  # a spec's name names all its shards


def test_prevent_cancel_holds_for_every_shard(repo, sandbox_factory):
    env = env_for(sandbox_factory(timing=Timing.uniform(60)))
    big_spec(repo, 6, lifecycle={"prevent_cancel": True})
    ok(repo, env, "apply", "--auto-approve")
    big_spec(repo, None, max_requests=3, lifecycle={"prevent_cancel": True})
    result = cli(repo, env, "plan")
    assert result.code == 1
    assert result.err.startswith("Error: 2 changes are refused; nothing was sent or written\n"
                                 "big[0]: replacing it would cancel batch batch_")  # every shard said at once
    assert "\nbig[1]: replacing it would cancel batch batch_" in result.err
    assert result.err.count("lifecycle.prevent_cancel") == 2


def test_a_lost_state_adopts_every_shard_by_its_tags(repo, sandbox, sandbox_env):
    big_spec(repo, 10)
    ok(repo, sandbox_env, "apply", "--auto-approve")
    made = state_ids(repo)
    repo.state_path.unlink()
    writes = sandbox.writes()
    assert plan_lines(repo, sandbox_env)[0].startswith("= big[0]  adopt    batch batch_")
    ok(repo, sandbox_env, "apply", "--auto-approve")
    assert state_ids(repo) == made and sandbox.writes() == writes


def test_status_shows_a_spec_line_and_with_shards_a_line_per_shard(repo, sandbox, sandbox_env):
    big_spec(repo, 10)
    repo.spec("small")
    ok(repo, sandbox_env, "apply", "--auto-approve")
    ok(repo, sandbox_env, "wait", "--interval", "0.05")
    ids = {name: batch_id[:14] + "…" for name, batch_id in state_ids(repo).items()}

    def table(*args: str) -> list[list[str]]:
        return [line.split()[:5] for line in ok(repo, sandbox_env, "status", *args).out.splitlines()[2:]]

    assert table() == [["big", "3", "shards", "completed", "10/10"],
                       ["small", ids["small"], "completed", "3/3", "0"]]
    assert table("--shards") == [["big", "3", "shards", "completed", "10/10"],
                                 ["big[0]", ids["big[0]"], "completed", "4/4", "0"],
                                 ["big[1]", ids["big[1]"], "completed", "4/4", "0"],
                                 ["big[2]", ids["big[2]"], "completed", "2/2", "0"],
                                 ["small", ids["small"], "completed", "3/3", "0"]]
    assert table("big[1]") == [["big", "1", "shards", "completed", "4/4"],
                               ["big[1]", ids["big[1]"], "completed", "4/4", "0"]]
    rows = json.loads(ok(repo, sandbox_env, "status", "--json", "big").out)["batches"]
    assert [(r["name"], r["spec"], r["shard"], r["shards"], r["request_counts"]["total"]) for r in rows] == [
        ("big", "big", None, 3, 10)]


def test_download_merges_only_when_every_shard_finished(repo, sandbox_factory):
    server = sandbox_factory(timing=Timing.uniform(60))
    env = env_for(server)
    big_spec(repo, 6)
    ok(repo, env, "apply", "--auto-approve")
    server.emulator.expire_batch(state_ids(repo)["big[0]"])  # finished (expired); big[1] runs on
    out = ok(repo, env, "download").out
    assert "big: 1 of 2 shards finished; its merged files are written once all have (`batchplan wait big`)" in out
    assert not (repo.root / "results" / "big" / "output.jsonl").exists()
    joining = ok(repo, env, "download", "big", "--join").out
    assert "  big: no joined.jsonl until every shard has finished (`batchplan wait big`)\n" in joining
    assert not (repo.root / "results" / "big" / "joined.jsonl").exists()


def test_each_shard_is_estimated_from_its_own_lines_and_counted_once(repo, sandbox, sandbox_env):
    """A shard's cost is its own requests' (not the whole file's once per shard), and the token
    cache keeps one entry per shard, under the shard's hash: a second plan counts nothing."""
    big_spec(repo, 10)
    actions = json.loads(ok(repo, sandbox_env, "plan", "--json").out)["actions"]
    assert [(a["name"], a["estimate"]["requests"]) for a in actions] == [("big[0]", 4), ("big[1]", 4),
                                                                         ("big[2]", 2)]
    shards = split_input(repo.root / "data" / "big.jsonl", ENDPOINT, ShardLimits(max_requests=LIMIT)).shards
    tokens = json.loads((repo.root / "state" / "tokens.json").read_text())["entries"]
    assert sorted(tokens) == sorted(f"{s.sha256} {ENDPOINT}" for s in shards)
    before = (repo.root / "state" / "tokens.json").stat().st_mtime_ns
    ok(repo, sandbox_env, "plan")
    assert (repo.root / "state" / "tokens.json").stat().st_mtime_ns == before


def test_download_join_and_batch_take_the_spec_name(repo, sandbox, sandbox_env):
    """`download big --join` joins every shard, in input order, into the spec's own joined.jsonl;
    `download big --batch ID` fetches the shard of big whose batch ID is (a shard's address too)."""
    big_spec(repo, 10)
    ok(repo, sandbox_env, "apply", "--auto-approve")
    ok(repo, sandbox_env, "wait", "--interval", "0.05")
    out = ok(repo, sandbox_env, "download", "big", "--join").out
    assert "  big: wrote results/big/joined.jsonl (10 requests, from 3 shards, in input order)\n" in out
    joined = [json.loads(line) for line in (repo.root / "results/big/joined.jsonl").read_text().splitlines()]
    assert [(j["custom_id"], j["request"]["messages"][0]["content"], j["response"]["status_code"], j["error"])
            for j in joined] == [(f"q-{i}", f"q-{i}", 200, None) for i in range(10)]

    ids = state_ids(repo)
    for name in ("big", "big[1]"):
        out = ok(repo, sandbox_env, "download", name, "--batch", ids["big[1]"], "--join").out
        assert f"  big[1]: wrote results/big/{ids['big[1]']}/joined.jsonl (4 requests)\n" in out
        joined = (repo.root / f"results/big/{ids['big[1]']}/joined.jsonl").read_text().splitlines()
        assert [json.loads(line)["custom_id"] for line in joined] == ["q-4", "q-5", "q-6", "q-7"]
    path = repo.root / "data" / "big.jsonl"
    path.write_text(path.read_text().replace('"content": "q-1"', '"content": "q-X"'))  # same size, shard 0 changed
    before = (repo.root / "results/big/joined.jsonl").read_bytes()
    out = ok(repo, sandbox_env, "download", "big", "--join").out
    assert "  big: no joined.jsonl: data/big.jsonl is not the input it was made from (it changed since)\n" in out
    assert (repo.root / "results/big/joined.jsonl").read_bytes() == before
    wrong = cli(repo, sandbox_env, "download", "big", "--batch", "batch_0123456789abcdef")
    assert wrong.code == 1
    assert wrong.err == ("Error: the server has no batch batch_0123456789abcdef; `batchplan state show big` lists "
                         "its batches (`batch` and `history`)\n")
