"""Blocks of request lines: an input file read as runs of whole lines, each run decoded at once.

inputs.scan_input checks a file a block at a time (its fast path). `read_blocks` cuts the file
into the runs of lines that end in one read (`bytes.split` makes the lines: no Python step per
line), and `decode` turns every line of a run into the shape the checks ask for with msgspec,
keeping only what the checks across lines need: the custom_ids, the models, the embedding
inputs. Each block keeps its lines, for the line-by-line checks of a block the fast path cannot take.

Every decision across lines (duplicates, shard cuts, models, limits) is the caller's. Decoding
parts of a large file in worker processes was measured (bench/README.md) and dropped: on two
cores the scan's hasher and the workers share them, and the hasher can only hash a part once
the caller has folded it, so the scan took as long as in one process.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Annotated, BinaryIO, Literal, Union

import msgspec


@dataclass
class Block:
    """Lines of a file that hold its bytes [start, stop); the last one starts at `last_start`.

    `clean`: every line ends with a newline and is UTF-8 (msgspec checks the syntax of the
    fields it skips, not their UTF-8). After `decode`, `ids` holds each line's custom_id when
    every line decoded.
    """

    start: int
    stop: int
    last_start: int
    clean: bool
    lines: list[bytes | bytearray]
    ids: list[str] | None = None
    models: set[str] = field(default_factory=set)
    inputs: int = 0  # embedding inputs, when decoded for /v1/embeddings

    @property
    def count(self) -> int:
        return len(self.lines)

    def spans(self) -> Iterator[tuple[bytes | bytearray, int, int]]:
        """Each line as (its bytes without the newline, start, stop): it holds bytes [start, stop) of
        the file, its newline included."""
        start, last = self.start, len(self.lines) - 1
        for i, raw in enumerate(self.lines):
            stop = self.stop if i == last else start + len(raw) + 1
            yield raw, start, stop
            start = stop


def read_blocks(fh: BinaryIO, chunk_size: int, digest: hashlib._Hash | None = None,
                max_line: int = 2**62) -> Iterator[Block]:
    """The lines of a binary file in runs, the runs that end in one read; each chunk read is hashed
    into `digest`.

    A line that spans reads is assembled. A line over `max_line` bytes cannot be sent and is
    never parsed, so none of it is kept: it comes alone, as b"", unclean, as does a last line with
    no newline.
    """
    pending, pending_start, pending_size, offset = bytearray(), 0, 0, 0
    utf8, clean_after = codecs.getincrementaldecoder("utf-8")(), 0
    while chunk := fh.read(chunk_size):
        if digest is not None:
            digest.update(chunk)
        try:
            utf8.decode(chunk)
        except UnicodeDecodeError:  # this run and the next (its first line began here) go line by line
            utf8, clean_after = codecs.getincrementaldecoder("utf-8")(), offset + len(chunk)
        lines = chunk.split(b"\n")
        tail = lines.pop()
        chunk_start, offset = offset, offset + len(chunk)
        if lines:
            head_stop = chunk_start + len(lines[0]) + 1
            pending_size += len(lines[0]) + 1
            if pending_size > max_line:
                yield Block(pending_start, head_stop, pending_start, False, [b""])
                del lines[0]
                pending_start = head_stop
            elif pending:
                pending += lines[0]
                lines[0] = pending  # a bytearray: a line of 150 MB is not copied once more
            if lines:
                stop = offset - len(tail)
                yield Block(pending_start, stop, stop - len(lines[-1]) - 1, pending_start >= clean_after, lines)
            pending, pending_start, pending_size = bytearray(), offset - len(tail), 0
        pending_size += len(tail)
        if pending_size <= max_line:
            pending += tail
    if pending_size:
        kept = bytes(pending) if pending_size <= max_line else b""
        yield Block(pending_start, offset, pending_start, False, [kept])


def read_lines(fh: BinaryIO, chunk_size: int) -> Iterator[tuple[bytes | bytearray, int, int]]:
    """Every line of a binary file as (its bytes without the newline, start, stop), read as
    `read_blocks` reads it (shards.py merges results with it)."""
    for block in read_blocks(fh, chunk_size):
        yield from block.spans()


_CUSTOM_ID, _MODEL, _INPUT = attrgetter("custom_id"), attrgetter("body.model"), attrgetter("body.input")


@functools.lru_cache(maxsize=32)
def decoder(endpoint: str | None, embeddings: bool) -> msgspec.json.Decoder:
    """msgspec's decoder of a good request line: the four fields, POST to `endpoint`, a non-empty
    custom_id, a body object whose model is a string or absent (and for embeddings, whose input is
    a string, a list or absent). Other fields are skipped: their syntax is checked, not their UTF-8.
    With no endpoint, of any line with the four fields and a body object (`inputs._Scanner.decoded`)."""
    if endpoint is None:
        custom_id = method = url = model = object
    else:
        custom_id, method, url = Annotated[str, msgspec.Meta(min_length=1)], Literal["POST"], Literal[endpoint]
        model = Union[str, None]
    body_fields: list[tuple] = [("model", model, None)]
    if embeddings:
        body_fields.append(("input", Union[str, list[msgspec.Raw], None], None))
    body = msgspec.defstruct("Body", body_fields)
    request = msgspec.defstruct("Request", [("custom_id", custom_id), ("method", method), ("url", url),
                                            ("body", body)])
    return msgspec.json.Decoder(request)


def decode(block: Block, endpoint: str, embeddings: bool) -> None:
    """Fill `block.ids`, `models` and `inputs` when it is clean and every line decodes."""
    if not block.clean:
        return
    try:
        requests = list(map(decoder(endpoint, embeddings).decode, block.lines))
    except msgspec.DecodeError:  # a ValidationError too
        return
    block.models = set(map(_MODEL, requests))
    block.models.discard(None)
    if embeddings:
        block.inputs = sum(len(x) if type(x) is list else 1 for x in map(_INPUT, requests))
    block.ids = list(map(_CUSTOM_ID, requests))


def blocks_of(path: Path, endpoint: str, *, chunk_size: int, digest: hashlib._Hash | None, max_line: int,
              advance: Callable[[int], None]) -> Iterator[Block]:
    """The decoded blocks of a file in file order, `advance`d as each is handed out."""
    embeddings = endpoint == "/v1/embeddings"
    with path.open("rb", buffering=0) as fh:
        for block in read_blocks(fh, chunk_size, digest, max_line):
            decode(block, endpoint, embeddings)
            advance(block.stop - block.start)
            yield block
