"""Issue 10: one input file of any size, split into shards that are each one batch.

The splitter runs inside the validating pass (inputs.scan_input with a Splitter); these
tests check its boundaries at every limit, their stability as lines are appended, each
shard's hash, the byte-range reader through a real upload to the sandbox, and the merges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reconciler.errors import StalePlanError, ValidationFailed
from reconciler.inputs import MAX_BYTES, MAX_EMBEDDING_INPUTS, MAX_REQUESTS, HashCache, scan_input, split_identity
from reconciler.shards import (BY_BYTES, BY_INPUTS, BY_REQUESTS, Shard, ShardLimits, Splitter, describe_split,
                               merge_in_input_order, merge_jsonl, open_lines, open_range, open_shard,
                               open_verified, split_input)
from tests.helpers import ENDPOINT, request_line, write_jsonl

EMBEDDINGS = "/v1/embeddings"


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_lines(count: int, start: int = 0, pad: int = 0) -> list[dict]:
    return [request_line(f"r{i}", content_pad="x" * pad) for i in range(start, start + count)]


def embedding_line(custom_id: str, inputs: int) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS,
            "body": {"model": "text-embedding-3-small", "input": ["x"] * inputs}}


def split_bytes(tmp_path: Path, data: bytes, limits: ShardLimits | None = None,
                endpoint: str = ENDPOINT, chunk_size: int = 1 << 20) -> list[Shard]:
    path = tmp_path / "input.jsonl"
    path.write_bytes(data)
    report = scan_input(path, endpoint, chunk_size=chunk_size, splitter=Splitter(limits))
    assert report.ok, report.problems
    return report.shards


def lines_of(shards: list[Shard]) -> list[tuple[int, int]]:
    return [(s.first_line, s.last_line) for s in shards]


def assert_tiles(shards: list[Shard], data: bytes) -> None:
    """Shards cover the file end to end, in order, each hashed over exactly its bytes (and, when the
    file is split, given the xxh3_128 of those bytes that its upload is checked by)."""
    assert shards[0].start == 0 and shards[-1].end == len(data)
    for before, after in zip(shards, shards[1:]):
        assert before.end == after.start and before.last_line + 1 == after.first_line
    for shard in shards:
        assert shard.sha256 == hashlib.sha256(data[shard.start:shard.end]).hexdigest()
        assert data[shard.start:shard.end].count(b"\n") == shard.requests
        if len(shards) > 1:  # a file that is one shard is uploaded whole, checked by its sha256
            assert shard.xxh3 == xxhash.xxh3_128(data[shard.start:shard.end]).hexdigest()


# -- boundaries at each limit --------------------------------------------------------------

def test_requests_limit_cuts_at_the_first_line_over_it(tmp_path):
    data = jsonl(chat_lines(12))
    shards = split_bytes(tmp_path, data, ShardLimits(max_requests=5))
    assert lines_of(shards) == [(1, 5), (6, 10), (11, 12)]
    assert [s.cut_by for s in shards] == [BY_REQUESTS, BY_REQUESTS, None]
    assert_tiles(shards, data)


def test_a_file_of_exactly_the_limit_is_one_shard_and_one_more_line_makes_two(tmp_path):
    assert lines_of(split_bytes(tmp_path, jsonl(chat_lines(5)), ShardLimits(max_requests=5))) == [(1, 5)]
    assert lines_of(split_bytes(tmp_path, jsonl(chat_lines(6)), ShardLimits(max_requests=5))) == [(1, 5), (6, 6)]


def test_bytes_limit_counts_each_line_with_its_newline(tmp_path):
    lines = [json.dumps(line).encode() + b"\n" for line in chat_lines(4)]
    data = b"".join(lines)
    three = sum(map(len, lines[:3]))
    assert lines_of(split_bytes(tmp_path, data, ShardLimits(max_bytes=three))) == [(1, 3), (4, 4)]
    shards = split_bytes(tmp_path, data, ShardLimits(max_bytes=three - 1))
    assert lines_of(shards) == [(1, 2), (3, 4)]
    assert [s.cut_by for s in shards] == [BY_BYTES, None]
    assert_tiles(shards, data)


def test_embedding_inputs_limit_counts_each_item_of_an_input_list(tmp_path):
    per_line = MAX_EMBEDDING_INPUTS // 5
    data = jsonl([embedding_line(f"e{i}", per_line) for i in range(5)] + [embedding_line("last", 1)])
    shards = split_bytes(tmp_path, data, endpoint=EMBEDDINGS)
    assert lines_of(shards) == [(1, 5), (6, 6)]
    assert [(s.embedding_inputs, s.cut_by) for s in shards] == [(MAX_EMBEDDING_INPUTS, BY_INPUTS), (1, None)]
    assert_tiles(shards, data)


def test_embedding_inputs_do_not_limit_other_endpoints(tmp_path):
    data = jsonl([request_line(f"r{i}", input=["x"] * MAX_EMBEDDING_INPUTS) for i in range(2)])
    assert lines_of(split_bytes(tmp_path, data)) == [(1, 2)]


def test_a_file_over_every_api_limit_is_split_instead_of_refused(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [request_line(f"r{i}") for i in range(MAX_REQUESTS + 1)])
    assert not scan_input(path, ENDPOINT).ok  # without a splitter: refused, as before
    report = split_input(path, ENDPOINT)
    assert lines_of(report.shards) == [(1, MAX_REQUESTS), (MAX_REQUESTS + 1, MAX_REQUESTS + 1)]
    assert report.requests == MAX_REQUESTS + 1
    assert describe_split(report.shards) == "50,001 requests: 2 shards of <=50,000"


# -- lines no shard can hold ----------------------------------------------------------------

def test_a_line_over_max_bytes_is_named_and_gets_a_shard_of_its_own(tmp_path):
    path = write_jsonl(tmp_path / "data" / "in.jsonl", chat_lines(1) + chat_lines(1, start=1, pad=300)
                       + chat_lines(1, start=2))
    with pytest.raises(ValidationFailed) as failed:
        split_input(path, ENDPOINT, ShardLimits(max_bytes=200), file="data/in.jsonl")
    size = len(path.read_bytes().splitlines(keepends=True)[1])
    assert str(failed.value) == (
        "1 problem found; nothing was sent or written\n"
        f"data/in.jsonl:2: the line is {size:,} bytes, more than the spec's shard.max_bytes (200); "
        "raise shard.max_bytes (at most 200 MB) or shorten the line")
    report = scan_input(path, ENDPOINT, splitter=Splitter(ShardLimits(max_bytes=200)))
    assert lines_of(report.shards) == [(1, 1), (2, 2), (3, 3)]


def test_a_line_over_200_mb_is_named_without_being_held_in_memory(tmp_path):
    path = tmp_path / "in.jsonl"
    first, last = jsonl(chat_lines(1)), jsonl(chat_lines(1, start=2))
    with path.open("wb") as fh:  # line 2: a hole of NUL bytes, so the test writes almost nothing
        fh.write(first)
        fh.seek(len(first) + MAX_BYTES)
        fh.write(b"\n" + last)
    with pytest.raises(ValidationFailed) as failed:
        split_input(path, ENDPOINT, file="in.jsonl")
    assert str(failed.value) == (
        "1 problem found; nothing was sent or written\n"
        f"in.jsonl:2: the line is {MAX_BYTES + 1:,} bytes; no batch can hold a line over 200 MB "
        "(the Batch API's file limit): shorten it")


def test_a_line_with_more_embedding_inputs_than_a_batch_holds_is_named(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [embedding_line("a", 1), embedding_line("b", MAX_EMBEDDING_INPUTS + 1)])
    with pytest.raises(ValidationFailed) as failed:
        split_input(path, EMBEDDINGS, file="in.jsonl")
    assert str(failed.value).splitlines()[1:] == [
        "in.jsonl:2: body.input: the line holds 50,001 embedding inputs; a batch holds at most 50,000: "
        "split its input list"]


def test_custom_ids_are_unique_per_shard_since_a_shard_is_one_batch(tmp_path):
    lines = chat_lines(3) + chat_lines(1) + chat_lines(1, start=1)  # r0 r1 r2 | r0 r1
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert split_input(path, ENDPOINT, ShardLimits(max_requests=3)).ok
    with pytest.raises(ValidationFailed) as failed:
        split_input(path, ENDPOINT, ShardLimits(max_requests=5), file="in.jsonl")
    assert str(failed.value).splitlines()[1:] == [
        "in.jsonl:4: custom_id: 'r0' is used on line 1 and line 4; each custom_id must be unique in its shard "
        "(each shard is one batch)",
        "in.jsonl:5: custom_id: 'r1' is used on line 2 and line 5; each custom_id must be unique in its shard "
        "(each shard is one batch)"]


@pytest.mark.parametrize("block, field", [
    ({"max_requests": 0}, "max_requests"),
    ({"max_requests": MAX_REQUESTS + 1}, "max_requests"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_bytes": MAX_BYTES + 1}, "max_bytes"),
    ({"max_request": 10}, "max_request"),
])
def test_shard_limits_refuse_zero_values_over_the_api_limit_and_unknown_keys(block, field):
    with pytest.raises(ValidationError) as failed:
        ShardLimits.model_validate(block)
    assert [e["loc"] for e in failed.value.errors()] == [(field,)]


# -- stable, deterministic boundaries -------------------------------------------------------

request_lines = st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=40).map(
    lambda pads: jsonl([request_line(f"r{i}", content_pad="x" * pad) for i, pad in enumerate(pads)]))
limits = st.builds(ShardLimits, max_requests=st.integers(1, 8), max_bytes=st.integers(300, 1200))


def _split(data: bytes, limits: ShardLimits, chunk_size: int = 1 << 20) -> list[Shard]:
    with tempfile.TemporaryDirectory() as tmp:
        return split_bytes(Path(tmp), data, limits, chunk_size=chunk_size)


@settings(max_examples=60, deadline=None)
@given(data=request_lines, limits=limits, chunk_size=st.sampled_from([7, 64, 1 << 20]))
def test_shards_tile_the_file_greedily_within_the_limits_whatever_the_read_size(data, limits, chunk_size):
    shards = _split(data, limits, chunk_size)
    assert shards == _split(data, limits)  # the same file always gives the same shards
    assert_tiles(shards, data)
    sizes = [len(line) for line in data.splitlines(keepends=True)]
    for shard in shards:
        assert shard.requests <= limits.max_requests and shard.size <= limits.max_bytes
        if shard.cut_by:  # greedy: the next line would not have fitted
            assert (shard.requests == limits.max_requests
                    or shard.size + sizes[shard.last_line] > limits.max_bytes)


@settings(max_examples=60, deadline=None)
@given(data=request_lines, extra=st.integers(1, 20), limits=limits)
def test_appending_lines_changes_only_the_last_shard_and_adds_new_ones(data, extra, limits):
    before = _split(data, limits)
    count = data.count(b"\n")
    after = _split(data + jsonl(chat_lines(extra, start=count)), limits)
    assert after[:len(before) - 1] == before[:-1]
    last = after[len(before) - 1]
    assert (last.start, last.first_line) == (before[-1].start, before[-1].first_line)
    assert last.end >= before[-1].end


def test_a_large_file_that_is_one_shard_is_hashed_once_by_the_shard_hasher(tmp_path):
    data = jsonl(chat_lines(6_000, pad=1500))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    report = split_input(path, ENDPOINT)
    assert [s.sha256 for s in report.shards] == [report.sha256] == [hashlib.sha256(data).hexdigest()]
    assert [s.xxh3 for s in report.shards] == [xxhash.xxh3_128(data).hexdigest()]


def test_a_file_that_is_one_shard_has_the_files_own_hash(tmp_path):
    data = jsonl(chat_lines(3))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    report = split_input(path, ENDPOINT)
    assert [s.sha256 for s in report.shards] == [report.sha256] == [hashlib.sha256(data).hexdigest()]


def test_shards_of_a_large_file_are_hashed_while_it_is_scanned(tmp_path):
    """Over 8 MiB: one thread follows the scan and hashes each shard; the file is not hashed twice, so
    its identity is the hash of its shards' hashes."""
    data = jsonl(chat_lines(12_000, pad=1500))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    report = split_input(path, ENDPOINT, ShardLimits(max_bytes=3 * 2**20))
    assert report.sha256 == split_identity(report.shards) == hashlib.sha256(
        "".join(hashlib.sha256(data[s.start:s.end]).hexdigest() for s in report.shards).encode()).hexdigest()
    assert len(report.shards) == 7
    assert_tiles(report.shards, data)
    assert describe_split(report.shards, ShardLimits(max_bytes=3 * 2**20)) == "19.2 MB: 7 shards of <=3 MB"


