"""Watching batches until they have finished (`batchplan wait`), and the displays that show it.

Each poll asks the servers (remote.take_snapshot_all: each batch's own provider) only about
batches the state does not already know to be finished (a finished batch never changes). Nothing here writes the
state: operations.py records the last Snapshot with `State.record_batches` under the lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .remote import Snapshot
from .state import Entry


class Display(Protocol):
    def show(self, snapshot: Snapshot) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class WaitResult:
    """How a wait ended: the last snapshot, and whether time ran out first."""

    snapshot: Snapshot
    timed_out: bool

    def problems(self, names: list[str]) -> list[str]:
        """One sentence per batch that did not complete, for the final message."""
        out = []
        for name in names:
            rec = self.snapshot.records.get(name)
            if rec is None:
                out.append(f"{name}: no batch in the state (an interrupted apply); run `batchplan apply`")
            elif name in self.snapshot.missing:
                out.append(f"{name}: batch {rec.id} no longer exists on the server")
            elif rec.failed:
                codes = rec.error_codes()
                out.append(f"{name}: batch {rec.id} {rec.status}{f' ({codes})' if codes else ''}, "
                           f"{rec.counts_phrase()}")
            elif not rec.terminal:
                out.append(f"{name}: batch {rec.id} still {rec.status} ({rec.counts_phrase()}) when the timeout passed")
        return out


async def wait_until_finished(snapshot_of: Callable[[dict[str, Entry]], Awaitable[Snapshot]],
                              entries: dict[str, Entry], display: Display, *, interval: float,
                              timeout: float | None, clock: Callable[[], float] = time.monotonic,
                              until: Callable[[Snapshot], bool] | None = None) -> WaitResult:
    """Poll until every batch in `entries` is finished (or gone), `until(snapshot)` says so
    (apply --watch: a batch ended and freed capacity), or `timeout` seconds pass;
    `snapshot_of(entries)` asks the servers about those still running."""
    deadline = None if timeout is None else clock() + timeout
    current = dict(entries)
    while True:
        snapshot = await snapshot_of(current)
        display.show(snapshot)
        if all(r.terminal or n in snapshot.missing for n, r in snapshot.records.items()) or \
                until is not None and until(snapshot):
            return WaitResult(snapshot, timed_out=False)
        left = None if deadline is None else deadline - clock()
        if left is not None and left <= 0:
            return WaitResult(snapshot, timed_out=True)
        current = {n: e.model_copy(update={"batch": snapshot.records.get(n, e.batch)}) for n, e in current.items()}
        await asyncio.sleep(interval if left is None else min(interval, left))


class BySpec:
    """A display that shows a spec split into shards as one batch (Snapshot.by_spec): `wait` treats a
    spec's shards as one, while it polls and judges each shard."""

    def __init__(self, display: Display):
        self.display = display

    def show(self, snapshot: Snapshot) -> None:
        self.display.show(snapshot.by_spec())

    def close(self) -> None:
        self.display.close()


def eta_phrase(rec, now: float) -> str:
    """A rough time left for a running batch, from its rate so far (requests done since it was created):
    `~4m 10s left`; "" when it cannot be told (nothing done yet, or not running)."""
    from .status import age

    counts = rec.request_counts or {}
    total, done = counts.get("total", 0), counts.get("completed", 0) + counts.get("failed", 0)
    elapsed = now - rec.created_at
    if rec.terminal or not total or not done or done >= total or elapsed <= 0:
        return ""
    return f"~{age((total - done) * elapsed / done)} left"


def batch_line(name: str, rec, missing: bool, now: float) -> str:
    """`a: in_progress, 3/5 requests completed, age 4m 05s, ~2m 40s left`."""
    from .status import age

    if missing:
        return f"{name}: missing (404), {rec.counts_phrase()}"
    eta = eta_phrase(rec, now)
    return f"{name}: {rec.status}, {rec.counts_phrase()}, age {age(now - rec.created_at)}" + (f", {eta}" if eta else "")


class LineDisplay:
    """Plain lines for logs: a line for a batch when its status changes, else at most one a minute
    per batch while its counts move; and a heartbeat when nothing moved for a minute."""

    def __init__(self, echo: Callable[[str], None], heartbeat: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.echo = echo
        self.heartbeat = heartbeat  # seconds: also the least time between two lines of one batch
        self.clock = clock
        self.wall = wall
        self.seen: dict[str, tuple] = {}
        self.said_at: dict[str, float] = {}
        self.last = clock()

    def _due(self, name: str, status: tuple, counts: tuple) -> bool:
        before = self.seen.get(name)
        if before is None or before[0] != status:
            return True
        return before[1] != counts and self.clock() - self.said_at[name] >= self.heartbeat

    def show(self, snapshot: Snapshot) -> None:
        moved = False
        for name, rec in sorted(snapshot.records.items()):
            status = (rec.status, name in snapshot.missing)
            counts = tuple(sorted((rec.request_counts or {}).items()))
            if self._due(name, status, counts):
                self.seen[name], self.said_at[name] = (status, counts), self.clock()
                self.echo(batch_line(name, rec, name in snapshot.missing, self.wall()))
                moved = True
        if moved:
            self.last = self.clock()
        elif self.clock() - self.last >= self.heartbeat:
            done = sum(r.terminal for r in snapshot.records.values())
            self.echo(f"waiting: {done}/{len(snapshot.records)} batch(es) finished")
            self.last = self.clock()

    def close(self) -> None:
        pass


class ProgressDisplay:
    """A live rich display for terminals: one bar per batch (requests done, age, rough ETA) and an overall bar."""

    def __init__(self, names: list[str], console=None, wall: Callable[[], float] = time.time,
                 no_batch: str = "no batch"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.wall, self.no_batch = wall, no_batch  # no_batch: what a name without a batch shows (apply --watch: queued)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=console, transient=False)
        width = max((len(n) for n in names), default=3)
        self.tasks = {n: self.progress.add_task(n.ljust(width), total=None, status="") for n in names}
        self.overall = self.progress.add_task("all".ljust(width), total=None, status="")
        self.progress.start()

    def show(self, snapshot: Snapshot) -> None:
        from .status import age

        totals = done_all = finished = 0
        now = self.wall()
        for name, task in self.tasks.items():
            rec = snapshot.records.get(name)
            if rec is None:
                self.progress.update(task, status=self.no_batch)
                continue
            counts = rec.request_counts or {}
            total = counts.get("total") or None
            done = counts.get("completed", 0) + counts.get("failed", 0)
            eta = eta_phrase(rec, now)
            status = "missing" if name in snapshot.missing else \
                f"{rec.status}, age {age(now - rec.created_at)}" + (f", {eta}" if eta else "")
            self.progress.update(task, total=total, completed=done, status=status)
            totals += total or 0
            done_all += done
            finished += rec.terminal or name in snapshot.missing
        self.progress.update(self.overall, total=totals or None, completed=done_all,
                             status=f"{finished}/{len(self.tasks)} batches finished")

    def close(self) -> None:
        self.progress.stop()
