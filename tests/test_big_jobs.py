"""Issue 13: big jobs under enqueued-token limits: queued creates, re-creates after
token_limit_exceeded, a batch too big ever to run, and `apply --watch`.

The renderings are pure (a plan built from plain values, then queued) and compared as
whole strings. The commands run against the emulator on 127.0.0.1 with the same limit
batchplan.yaml sets (or a lower one, to make the server refuse what batchplan thought
fits); the emulator's timeline of held tokens is the witness that no limit was crossed.
Where batches must stay running while the test looks, the emulator's clock is the real
one plus a shift the test moves forward.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from reconciler.plan import RemoteView, build_plan
from reconciler.queue import Candidate, Limits, schedule
from reconciler.render import render_json, render_markdown, render_text
from reconciler.sandbox import Timing
from reconciler.sandbox.capacity import peak_in_flight
from reconciler.tokens import count_file
from tests.helpers import KEY, Repo, run_cli, spawn_cli
from tests.test_plan import batch, entry_for, state_with, want
from tests.test_reliability import batches_by_name, state_ids, wait_for

MINI = "gpt-4o-mini"
CAPACITY_ERROR = {"code": "token_limit_exceeded", "line": None, "param": None,
                  "message": "Enqueued token limit reached for gpt-4o-mini in organization org-x. ..."}


# -- the plan: pure, whole strings ------------------------------------------------------------


def _queued_plan():
    """a (create, fits), b and c (create, queued behind a's tokens), done (noop)."""
    done = want("done")
    plan = build_plan([want("a"), want("b"), want("c"), done], state_with(done=entry_for(done, "batch_d", "completed")),
                      RemoteView())
    limits = Limits.model_validate({MINI: {"enqueued_tokens": 2_000_000}})
    found = schedule([Candidate("a", {MINI: 900_000}), Candidate("b", {MINI: 1_200_000}),
                      Candidate("c", {MINI: 50_000})], {}, limits)
    return plan.with_queue(found)


def test_a_queued_create_shows_what_it_waits_for_as_a_whole_string():
    sha = "a" * 12
    assert render_text(_queued_plan()) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  + a     create   no batch for this spec in the state or on the server\n"
        "      endpoint: /v1/chat/completions\n"
        f"      input: data/x.jsonl (sha256 {sha}, 3 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "  + b     create   no batch for this spec in the state or on the server\n"
        "      queued: waits for 1.2M of 2M enqueued tokens of gpt-4o-mini\n"
        "      endpoint: /v1/chat/completions\n"
        f"      input: data/x.jsonl (sha256 {sha}, 3 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "  + c     create   no batch for this spec in the state or on the server\n"
        "      queued: waits for 50k of 2M enqueued tokens of gpt-4o-mini (after b)\n"
        "      endpoint: /v1/chat/completions\n"
        f"      input: data/x.jsonl (sha256 {sha}, 3 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "\n"
        "Plan: 3 to create (2 queued), 1 unchanged.\n"
    )


def test_the_json_plan_says_queued_for_each_action_and_markdown_shows_the_phrase():
    document = json.loads(render_json(_queued_plan()))
    assert {a["name"]: a["queued"] for a in document["actions"]} == {"a": False, "b": True, "c": True,
                                                                     "done": False}
    assert document["summary"]["create"] == 3
    markdown = render_markdown(_queued_plan())
    assert ("### `+` b: create\n\nno batch for this spec in the state or on the server\n\n```\n"
            "queued: waits for 1.2M of 2M enqueued tokens of gpt-4o-mini\n") in markdown
    assert "**Plan: 3 to create (2 queued), 1 unchanged.**" in markdown


def test_a_batch_that_failed_for_capacity_is_created_again_and_another_failure_is_not():
    d = want("a")
    failed = entry_for(d, "batch_1", "failed")
    failed.batch = failed.batch.model_copy(update={"errors": [CAPACITY_ERROR]})
    (change,) = build_plan([d], state_with(a=failed), RemoteView()).changes
    assert (change.action.value, change.reason_code.value, change.reason) == (
        "create", "token_limit_exceeded", "the last batch failed: enqueued token limit (batch batch_1)")
    assert change.batch.id == "batch_1" and change.sends_requests
    other = entry_for(d, "batch_2", "failed")
    other.batch = other.batch.model_copy(update={"errors": [{"code": "invalid_json_line", "line": 2}]})
    (kept,) = build_plan([d], state_with(a=other), RemoteView()).changes
    assert kept.action.value == "noop"  # a failure of its own is a result: `plan --replace` makes it again
    running = RemoteView(batches={"batch_1": batch("batch_1", "in_progress")})  # the server says it runs now
    assert build_plan([d], state_with(a=failed), running).changes[0].action.value == "noop"


