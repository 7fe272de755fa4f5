"""Issue 12, wired: a spec's requests that end without a result are sent again as follow-up batches.

Every test drives the real CLI against the sandbox (in this process, or on 127.0.0.1 for the
kill test): apply, wait, a plan that shows the retry, apply, wait, and a download that merges
every attempt. Requests fail with 500 and 429 (the emulator's request_faults) and batches
expire part way (expire_after); a 400 is never retried.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from reconciler.sandbox import Fault, Timing
from reconciler.sandbox.outcomes import BatchFaults, RequestFault
from tests.helpers import Repo, cli, request_line, run_cli, spawn_cli, write_jsonl
from tests.test_reliability import batches_by_name, uploads_by_name, wait_for

STEPS = Timing(validating=0.05, in_progress=0.4, finalizing=0.05)
NAME = "nightly-eval"
FAULTS = [RequestFault(custom_id="^q1$", status=429), RequestFault(custom_id="^q[24]$", status=500)]


def make_repo(root: Path, retry: dict | None, count: int = 10, settings: str = "") -> Repo:
    """One spec, NAME, over q0..q{count-1}; q3 is a bad request (a 400, never retried)."""
    repo = Repo(root)
    lines = [request_line(f"q{i}", max_tokens=10) for i in range(count)]
    lines[3]["body"]["messages"][0]["role"] = "wizard"
    write_jsonl(repo.root / "data" / "eval.jsonl", lines)
    repo.spec(NAME, input="../data/eval.jsonl", **({"retry": retry} if retry else {}))
    (repo.root / "batchplan.yaml").write_text("timeout: 0.5\nmax_retries: 2\n" + settings)
    return repo


def apply_and_wait(repo: Repo, env: dict, *plan: str) -> None:
    assert (done := cli(repo, env, "apply", "--auto-approve", *plan)).code == 0, done.out + done.err
    cli(repo, env, "wait", "--interval", "0.05")  # exit 1 when a batch expired: that is the point


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def input_lines(repo: Repo, *ids: int) -> bytes:
    raw = (repo.root / "data" / "eval.jsonl").read_bytes().splitlines(keepends=True)
    return b"".join(raw[i] for i in ids)


def test_5xx_429_and_expired_requests_are_retried_and_every_attempt_is_merged(sandbox_factory, tmp_path):
    sandbox = sandbox_factory(timing=STEPS, expire_after=0.5, request_faults=FAULTS)
    env = {"OPENAI_BASE_URL": sandbox.url, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    repo = make_repo(tmp_path / "repo", {"max_attempts": 3})
    apply_and_wait(repo, env)
    sandbox.emulator.batch_faults = BatchFaults()  # the next attempt goes well

    # Before the batch expired q0, q5 and q6 ran, q1 got a 429 and q2 a 500; q3 (a bad request, whose
    # 400 would never be retried), q4 and q7-q9 never ran, so they are retried too.
    retried = (1, 2, 3, 4, 7, 8, 9)
    sha = hashlib.sha256(input_lines(repo, *retried)).hexdigest()
    plan = cli(repo, env, "plan")
    assert plan.out == (
        "batchplan will perform these actions:\n"
        "\n"
        f"  ↻ {NAME}  retry    7 of 10 requests without a result (5 expired, 1 server_error, 1 rate_limited); "
        "attempt 2 of 3\n"
        f"      input: 7 of the 10 lines of data/eval.jsonl, as they are there (sha256 {sha[:12]})\n"
        "      estimate: gpt-4o-mini, 7 requests, 63 input + ≤ 70 output tokens: $0.000005 – $0.000026\n"
        "\n"
        "Plan: 1 to retry, 0 unchanged.\n"
        "Cost: ≈ $0.000005 – $0.000026 for 1 batch (batch prices as of 2026-10-21).\n"), plan.out + plan.err
    document = cli(repo, env, "plan", "--json").json
    (action,) = document["actions"]
    assert (action["action"], action["requests"], action["attempt"], action["reason_code"]) == (
        "retry", 7, 2, "without_result")
    assert action["estimate"]["requests"] == 7 and document["summary"]["retry"] == 1

    assert cli(repo, env, "plan", "--out", "retry.plan").code == 0
    apply_and_wait(repo, env, "retry.plan")  # a saved plan carries the lines it sends
    (retry_input,) = (f for f in sandbox.emulator.list_files(purpose="batch")["data"] if ".attempt-2." in f["filename"])
    assert retry_input["filename"] == f"eval.attempt-2.batchplan-{sha}.jsonl"
    assert sandbox.emulator.open_content(retry_input["id"])[0].read() == input_lines(repo, *retried)

    assert cli(repo, env, "plan").out == "No changes. 1 batch(es) match their specs.\n"
    status = cli(repo, env, "status").out
    assert status.splitlines()[-1] == f"{NAME}: 9 of 10 requests done over 2 attempts"
    download = cli(repo, env, "download")
    assert download.code == 0 and (f"{NAME}: wrote results/{NAME}/output.jsonl (9 results) and results/{NAME}/"
                                   "errors.jsonl (1 without a result), merged from 2 attempts") in download.out
    merged = lines_of(repo.root / "results" / NAME / "output.jsonl")
    assert [line["custom_id"] for line in merged] == [f"q{i}" for i in range(10) if i != 3]  # input order, once each
    assert all(line["response"]["status_code"] == 200 for line in merged)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in
            lines_of(repo.root / "results" / NAME / "errors.jsonl")] == [("q3", 400)]
    again = cli(repo, env, "download")
    assert again.out.splitlines()[-2:] == [f"  {NAME}: results/{NAME}/output.jsonl and results/{NAME}/errors.jsonl "
                                           "already merged from 2 attempts", "Downloaded 0 file(s); 5 already there."]


def test_attempts_stop_at_max_attempts_and_status_says_so(sandbox_factory, tmp_path):
    sandbox = sandbox_factory(timing=STEPS, request_faults=[RequestFault(custom_id="^q1$", status=500)])
    env = {"OPENAI_BASE_URL": sandbox.url, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    repo = make_repo(tmp_path / "repo", {"max_attempts": 2, "on": ["server_error"]}, count=5)
    apply_and_wait(repo, env)
    assert cli(repo, env, "plan").out.splitlines()[2] == (
        f"  ↻ {NAME}  retry    1 of 5 requests without a result (server_error); attempt 2 of 2; 1 not retried "
        "(client_error)")
    apply_and_wait(repo, env)  # q1 fails again
    retry_id = repo.state()["entries"][NAME]["retries"]["batches"][0]["id"]
    plan = cli(repo, env, "plan", "--detailed-exitcode")
    assert (plan.code, plan.out) == (0, "No changes. 1 batch(es) match their specs.\n")
    noop = cli(repo, env, "plan", "--json").json["actions"][0]
    assert (noop["action"], noop["reason"]) == ("noop", f"retry batch {retry_id} (attempt 2) is completed")
    assert cli(repo, env, "status").out.splitlines()[-1] == (
        f"{NAME}: 2 of 2 attempts used; 2 requests without a result")
    assert cli(repo, env, "download").code == 0
    errors = (repo.root / "results" / NAME / "errors.jsonl").read_text().splitlines(keepends=True)
    latest = (repo.root / "results" / NAME / retry_id / "errors.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(e)["custom_id"] for e in errors] == ["q1", "q3"] and errors[0] == latest[0]  # its latest error
    assert len(batches_by_name(sandbox)[NAME]) == 2


def test_without_retry_failed_requests_stay_and_the_plan_is_empty(sandbox_factory, tmp_path):
    sandbox = sandbox_factory(timing=STEPS, request_faults=FAULTS)
    env = {"OPENAI_BASE_URL": sandbox.url, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    repo = make_repo(tmp_path / "repo", None, count=5)
    apply_and_wait(repo, env)
    assert cli(repo, env, "plan").out == "No changes. 1 batch(es) match their specs.\n"
    assert "attempt" not in cli(repo, env, "status").out
    assert cli(repo, env, "download").code == 0
    assert sorted(e["custom_id"] for e in lines_of(repo.root / "results" / NAME / "errors.jsonl")) == [
        "q1", "q2", "q3", "q4"]
    assert "retries" not in (repo.state()["entries"][NAME] or {}) or repo.state()["entries"][NAME]["retries"] is None

    (repo.root / "batchplan.yaml").write_text("retry: {max_attempts: 2}\n")  # a default for every spec
    assert cli(repo, env, "plan").out.splitlines()[2].startswith(
        f"  ↻ {NAME}  retry    3 of 5 requests without a result (2 server_error, 1 rate_limited); attempt 2 of 2")


def test_a_bad_retry_block_is_one_message_per_field_with_its_line(repo):
    repo.data("a.jsonl")
    (repo.root / "specs" / "a.yaml").write_text(
        "name: a\ninput: ../data/a.jsonl\nendpoint: /v1/chat/completions\n"
        "retry:\n  max_attempts: 0\n  on: [expird, client_error]\n")  # a bare `on:`, as people write it
    (repo.root / "specs" / "b.yaml").write_text(
        "name: b\ninput_file_id: file-abc\nendpoint: /v1/chat/completions\n"
        "retry: {max_attempts: 11, tries: 2}\n")
    result = run_cli("validate", "-C", str(repo.root))
    assert (result.code, result.out) == (1, "")
    assert result.err == (
        "Error: 6 problems found; nothing was sent or written\n"
        "specs/a.yaml:5: retry.max_attempts: 0 is too few: max_attempts counts every batch, the first included; "
        "use 1 to 10 (3 is the first and up to two retries)\n"
        "specs/a.yaml:6: retry.on.0: 'expird' is not a reason to retry; did you mean 'expired'? use any of "
        "expired, server_error, rate_limited\n"
        "specs/a.yaml:6: retry.on.1: 'client_error' is never retried: a request that failed with a 4xx other "
        "than 429 would fail again; use expired, server_error, rate_limited\n"
        "specs/b.yaml:4: retry.max_attempts: 11 is too many: at most 10 batches in all (the first and up to 9 "
        "retries)\n"
        "specs/b.yaml:4: retry.tries: unknown field; remove it (known fields here: max_attempts, on)\n"
        "specs/b.yaml:4: retry: needs input: (a JSONL file in this repo): with input_file_id batchplan cannot "
        "read the requests to send again; use input:, or remove retry:\n")
    (repo.root / "specs" / "b.yaml").unlink()
    (repo.root / "batchplan.yaml").write_text("retry:\n  max_attempts: 3\n  on: [4xx]\n")
    (repo.root / "specs" / "a.yaml").write_text("name: a\ninput: ../data/a.jsonl\nendpoint: /v1/chat/completions\n")
    result = run_cli("validate", "-C", str(repo.root))
    assert (result.code, result.err) == (1, "Error: batchplan.yaml: retry.on.0: '4xx' is never retried: a request "
                                            "that failed with a 4xx other than 429 would fail again; use expired, "
                                            "server_error, rate_limited\n")
    (repo.root / "batchplan.yaml").write_text("retry:\n  max_attempts: 3\n  on: [expired]\n")
    assert run_cli("validate", "-C", str(repo.root)).code == 0


@pytest.mark.parametrize("then", ["drop", "answer"])
def test_a_kill_between_the_retry_upload_and_its_create_makes_exactly_one_retry(then, emulator_server_factory,
                                                                                  tmp_path):
    """SIGKILL while the retry's create is on its way: never landing (`drop`) or landing after the kill."""
    server = emulator_server_factory(timing=STEPS, expire_after=0.5, latency=0.01)
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    repo = make_repo(tmp_path / "repo", {"max_attempts": 3})
    apply_and_wait(repo, env)
    server.emulator.batch_faults = BatchFaults()
    server.add_fault(Fault(action="stall", method="POST", path_regex="^/v1/batches$", seconds=0.3, then=then))
    proc = spawn_cli("apply", "--auto-approve", "-C", str(repo.root), env=env)
    wait_for(lambda: server.fault_status()[0]["fired"] or proc.poll() is not None)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed with the upload done and the create not answered
    intent = repo.state()["entries"][NAME]["retries"]["intent"]
    assert intent["attempt"] == 2 and intent["tag"].endswith("/2")

    assert (done := cli(repo, env, "apply", "--auto-approve")).code == 0, done.out + done.err
    server.wait_idle()
    cli(repo, env, "wait", "--interval", "0.05")
    ids = batches_by_name(server)[NAME]
    retries = repo.state()["entries"][NAME]["retries"]
    assert len(ids) == 2 and [b["id"] for b in retries["batches"]] == [ids[0]] and retries["intent"] is None
    assert sum(".attempt-2." in name for name in uploads_by_name(server)) == 1  # the retry input, uploaded once
    assert cli(repo, env, "plan", "--detailed-exitcode").code == 0


