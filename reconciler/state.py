"""The state file: which batch batchplan made for each spec name, and the lock around it.

State is precious. It is written atomically (temp file, fsync, rename) with the
previous version kept as `<file>.backup`; it is never overwritten when it could not be
read; and one process at a time holds its lock. A lock left by a killed process is
released by the operating system (flock), so it never blocks forever.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import filelock
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import LockError, StateError

FORMAT_VERSION = 1
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
RUNNING = frozenset({"validating", "in_progress", "finalizing"})


class BatchRecord(BaseModel):
    """What we last knew of a batch on the server (refreshed by plan, apply, refresh)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    status: str
    created_at: int
    input_file_id: str
    request_counts: dict[str, int] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None

    @classmethod
    def from_api(cls, batch: dict) -> BatchRecord:
        errors = (batch.get("errors") or {}).get("data") or None
        return cls(
            id=batch["id"], status=batch["status"], created_at=batch["created_at"],
            input_file_id=batch["input_file_id"], request_counts=batch.get("request_counts"),
            output_file_id=batch.get("output_file_id"), error_file_id=batch.get("error_file_id"),
            errors=errors,
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Intent(BaseModel):
    """A create about to be sent: recorded first, so a lost answer can be found by its tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec_hash: str
    fields: dict
    tags: dict[str, str]
    at: int


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    spec_hash: str
    status: str
    replaced_at: int


class Entry(BaseModel):
    """One spec name: the batch made for it, from which fields, and what came before."""

    model_config = ConfigDict(extra="forbid")

    spec_hash: str
    fields: dict
    batch: BatchRecord | None = None
    intent: Intent | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    prevent_cancel: bool = False


class Upload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file_id: str
    bytes: int


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    lineage: str = Field(default_factory=lambda: str(uuid.uuid4()))
    serial: int = 0
    created_at: int = Field(default_factory=lambda: int(time.time()))
    scan_floor: int | None = None
    uploads: dict[str, Upload] = Field(default_factory=dict)
    entries: dict[str, Entry] = Field(default_factory=dict)

    def record_batches(self, records: dict[str, BatchRecord]) -> list[str]:
        """Copy newer records of the batches the entries name (same id only); the names that changed."""
        changed = []
        for name, fresh in records.items():
            entry = self.entries.get(name)
            if entry and entry.batch and entry.batch.id == fresh.id and entry.batch != fresh:
                entry.batch = fresh
                changed.append(name)
        return changed

    def to_json(self) -> str:
        # orjson: sorted and indented as json.dumps did (non-ASCII as UTF-8, not \u escapes), ~5x faster
        text = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        return text.decode() + "\n"


class StateFile:
    """Reads and writes one state file; never writes over one it could not read."""

    def __init__(self, path: Path):
        self.path = path
        self.backup = path.with_name(path.name + ".backup")

    def load(self) -> State | None:
        """The state, or None when there is no state file yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.path}: cannot read the state file: {exc}") from exc
        return self.parse(text)

    def parse(self, text: str) -> State:
        fix = (f"restore it from {self.backup.name} or from version control; batchplan will not "
               "overwrite it and sent nothing to the server")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{self.path}: not valid JSON ({exc}); {fix}") from exc
        version = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise StateError(f"{self.path}: written by a newer batchplan (state format {version}, this one "
                             f"reads {FORMAT_VERSION}); upgrade batchplan to use this state")
        try:
            return State.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "top level"
            raise StateError(f"{self.path}: {where}: {first['msg']}; {fix}") from exc

    def save(self, state: State) -> None:
        """Atomically replace the state file (serial + 1), keeping the previous one as backup."""
        state.serial += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        backup_tmp = self.backup.with_name(f".{self.backup.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                fh.write(state.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            if self.path.exists():  # the backup is replaced atomically too: a kill leaves an old one, not half
                shutil.copy2(self.path, backup_tmp)
                os.replace(backup_tmp, self.backup)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            state.serial -= 1
            tmp.unlink(missing_ok=True)
            backup_tmp.unlink(missing_ok=True)
            raise StateError(f"{self.path}: cannot write the state file: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StateLock:
    """One process at a time per state file: an OS file lock plus a note of who holds it.

    The lock itself is flock on `<state>.lock`, which the kernel drops when its holder
    dies; `<state>.lock.info` (JSON) says who holds it, for the message a loser prints.
    """

    def __init__(self, state_path: Path, command: str, timeout: float = 0.0):
        self.lock_path = state_path.with_name(state_path.name + ".lock")
        self.info_path = state_path.with_name(state_path.name + ".lock.info")
        self.command = command
        self.timeout = timeout
        self._lock = filelock.FileLock(str(self.lock_path), timeout=timeout)

    def info(self) -> dict:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> StateLock:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise LockError(self._held_message()) from None
        note = {"id": str(uuid.uuid4()), "pid": os.getpid(), "host": socket.gethostname(),
                "command": self.command, "since": _now_iso()}
        tmp = self.info_path.with_name(f".{self.info_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(note, sort_keys=True))
        os.replace(tmp, self.info_path)  # atomic: a loser reading it never sees half a note
        return self

    def __exit__(self, *exc: object) -> None:
        self.info_path.unlink(missing_ok=True)
        self._lock.release()

    def _held_message(self) -> str:
        held = self.info()
        who = (f"by pid {held.get('pid')} on {held.get('host')} ({held.get('command')}) "
               f"since {held.get('since')}") if held else "by another process"
        waited = f" after waiting {self.timeout:g}s" if self.timeout else ""
        unlock = " ".join(filter(None, ["batchplan force-unlock", held.get("id")]))
        return (f"the state {self.lock_path.with_suffix('')} is locked {who}{waited}. Wait for it to finish, "
                f"retry with --lock-timeout SECONDS to wait, or, if that process is gone, run `{unlock}`")


def force_unlock(state_path: Path, lock_id: str | None) -> dict:
    """Break a lock by removing its files; returns the holder note that was removed."""
    lock = StateLock(state_path, "force-unlock")
    held = lock.info()
    if lock_id and held and held.get("id") != lock_id:
        raise LockError(f"the lock on {state_path} has id {held.get('id')}, not {lock_id}; nothing was changed")
    lock.info_path.unlink(missing_ok=True)
    lock.lock_path.unlink(missing_ok=True)
    return held


def command_line() -> str:
    return " ".join(["batchplan", *sys.argv[1:]])[:200]