# -- the commands, on 127.0.0.1 -----------------------------------------------------------------


class Shifted:
    """A clock for the emulator: the real time plus a shift the test moves forward."""

    def __init__(self):
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


SLOW = Timing(validating=1, in_progress=100, finalizing=1, cancelling=1)


def big_repo(repo: Repo, names: list[str], limit_of, requests: int = 20, settings: str = "") -> dict[str, int]:
    """Specs `names` of `requests` chat requests each; batchplan.yaml's limit is `limit_of(tokens)`,
    tokens being each spec's input tokens. Returns them by name."""
    tokens = {}
    for name in names:
        repo.spec(name, input=repo.data(f"{name}.jsonl", count=requests))
        tokens[name] = count_file(repo.root / "data" / f"{name}.jsonl", "/v1/chat/completions").input_tokens
    limit = limit_of(tokens)
    (repo.root / "batchplan.yaml").write_text(f"timeout: 0.5\nlimits:\n  {MINI}: {{enqueued_tokens: {limit}}}\n"
                                              + settings)
    return tokens


def cli(repo: Repo, server, *args: str):
    return run_cli(*args, "-C", str(repo.root), env={"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY,
                                                     "NO_COLOR": "1"})


def creates(server) -> int:
    return server.count("POST", "/v1/batches")


def never_over(server, limit: int) -> None:
    """The emulator's timeline: the tokens of gpt-4o-mini in progress never went over `limit`."""
    timeline = server.emulator.enqueued_timeline()
    assert timeline and peak_in_flight(timeline)[MINI] <= limit


def test_apply_creates_what_fits_and_queues_the_rest_until_capacity_frees(repo, emulator_server_factory):
    clock = Shifted()
    names = ["a", "b", "c", "d", "e"]
    tokens = big_repo(repo, names, lambda t: max(t.values()) * 2 + 5)  # two at a time
    limit = max(tokens.values()) * 2 + 5
    server = emulator_server_factory(timing=SLOW, clock=clock, enqueued_token_limits={MINI: limit})
    planned = cli(repo, server, "plan", "--json")
    assert {a["name"]: a["queued"] for a in planned.json["actions"]} == {
        "a": False, "b": False, "c": True, "d": True, "e": True}
    first = cli(repo, server, "apply", "--auto-approve")
    assert first.code == 0, first.err
    assert f"  c: queued: waits for {tokens['c']} of {limit} enqueued tokens of gpt-4o-mini\n" in first.out
    assert f"  e: queued: waits for {tokens['e']} of {limit} enqueued tokens of gpt-4o-mini (after c)\n" in first.out
    assert "Plan: 5 to create (3 queued), 0 unchanged." in first.out
    assert first.out.endswith("Apply complete: 2 change(s). 3 create(s) queued for enqueued-token capacity: "
                              "`batchplan apply` makes them once running batches finish (`batchplan apply --watch` "
                              "waits and makes them).\n")
    clock.shift += 10  # a and b in progress: nothing more fits
    assert cli(repo, server, "apply", "--auto-approve").code == 0 and creates(server) == 2
    for made, shift in ((4, 200), (5, 400)):  # each time a pair finishes, the next two (then one) go
        clock.shift = shift
        assert cli(repo, server, "apply", "--auto-approve").code == 0
        assert creates(server) == made
    clock.shift = 800
    assert cli(repo, server, "wait", "--interval", "0.05").code == 0
    assert {n: len(ids) for n, ids in batches_by_name(server).items()} == {n: 1 for n in names}
    never_over(server, limit)


def test_a_batch_the_server_refused_for_capacity_is_made_again_and_kept_in_history(repo, emulator_server_factory):
    clock = Shifted()
    tokens = big_repo(repo, ["a", "b"], lambda t: sum(t.values()) * 10)  # batchplan thinks both fit ...
    server = emulator_server_factory(timing=SLOW, clock=clock,  # ... the server has room for one
                                     enqueued_token_limits={MINI: max(tokens.values()) + 5})
    assert cli(repo, server, "apply", "--auto-approve").code == 0 and creates(server) == 2
    clock.shift += 5  # both validated: the first in progress, the other refused
    statuses = {n: server.emulator.get_batch(i)["status"] for n, i in state_ids(repo).items()}
    (name,) = [n for n, status in statuses.items() if status == "failed"]
    refused = state_ids(repo)[name]
    (change,) = [a for a in cli(repo, server, "plan", "--json").json["actions"] if a["name"] == name]
    assert (change["action"], change["reason_code"], change["reason"], change["before"]["batch_id"]) == (
        "create", "token_limit_exceeded", f"the last batch failed: enqueued token limit (batch {refused})", refused)
    clock.shift += 200  # the other has finished: the room is free
    again = cli(repo, server, "apply", "--auto-approve")
    assert again.code == 0 and creates(server) == 3, again.err
    clock.shift += 200
    assert cli(repo, server, "wait", "--interval", "0.05").code == 0
    entry = repo.state()["entries"][name]
    assert entry["batch"]["status"] == "completed" and entry["batch"]["id"] != refused
    assert [(h["batch_id"], h["status"]) for h in entry["history"]] == [(refused, "failed")]
    assert cli(repo, server, "plan", "--detailed-exitcode").code == 0