# --- the pure planner, given what the results stage read -------------------------------------

def test_the_planner_adopts_a_lost_retry_and_names_the_latest_attempt_once_none_is_due():
    from collections import Counter

    from reconciler.attempts import AttemptsView
    from reconciler.desired import Desired
    from reconciler.plan import RemoteView, build_plan
    from reconciler.render import render_json, render_text
    from reconciler.retries import RetryPolicy, RetrySelection, attempt_tag
    from reconciler.state import BatchRecord, Entry, Retries, RetryIntent, State

    want = Desired(name=NAME, file="specs/x.yaml", endpoint="/v1/chat/completions", completion_window="24h",
                   metadata={}, output_expires_after=None, input="data/x.jsonl", input_sha256="a" * 64,
                   input_file_id=None, requests=4, prevent_cancel=False, output=None, errors=None,
                   retry=RetryPolicy(max_attempts=2))

    def record(batch_id: str, status: str, completed: int) -> BatchRecord:
        return BatchRecord(id=batch_id, status=status, created_at=1, input_file_id="file-1",
                           request_counts={"total": 4, "completed": completed, "failed": 4 - completed})

    first = record("batch_1", "expired", 3)
    tag = attempt_tag(want.spec_hash, 2)
    entry = Entry(spec_hash=want.spec_hash, fields=want.fields(), batch=first,
                  retries=Retries(first="batch_1", intent=RetryIntent(attempt=2, tag=tag, input_sha256="b" * 64,
                                                                      at=1)))
    state = State(lineage="L", serial=3, entries={NAME: entry})
    one_left = RetrySelection(total=4, succeeded=3, reasons=Counter({"expired": 1}), kept=Counter(),
                              spans=((10, 20),), sha256="b" * 64, size=10)
    made = {"id": "batch_2", "status": "validating", "metadata": {"batchplan_name": NAME, "batchplan_spec": tag}}
    found = build_plan([want], state, RemoteView(), attempts={NAME: AttemptsView((first,), one_left, made)})
    assert render_text(found) == (
        "batchplan will perform these actions:\n\n"
        f"  ↻ {NAME}  retry    retry batch batch_2 (attempt 2) on the server was made for this spec but is not in "
        "the state; recording it, creating nothing\n\n"
        "Plan: 1 to retry, 0 unchanged.\n")
    action = json.loads(render_json(found))["actions"][0]
    assert (action["reason_code"], action["attempt"], action["requests"], found.sending) == (
        "found_untracked", 2, 1, ())

    second = record("batch_2", "completed", 0)
    used_up = build_plan([want], state, RemoteView(), attempts={NAME: AttemptsView((first, second))})
    assert render_text(used_up) == "No changes. 1 batch(es) match their specs.\n"
    assert json.loads(render_json(used_up))["actions"][0]["reason"] == "retry batch batch_2 (attempt 2) is completed"
    assert used_up.refreshed == {NAME: second}  # apply and a no-change plan record its latest status
