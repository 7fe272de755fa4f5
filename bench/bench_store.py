"""Issue 14: the PostgreSQL state store against the state file: whole commands, and the store alone.

    python bench/bench_store.py [--specs 1000] [--latency 0.03] [--unrelated 500] [--rounds 30]
                                [--url postgresql://...]

Commands: for each backend in turn, a fresh sandbox server (its own process, `--latency`
seconds per request, `--unrelated` batches someone else made) and a fresh repo of `--specs`
specs (bench_scale's repo): `batchplan apply --auto-approve` from an empty state, then
`batchplan plan --detailed-exitcode` with nothing to change (best of 3). The PostgreSQL runs
take their state from BATCHPLAN_STATE_URL, a workspace of their own; the caches stay in the
repo's state/ as with the file. The issue's target: each command on PostgreSQL within 1.3x
of the same command on the file backend, in the same run.

The store alone: one round trip is what a command does with the state: load it, then save
it with one entry changed (the PostgreSQL store: a compare-and-swap in one transaction that
also keeps the version in its history; the file: FileStore, written atomically with fsync).
Timings are the median of `--rounds` round trips in this process, the two backends taking
turns.

The server is `--url`, else BATCHPLAN_TEST_PG_URL, else a throwaway one started with
`.ci/postgres`; the bench works in a database of its own on it and drops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CHECKOUT, Server, batchplan, cleanup, run, table, verdict, workdir  # noqa: E402
from bench_scale import make_repo, seed_unrelated  # noqa: E402

from reconciler.state import BatchRecord, Entry, HistoryItem, State, Upload  # noqa: E402
from reconciler.stores.file import FileStore  # noqa: E402
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
        state.entries["spec-00000"].spec_hash = f"sha256:round-{n}"
        started = time.perf_counter()
        self.save(state)
        self.saves.append((time.perf_counter() - started) * 1000)

    def row(self, baseline: float | None) -> list[object]:
        load, save = statistics.median(self.loads), statistics.median(self.saves)
        return [self.name, load, save, load + save, (load + save) / (baseline or load + save)]


def store_backend(name: str, store, state: State) -> Backend:
    """A store's load, and its compare-and-swap save of the next serial."""
    store.save(state, None)

    def save(loaded: State) -> None:
        expected, loaded.serial = loaded.serial, loaded.serial + 1
        store.save(loaded, expected)

    return Backend(name, store.load, save)


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server for this run; its URL. Dropped after."""
    import psycopg

    name = f"batchplan_bench_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def measure_store(database_url: str, root: Path, entries: int, rounds: int) -> list[list[object]]:
    """Round trips of both stores, interleaved so that the machine's other load hits both alike."""
    state = big_state(entries)
    with closing(PostgresStore(database_url, workspace="bench")) as store:
        backends = [store_backend("state file", FileStore(root / "state.json"), state.model_copy(deep=True)),
                    store_backend("PostgreSQL store", store, state.model_copy(deep=True))]
        for n in range(rounds):
            for backend in backends:
                backend.round_trip(n)
    file_row = backends[0].row(None)
    file_row[0] += f" ({entries} entries, {len(state.to_json()) / 1024:.0f} KiB)"
    return [file_row, backends[1].row(file_row[3])]


def run_commands(backend: str, state_env: dict, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Apply from an empty state, then the best of 3 no-change plans, on a fresh server and repo."""
    repo = make_repo(root / backend, args.specs)
    with Server(latency=args.latency) as server:
        asyncio.run(seed_unrelated(server, args.unrelated))
        env = {**server.env(), **state_env}
        apply = run(batchplan("apply", "--auto-approve"), cwd=repo, env=env)
        plans = [run(batchplan("plan", "--detailed-exitcode"), cwd=repo, env=env) for _ in range(3)]
    state_file = repo / "state" / "batchplan.state.json"
    if state_file.exists() != (backend == "file"):
        raise SystemExit(f"{backend}: the state is not where this bench put it")
    return {"apply": apply.seconds, "plan": min(plan.seconds for plan in plans)}


def measure_commands(database_url: str, root: Path, args: argparse.Namespace) -> list[list[object]]:
    """Each command on the file backend, then on PostgreSQL; one row per command with the ratio."""
    file = run_commands("file", {"BATCHPLAN_STATE_URL": ""}, root, args)
    postgres = run_commands("postgresql", {"BATCHPLAN_STATE_URL": database_url, "BATCHPLAN_WORKSPACE": "commands"},
                            root, args)
    return [[f"batchplan {command} ({args.specs} specs)", file[command], postgres[command],
             postgres[command] / file[command]] for command in ("apply", "plan")]


def report(commands: list[list[object]], store: list[list[object]]) -> str:
    ratios = [row[-1] for row in commands]
    return "\n".join([
        table(["whole command", "file s", "PostgreSQL s", "x file"], commands), "",
        table(["the store alone, median of round trips", "load ms", "save ms", "round trip ms", "x file"], store), "",
        f"Target: apply and plan on PostgreSQL within {TARGET}x of the file backend: "
        f"{verdict(max(ratios) <= TARGET)} ({', '.join(f'{r:.2f}x' for r in ratios)})"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", type=int, default=1000, help="specs in the repo, entries in the state [1000]")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds added to every request [0.03]")
    parser.add_argument("--unrelated", type=int, default=500, help="batches already in the account [500]")
    parser.add_argument("--rounds", type=int, default=30, help="store round trips [30]")
    parser.add_argument("--url", default=os.environ.get("BATCHPLAN_TEST_PG_URL"))
    args = parser.parse_args()
    root, server_dir = workdir("store"), workdir("store-pg")  # .ci/postgres hands server_dir to its own user
    try:
        server_url = args.url or subprocess.run([str(CI_POSTGRES), "start", str(server_dir)], stdout=subprocess.PIPE,
                                                text=True, check=True).stdout.strip()
        with bench_database(server_url) as database_url:
            commands = measure_commands(database_url, root, args)
            store = measure_store(database_url, root, args.specs, args.rounds)
    finally:
        subprocess.run([str(CI_POSTGRES), "stop", str(server_dir)], capture_output=True)
        cleanup(root)
    print(report(commands, store))
    return 0


if __name__ == "__main__":
    sys.exit(main())