# -- describing a split ------------------------------------------------------------------

def _shards(*cuts: tuple[int, int, str | None]) -> list[Shard]:
    """Shards of (requests, bytes, cut_by), end to end."""
    made, start, line = [], 0, 1
    for index, (requests, size, cut_by) in enumerate(cuts):
        made.append(Shard(index, start, start + size, line, line + requests - 1, requests, 0, "", cut_by))
        start, line = start + size, line + requests
    return made


def test_describe_split_says_how_many_shards_and_which_limit_made_them():
    assert describe_split(_shards((50_000, 10, BY_REQUESTS), (50_000, 10, BY_REQUESTS), (1, 1, None))) == \
        "100,001 requests: 3 shards of <=50,000"
    assert describe_split(_shards((9, 200 * 2**20, BY_BYTES), (3, 2**19, None))) == "200.5 MB: 2 shards of <=200 MB"
    assert describe_split(_shards((50_000, 10, BY_REQUESTS), (7, 200 * 2**20, BY_BYTES), (1, 1, None))) == \
        "50,008 requests, 200 MB: 3 shards of <=50,000 requests or <=200 MB"
    assert describe_split(_shards((5, 10, None))) == "5 requests: 1 shard"
    assert describe_split(_shards((1, 10, None))) == "1 request: 1 shard"