def test_a_batch_over_the_whole_limit_is_an_error_and_nothing_is_sent(repo, emulator_server):
    repo.spec("small", input=repo.data("small.jsonl", count=5))  # fits: only the one too big is named
    tokens = big_repo(repo, ["huge"], lambda t: t["huge"] - 1, requests=40)["huge"]
    for command in (("plan",), ("apply", "--auto-approve")):
        result = cli(repo, emulator_server, *command)
        assert (result.code, result.out) == (1, ""), result.out
        assert result.err == (
            f"Error: huge: {tokens:,} input tokens of gpt-4o-mini are more than its whole enqueued token limit "
            f"({tokens - 1:,}), so the batch could never run; split it with `shard.max_requests` in its spec "
            f"(about {(tokens - 1) * 40 // tokens:,} of its requests fit under the limit)\n")
    assert emulator_server.writes() == 0 and not repo.state_path.exists()


def test_a_saved_plan_keeps_its_queue(repo, emulator_server):
    big_repo(repo, ["a", "b"], lambda t: max(t.values()) + 5)  # one at a time
    saved = cli(repo, emulator_server, "plan", "--out", "plan.json")
    assert saved.code == 0 and "Plan: 2 to create (1 queued), 0 unchanged." in saved.out
    assert [c["queued"] for c in json.loads((repo.root / "plan.json").read_text())["changes"]] == [
        None, "queued: waits for " + saved.out.split("queued: waits for ")[1].split("\n")[0]]
    applied = cli(repo, emulator_server, "apply", "plan.json")
    assert applied.code == 0 and "  b: queued: waits for" in applied.out and creates(emulator_server) == 1


@pytest.mark.parametrize("room", ["same", "smaller"])
def test_apply_watch_runs_the_whole_job_within_the_limit(repo, emulator_server_factory, room):
    names = [f"s{i}" for i in range(5)]
    tokens = big_repo(repo, names, lambda t: max(t.values()) * 2 + 5)
    limit = max(tokens.values()) * 2 + 5
    server_limit = limit if room == "same" else max(tokens.values()) + 5  # smaller: the server refuses some
    server = emulator_server_factory(enqueued_token_limits={MINI: server_limit})
    result = cli(repo, server, "apply", "--watch", "--auto-approve", "--interval", "0.05")
    assert result.code == 0, result.out + result.err
    assert result.out.endswith("All 5 batch(es) completed.\n")
    assert "  s2: queued: waits for" in result.out and "s4: completed, 20/20 requests completed" in result.out
    state = repo.state()["entries"]
    assert {n: state[n]["batch"]["status"] for n in names} == {n: "completed" for n in names}
    refused = {n: [h["status"] for h in state[n]["history"]] for n in names if state[n]["history"]}
    assert all(set(statuses) == {"failed"} for statuses in refused.values())
    assert creates(server) == 5 + sum(len(s) for s in refused.values()) and (room == "same") == (not refused)
    never_over(server, server_limit)
    assert peak_in_flight(server.emulator.enqueued_timeline())[MINI] > max(tokens.values()) or room == "smaller"
    assert cli(repo, server, "plan", "--detailed-exitcode").code == 0


def test_apply_watch_exits_1_when_a_batch_fails_for_a_reason_of_its_own(repo, emulator_server_factory):
    big_repo(repo, ["a", "b"], lambda t: max(t.values()) + 5)
    (repo.root / "data" / "b.jsonl").write_text("not json\n")
    server = emulator_server_factory()
    result = cli(repo, server, "apply", "--watch", "--auto-approve", "--interval", "0.05")
    assert result.code == 1 and "b.jsonl" in result.err and not server.requests  # a bad input: nothing sent
    repo.data("b.jsonl", count=20)
    server.emulator.batch_faults = server.emulator.batch_faults.model_copy(update={"expire_after": 0.5})
    result = cli(repo, server, "apply", "--watch", "--auto-approve", "--interval", "0.05")
    assert result.code == 1
    assert "Finished: 2 of 2 batch(es) did not complete:\n" in result.err and "expired" in result.err


def test_apply_watch_takes_no_planfile(repo, emulator_server):
    result = cli(repo, emulator_server, "apply", "plan.json", "--watch")
    assert result.code == 1 and "--watch plans every round itself; it takes no PLANFILE" in result.err


