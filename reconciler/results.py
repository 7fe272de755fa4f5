"""Result files: what became of each request, over any number of batches, read as streams.

A batch's answers come in two JSONL files, its output file and its error file, one line
per request in the API's shape: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`. A request the batch never reached before it expired has
`response: null` and `error: {"code": "batch_expired", ...}`. Lines come in any order.

    classify_results   which custom_ids succeeded (a 2xx line in any file), and for the rest
                       the class of their latest error, each line kept as a reference
                       (file, byte range), never in memory
    request_lines      the custom_id and byte range of each line of an input file
    merge_attempts     one output file (first success per request) and one error file (latest
                       error of each request still without a result), both in input order
    merge_parts        the same for a spec split into shards: shard by shard, each shard's
                       attempts read on their own (InputPart)
    ResultsCache       downloaded result files by file id, each with its sha256 next to it,
                       so that none is downloaded twice

The result files given to one call may be a spec's shards and attempts in any mix: input
order always comes from the input file, and "latest" means later in the list given. Memory
is one small entry per request (custom_id -> reference) of the files read at once (one
shard's, in merge_parts); no file is held whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import orjson

from .errors import StalePlanError, StateError
from .fsutil import atomic_writer
from .inputs import hash_file

if TYPE_CHECKING:  # the client (httpx) is loaded only by commands that talk to the server
    from .api import Api


class ErrorClass(StrEnum):
    """Why a request has no result: what a retry policy's `on` chooses from (and two it cannot)."""

    EXPIRED = "expired"            # the batch's 24 h window closed before the request ran
    SERVER_ERROR = "server_error"  # 5xx
    RATE_LIMITED = "rate_limited"  # 429
    CLIENT_ERROR = "client_error"  # any other 4xx: the request itself is wrong, it would fail again
    OTHER = "other"                # an error line with neither a status nor batch_expired


class LineRef(NamedTuple):
    """One line of a result file: `Outcome.files[file]`, bytes [start, stop) (newline included)."""

    file: int
    start: int
    stop: int


class Failure(NamedTuple):
    kind: ErrorClass
    line: LineRef


class AttemptFiles(NamedTuple):
    """One batch's result files (either may be None: a batch with no successes has no output file)."""

    output: Path | None
    errors: Path | None


@dataclass
class Outcome:
    """What the result files say about each request.

    `succeeded`: custom_id -> its first 2xx line. `failed`: custom_id -> its latest error,
    only for custom_ids with no 2xx line anywhere. `unreadable`: lines that are not a JSON
    object with a string custom_id (counted, not guessed at).
    """

    files: tuple[Path, ...] = ()
    succeeded: dict[str, LineRef] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)
    unreadable: int = 0

    def add(self, custom_id: str, kind: ErrorClass | None, ref: LineRef) -> None:
        if custom_id in self.succeeded:
            return  # the first success stands; nothing later changes it
        if kind is None:
            self.succeeded[custom_id] = ref
            self.failed.pop(custom_id, None)
        else:
            self.failed[custom_id] = Failure(kind, ref)


def error_class(line: dict) -> ErrorClass | None:
    """None when the line is a success (a 2xx response and no error), else why it failed."""
    response, error = line.get("response"), line.get("error")
    status = response.get("status_code") if type(response) is dict else None
    if type(status) is not int:
        status = None
    if status is not None and 200 <= status < 300 and not error:
        return None
    if type(error) is dict and error.get("code") == "batch_expired":
        return ErrorClass.EXPIRED
    if status == 429:
        return ErrorClass.RATE_LIMITED
    if status is not None and 500 <= status < 600:
        return ErrorClass.SERVER_ERROR
    if status is not None and 400 <= status < 500:
        return ErrorClass.CLIENT_ERROR
    return ErrorClass.OTHER


def classify_results(attempts: Sequence[AttemptFiles | tuple[Path | None, Path | None]]) -> Outcome:
    """Read every result file of `attempts` (oldest first), streaming, into one Outcome.

    A line is judged by what it says, not by which file holds it (the API has put failed
    requests in output files). OSError is left to the caller, who knows the batch.
    """
    files = tuple(path for pair in attempts for path in pair if path is not None)
    outcome = Outcome(files=files)
    for index, path in enumerate(files):
        with path.open("rb") as fh:
            for start, stop, raw in _numbered_lines(fh):
                _classify_line(outcome, raw, LineRef(index, start, stop))
    return outcome