# -- reading a shard's bytes, and uploading them --------------------------------------------

def test_a_range_reads_and_sizes_as_a_file_of_its_own(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with open_range(path, 3, 8) as fh:
        assert (fh.seek(0, os.SEEK_END), fh.tell()) == (5, 5)
        assert fh.seek(0) == 0 and fh.read() == b"34567"
        assert fh.read(3) == b"" and fh.seek(-2, os.SEEK_END) == 3 and fh.read(10) == b"67"
        with pytest.raises(io.UnsupportedOperation):
            fh.fileno()  # or httpx would size it with os.fstat: the whole file


def _upload(url: str, reader) -> dict:
    sent: list[httpx.Headers] = []
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer sk-test"},
                      event_hooks={"request": [lambda request: sent.append(request.headers)]}) as client:
        answer = client.post("files", files={"file": ("shard.jsonl", reader, "application/jsonl")},
                             data={"purpose": "batch"})
        answer.raise_for_status()
        file = answer.json()
        file["content"] = client.get(f"files/{file['id']}/content").content
    assert "Transfer-Encoding" not in sent[0] and int(sent[0]["Content-Length"]) > reader.size
    return file


def test_a_shard_uploads_exactly_its_byte_range_to_the_sandbox(tmp_path, emulator_server):
    data = jsonl(chat_lines(30, pad=2000))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    shard = split_input(path, ENDPOINT, ShardLimits(max_requests=12)).shards[1]
    with open_shard(path, shard) as reader:
        file = _upload(emulator_server.url, reader)
    assert file["bytes"] == shard.size and file["content"] == data[shard.start:shard.end]


