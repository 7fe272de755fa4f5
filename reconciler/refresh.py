"""Refresh: ask the server about the batches a plan needs, in as few round trips as it can.

Two questions, answered together:
- the current status of each batch in state that is not finished yet (a finished
  batch never changes, so it is not asked about);
- which batches carry batchplan's tags for specs with no recorded batch, or with an
  interrupted create (the intent in state), so that nothing is created twice.

One page of `GET /batches?limit=100` answers for up to 100 batches, so a list walk
(newest first, stopping once it is older than the oldest batch still needed) is used
when it is cheaper than one `GET /batches/{id}` per batch run concurrently.
"""

from __future__ import annotations

import asyncio

from .api import Api
from .desired import Desired
from .errors import NotFound
from .plan import RemoteView
from .spec import TAG_NAME
from .state import State

CLOCK_MARGIN = 600  # seconds: our clock and the server's may differ; list a little further back


def _needs_search(desired: list[Desired], state: State | None) -> set[str]:
    """Names whose batch may exist on the server without being recorded in state.

    That includes a spec whose recorded hash differs: its replacement may already exist
    (the state was restored from a backup or an older commit), and must not be made twice.
    """
    if state is None:
        return {d.name for d in desired}
    names = {n for n, e in state.entries.items() if e.intent is not None}
    for want in desired:
        entry = state.entries.get(want.name)
        if entry is None or entry.batch is None or entry.spec_hash != want.spec_hash:
            names.add(want.name)
    return names


def _scan_floor(state: State | None, stale: list[tuple[str, int]], search: set[str]) -> int | None:
    """The oldest created_at the list walk must reach; None means the whole account."""
    if state is None:
        return None
    floors = [created for _, created in stale]  # the server's own clock: no margin needed
    if search:  # our clock: reach a little further back, in case the two clocks differ
        ours = [e.intent.at for n, e in state.entries.items() if n in search and e.intent]
        ours.append(state.scan_floor if state.scan_floor is not None else state.created_at)
        floors += [at - CLOCK_MARGIN for at in ours]
    return min(floors) if floors else None


async def refresh(api: Api, desired: list[Desired], state: State | None, *, parallelism: int,
                  full_scan: bool = False) -> RemoteView:
    """Read what the plan needs from the server. Sends only GET requests."""
    entries = state.entries if state else {}
    stale = sorted((e.batch.id, e.batch.created_at) for e in entries.values() if e.batch and not e.batch.terminal)
    search = _needs_search(desired, state)
    if not stale and not search and not full_scan:
        return RemoteView()
    if search or full_scan or len(stale) > parallelism:
        floor = None if full_scan else _scan_floor(state, stale, search)
        enough = None if search or full_scan else {bid for bid, _ in stale}
        batches, tagged = await walk_batches(api, floor, enough)
        unseen = [bid for bid, _ in stale if bid not in batches]
    else:
        batches, tagged, unseen = {}, {}, [bid for bid, _ in stale]
    fetched, missing = await fetch_batches(api, unseen)
    batches.update(fetched)
    wanted = {bid for bid, _ in stale}
    return RemoteView(batches={k: v for k, v in batches.items() if k in wanted},
                      missing=frozenset(missing), tagged=tagged)


async def walk_batches(api: Api, floor: int | None,
                enough: set[str] | None = None) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """List batches newest first down to `floor`, or until every id in `enough` was seen;
    every batch seen, and the tagged ones by name."""
    batches: dict[str, dict] = {}
    tagged: dict[str, list[dict]] = {}
    missing = set(enough) if enough is not None else None
    async for batch in api.iter_batches():
        if floor is not None and batch.get("created_at", 0) < floor:
            break
        if missing is not None:
            missing.discard(batch["id"])
        batches[batch["id"]] = batch
        name = (batch.get("metadata") or {}).get(TAG_NAME)
        if name:
            tagged.setdefault(name, []).append(batch)
        if missing is not None and not missing:
            break
    return batches, tagged


async def fetch_batches(api: Api, batch_ids: list[str]) -> tuple[dict[str, dict], list[str]]:
    async def one(batch_id: str) -> tuple[str, dict | None]:
        try:
            return batch_id, await api.retrieve_batch(batch_id)
        except NotFound:
            return batch_id, None

    results = await asyncio.gather(*(one(b) for b in batch_ids))
    return {k: v for k, v in results if v is not None}, sorted(k for k, v in results if v is None)
