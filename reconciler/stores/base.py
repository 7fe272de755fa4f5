"""The state store seam: where the state lives, and how one writer at a time changes it.

    StateStore (abstract)   lock · unlock · holder · holder_alive · load · save (compare-and-swap) · backup ·
                            force_unlock
     ├── FileStore          stores/file.py: a JSON file, an OS file lock, `<file>.backup`
     └── PostgresStore      stores/postgres.py: a jsonb row per workspace, advisory locks

Every command that changes the state does it through `transaction()`:

    with store.transaction("batchplan apply", lock_timeout) as txn:
        ...change txn.state...
        txn.save()          # a checkpoint (apply saves as work completes); optional

which takes the lock, loads, yields, and on the way out saves once more if anything
changed. Every save is a compare-and-swap on the serial: a store whose serial moved on
under us (another writer that did not hold our lock) raises StateConflict, and nothing
is overwritten. The version stored before the run is kept as the backup, once per run,
just before the first write, so the backup always holds the state as it was before
this command.

Read-only commands (plan, status) call `load()` without the lock.
"""

from __future__ import annotations

import getpass
import os
import socket
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LockError, Notice, StateError

if TYPE_CHECKING:
    from ..state import State


class StateConflict(StateError):
    """A save found another writer's serial (or lineage) in the store: nothing was written."""


@dataclass(frozen=True)
class LockInfo:
    """Who holds a state lock, for the message another process prints when it finds it taken."""

    id: str
    who: str
    host: str
    pid: int
    command: str
    since: str  # ISO 8601, UTC

    @classmethod
    def new(cls, command: str) -> LockInfo:
        try:
            who = getpass.getuser()
        except Exception:  # no user name in this environment (a container with a bare uid)
            who = str(os.getuid()) if hasattr(os, "getuid") else "?"
        return cls(id=str(uuid.uuid4()), who=who, host=socket.gethostname(), pid=os.getpid(),
                   command=command[:200], since=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @classmethod
    def from_dict(cls, data: dict) -> LockInfo:
        """A holder note as stored; missing fields become '?' (a note from an older batchplan)."""
        fields = {k: data.get(k) for k in cls.__dataclass_fields__}
        fields = {k: (v if v is not None else ("?" if k != "pid" else 0)) for k, v in fields.items()}
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """`pid 4711 of ci@runner-3 (batchplan apply) since 2026-11-27T12:04:11Z`"""
        return f"pid {self.pid} of {self.who}@{self.host} ({self.command}) since {self.since}"


def lock_error(location: str, holder: LockInfo | None, waited: float, way_out: str) -> LockError:
    """The one message for a lock another process holds: who, and the ways on.

    `way_out` is the store's own last resort, for a holder that will not finish: force-unlock only
    where it can help (a file lock dies with its holder anyway, so there it is "stop that process")."""
    who = f"by {holder.describe()}" if holder else "by another process"
    after = f" after waiting {waited:g}s" if waited else ""
    return LockError(f"the state {location} is locked {who}{after}. Wait for it to finish, retry with "
                     f"--lock-timeout SECONDS to wait, or, {way_out}")


def warn_forcing(holder: LockInfo, location: str, what: str) -> None:
    """Say, before it is done, whose live lock `force-unlock --force` breaks and what happens to it."""
    warnings.warn(Notice(f"{holder.describe()} still holds the lock on {location}; --force {what}"), stacklevel=2)


class StateStore(ABC):
    """Where one state lives. Implementations translate their own errors into StateError."""

    #: where the state is, for messages (any password masked)
    location: str
    #: where `backup()` keeps the state as it was before the last command that changed it, for messages
    backup_location: str = "the store's backup"

    @abstractmethod
    def lock(self, info: LockInfo, timeout: float) -> None:
        """Take the lock for this process, waiting up to `timeout` seconds; else raise LockError
        naming the holder. A holder that dies releases it (the OS or the database drops it)."""

    @abstractmethod
    def unlock(self) -> None:
        """Release the lock this process holds (a no-op when it holds none)."""

    @abstractmethod
    def holder(self) -> LockInfo | None:
        """Who holds the lock now, as far as the store can tell."""

    @abstractmethod
    def holder_alive(self, info: LockInfo) -> bool:
        """Whether the process named by `info` still holds the lock (force-unlock refuses then)."""

    @abstractmethod
    def load(self) -> State | None:
        """The stored state, or None when there is none yet. Raises StateError when it cannot be read;
        such a state is never overwritten."""

    @abstractmethod
    def save(self, state: State, expected_serial: int | None) -> None:
        """Store `state` if the stored serial is still `expected_serial` (None: nothing stored yet);
        else raise StateConflict and write nothing. The caller has already set `state.serial`."""

    @abstractmethod
    def backup(self) -> None:
        """Keep the version stored now as the backup (called once per run, before its first save)."""

    @abstractmethod
    def force_unlock(self, lock_id: str, *, force: bool = False) -> LockInfo:
        """Remove the lock whose holder note has `lock_id`; the removed note.

        Raises LockError (nothing changed) when there is no such note, or when its holder is
        still alive, unless `force`: then a Notice naming the holder comes first, and the store
        takes the lock from it as far as it can (see each store)."""

    def local_files(self) -> dict[Path, str]:
        """The files this store keeps on this machine, each with what it is ("the state file"):
        download never writes over them. None (empty) for a store kept elsewhere."""
        return {}

    def close(self) -> None:
        """Release connections and the lock (idempotent)."""
        self.unlock()

    @contextmanager
    def transaction(self, command: str, lock_timeout: float = 0.0) -> Iterator[Transaction]:
        """Lock, load, yield a Transaction, save if changed, unlock: see the module docstring."""
        self.lock(LockInfo.new(command), lock_timeout)
        try:
            txn = Transaction(self, self.load())
            try:
                yield txn
            finally:
                txn.save()  # whatever happened, keep what was done (a re-run converges from it)
        finally:
            self.unlock()


class Transaction:
    """The state of one locked command run. `existed` tells a new state from a stored one."""

    def __init__(self, store: StateStore, state: State | None):
        from ..state import State

        self.store = store
        self.existed = state is not None
        self.state: State = state if state is not None else State()
        self._stored_serial = state.serial if state is not None else None
        self._saved_json = self._body()  # a new state left empty is never written
        self._backed_up = state is None  # a new state has no earlier version to keep

    def _body(self) -> str:
        """The state as stored, serial aside: what decides whether a save is needed."""
        return self.state.model_copy(update={"serial": 0}).to_json()

    def save(self) -> bool:
        """Write the state if it changed since the last save (compare-and-swap); True if written."""
        body = self._body()
        if body == self._saved_json:
            return False
        if not self._backed_up:
            self.store.backup()
            self._backed_up = True
        previous = self._stored_serial
        self.state.serial = (previous or 0) + 1
        try:
            self.store.save(self.state, previous)
        except BaseException:
            self.state.serial = previous or 0
            raise
        self._stored_serial, self._saved_json, self.existed = self.state.serial, body, True
        return True
