"""The uploader: puts each local input a plan needs on the server once, and only the planned bytes.

Uploads are content-addressed: the file name carries the sha256 the plan was made with
(remote.upload_filename), so an upload already on the server, or one whose answer was
lost, is found by that name (and size) instead of being sent again. What is sent is a
byte range of the input file (a shard's, or the whole file) streamed straight from disk
and hashed as httpx reads it; when it is not the content the plan hashed (the file was
edited in between), the upload's body is never completed: a file on the server named
after one hash must never hold another content.

The sha256 is the content address. The check as it streams uses the shard's xxh3_128
when the scan gave it one (computed from the very bytes it hashed with sha256; an
accidental edit between scan and upload slips through with odds of 2^-128), which spares
each upload a second sha256 on cores the server needs; a whole file, a retry's input and
a shard from a plan file written before xxh3 are checked with sha256 itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import feedback
from .errors import AmbiguousWrite, BatchplanError, InputError, StalePlanError, TransportError
from .remote import upload_filename, uploaded_files
from .shards import ShardReader, open_verified

if TYPE_CHECKING:
    from .api import Api
    from .desired import Desired

UPLOAD_ROUNDS = 3


class VerifiedSource:
    """An input's planned bytes as api.upload_file opens them (`.open("rb")`, once per attempt):
    the byte range of a shard, or a whole file, hashed as httpx streams it (shards.ShardReader):
    with the shard's xxh3_128 when it has one (an integrity check, not the address), else sha256.

    The read that reaches the end raises StalePlanError, before it returns the last bytes,
    when they are not the content the plan hashed: the upload's body is never complete, so
    the server never holds a file named after one hash with another content."""

    def __init__(self, path: Path, want: Desired, advance: Callable[[int], None]):
        self.path, self.want, self.advance = path, want, advance
        self.reader: ShardReader | None = None

    @property
    def size(self) -> int:
        """The bytes an upload sends (api.upload_file's deadline grows with it)."""
        start, end = self.want.upload_range()
        return end - start

    def open(self, mode: str = "rb") -> ShardReader:
        self.close()
        start, end = self.want.upload_range()
        quick = self.want.shard.xxh3 if self.want.shard else ""  # a retry's input and a whole file have none
        self.reader = open_verified(self.path, start, end, str(self.want.input_sha256), self.advance, xxh3=quick)
        return self.reader

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class Uploader:
    """Uploads for one apply. `settle` waits out the settling delay (or until apply stops)."""

    def __init__(self, api: Api, repo_root: Path, report: Callable[[str, str], None],
                 settle: Callable[[], Awaitable[None]]):
        self.api = api
        self.repo_root = repo_root
        self.report = report
        self.settle = settle

    async def ensure(self, needed: dict[str, Desired],
                     sizes: dict[str, int]) -> tuple[dict[str, dict], dict[str, BatchplanError]]:
        """sha256 -> file on the server for every input in `needed` (sha256 -> a spec that reads it),
        reusing what is there; and sha256 -> why, for each that could not be uploaded."""
        on_server = await uploaded_files(self.api, sizes)
        missing = [sha for sha in needed if sha not in on_server]
        results = await asyncio.gather(*(self._upload(needed[sha], sizes) for sha in missing),
                                       return_exceptions=True)
        failed: dict[str, BatchplanError] = {}
        for sha, result in zip(missing, results):
            if isinstance(result, BatchplanError):
                failed[sha] = result
            elif isinstance(result, BaseException):
                raise result
            else:
                on_server[sha] = result
        return on_server, failed

    async def _upload(self, want: Desired, sizes: dict[str, int]) -> dict:
        assert want.input and want.input_sha256
        for _ in range(UPLOAD_ROUNDS):
            try:
                file = await self._send(want)
                self.report(want.name, f"uploaded {_what(want)} as {file['id']}")
                return file
            except AmbiguousWrite:
                again = await self._find_lost(want.input_sha256, sizes)
                if again:
                    return again
        raise TransportError(f"uploading {want.input} failed {UPLOAD_ROUNDS} times with no answer; "
                             "run apply again")

    async def _send(self, want: Desired) -> dict:
        """Upload the input's planned bytes, verified as httpx streams them (see VerifiedSource)."""
        path = self.repo_root / str(want.input)
        start, end = want.upload_range()
        what = _what(want)
        with feedback.current().transfer(f"upload {what}", end - start) as advance:
            source = VerifiedSource(path, want, advance)
            try:
                return await self.api.upload_file(source, upload_filename(want))  # type: ignore[arg-type]
            except (StalePlanError, OSError) as exc:
                raise InputError(f"{what} changed since the plan was made (the plan hashed it as sha256 "
                                 f"{str(want.input_sha256)[:12]}): nothing of it was uploaded. Run `batchplan plan` "
                                 "to see the plan for its new content, then apply again") from exc
            finally:
                source.close()

    async def _find_lost(self, sha: str, sizes: dict[str, int]) -> dict | None:
        """The file an upload without an answer made, if it landed (looking twice, as for creates)."""
        found = (await uploaded_files(self.api, sizes)).get(sha)
        if found is None and not self.api.stopping.is_set():
            await self.settle()
            found = (await uploaded_files(self.api, sizes)).get(sha)
        return found


def _what(want: Desired) -> str:
    """What an upload sends: `data/big.jsonl`, or for a shard `data/big.jsonl lines 50,001-100,000`."""
    if want.shard is None:
        return str(want.input)
    return f"{want.input} lines {want.shard.first_line:,}-{want.shard.last_line:,}"
