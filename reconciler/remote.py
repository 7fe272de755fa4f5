"""The remote: what batchplan reads from the server, and the one place it finds its own batches there.

Finding: every batch batchplan creates carries two tags (`batchplan_name`, and
`batchplan_spec`, the spec hash), and every input it uploads is named after its content
hash (`<stem>.batchplan-<sha256>.jsonl`). A batch whose answer was lost, or that an
apply made before the state was lost, is found again by those tags; an upload by that
name (and its size). How far back to look is decided here too: a walk of the batch list
(newest first) stops at a floor, taken from the server's clock where it can be and from
ours, less CLOCK_MARGIN, where it cannot.

Reading: the plan needs the current copy of each batch the state does not know to be
finished (a finished batch never changes), and the tagged batches of every spec whose
batch may exist unrecorded. One page of `GET /batches?limit=100` answers for up to 100
batches, so a list walk is used whenever it is cheaper than one `GET /batches/{id}` per
batch run concurrently. Everything here only reads (GET).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .batch import BatchRecord
from .errors import NotFound
from .spec import TAG_NAME, TAG_SPEC

if TYPE_CHECKING:
    from .api import Api
    from .desired import Desired
    from .session import Session
    from .state import Entry, State

CLOCK_MARGIN = 600  # seconds: our clock and the server's may differ; list a little further back
UPLOAD_NAME = re.compile(r"batchplan-([0-9a-f]{64})\.jsonl$")


# -- names and tags: how batchplan's uploads and batches are recognised -------------------


def upload_filename(desired: Desired) -> str:
    """The uploaded file's name carries its content hash, so an upload is found again by it."""
    stem = Path(desired.input or "input").stem
    return f"{stem}.batchplan-{desired.input_sha256}.jsonl"


def uploaded_sha256(file: dict) -> str | None:
    """The content hash an uploaded file's name carries, when batchplan uploaded it."""
    match = UPLOAD_NAME.search(file.get("filename") or "")
    return match.group(1) if match else None


def find_tagged(tagged: dict[str, list[dict]], name: str, spec_hash: str,
                skip: frozenset[str] | set[str] = frozenset()) -> dict | None:
    """The newest batch batchplan made for this name and this exact spec, other than those in `skip`."""
    for batch in tagged.get(name, []):
        tags = batch.get("metadata") or {}
        if tags.get(TAG_NAME) == name and tags.get(TAG_SPEC) == spec_hash and batch["id"] not in skip:
            return batch
    return None


# -- what a plan reads ---------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteView:
    """What the server said during a plan's read.

    batches: current copies of batches known to state, by id (only those refreshed).
    missing: ids the server answered 404 for.
    tagged:  spec name -> batches that carry batchplan's tags for it, newest first (per provider).
    base_urls: named provider -> where its profile points now, to tell a moved provider (moved_provider).
    """

    batches: dict[str, dict] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()
    tagged: dict[str, list[dict]] = field(default_factory=dict)
    base_urls: dict[str, str] = field(default_factory=dict)


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


def _unfinished(entries: dict[str, Entry]) -> list[tuple[str, int]]:
    """(id, created_at) of each batch the entries do not know to be finished, sorted."""
    return sorted((e.batch.id, e.batch.created_at) for e in entries.values() if e.batch and not e.batch.terminal)


async def read_remote(api: Api, desired: list[Desired], state: State | None, *, parallelism: int,
                      full_scan: bool = False) -> RemoteView:
    """Read what the plan needs from the server. Sends only GET requests."""
    stale = _unfinished(state.entries if state else {})
    search = _needs_search(desired, state)
    if not search and not full_scan:
        batches, missing = await current_batches(api, stale, parallelism) if stale else ({}, [])
        return RemoteView(batches=batches, missing=frozenset(missing))
    batches, tagged = await walk_batches(api, None if full_scan else _scan_floor(state, stale, search))
    fetched, missing = await fetch_batches(api, [bid for bid, _ in stale if bid not in batches])
    batches.update(fetched)
    wanted = {bid for bid, _ in stale}
    return RemoteView(batches={k: v for k, v in batches.items() if k in wanted},
                      missing=frozenset(missing), tagged=tagged)


