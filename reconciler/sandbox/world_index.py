"""Indexes over the sandbox's world, so a request costs O(log n) in the batches and files it holds.

The world (emulator.py) is a plain dict, saved as JSON; these indexes are derived from it and
never saved. The store drops them whenever it hands out another world (reloaded from disk) or
someone changed the world without the emulator (a bench writing batches into it); the emulator
then builds them again from the world, and keeps them up to date on every change it makes.
Before these, every request walked every batch (0.9 ms a request with 1,500 batches, 2.2 ms
with 2,500, 11 ms with 10,000), and an apply of 1,000 specs was paced by the sandbox.

- `schedule`: a heap of (due, seq, batch_id), each batch's next lifecycle step. An entry goes
  stale when its batch moved on by another path (a cancel): the emulator checks each entry
  against its batch before running the step, so a stale one is dropped, never run.
- `batches`, `files`, `files_by_purpose`: ids in creation order with each id's position, for
  newest-first (or oldest-first) pages that start after an id without sorting or scanning.
- `expiries`: a heap of (expires_at, file_id), so expired files are found without a walk.
- `holding`: per model, the batches that took enqueued tokens (capacity.py) and may still hold
  them, so the capacity check reads those, not every batch.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Iterable, Iterator

from reconciler.sandbox.capacity import HOLDING


class Ordered:
    """Ids in ascending creation order (`seq`), each id's position, and the ids removed since.

    Removed ids are skipped by pages and swept out once they are half the list, so a page
    costs its own length plus at most as many removed ids, amortised.
    """

    def __init__(self, records: Iterable[dict] = ()):
        self._rebuild([record["id"] for record in sorted(records, key=lambda record: record["seq"])])

    def _rebuild(self, ids: list[str]) -> None:
        self.ids = ids
        self.position = {item: index for index, item in enumerate(ids)}
        self.removed: set[str] = set()

    def add(self, item: str) -> None:
        """A new record: its seq is the world's newest, so it goes last."""
        self.position[item] = len(self.ids)
        self.ids.append(item)

    def remove(self, item: str) -> None:
        if item not in self.position or item in self.removed:
            return
        self.removed.add(item)
        if 2 * len(self.removed) > len(self.ids):
            self._rebuild([kept for kept in self.ids if kept not in self.removed])

    def page(self, after: str | None, limit: int, newest_first: bool = True) -> tuple[list[str], bool]:
        """Up to `limit` ids that follow `after` in the list's order (from the start when None),
        and whether more follow them. An `after` not listed (deleted since, or never here) gives
        no ids: the caller learns the cursor is gone instead of getting page one again."""
        step = -1 if newest_first else 1
        if after is None:
            start = len(self.ids) - 1 if newest_first else 0
        elif after in self.position and after not in self.removed:
            start = self.position[after] + step
        else:
            return [], False
        page: list[str] = []
        for item in self._walk(start, step):
            if len(page) == limit:
                return page, True
            page.append(item)
        return page, False

    def _walk(self, start: int, step: int) -> Iterator[str]:
        stop = -1 if step < 0 else len(self.ids)
        for index in range(start, stop, step):
            if self.ids[index] not in self.removed:
                yield self.ids[index]


class WorldIndex:
    """The indexes of one world dict (see the module doc). `due(batch)` is a batch's next step's
    time (math.inf when it has none), as the emulator computes it."""

    def __init__(self, world: dict, due: Callable[[dict], float]):
        batches, files = world["batches"].values(), world["files"].values()
        self.batches = Ordered(batches)
        self.files = Ordered(files)
        self.files_by_purpose: dict[str, Ordered] = {}
        for purpose in sorted({record["purpose"] for record in files}):
            self.files_by_purpose[purpose] = Ordered(r for r in files if r["purpose"] == purpose)
        self.schedule = [(due(batch), batch["seq"], batch["id"]) for batch in batches if due(batch) < math.inf]
        heapq.heapify(self.schedule)
        self.expiries = [(record["expires_at"], record["id"]) for record in files
                         if record["expires_at"] is not None]
        heapq.heapify(self.expiries)
        self.holding: dict[str, set[str]] = {}
        for batch in batches:
            if batch.get("enqueued_tokens") and batch["status"] in HOLDING:
                self.hold(batch)

    # batches

    def add_batch(self, batch: dict, due: float) -> None:
        self.batches.add(batch["id"])
        self.reschedule(batch, due)

    def reschedule(self, batch: dict, due: float) -> None:
        """The batch's next step is now due at `due`; its older entries go stale."""
        if due < math.inf:
            heapq.heappush(self.schedule, (due, batch["seq"], batch["id"]))

    def due_by(self, now: float) -> Iterator[tuple[float, int, str]]:
        """Pop the schedule's entries due by `now`, earliest first (ties: oldest batch first),
        including those pushed while this runs."""
        while self.schedule and self.schedule[0][0] <= now:
            yield heapq.heappop(self.schedule)

    def hold(self, batch: dict) -> None:
        """The batch took its model's enqueued tokens (it went in_progress under a limit)."""
        self.holding.setdefault(batch["model"], set()).add(batch["id"])

    def holding_batches(self, world: dict, model: str) -> list[dict]:
        """The batches of `model` that hold enqueued tokens now; those that let go are forgotten."""
        ids = self.holding.get(model, set())
        held = [world["batches"][batch_id] for batch_id in ids]
        ids.difference_update(batch["id"] for batch in held if batch["status"] not in HOLDING)
        return [batch for batch in held if batch["status"] in HOLDING]

    # files

    def add_file(self, record: dict) -> None:
        self.files.add(record["id"])
        self.files_by_purpose.setdefault(record["purpose"], Ordered()).add(record["id"])
        self.expire_at(record)

    def expire_at(self, record: dict) -> None:
        """The file's expiry moment is now `record["expires_at"]`; older entries go stale."""
        if record["expires_at"] is not None:
            heapq.heappush(self.expiries, (record["expires_at"], record["id"]))

    def remove_file(self, record: dict) -> None:
        self.files.remove(record["id"])
        self.files_by_purpose[record["purpose"]].remove(record["id"])

    def expired_by(self, now: float) -> Iterator[str]:
        """Pop the ids whose expiry entry fell due by `now` (the caller checks the file still expires)."""
        while self.expiries and self.expiries[0][0] <= now:
            yield heapq.heappop(self.expiries)[1]

    def file_order(self, purpose: str | None) -> Ordered:
        if purpose is None:
            return self.files
        return self.files_by_purpose.get(purpose) or Ordered()