def test_a_shard_whose_bytes_changed_since_the_scan_is_never_uploaded(tmp_path, emulator_server):
    data = jsonl(chat_lines(30, pad=2000))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    shard = split_input(path, ENDPOINT, ShardLimits(max_requests=12)).shards[1]
    path.write_bytes(data[:shard.end - 10] + b"Y" + data[shard.end - 9:])  # same size, one byte changed
    with open_shard(path, shard) as reader, pytest.raises(StalePlanError, match="changed since they were scanned"):
        _upload(emulator_server.url, reader)
    assert emulator_server.emulator.list_files()["data"] == []


def test_a_shard_cut_short_since_the_scan_is_refused(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(chat_lines(6)))
    shard = split_input(path, ENDPOINT, ShardLimits(max_requests=4)).shards[1]
    path.write_bytes(path.read_bytes()[:shard.end - 5])
    with open_shard(path, shard) as reader, pytest.raises(StalePlanError, match="before the end of its shard"):
        reader.read()


def test_a_shard_read_again_from_the_start_is_verified_again(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(chat_lines(6)))
    shard = split_input(path, ENDPOINT, ShardLimits(max_requests=4)).shards[1]
    with open_shard(path, shard) as reader:
        first = reader.read(7) + reader.read()
        reader.seek(0)
        assert reader.read() == first == path.read_bytes()[shard.start:]


