"""The PostgreSQL state store: one state per workspace in a shared database.

    store = PostgresStore("postgresql://ci@db.internal:5432/batchplan", workspace="prod")

Tables, in the schema `batchplan`, created on first use and versioned in `schema_version`
(a batchplan that finds a newer schema refuses to touch it):

    state           one row per workspace: lineage, serial, the state document (jsonb)
    history         every saved version (newest HISTORY_KEEP per workspace are kept)
    backup          per workspace, the version kept by `backup()` (once per run)
    lock            per workspace, the note of who holds the lock and their backend pid

The lock is a session-level advisory lock (key: a 64-bit hash of the workspace) taken with
pg_try_advisory_lock on this store's own connection, which stays open until `close()`. The
server drops it the moment that session ends, so a killed process never leaves a lock
behind: the note in `lock` is then stale, and `holder_alive()` tells (the note's backend pid
no longer holds the advisory lock in pg_locks). `force_unlock()` removes a stale note; a
live holder cannot be taken over, so it refuses, unless called with `force=True`, which
ends the holder's database session (pg_terminate_backend) and so releases its lock. The
holder then fails at its next save, and everything it saved before stays.

Every save is a compare-and-swap on the serial in one database transaction (the row is
updated only `WHERE serial = expected`), so a writer whose serial is stale gets
StateConflict and nothing changes.

The password never leaves this module: `location` masks it, and every message is scrubbed
of it. libpq's own sources (PGPASSWORD, ~/.pgpass, PG* variables) work as usual. psycopg is
imported on first connection only, so commands on the file store never load it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import orjson
from pydantic import ValidationError

from ..errors import LockError, StateError
from .base import LockInfo, StateConflict, StateStore, lock_error, warn_forcing

if TYPE_CHECKING:
    import psycopg

    from ..state import State

SCHEMA_VERSION = 1
HISTORY_KEEP = 100  # saved versions kept per workspace (an apply saves every 0.5 s as work completes)
LOCK_POLL_SECONDS = 0.2
CONNECT_TIMEOUT_SECONDS = 10  # libpq waits forever by default for a host that drops packets
SCHEMA_LOCK_KEY = 0x62617463_68706C61  # "batchpla": serialises first-use schema creation
_WORKSPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Each version's statements, applied in order on first use; never edit a released one, add the next.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE SCHEMA IF NOT EXISTS batchplan",
        "CREATE TABLE batchplan.schema_version (version integer PRIMARY KEY, "
        "applied_at timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE batchplan.state (workspace text PRIMARY KEY, lineage text NOT NULL, "
        "serial bigint NOT NULL, document jsonb NOT NULL, saved_at timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE batchplan.history (id bigserial PRIMARY KEY, workspace text NOT NULL, "
        "lineage text NOT NULL, serial bigint NOT NULL, document jsonb NOT NULL, "
        "saved_at timestamptz NOT NULL DEFAULT now())",
        "CREATE INDEX history_workspace ON batchplan.history (workspace, id)",
        "CREATE TABLE batchplan.backup (workspace text PRIMARY KEY, lineage text NOT NULL, "
        "serial bigint NOT NULL, document jsonb NOT NULL, saved_at timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE batchplan.lock (workspace text PRIMARY KEY, lock_id text NOT NULL, who text, "
        "host text, pid integer, command text, since text, backend_pid integer NOT NULL)",
        # lz4 compresses a large state about twice as fast as the default pglz (PostgreSQL 14+,
        # when built with lz4); elsewhere the default stays
        "DO $$ BEGIN EXECUTE 'ALTER TABLE batchplan.state ALTER COLUMN document SET COMPRESSION lz4'; "
        "EXECUTE 'ALTER TABLE batchplan.history ALTER COLUMN document SET COMPRESSION lz4'; "
        "EXECUTE 'ALTER TABLE batchplan.backup ALTER COLUMN document SET COMPRESSION lz4'; "
        "EXCEPTION WHEN feature_not_supported OR syntax_error THEN NULL; END $$",
    ),
}

_SAVE_NEW = ("INSERT INTO batchplan.state (workspace, lineage, serial, document) "
             "VALUES (%s, %s, %s, %s::jsonb) ON CONFLICT (workspace) DO NOTHING")
_SAVE_OVER = ("UPDATE batchplan.state SET lineage = %s, serial = %s, document = %s::jsonb, saved_at = now() "
              "WHERE workspace = %s AND serial = %s")
_KEEP_IN_HISTORY = ("INSERT INTO batchplan.history (workspace, lineage, serial, document) "
                    "SELECT workspace, lineage, serial, document FROM batchplan.state WHERE workspace = %s")
_PRUNE_HISTORY = ("DELETE FROM batchplan.history WHERE workspace = %s AND id <= (SELECT id FROM batchplan.history "
                  "WHERE workspace = %s ORDER BY id DESC OFFSET %s LIMIT 1)")
_BACKUP = ("INSERT INTO batchplan.backup (workspace, lineage, serial, document) "
           "SELECT workspace, lineage, serial, document FROM batchplan.state WHERE workspace = %s "
           "ON CONFLICT (workspace) DO UPDATE SET lineage = excluded.lineage, serial = excluded.serial, "
           "document = excluded.document, saved_at = now()")
_WRITE_NOTE = ("INSERT INTO batchplan.lock (workspace, lock_id, who, host, pid, command, since, backend_pid) "
               "VALUES (%s, %s, %s, %s, %s, %s, %s, pg_backend_pid()) ON CONFLICT (workspace) DO UPDATE SET "
               "lock_id = excluded.lock_id, who = excluded.who, host = excluded.host, pid = excluded.pid, "
               "command = excluded.command, since = excluded.since, backend_pid = excluded.backend_pid")
_READ_NOTE = "SELECT lock_id, who, host, pid, command, since FROM batchplan.lock WHERE workspace = %s"
_NOTE_BACKEND = "SELECT backend_pid FROM batchplan.lock WHERE workspace = %s AND lock_id = %s"
_HOLDS_ADVISORY = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s "
                   "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1)")


def _psycopg() -> Any:
    """psycopg, imported on first use (the file store's commands never pay for it)."""
    try:
        import psycopg
    except ImportError as exc:
        raise StateError("the PostgreSQL state store needs psycopg: pip install 'psycopg[binary]>=3.1'") from exc
    return psycopg


def masked_url(url: str) -> str:
    """The URL with any password (in the user part or a `password=` parameter) shown as ***."""
    try:
        parts = urlsplit(url)
        userinfo, at, hosts = parts.netloc.rpartition("@")
    except ValueError:
        return "postgresql://(a URL that could not be parsed)"
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{':***' if colon else ''}{at}{hosts}"
    query = [(key, "***" if key == "password" else value) for key, value in parse_qsl(parts.query)]
    return parts._replace(netloc=netloc, query=urlencode(query, safe="*")).geturl()


def url_password(url: str) -> str | None:
    """The password written in the URL (user part or `password=` parameter), to scrub it from messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    in_query = dict(parse_qsl(parts.query)).get("password")
    return parts.password or in_query


def url_without_password(url: str) -> str:
    """The URL with any password left out: what to write in batchplan.yaml (the password goes in PGPASSWORD)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "password"]
    netloc = f"{userinfo.partition(':')[0]}{at}{hosts}"
    return parts._replace(netloc=netloc, query=urlencode(query)).geturl()


