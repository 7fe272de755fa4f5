"""Shards: one input file cut into consecutive runs of lines, each small enough for one batch.

A file over any of the Batch API's limits (50,000 requests, 200 MB, and for
`/v1/embeddings` 50,000 embedding inputs) is split; a spec's optional `shard:` block
(`ShardLimits`) asks for smaller shards. The cut is greedy and in file order: a shard
ends just before the first line that would break a limit. So boundaries depend only
on the lines before them: the same file always gives the same shards, and lines
appended to a file change only its last shard and add new ones.

    split_input          one streaming pass (inputs.scan_input with a Splitter) that
                         validates, hashes the file, and finds each shard with its sha256
                         (and its xxh3_128, the upload's quick check of the same bytes)
    describe_split       "120,001 requests: 3 shards of <=50,000", for `validate`
    open_range/open_shard  a shard's bytes as a file httpx can upload, verified as streamed
    merge_jsonl          result files concatenated in shard order, atomically
    merge_in_input_order results put back in the order of the input lines that asked for them

Nothing here holds a whole file: memory is bounded by one shard's custom_ids at most.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import xxhash
from pydantic import BaseModel, ConfigDict, Field

from .errors import StalePlanError, ValidationFailed
from .fsutil import atomic_writer
from .inputs import CHUNK, MAX_BYTES, MAX_EMBEDDING_INPUTS, MAX_REQUESTS, InputReport, scan_input
from .lineblocks import read_lines
from .results import custom_id_of

MB = 2**20
# Why a shard was cut where it was: the limit its next line would have broken.
BY_REQUESTS, BY_BYTES, BY_INPUTS = "requests", "bytes", "embedding inputs"


class ShardLimits(BaseModel):
    """A spec's `shard:` block: smaller shards than the API's limits (each at most that limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_requests: int = Field(MAX_REQUESTS, ge=1, le=MAX_REQUESTS)
    max_bytes: int = Field(MAX_BYTES, ge=1, le=MAX_BYTES)


@dataclass(frozen=True)
class Shard:
    """Lines first_line..last_line (1-based) of an input file: its bytes [start, end).

    `sha256` is the hash of exactly those bytes, so a shard is content-addressed like any
    input. `cut_by` is the limit that ended it (BY_*), None for the last shard.

    `xxh3` is the xxh3_128 of the same bytes, computed by the scan from the very bytes it
    hashed with sha256 (_ShardHashes). It is not an address: it is the uploader's check that
    the bytes it sends are still the ones scanned (ShardReader), ~12x cheaper than a second
    sha256, and an accidental edit in between goes unseen with odds of 2^-128. "" when the
    scan did not compute it (a file hashed whole), or the shard was saved before it existed
    (a plan file, a `state/cache.json` entry): then the upload is checked with sha256.
    """

    index: int
    start: int
    end: int
    first_line: int
    last_line: int
    requests: int
    embedding_inputs: int
    sha256: str
    cut_by: str | None = None
    xxh3: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Span:
    """A shard whose boundaries are known but whose sha256 may not be yet."""

    start: int
    end: int
    first_line: int
    requests: int
    embedding_inputs: int
    cut_by: str | None


class Splitter:
    """Finds shard boundaries while inputs.scan_input walks a file's lines (see the module doc).

    Life cycle: `begin` (scan_input calls it), `place` for every line, then `finish`
    (or `cancel`). `place` is the hot path: a line that fits, as almost all do, costs
    three comparisons against precomputed marks; shards are contiguous, so a shard's
    size is just how far its last line ends past its start.
    """

    def __init__(self, limits: ShardLimits | None = None):
        limits = limits or ShardLimits()
        self.max_requests = limits.max_requests
        self.max_bytes = limits.max_bytes
        self.max_inputs = MAX_EMBEDDING_INPUTS
        self.spans: list[_Span] = []
        self.start, self.first_line, self.inputs = 0, 1, 0  # the open shard
        self.publish_at = float("inf")  # where to tell the hasher next how far the scan has come
        self._set_marks()
        self.hashes: _ShardHashes | None = None
        self.problem: Callable[..., None] = lambda *args: None

    def begin(self, path: Path, problem: Callable[..., None], hash_all: bool = False) -> int:
        """Start hashing shards of `path`; returns the longest line worth keeping (see inputs._lines).

        `hash_all`: the caller does not hash the file itself (a large file), so the shard hasher
        follows the scan from the first byte: a file that stays one shard gets its hash from it,
        and a split file is hashed once, shard by shard, not twice."""
        self.hashes = _ShardHashes(path)
        self.problem = problem
        if hash_all:
            self.publish_at = _ShardHashes.PUBLISH_EVERY
            self._set_marks()
        return self.max_bytes

    def place(self, start: int, stop: int, inputs: int, line: int) -> bool:
        """Put line `line` (bytes [start, stop), `inputs` embedding inputs) in a shard; True if a new one."""
        if stop <= self.stop_mark and line < self.line_mark and not inputs:
            return False
        return self._place(start, stop, inputs, line)

    def _place(self, start: int, stop: int, inputs: int, line: int) -> bool:
        requests = line - self.first_line
        cut = requests and (requests == self.max_requests or stop - self.start > self.max_bytes
                            or self.inputs + inputs > self.max_inputs)
        if cut:
            self._cut(start, stop, line, requests)
        self.inputs += inputs
        if stop - start > self.max_bytes or inputs > self.max_inputs:
            self._oversized(stop - start, inputs, line)
        self._publish(start)
        self._set_marks()
        return bool(cut)

    def fits(self, stop: int, last_line: int, inputs: int) -> bool:
        """Whether the lines up to `last_line`, which ends at byte `stop`, holding `inputs` embedding
        inputs among the ones not placed yet, all go in the open shard: no cut among them and none too
        large. Then `take` places them at once (inputs._Scanner's fast path for a block of lines)."""
        return (stop - self.start <= self.max_bytes and last_line - self.first_line < self.max_requests
                and self.inputs + inputs <= self.max_inputs)

    def take(self, last_start: int, inputs: int) -> None:
        """Place the lines `fits` said go in the open shard; the last of them starts at `last_start`."""
        self.inputs += inputs
        self._publish(last_start)

    def _publish(self, start: int) -> None:
        """Let the hasher read up to `start`, the start of a line placed (once every PUBLISH_EVERY bytes)."""
        if start >= self.publish_at:
            self.hashes.upto(start)
            self.publish_at = start + _ShardHashes.PUBLISH_EVERY
            self._set_marks()

    def _set_marks(self) -> None:
        """The first line number, and the end offset, that `place` must look at closely."""
        self.line_mark = self.first_line + self.max_requests
        self.stop_mark = min(self.start + self.max_bytes, self.publish_at)

    def _cut(self, start: int, stop: int, line: int, requests: int) -> None:
        if requests == self.max_requests:
            reason = BY_REQUESTS
        else:
            reason = BY_BYTES if stop - self.start > self.max_bytes else BY_INPUTS
        self.spans.append(_Span(self.start, start, self.first_line, requests, self.inputs, reason))
        self.start, self.first_line, self.inputs = start, line, 0
        self.hashes.cut(start)
        self.publish_at = start + _ShardHashes.PUBLISH_EVERY

    def _oversized(self, size: int, inputs: int, line: int) -> None:
        """A line no shard can hold: it gets a shard of its own, and a problem naming it."""
        if inputs > self.max_inputs:
            return self.problem("too_many_inputs", f"the line holds {inputs:,} embedding inputs; a batch holds at "
                                f"most {self.max_inputs:,}: split its input list", line, "body.input")
        if self.max_bytes == MAX_BYTES:
            return self.problem("line_too_large", f"the line is {size:,} bytes; no batch can hold a line over "
                                f"{_size_text(MAX_BYTES)} (the Batch API's file limit): shorten it", line)
        self.problem("line_too_large", f"the line is {size:,} bytes, more than the spec's shard.max_bytes "
                     f"({self.max_bytes:,}); raise shard.max_bytes (at most {_size_text(MAX_BYTES)}) "
                     "or shorten the line", line)

    def finish(self, file_sha256: str | None, lines: int, end: int) -> list[Shard]:
        """The shards of a file of `lines` lines and `end` bytes, with their hashes.

        A file that is one shard has the file's own hash (`file_sha256`, when the caller has it),
        and no xxh3: it is uploaded whole (Desired.shard is None), checked by that sha256.
        """
        if not lines:
            self.cancel()
            return []
        spans = [*self.spans, _Span(self.start, end, self.first_line, lines + 1 - self.first_line, self.inputs, None)]
        if len(spans) == 1 and file_sha256 is not None:
            self.cancel()
            digests = [(file_sha256, "")]
        else:
            digests = self.hashes.finish(spans[-1].end)
        return [Shard(index=i, start=s.start, end=s.end, first_line=s.first_line,
                      last_line=s.first_line + s.requests - 1, requests=s.requests,
                      embedding_inputs=s.embedding_inputs, sha256=sha256, cut_by=s.cut_by, xxh3=xxh3)
                for i, (s, (sha256, xxh3)) in enumerate(zip(spans, digests))]

    def cancel(self) -> None:
        if self.hashes is not None:
            self.hashes.cancel()


class _ShardHashes:
    """The sha256 and xxh3_128 of each shard, computed by a second thread as the scan finds boundaries.

    The thread reads the file itself (the page cache serves it), never past the start of
    the line the scan last placed, so the scan loop only posts offsets: one per cut and
    one per PUBLISH_EVERY bytes. For a small file, nothing is hashed until a first cut: a
    file that is one shard needs no hash but the file's own, which the scan computes as it
    reads. A large file is followed from its first byte (Splitter.begin's `hash_all`) and
    is then hashed by this thread alone: its shards' hashes, or its own when it is one shard.
    Each piece read also goes through xxh3_128 (Shard.xxh3), in this thread and from the same
    buffer: ~20 GB/s, so the scan gains ~0.05 CPU-s per GB, and each upload saves a second sha256.
    """

    PUBLISH_EVERY = 8 * MB
    PIECE = 8 * MB  # few pieces: each one waits for the GIL twice, held by the scan in long C calls

    def __init__(self, path: Path):
        self.path = path
        self.orders: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self.digests: list[tuple[str, str]] = []  # (sha256, xxh3_128) of each shard, in order
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self.thread.start()

    def upto(self, offset: int) -> None:
        self.orders.put(("upto", offset))

    def cut(self, offset: int) -> None:
        self.orders.put(("cut", offset))

    def finish(self, end: int) -> list[tuple[str, str]]:
        self.orders.put(("end", end))
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digests

    def cancel(self) -> None:
        self.orders.put(("stop", 0))
        self.thread.join()

    def _run(self) -> None:
        try:
            with self.path.open("rb", buffering=0) as fh:
                self._follow(fh)
        except OSError as exc:
            self.error = exc

    def _follow(self, fh: BinaryIO) -> None:
        digest, quick, hashed = hashlib.sha256(), xxhash.xxh3_128(), 0
        buffer = memoryview(bytearray(self.PIECE))
        while True:
            order, offset = self.orders.get()
            if order == "stop":
                return
            fh.seek(hashed)
            while hashed < offset:
                n = fh.readinto(buffer[:min(self.PIECE, offset - hashed)])
                if not n:
                    raise OSError(f"{self.path} got shorter while it was read")
                piece = buffer[:n]
                digest.update(piece)
                quick.update(piece)
                hashed += n
            if order in ("cut", "end"):
                self.digests.append((digest.hexdigest(), quick.hexdigest()))
                digest, quick = hashlib.sha256(), xxhash.xxh3_128()
            if order == "end":
                return


def split_input(path: Path, endpoint: str, limits: ShardLimits | None = None, *,
                file: str | None = None) -> InputReport:
    """Validate, hash and split one input file in one streaming pass: `report.shards`.

    Raises ValidationFailed naming `file` (default: the path) and each bad line.
    """
    report = scan_input(path, endpoint, splitter=Splitter(limits))
    if not report.ok:
        more = [f"... and {report.more_problems} more"] if report.more_problems else []
        raise ValidationFailed([replace(p, file=file) if file else p for p in report.problems], more)
    return report


def describe_split(shards: list[Shard], limits: ShardLimits | None = None) -> str:
    """Why a file makes the shards it makes, e.g. "120,001 requests: 3 shards of <=50,000"."""
    limits = limits or ShardLimits()
    requests = sum(s.requests for s in shards)
    if len(shards) <= 1:
        return f"{requests:,} request{'s' if requests != 1 else ''}: {len(shards)} shard{'s' if not shards else ''}"
    totals = {BY_REQUESTS: f"{requests:,} requests",
              BY_BYTES: _size_text(shards[-1].end - shards[0].start),
              BY_INPUTS: f"{sum(s.embedding_inputs for s in shards):,} embedding inputs"}
    bounds = {BY_REQUESTS: (f"{limits.max_requests:,}", " requests"),
              BY_BYTES: (_size_text(limits.max_bytes), ""),
              BY_INPUTS: (f"{MAX_EMBEDDING_INPUTS:,}", " embedding inputs")}
    reasons = [r for r in (BY_REQUESTS, BY_BYTES, BY_INPUTS) if any(s.cut_by == r for s in shards)]
    if len(reasons) == 1:
        of = f"<={bounds[reasons[0]][0]}"
    else:
        of = " or ".join(f"<={bounds[r][0]}{bounds[r][1]}" for r in reasons)
    return f"{', '.join(totals[r] for r in reasons)}: {len(shards)} shards of {of}"


def _size_text(size: int) -> str:
    if size < MB:
        return f"{size:,} bytes"
    return f"{size / MB:,.1f}".removesuffix(".0") + " MB"


# -- reading one shard's bytes -----------------------------------------------------------

class ShardReader(io.RawIOBase):
    """Bytes [start, end) of a file as a read-only binary file of their own: position 0 is
    `start`, the end of file is `end`. httpx streams it as a multipart file part.

    httpx sizes a file part with os.fstat(fileno()) when it can, which would give the whole
    file's size and a Content-Length the body never reaches. So fileno() is refused
    (io.UnsupportedOperation, an OSError), and httpx falls back to seek(0, SEEK_END): the
    range's size. With `sha256`, the bytes are hashed as they are handed out (by a second
    thread for large pieces, see _PieceHasher), and the read that reaches the end raises
    StalePlanError if they changed since they were scanned, before returning them: an
    upload of changed bytes never completes. Reading from position 0 again (a retried
    upload) starts the hash afresh.

    With `xxh3` (a shard's Shard.xxh3, computed by the scan from the bytes it hashed with
    sha256), the same check is made with xxh3_128 instead, inline (_Xxh3Hasher): same
    guarantee against an edit between scan and upload (an accidental one goes unseen with
    odds of 2^-128), at a twelfth of the CPU. It checks integrity only: `sha256` stays the
    content address the upload is named after, and is what is checked when there is no xxh3.
    """

    def __init__(self, path: Path, start: int, end: int, sha256: str | None = None,
                 advance: Callable[[int], None] | None = None, xxh3: str = ""):
        if not 0 <= start <= end:
            raise ValueError(f"not a byte range: [{start}, {end})")
        self._hasher: _PieceHasher | _Xxh3Hasher | None = None
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        super().__init__()
        self.path, self.start, self.end, self.sha256, self.xxh3 = Path(path), start, end, sha256, xxh3
        self.advance = advance  # a progress bar's, for an upload
        self._pos = 0
        self._restart_hash()

    @property
    def size(self) -> int:
        return self.end - self.start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a byte range has no file descriptor of its own (see ShardReader)")

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        if self._pos == 0:
            self._restart_hash()  # a retried upload reads it all again
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all that is left when -1) as a fresh `bytes`: the very object hashed."""
        if size is None or size < 0:
            return self.readall()
        want = min(size, self.size - self._pos)
        if want <= 0:
            return b""
        try:
            piece = _read_at(self._file, self.start + self._pos, self.start + self._pos + want)
            if not piece:
                raise StalePlanError(f"{self.path} ends at byte {self.start + self._pos:,}, before the end of its "
                                     f"shard at byte {self.end:,}: it changed since it was scanned; run the plan again")
            if self._pos == self._hashed:
                self._hand_out(piece)
        except BaseException:
            self._hasher.wait()  # no thread outlives a failed read; the hash goes on if reading does
            raise
        self._pos += len(piece)
        return piece

    def readall(self) -> bytes:
        """The rest of the range, in one read when the system gives it (a join of one piece copies nothing)."""
        pieces = []
        while piece := self.read(self.size - self._pos):
            pieces.append(piece)
        return b"".join(pieces)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """For io.BufferedReader and hashlib.file_digest: a copy of what `read` hands out and hashes."""
        view = memoryview(buffer).cast("B")
        piece = self.read(len(view))
        view[:len(piece)] = piece
        return len(piece)

    def close(self) -> None:
        if self._hasher is not None:  # None when __init__ failed to open the file
            self._hasher.wait()
            self._file.close()
        super().close()

    def _hand_out(self, piece: bytes) -> None:
        """Hash the next bytes in order; at the end of the range, check them before they go out."""
        self._hashed += len(piece)
        done = self._hashed == self.size
        self._hasher.add(piece, last=done)
        if done and (self.xxh3 or self.sha256):
            self._verify()
        if self.advance is not None:
            self.advance(len(piece))

    def _restart_hash(self) -> None:
        if self._hasher is not None:
            self._hasher.wait()  # the old hash's thread ends: at most QUEUED pieces to finish
        self._hasher = _Xxh3Hasher() if self.xxh3 else _PieceHasher(hashing=bool(self.sha256))
        self._hashed = 0

    def _verify(self) -> None:
        expected = self.xxh3 or self.sha256
        got = self._hasher.hexdigest()
        if got != expected:
            raise StalePlanError(f"{self.path}: bytes {self.start:,}..{self.end:,} changed since they were scanned "
                                 f"({self._hasher.NAME} {got[:12]}, expected {expected[:12]}); run the plan again")


class _PieceHasher:
    """The sha256 of the pieces a ShardReader hands out, in order, hashed by a second thread
    while the caller sends them (hashlib lets go of the GIL for a large buffer): an upload's
    socket writes and its hash overlap instead of taking turns on the event loop's thread.

    Each piece is the immutable `bytes` object handed out, so what is hashed is exactly what
    was sent, never a second read of the file. A piece under THREAD_FROM bytes, or the last
    of a range when no thread runs yet, is hashed at once on the caller's thread: there a thread
    costs more than it saves (measured on 300 MB: in 64 KiB pieces it adds 40% to the CPU time
    to halve the caller's; in 1 MiB pieces, 10% to cut it by three quarters). Once a thread
    runs, every piece goes to it, to keep their order. At most QUEUED pieces wait, so memory stays bounded
    when the caller is faster. `wait` lets the thread hash what is queued and ends it (a later
    large piece starts another, on the same digest); `hexdigest` waits, then answers.
    Nothing is hashed when `hashing` is off (no sha256 to check).
    """

    NAME = "sha256"
    THREAD_FROM = 256 * 1024
    QUEUED = 2

    def __init__(self, hashing: bool = True):
        self.hashing = hashing
        self._digest = hashlib.sha256()
        self._pieces: queue.Queue[bytes | None] = queue.Queue(self.QUEUED)
        self._thread: threading.Thread | None = None

    def add(self, piece: bytes, last: bool = False) -> None:
        if not self.hashing:
            return
        if self._thread is None and (last or len(piece) < self.THREAD_FROM):
            self._digest.update(piece)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upload-sha256", daemon=True)
            self._thread.start()
        self._pieces.put(piece)

    def hexdigest(self) -> str:
        self.wait()
        return self._digest.hexdigest()

    def wait(self) -> None:
        if self._thread is not None:
            self._pieces.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        # The thread holds no reference to its ShardReader, so a reader dropped unclosed is
        # still collected, and its close() (IOBase's __del__) ends this thread.
        while (piece := self._pieces.get()) is not None:
            self._digest.update(piece)


class _Xxh3Hasher:
    """The xxh3_128 of the pieces a ShardReader hands out, hashed at once on the caller's thread:
    at ~20 GB/s a 1 MiB piece takes ~50 µs, less than handing it to a thread would cost (see
    _PieceHasher). The same interface as _PieceHasher, with nothing to wait for."""

    NAME = "xxh3_128"

    def __init__(self):
        self._digest = xxhash.xxh3_128()

    def add(self, piece: bytes, last: bool = False) -> None:
        self._digest.update(piece)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def wait(self) -> None:
        pass  # no thread


def open_range(path: Path, start: int, end: int) -> ShardReader:
    """Bytes [start, end) of `path` as a file of their own (see ShardReader)."""
    return ShardReader(path, start, end)


def open_shard(path: Path, shard: Shard) -> ShardReader:
    """A shard's bytes, checked as they stream (StalePlanError if changed): against its xxh3
    when the scan gave it one, else its sha256 (see ShardReader)."""
    return ShardReader(path, shard.start, shard.end, shard.sha256, xxh3=shard.xxh3)


def open_verified(path: Path, start: int, end: int, sha256: str,
                  advance: Callable[[int], None] | None = None, *, xxh3: str = "") -> ShardReader:
    """Bytes [start, end) of `path`, checked as they stream: an upload's source (a shard, or a
    whole file as the range [0, size)), with a progress callback. Checked against `xxh3` when
    given (a shard the scan gave one: an integrity check only), else against `sha256`."""
    return ShardReader(path, start, end, sha256, advance, xxh3)


def open_lines(path: Path, byte_range: tuple[int, int] | None = None, sha256: str | None = None) -> BinaryIO:
    """The file, or its bytes [start, end) as a file of their own (checked against `sha256` when
    given: StalePlanError at the end if they changed), buffered so that `for line in fh` is fast."""
    if byte_range is None:
        return path.open("rb")
    return io.BufferedReader(ShardReader(path, *byte_range, sha256), CHUNK)


# -- merging results ---------------------------------------------------------------------

def _write_line(out: BinaryIO, data: bytes) -> None:
    out.write(data)
    if data and not data.endswith(b"\n"):
        out.write(b"\n")  # a file's last line may lack its newline


def merge_jsonl(parts: list[Path], dest: Path) -> int:
    """Concatenate JSONL files in the given (shard) order into `dest`, atomically; returns its size."""
    with atomic_writer(dest) as out:
        for part in parts:
            with part.open("rb") as fh:
                last = b""
                while chunk := fh.read(CHUNK):
                    out.write(chunk)
                    last = chunk[-1:]
                if last not in (b"", b"\n"):
                    out.write(b"\n")  # a part's last line may lack its newline: never join two lines
        return out.tell()


def merge_in_input_order(input_path: Path, shards: list[Shard], result_files: list[Path | None],
                         dest: Path) -> int:
    """Every shard's results, in the order of the input lines that asked for them; returns the lines written.

    The API writes a batch's results in any order. Per shard, the custom_id of each result
    line is mapped to that line's byte range (memory: one small entry per request of one
    shard), then the shard's input lines are walked and each one's result is copied by
    seeking. A request with no result in the file (it failed, so it is in the error file)
    is skipped; a result whose custom_id no input line of its shard has (there should be
    none) follows that shard's ordered results, in file order, so nothing is dropped.
    `result_files[i]` belongs to `shards[i]`; None when that shard has no such file. A
    shard's input lines are checked against its sha256 (when it has one) as they are read:
    StalePlanError, and nothing written, when the input changed since.
    """
    if len(result_files) != len(shards):
        raise ValueError(f"{len(shards)} shards but {len(result_files)} result files")
    written = 0
    with atomic_writer(dest) as out:
        for shard, results in zip(shards, result_files):
            if results is not None:
                written += _merge_shard(input_path, shard, results, out)
    return written


def _merge_shard(input_path: Path, shard: Shard, results: Path, out: BinaryIO) -> int:
    where, strays = _index_results(results)
    written = 0
    with results.open("rb", buffering=0) as fh:
        with ShardReader(input_path, shard.start, shard.end, shard.sha256 or None) as requests:
            for raw, _, _ in read_lines(requests, CHUNK):
                place = where.pop(custom_id_of(raw), None)
                if place is not None:
                    _write_line(out, _read_at(fh, *place))
                    written += 1
        for place in sorted([*where.values(), *strays]):
            _write_line(out, _read_at(fh, *place))
            written += 1
    return written


def _index_results(results: Path) -> tuple[dict[str, tuple[int, int]], list[tuple[int, int]]]:
    """custom_id -> byte range of its line; and the lines with no usable or a repeated custom_id."""
    where: dict[str, tuple[int, int]] = {}
    strays: list[tuple[int, int]] = []
    with results.open("rb", buffering=0) as fh:
        for raw, start, stop in read_lines(fh, CHUNK):
            custom_id = custom_id_of(raw)
            if custom_id is None or custom_id in where:
                strays.append((start, stop))
            else:
                where[custom_id] = (start, stop)
    return where, strays


def _read_at(fh: BinaryIO, start: int, stop: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fh.fileno(), stop - start, start)  # one system call, not two
    fh.seek(start)
    return fh.read(stop - start)