# -- the verifying hash on a second thread (shards._PieceHasher) -----------------------------

PIECE = 1 << 20  # api.UPLOAD_PIECE: pieces this large are hashed by a second thread


def random_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    path = tmp_path / "in.bin"
    path.write_bytes(random.Random(size).randbytes(size))
    return path, path.read_bytes()


def hashers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "upload-sha256"]


def read_in(reader, piece: int) -> list[bytes]:
    return list(iter(lambda: reader.read(piece), b""))


def test_a_change_in_an_early_piece_is_caught_by_the_read_of_the_last_one(tmp_path):
    path, data = random_file(tmp_path, 3 * PIECE + 1000)
    start, end = 100, len(data) - 100
    sha = hashlib.sha256(data[start:end]).hexdigest()
    path.write_bytes(data[:200] + b"Y" + data[201:])  # same size, one byte of the first piece changed
    threads = threading.active_count()
    with open_verified(path, start, end, sha) as reader:
        assert len(reader.read(PIECE)) == PIECE and hashers() == ["upload-sha256"]
        reader.read(PIECE), reader.read(PIECE)
        with pytest.raises(StalePlanError, match=r"bytes 100\.\.3,146,628 changed since they were scanned"):
            reader.read(PIECE)  # the last bytes are never handed out
        assert threading.active_count() == threads  # no thread outlives the failed read
        assert reader.tell() == 3 * PIECE


@pytest.mark.parametrize("piece, size", [(1, 3000), (7, 20_000), (PIECE, 3 * PIECE + 5), (None, 3 * PIECE),
                                         ("range", 3 * PIECE), ("range+1", 3 * PIECE), (256 * 1024 - 1, PIECE)])
def test_a_range_read_in_any_piece_size_is_handed_out_whole_and_checked_at_its_end(tmp_path, piece, size):
    path, data = random_file(tmp_path, size + 20)
    start, end = 10, size + 10
    piece = {"range": size, "range+1": size + 1}.get(piece, piece)
    sha = hashlib.sha256(data[start:end]).hexdigest()
    threads = threading.active_count()
    with open_verified(path, start, end, sha) as reader:
        pieces = [reader.read()] if piece is None else read_in(reader, piece)
        assert b"".join(pieces) == data[start:end] and reader.read(1) == b""
        assert threading.active_count() == threads  # the hash is finished when the range is
    path.write_bytes(data[:end - 1] + b"Y" + data[end:])  # the last byte of the range changed
    with open_verified(path, start, end, sha) as reader, pytest.raises(StalePlanError, match="changed since"):
        read_in(reader, piece or size)
    assert threading.active_count() == threads


def test_small_and_large_pieces_mixed_are_hashed_in_order(tmp_path):
    path, data = random_file(tmp_path, 2 * PIECE)
    sha = hashlib.sha256(data).hexdigest()
    with open_verified(path, 0, len(data), sha) as reader:
        sizes = [7, 1000, PIECE, 3, 400_000, 11, 1]  # inline, then the thread, which then takes them all
        got = [reader.read(n) for n in sizes] + [reader.read()]
    assert b"".join(got) == data