def workspace_problem(workspace: str) -> str | None:
    """What is wrong with a workspace name, or None when it is a good one."""
    if _WORKSPACE.fullmatch(workspace):
        return None
    return f"{workspace!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def lock_key(workspace: str) -> int:
    """The advisory lock key of a workspace: a signed 64-bit hash (per database, as locks are)."""
    digest = hashlib.sha256(f"batchplan state lock:{workspace}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines (a hint on its own line, tabs): one line for ours."""
    return " ".join(str(exc).split())


class PostgresStore(StateStore):
    """The state of one workspace in a PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str, workspace: str = "default"):
        if not url.startswith(("postgresql://", "postgres://")):
            shown = masked_url(url) if "://" in url else "the state location"  # `key=value` text may hold a password
            raise StateError(f"{shown}: not a PostgreSQL URL; write postgresql://USER@HOST:PORT/DATABASE "
                             "and give the password in PGPASSWORD or ~/.pgpass")
        if workspace_problem(workspace):
            raise StateError(f"workspace {workspace_problem(workspace)}")
        self._url = url  # private: it may hold the password; show `location`
        self.workspace = workspace
        self.location = f"{masked_url(url)} (workspace {workspace})"
        self.backup_location = f"the table batchplan.backup (workspace {workspace})"
        self._secret = url_password(url)
        self._key = lock_key(workspace)
        self._conn: psycopg.Connection | None = None
        self._held: LockInfo | None = None

    # -- the connection ---------------------------------------------------------------------------

    def _message(self, text: str) -> str:
        """`location: text`, on one line, with the password scrubbed even from libpq's words."""
        message = f"{self.location}: {text}"
        for secret in filter(None, {self._secret, quote(self._secret or "", safe=""), unquote(self._secret or "")}):
            message = message.replace(secret, "***")
        return message

    def _connection(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._held is not None:
            # reconnecting would silently run on without the lock this command took
            self._held = None
            raise StateError(self._message("lost the database connection that held the state lock (the server "
                                           "ended the session); nothing more was saved; run the command again"))
        self._conn = self._connect()
        return self._conn

    def _connect(self) -> psycopg.Connection:
        psycopg = _psycopg()
        try:
            given = psycopg.conninfo.conninfo_to_dict(self._url)
            defaults = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "application_name": "batchplan"}
            extra = {key: value for key, value in defaults.items() if key not in given}
            conn = psycopg.connect(self._url, autocommit=True, **extra)
        except psycopg.Error as exc:
            raise StateError(self._message(
                f"cannot connect to the state database: {_one_line(exc)}; check the URL, that the server is "
                "running, and the password (PGPASSWORD or ~/.pgpass)")) from exc
        try:
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _sql(self, doing: str, transaction: bool = False) -> Iterator[psycopg.Cursor]:
        """A cursor on this store's connection; database errors become one-line StateErrors."""
        psycopg = _psycopg()
        conn = self._connection()
        try:
            with conn.transaction() if transaction else nullcontext(), conn.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            raise StateError(self._message(f"cannot {doing}: {_one_line(exc)}")) from exc

    def _ensure_schema(self, conn: psycopg.Connection) -> None:
        """Create or upgrade the tables on first use; refuse a schema from a newer batchplan."""
        psycopg = _psycopg()
        try:
            if _schema_version(conn) == SCHEMA_VERSION:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))  # one creator at a time
                current = _schema_version(conn)
                if current > SCHEMA_VERSION:
                    raise StateError(self._message(
                        f"the database holds batchplan schema version {current}, this batchplan knows up to "
                        f"{SCHEMA_VERSION}; upgrade batchplan to use this state"))
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[version]:
                        conn.execute(statement)
                    conn.execute("INSERT INTO batchplan.schema_version (version) VALUES (%s)", (version,))
        except psycopg.Error as exc:
            raise StateError(self._message(
                f"cannot create the batchplan tables: {_one_line(exc)}; the database user needs the CREATE "
                "privilege on the database (or an existing schema `batchplan` it owns)")) from exc

    def close(self) -> None:
        """Release the lock and the connection (idempotent)."""
        try:
            self.unlock()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the lock ---------------------------------------------------------------------------------

    def lock(self, info: LockInfo, timeout: float) -> None:
        if self._held is not None:
            raise LockError(self._message(f"this process already holds the state lock (lock id {self._held.id})"))
        deadline = time.monotonic() + timeout
        while not self._try_lock():
            left = deadline - time.monotonic()
            if left <= 0:
                holder = self.holder()
                raise lock_error(self.location, holder, timeout, "if that process is gone but its database session "
                                 "lingers (a lost machine), run `batchplan force-unlock --force "
                                 f"{holder.id if holder else 'LOCK_ID'}`")
            time.sleep(min(LOCK_POLL_SECONDS, left))
        try:
            with self._sql("write the lock note") as cur:
                cur.execute(_WRITE_NOTE, (self.workspace, info.id, info.who, info.host, info.pid, info.command,
                                          info.since))
        except BaseException:
            self._release_advisory()
            raise
        self._held = info

    def _try_lock(self) -> bool:
        with self._sql("take the state lock") as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
            return cur.fetchone()[0]

    def _release_advisory(self) -> None:
        with self._sql("release the state lock") as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (self._key,))

    def unlock(self) -> None:
        if self._held is None:
            return
        held, self._held = self._held, None
        if self._conn is None or self._conn.closed:
            return  # the session is gone, and the server dropped its lock with it
        with self._sql("release the state lock") as cur:
            cur.execute("DELETE FROM batchplan.lock WHERE workspace = %s AND lock_id = %s", (self.workspace, held.id))
        self._release_advisory()

    def holder(self) -> LockInfo | None:
        """The lock note of this workspace, possibly stale (see holder_alive)."""
        with self._sql("read the lock note") as cur:
            cur.execute(_READ_NOTE, (self.workspace,))
            row = cur.fetchone()
        if row is None:
            return None
        names = ("id", "who", "host", "pid", "command", "since")
        return LockInfo.from_dict(dict(zip(names, row)))

    def holder_alive(self, info: LockInfo) -> bool:
        """Whether the database session that wrote `info` still holds this workspace's advisory lock."""
        unsigned = self._key & 0xFFFF_FFFF_FFFF_FFFF  # pg_locks shows a bigint key as two unsigned halves
        with self._sql("look up the lock holder") as cur:
            cur.execute(_NOTE_BACKEND, (self.workspace, info.id))
            row = cur.fetchone()
            if row is None:
                return False
            cur.execute(_HOLDS_ADVISORY, (row[0], unsigned >> 32, unsigned & 0xFFFF_FFFF))
            return cur.fetchone()[0]

    def force_unlock(self, lock_id: str, *, force: bool = False) -> LockInfo:
        """Remove the lock note `lock_id` whose session is gone; a live holder is refused, unless `force`
        ends its database session (which releases its lock), after a Notice. The removed note."""
        note = self.holder()
        if note is None:
            raise LockError(self._message(f"the state is not locked, so there is no lock {lock_id} to remove; "
                                          "nothing was changed"))
        if note.id != lock_id:
            raise LockError(self._message(f"the state lock has id {note.id}, not {lock_id}; nothing was changed"))
        if self.holder_alive(note):
            if not force:
                raise LockError(self._message(
                    f"the state lock is held by {note.describe()}, whose database session is alive: it is not "
                    "stale, and a PostgreSQL lock cannot be taken over. Wait for it to finish, stop that process, "
                    f"or run `batchplan force-unlock --force {lock_id}` to end its database session; nothing was "
                    "changed"))
            warn_forcing(note, self.location, "ends its database session: that process fails at its next save, "
                                              "and what it saved stays")
            self._terminate_holder(note)
        with self._sql("remove the lock note") as cur:
            cur.execute("DELETE FROM batchplan.lock WHERE workspace = %s AND lock_id = %s", (self.workspace, note.id))
        return note

    def _terminate_holder(self, note: LockInfo) -> None:
        with self._sql("end the lock holder's database session") as cur:
            cur.execute(_NOTE_BACKEND, (self.workspace, note.id))
            cur.execute("SELECT pg_terminate_backend(%s)", (cur.fetchone()[0],))
            ended = cur.fetchone()[0]
        deadline = time.monotonic() + 5.0
        while ended and self.holder_alive(note) and time.monotonic() < deadline:
            time.sleep(0.05)  # the backend exits asynchronously after the signal
        if not ended or self.holder_alive(note):
            raise LockError(self._message(f"could not end the database session of {note.describe()} (the database "
                                          "user needs to own it or be a member of pg_signal_backend)"))

    # -- the state --------------------------------------------------------------------------------

    def load(self) -> State | None:
        with self._sql("read the state") as cur:
            cur.execute("SELECT document::text FROM batchplan.state WHERE workspace = %s", (self.workspace,))
            row = cur.fetchone()
        return None if row is None else self._parse(row[0], "the state")

    def load_backup(self) -> State | None:
        """The version `backup()` kept last, or None."""
        with self._sql("read the backup") as cur:
            cur.execute("SELECT document::text FROM batchplan.backup WHERE workspace = %s", (self.workspace,))
            row = cur.fetchone()
        return None if row is None else self._parse(row[0], "the backup")

    def _parse(self, text: str, what: str) -> State:
        from ..state import FORMAT_VERSION, State

        try:
            state = State.model_validate_json(text)  # pydantic's own parser: faster than loads + validate
        except ValidationError as exc:
            data = orjson.loads(text)
            self._refuse_newer(data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION,
                               what)
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "top level"
            raise StateError(self._message(
                f"{what}: {where}: {first['msg']}; restore a good version from the tables batchplan.backup or "
                "batchplan.history; batchplan will not overwrite it and sent nothing to the server")) from exc
        self._refuse_newer(state.format_version, what)
        return state

    def _refuse_newer(self, version: object, what: str) -> None:
        from ..state import FORMAT_VERSION, UPGRADE, format_refusal

        refusal = format_refusal(version, FORMAT_VERSION, "state", newer_fix=UPGRADE, wrong_fix="restore a good "
                                 "version from the tables batchplan.backup or batchplan.history")
        if refusal:
            raise StateError(self._message(f"{what}: {refusal}"))

    def save(self, state: State, expected_serial: int | None) -> None:
        # compact and unsorted: jsonb keeps neither indentation nor key order, and parses less
        body = orjson.dumps(state.model_dump(mode="json")).decode()
        with self._sql("save the state", transaction=True) as cur:
            if expected_serial is None:
                cur.execute(_SAVE_NEW, (self.workspace, state.lineage, state.serial, body))
            else:
                cur.execute(_SAVE_OVER, (state.lineage, state.serial, body, self.workspace, expected_serial))
            if cur.rowcount != 1:
                raise StateConflict(self._conflict_message(cur, expected_serial))  # rolls the transaction back
            cur.execute(_KEEP_IN_HISTORY, (self.workspace,))
            cur.execute(_PRUNE_HISTORY, (self.workspace, self.workspace, HISTORY_KEEP))

    def _conflict_message(self, cur: psycopg.Cursor, expected_serial: int | None) -> str:
        cur.execute("SELECT serial, lineage FROM batchplan.state WHERE workspace = %s", (self.workspace,))
        row = cur.fetchone()
        found = f"serial {row[0]} (lineage {row[1]})" if row else "no state"
        expected = "no state yet" if expected_serial is None else f"serial {expected_serial}"
        return self._message(f"the stored state is at {found}, not {expected}: another writer saved it meanwhile. "
                             "Nothing was written; run the command again to start from the stored state")

    def backup(self) -> None:
        with self._sql("back up the state") as cur:
            cur.execute(_BACKUP, (self.workspace,))


def _schema_version(conn: psycopg.Connection) -> int:
    """The newest schema version applied to this database (0: none yet)."""
    # pg_tables, not to_regclass: a catalog cache could still miss a table another session just
    # created while we waited for the schema lock; a query sees what is committed
    exists = "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'batchplan' AND tablename = 'schema_version')"
    if not conn.execute(exists).fetchone()[0]:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM batchplan.schema_version").fetchone()[0]
