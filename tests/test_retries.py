"""Issue 12 (the core): which requests to send again, the retry input byte for byte, merged results.

Unit tests over real files, a property over random attempts, and one run against the
sandbox on 127.0.0.1: a batch with 500s, 429s, a bad request and an expiry part way,
its files downloaded through the results cache, a retry batch made from the selection,
and the two attempts merged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reconciler.api import Api
from reconciler.errors import StalePlanError, StateError
from reconciler.results import (AttemptFiles, ErrorClass, ResultsCache, classify_results, error_class,
                                merge_attempts, request_lines)
from reconciler.retries import (RetryPolicy, iter_retry_lines, next_attempt, retry_candidates, retry_filename,
                                retry_reason, status_phrase, write_retry_input)
from reconciler.sandbox import Timing
from reconciler.sandbox.outcomes import RequestFault

ALL = RetryPolicy(max_attempts=3)
CHAT = "/v1/chat/completions"


# --- lines as the API writes them ---

def ok(custom_id: str, content: str = "fine") -> dict:
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{custom_id}",
                         "body": {"choices": [{"message": {"content": content}}]}}, "error": None}


def failed(custom_id: str, status: int) -> dict:
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{custom_id}",
                         "body": {"error": {"message": f"failed with {status}", "type": "x", "param": None,
                                            "code": None}}}, "error": None}


def expired(custom_id: str) -> dict:
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired", "message": "This request could not be executed before the "
                                                          "completion window expired."}}


def write(path: Path, lines: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def request(custom_id: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {custom_id}"}]}}


# Lines written as a person or another tool might: custom_id not first, odd spacing, non-ASCII,
# and a last line with no newline. A retry input must hold them exactly as they are.
ODD_INPUT = (
    b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'
    b'{"method":"POST","url":"/v1/chat/completions","body":{"model":"m"},"custom_id":"b"}\n'
    b'  {"custom_id" : "c",   "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
    b'"x": "\xc3\xa9t\xc3\xa9 \\" quoted"}}\r\n'
    b'{"custom_id": "d\\u00e9", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'
    b'{"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}'
)


def odd_lines() -> list[bytes]:
    return ODD_INPUT.splitlines(keepends=True)


# --- the policy ---

def problems(data: dict) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as caught:
        RetryPolicy.model_validate(data)
    return [(err["loc"], err["msg"]) for err in caught.value.errors()]


def test_a_policy_defaults_to_all_three_reasons_and_writes_them_in_one_order():
    assert RetryPolicy(max_attempts=3).on == (ErrorClass.EXPIRED, ErrorClass.SERVER_ERROR, ErrorClass.RATE_LIMITED)
    policy = RetryPolicy.model_validate({"max_attempts": 2, "on": ["rate_limited", "expired", "rate_limited"]})
    assert policy.model_dump(mode="json") == {"max_attempts": 2, "on": ["expired", "rate_limited"]}
    assert RetryPolicy.model_validate(policy.model_dump(mode="json")) == policy
    assert RetryPolicy.model_validate({"max_attempts": 1, "on": "expired"}).on == (ErrorClass.EXPIRED,)
    assert RetryPolicy(max_attempts=10).max_attempts == 10


def test_bad_attempt_counts_are_named_with_what_to_write():
    assert problems({"max_attempts": 0}) == [(("max_attempts",), "0 is too few: max_attempts counts every batch, the "
                                              "first included; use 1 to 10 (3 is the first and up to two retries)")]
    assert problems({"max_attempts": 11}) == [(("max_attempts",), "11 is too many: at most 10 batches in all (the "
                                               "first and up to 9 retries)")]
    assert problems({"max_attempts": "3"}) == [(("max_attempts",), "must be a whole number from 1 to 10, not '3'")]
    assert problems({"max_attempts": True}) == [(("max_attempts",), "must be a whole number from 1 to 10, not True")]
    assert problems({}) == [(("max_attempts",), "missing; say how many batches in all, the first included: 1 to 10 "
                                                "(max_attempts: 3 is the first and up to two retries)")]


def test_bad_reasons_are_each_named_at_their_index():
    assert problems({"max_attempts": 3, "on": ["expird", "client_error", "server_error", 429]}) == [
        (("on", 0), "'expird' is not a reason to retry; did you mean 'expired'? use any of expired, server_error, "
                    "rate_limited"),
        (("on", 1), "'client_error' is never retried: a request that failed with a 4xx other than 429 would fail "
                    "again; use expired, server_error, rate_limited"),
        (("on", 3), "429 is not a reason to retry; use any of expired, server_error, rate_limited"),
    ]
    assert problems({"max_attempts": 3, "on": []}) == [
        (("on",), "empty; list at least one of expired, server_error, rate_limited, or leave `on` out to retry on "
                  "all three")]
    assert problems({"max_attempts": 3, "on": {"expired": True}}) == [
        (("on",), "must be a list of expired, server_error, rate_limited, not {'expired': True}")]
    assert problems({"max_attempts": 3, "tries": 2}) == [(("tries",), "Extra inputs are not permitted")]


def test_a_bad_policy_reads_as_one_message_per_field():
    with pytest.raises(ValidationError) as caught:
        RetryPolicy.model_validate({"max_attempts": 12, "on": ["4xx"]})
    assert str(caught.value).splitlines()[:5] == [
        "2 validation errors for RetryPolicy",
        "max_attempts",
        "  12 is too many: at most 10 batches in all (the first and up to 9 retries) [type=retry_attempts, "
        "input_value=12, input_type=int]",
        "on.0",
        "  '4xx' is never retried: a request that failed with a 4xx other than 429 would fail again; use expired, "
        "server_error, rate_limited [type=retry_on, input_value='4xx', input_type=str]",
    ]


# --- classifying result lines ---

def test_each_line_is_classed_by_what_it_says():
    other = {"id": "x", "custom_id": "o", "response": None, "error": {"code": "batch_cancelled", "message": "m"}}
    assert [error_class(line) for line in (ok("a"), failed("b", 500), failed("c", 503), failed("d", 429),
                                           failed("e", 400), failed("f", 404), expired("g"), other)] == [
        None, ErrorClass.SERVER_ERROR, ErrorClass.SERVER_ERROR, ErrorClass.RATE_LIMITED, ErrorClass.CLIENT_ERROR,
        ErrorClass.CLIENT_ERROR, ErrorClass.EXPIRED, ErrorClass.OTHER]
    assert error_class({**ok("a"), "error": {"code": "weird"}}) == ErrorClass.OTHER  # a 200 with an error is none


def test_the_first_success_and_the_latest_error_count(tmp_path):
    first = AttemptFiles(write(tmp_path / "1-out.jsonl", [ok("a"), failed("x", 400)]),
                         write(tmp_path / "1-err.jsonl", [failed("b", 500), failed("c", 429), expired("d"),
                                                          "", "not json", '{"custom_id": 7}']))
    second = AttemptFiles(write(tmp_path / "2-out.jsonl", [ok("b"), ok("a", "again")]),
                          write(tmp_path / "2-err.jsonl", [expired("c"), failed("d", 502)]))
    outcome = classify_results([first, second, (None, None)])
    assert outcome.files == (*first, *second)
    assert sorted(outcome.succeeded) == ["a", "b"]
    assert outcome.succeeded["a"].file == 0  # the first success stands
    assert {cid: f.kind for cid, f in outcome.failed.items()} == {
        "c": ErrorClass.EXPIRED, "d": ErrorClass.SERVER_ERROR, "x": ErrorClass.CLIENT_ERROR}
    assert outcome.unreadable == 2  # "not json" and a custom_id that is no string; the blank line is nothing
    ref = outcome.failed["d"].line
    assert json.loads(second.errors.read_bytes()[ref.start:ref.stop]) == failed("d", 502)


def test_request_lines_find_every_custom_id_and_exact_byte_range(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(ODD_INPUT)
    found = list(request_lines(path))
    assert [cid for cid, *_ in found] == ["a", "b", "c", "dé", "e"]
    assert [raw for *_, raw in found] == odd_lines()
    assert all(ODD_INPUT[start:stop] == raw for _, start, stop, raw in found)


# --- selecting what to send again ---

def odd_outcome(tmp_path: Path):
    return classify_results([(write(tmp_path / "out.jsonl", [ok("b")]),
                              write(tmp_path / "err.jsonl", [expired("a"), failed("c", 500), failed("dé", 400),
                                                             failed("e", 429)]))])


def test_the_retry_input_is_the_failed_lines_byte_for_byte_and_content_addressed(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(ODD_INPUT)
    selection = retry_candidates(source, odd_outcome(tmp_path), ALL)
    lines = odd_lines()
    expected = lines[0] + lines[2] + lines[4]  # a (expired), c (500), e (429); never dé (400)
    assert (selection.total, selection.succeeded, selection.requests) == (5, 1, 3)
    assert selection.reasons == Counter({"expired": 1, "server_error": 1, "rate_limited": 1})
    assert selection.kept == Counter({"client_error": 1})
    assert (selection.sha256, selection.size) == (hashlib.sha256(expected).hexdigest(), len(expected))
    assert b"".join(iter_retry_lines(source, selection)) == expected
    dest = write_retry_input(source, selection, tmp_path / "retry" / "attempt-2.jsonl")
    assert dest.read_bytes() == expected and list(dest.parent.iterdir()) == [dest]


def test_only_the_policys_reasons_are_retried_and_a_request_with_no_line_is_not(tmp_path):
    source = write(tmp_path / "in.jsonl", [request(c) for c in ("a", "b", "c", "dé", "e", "lost")])
    selection = retry_candidates(source, odd_outcome(tmp_path), RetryPolicy(max_attempts=2, on=["expired"]))
    assert selection.requests == 1 and selection.reasons == Counter({"expired": 1})
    assert selection.kept == Counter({"server_error": 1, "rate_limited": 1, "client_error": 1, "missing": 1})
    assert b"".join(iter_retry_lines(source, selection)) == source.read_bytes().splitlines(keepends=True)[0]


def test_an_input_changed_since_the_plan_is_never_written_or_streamed_whole(tmp_path):
    source = write(tmp_path / "in.jsonl", [request(c) for c in "abc"])
    outcome = classify_results([(None, write(tmp_path / "err.jsonl", [expired("a"), expired("c")]))])
    selection = retry_candidates(source, outcome, ALL)
    write(source, [request(c) for c in "abC"])  # same size, one byte changed in a selected line
    dest = tmp_path / "retry.jsonl"
    with pytest.raises(StalePlanError) as caught:
        write_retry_input(source, selection, dest)
    assert str(caught.value) == (f"{source} changed since the retry was planned (the lines to send again are not "
                                 "those the plan saw); run the plan again")
    assert not dest.exists() and list(tmp_path.glob(".retry*")) == []
    streamed = iter_retry_lines(source, selection)
    assert next(streamed) == source.read_bytes().splitlines(keepends=True)[0]
    with pytest.raises(StalePlanError):
        next(streamed)  # the last line is never handed out


def test_next_attempt_follows_an_ended_batch_until_the_policy_is_used_up(tmp_path):
    source = write(tmp_path / "in.jsonl", [request("a"), request("b")])
    some = retry_candidates(source, classify_results([(None, write(tmp_path / "e.jsonl", [expired("a")]))]), ALL)
    none = retry_candidates(source, classify_results([(write(tmp_path / "o.jsonl", [ok("a"), ok("b")]), None)]), ALL)
    assert [next_attempt(status, 1, ALL, some) for status in ("completed", "expired", "cancelled", "failed")] == [
        2, 2, None, None]
    assert [next_attempt("expired", made, ALL, some) for made in (1, 2, 3)] == [2, 3, None]
    assert next_attempt("completed", 1, ALL, none) is None
    assert next_attempt("completed", 1, None, some) is None


def test_a_retry_upload_name_carries_its_hash_and_attempt():
    assert retry_filename("data/eval.jsonl", 2, "ab" * 32) == f"eval.attempt-2.batchplan-{'ab' * 32}.jsonl"


# --- the words of plan and status ---

def selection_of(tmp_path: Path, total: int, errors: list[dict], successes: int) -> object:
    source = write(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(total)])
    outcome = classify_results([(write(tmp_path / "out.jsonl", [ok(f"r{i}") for i in range(successes)]),
                                 write(tmp_path / "err.jsonl", errors))])
    return retry_candidates(source, outcome, ALL)


def test_plan_says_how_many_requests_why_and_which_attempt(tmp_path):
    one_reason = selection_of(tmp_path, 5000, [expired(f"r{i}") for i in range(4963, 5000)], 4963)
    assert retry_reason(one_reason, 2, ALL) == "37 of 5,000 requests without a result (expired); attempt 2 of 3"
    mixed = selection_of(tmp_path, 10, [expired("r5"), expired("r6"), failed("r7", 500), failed("r8", 400),
                                        failed("r9", 429)], 5)
    assert retry_reason(mixed, 3, ALL) == ("4 of 10 requests without a result (2 expired, 1 server_error, "
                                           "1 rate_limited); attempt 3 of 3; 1 not retried (client_error)")
    single = selection_of(tmp_path, 1, [failed("r0", 503)], 0)
    assert retry_reason(single, 2, RetryPolicy(max_attempts=2)) == ("1 of 1 request without a result "
                                                                    "(server_error); attempt 2 of 2")


def test_status_says_how_far_the_attempts_got(tmp_path):
    twelve_left = selection_of(tmp_path, 5000, [expired(f"r{i}") for i in range(4988, 5000)], 4988)
    assert status_phrase(twelve_left, 3, ALL) == "3 of 3 attempts used; 12 requests without a result"
    assert status_phrase(twelve_left, 2, ALL) == "4,988 of 5,000 requests done over 2 attempts"
    done = selection_of(tmp_path, 1, [], 1)
    assert status_phrase(done, 1, None) == "1 of 1 request done over 1 attempt"
    one_left = selection_of(tmp_path, 2, [failed("r1", 400)], 1)
    assert status_phrase(one_left, 1, None) == "1 of 1 attempt used; 1 request without a result"


# --- merging attempts ---

def test_merge_keeps_input_order_the_first_success_and_only_the_latest_error_of_the_rest(tmp_path):
    source = write(tmp_path / "in.jsonl", [request(c) for c in "abcdef"])
    first = (write(tmp_path / "1o.jsonl", [ok("c", "first"), ok("a", "first")]),
             write(tmp_path / "1e.jsonl", [failed("b", 500), expired("d"), failed("e", 429), failed("f", 400)]))
    second = (write(tmp_path / "2o.jsonl", [ok("d", "second"), ok("c", "second")]),
              write(tmp_path / "2e.jsonl", [expired("b"), failed("e", 503)]))
    out, err = tmp_path / "results" / "output.jsonl", tmp_path / "results" / "errors.jsonl"
    report = merge_attempts(source, [first, second], out, err)
    assert out.read_text() == "".join(json.dumps(x) + "\n" for x in (ok("a", "first"), ok("c", "first"),
                                                                     ok("d", "second")))
    assert err.read_text() == "".join(json.dumps(x) + "\n" for x in (expired("b"), failed("e", 503),
                                                                     failed("f", 400)))
    assert (report.outputs, report.errors, report.missing, report.strays) == (3, 3, 0, 0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["errors.jsonl", "output.jsonl"]


def test_merge_keeps_lines_no_input_asked_for_and_counts_requests_with_none(tmp_path):
    source = write(tmp_path / "in.jsonl", [request("a"), request("b"), request("lost")])
    outputs = tmp_path / "o.jsonl"
    outputs.write_bytes((json.dumps(ok("zz")) + "\n" + json.dumps(ok("b"))).encode())  # no final newline
    errors = write(tmp_path / "e.jsonl", [failed("yy", 500), failed("a", 429)])
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    report = merge_attempts(source, [(outputs, errors)], out, err)
    assert out.read_text() == json.dumps(ok("b")) + "\n" + json.dumps(ok("zz")) + "\n"
    assert err.read_text() == json.dumps(failed("a", 429)) + "\n" + json.dumps(failed("yy", 500)) + "\n"
    assert (report.outputs, report.errors, report.missing, report.strays) == (1, 1, 1, 2)


def test_a_merge_that_fails_replaces_neither_file(tmp_path):
    source = write(tmp_path / "in.jsonl", [request("a")])
    out, err = write(tmp_path / "out.jsonl", ["old"]), write(tmp_path / "err.jsonl", ["old"])
    with pytest.raises(FileNotFoundError):
        merge_attempts(source, [(write(tmp_path / "o.jsonl", [ok("a")]), tmp_path / "gone.jsonl")], out, err)
    assert out.read_text() == err.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err.jsonl", "in.jsonl", "o.jsonl", "out.jsonl"]


RESULT = st.sampled_from(["ok", 500, 429, 400, "expired", None])  # None: no line in that attempt


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(RESULT, min_size=1, max_size=4), min_size=1, max_size=12))
def test_merge_and_selection_agree_with_a_plain_reading_of_every_attempt(histories):
    """For any results of any number of attempts: each request once, in input order, where it belongs."""
    attempts = max(len(h) for h in histories)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = [f"q{i}" for i in range(len(histories))]
        source = write(root / "in.jsonl", [request(c) for c in ids])
        files = []
        for n in range(attempts):
            said = {c: h[n] for c, h in zip(ids, histories) if n < len(h) and h[n] is not None}
            lines = {c: ok(c, f"attempt {n}") if r == "ok" else expired(c) if r == "expired" else failed(c, r)
                     for c, r in reversed(said.items())}  # results come out of input order
            files.append((write(root / f"{n}o.jsonl", [ln for c, ln in lines.items() if said[c] == "ok"]),
                          write(root / f"{n}e.jsonl", [ln for c, ln in lines.items() if said[c] != "ok"])))
        merge_attempts(source, files, root / "out.jsonl", root / "err.jsonl")
        outputs = [json.loads(ln) for ln in (root / "out.jsonl").read_text().splitlines()]
        errors = [json.loads(ln) for ln in (root / "err.jsonl").read_text().splitlines()]
        expected_ok, expected_err, expected_retry = [], [], []
        for c, history in zip(ids, histories):
            said = [(n, r) for n, r in enumerate(history) if r is not None]
            first_ok = next((n for n, r in said if r == "ok"), None)
            if first_ok is not None:
                expected_ok.append(ok(c, f"attempt {first_ok}"))
            elif said:
                latest = said[-1][1]
                expected_err.append(expired(c) if latest == "expired" else failed(c, latest))
                if latest != 400:
                    expected_retry.append(c)
        assert outputs == expected_ok and errors == expected_err
        selection = retry_candidates(source, classify_results(files), ALL)
        retried = [json.loads(ln)["custom_id"] for ln in iter_retry_lines(source, selection)]
        assert retried == expected_retry


# --- the cache of result files ---

def test_the_cache_vouches_only_for_files_whose_bytes_match_their_checksum(tmp_path):
    cache = ResultsCache(tmp_path / "results-cache")
    assert not cache.intact("file-abc")
    path = cache.path("file-abc")
    write(path, [ok("a")])
    assert not cache.intact("file-abc")  # no checksum yet: a download cut short
    digest = cache.record("file-abc")
    assert cache.intact("file-abc")
    assert (tmp_path / "results-cache" / "file-abc.jsonl.sha256").read_text() == f"{digest}  file-abc.jsonl\n"
    path.write_text(path.read_text().replace("fine", "FINE"))
    assert not cache.intact("file-abc")
    with pytest.raises(StateError) as caught:
        cache.path("../state/batchplan.state")
    assert str(caught.value) == ("'../state/batchplan.state' is not a file id batchplan can cache (letters, digits, "
                                 "'_' and '-'); check the state entry that holds it")


# --- end to end, against the sandbox ---

AUTH = {"Authorization": "Bearer test"}


def run_batch(client: httpx.Client, content: bytes, filename: str) -> dict:
    file_id = client.post("/files", files={"file": (filename, content)},
                          data={"purpose": "batch"}).raise_for_status().json()["id"]
    batch = client.post("/batches", json={"input_file_id": file_id, "endpoint": CHAT,
                                          "completion_window": "24h"}).raise_for_status().json()
    for _ in range(500):
        if batch["status"] in ("completed", "expired", "failed", "cancelled"):
            return batch
        batch = client.get(f"/batches/{batch['id']}").raise_for_status().json()
        asyncio.run(asyncio.sleep(0.02))
    raise AssertionError(f"batch {batch['id']} is still {batch['status']}")


async def fetch_all(url: str, cache: ResultsCache, batches: list[dict]) -> tuple[list[AttemptFiles], int]:
    """Every result file of `batches` through the cache, twice; returns the files and the downloads made."""
    async with Api(url, "sk-test") as api:
        for _ in range(2):
            files = [AttemptFiles(*[await cache.fetch(api, b[key]) if b[key] else None
                                    for key in ("output_file_id", "error_file_id")]) for b in batches]
        return files, api.calls["GET /files/{id}/content"]


def plain_reading(files: AttemptFiles) -> dict[str, int | str]:
    """custom_id -> status code, or "expired": the test's own reading of one attempt's files."""
    lines = [json.loads(ln) for path in files if path for ln in path.read_text().splitlines()]
    return {ln["custom_id"]: "expired" if ln["response"] is None else ln["response"]["status_code"] for ln in lines}


def test_a_faulty_expired_batch_is_finished_by_a_retry_of_exactly_its_failed_lines(emulator_server_factory, tmp_path):
    # The sandbox runs half of the failures and half of the successes before it expires, each in
    # input order: so q1-q2 (429), q4-q5 (500) and q7 (400) fail, q20-q24 (500) never run.
    faults = [RequestFault(custom_id="^q[12]$", status=429), RequestFault(custom_id="^q([45]|2[0-4])$", status=500)]
    server = emulator_server_factory(timing=Timing(validating=0.05, in_progress=0.4, finalizing=0.05),
                                     expire_after=0.5, request_faults=faults)
    lines = [request(f"q{i}") for i in range(30)]
    lines[7]["body"]["messages"][0]["role"] = "wizard"  # a bad request: a 400, never retried
    source = write(tmp_path / "data" / "eval.jsonl", lines)
    cache = ResultsCache(tmp_path / "state" / "results-cache")
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
        first = run_batch(client, source.read_bytes(), "eval.jsonl")
        assert first["status"] == "expired"
        (attempt_1,), downloads = asyncio.run(fetch_all(server.url, cache, [first]))
        assert downloads == 2  # output and error file, each once though asked for twice

        said = plain_reading(attempt_1)
        assert set(said.values()) >= {200, 500, 429, 400, "expired"} and len(said) == 30
        retry_ids = [f"q{i}" for i in range(30) if said[f"q{i}"] in (500, 429, "expired")]
        outcome = classify_results([attempt_1])
        selection = retry_candidates(source, outcome, ALL)
        retry = write_retry_input(source, selection, tmp_path / "retry.jsonl")
        originals = source.read_bytes().splitlines(keepends=True)
        assert retry.read_bytes() == b"".join(originals[int(c[1:])] for c in retry_ids)
        assert selection.kept == Counter({"client_error": 1}) and selection.requests == len(retry_ids)
        assert retry_reason(selection, 2, ALL) == ("19 of 30 requests without a result (15 expired, 2 server_error, "
                                                   "2 rate_limited); attempt 2 of 3; 1 not retried (client_error)")

        httpx.post(f"{server.control_url}/batch-faults", json={"requests": [], "expire_after": None}).raise_for_status()
        second = run_batch(client, retry.read_bytes(), retry_filename("eval.jsonl", 2, selection.sha256))
        assert second["status"] == "completed"
        (attempt_1_again, attempt_2), downloads = asyncio.run(fetch_all(server.url, cache, [first, second]))
        assert attempt_1_again == attempt_1 and downloads == 1  # only the new output file

    report = merge_attempts(source, [attempt_1, attempt_2], tmp_path / "results" / "output.jsonl",
                            tmp_path / "results" / "errors.jsonl")
    merged = [json.loads(ln) for ln in (tmp_path / "results" / "output.jsonl").read_text().splitlines()]
    assert [ln["custom_id"] for ln in merged] == [f"q{i}" for i in range(30) if i != 7]  # input order, each once
    assert all(ln["response"]["status_code"] == 200 for ln in merged)
    errors = [json.loads(ln) for ln in (tmp_path / "results" / "errors.jsonl").read_text().splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("q7", 400)]
    assert (report.outputs, report.errors, report.missing, report.strays) == (29, 1, 0, 0)
    final = retry_candidates(source, classify_results([attempt_1, attempt_2]), ALL)
    assert status_phrase(final, 2, ALL) == "29 of 30 requests done over 2 attempts"
    assert next_attempt(second["status"], 2, ALL, final) is None