# -- walking and fetching ------------------------------------------------------------------


async def current_batches(api: Api, stale: list[tuple[str, int]],
                          parallelism: int) -> tuple[dict[str, dict], list[str]]:
    """Current copies of the batches (id, created_at) by id, and the ids the server has no more.

    A list walk down to the oldest of them when that takes fewer requests than a GET each."""
    batches: dict[str, dict] = {}
    if len(stale) > parallelism:
        batches, _ = await walk_batches(api, min(created for _, created in stale), {bid for bid, _ in stale})
        batches = {bid: batches[bid] for bid, _ in stale if bid in batches}
    fetched, missing = await fetch_batches(api, [bid for bid, _ in stale if bid not in batches])
    return {**batches, **fetched}, missing


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
    """One GET per batch, concurrently: the batches found by id, and the ids answered 404."""
    async def one(batch_id: str) -> tuple[str, dict | None]:
        try:
            return batch_id, await api.retrieve_batch(batch_id)
        except NotFound:
            return batch_id, None

    results = await asyncio.gather(*(one(b) for b in batch_ids))
    return {k: v for k, v in results if v is not None}, sorted(k for k, v in results if v is None)


# -- what apply looks for ------------------------------------------------------------------


async def tagged_since(api: Api, since: int) -> dict[str, list[dict]]:
    """Tagged batches by name, made since `since` by our clock (a create sent then, whose answer was lost)."""
    _, tagged = await walk_batches(api, since - CLOCK_MARGIN)
    return tagged


async def uploaded_files(api: Api, sizes: dict[str, int]) -> dict[str, dict]:
    """sha256 -> a usable file on the server uploaded by batchplan with that content hash.

    `sizes` holds the byte count known for a hash (from the state or the local input): a file of
    another size under that name is not the content its name says, and is never reused."""
    found: dict[str, dict] = {}
    for file in await api.list_files("batch"):
        sha = uploaded_sha256(file)
        if sha and file.get("status") not in ("error", "deleted"):
            found.setdefault(sha, file)
    return {sha: f for sha, f in found.items() if sizes.get(sha, f["bytes"]) == f["bytes"]}


