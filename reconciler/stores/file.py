"""The file store: the state as one JSON file, meant to be committed and reviewed.

On disk, next to `<state>` (default `state/batchplan.state.json`):
- `<state>.backup`: the state as it was before the last command that changed it;
- `<state>.lock`: an OS file lock (flock), which the kernel drops when its holder dies,
  so a killed process never blocks the next one;
- `<state>.lock.info`: who holds the lock (a LockInfo as JSON), for the message a
  second process prints.

Every write is atomic (fsutil.atomic_write). A state file that cannot be read, or that
a newer batchplan wrote, is reported and never overwritten. A state file that is a
symlink is resolved first: it is written through (the link stays a link) and locked as
its target, so two links to one state share one lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import filelock
import orjson
from pydantic import ValidationError

from ..errors import LockError, StateError
from ..fsutil import atomic_write
from ..state import FORMAT_VERSION, UPGRADE, State, format_refusal
from .base import LockInfo, StateConflict, StateStore, lock_error, warn_forcing


class FileStore(StateStore):
    """One state file, its backup and its lock."""

    def __init__(self, path: Path):
        path = path.resolve() if path.is_symlink() else path  # the target: one lock per state, not per link
        self.path = path
        self.location = str(path)
        self.backup_path = path.with_name(path.name + ".backup")
        self.backup_location = self.backup_path.name
        self.lock_path = path.with_name(path.name + ".lock")
        self.info_path = path.with_name(path.name + ".lock.info")
        self._lock: filelock.FileLock | None = None
        self._held_id: str | None = None

    # -- the lock ------------------------------------------------------------------------

    def lock(self, info: LockInfo, timeout: float) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.lock_path), timeout=timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise lock_error(self.location, self._holder_note(), timeout, "if that process hangs, stop it: its lock "
                             "is released the moment it exits (a dead process never holds this lock)") from None
        self._lock, self._held_id = lock, info.id
        try:  # atomic: a process that finds the lock taken never reads half a note
            atomic_write(self.info_path, json.dumps(info.to_dict(), sort_keys=True))
        except OSError as exc:  # a full disk: let the lock go, change nothing
            self.unlock()
            raise StateError(f"{self.info_path}: cannot write the lock note ({exc.strerror or exc}); nothing was "
                             "sent or changed. Free some space (or make the directory writable) and run again") from exc

    def unlock(self) -> None:
        if self._lock is not None:
            if (note := self.holder()) is not None and note.id == self._held_id:  # not a note `--force` let in
                self.info_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def holder(self) -> LockInfo | None:
        try:
            return LockInfo.from_dict(json.loads(self.info_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def _holder_note(self, patience: float = 1.0) -> LockInfo | None:
        """The holder's note; a holder that took the lock a moment ago writes it right after, so wait a little."""
        deadline = time.monotonic() + patience
        while (held := self.holder()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return held

    def holder_alive(self, info: LockInfo) -> bool:
        """Whether a process holds the OS lock now (a holder that died has released it)."""
        return self._flock_held()

    def _flock_held(self) -> bool:
        """Ask the kernel with a non-blocking flock on the lock file; no file, no holder. Creates nothing."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's own lock, if it got it
        return False

    def force_unlock(self, lock_id: str, *, force: bool = False) -> LockInfo:
        """Remove a dead holder's note. A live holder is refused; with `force`, after a Notice, its lock file
        is unlinked too, so the next command locks a new one (the live holder's saves then fail the serial
        check if another writer saved first: nothing is overwritten)."""
        held, alive = self.holder(), self._flock_held()
        if held is None:
            state = "is locked by a process that left no note" if alive else "is not locked"
            raise LockError(f"the state {self.path} {state}, so there is no lock {lock_id} to remove; nothing was "
                            "changed")
        if held.id != lock_id:
            raise LockError(f"the lock on {self.path} has id {held.id}, not {lock_id}; nothing was changed")
        if alive and not force:
            raise LockError(f"the lock on {self.path} is held by {held.describe()}, which is still running; nothing "
                            "was changed. Wait for it to finish or stop it (its lock goes with it); "
                            "`force-unlock --force` takes the lock from it anyway")
        if alive:
            warn_forcing(held, str(self.path), "removes it while that process runs on: its next save fails if "
                                               "another command saves first")
            self.lock_path.unlink(missing_ok=True)
        self.info_path.unlink(missing_ok=True)
        return held

    def local_files(self) -> dict[Path, str]:
        return {self.path: "the state file", self.backup_path: "the state's backup",
                self.lock_path: "the state lock", self.info_path: "the state lock's note"}

    # -- the state -----------------------------------------------------------------------

    def load(self) -> State | None:
        """The state, or None when there is no state file yet."""
        text = self._read()
        return None if text is None else self._parse(text)

    def save(self, state: State, expected_serial: int | None) -> None:
        stored = self._stored_version()
        if stored != (None if expected_serial is None else (state.lineage, expected_serial)):
            now = "gone" if stored is None else f"at serial {stored[1]}"
            raise StateConflict(f"{self.path}: another process changed the state while this command ran (it is now "
                                f"{now}, this command loaded serial {expected_serial}); nothing was written. "
                                "Run the command again")
        try:
            atomic_write(self.path, state.to_json())
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write the state file: {exc}") from exc

    def backup(self) -> None:
        try:
            if self.path.exists():  # replaced atomically too: a kill leaves an old backup, never half of one
                atomic_write(self.backup_path, self.path.read_bytes())
        except OSError as exc:
            raise StateError(f"{self.backup_path}: cannot write the backup of the state: {exc}") from exc

    def _read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc

    def _stored_version(self) -> tuple[str, int] | None:
        """(lineage, serial) of the state stored now, read without building the whole model."""
        text = self._read()
        if text is None:
            return None
        try:
            data = orjson.loads(text)
            return data["lineage"], data["serial"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            state = self._parse(text)  # raises what exactly is wrong with it, if anything
            return state.lineage, state.serial

    def _parse(self, text: str) -> State:
        fix = (f"restore it from {self.backup_path.name} or from version control; batchplan will not "
               "overwrite it and sent nothing to the server")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{self.path}: not valid JSON ({exc}); {fix}") from exc
        except RecursionError:  # arrays in arrays, thousands deep: no state is shaped like that
            raise StateError(f"{self.path}: nested too deeply to be a batchplan state; {fix}") from None
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
        refusal = format_refusal(version, FORMAT_VERSION, "state", newer_fix=UPGRADE, wrong_fix=fix)
        if refusal:
            raise StateError(f"{self.path}: {refusal}")
        try:
            return State.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "top level"
            raise StateError(f"{self.path}: {where}: {first['msg'].removeprefix('Value error, ')}; {fix}") from exc
