"""Issues 10 and 12 together: a sharded spec that retries, end to end through the sandbox.

A retry of a shard (`NAME[K]`) reads only its shard's bytes of the input: its plan counts that
shard's requests, and its follow-up input holds only that shard's lines. `download NAME` merges
every attempt of every shard into one output (input order) and one errors file.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from reconciler.sandbox import Fault, Timing
from reconciler.sandbox.outcomes import BatchFaults, RequestFault
from tests.helpers import Repo, env_for, request_line, spawn_cli, write_jsonl
from tests.helpers import cli
from tests.test_retry_flow import apply_and_wait
from tests.test_reliability import batches_by_name, uploads_by_name, wait_for

STEPS = Timing(validating=0.05, in_progress=0.4, finalizing=0.05)
LIMIT = 4  # requests per shard: q-0..q-3, q-4..q-7, q-8..q-9


def make_repo(root: Path, count: int = 10, retry: dict | None = None) -> Repo:
    repo = Repo(root)
    lines = [request_line(f"q-{i}", max_tokens=10) for i in range(count)]
    lines[9]["body"]["messages"][0]["role"] = "wizard"  # a bad request (a 400, never retried) in the last shard
    write_jsonl(repo.root / "data" / "big.jsonl", lines)
    repo.spec("big", input="../data/big.jsonl", shard={"max_requests": LIMIT},
              retry=retry or {"max_attempts": 3})
    (repo.root / "batchplan.yaml").write_text("timeout: 0.5\nmax_retries: 2\n")
    return repo


def input_lines(repo: Repo, *ids: int) -> bytes:
    raw = (repo.root / "data" / "big.jsonl").read_bytes().splitlines(keepends=True)
    return b"".join(raw[i] for i in ids)


def custom_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


def test_a_failed_shard_alone_is_retried_from_its_own_lines_and_every_attempt_is_merged(sandbox_factory, tmp_path):
    faults = [RequestFault(custom_id="^q-5$", status=500), RequestFault(custom_id="^q-6$", status=429)]
    sandbox = sandbox_factory(timing=STEPS, max_requests=LIMIT, request_faults=faults)
    env = env_for(sandbox)
    repo = make_repo(tmp_path / "repo")
    apply_and_wait(repo, env)
    sandbox.emulator.batch_faults = BatchFaults()  # the next attempt goes well

    # Only big[1] (q-4..q-7) has requests to send again: q-5 (500) and q-6 (429). big[2]'s q-9 is a 400.
    sha = hashlib.sha256(input_lines(repo, 5, 6)).hexdigest()
    plan = cli(repo, env, "plan")
    assert plan.out == (
        "batchplan will perform these actions:\n"
        "\n"
        "  ↻ big[1]  retry    2 of 4 requests without a result (1 server_error, 1 rate_limited); attempt 2 of 3\n"
        f"      input: 2 of the 4 lines 5-8 of data/big.jsonl, as they are there (sha256 {sha[:12]})\n"
        "      estimate: gpt-4o-mini, 2 requests, 20 input + ≤ 20 output tokens: $0.000002 – $0.000008\n"
        "\n"
        "Plan: 1 to retry, 2 unchanged.\n"
        "Cost: ≈ $0.000002 – $0.000008 for 1 batch (batch prices as of 2026-10-21).\n"), plan.out + plan.err
    (action,) = [a for a in cli(repo, env, "plan", "--json").json["actions"] if a["action"] != "noop"]
    assert (action["name"], action["action"], action["requests"], action["attempt"]) == ("big[1]", "retry", 2, 2)

    apply_and_wait(repo, env)
    (retry_input,) = (f for f in sandbox.emulator.list_files(purpose="batch")["data"] if ".attempt-2." in f["filename"])
    assert sandbox.emulator.open_content(retry_input["id"])[0].read() == input_lines(repo, 5, 6)  # byte for byte
    assert cli(repo, env, "plan").out == "No changes. 3 batch(es) match their specs.\n"
    assert cli(repo, env, "status").out.splitlines()[-1] == "big: 9 of 10 requests done over 2 attempts"

    download = cli(repo, env, "download")
    assert download.code == 0 and ("big: wrote results/big/output.jsonl (9 results) and results/big/errors.jsonl "
                                   "(1 without a result), merged from 3 shards, 4 batches in all") in download.out
    results = repo.root / "results" / "big"
    assert custom_ids(results / "output.jsonl") == [f"q-{i}" for i in range(9)]  # shard order, then line order
    assert custom_ids(results / "errors.jsonl") == ["q-9"]
    again = cli(repo, env, "download").out
    assert again.splitlines()[-2:] == ["  big: results/big/output.jsonl and results/big/errors.jsonl already merged "
                                       "from 3 shards, 4 batches in all", "Downloaded 0 file(s); 7 already there."]

    edited = (repo.root / "data" / "big.jsonl").read_bytes().replace(b'"q-6"', b'"q-6b"')
    (repo.root / "data" / "big.jsonl").write_bytes(edited)  # big[1]'s bytes are no longer those it was made from
    (results / "output.jsonl").unlink()
    changed = cli(repo, env, "download")
    assert changed.code == 0 and "big: its shards' attempts were not merged: bytes " in changed.out
    assert "changed since the batch was made from them" in changed.out and not (results / "output.jsonl").exists()


def test_expired_shards_each_retry_their_own_requests_and_status_sums_them(sandbox_factory, tmp_path):
    sandbox = sandbox_factory(timing=STEPS, max_requests=LIMIT, expire_after=0.5)
    env = env_for(sandbox)
    repo = make_repo(tmp_path / "repo", retry={"max_attempts": 2, "on": ["expired"]})
    apply_and_wait(repo, env)
    sandbox.emulator.batch_faults = BatchFaults()
    assert [line.split("  retry    ")[1] for line in cli(repo, env, "plan").out.splitlines() if "↻" in line] == [
        "2 of 4 requests without a result (expired); attempt 2 of 2",
        "2 of 4 requests without a result (expired); attempt 2 of 2",
        "2 of 2 requests without a result (expired); attempt 2 of 2"]  # q-9, the bad request, never ran
    assert status_notes(repo, env) == ["big: 4 of 10 requests done over 1 attempt",
                                       "big[0]: 2 of 4 requests done over 1 attempt",
                                       "big[1]: 2 of 4 requests done over 1 attempt",
                                       "big[2]: 0 of 2 requests done over 1 attempt"]
    apply_and_wait(repo, env)

    entries = repo.state()["entries"]
    for index, lines in enumerate([range(0, 4), range(4, 8), range(8, 10)]):  # each retry input: its shard's lines
        (retry,) = entries[f"big[{index}]"]["retries"]["batches"]
        sent = sandbox.emulator.open_content(retry["input_file_id"])[0].read().splitlines(keepends=True)
        assert sent and b"".join(sent) == input_lines(repo, *(i for i in lines if input_lines(repo, i) in sent))
    assert status_notes(repo, env) == ["big: 2 of 2 attempts used; 1 request without a result",
                                       "big[0]: 4 of 4 requests done over 2 attempts",
                                       "big[1]: 4 of 4 requests done over 2 attempts",
                                       "big[2]: 2 of 2 attempts used; 1 request without a result"]
    assert "merged from 3 shards, 6 batches in all" in cli(repo, env, "download").out
    results = repo.root / "results" / "big"
    assert custom_ids(results / "output.jsonl") == [f"q-{i}" for i in range(9)]
    errors = (results / "errors.jsonl").read_text()
    assert custom_ids(results / "errors.jsonl") == ["q-9"] and json.loads(errors)["response"]["status_code"] == 400  # its latest


def test_a_kill_between_a_shard_retry_upload_and_its_create_makes_exactly_one_retry(emulator_server_factory,
                                                                                   tmp_path):
    """SIGKILL while big[1]'s retry create is on its way (and lands after the kill): adopted, not made twice."""
    server = emulator_server_factory(timing=STEPS, max_requests=LIMIT, latency=0.01,
                                     request_faults=[RequestFault(custom_id="^q-[56]$", status=500)])
    env = env_for(server)
    repo = make_repo(tmp_path / "repo")
    apply_and_wait(repo, env)
    server.emulator.batch_faults = BatchFaults()
    server.add_fault(Fault(action="stall", method="POST", path_regex="^/v1/batches$", seconds=0.3, then="answer"))
    proc = spawn_cli("apply", "--auto-approve", "-C", str(repo.root), env=env)
    wait_for(lambda: server.fault_status()[0]["fired"] or proc.poll() is not None)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed with the upload done and the create not answered
    assert repo.state()["entries"]["big[1]"]["retries"]["intent"]["tag"].endswith("/2")

    assert (done := cli(repo, env, "apply", "--auto-approve")).code == 0, done.out + done.err
    server.wait_idle()
    cli(repo, env, "wait", "--interval", "0.05")
    made = batches_by_name(server)
    assert {name: len(ids) for name, ids in made.items()} == {"big[0]": 1, "big[1]": 2, "big[2]": 1}
    retries = repo.state()["entries"]["big[1]"]["retries"]
    assert [b["id"] for b in retries["batches"]] == [made["big[1]"][0]] and retries["intent"] is None
    assert sum(".attempt-2." in name for name in uploads_by_name(server)) == 1  # the retry input, uploaded once
    assert cli(repo, env, "plan", "--detailed-exitcode").code == 0
    assert cli(repo, env, "download").code == 0
    assert custom_ids(repo.root / "results" / "big" / "output.jsonl") == [f"q-{i}" for i in range(9)]


