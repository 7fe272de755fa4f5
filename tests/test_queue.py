"""Issue 13's core: the queue under enqueued-token limits, and the sandbox that enforces them.

`schedule` is pure and tested on plain values (phrases as whole strings, FIFO, several
models, too big, the default limit, no limit). The sandbox's limit is tested over HTTP on
127.0.0.1 with a clock the test moves: a batch over the limit fails `token_limit_exceeded`
in the API's words, batches within it run side by side, and the timeline of held tokens
never goes over the limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from reconciler.errors import PlanError
from reconciler.queue import (Candidate, Limits, Schedule, Waiting, failed_for_capacity, human_tokens,
                              schedule, schedule_by_provider, tokens_in_flight, weight)
from reconciler.sandbox import Timing
from reconciler.sandbox.capacity import Occupancy, peak_in_flight
from reconciler.state import BatchRecord
from reconciler.tokens import count_file

MINI, FOUR_O = "gpt-4o-mini", "gpt-4o"
CHAT = "/v1/chat/completions"
LIMITS = Limits.model_validate({MINI: {"enqueued_tokens": 2_000_000}})


def names(items) -> list[str]:
    """The names of candidates, or of the candidates of Waiting / TooBig items."""
    return [getattr(item, "candidate", item).name for item in items]


def chat_lines(n: int, model: str = MINI, prefix: str = "r") -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": CHAT,
             "body": {"model": model, "messages": [{"role": "user", "content": f"question {i} of {prefix}"}]}}
            for i in range(n)]


# --- Limits ---------------------------------------------------------------------------------

def test_limits_read_from_batchplan_yaml():
    limits = Limits.model_validate(yaml.safe_load(
        "gpt-4o-mini: {enqueued_tokens: 2_000_000}\ndefault: {enqueued_tokens: 90000}\n"))
    assert (limits.limit_for(MINI), limits.limit_for(FOUR_O), limits.limit_for("gpt-4o-mini-2024-07-18")) == (
        2_000_000, 90_000, 90_000)
    assert Limits().limit_for(MINI) is None and LIMITS.limit_for(FOUR_O) is None


@pytest.mark.parametrize("entry, problem", [
    ({"enqueued_tokens": 0}, "greater_than"),
    ({"enqueued_tokens": -5}, "greater_than"),
    ({"enqueued_tokens": True}, "int_type"),
    ({"enqueued_tokens": "2000000"}, "int_type"),
    ({"enqueued_tokens": 2.5}, "int_type"),
    ({"enqueued_token": 5}, "extra_forbidden"),
    ({}, "missing"),
])
def test_limits_refuse_what_is_not_a_positive_count(entry, problem):
    with pytest.raises(ValidationError) as caught:
        Limits.model_validate({MINI: entry})
    assert problem in {error["type"] for error in caught.value.errors()}


# --- human numbers and the queued phrase ----------------------------------------------------

@pytest.mark.parametrize("count, text", [
    (0, "0"), (950, "950"), (999, "999"), (1_000, "1k"), (1_234, "1.23k"), (12_345, "12.3k"),
    (850_000, "850k"), (999_499, "999k"), (999_999, "1M"), (1_200_000, "1.2M"), (1_234_567, "1.23M"),
    (2_000_000, "2M"), (15_000_000_000, "15B"),
])
def test_human_tokens(count, text):
    assert human_tokens(count) == text


def test_a_candidate_that_does_not_fit_waits_with_the_phrase_the_plan_shows():
    result = schedule([Candidate("eval", {MINI: 1_200_000})], {MINI: 900_000}, LIMITS)
    assert result == Schedule(queued=(Waiting(Candidate("eval", {MINI: 1_200_000}),
                                              "queued: waits for 1.2M of 2M enqueued tokens of gpt-4o-mini"),))


def test_candidates_that_fit_are_created_now_up_to_the_limit_exactly():
    candidates = [Candidate("a", {MINI: 850_000}), Candidate("b", {MINI: 950}), Candidate("c", {MINI: 1})]
    result = schedule(candidates, {MINI: 2_000_000 - 850_950}, LIMITS)
    assert names(result.now) == ["a", "b"]
    assert result.queued == (Waiting(candidates[2], "queued: waits for 1 of 2M enqueued tokens of gpt-4o-mini"),)


def test_the_queue_is_strict_fifo_per_model():
    # shards in shard order, then specs in name order; a small one never jumps a waiting big one
    candidates = [Candidate("z-small", {MINI: 10}, order_key=("z-small", 0)),
                  Candidate("big-1", {MINI: 1_500_000}, order_key=("big", 1)),
                  Candidate("big-0", {MINI: 1_500_000}, order_key=("big", 0)),
                  Candidate("other", {FOUR_O: 10}, order_key=("a-other", 0))]
    result = schedule(candidates, {}, LIMITS)
    assert names(result.now) == ["other", "big-0"]
    assert [w.phrase for w in result.queued] == [
        "queued: waits for 1.5M of 2M enqueued tokens of gpt-4o-mini",
        "queued: waits for 10 of 2M enqueued tokens of gpt-4o-mini (after big-1)"]
    assert names(result.queued) == ["big-1", "z-small"]


def test_several_models_count_each_share_against_its_own_limit():
    limits = Limits.model_validate({MINI: {"enqueued_tokens": 1000}, FOUR_O: {"enqueued_tokens": 100}})
    candidates = [Candidate("mixed", {MINI: 500, FOUR_O: 80}, order_key=(0,)),
                  Candidate("four-o", {FOUR_O: 10}, order_key=(1,)), Candidate("mini", {MINI: 400}, order_key=(2,)),
                  Candidate("o3", {"o3": 5}, order_key=(3,))]
    result = schedule(candidates, {MINI: 400, FOUR_O: 30}, limits)
    # its gpt-4o-mini share fits (400 + 500), its gpt-4o share does not (30 + 80): it waits, and
    # stands in both models' queues, so "mini" waits behind it although it would fit
    assert names(result.now) == ["o3"]
    assert [w.phrase for w in result.queued] == [
        "queued: waits for 80 of 100 enqueued tokens of gpt-4o",
        "queued: waits for 10 of 100 enqueued tokens of gpt-4o (after mixed)",
        "queued: waits for 400 of 1k enqueued tokens of gpt-4o-mini (after mixed)"]


def test_a_model_without_a_limit_is_never_queued():
    result = schedule([Candidate(f"c{i}", {FOUR_O: 10**12}) for i in range(3)], {FOUR_O: 10**15}, LIMITS)
    assert names(result.now) == ["c0", "c1", "c2"] and not result.queued and not result.too_big


def test_the_default_limit_covers_every_model_not_named():
    limits = Limits.model_validate({MINI: {"enqueued_tokens": 10**9}, "default": {"enqueued_tokens": 100}})
    result = schedule([Candidate("a", {FOUR_O: 60}), Candidate("b", {FOUR_O: 60}),
                       Candidate("c", {MINI: 10**6})], {}, limits)
    assert names(result.now) == ["a", "c"]
    assert [w.phrase for w in result.queued] == ["queued: waits for 60 of 100 enqueued tokens of gpt-4o"]


def test_one_batch_over_the_whole_limit_is_an_error_that_suggests_shards():
    huge = Candidate("nightly-eval", {MINI: 2_500_000}, requests=50_000)
    result = schedule([huge, Candidate("after", {MINI: 10})], {MINI: 1_999_990}, LIMITS)
    assert names(result.now) == ["after"]  # it never runs, so it holds no place in the queue
    with pytest.raises(PlanError) as caught:
        result.check()
    assert str(caught.value) == (
        "nightly-eval: 2,500,000 input tokens of gpt-4o-mini are more than its whole enqueued token limit "
        "(2,000,000), so the batch could never run; split it with `shard.max_requests` in its spec (about "
        "40,000 of its requests fit under the limit)")
    schedule([], {}, LIMITS).check()  # nothing too big: no error


def test_weights_and_tokens_in_flight_come_from_batchplans_own_counts(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in chat_lines(4)))
    tokens = count_file(path, CHAT)
    assert weight(tokens) == {MINI: tokens.input_tokens} and tokens.input_tokens > 0
    assert tokens_in_flight([weight(tokens), {MINI: 5, FOUR_O: 7}, {}]) == {MINI: tokens.input_tokens + 5,
                                                                             FOUR_O: 7}


candidate_lists = st.lists(st.builds(
    Candidate, name=st.text(alphabet="abc", min_size=1, max_size=4),
    tokens=st.dictionaries(st.sampled_from([MINI, FOUR_O, "o3"]), st.integers(0, 3000), max_size=2),
    order_key=st.tuples(st.integers(0, 3))), max_size=12, unique_by=lambda c: c.name)


@settings(max_examples=200, deadline=None)
@given(candidates=candidate_lists, held=st.dictionaries(st.sampled_from([MINI, FOUR_O]), st.integers(0, 3000)),
       order=st.randoms())
def test_schedule_never_goes_over_a_limit_and_keeps_each_models_order(candidates, held, order):
    limits = Limits.model_validate({MINI: {"enqueued_tokens": 2000}, "default": {"enqueued_tokens": 1000}})
    result = schedule(candidates, held, limits)
    shuffled = list(candidates)
    order.shuffle(shuffled)
    assert schedule(shuffled, held, limits) == result  # the input order does not matter
    assert sorted(names(result.now + result.queued + result.too_big)) == sorted(c.name for c in candidates)
    for model in (MINI, FOUR_O, "o3"):
        started = held.get(model, 0) + sum(c.tokens.get(model, 0) for c in result.now)
        assert started <= max(held.get(model, 0), limits.limit_for(model))
        queue = [c.name for c in sorted(candidates, key=lambda c: (c.order_key, c.name))
                 if model in c.tokens and c.name not in names(result.too_big)]
        created = [name for name in queue if name in names(result.now)]
        assert created == queue[:len(created)]  # FIFO: what is created now is a head of the queue


# --- failed_for_capacity --------------------------------------------------------------------

CAPACITY_ENTRY = {"code": "token_limit_exceeded", "line": None, "param": None, "message": "Enqueued ..."}


@pytest.mark.parametrize("batch, expected", [
    ({"status": "failed", "errors": {"object": "list", "data": [CAPACITY_ENTRY]}}, True),
    ({"status": "failed", "errors": [CAPACITY_ENTRY]}, True),  # a BatchRecord's JSON in the state
    ({"status": "failed", "errors": {"data": [{"code": "invalid_json_line"}, CAPACITY_ENTRY]}}, True),
    ({"status": "failed", "errors": {"data": [{"code": "invalid_json_line", "line": 3}]}}, False),
    ({"status": "failed", "errors": None}, False),
    ({"status": "failed"}, False),
    ({"status": "completed", "errors": {"data": [CAPACITY_ENTRY]}}, False),
])
def test_failed_for_capacity_reads_the_batch_error_codes(batch, expected):
    assert failed_for_capacity(batch) is expected


# --- the sandbox's limit, over HTTP with a clock the test moves -----------------------------

AUTH = {"Authorization": "Bearer test"}
STEPS = Timing(validating=1, in_progress=10, finalizing=1, cancelling=1)


class Sandbox:
    """An emulator behind its HTTP server on 127.0.0.1, a client, and the clock it runs on."""

    def __init__(self, server, clock: list[float]):
        self.server, self.clock = server, clock
        self.client = httpx.Client(base_url=server.url, headers=AUTH, timeout=10)

    def create(self, lines: list[dict]) -> str:
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file_id = self.client.post("/files", files={"file": ("in.jsonl", content)},
                                   data={"purpose": "batch"}).raise_for_status().json()["id"]
        return self.client.post("/batches", json={"input_file_id": file_id, "endpoint": CHAT,
                                                  "completion_window": "24h"}).raise_for_status().json()["id"]

    def batch(self, batch_id: str) -> dict:
        return self.client.get(f"/batches/{batch_id}").raise_for_status().json()

    def statuses(self, *batch_ids: str) -> list[str]:
        return [self.batch(batch_id)["status"] for batch_id in batch_ids]

    def at(self, seconds: float) -> Sandbox:
        self.clock[0] = T0 + seconds
        return self


T0 = 1_700_000_000.0


@pytest.fixture
def sandbox_factory(emulator_factory, emulator_server_factory):
    made: list[Sandbox] = []

    def make(limits: dict[str, int], timing: Timing = STEPS) -> Sandbox:
        clock = [T0]
        emulator = emulator_factory(timing=timing, clock=lambda: clock[0], enqueued_token_limits=limits)
        made.append(Sandbox(emulator_server_factory(emulator=emulator), clock))
        return made[-1]

    yield make
    for sandbox in made:
        sandbox.client.close()


def tokens_of(tmp_path: Path, lines: list[dict]) -> int:
    path = tmp_path / "count.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return count_file(path, CHAT).input_tokens


def test_a_batch_over_the_limit_fails_token_limit_exceeded_in_the_apis_words(tmp_path, sandbox_factory):
    first, second = chat_lines(10, prefix="a"), chat_lines(10, prefix="b")
    sandbox = sandbox_factory({MINI: tokens_of(tmp_path, first) + tokens_of(tmp_path, second) - 1})
    a = sandbox.create(first)
    b = sandbox.at(0.5).create(second)
    assert sandbox.at(2).statuses(a, b) == ["in_progress", "failed"]
    failed = sandbox.batch(b)
    assert failed["errors"] == {"object": "list", "data": [{
        "code": "token_limit_exceeded", "line": None, "param": None,
        "message": f"Enqueued token limit reached for gpt-4o-mini in organization org-batchplansandbox. Limit: "
                   f"{tokens_of(tmp_path, first) + tokens_of(tmp_path, second) - 1:,} enqueued tokens. Please "
                   "try again once some in_progress batches have been completed."}]}
    assert failed["failed_at"] == int(T0 + 1.5) and failed["in_progress_at"] is None
    assert failed_for_capacity(failed) and failed_for_capacity(BatchRecord.from_api(failed))
    assert failed_for_capacity(BatchRecord.from_api(failed).model_dump(mode="json"))
    assert sandbox.at(13).statuses(a) == ["completed"] and not failed_for_capacity(sandbox.batch(a))
    c = sandbox.create(second)  # capacity is free again: the same batch made again runs
    assert sandbox.at(15).statuses(c) == ["in_progress"]


def test_batches_within_the_limit_run_side_by_side(tmp_path, sandbox_factory):
    first, second = chat_lines(10, prefix="a"), chat_lines(10, prefix="b")
    sandbox = sandbox_factory({MINI: tokens_of(tmp_path, first) + tokens_of(tmp_path, second)})
    a, b = sandbox.create(first), sandbox.create(second)
    other = sandbox.create(chat_lines(50, model=FOUR_O))  # a model without a limit: never refused
    assert sandbox.at(2).statuses(a, b, other) == ["in_progress"] * 3
    assert sandbox.at(20).statuses(a, b, other) == ["completed"] * 3


def test_a_world_replayed_at_once_decides_in_the_order_steps_fell_due(tmp_path, sandbox_factory):
    # `late` is created first but validates last: it must see `early` in progress, as it
    # would have had someone watched every second, although nobody asked in between.
    lines = chat_lines(10)
    sandbox = sandbox_factory({MINI: tokens_of(tmp_path, lines) * 3 // 2})
    sandbox.server.emulator.timing = Timing(validating=5, in_progress=10, finalizing=1, cancelling=1)
    late = sandbox.create(lines)
    sandbox.server.emulator.timing = STEPS
    early = sandbox.at(1).create(lines)
    assert sandbox.at(30).statuses(late, early) == ["failed", "completed"]


def test_the_timeline_of_held_tokens_never_goes_over_the_limit(tmp_path, sandbox_factory):
    sizes = [10, 30, 5, 20, 10, 40, 10]
    batches = [chat_lines(n, prefix=f"b{i}-") for i, n in enumerate(sizes)]
    limit = tokens_of(tmp_path, batches[1]) + tokens_of(tmp_path, batches[3])
    sandbox = sandbox_factory({MINI: limit})
    ids = [sandbox.at(3 * i).create(lines) for i, lines in enumerate(batches)]
    sandbox.at(100)
    timeline = sandbox.server.emulator.enqueued_timeline()
    statuses = sandbox.statuses(*ids)
    assert {"completed", "failed"} == set(statuses)  # some ran, some were refused
    ran = {batch_id for batch_id, status in zip(ids, statuses) if status == "completed"}
    assert {o.batch_id for o in timeline} == ran
    assert all(o.tokens == tokens_of(tmp_path, batches[ids.index(o.batch_id)]) for o in timeline)
    assert all(o.end - o.start == 11 for o in timeline)  # in_progress, then finalizing, then released
    assert peak_in_flight(timeline)[MINI] <= limit
    assert peak_in_flight(timeline)[MINI] > max(o.tokens for o in timeline)  # two did run side by side


def test_peak_in_flight_frees_before_it_takes_at_the_same_moment():
    timeline = [Occupancy("a", MINI, 5, 0, 10), Occupancy("b", MINI, 7, 10, None), Occupancy("c", MINI, 1, 2, 12),
                Occupancy("d", FOUR_O, 3, 0, 1)]
    assert peak_in_flight(timeline) == {MINI: 8, FOUR_O: 3}


def test_each_provider_queues_against_its_own_limits_and_its_own_batches_in_flight():
    """Queues are kept per (provider, model): research's small limit and its queue hold nothing up on the
    environment's provider, and the tokens in flight there do not count against research."""
    limits = {None: LIMITS, "research": Limits.model_validate({MINI: {"enqueued_tokens": 1_000}})}
    candidates = [Candidate("a", {MINI: 900}, provider="research"), Candidate("b", {MINI: 900}, provider="research"),
                  Candidate("c", {MINI: 1_500_000}), Candidate("d", {MINI: 500_000})]
    result = schedule_by_provider(candidates, {None: {MINI: 100_000}}, limits.__getitem__)
    assert result == Schedule(
        now=(candidates[2], candidates[0]),  # the environment's provider first, then named ones by name
        queued=(Waiting(candidates[3], "queued: waits for 500k of 2M enqueued tokens of gpt-4o-mini"),
                Waiting(candidates[1], "queued: waits for 900 of 1k enqueued tokens of gpt-4o-mini")))
