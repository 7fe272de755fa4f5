"""Issue 6 end to end: saved plans, status, wait, download, cancel/forget, import, state, PR output.

Every test drives the CLI and the emulator in this process (the sandbox transport), with
steps of a fraction of a second, and checks what the server says, not only what batchplan prints.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time

import httpx
import pytest
from rich.console import Console

from reconciler.prices import PRICES_AS_OF
from reconciler.sandbox import Timing
from reconciler.state import BatchRecord
from reconciler.stores.file import FileStore
from reconciler.remote import Snapshot
from reconciler.watch import ProgressDisplay
from tests.helpers import ENDPOINT, applied, batch_of, cli, env_for, request_line, waited, write_jsonl

STEP = Timing(validating=0.3, in_progress=0.2, finalizing=0.1, cancelling=0.05)
SLOW = Timing(validating=0.05, in_progress=60.0, finalizing=0.05, cancelling=0.05)


def until(predicate, seconds: float = 5.0):
    """Poll `predicate` until it holds (or fail after `seconds`)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def slow_sandbox(sandbox_factory):
    """A sandbox whose batches stay in_progress for a minute (SLOW), and the env pointing at it."""
    server = sandbox_factory(timing=SLOW)
    return server, env_for(server)


def in_progress(server, batch_id: str) -> None:
    until(lambda: server.emulator.get_batch(batch_id)["status"] == "in_progress")


# -- saved plans ----------------------------------------------------------------------------


def test_saved_plan_applies_exactly_its_actions_then_is_refused_as_stale(repo, sandbox, sandbox_env):
    repo.spec("a")
    planned = cli(repo, sandbox_env, "plan", "--out", "plan.bin", "--detailed-exitcode")
    assert planned.code == 2 and "Saved the plan to plan.bin" in planned.err
    assert (repo.root / "plan.bin").is_file()  # -C DIR: relative paths are relative to DIR
    repo.spec("b")  # added after the plan was saved: not in it

    result = cli(repo, sandbox_env, "apply", "plan.bin")
    assert result.code == 0, result.err
    assert sorted(repo.state()["entries"]) == ["a"]
    assert sandbox.count("POST", "/v1/batches") == 1

    sent = sandbox.count()
    again = cli(repo, sandbox_env, "apply", "plan.bin")
    assert again.code == 1
    assert "stale plan: it was made against no state but the state is now at serial" in again.err
    assert "nothing was sent" in again.err and "Traceback" not in again.err
    assert sandbox.count() == sent


def test_saved_plan_is_stale_when_its_input_changed(repo, sandbox, sandbox_env):
    repo.spec("a")
    assert cli(repo, sandbox_env, "plan", "--out", "plan.bin").code == 0
    repo.data("a.jsonl", count=4)  # the same file, one more request

    sent = sandbox.count()
    result = cli(repo, sandbox_env, "apply", "plan.bin")
    assert result.code == 1
    assert "stale plan: input data/a.jsonl changed since the plan was made" in result.err
    assert sandbox.count() == sent and not repo.state_path.exists()


# -- wait and status ------------------------------------------------------------------------


def test_wait_returns_0_once_every_batch_completed_and_not_before(repo, sandbox_factory):
    server = sandbox_factory(timing=STEP)
    env = env_for(server)
    repo.spec("a")
    repo.spec("b")
    applied(repo, env)
    ids = {n: batch_of(repo, n) for n in ("a", "b")}
    assert all(server.emulator.get_batch(i)["status"] != "completed" for i in ids.values())

    result = waited(repo, env)
    assert {n: server.emulator.get_batch(i)["status"] for n, i in ids.items()} == {"a": "completed",
                                                                                  "b": "completed"}
    assert "All 2 batch(es) completed." in result.out
    assert "a: completed, 3/3 requests completed" in result.out
    recorded = repo.state()["entries"]
    assert {n: recorded[n]["batch"]["status"] for n in ids} == {"a": "completed", "b": "completed"}


