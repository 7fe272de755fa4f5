"""The remote: what batchplan reads from the server, and the one place it finds its own batches there.

Finding: every batch batchplan creates carries two tags (`batchplan_name`, and
`batchplan_spec`, the spec hash), and every input it uploads is named after its content
hash (`<stem>.batchplan-<sha256>.jsonl`). `find_batches` is the search, for plans and for
apply's look after a lost answer: it lists the uploads (`GET /files?purpose=batch`); a
spec whose input was never uploaded cannot have a batch; else it walks the batch list
newest first and stops at the oldest upload of the inputs it looks for. A batch is made
after its input was uploaded, and both timestamps are the server's: no clock skew can
make the walk stop too soon, and no local clock is read. `keep_oldest` is the rule for
choosing among a spec's batches, the same for every checkout whatever its state says.

Reading: the plan needs the current copy of each batch the state does not know to be
finished (a finished batch never changes), and the tagged batches of every spec whose
batch may exist unrecorded or twice. One page of `GET /batches?limit=100` answers for up
to 100 batches, so a list walk is used whenever it is cheaper than one `GET /batches/{id}`
per batch run concurrently. A 404 for a batch the state recorded is no proof it is gone
(`retrieve_batch`). Everything here only reads (GET).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .batch import BatchFields, BatchRecord, BatchStatus
from .errors import NotFound
from .spec import TAG_NAME, TAG_SPEC, spec_of

if TYPE_CHECKING:
    from .api import Api
    from .desired import Desired
    from .session import Session
    from .state import Entry, State

UPLOAD_NAME = re.compile(r"batchplan-([0-9a-f]{64})\.jsonl$")
# Seconds of the server's clock within which a create is carried out after it was sent, or never. A
# create whose answer was lost may land beside a spec's batch until then, even once that batch has
# completed, and whatever the state knew of it (a lost state, `state rm`, a restored backup): a spec
# is searched for this long after its batch was made.
LATE_CREATE_WINDOW = 86_400


# -- names and tags: how batchplan's uploads and batches are recognised -------------------


def upload_filename(desired: Desired) -> str:
    """The uploaded file's name carries its content hash, so an upload is found again by it."""
    stem = Path(desired.input or "input").stem
    return f"{stem}.batchplan-{desired.input_sha256}.jsonl"


def uploaded_sha256(file: dict) -> str | None:
    """The content hash an uploaded file's name carries, when batchplan uploaded it."""
    match = UPLOAD_NAME.search(file.get("filename") or "")
    return match.group(1) if match else None