def _classify_line(outcome: Outcome, raw: bytes, ref: LineRef) -> None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        line = None
    custom_id = line.get("custom_id") if type(line) is dict else None
    if type(custom_id) is not str:
        outcome.unreadable += raw.strip() != b""  # a blank line is nothing to count
        return
    outcome.add(custom_id, error_class(line), ref)


def _numbered_lines(fh: BinaryIO, offset: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(start, stop, line) for each line of a binary file from `offset` (where `fh` is), the newline
    (if any) included."""
    for raw in fh:
        yield offset, offset + len(raw), raw
        offset += len(raw)


def request_lines(path: Path, start: int = 0, end: int | None = None,
                  sha256: str | None = None) -> Iterator[tuple[str | None, int, int, bytes]]:
    """(custom_id, start, stop, line) for each non-blank line of an input file, in file order.

    `start`, `end`: only the lines of bytes [start, end) (a shard's, cut at line boundaries);
    the whole file by default. `sha256`: those bytes are hashed as they are read, and
    StalePlanError is raised after the last line if they are not that content (the input
    changed since its batch was made), so a caller writing atomically writes nothing.
    custom_id is None on a line that has none (a validated input has none such).
    """
    digest = hashlib.sha256() if sha256 else None
    with path.open("rb") as fh:
        fh.seek(start)
        for first, stop, raw in _numbered_lines(fh, start):
            if end is not None and first >= end:
                break
            if digest is not None:
                digest.update(raw)
            if raw.strip():
                yield custom_id_of(raw), first, stop, raw
    if digest is not None and digest.hexdigest() != sha256:
        where = f"bytes {start:,}..{end:,} of {path}" if end is not None else str(path)
        raise StalePlanError(f"{where} changed since the batch was made from them (sha256 "
                             f"{digest.hexdigest()[:12]}, expected {sha256[:12]})")


# The custom_id of a line that starts with it (a request line), or with an `id` and then it
# (a result line), as the API writes them, without parsing the body that follows (most of a
# line); any other line is parsed whole.
_LEADING_CUSTOM_ID = re.compile(rb'\s*\{\s*(?:"id"\s*:\s*"[^"\\]*"\s*,\s*)?"custom_id"\s*:\s*"([^"\\]*)"')


def custom_id_of(raw: bytes | bytearray | memoryview) -> str | None:
    """The custom_id of a request or result line; None when it has none."""
    if found := _LEADING_CUSTOM_ID.match(raw):
        with contextlib.suppress(UnicodeDecodeError):
            return found.group(1).decode()
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = line.get("custom_id") if type(line) is dict else None
    return custom_id if type(custom_id) is str else None


# -- merging attempts -------------------------------------------------------------------

@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote: `outputs` and `errors` lines; `missing`: input requests with no
    line in any result file; `strays`: result lines whose custom_id no input line has
    (written after the ordered ones, in file order, so that nothing is dropped)."""

    outputs: int
    errors: int
    missing: int
    strays: int


@dataclass(frozen=True)
class InputPart:
    """Bytes [start, end) of an input file (a shard's; the whole file when `end` is None) and the
    result files of every attempt made for them, oldest first. `sha256`: of those bytes, checked
    as they are read (None: the caller checked the file)."""

    attempts: Sequence[AttemptFiles | tuple[Path | None, Path | None]]
    start: int = 0
    end: int | None = None
    sha256: str | None = None


def merge_attempts(input_path: Path, attempts: Sequence[AttemptFiles | tuple[Path | None, Path | None]],
                   out_dest: Path, err_dest: Path) -> MergeReport:
    """Merge the result files of every attempt of one spec, in input order.

    `out_dest` gets one line per request that succeeded in any attempt (its first success);
    `err_dest` one line per request that never did (its latest error). Lines are copied byte
    for byte. Both files are written atomically; on any error neither is replaced.
    """
    return merge_parts(input_path, [InputPart(attempts)], out_dest, err_dest)


def merge_parts(input_path: Path, parts: Sequence[InputPart], out_dest: Path, err_dest: Path) -> MergeReport:
    """`merge_attempts` for a spec split into shards: each part (a shard and its attempts) in turn,
    in the given order, its requests in input order. One part's result files are read at a time,
    so memory is one small entry per request of one part, never of the whole file.
    StalePlanError (a part's bytes changed) or OSError: neither file is replaced."""
    counts = Counter()
    with atomic_writer(err_dest) as err, atomic_writer(out_dest) as out:
        for part in parts:
            counts.update(_merge_part(input_path, part, out, err))
    return MergeReport(outputs=counts["outputs"], errors=counts["errors"], missing=counts["missing"],
                       strays=counts["strays"])


def _merge_part(input_path: Path, part: InputPart, out: BinaryIO, err: BinaryIO) -> Counter[str]:
    """Write one part's results: its requests' in input order, then its strays."""
    outcome = classify_results(part.attempts)
    counts: Counter[str] = Counter()
    with _ResultReader(outcome.files) as read:
        for custom_id, _, _, _ in request_lines(input_path, part.start, part.end, part.sha256):
            if (ref := outcome.succeeded.pop(custom_id, None)) is not None:
                counts["outputs"] += _write_line(out, read(ref))
            elif (failure := outcome.failed.pop(custom_id, None)) is not None:
                counts["errors"] += _write_line(err, read(failure.line))
            else:
                counts["missing"] += 1
        counts["strays"] = _write_strays(outcome, read, out, err)
    return counts


def _write_strays(outcome: Outcome, read: _ResultReader, out: BinaryIO, err: BinaryIO) -> int:
    """What no input line asked for (there should be none), in file order."""
    for ref in sorted(outcome.succeeded.values()):
        _write_line(out, read(ref))
    for failure in sorted(outcome.failed.values(), key=lambda f: f.line):
        _write_line(err, read(failure.line))
    return len(outcome.succeeded) + len(outcome.failed)


def _write_line(out: BinaryIO, data: bytes) -> int:
    out.write(data)
    if not data.endswith(b"\n"):
        out.write(b"\n")  # a file's last line may lack its newline: never join two lines
    return 1


class _ResultReader:
    """Reads lines by reference from a set of open result files (one pread per line)."""

    def __init__(self, files: Sequence[Path]):
        self.paths = files
        self.fds: list[int] = []

    def __enter__(self) -> _ResultReader:
        try:
            for path in self.paths:
                self.fds.append(os.open(path, os.O_RDONLY))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __call__(self, ref: LineRef) -> bytes:
        return os.pread(self.fds[ref.file], ref.stop - ref.start, ref.start)


# -- the cache of downloaded result files -------------------------------------------------

_FILE_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


class ResultsCache:
    """Downloaded result files by file id: `<root>/<file_id>.jsonl`, with `<file_id>.jsonl.sha256`
    next to it in sha256sum's format (so `sha256sum -c` checks one by hand).

    A result file never changes on the server, so a file id cached intact is never downloaded
    again. The checksum is written only after the file is in place: a download cut short
    leaves no checksum, and is fetched again.
    """

    def __init__(self, root: Path):
        self.root = root

    def path(self, file_id: str) -> Path:
        if not _FILE_ID.match(file_id):
            raise StateError(f"{file_id!r} is not a file id batchplan can cache (letters, digits, '_' and '-'); "
                             "check the state entry that holds it")
        return self.root / f"{file_id}.jsonl"

    def _checksum_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl.sha256"

    def intact(self, file_id: str) -> bool:
        """Whether the file is cached and its bytes still have the sha256 recorded next to it."""
        try:
            recorded = self._checksum_path(file_id).read_text(encoding="ascii").split()
            return bool(recorded) and recorded[0] == hash_file(self.path(file_id))
        except (OSError, UnicodeDecodeError):
            return False

    def record(self, file_id: str) -> str:
        """Write the checksum of the file just put at `path(file_id)`; returns it."""
        digest = hash_file(self.path(file_id))
        with atomic_writer(self._checksum_path(file_id)) as fh:
            fh.write(f"{digest}  {file_id}.jsonl\n".encode("ascii"))
        return digest

    async def fetch(self, api: Api, file_id: str) -> Path:
        """The cached file, downloaded first unless it is cached intact."""
        path = self.path(file_id)
        if not self.intact(file_id):
            self._checksum_path(file_id).unlink(missing_ok=True)  # a stale checksum must never vouch for new bytes
            await api.download_file(file_id, path)
            self.record(file_id)
        return path