def test_wait_that_cannot_take_the_state_lock_still_reports_and_says_so(repo, sandbox, sandbox_env):
    repo.spec("a")
    applied(repo, sandbox_env)
    before = repo.state_path.read_bytes()
    with FileStore(repo.state_path).transaction("another batchplan"):
        result = cli(repo, sandbox_env, "wait", "--interval", "0.05", "--timeout", "10")
    assert result.code == 0 and "All 1 batch(es) completed." in result.out
    assert "Note: the final statuses were not recorded in the state" in result.err
    assert "locked by pid" in result.err and "`batchplan refresh` records them later" in result.err
    assert repo.state_path.read_bytes() == before


def test_wait_exits_1_naming_a_batch_that_expired(repo, sandbox_factory):
    server = sandbox_factory(timing=Timing(validating=0.3, in_progress=0.3, finalizing=0.1))
    env = env_for(server)
    repo.spec("a")
    repo.spec("b")
    applied(repo, env)
    server.emulator.expire_batch(batch_of(repo, "b"))

    result = cli(repo, env, "wait", "--interval", "0.05", "--timeout", "10")
    assert result.code == 1
    assert "Finished: 1 of 2 batch(es) did not complete:" in result.err
    assert f"b: batch {batch_of(repo, 'b')} expired, 0/0 requests completed" in result.err  # expired while validating
    assert server.emulator.get_batch(batch_of(repo, "a"))["status"] == "completed"
    assert repo.state()["entries"]["b"]["batch"]["status"] == "expired"


def test_wait_exits_1_when_the_timeout_passes(repo, slow_sandbox):
    server, env = slow_sandbox
    repo.spec("a")
    applied(repo, env)

    result = cli(repo, env, "wait", "a", "--interval", "0.05", "--timeout", "0.3")
    assert result.code == 1
    assert "Timed out after 0.3s: 1 of 1 batch(es) did not complete:" in result.err
    assert f"a: batch {batch_of(repo, 'a')} still in_progress" in result.err


def test_wait_and_status_refuse_an_unknown_name(repo, sandbox, sandbox_env):
    repo.spec("a")
    applied(repo, sandbox_env)
    for command in ("wait", "status", "download"):
        result = cli(repo, sandbox_env, command, "a", "nope")
        assert result.code == 1
        assert "no batch named nope in the state (known: a)" in result.err


def test_status_json_lists_each_batch_as_completed(repo, sandbox, sandbox_env):
    repo.spec("a")
    repo.spec("b", input=repo.data("b.jsonl", count=5))
    applied(repo, sandbox_env)
    waited(repo, sandbox_env)

    document = cli(repo, sandbox_env, "status", "--json").json
    assert document["format_version"] == "1"
    assert [(b["name"], b["status"], b["request_counts"]) for b in document["batches"]] == [
        ("a", "completed", {"completed": 3, "failed": 0, "total": 3}),
        ("b", "completed", {"completed": 5, "failed": 0, "total": 5})]
    assert all(b["output_file_id"].startswith("file-") and b["error_file_id"] is None for b in document["batches"])
    table = cli(repo, sandbox_env, "status").out
    assert table.splitlines()[0].split() == ["name", "batch", "status", "done", "failed", "age"]
    assert table.splitlines()[2].split()[:5] == ["a", batch_of(repo, "a")[:14] + "…", "completed", "3/3", "0"]
    wide = cli(repo, sandbox_env, "status", "-o", "wide").out
    assert wide.splitlines()[0].split() == ["name", "batch", "status", "done", "failed", "age", "output", "errors"]
    assert wide.splitlines()[2].split()[:2] == ["a", batch_of(repo, "a")]


def test_status_asks_the_server_but_writes_nothing(repo, slow_sandbox):
    server, env = slow_sandbox
    repo.spec("a")
    applied(repo, env)
    in_progress(server, batch_of(repo, "a"))
    before = repo.state_path.read_bytes()
    document = cli(repo, env, "status", "--json").json
    assert document["batches"][0]["status"] == "in_progress"
    assert repo.state_path.read_bytes() == before
    assert repo.state()["entries"]["a"]["batch"]["status"] == "validating"

    assert cli(repo, env, "refresh").code == 0
    assert repo.state()["entries"]["a"]["batch"]["status"] == "in_progress"
    assert server.writes() == 2  # the upload and the create; status and refresh only read


