"""Blocks of request lines: an input file read as runs of whole lines, each run decoded at once.

inputs.scan_input checks a file a block at a time (its fast path). `read_blocks` cuts the file
into the runs of lines that end in one read (`bytes.split` makes the lines: no Python step per
line), and `decode` turns every line of a run into the shape the checks ask for with msgspec,
keeping only what the checks across lines need: the custom_ids, the models, the embedding
inputs. A block whose lines do not all decode keeps its lines for the line-by-line checks.

A large file is decoded by several processes at once (`blocks_of`): its first part in this
process, each other part in a worker process that sends its blocks back. The caller takes the
blocks in file order and makes every decision across lines itself (duplicates, shard cuts,
models, limits): the workers only decode.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Annotated, BinaryIO, Literal, Union

import msgspec

PARALLEL_FROM = 64 * 2**20  # a smaller file is decoded in this process alone: a worker's start-up costs ~0.2 s
MAX_WORKERS = 3


@dataclass
class Block:
    """Lines of a file that hold its bytes [start, stop); the last one starts at `last_start`.

    `clean`: every line ends with a newline and is UTF-8 (msgspec checks the syntax of the
    fields it skips, not their UTF-8). After `decode`, `ids` holds each line's custom_id when
    every line decoded (then a worker drops `lines`: `lines_of` reads them again if needed).
    """

    start: int
    stop: int
    last_start: int
    clean: bool
    lines: list[bytes] | None
    count: int = 0
    ids: list[str] | None = None
    models: set[str] = field(default_factory=set)
    inputs: int = 0  # embedding inputs, when decoded for /v1/embeddings


def read_blocks(fh: BinaryIO, chunk_size: int, digest: hashlib._Hash | None = None,
                max_line: int = 2**62, start: int = 0, end: int | None = None) -> Iterator[Block]:
    """The lines of bytes [start, end) of a binary file (`start` at a line's start) in runs, the runs
    that end in one read; each chunk read is hashed into `digest`.

    A line that spans reads is assembled. A line over `max_line` bytes cannot be sent and is
    never parsed, so none of it is kept: it comes alone, as b"", unclean, as does a last line with
    no newline.
    """
    fh.seek(start)
    pending, pending_start, pending_size, offset = bytearray(), start, 0, start
    utf8, clean_after = codecs.getincrementaldecoder("utf-8")(), 0
    while chunk := fh.read(chunk_size if end is None else min(chunk_size, end - offset)):
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
                yield Block(pending_start, head_stop, pending_start, False, [b""], 1)
                del lines[0]
                pending_start = head_stop
            else:
                lines[0] = bytes(pending + lines[0]) if pending else lines[0]
            if lines:
                stop = offset - len(tail)
                yield Block(pending_start, stop, stop - len(lines[-1]) - 1, pending_start >= clean_after,
                            lines, len(lines))
            pending, pending_start, pending_size = bytearray(), offset - len(tail), 0
        pending_size += len(tail)
        if pending_size <= max_line:
            pending += tail
    if pending_size:
        kept = bytes(pending) if pending_size <= max_line else b""
        yield Block(pending_start, offset, pending_start, False, [kept], 1)


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


def lines_of(path: Path, block: Block) -> list[bytes]:
    """A block's lines: kept, or read again (a worker drops the lines of a block that decoded)."""
    if block.lines is not None:
        return block.lines
    with path.open("rb") as fh:
        fh.seek(block.start)
        data = fh.read(block.stop - block.start)
    return data.split(b"\n")[:-1]


def blocks_of(path: Path, endpoint: str, *, chunk_size: int, digest: hashlib._Hash | None, max_line: int,
              advance: Callable[[int], None], parallel: bool) -> Iterator[Block]:
    """The decoded blocks of a file in file order, `advance`d as each is handed out; with `parallel`
    and a large file (hashed by the caller, not into `digest`), decoded by worker processes too
    (see the module doc)."""
    embeddings = endpoint == "/v1/embeddings"
    size = path.stat().st_size
    wanted = parallel and digest is None and size >= PARALLEL_FROM
    workers = min(os.cpu_count() or 1, MAX_WORKERS + 1) - 1 if wanted else 0
    ranges = _ranges(path, size, workers + 1)
    with _Workers(path, ranges[1:], endpoint, embeddings, chunk_size, max_line) as others:
        with path.open("rb", buffering=0) as fh:
            for block in read_blocks(fh, chunk_size, digest, max_line, *ranges[0]):
                decode(block, endpoint, embeddings)
                advance(block.stop - block.start)
                yield block
        for blocks in others.results():
            for block in blocks:
                advance(block.stop - block.start)
                yield block


def _ranges(path: Path, size: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive byte ranges of about equal size, each starting at a line's start. The first
    is a little larger: the workers that take the others start later."""
    if parts == 1:
        return [(0, size)]
    cuts = [0]
    with path.open("rb") as fh:
        for i in range(1, parts):
            at = max(cuts[-1], size * (10 * i + 2) // (10 * parts + 2))
            fh.seek(at)
            while (piece := fh.read(1 << 16)) and b"\n" not in piece:
                at += len(piece)
            cuts.append(min(size, at + piece.find(b"\n") + 1) if piece else size)
    cuts.append(size)
    return list(zip(cuts, cuts[1:]))


class _Workers:
    """One worker process per range, each decoding its range's blocks and sending them back at once
    when done (`python -m reconciler.lineblocks`, `_main`: a plain process, not multiprocessing's,
    which would import the caller's main script again). Each runs in a session of its own, so
    the terminal's Ctrl-C reaches the command alone, which ends them when it stops."""

    def __init__(self, path: Path, ranges: list[tuple[int, int]], endpoint: str, embeddings: bool,
                 chunk_size: int, max_line: int):
        self.started: list[subprocess.Popen] = []
        for start, end in ranges:
            args = [str(path), str(start), str(end), endpoint, str(int(embeddings)), str(chunk_size), str(max_line)]
            self.started.append(subprocess.Popen([sys.executable, "-m", __name__, *args], stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                 start_new_session=True))

    def results(self) -> Iterator[list[Block]]:
        for process in self.started:
            try:
                kind, value = pickle.load(process.stdout)
            except (EOFError, pickle.UnpicklingError):
                raise OSError(f"a process decoding the file ended without an answer (exit code {process.wait()})") \
                    from None
            if kind == "error":
                raise OSError(value)
            yield value

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.wait()


def _main(path: str, start: str, end: str, endpoint: str, embeddings: str, chunk_size: str, max_line: str) -> None:
    """A worker's work (see _Workers): the decoded blocks of bytes [start, end) of `path`, lines dropped
    where they decoded, written to stdout as one pickle; or why it could not read them."""
    try:
        blocks = []
        with open(path, "rb", buffering=0) as fh:
            for block in read_blocks(fh, int(chunk_size), None, int(max_line), int(start), int(end)):
                decode(block, endpoint, embeddings == "1")
                if block.ids is not None:
                    block.lines = None
                blocks.append(block)
        answer: tuple = ("blocks", blocks)
    except OSError as exc:
        answer = ("error", str(exc))
    pickle.dump(answer, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    from reconciler.lineblocks import _main as work  # pickles reconciler.lineblocks.Block, not __main__.Block

    work(*sys.argv[1:])
