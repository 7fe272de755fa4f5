"""Writing files so that a reader never sees half of one: temp file, fsync, rename.

Every file batchplan writes whole (the state and its backup, the input hash cache, a
saved plan, the download manifest, a downloaded result) goes through here. The temp
file sits next to the target (`.<name>.<pid>.<thread>.tmp`, so a rename never crosses file
systems) and is removed when the write fails; a process killed mid-write leaves the
old file intact and, at worst, a stray temp file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temp_path(path: Path) -> Path:
    """Where a write to `path` goes before it is renamed into place (one per process and thread)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without an error, for streaming writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str is written as UTF-8). OSError is left to the caller."""
    with atomic_writer(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (a crash right after it could otherwise lose it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (some platforms): the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