def test_progress_display_draws_a_bar_per_batch_and_an_overall_bar():
    out = io.StringIO()
    display = ProgressDisplay(["a", "b"], console=Console(file=out, force_terminal=True, width=100))
    record = BatchRecord(id="batch_1", status="in_progress", created_at=0, input_file_id="file-1",
                         request_counts={"total": 4, "completed": 2, "failed": 1})
    display.show(Snapshot({"a": record, "b": record.model_copy(update={"status": "completed"})}))
    display.close()
    text = out.getvalue()
    assert "3/4" in text and "6/8" in text and "1/2 batches finished" in text and "in_progress" in text


# -- download -------------------------------------------------------------------------------


def test_download_writes_a_line_for_every_request_then_skips(repo, sandbox_factory):
    server = sandbox_factory(timing=Timing.uniform(0.05), fail_rate=0.3)
    env = env_for(server)
    repo.spec("a", input=repo.data("a.jsonl", count=20))
    applied(repo, env)
    waited(repo, env)

    result = cli(repo, env, "download")
    assert result.code == 0, result.err
    out_lines = (repo.root / "results/a/output.jsonl").read_text().splitlines()
    err_lines = (repo.root / "results/a/errors.jsonl").read_text().splitlines()
    assert out_lines and err_lines  # fail_rate 0.3 of 20: both files have lines
    ids = sorted(json.loads(line)["custom_id"] for line in out_lines + err_lines)
    assert ids == sorted(f"a-{i}" for i in range(20))
    assert "Downloaded 2 file(s); 0 already there." in result.out

    sent = server.count()
    again = cli(repo, env, "download")
    assert again.code == 0 and "Downloaded 0 file(s); 2 already there." in again.out
    assert server.count() == sent

    (repo.root / "results/a/output.jsonl").write_text("damaged\n")
    third = cli(repo, env, "download", "a")
    assert "Downloaded 1 file(s); 1 already there." in third.out
    assert (repo.root / "results/a/output.jsonl").read_text().splitlines() == out_lines

    server.emulator.fail_rate = 0.0  # the replacement batch has no error file
    applied(repo, env, "--replace", "a")
    waited(repo, env)
    after = cli(repo, env, "download")
    assert "Downloaded 1 file(s); 0 already there." in after.out
    assert "a: results/a/errors.jsonl is from an earlier batch (file-" in after.out
    assert len((repo.root / "results/a/output.jsonl").read_text().splitlines()) == 20


def test_download_to_the_spec_paths_and_skips_running_batches(repo, sandbox_factory):
    server = sandbox_factory(timing=STEP)
    env = env_for(server)
    repo.spec("a", output="results/out/a-results.jsonl", errors="results/out/a-errors.jsonl")
    applied(repo, env)
    early = cli(repo, env, "download")
    assert early.code == 0
    assert f"a: batch {batch_of(repo, 'a')} is " in early.out and "skipped (run `batchplan wait a` first)" in early.out
    waited(repo, env)

    result = cli(repo, env, "download")
    assert result.code == 0
    assert len((repo.root / "results/out/a-results.jsonl").read_text().splitlines()) == 3
    assert not (repo.root / "results/out/a-errors.jsonl").exists()  # no request failed: the batch has no error file
    kept = repo.root / "results/a" / batch_of(repo, "a")  # each batch's own copy, whatever the spec's paths
    assert sorted(p.name for p in kept.iterdir()) == ["output.jsonl"]
    assert (kept / "output.jsonl").read_bytes() == (repo.root / "results/out/a-results.jsonl").read_bytes()


def test_download_says_clearly_when_the_results_expired(repo, sandbox, sandbox_env):
    repo.spec("a")
    applied(repo, sandbox_env)
    waited(repo, sandbox_env)
    output_id = repo.state()["entries"]["a"]["batch"]["output_file_id"]
    sandbox.emulator.expire_file(output_id)

    result = cli(repo, sandbox_env, "download")
    assert result.code == 1
    assert f"a: the output file {output_id} is gone from the server: results expire" in result.err
    assert not (repo.root / "results/a/output.jsonl").exists()