def test_a_watch_killed_while_creates_are_queued_loses_and_duplicates_nothing(tmp_path, emulator_server_factory):
    names = [f"s{i}" for i in range(5)]
    for k in (1, 2, 3):  # killed in its first round, while it polls with three queued, in its second round
        repo = Repo(tmp_path / f"k{k}")
        tokens = big_repo(repo, names, lambda t: max(t.values()) * 2 + 5)
        limit = max(tokens.values()) * 2 + 5
        server = emulator_server_factory(timing=Timing.uniform(0.2), latency=0.02, enqueued_token_limits={MINI: limit})
        env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY}
        watch = ("apply", "--watch", "--auto-approve", "--interval", "0.05", "-C", str(repo.root))
        proc = spawn_cli(*watch, env=env)
        wait_for(lambda: creates(server) >= k, proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        again = spawn_cli(*watch, env=env)
        out, err = again.communicate(timeout=60)
        assert again.returncode == 0, out + err
        assert server.wait_idle()
        named = batches_by_name(server)
        assert {n: len(ids) for n, ids in named.items()} == {n: 1 for n in names}, named
        assert state_ids(repo) == {n: ids[0] for n, ids in named.items()}
        assert {n: e["batch"]["status"] for n, e in repo.state()["entries"].items()} == {n: "completed" for n in names}
        never_over(server, limit)


def test_bad_limits_in_batchplan_yaml_are_one_message_and_nothing_is_sent(repo, emulator_server):
    repo.spec("a")
    for limits, message in (
            ("{gpt-4o-mini: {enqueued_tokens: 0}}", "limits.gpt-4o-mini.enqueued_tokens: Input should be greater "
                                                    "than 0"),
            ("{gpt-4o-mini: {enqueued_token: 5}}", "limits.gpt-4o-mini.enqueued_tokens: Field required"),
            ("{gpt-4o-mini: 2000000}", "limits.gpt-4o-mini: Input should be a valid dictionary or instance of "
                                       "ModelLimit")):
        (repo.root / "batchplan.yaml").write_text(f"limits: {limits}\n")
        result = cli(repo, emulator_server, "apply", "--auto-approve")
        assert (result.code, result.err) == (1, f"Error: batchplan.yaml: {message}\n")
    assert not emulator_server.requests


def test_the_sandbox_takes_limits_from_its_option_its_environment_and_a_control_route(repo, emulator_server):
    import httpx

    from reconciler.sandbox.capacity import limits_from_env, parse_limits

    assert parse_limits(["gpt-4o-mini=2000000", "gpt-4o=5"], "--enqueued-token-limit") == {
        "gpt-4o-mini": 2_000_000, "gpt-4o": 5}
    bad = run_cli("sandbox", "serve", "--enqueued-token-limit", "gpt-4o-mini=lots")
    assert (bad.code, bad.err) == (1, "Error: --enqueued-token-limit: 'gpt-4o-mini=lots' is not MODEL=TOKENS with a "
                                      "whole number of tokens above 0 (e.g. gpt-4o-mini=2000000)\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BATCHPLAN_SANDBOX_LIMITS", "gpt-4o-mini=2000000, gpt-4o=90000")
        assert limits_from_env() == {"gpt-4o-mini": 2_000_000, "gpt-4o": 90_000}
    control = emulator_server.control_url
    assert httpx.post(f"{control}/limits", json={MINI: 50}).json() == {MINI: 50}
    assert emulator_server.emulator.enqueued_token_limits == {MINI: 50}
    assert httpx.post(f"{control}/limits", json={MINI: 0}).status_code == 400
    assert httpx.get(f"{control}/limits").json() == {MINI: 50}


def test_sandbox_runs_honour_the_limits_in_the_environment(repo):
    tokens = big_repo(repo, ["a", "b"], lambda t: sum(t.values()) * 10)  # batchplan thinks both fit
    env = {"BATCHPLAN_SANDBOX_LIMITS": f"{MINI}={max(tokens.values()) + 5}", "BATCHPLAN_SANDBOX_STEP_SECONDS": "0.2",
           "NO_COLOR": "1"}
    result = run_cli("apply", "--sandbox", "--watch", "--auto-approve", "--interval", "0.05", "-C", str(repo.root),
                     env=env)
    assert result.code == 0 and result.out.endswith("All 2 batch(es) completed.\n"), result.out + result.err
    history = [h["status"] for e in json.loads((repo.root / "state" / "sandbox" / "batchplan.state.json").read_text())[
        "entries"].values() for h in e["history"]]
    assert history == ["failed"]  # the server refused one for capacity; the watch made it again
