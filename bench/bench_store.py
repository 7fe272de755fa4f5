"""Issue 14: the PostgreSQL state store against the state file, for a state of many specs.

    python bench/bench_store.py [--entries 1000] [--rounds 30] [--url postgresql://...]

One round trip is what a command does with the state: load it, then save it with one entry
changed (the PostgreSQL store: a compare-and-swap in one transaction that also keeps the
version in its history; the file: StateFile, written atomically with fsync and a backup
copy). Timings are the median of `--rounds` round trips in this process, the two backends
taking turns. The server is
`--url`, else BATCHPLAN_TEST_PG_URL, else a throwaway one started with `.ci/postgres`; the
bench works in a database of its own on it and drops it afterwards. The issue's target is
plan and apply of 1,000 specs within 1.3x of the file backend; the store's round trip is
the part of that which changes with the backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKOUT, cleanup, table, verdict, workdir  # noqa: E402

from reconciler.state import BatchRecord, Entry, HistoryItem, State, StateFile, Upload  # noqa: E402
from reconciler.stores.postgres import PostgresStore  # noqa: E402

TARGET = 1.3
CI_POSTGRES = CHECKOUT / ".ci" / "postgres"


def big_state(entries: int) -> State:
    """A state as an apply of `entries` specs leaves it: a batch, an upload and a history item each."""
    state = State(serial=1)
    for n in range(entries):
        name = f"spec-{n:05d}"
        state.uploads[f"data/{name}.jsonl"] = Upload(file_id=f"file-{uuid.uuid4().hex}", bytes=1000 + n)
        batch = BatchRecord(id=f"batch_{uuid.uuid4().hex}", status="completed", created_at=1_700_000_000 + n,
                            input_file_id=state.uploads[f"data/{name}.jsonl"].file_id,
                            request_counts={"total": 100, "completed": 100, "failed": 0},
                            output_file_id=f"file-{uuid.uuid4().hex}")
        state.entries[name] = Entry(
            spec_hash=f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}", batch=batch,
            fields={"endpoint": "/v1/chat/completions", "completion_window": "24h",
                    "input": f"data/{name}.jsonl", "metadata": {"team": "eval", "spec": name}},
            history=[HistoryItem(batch_id=f"batch_{uuid.uuid4().hex}", spec_hash="sha256:old", status="completed",
                                 replaced_at=1_690_000_000)])
    return state


class Backend:
    """One store under test: its load and save, and the milliseconds each took."""

    def __init__(self, name: str, load, save):
        self.name, self.load, self.save = name, load, save
        self.loads: list[float] = []
        self.saves: list[float] = []

    def round_trip(self, n: int) -> None:
        """Load, change one entry, save: what a command does with the state."""
        started = time.perf_counter()
        state = self.load()
        self.loads.append((time.perf_counter() - started) * 1000)
        state.entries["spec-00000"].fields["round"] = n
        started = time.perf_counter()
        self.save(state)
        self.saves.append((time.perf_counter() - started) * 1000)

    def row(self, baseline: float | None) -> list[object]:
        load, save = statistics.median(self.loads), statistics.median(self.saves)
        return [self.name, load, save, load + save, (load + save) / (baseline or load + save)]


def postgres_backend(store: PostgresStore, state: State) -> Backend:
    store.save(state, None)

    def save(loaded: State) -> None:
        expected, loaded.serial = loaded.serial, loaded.serial + 1
        store.save(loaded, expected)

    return Backend("PostgreSQL store", store.load, save)


def file_backend(path: Path, state: State) -> Backend:
    state_file = StateFile(path)
    state_file.save(state)
    return Backend("state file", state_file.load, state_file.save)


def bench_database(server_url: str):
    """A fresh database on the server for this run; yields its URL, drops it after."""
    import psycopg

    name = f"batchplan_bench_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def measure(server_url: str, root: Path, entries: int, rounds: int) -> list[list[object]]:
    """Round trips of both backends, interleaved so that the machine's other load hits both alike."""
    state = big_state(entries)
    database = bench_database(server_url)
    store = PostgresStore(next(database), workspace="bench")
    try:
        backends = [file_backend(root / "state.json", state.model_copy(deep=True)),
                    postgres_backend(store, state.model_copy(deep=True))]
        for n in range(rounds):
            for backend in backends:
                backend.round_trip(n)
    finally:
        store.close()
        database.close()
    file_row = backends[0].row(None)
    file_row[0] += f" ({entries} entries, {len(state.to_json()) / 1024:.0f} KiB)"
    return [file_row, backends[1].row(file_row[3])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--url", default=os.environ.get("BATCHPLAN_TEST_PG_URL"))
    args = parser.parse_args()
    root, server_dir = workdir("store"), workdir("store-pg")  # .ci/postgres hands server_dir to its own user
    try:
        server_url = args.url or subprocess.run([str(CI_POSTGRES), "start", str(server_dir)], stdout=subprocess.PIPE,
                                                text=True, check=True).stdout.strip()
        rows = measure(server_url, root, args.entries, args.rounds)
    finally:
        subprocess.run([str(CI_POSTGRES), "stop", str(server_dir)], capture_output=True)
        cleanup(root)
    print(table(["median of round trips", "load ms", "save ms", "round trip ms", "x file"], rows))
    ratio = rows[1][-1]
    print(f"\nTarget: a round trip within {TARGET}x of the state file: {verdict(ratio <= TARGET)} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