def test_download_of_a_batch_whose_every_request_failed(repo, sandbox_factory):
    server = sandbox_factory(timing=Timing.uniform(0.05), fail_rate=1.0)
    env = env_for(server)
    repo.spec("a")
    applied(repo, env)
    waited(repo, env)

    result = cli(repo, env, "download")
    assert result.code == 0, result.err
    assert "a: batch" in result.out and "has no output file: none of its 3 requests succeeded" in result.out
    assert len((repo.root / "results/a/errors.jsonl").read_text().splitlines()) == 3
    assert not (repo.root / "results/a/output.jsonl").exists()


# -- changing course ------------------------------------------------------------------------


def test_removing_the_spec_of_a_finished_batch_forgets_it_and_sends_no_cancel(repo, sandbox, sandbox_env):
    repo.spec("a")
    applied(repo, sandbox_env)
    waited(repo, sandbox_env)
    repo.remove_spec("a")

    plan = cli(repo, sandbox_env, "plan")
    assert f"# a  forget   spec removed; batch {batch_of(repo, 'a')} is completed" in plan.out
    applied(repo, sandbox_env)
    assert "a" not in repo.state()["entries"]
    assert sandbox.count("POST", "/v1/batches/") == 0  # no /cancel


def test_removing_the_spec_of_a_running_batch_cancels_it(repo, slow_sandbox):
    server, env = slow_sandbox
    repo.spec("a")
    applied(repo, env)
    batch_id = batch_of(repo, "a")
    in_progress(server, batch_id)
    repo.remove_spec("a")

    plan = cli(repo, env, "plan")
    assert f"- a  cancel   spec removed; batch {batch_id} is in_progress" in plan.out
    applied(repo, env)
    assert server.count("POST", f"/v1/batches/{batch_id}/cancel") == 1
    assert server.emulator.get_batch(batch_id)["status"] in ("cancelling", "cancelled")
    assert "a" not in repo.state()["entries"]


def test_prevent_cancel_turns_that_plan_into_an_error(repo, slow_sandbox):
    server, env = slow_sandbox
    repo.spec("a", lifecycle={"prevent_cancel": True})
    applied(repo, env)
    repo.remove_spec("a")

    for command in (("plan",), ("apply", "--auto-approve")):
        result = cli(repo, env, *command)
        assert result.code == 1
        assert "a: its spec was removed while batch" in result.err and "lifecycle.prevent_cancel" in result.err
        assert "`batchplan state rm a`" in result.err
    assert server.count("POST", "/v1/batches/") == 0


def test_a_failed_batch_is_drift_and_replace_makes_a_new_one(repo, slow_sandbox):
    server, env = slow_sandbox
    repo.spec("a")
    repo.spec("b")
    applied(repo, env)
    old = batch_of(repo, "a")
    in_progress(server, old)
    server.emulator.expire_batch(old)

    plan = cli(repo, env, "plan", "--target", "a", "--detailed-exitcode")
    assert plan.code == 0
    assert f"! batch {old} expired; 0/3 requests completed; run `batchplan plan --replace a`" in plan.out
    assert " b " not in plan.out  # --target a

    applied(repo, env, "--replace", "a", "--target", "a")
    assert batch_of(repo, "a") != old
    assert repo.state()["entries"]["a"]["history"][0]["batch_id"] == old
    assert server.count("POST", "/v1/batches") == 3


def test_a_batch_cancelled_by_hand_is_kept_and_said_until_replace_runs_it_again(repo, slow_sandbox):
    server, env = slow_sandbox
    repo.spec("a")
    applied(repo, env)
    old = batch_of(repo, "a")
    server.emulator.cancel_batch(old)  # on the dashboard: a deliberate stop of spending
    until(lambda: server.emulator.get_batch(old)["status"] == "cancelled")

    plan = cli(repo, env, "plan", "--detailed-exitcode")
    assert plan.code == 0  # nothing to do: it is not run again unasked
    assert plan.out.splitlines()[:2] == [
        f"    a  noop     batch {old} is cancelled",
        f"      ! batch {old} was cancelled outside batchplan; 0/0 requests completed; "
        "`batchplan apply --replace a` runs it again"]
    status = cli(repo, env, "status", "--json")
    assert json.loads(status.out)["batches"][0]["note"] == \
        "was cancelled outside batchplan; `batchplan apply --replace a` runs it again"

    applied(repo, env, "--replace", "a")
    assert batch_of(repo, "a") != old
    assert cli(repo, env, "plan", "--detailed-exitcode").code == 0
    assert server.count("POST", "/v1/batches") == 2


