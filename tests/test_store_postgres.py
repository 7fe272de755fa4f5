"""The PostgreSQL state store against a real server (tests/conftest_pg.py): compare-and-swap,
advisory locks that die with their session, workspaces, schema, backups, and messages that
never show the password."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from reconciler.errors import LockError, Notice, StateError
from reconciler.state import Entry, State
from reconciler.stores import postgres
from reconciler.stores.base import LockInfo, StateConflict
from reconciler.stores.postgres import PostgresStore

CHECKOUT = Path(__file__).resolve().parent.parent
HOLDER = LockInfo(id="lock-1", who="ci", host="runner-3", pid=4711, command="batchplan apply",
                  since="2026-11-27T12:04:11Z")


def make_state(entries: int = 3, serial: int = 1) -> State:
    state = State(serial=serial)
    for n in range(entries):
        state.entries[f"spec-{n:04d}"] = Entry(spec_hash=f"sha256:{n:064x}", fields={"endpoint": "/v1/embeddings", "completion_window": "24h"})
    return state


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


# -- schema and round trip ----------------------------------------------------------------------

def test_schema_is_created_on_first_use_with_a_version_row_and_no_state_loads_as_none(pg_store, pg_url):
    assert query(pg_url, "SELECT to_regclass('batchplan.state')") == [(None,)]
    assert pg_store().load() is None
    assert query(pg_url, "SELECT version FROM batchplan.schema_version") == [(postgres.SCHEMA_VERSION,)]
    tables = query(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'batchplan' ORDER BY 1")
    assert tables == [("backup",), ("history",), ("lock",), ("schema_version",), ("state",)]
    compression = query(pg_url, "SELECT c.relname, a.attcompression FROM pg_attribute a JOIN pg_class c ON "
                                "c.oid = a.attrelid WHERE c.relnamespace = 'batchplan'::regnamespace AND "
                                "a.attname = 'document' ORDER BY 1")
    assert compression == [("backup", "l"), ("history", "l"), ("state", "l")]  # lz4: this server has it


def test_two_first_uses_at_once_create_the_schema_once(pg_store, pg_url):
    stores, errors = [pg_store() for _ in range(4)], []
    start = threading.Barrier(len(stores))

    def first_use(store: PostgresStore) -> None:
        start.wait()
        try:
            store.load()
        except StateError as exc:  # pragma: no cover - the failure this test is about
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert query(pg_url, "SELECT count(*) FROM batchplan.schema_version") == [(1,)]


def test_a_schema_from_a_newer_batchplan_is_refused(pg_store, pg_url):
    pg_store().load()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO batchplan.schema_version (version) VALUES (99)")
    store = pg_store()
    with pytest.raises(StateError) as caught:
        store.load()
    assert str(caught.value) == (
        f"{store.location}: the database holds batchplan schema version 99, this batchplan knows up to "
        f"{postgres.SCHEMA_VERSION}; upgrade batchplan to use this state")


def test_save_then_load_round_trips_the_state_with_lineage_and_serial(pg_store, pg_url):
    state = make_state(entries=5, serial=1)
    pg_store().save(state, None)
    loaded = pg_store().load()
    assert loaded == state and loaded.to_json() == state.to_json()
    assert query(pg_url, "SELECT workspace, lineage, serial, jsonb_typeof(document) FROM batchplan.state") == [
        ("default", state.lineage, 1, "object")]


def test_a_stored_state_that_does_not_validate_is_reported_not_loaded(pg_store, pg_url):
    store = pg_store()
    store.save(make_state(), None)
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE batchplan.state SET document = jsonb_set(document, '{serial}', '\"x\"')")
    with pytest.raises(StateError, match=r"the state: serial: Input should be a valid integer"):
        store.load()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE batchplan.state SET document = jsonb_set(document, '{format_version}', '7')")
    with pytest.raises(StateError, match=r"written by a newer batchplan \(state format 7, this one reads 1\)"):
        store.load()


# -- compare-and-swap ---------------------------------------------------------------------------

def test_a_save_with_a_stale_serial_raises_state_conflict_and_keeps_the_first_writers_state(pg_store):
    first, second = pg_store(), pg_store()
    first.save(make_state(serial=1), None)
    stale = second.load()
    mine = first.load()
    mine.entries.pop("spec-0000")
    mine.serial = 2
    first.save(mine, 1)

    stale.entries.clear()
    stale.serial = 2
    with pytest.raises(StateConflict) as caught:
        second.save(stale, 1)
    assert str(caught.value) == (
        f"{second.location}: the stored state is at serial 2 (lineage {mine.lineage}), not serial 1: another "
        "writer saved it meanwhile. Nothing was written; run the command again to start from the stored state")
    assert second.load() == mine


def test_two_first_saves_conflict_and_the_first_state_stays(pg_store):
    first, second = pg_store(), pg_store()
    kept = make_state()
    first.save(kept, None)
    with pytest.raises(StateConflict, match=r"the stored state is at serial 1 \(lineage .*\), not no state yet"):
        second.save(make_state(), None)
    assert second.load() == kept


def test_backup_keeps_the_previous_version_and_history_keeps_every_saved_one(pg_store, pg_url):
    store = pg_store()
    assert store.load_backup() is None
    before = make_state(serial=1)
    store.save(before, None)
    store.backup()
    after = make_state(entries=1, serial=2)
    after.lineage = before.lineage
    store.save(after, 1)
    assert store.load_backup() == before
    assert store.load() == after
    assert query(pg_url, "SELECT serial FROM batchplan.history ORDER BY id") == [(1,), (2,)]


def test_history_keeps_the_newest_versions_only(pg_store, pg_url):
    store = pg_store()
    state = make_state(entries=0, serial=1)
    store.save(state, None)
    for serial in range(2, postgres.HISTORY_KEEP + 6):
        state.serial = serial
        store.save(state, serial - 1)
    kept = query(pg_url, "SELECT min(serial), max(serial), count(*) FROM batchplan.history")
    assert kept == [(6, postgres.HISTORY_KEEP + 5, postgres.HISTORY_KEEP)]


def test_a_transaction_locks_loads_saves_and_backs_up_once_per_run(pg_store):
    store = pg_store()
    with store.transaction("batchplan apply") as txn:
        txn.state.entries["a"] = Entry(spec_hash="h1", fields={"endpoint": "/v1/chat/completions", "completion_window": "24h"})
    with store.transaction("batchplan apply") as txn:
        txn.state.entries["b"] = Entry(spec_hash="h2", fields={"endpoint": "/v1/chat/completions", "completion_window": "24h"})
        txn.save()
        txn.state.entries["c"] = Entry(spec_hash="h3", fields={"endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert sorted(store.load().entries) == ["a", "b", "c"]
    assert store.load().serial == 3
    assert sorted(store.load_backup().entries) == ["a"]  # the state before the second run, not its checkpoint
    assert store.holder() is None


# -- locks --------------------------------------------------------------------------------------

def test_a_held_lock_blocks_another_store_with_a_message_naming_the_holder(pg_store):
    holder, other = pg_store(), pg_store()
    holder.lock(HOLDER, 0)
    with pytest.raises(LockError) as caught:
        other.lock(LockInfo.new("batchplan apply"), 0)
    assert str(caught.value) == (
        f"the state {other.location} is locked by pid 4711 of ci@runner-3 (batchplan apply) since "
        "2026-11-27T12:04:11Z. Wait for it to finish, retry with --lock-timeout SECONDS to wait, or, if that "
        "process is gone but its database session lingers (a lost machine), run `batchplan force-unlock --force "
        "lock-1`")
    assert other.holder() == HOLDER and other.holder_alive(HOLDER)


def test_lock_timeout_waits_for_the_holder_to_finish(pg_store):
    holder, other = pg_store(), pg_store()
    holder.lock(HOLDER, 0)
    started = time.monotonic()
    with pytest.raises(LockError, match=r"after waiting 0.5s"):
        other.lock(LockInfo.new("batchplan apply"), 0.5)
    assert 0.5 <= time.monotonic() - started < 4.0
    threading.Timer(0.3, holder.unlock).start()
    other.lock(LockInfo.new("batchplan apply"), 5.0)
    assert other.holder().command == "batchplan apply" and other.holder().id != HOLDER.id


def test_a_sigkilled_holder_releases_the_lock_at_once(pg_store, pg_url):
    script = ("import sys, time\n"
              "from reconciler.stores.base import LockInfo\n"
              "from reconciler.stores.postgres import PostgresStore\n"
              "info = LockInfo.new('batchplan apply')\n"
              "store = PostgresStore(sys.argv[1])  # kept: its connection holds the lock\n"
              "store.lock(info, 0)\n"
              "print(info.id, flush=True)\n"
              "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    child = subprocess.Popen([sys.executable, "-c", script, pg_url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lock_id = child.stdout.readline().strip()
        other = pg_store()
        with pytest.raises(LockError, match=rf"by pid {child.pid} of .* \(batchplan apply\)"):
            other.lock(LockInfo.new("batchplan apply"), 0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    started = time.monotonic()
    other.lock(LockInfo.new("batchplan apply"), 10.0)  # no force-unlock: the server dropped the lock
    assert time.monotonic() - started < 5.0  # at once, not after waiting out the 10 s
    assert other.holder().id != lock_id


def test_the_note_of_a_killed_holder_is_stale_and_force_unlock_removes_it(pg_store, pg_url):
    holder = pg_store()
    holder.lock(HOLDER, 0)
    holder._conn.close()  # the session ends as when the process dies; the note stays
    other = pg_store()
    assert other.holder() == HOLDER
    assert not other.holder_alive(HOLDER)
    assert other.force_unlock("lock-1") == HOLDER
    assert other.holder() is None
    with pytest.raises(LockError, match="the state is not locked, so there is no lock lock-1 to remove"):
        other.force_unlock("lock-1")


def test_force_unlock_refuses_a_wrong_id_and_a_live_holder(pg_store):
    holder, other = pg_store(), pg_store()
    holder.lock(HOLDER, 0)
    with pytest.raises(LockError) as wrong:
        other.force_unlock("lock-2")
    assert str(wrong.value) == f"{other.location}: the state lock has id lock-1, not lock-2; nothing was changed"
    with pytest.raises(LockError) as live:
        other.force_unlock("lock-1")
    assert str(live.value) == (
        f"{other.location}: the state lock is held by pid 4711 of ci@runner-3 (batchplan apply) since "
        "2026-11-27T12:04:11Z, whose database session is alive: it is not stale, and a PostgreSQL lock cannot "
        "be taken over. Wait for it to finish, stop that process, or run `batchplan force-unlock --force lock-1` to end "
        "its database session; nothing was changed")
    assert other.holder() == HOLDER and other.holder_alive(HOLDER)


def test_force_unlock_with_terminate_ends_the_holders_session_and_its_next_save_fails(pg_store):
    holder, other = pg_store(), pg_store()
    holder.save(make_state(), None)
    holder.lock(HOLDER, 0)
    with pytest.warns(Notice, match="pid 4711 of ci@runner-3 .* still holds the lock on .*; --force ends its "
                      "database session"):
        assert other.force_unlock("lock-1", force=True) == HOLDER
    other.lock(LockInfo.new("batchplan apply"), 0)
    with pytest.raises(StateError) as caught:
        holder.save(make_state(serial=2), 1)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{holder.location}: cannot save the state")
    holder.close()  # nothing left to release: no error
    assert other.load().serial == 1


def test_workspaces_are_independent(pg_store):
    dev, prod, dev_again = pg_store("dev"), pg_store("prod"), pg_store("dev")
    dev.lock(HOLDER, 0)
    prod.lock(LockInfo.new("batchplan apply"), 0)
    with pytest.raises(LockError):
        dev_again.lock(LockInfo.new("batchplan apply"), 0)
    dev.save(make_state(entries=1), None)
    prod.save(make_state(entries=2), None)
    assert len(dev_again.load().entries) == 1 and len(pg_store("prod").load().entries) == 2
    assert pg_store("staging").load() is None
    assert prod.holder().id != dev.holder().id


# -- configuration and messages -----------------------------------------------------------------

def test_an_unreachable_database_is_one_line_with_the_password_masked():
    port = closed_port()
    store = PostgresStore(f"postgresql://alice:s3cret-pw@127.0.0.1:{port}/batchplan", workspace="prod")
    assert store.location == f"postgresql://alice:***@127.0.0.1:{port}/batchplan (workspace prod)"
    with pytest.raises(StateError) as caught:
        store.load()
    message = str(caught.value)
    assert message.startswith(f"{store.location}: cannot connect to the state database: connection failed: ")
    assert message.endswith("Connection refused Is the server running on that host and accepting TCP/IP "
                            "connections?; check the URL, that the server is running, and the password "
                            "(PGPASSWORD or ~/.pgpass)")
    assert "\n" not in message and "s3cret" not in message


@pytest.mark.parametrize("secret_part", [":p%40ss-s3cret@", "@", ":pw-s3cret@"])
def test_a_missing_database_is_one_line_and_no_message_shows_the_password(pg_url, secret_part):
    url = pg_url.replace("@", secret_part, 1).replace("/batchplan_test_", "/missing_", 1)
    if "@" == secret_part:
        url += "?password=q-s3cret"
    store = PostgresStore(url)
    with pytest.raises(StateError) as caught:
        store.lock(LockInfo.new("batchplan apply"), 0)
    for text in (str(caught.value), store.location):
        assert "s3cret" not in text and "p@ss" not in text and "\n" not in text
    assert 'does not exist' in str(caught.value)


@pytest.mark.parametrize(("url", "workspace", "message"), [
    ("mysql://bob:s3cret@db/x", "default", "mysql://bob:***@db/x: not a PostgreSQL URL; write "
     "postgresql://USER@HOST:PORT/DATABASE and give the password in PGPASSWORD or ~/.pgpass"),
    ("host=db password=s3cret", "default", "the state location: not a PostgreSQL URL; write "
     "postgresql://USER@HOST:PORT/DATABASE and give the password in PGPASSWORD or ~/.pgpass"),
    ("postgresql://bob@db/x", "", "workspace '': use 1 to 64 letters, digits, '.', '_' or '-', starting "
     "with a letter or digit"),
    ("postgresql://bob@db/x", "prod env", "workspace 'prod env': use 1 to 64 letters, digits, '.', '_' or '-', "
     "starting with a letter or digit"),
])
def test_a_bad_url_or_workspace_is_refused_before_connecting(url, workspace, message):
    with pytest.raises(StateError) as caught:
        PostgresStore(url, workspace=workspace)
    assert str(caught.value) == message


def test_the_file_store_commands_never_import_psycopg():
    code = "import sys, reconciler.stores.postgres, reconciler.stores.base; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(CHECKOUT)}).stdout
    assert out == "False\n"


def test_both_stores_word_a_held_lock_the_same_way_but_for_their_own_way_out(pg_store, tmp_path):
    from reconciler.stores.file import FileStore

    messages = []
    for holder, other in [(pg_store(), pg_store()), (FileStore(tmp_path / "s.json"), FileStore(tmp_path / "s.json"))]:
        holder.lock(HOLDER, 0)
        with pytest.raises(LockError) as caught:
            other.lock(LockInfo.new("batchplan apply"), 0)
        messages.append(str(caught.value).replace(other.location, "LOCATION").partition(" or, ")[0])
        holder.unlock()
    assert messages[0] == messages[1]