def tagged_batches(tagged: dict[str, list[dict]], name: str, spec_hash: str,
                   skip: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """The batches batchplan made for this name and this exact spec, other than those in `skip`."""
    return [batch for batch in tagged.get(name, [])
            if (batch.get("metadata") or {}).get(TAG_SPEC) == spec_hash
            and (batch.get("metadata") or {}).get(TAG_NAME) == name and batch["id"] not in skip]


def adoptable(batches: list[dict]) -> list[dict]:
    """The batches a plan may record as a spec's: running or completed. One that failed, expired,
    was cancelled or is being cancelled is no batch of the spec (a spec removed, its batch
    cancelled, then put back as it was, runs again)."""
    return [b for b in batches if BatchStatus(b["status"]).running or b["status"] == BatchStatus.COMPLETED]


def superseded_batches(tagged: dict[str, list[dict]], name: str, spec_hash: str,
                       skip: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """The running batches batchplan made for this name from another version of its spec (not
    this spec hash, nor one of its retries' `HASH/N`), other than those in `skip`, oldest first."""
    def other_version(batch: dict) -> bool:
        tag = (batch.get("metadata") or {}).get(TAG_SPEC) or ""
        return tag != spec_hash and not tag.startswith(f"{spec_hash}/")

    return sorted((batch for batch in tagged.get(name, [])
                   if (batch.get("metadata") or {}).get(TAG_NAME) == name and batch["id"] not in skip
                   and BatchStatus(batch["status"]).running and other_version(batch)), key=_oldest_first)


def _oldest_first(batch: dict) -> tuple[int, str]:
    return batch.get("created_at") or 0, batch["id"]


def keep_oldest(batches: list[dict]) -> tuple[dict | None, list[dict]]:
    """The keeper among one spec's batches, and the duplicates to cancel.

    The keeper is the OLDEST running batch (server created_at, then id): a rule that reads
    only what the server says, so two checkouts with different states choose the same one.
    Every other running batch is a duplicate. With none running, the oldest completed one
    is kept (a lost create that already finished is not made again); with none completed,
    the newest of the rest (failed, expired, cancelled: the plan then says so).
    """
    running = sorted((b for b in batches if BatchStatus(b["status"]).running), key=_oldest_first)
    if running:
        return running[0], running[1:]
    completed = sorted((b for b in batches if b["status"] == BatchStatus.COMPLETED), key=_oldest_first)
    if completed:
        return completed[0], []
    rest = sorted(batches, key=_oldest_first)
    return (rest[-1] if rest else None), []


def find_tagged(tagged: dict[str, list[dict]], name: str, spec_hash: str,
                skip: frozenset[str] | set[str] = frozenset()) -> dict | None:
    """The batch to adopt for this name and spec (see keep_oldest), other than those in `skip`."""
    return keep_oldest(tagged_batches(tagged, name, spec_hash, skip))[0]


# -- what a plan reads ---------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteView:
    """What the server said during a plan's read.

    batches: current copies of batches known to state, by id (only those refreshed).
    missing: ids proven gone: 404 twice, and absent from the batch list (retrieve_batch).
    tagged:  spec name -> batches that carry batchplan's tags for it, newest first; complete
             for every spec that was searched (`searched`), from its input's upload on (each
             spec on its own provider).
    base_urls: named provider -> where its profile points now, to tell a moved provider (moved_provider).
    """

    batches: dict[str, dict] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()
    tagged: dict[str, list[dict]] = field(default_factory=dict)
    searched: frozenset[str] = frozenset()
    base_urls: dict[str, str] = field(default_factory=dict)


def _search_inputs(desired: list[Desired], state: State | None) -> dict[str, list[BatchFields]]:
    """Name -> the fields (inputs) to search for, of every spec whose batch may exist unrecorded, or twice.

    That is a spec with no batch in the state, a spec whose recorded hash differs (its
    replacement may already exist: the state was restored from a backup or an older commit),
    an entry with an intent (a create whose answer was lost), a spec whose recorded batch is
    not finished (the net: a create that landed late runs beside it), and one whose recorded
    batch ended without completing (a forced replace the state does not know of may run). A
    spec whose batch completed is not searched (that would walk the account back to its
    upload on every plan) once LATE_CREATE_WINDOW has passed since it was made (before that, a
    lost create may still land beside it), by the server's clock as the state last saw it.
    The inputs of the recorded version and of the intent's are searched too: a batch of an
    earlier version of the spec that runs untracked is cancelled (superseded).
    """
    entries = state.entries if state else {}
    now = state.server_now() if state else None
    search = {n: [e.intent.fields] for n, e in entries.items() if e.intent is not None}
    for want in desired:
        entry = entries.get(want.name)
        if entry is None or entry.batch is None or entry.spec_hash != want.spec_hash or entry.intent \
                or entry.batch.status != BatchStatus.COMPLETED or _recent(entry.batch, now):
            search.setdefault(want.name, []).append(want.fields())
            if entry is not None:
                search[want.name].append(entry.fields)
    return search


def _recent(batch: BatchRecord, server_now: int | None) -> bool:
    """Whether a lost create may still land beside `batch`: made less than LATE_CREATE_WINDOW before
    `server_now` (State.server_now, a server time never later than the server's clock now)."""
    return server_now is None or server_now <= batch.created_at + LATE_CREATE_WINDOW


def _unfinished(entries: dict[str, Entry]) -> list[tuple[str, int]]:
    """(id, created_at) of each batch the entries do not know to be finished, sorted."""
    return sorted((e.batch.id, e.batch.created_at) for e in entries.values() if e.batch and not e.batch.terminal)


async def read_remote(api: Api, desired: list[Desired], state: State | None, *, parallelism: int,
                      full_scan: bool = False) -> RemoteView:
    """Read what the plan needs from the server. Sends only GET requests."""
    stale = _unfinished(state.entries if state else {})
    search = _search_inputs(desired, state)
    if not search and not full_scan:
        batches, missing = await current_batches(api, stale, parallelism) if stale else ({}, [])
        return RemoteView(batches=batches, missing=frozenset(missing))
    if full_scan:
        batches, tagged = await walk_batches(api, None)
    else:
        unrecorded = any(not state or want.name not in state.entries for want in desired)
        found = await find_batches(api, [fields for inputs in search.values() for fields in inputs],
                                   every_upload=unrecorded)
        batches, tagged = found.batches, found.tagged
    rest = [(bid, created) for bid, created in stale if bid not in batches]
    fetched, missing = await current_batches(api, rest, parallelism, walked=batches)
    batches.update(fetched)
    wanted = {bid for bid, _ in stale}
    return RemoteView(batches={k: v for k, v in batches.items() if k in wanted}, missing=frozenset(missing),
                      tagged=tagged, searched=frozenset(search))


# -- the search ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """What find_batches saw: every batch walked (by id), the tagged ones by name (newest first),
    and every upload batchplan made, by content hash (newest first)."""

    batches: dict[str, dict]
    tagged: dict[str, list[dict]]
    uploads: dict[str, list[dict]]


async def list_uploads(api: Api) -> dict[str, list[dict]]:
    """sha256 -> every usable file batchplan uploaded with that content hash, newest first."""
    uploads: dict[str, list[dict]] = {}
    for file in await api.list_files("batch"):
        sha = uploaded_sha256(file)
        if sha and file.get("status") not in ("error", "deleted"):
            uploads.setdefault(sha, []).append(file)
    return uploads


async def _input_created(api: Api, fields: BatchFields, uploads: dict[str, list[dict]]) -> int | None:
    """The server's created_at of the oldest upload a batch of `fields` can have been made from;
    None when there is none (then there is no such batch)."""
    if fields.input_sha256:
        files = uploads.get(fields.input_sha256, [])
        return min((f["created_at"] for f in files), default=None)
    if not fields.input_file_id:
        return None
    try:  # a file the spec names by id: its own created_at
        return (await api.retrieve_file(fields.input_file_id))["created_at"]
    except NotFound:
        return None


async def find_batches(api: Api, inputs: list[BatchFields], *, every_upload: bool = False) -> Found:
    """The search: batchplan's batches of these inputs, found through their uploads.

    Lists the uploads; walks the batches newest first down to the oldest upload among the
    inputs' (several uploads of one content, when a lost upload answer was sent again: the
    oldest). A batch is never older than its input file, and both times are the server's.
    `every_upload`: down to the oldest of all batchplan's uploads, for a spec the state has no
    entry for (a lost state): an earlier version of it, whose input is not known, may still run."""
    uploads = await list_uploads(api)
    distinct = {(f.input_sha256, f.input_file_id): f for f in inputs}
    created = await asyncio.gather(*(_input_created(api, f, uploads) for _, f in sorted(distinct.items(), key=str)))
    if every_upload:
        created.append(min((f["created_at"] for files in uploads.values() for f in files), default=None))
    floors = [c for c in created if c is not None]
    if not floors:
        return Found({}, {}, uploads)
    batches, tagged = await walk_batches(api, min(floors))
    return Found(batches, tagged, uploads)


# -- walking and fetching ------------------------------------------------------------------


async def current_batches(api: Api, stale: list[tuple[str, int]], parallelism: int,
                          walked: dict[str, dict] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Current copies of the batches (id, created_at) by id, and the ids proven gone.

    A list walk down to the oldest of them when that takes fewer requests than a GET each."""
    batches: dict[str, dict] = {}
    if len(stale) > parallelism:
        batches, _ = await walk_batches(api, min(created for _, created in stale), {bid for bid, _ in stale})
        batches = {bid: batches[bid] for bid, _ in stale if bid in batches}
    fetched, missing = await fetch_batches(api, [(b, c) for b, c in stale if b not in batches], walked or batches)
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


NOT_FOUND_READS = 2  # GETs of a recorded batch before its 404 is checked against the batch list


async def retrieve_batch(api: Api, batch_id: str, created_at: int,
                         walked: dict[str, dict] | None = None) -> dict | None:
    """A batch the state recorded, as the server has it now; None only when it is proven gone.

    A 404 is no proof (a server may answer one for a batch that exists): the GET is sent
    again, then the batch is looked for in the list, walked down to its created_at (or in
    `walked`, batches a walk just saw). Only a batch absent from both is gone."""
    for _ in range(NOT_FOUND_READS):
        try:
            return await api.retrieve_batch(batch_id)
        except NotFound:
            pass
    if walked and batch_id in walked:
        return walked[batch_id]
    batches, _ = await walk_batches(api, created_at, {batch_id})
    return batches.get(batch_id)


async def fetch_batches(api: Api, stale: list[tuple[str, int]],
                        walked: dict[str, dict] | None = None) -> tuple[dict[str, dict], list[str]]:
    """One retrieve_batch per (id, created_at), concurrently: the batches by id, and the ids proven gone."""
    async def one(batch_id: str, created_at: int) -> tuple[str, dict | None]:
        return batch_id, await retrieve_batch(api, batch_id, created_at, walked)

    results = await asyncio.gather(*(one(b, c) for b, c in stale))
    return {k: v for k, v in results if v is not None}, sorted(k for k, v in results if v is None)


# -- what apply reuses ---------------------------------------------------------------------


def reusable_uploads(uploads: dict[str, list[dict]], sizes: dict[str, int]) -> dict[str, dict]:
    """sha256 -> an upload batchplan made with that content hash that may be used as that content.

    `sizes` holds the byte count known for a hash (from the state or the local input): a file of
    another size under that name is not the content its name says, and is never reused."""
    found: dict[str, dict] = {}
    for sha, files in uploads.items():
        usable = [f for f in files if sizes.get(sha, f["bytes"]) == f["bytes"]]
        if usable:
            found[sha] = usable[0]
    return found


async def uploaded_files(api: Api, sizes: dict[str, int]) -> dict[str, dict]:
    """sha256 -> a usable file on the server uploaded by batchplan with that content hash (see reusable_uploads)."""
    return reusable_uploads(await list_uploads(api), sizes)


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

    def by_spec(self) -> Snapshot:
        """The same by spec name: a spec split into shards is one record (BatchRecord.combined), missing
        when any of its shards is."""
        groups: dict[str, list[str]] = {}
        for name in self.records:
            groups.setdefault(spec_of(name), []).append(name)
        records = {spec: self.records[names[0]] if names == [spec] else
                   BatchRecord.combined([self.records[n] for n in names]) for spec, names in groups.items()}
        return Snapshot(records, frozenset(spec_of(n) for n in self.missing))


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
    return full_scan or bool(_search_inputs(desired, state)) or bool(_unfinished(state.entries if state else {}))


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
        view = await read_remote(await session.client(provider), want, share, full_scan=full_scan,
                                 parallelism=session.connection(provider).parallelism)
        return _own(view, {w.name for w in want} | set(share.entries if share else ()))

    views = await asyncio.gather(*(one(p) for p in asked))
    return _merged(views, base_urls)


def _own(view: RemoteView, names: set[str]) -> RemoteView:
    """A provider's view with the tagged batches of its own specs only: two providers may be one server
    (two projects of one account), and a spec's batches are only those on its own provider."""
    return dataclasses.replace(view, tagged={n: found for n, found in view.tagged.items() if n in names},
                               searched=view.searched & names)


def _merged(views: list[RemoteView], base_urls: dict[str, str]) -> RemoteView:
    batches: dict[str, dict] = {}
    tagged: dict[str, list[dict]] = {}
    for view in views:
        batches.update(view.batches)
        for name, found in view.tagged.items():
            tagged.setdefault(name, []).extend(found)
    return RemoteView(batches=batches, missing=frozenset().union(*(v.missing for v in views)), tagged=tagged,
                      searched=frozenset().union(*(v.searched for v in views)), base_urls=dict(base_urls))


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