def test_a_cancel_the_server_refused_leaves_no_mark_so_a_later_hand_cancel_is_kept(repo, slow_sandbox):
    """batchplan marks a batch it is about to cancel (Entry.cancel_sent); a cancel refused with a 4xx did
    not happen, so the mark goes: the hand cancel that follows is not taken for batchplan's and run again."""
    from reconciler.sandbox import Fault

    server, env = slow_sandbox
    spec = repo.spec("a")
    applied(repo, env)
    old = batch_of(repo, "a")
    text = spec.read_text()
    repo.remove_spec("a")
    server.add_fault(Fault(action="reject", method="POST", path_regex=r"/cancel$", status=400, times=1))
    assert cli(repo, env, "apply", "--auto-approve").code == 1  # the cancel was refused
    assert "cancel_sent" not in repo.state()["entries"]["a"]
    spec.write_text(text)  # put back as it was
    server.emulator.cancel_batch(old)  # then stopped by hand
    until(lambda: server.emulator.get_batch(old)["status"] == "cancelled")

    plan = cli(repo, env, "plan", "--detailed-exitcode")
    assert plan.code == 0, plan.out + plan.err
    assert f"! batch {old} was cancelled outside batchplan" in plan.out


# -- import and state -----------------------------------------------------------------------


def _hand_made_batch(sandbox, repo, metadata: dict) -> str:
    """A batch made with the openai SDK directly, the way a user would outside batchplan."""
    from openai import AsyncOpenAI

    async def make() -> str:
        async with AsyncOpenAI(base_url=sandbox.url, api_key="sk-test", max_retries=0,
                               http_client=httpx.AsyncClient(transport=sandbox)) as client:
            with (repo.root / "data" / "a.jsonl").open("rb") as fh:
                uploaded = await client.files.create(file=fh, purpose="batch")
            batch = await client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                                completion_window="24h", metadata=metadata)
            return batch.id

    return asyncio.run(make())


def test_import_records_a_hand_made_batch_so_the_next_plan_is_a_noop(repo, sandbox, sandbox_env):
    repo.spec("a", metadata={"team": "research"})
    batch_id = _hand_made_batch(sandbox, repo, {"team": "research"})

    result = cli(repo, sandbox_env, "import", "a", batch_id)
    assert result.code == 0, result.err
    assert f"Imported {batch_id} (" in result.out and ") as a." in result.out
    assert "It matches the spec: the next plan leaves it as it is." in result.out
    assert "only checked to be as large as data/a.jsonl" in result.out
    assert batch_of(repo, "a") == batch_id

    plan = cli(repo, sandbox_env, "plan", "--detailed-exitcode")
    assert plan.code == 0 and plan.out.startswith("No changes."), plan.out
    assert sandbox.count("POST", "/v1/batches") == 1


def test_import_of_a_batch_that_differs_plans_a_replace_with_the_diff(repo, sandbox, sandbox_env):
    repo.spec("a", metadata={"team": "research"})
    batch_id = _hand_made_batch(sandbox, repo, {"team": "ml"})

    result = cli(repo, sandbox_env, "import", "a", batch_id)
    assert result.code == 0, result.err
    assert "It differs from the spec in: metadata; the next plan replaces it" in result.out
    plan = cli(repo, sandbox_env, "plan")
    assert "± a  replace  changed: metadata.team" in plan.out
    assert '~ metadata.team: "ml" -> "research"' in plan.out


def test_import_refuses_an_unknown_spec_or_batch(repo, sandbox, sandbox_env):
    repo.spec("a")
    unknown_spec = cli(repo, sandbox_env, "import", "nope", "batch_123")
    assert unknown_spec.code == 1 and "no spec named nope" in unknown_spec.err
    unknown_batch = cli(repo, sandbox_env, "import", "a", "batch_doesnotexist")
    assert unknown_batch.code == 1 and "the server has no batch batch_doesnotexist" in unknown_batch.err
    assert not repo.state_path.exists()


