"""The uploader: puts each local input a plan needs on the server once, and only the planned bytes.

Uploads are content-addressed: the file name carries the sha256 the plan was made with
(remote.upload_filename), so an upload already on the server, or one whose answer was
lost, is found by that name (and size) instead of being sent again. The file is hashed
while httpx streams it; when what was sent is not the content the plan hashed (the file
was edited in between), the upload is deleted and refused: a file on the server named
after one hash must never hold another content.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import feedback
from .errors import AmbiguousWrite, BatchplanError, InputError, TransportError
from .remote import upload_filename, uploaded_files

if TYPE_CHECKING:
    from .api import Api
    from .desired import Desired

UPLOAD_ROUNDS = 3


class HashingReader(io.RawIOBase):
    """A binary file that keeps the sha256 of what was read from it (httpx reads an upload through it)."""

    def __init__(self, raw: BinaryIO, advance: Callable[[int], None] = lambda n: None):
        super().__init__()
        self.raw = raw
        self.advance = advance  # a progress bar's, for a big file
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        self.advance(n)
        return n

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Only back to the start (httpx rewinds before it streams): the hash then starts again."""
        if (offset, whence) != (0, io.SEEK_SET):
            raise io.UnsupportedOperation("a hashed upload is read from the start only")
        self.digest = hashlib.sha256()
        return self.raw.seek(0)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()  # httpx takes the length of the upload from the file's size

    def close(self) -> None:
        self.raw.close()
        super().close()


class HashedSource:
    """An input file as api.upload_file opens it (`.open("rb")`, once per attempt; `stat()` for its size),
    hashed as it is read."""

    def __init__(self, path: Path, advance: Callable[[int], None] = lambda n: None):
        self.path = path
        self.advance = advance
        self.reader: HashingReader | None = None

    def open(self, mode: str = "rb") -> HashingReader:
        self.close()
        self.reader = HashingReader(self.path.open("rb"), self.advance)
        return self.reader

    def stat(self) -> os.stat_result:
        return self.path.stat()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def hexdigest(self) -> str | None:
        return self.reader.digest.hexdigest() if self.reader is not None else None


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
                self.report(want.name, f"uploaded {want.input} as {file['id']}")
                return file
            except AmbiguousWrite:
                again = await self._find_lost(want.input_sha256, sizes)
                if again:
                    return again
        raise TransportError(f"uploading {want.input} failed {UPLOAD_ROUNDS} times with no answer; "
                             "run apply again")

    async def _send(self, want: Desired) -> dict:
        """Upload the input, hashing it as httpx streams it; refuse content that is not the planned one."""
        path = self.repo_root / str(want.input)
        with feedback.current().transfer(f"upload {want.input}", want.input_bytes or 0) as advance:
            source = HashedSource(path, advance)
            try:
                file = await self.api.upload_file(source, upload_filename(want))  # type: ignore[arg-type]
            finally:
                source.close()
        if source.hexdigest() != want.input_sha256:
            await self._discard(want, file)
            raise InputError(f"{want.input} changed while it was being uploaded (the plan was made with sha256 "
                             f"{str(want.input_sha256)[:12]}); the upload {file['id']} was deleted and not used. "
                             "Run `batchplan plan` to see the plan for its new content, then apply again")
        return file

    async def _discard(self, want: Desired, file: dict) -> None:
        try:
            await self.api.delete_file(file["id"])
        except BatchplanError as exc:  # it holds other content than its name says: say so, never use it
            self.report(want.name, f"could not delete the upload {file['id']} ({exc}); delete it by hand")

    async def _find_lost(self, sha: str, sizes: dict[str, int]) -> dict | None:
        """The file an upload without an answer made, if it landed (looking twice, as for creates)."""
        found = (await uploaded_files(self.api, sizes)).get(sha)
        if found is None and not self.api.stopping.is_set():
            await self.settle()
            found = (await uploaded_files(self.api, sizes)).get(sha)
        return found
