"""Moving a state from one store to another (`batchplan state migrate`), e.g. a state file into
PostgreSQL and back.

The copy keeps the lineage and the serial, so it is the same state in a new place: a plan
saved against the source still matches. Both stores are locked for the copy, so nobody
writes either meanwhile. A target that already holds a state is never overwritten unless
forced; then its version is kept as the target's backup first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StateError
from .base import LockInfo, StateStore

if TYPE_CHECKING:
    from ..state import State

MIGRATE_COMMAND = "batchplan state migrate"


def migrate(source_store: StateStore, target_store: StateStore, force: bool = False,
            lock_timeout: float = 0.0) -> State:
    """Copy the source's state into the target, lineage and serial kept; the state copied."""
    if source_store.location == target_store.location:
        raise StateError(f"{source_store.location}: the source and the target of the migration are the same store")
    source_store.lock(LockInfo.new(MIGRATE_COMMAND), lock_timeout)
    try:
        target_store.lock(LockInfo.new(MIGRATE_COMMAND), lock_timeout)
        try:
            return _copy(source_store, target_store, force)
        finally:
            target_store.unlock()
    finally:
        source_store.unlock()


def _copy(source_store: StateStore, target_store: StateStore, force: bool) -> State:
    state = source_store.load()
    if state is None:
        raise StateError(f"{source_store.location}: holds no state; nothing to migrate")
    existing = target_store.load()
    if existing is not None:
        if not force:
            raise StateError(f"{target_store.location}: already holds a state (lineage {existing.lineage}, serial "
                             f"{existing.serial}); nothing was copied. Force the migration to replace it (its "
                             "version is kept as the target's backup)")
        target_store.backup()
    target_store.save(state, existing.serial if existing is not None else None)
    return state