def status_notes(repo: Repo, env: dict) -> list[str]:
    """The notes under `status --shards`' table: what each spec's and shard's attempts came to."""
    return [line for line in cli(repo, env, "status", "--shards").out.splitlines() if ": " in line]


# --- the pieces, over real files --------------------------------------------------------------

def shard_ranges(source: Path, *sizes: int) -> list[tuple[int, int]]:
    """The byte ranges of consecutive runs of `sizes` lines of `source`."""
    lines, ranges, start = source.read_bytes().splitlines(keepends=True), [], 0
    for size in sizes:
        end = start + sum(len(line) for line in lines[:size])
        ranges.append((start, end))
        lines, start = lines[size:], end
    return ranges


def test_a_shard_selection_counts_and_chooses_only_the_shard_lines(tmp_path):
    from reconciler.results import classify_results
    from reconciler.retries import RetryPolicy, iter_retry_lines, retry_candidates
    from tests.test_retries import expired, failed, ok, request, write

    source = write(tmp_path / "in.jsonl", [request(c) for c in "abcdef"])
    second = shard_ranges(source, 3, 3)[1]  # d, e, f
    outcome = classify_results([(write(tmp_path / "o.jsonl", [ok("e")]),
                                 write(tmp_path / "e.jsonl", [expired("d"), failed("f", 500)]))])
    selection = retry_candidates(source, outcome, RetryPolicy(max_attempts=2), second)
    assert (selection.total, selection.succeeded, selection.requests, dict(selection.reasons)) == (
        3, 1, 2, {"expired": 1, "server_error": 1})
    lines = source.read_bytes().splitlines(keepends=True)
    assert b"".join(iter_retry_lines(source, selection)) == lines[3] + lines[5]  # byte for byte, its lines only
    assert not selection.kept  # a, b, c (another shard's) are not "missing": they are not counted at all