def test_seek_to_the_start_mid_way_restarts_the_hash_and_ends_the_old_thread(tmp_path):
    path, data = random_file(tmp_path, 3 * PIECE)
    sha = hashlib.sha256(data).hexdigest()
    threads = threading.active_count()
    with open_verified(path, 0, len(data), sha) as reader:
        reader.read(PIECE), reader.read(PIECE // 2)
        assert hashers() == ["upload-sha256"]
        assert reader.seek(0) == 0 and threading.active_count() == threads
        assert b"".join(read_in(reader, PIECE)) == data  # a fresh hash: no error at the end
        path.write_bytes(b"Y" + data[1:])
        reader.seek(0)
        reader.read(PIECE)
        with pytest.raises(StalePlanError, match="changed since they were scanned"):
            read_in(reader, PIECE)
    assert threading.active_count() == threads


def test_no_hashing_thread_is_left_after_a_close_mid_way_or_a_file_cut_short(tmp_path):
    path, data = random_file(tmp_path, 3 * PIECE)
    sha = hashlib.sha256(data).hexdigest()
    threads = threading.active_count()
    reader = open_verified(path, 0, len(data), sha)
    reader.read(PIECE)
    assert threading.active_count() == threads + 1
    reader.close()
    assert threading.active_count() == threads
    with open_verified(path, 0, len(data), sha) as reader:
        reader.read(PIECE)
        path.write_bytes(data[:2 * PIECE])
        reader.read(PIECE)
        with pytest.raises(StalePlanError, match="before the end of its shard"):
            reader.read(PIECE)
        assert threading.active_count() == threads


def test_lines_of_a_large_range_read_through_a_buffer_are_verified(tmp_path):
    data = jsonl(chat_lines(600, pad=10_000))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    start, end = data.index(b"\n") + 1, len(data)
    sha = hashlib.sha256(data[start:end]).hexdigest()
    with open_lines(path, (start, end), sha) as fh:
        assert b"".join(fh) == data[start:end]
    path.write_bytes(data[:start + 5] + b"Y" + data[start + 6:])
    with open_lines(path, (start, end), sha) as fh, pytest.raises(StalePlanError, match="changed since"):
        list(fh)


# -- a shard's xxh3_128: the upload's check of the bytes the scan hashed ---------------------------

def big_shard(tmp_path: Path) -> tuple[Path, bytes, Shard]:
    """A file of 3 shards; its middle one (over 3 MiB, so sha256 would run on a second thread)."""
    data = jsonl(chat_lines(30, pad=300_000))
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    shard = split_input(path, ENDPOINT, ShardLimits(max_requests=12)).shards[1]
    assert shard.size > 3 * PIECE and shard.xxh3 == xxhash.xxh3_128(data[shard.start:shard.end]).hexdigest()
    return path, data, shard


def test_a_shard_is_checked_by_its_xxh3_inline_and_a_change_is_refused_before_its_last_bytes(tmp_path):
    path, data, shard = big_shard(tmp_path)
    with open_shard(path, shard) as reader:
        assert b"".join(read_in(reader, PIECE)) == data[shard.start:shard.end]
        assert hashers() == []  # no sha256, no thread
    path.write_bytes(data[:shard.start + 5] + b"Y" + data[shard.start + 6:])  # same size, its first piece
    threads = threading.active_count()
    with open_shard(path, shard) as reader:
        handed_out = [reader.read(PIECE) for _ in range(shard.size // PIECE)]
        assert hashers() == [] and reader.tell() == sum(map(len, handed_out)) < shard.size
        expected = rf"changed since they were scanned \(xxh3_128 [0-9a-f]{{12}}, expected {shard.xxh3[:12]}\)"
        with pytest.raises(StalePlanError, match=expected):
            reader.read(PIECE)  # the last bytes are never handed out
        assert reader.tell() == sum(map(len, handed_out)) and threading.active_count() == threads


def test_a_shard_without_xxh3_as_saved_before_it_is_checked_by_its_sha256(tmp_path):
    path, data, shard = big_shard(tmp_path)
    older = Shard(**{k: v for k, v in dataclasses.asdict(shard).items() if k != "xxh3"})  # a plan file's, before
    assert older.xxh3 == ""
    with open_shard(path, older) as reader:
        assert b"".join(read_in(reader, PIECE)) == data[shard.start:shard.end]
    path.write_bytes(data[:shard.end - 2] + b"Y" + data[shard.end - 1:])
    with open_shard(path, older) as reader:
        reader.read(PIECE)
        assert hashers() == ["upload-sha256"]
        with pytest.raises(StalePlanError, match=rf"\(sha256 [0-9a-f]{{12}}, expected {shard.sha256[:12]}\)"):
            read_in(reader, PIECE)


def settled_input(tmp_path: Path) -> Path:
    """A split input last modified long ago: HashCache keeps its entry (see HashCache.RACY_SECONDS)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(chat_lines(10)))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


def test_a_cache_entry_keeps_each_shards_xxh3(tmp_path):
    path, cache_file = settled_input(tmp_path), tmp_path / "cache.json"
    cache = HashCache(cache_file)
    scanned = cache.scan(path, ENDPOINT, (4, MAX_BYTES))
    cache.save()
    saved = json.loads(cache_file.read_text())
    assert saved["version"] == HashCache.VERSION
    assert [s["xxh3"] for s in saved["entries"][str(path)]["shards"]] == [s.xxh3 for s in scanned.shards]
    assert_tiles(scanned.shards, path.read_bytes())
    again = HashCache(cache_file)
    assert str(path) in again.entries and again.scan(path, ENDPOINT, (4, MAX_BYTES)).shards == scanned.shards
    assert not again.dirty  # found in the cache, not scanned again


def test_a_cache_of_the_previous_version_whose_shards_have_no_xxh3_is_scanned_again(tmp_path):
    path, cache_file = settled_input(tmp_path), tmp_path / "cache.json"
    cache = HashCache(cache_file)
    scanned = cache.scan(path, ENDPOINT, (4, MAX_BYTES))
    entry = cache.entries[str(path)]
    older = {**entry, "shards": [{k: v for k, v in s.items() if k != "xxh3"} for s in entry["shards"]]}
    cache_file.write_text(json.dumps({"version": 3, "entries": {str(path): older}}))
    again = HashCache(cache_file)
    assert again.entries == {}  # another version: rebuilt without a word
    assert again.scan(path, ENDPOINT, (4, MAX_BYTES)).shards == scanned.shards and again.dirty


# -- merging results -----------------------------------------------------------------------

def result(custom_id: str) -> bytes:
    return b'{"custom_id":"%s","response":{"status_code":200}}\n' % custom_id.encode()


def test_merge_in_input_order_restores_each_shards_input_order(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(chat_lines(7)))
    shards = split_input(path, ENDPOINT, ShardLimits(max_requests=3)).shards
    first, second = tmp_path / "out-0.jsonl", tmp_path / "out-1.jsonl"
    first.write_bytes(result("r2") + result("r0") + result("r1"))
    # r4 failed (it is in the error file); a result for an id the shard never asked for is kept, after
    second.write_bytes(result("r5") + result("stray") + result("r3").rstrip(b"\n"))
    dest = tmp_path / "results" / "output.jsonl"
    assert merge_in_input_order(path, shards, [first, second, None], dest) == 6
    assert dest.read_bytes() == b"".join(map(result, ["r0", "r1", "r2", "r3", "r5", "stray"]))
    assert sorted(p.name for p in dest.parent.iterdir()) == ["output.jsonl"]


def test_merge_in_input_order_of_many_shuffled_shards(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(chat_lines(500)))
    shards = split_input(path, ENDPOINT, ShardLimits(max_requests=23)).shards
    files = []
    for shard in shards:
        ids = [f"r{line - 1}" for line in range(shard.first_line, shard.last_line + 1)]
        random.Random(shard.index).shuffle(ids)
        files.append(tmp_path / f"out-{shard.index}.jsonl")
        files[-1].write_bytes(b"".join(map(result, ids)))
    merge_in_input_order(path, shards, files, tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_bytes() == b"".join(result(f"r{i}") for i in range(500))


def test_merge_jsonl_concatenates_in_shard_order_and_never_joins_two_lines(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for part, text in zip(parts, [b"1\n2\n", b"3", b""]):
        part.write_bytes(text)
    assert merge_jsonl(parts, tmp_path / "out.jsonl") == 6
    assert (tmp_path / "out.jsonl").read_bytes() == b"1\n2\n3\n"


def test_a_merge_that_fails_leaves_nothing_behind(tmp_path):
    (tmp_path / "a").write_bytes(b"1\n")
    with pytest.raises(FileNotFoundError):
        merge_jsonl([tmp_path / "a", tmp_path / "missing"], tmp_path / "out" / "merged.jsonl")
    assert list((tmp_path / "out").iterdir()) == []


def test_merge_finds_custom_ids_wherever_the_line_puts_them(tmp_path):
    ids = ['a"quoted', "é", "plain"]
    lines = [{"body": {"custom_id": "nested", "model": "m", "messages": []}, "method": "POST", "url": ENDPOINT,
              "custom_id": custom_id} for custom_id in ids]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    shards = split_input(path, ENDPOINT).shards
    results = tmp_path / "out.jsonl"
    answers = {c: json.dumps({"id": f"batch_req_{i}", "custom_id": c, "response": None}).encode() + b"\n"
               for i, c in enumerate(ids)}
    results.write_bytes(answers["plain"] + answers["é"] + answers['a"quoted'])
    merge_in_input_order(path, shards, [results], tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_bytes() == b"".join(answers[c] for c in ids)
