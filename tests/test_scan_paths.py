"""Issue 10: the scanner's fast path (a block of lines checked at once, msgspec) never changes a verdict.

`_Scanner.feed_block` passes a whole block when every line is a good request and no limit or
shard cut falls among them; else it checks the block line by line with `_Scanner.feed`, which
words the problems. So the report of a file must be the same whatever its lines' grouping into
blocks: here, for random mixes of good and bad lines, the report of `scan_input` at three read
sizes equals the report of `feed` called on every line, one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.inputs import InputReport, _Scanner, scan_input
from reconciler.shards import ShardLimits, Splitter
from tests.helpers import applied, batch_of, cli, waited

CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"


def line(custom_id: object = "a", *, method: object = "POST", url: str = CHAT, model: object = "m1",
         extra: str = "1", inputs: str | None = None) -> bytes:
    body = {"model": model} if model is not ... else {}
    text = json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})
    text = text[:-2] + f', "x": {extra}' + (f', "input": {inputs}' if inputs is not None else "") + "}}"
    return text.encode()


ids = st.sampled_from(["a", "b", "c", "d", "é", "", 7])
good = st.builds(line, ids)
odd = st.one_of(
    st.builds(line, ids, extra=st.sampled_from(["1e400", "-1E+999", "1" * 400, "1" * 25, "[[[[1]]]]",
                                                 "[" * 1100 + "]" * 1100, '"\\ud800"', "NaN", "01"])),
    st.builds(line, ids, model=st.sampled_from(["m2", None, 5, ...])),
    st.builds(line, ids, method=st.sampled_from(["GET", None])),
    st.builds(line, ids, url=st.sampled_from([EMBED, "/v1/x"])),
    st.builds(line, ids, inputs=st.sampled_from(['"t"', "[1, 2, 3]", "[]", "null", "5", '{"a": 1}'])),
    st.sampled_from([b"", b"   ", b"{}", b"[1]", b'"s"', b"null", b"{", b"\xef\xbb\xbf{}",
                     line()[:-1] + b"}{}", line() + b" " + line(), line().replace(b"m1", b"\xff\xfe"),
                     line().replace(b"m1", b"\xed\xa0\x80"), line().replace(b'"x": 1', b'"x": 1\r'),
                     line().replace(b'{"custom_id"', b'{"body": 5, "custom_id"')]),
)
files = st.lists(st.one_of(good, good, good, odd), min_size=1, max_size=40).map(b"\n".join).filter(bool)


def line_by_line(data: bytes, endpoint: str, splitter: Splitter | None, path: Path) -> InputReport:
    """The reference: `feed` on every line, as the scanner did before it had a fast path."""
    report = InputReport()
    scanner = _Scanner(str(path), endpoint, report, 20, splitter)
    if splitter is not None:
        splitter.begin(path, scanner.problem)
    start = 0
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for n, raw in enumerate(lines, 1):
        stop = min(start + len(raw) + 1, len(data))
        scanner.feed(raw, n, start, stop)
        start = stop
    if splitter is not None:
        report.shards = splitter.finish(None, len(lines), len(data))
    return report


def verdict(report: InputReport) -> tuple:
    return ([(p.code, p.line, p.field, p.message) for p in report.problems], report.more_problems,
            report.models, report.embedding_inputs, [(s.start, s.end, s.requests, s.cut_by) for s in report.shards])


@settings(max_examples=150, deadline=None)
@given(data=files, endpoint=st.sampled_from([CHAT, EMBED]), newline=st.booleans(),
       limits=st.none() | st.builds(ShardLimits, max_requests=st.integers(1, 9), max_bytes=st.integers(150, 3000)))
def test_a_file_gets_the_same_report_whatever_its_lines_grouping(tmp_path_factory, data, endpoint, newline, limits):
    data = data.replace(CHAT.encode(), endpoint.encode()) + (b"\n" if newline else b"")
    path = tmp_path_factory.mktemp("paths") / "in.jsonl"
    path.write_bytes(data)
    expected = verdict(line_by_line(data, endpoint, limits and Splitter(limits), path))
    for chunk_size in (5, 100, 1 << 20):
        report = scan_input(path, endpoint, chunk_size=chunk_size, splitter=limits and Splitter(limits))
        assert verdict(report) == expected, chunk_size


def test_numbers_past_a_floats_range_are_valid_json_on_both_paths(tmp_path):
    """orjson refuses 1e400; the fast path's decoder takes it (valid JSON): so does the line-by-line
    path, and a duplicate custom_id beside it (which sends its block line by line) is still found."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(line("a", extra="1e400") + b"\n" + line("b", extra="1" * 400) + b"\n" + line("a") + b"\n")
    report = scan_input(path, CHAT)
    assert [(p.code, p.line) for p in report.problems] == [("duplicate_custom_id", 3)]


def test_a_line_with_a_number_orjson_cannot_hold_runs_end_to_end(repo, sandbox_env):
    """Valid JSON (1e400, which Python's json reads as inf) is validated, sent, run by the sandbox
    and joined with its result: every reader of input lines takes it (inputs.load_line)."""
    path = repo.root / "data" / "a.jsonl"
    path.write_bytes(line("r1", url=CHAT, model="gpt-4o-mini", extra="1e400") + b"\n" +
                     line("r2", url=CHAT, model="gpt-4o-mini") + b"\n")
    repo.spec("a", input="../data/a.jsonl")
    assert cli(repo, sandbox_env, "validate").code == 0
    applied(repo, sandbox_env)
    waited(repo, sandbox_env, "a")
    joined = cli(repo, sandbox_env, "download", "a", "--join")
    assert joined.code == 0, joined.err
    rows = (repo.root / "results" / "a" / batch_of(repo, "a") / "joined.jsonl").read_text().splitlines()
    # the sandbox answers each with an error (`x` is no parameter of the endpoint): it read both lines;
    # the joined file is JSON, written by orjson: inf is null there
    assert [(r["custom_id"], r["request"]["x"], r["error"]["code"] if r["error"] else r["response"]["status_code"])
            for r in map(json.loads, rows)] == [("r1", None, 400), ("r2", 1, 400)]
