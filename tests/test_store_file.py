"""The file store: compare-and-swap saves, the backup of the state before a run, the lock and its note."""

from __future__ import annotations

import json

import pytest

from reconciler.errors import LockError, StateError
from reconciler.state import Entry, State
from reconciler.stores.base import LockInfo, StateConflict
from reconciler.stores.file import FileStore


def an_entry(spec_hash: str = "h1") -> Entry:
    return Entry(spec_hash=spec_hash, fields={"endpoint": "/v1/chat/completions", "completion_window": "24h",
                                              "metadata": {}, "output_expires_after": None, "input": None,
                                              "input_sha256": None, "input_file_id": "file-1"})


def saved_state(store: FileStore) -> State:
    with store.transaction("test") as txn:
        txn.state.entries["a"] = an_entry()
    return store.load()


def test_a_save_with_a_stale_serial_raises_state_conflict_and_leaves_the_file_untouched(tmp_path):
    store = FileStore(tmp_path / "s.json")
    state = saved_state(store)
    assert state.serial == 1
    other = store.load()
    other.entries["b"] = an_entry("h2")
    other.serial = 2
    store.save(other, expected_serial=1)  # another writer moved the serial on
    before = store.path.read_bytes()

    state.entries["c"] = an_entry("h3")
    state.serial = 2
    with pytest.raises(StateConflict, match="another process changed the state") as caught:
        store.save(state, expected_serial=1)
    assert "nothing was written" in str(caught.value)
    assert store.path.read_bytes() == before
    with pytest.raises(StateConflict):
        store.save(state, expected_serial=None)  # "nothing stored yet" is stale too
    assert store.path.read_bytes() == before


def test_a_save_into_another_lineage_is_a_conflict(tmp_path):
    store = FileStore(tmp_path / "s.json")
    state = saved_state(store)
    stranger = State(serial=state.serial + 1)
    with pytest.raises(StateConflict):
        store.save(stranger, expected_serial=state.serial)


def test_the_backup_holds_the_state_before_the_run_after_several_saves(tmp_path):
    store = FileStore(tmp_path / "s.json")
    saved_state(store)
    before = store.path.read_bytes()
    with store.transaction("apply") as txn:
        for name in ("b", "c", "d"):  # apply saves as work completes
            txn.state.entries[name] = an_entry(name)
            assert txn.save()
        assert not txn.save()  # nothing changed since: nothing written
    assert store.backup_path.read_bytes() == before
    assert store.load().serial == json.loads(before)["serial"] + 3
    assert sorted(store.load().entries) == ["a", "b", "c", "d"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unchanged_transaction_writes_nothing_not_even_a_new_state(tmp_path):
    store = FileStore(tmp_path / "s.json")
    with store.transaction("refresh") as txn:
        assert not txn.existed
    assert not store.path.exists() and not store.backup_path.exists()


def test_an_unreadable_state_is_never_overwritten(tmp_path):
    store = FileStore(tmp_path / "s.json")
    store.path.write_text("{")
    with pytest.raises(StateError, match="not valid JSON"):
        with store.transaction("apply"):
            pass
    assert store.path.read_text() == "{"
    with pytest.raises(StateError, match="not valid JSON"):
        store.save(State(), expected_serial=None)
    assert store.path.read_text() == "{"


def test_a_held_lock_names_its_holder_and_force_unlock_refuses_while_it_lives(tmp_path):
    holder, other = FileStore(tmp_path / "s.json"), FileStore(tmp_path / "s.json")
    info = LockInfo.new("batchplan apply --auto-approve")
    holder.lock(info, 0)
    try:
        with pytest.raises(LockError) as caught:
            other.lock(LockInfo.new("batchplan refresh"), 0)
        message = str(caught.value)
        assert f"is locked by pid {info.pid} of {info.who}@{info.host} (batchplan apply --auto-approve)" in message
        assert "force-unlock" not in message and "stop it: its lock is released the moment it exits" in message
        assert other.holder() == info and other.holder_alive(info)
        with pytest.raises(LockError, match="still running; nothing was changed"):
            other.force_unlock(info.id)
        with pytest.raises(LockError, match=f"has id {info.id}, not nope"):
            other.force_unlock("nope")
    finally:
        holder.unlock()
    assert other.holder() is None and not other.info_path.exists()
    other.lock(LockInfo.new("batchplan refresh"), 0)
    other.unlock()