# -- what status, wait and refresh read ----------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the server said about some state entries at one moment.

    records: name -> the batch now (refreshed if it was running, else as the state has it).
    missing: names whose batch the server answered 404 for.
    """

    records: dict[str, BatchRecord] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: dict[str, Entry]) -> Snapshot:
        """What the state alone says (no server)."""
        return cls({n: e.batch for n, e in entries.items() if e.batch})


def any_unfinished(entries: dict[str, Entry]) -> bool:
    """Whether any of `entries` has a batch the state does not know to be finished."""
    return any(e.batch and not e.batch.terminal for e in entries.values())


async def take_snapshot(api: Api, entries: dict[str, Entry], parallelism: int) -> Snapshot:
    """Refresh every unfinished batch among `entries`; finished ones are taken from the state."""
    names = {e.batch.id: n for n, e in entries.items() if e.batch and not e.batch.terminal}
    fetched, gone = await current_batches(api, _unfinished(entries), parallelism)
    records = Snapshot.of(entries).records
    records.update({names[bid]: BatchRecord.from_api(batch) for bid, batch in fetched.items()})
    return Snapshot(records, frozenset(names[bid] for bid in gone))


# -- several providers: each read goes to the server its batches are on ---------------------


def moved_provider(entry: Entry, base_urls: dict[str, str]) -> tuple[str, str] | None:
    """(base_url then, base_url now) when the named provider this entry's batch was made on now points at
    another server: its batch is not there, so it is neither asked about nor followed (the plan shows it)."""
    provider = entry.provider
    if not provider or entry.base_url is None or provider not in base_urls:
        return None
    now = base_urls[provider]
    return (entry.base_url, now) if now != entry.base_url else None


def _by_provider(desired: list[Desired], entries: dict[str, Entry],
                 base_urls: dict[str, str]) -> dict[str | None, tuple[list[Desired], dict[str, Entry]]]:
    """provider -> (its desired batches, its state entries), entries on a moved provider left out."""
    groups: dict[str | None, tuple[list[Desired], dict[str, Entry]]] = {}
    for want in desired:
        groups.setdefault(want.provider, ([], {}))[0].append(want)
    for name, entry in entries.items():
        if not moved_provider(entry, base_urls):
            groups.setdefault(entry.provider, ([], {}))[1][name] = entry
    return groups


def _asks(desired: list[Desired], state: State | None, full_scan: bool) -> bool:
    """Whether read_remote would send anything for this (one provider's) share of the plan."""
    return full_scan or bool(_needs_search(desired, state)) or bool(_unfinished(state.entries if state else {}))


async def read_remote_all(session: Session, desired: list[Desired], state: State | None, *, full_scan: bool = False,
                          base_urls: dict[str, str] | None = None) -> RemoteView:
    """`read_remote` on every provider the plan involves, concurrently, merged into one RemoteView.

    Every provider that will be asked is resolved first (session.require): a missing key is said
    before anything is sent to any of them. With no spec and no state, the environment's provider is
    read, as before providers existed."""
    base_urls = base_urls or {}
    groups = _by_provider(desired, state.entries if state else {}, base_urls) or {None: ([], {})}
    shares = {p: (want, state.model_copy(update={"entries": entries}) if state else None)
              for p, (want, entries) in groups.items()}
    asked = [p for p, (want, share) in shares.items() if _asks(want, share, full_scan)]
    session.require(asked)

    async def one(provider: str | None) -> RemoteView:
        want, share = shares[provider]
        return await read_remote(await session.client(provider), want, share, full_scan=full_scan,
                                 parallelism=session.connection(provider).parallelism)

    views = await asyncio.gather(*(one(p) for p in asked))
    return _merged(views, base_urls)


def _merged(views: list[RemoteView], base_urls: dict[str, str]) -> RemoteView:
    batches: dict[str, dict] = {}
    tagged: dict[str, list[dict]] = {}
    for view in views:
        batches.update(view.batches)
        for name, found in view.tagged.items():
            tagged.setdefault(name, []).extend(found)
    return RemoteView(batches=batches, missing=frozenset().union(*(v.missing for v in views)), tagged=tagged,
                      base_urls=dict(base_urls))


def _unfinished_by_provider(entries: dict[str, Entry], base_urls: dict[str, str]) -> dict[str | None, dict[str, Entry]]:
    return {p: share for p, (_, share) in _by_provider([], entries, base_urls).items() if any_unfinished(share)}


def providers_to_ask(entries: dict[str, Entry], base_urls: dict[str, str]) -> set[str | None]:
    """The providers a snapshot of `entries` asks: those with a batch still running (not on a moved one)."""
    return set(_unfinished_by_provider(entries, base_urls))


async def take_snapshot_all(session: Session, entries: dict[str, Entry],
                            base_urls: dict[str, str] | None = None) -> Snapshot:
    """`take_snapshot` on every provider with a batch still running, merged; the rest from the state."""
    groups = _unfinished_by_provider(entries, base_urls or {})
    session.require(groups)

    async def one(provider: str | None) -> Snapshot:
        return await take_snapshot(await session.client(provider), groups[provider],
                                   session.connection(provider).parallelism)

    snapshots = await asyncio.gather(*(one(p) for p in groups))
    records = Snapshot.of(entries).records
    for snapshot in snapshots:
        records.update(snapshot.records)
    return Snapshot(records, frozenset().union(*(s.missing for s in snapshots)))