def test_state_list_show_and_rm(repo, sandbox, sandbox_env):
    repo.spec("a")
    repo.spec("bb")
    applied(repo, sandbox_env)
    a, bb = batch_of(repo, "a"), batch_of(repo, "bb")
    sent = sandbox.count()

    assert cli(repo, sandbox_env, "state", "list").out == f"a   {a}  validating\nbb  {bb}  validating\n"
    shown = json.loads(cli(repo, sandbox_env, "state", "show", "bb").out)
    assert shown["batch"]["id"] == bb and shown == repo.state()["entries"]["bb"]

    removed = cli(repo, sandbox_env, "state", "rm", "bb")
    assert removed.code == 0
    assert f"Removed bb from the state; batch {bb} (validating) was not touched on the server" in removed.out
    assert sorted(repo.state()["entries"]) == ["a"]
    backup = json.loads((repo.state_path.parent / "batchplan.state.json.backup").read_text())
    assert "bb" in backup["entries"]
    assert cli(repo, sandbox_env, "state", "rm", "bb").code == 1
    assert sandbox.count() == sent


# -- output for reviews ---------------------------------------------------------------------


UNBOUNDED = ("some requests set no max_tokens, max_completion_tokens or max_output_tokens; set one, or "
             "default_max_output_tokens in batchplan.yaml")


def test_plan_markdown_for_a_pull_request_as_a_whole_string(repo, sandbox, sandbox_env):
    repo.spec("edit", metadata={"team": "research"})
    repo.spec("gone")
    applied(repo, sandbox_env)
    waited(repo, sandbox_env)
    repo.spec("edit", metadata={"team": "ml"})
    repo.remove_spec("gone")
    write_jsonl(repo.root / "data" / "new.jsonl", [request_line(f"n-{i}") for i in range(2)])
    repo.spec("new", input="../data/new.jsonl")
    sha = hashlib.sha256((repo.root / "data" / "new.jsonl").read_bytes()).hexdigest()[:12]

    result = cli(repo, sandbox_env, "plan", "--format", "markdown", "--detailed-exitcode")
    assert result.code == 2
    assert result.out == (
        "## batchplan plan\n"
        "\n"
        "| action | count | cost |\n"
        "| --- | ---: | ---: |\n"
        "| + create | 1 | $0.000002 – ? |\n"
        "| = adopt | 0 |  |\n"
        "| ~ update | 0 |  |\n"
        "| ± replace | 1 | $0.000002 – ? |\n"
        "| ↻ retry | 0 |  |\n"
        "| - cancel | 0 |  |\n"
        "| # forget | 1 |  |\n"
        "| noop | 0 |  |\n"
        "| **total** | | **≈ $0.000004 – ?** |\n"
        "\n"
        "**Plan: 1 to create, 1 to replace, 1 to forget, 0 unchanged.**\n"
        "\n"
        f"Cost: ≈ $0.000004 – ? for 2 batches (batch prices as of {PRICES_AS_OF}).\n"
        "\n"
        "### `±` edit: replace\n"
        "\n"
        "changed: metadata.team\n"
        "\n"
        "```diff\n"
        '~ metadata.team: "research" -> "ml"\n'
        f"re-runs 3 requests: batch {batch_of(repo, 'edit')} already completed\n"
        f"estimate: gpt-4o-mini, 3 requests, 30 input + unbounded output tokens: $0.000002 – ? ({UNBOUNDED})\n"
        "```\n"
        "\n"
        "### `#` gone: forget\n"
        "\n"
        f"spec removed; batch {batch_of(repo, 'gone')} is completed, so only the state entry goes\n"
        "\n"
        "### `+` new: create\n"
        "\n"
        "no batch for this spec in the state or on the server\n"
        "\n"
        "```\n"
        "endpoint: /v1/chat/completions\n"
        "model: gpt-4o-mini\n"
        f"input: data/new.jsonl (sha256 {sha}, 2 requests)\n"
        "output: results/new/output.jsonl\n"
        f"estimate: gpt-4o-mini, 2 requests, 20 input + unbounded output tokens: $0.000002 – ? ({UNBOUNDED})\n"
        "```\n"
    )