def test_merge_parts_puts_every_shard_attempts_in_input_order_and_checks_each_shard_bytes(tmp_path):
    from reconciler.errors import StalePlanError
    from reconciler.results import InputPart, merge_parts
    from tests.test_retries import expired, failed, ok, request, write

    source = write(tmp_path / "in.jsonl", [request(c) for c in "abcdef"])
    (a, b), raw = shard_ranges(source, 3, 3), source.read_bytes()
    first = [(write(tmp_path / "0-1o.jsonl", [ok("c"), ok("a")]), write(tmp_path / "0-1e.jsonl", [failed("b", 400)]))]
    second = [(write(tmp_path / "1-1o.jsonl", [ok("f"), ok("zz")]),
               write(tmp_path / "1-1e.jsonl", [expired("e"), failed("d", 500)])),
              (write(tmp_path / "1-2o.jsonl", [ok("d", "second")]), write(tmp_path / "1-2e.jsonl", [expired("e")]))]
    parts = [InputPart(first, *a, hashlib.sha256(raw[slice(*a)]).hexdigest()),
             InputPart(second, *b, hashlib.sha256(raw[slice(*b)]).hexdigest())]
    out, err = tmp_path / "results" / "output.jsonl", tmp_path / "results" / "errors.jsonl"
    report = merge_parts(source, parts, out, err)
    assert out.read_text() == "".join(json.dumps(x) + "\n" for x in (ok("a"), ok("c"), ok("d", "second"), ok("f"),
                                                                     ok("zz")))  # a stray follows its shard's lines
    assert err.read_text() == "".join(json.dumps(x) + "\n" for x in (failed("b", 400), expired("e")))
    assert (report.outputs, report.errors, report.missing, report.strays) == (4, 2, 0, 1)

    write(tmp_path / "in.jsonl", [request(c) for c in "abcdeX"])  # the second shard's bytes changed since
    with pytest.raises(StalePlanError, match="changed since the batch was made from them"):
        merge_parts(source, parts, out, err)
    assert json.loads(out.read_text().splitlines()[2]) == ok("d", "second")  # neither file was replaced
