"""`migrate(source, target, force)` between real stores: PostgreSQL workspaces, and a state file
into PostgreSQL and back."""

from __future__ import annotations

import pytest

from reconciler.errors import LockError, StateError
from reconciler.state import Entry, State
from reconciler.stores.base import LockInfo
from reconciler.stores.file import FileStore
from reconciler.stores.migrate import migrate


def stored_state(store, entries: int, serial: int) -> State:
    state = State(serial=serial)
    for n in range(entries):
        state.entries[f"spec-{n}"] = Entry(spec_hash=f"h{n}", fields={"endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"n": str(n)}})
    store.save(state, None)
    return state


def test_migrate_copies_the_state_with_its_lineage_and_serial_and_unlocks_both(pg_store):
    source, target = pg_store("dev"), pg_store("prod")
    original = stored_state(source, entries=3, serial=7)
    assert migrate(source, target) == original
    copied = pg_store("prod").load()
    assert copied == original and (copied.lineage, copied.serial) == (original.lineage, 7)
    assert source.load() == original
    assert source.holder() is None and target.holder() is None


def test_migrate_refuses_a_target_that_holds_a_state_unless_forced(pg_store):
    source, target = pg_store("dev"), pg_store("prod")
    original = stored_state(source, entries=3, serial=7)
    there = stored_state(target, entries=1, serial=2)
    with pytest.raises(StateError) as caught:
        migrate(source, target)
    assert str(caught.value) == (
        f"{target.location}: already holds a state (lineage {there.lineage}, serial 2); nothing was copied. "
        "Force the migration to replace it (its version is kept as the target's backup)")
    assert target.load() == there and target.holder() is None and source.holder() is None

    migrate(source, target, force=True)
    assert target.load() == original
    assert target.load_backup() == there


def test_migrate_of_an_empty_source_or_onto_itself_is_refused(pg_store):
    source, target = pg_store("dev"), pg_store("prod")
    with pytest.raises(StateError, match=r"\(workspace dev\): holds no state; nothing to migrate$"):
        migrate(source, target)
    with pytest.raises(StateError, match=r"the source and the target of the migration are the same store$"):
        migrate(source, pg_store("dev"))
    assert target.load() is None


def test_migrate_waits_for_no_one_and_writes_nothing_while_the_target_is_locked(pg_store):
    source, target, busy = pg_store("dev"), pg_store("prod"), pg_store("prod")
    stored_state(source, entries=1, serial=1)
    busy.lock(LockInfo.new("batchplan apply"), 0)
    with pytest.raises(LockError, match=r"the state .* is locked by .*batchplan apply"):
        migrate(source, target)
    assert target.load() is None
    assert source.holder() is None  # the source's lock was given back


def test_migrate_a_state_file_into_postgresql_and_back_keeps_it_byte_for_byte(pg_store, tmp_path):
    source, database, back = FileStore(tmp_path / "s.json"), pg_store("prod"), FileStore(tmp_path / "back.json")
    original = stored_state(source, entries=3, serial=4)
    written = source.path.read_bytes()
    assert migrate(source, database) == original
    assert pg_store("prod").load() == original
    assert migrate(database, back) == original
    assert back.path.read_bytes() == written  # lineage, serial and every field: the same file
    with pytest.raises(StateError, match=r"back.json: already holds a state \(lineage .*, serial 4\)"):
        migrate(database, back)
    assert not back.info_path.exists() and database.holder() is None
