"""Attempts: every batch made for one spec's address, its batch and the retries that follow it.

A spec's state entry holds its batch (attempt 1) and, in `Entry.retries`, the follow-up
batches of the requests that ended without a result (attempts 2 and up; see retries.py).
This module is what the rest of batchplan asks about them:

    attempt_records   the attempts of an entry, oldest first
    latest_entries    the entries with each one's latest attempt as its `batch`: what
                      status, wait, refresh and download follow
    attempts_phrase   what `status` says of a spec's attempts, from their request counts
                      (shards_attempts_phrase: summed over a sharded spec's shards)
    read_attempts     the plan's results stage, before the pure build_plan: refreshes running
                      retry batches, finds a retry batch whose create answer was lost, and
                      reads the result files of ended attempts (through the ResultsCache, each
                      file downloaded once per machine) into a RetrySelection; it hands
                      build_plan plain values (AttemptsView); read_attempts_all runs it on each
                      provider whose specs retry, with that provider's client (providers.py)
    retry_desired     the retry input as a Desired: its lines written once per content to the
                      per-machine work directory, for the uploader and the estimate

A shard's address (`NAME[K]`) is a name like any other: its retries are its own.
Everything here only reads the server (GET); it writes only per-machine files under
`state/retries/` (git-ignored).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .batch import BatchRecord
from .inputs import hash_file
from .remote import fetch_batches, find_batches, find_tagged, moved_provider
from .results import AttemptFiles, ResultsCache, classify_results
from .retries import (MAX_ATTEMPTS, RETRY_ENDS, RetryPolicy, RetrySelection, attempt_tag, retry_candidates,
                      status_phrase, write_retry_input)

if TYPE_CHECKING:
    from .api import Api
    from .desired import Desired
    from .remote import RemoteView
    from .session import Session
    from .state import Entry, State


def attempt_records(entry: Entry) -> list[BatchRecord]:
    """The entry's batch and the retries that follow it, oldest first ([] with no batch).

    Retries recorded for an earlier batch of the name (since replaced) are not its attempts."""
    if entry.batch is None:
        return []
    retries = entry.retries
    follow = retries.batches if retries is not None and retries.first == entry.batch.id else []
    return [entry.batch, *follow]


def latest_entries(entries: dict[str, Entry]) -> dict[str, Entry]:
    """The entries, each with its latest attempt as `batch` (a copy where that is a retry batch)."""
    out = {}
    for name, entry in entries.items():
        records = attempt_records(entry)
        out[name] = entry.model_copy(update={"batch": records[-1]}) if len(records) > 1 else entry
    return out


def attempts_phrase(entry: Entry, latest: BatchRecord, policy: RetryPolicy | None) -> str | None:
    """"4,988 of 5,000 requests done over 2 attempts", or "3 of 3 attempts used; 12 requests without
    a result", once the latest attempt (`latest`, as the server says now) has ended; None for a spec
    that neither retries nor has retried, or while its latest attempt runs.

    Counted from the batches' request counts: a retry sends only requests with no result yet,
    so the requests done are the sum of every attempt's completed ones."""
    return shards_attempts_phrase([(entry, latest)], policy)


def shards_attempts_phrase(shards: list[tuple[Entry, BatchRecord | None]], policy: RetryPolicy | None) -> str | None:
    """`attempts_phrase` of a spec split into shards (each shard's entry and latest record), summed over
    its shards, once every shard's latest attempt has ended: "over N attempts" is the most any shard
    made, and the attempts are "used" once every shard with requests left has made its last."""
    made, total, done, out_of_attempts = 0, 0, 0, True
    most = policy.max_attempts if policy is not None else 1  # without a policy, no more are made
    for entry, latest in shards:
        records = attempt_records(entry)
        if not records or latest is None or not latest.terminal:
            return None
        records[-1] = latest
        shard_total = (records[0].request_counts or {}).get("total", 0)
        shard_done = min(sum((rec.request_counts or {}).get("completed", 0) for rec in records), shard_total)
        made, total, done = max(made, len(records)), total + shard_total, done + shard_done
        out_of_attempts &= shard_done == shard_total or len(records) >= most
    if policy is None and made == 1:
        return None
    counted = RetrySelection(total=total, succeeded=done, reasons=Counter(), kept=Counter(), spans=(), sha256="",
                             size=0)
    # a spec whose retry: was removed has used what it made
    return status_phrase(counted, made, policy or RetryPolicy(max_attempts=min(made, MAX_ATTEMPTS)),
                         used=out_of_attempts)


@dataclass(frozen=True)
class AttemptsView:
    """What the results stage knows of one spec's attempts, for build_plan.

    records:   every attempt, oldest first, as the server says now.
    selection: the lines to send again, read from every attempt's result files; None when
               the latest attempt has not ended in a way a retry follows, or none are left.
    found:     a retry batch the state's retry intent made, on the server but not recorded
               (an apply that lost the create's answer or was killed); None when there is none.
    """

    records: tuple[BatchRecord, ...]
    selection: RetrySelection | None = None
    found: dict | None = None

    @property
    def latest(self) -> BatchRecord:
        return self.records[-1]

    @property
    def made(self) -> int:
        return len(self.records)


def _retrying(want: Desired, state: State | None) -> Entry | None:
    """The entry of a spec that may retry: a policy, a local input, and its batch made from this very spec."""
    entry = state.entries.get(want.name) if state else None
    if want.retry is None or want.input is None or entry is None or entry.batch is None:
        return None
    return entry if entry.spec_hash == want.spec_hash else None


async def read_attempts(api: Api, desired: list[Desired], state: State | None, remote: RemoteView, *,
                        root: Path, cache: ResultsCache) -> dict[str, AttemptsView]:
    """The results stage of a plan: name -> AttemptsView for every spec that retries. Only reads the server."""
    wanted = {want.name: (want, entry) for want in desired if (entry := _retrying(want, state))}
    if not wanted:
        return {}
    running = [(rec.id, rec.created_at) for _, entry in wanted.values() for rec in attempt_records(entry)[1:]
               if not rec.terminal]
    fetched, _ = await fetch_batches(api, running)
    lost = await _lost_retries(api, {name: entry for name, (_, entry) in wanted.items()})
    views = {}
    for name, (want, entry) in sorted(wanted.items()):
        records = tuple(_now(rec, remote.batches, fetched) for rec in attempt_records(entry))
        if records[0].id in remote.missing:
            continue  # the plan makes a new batch
        selection = await _selection(api, want, records, root, cache)
        found = lost.get(name) if selection is not None and _due(entry, want, len(records)) else None
        views[name] = AttemptsView(records, selection, found)
    return views


async def read_attempts_all(session: Session, desired: list[Desired], state: State | None, remote: RemoteView, *,
                            root: Path, cache: ResultsCache) -> dict[str, AttemptsView]:
    """`read_attempts` on each provider whose specs retry, with that provider's client, merged. A spec whose
    provider moved (remote.moved_provider) is left out: its attempts are on a server no longer asked."""
    groups: dict[str | None, list[Desired]] = {}
    for want in desired:
        entry = _retrying(want, state)
        if entry is not None and not moved_provider(entry, remote.base_urls):
            groups.setdefault(want.provider, []).append(want)
    session.require(groups)

    async def one(provider: str | None) -> dict[str, AttemptsView]:
        return await read_attempts(await session.client(provider), groups[provider], state, remote, root=root,
                                   cache=cache)

    views: dict[str, AttemptsView] = {}
    for found in await asyncio.gather(*(one(p) for p in groups)):
        views.update(found)
    return dict(sorted(views.items()))


def _now(record: BatchRecord, *fresh: dict[str, dict]) -> BatchRecord:
    """The record as the server said it during this plan, where it was asked."""
    for batches in fresh:
        if record.id in batches:
            return BatchRecord.from_api(batches[record.id])
    return record


def _due(entry: Entry, want: Desired, made: int) -> bool:
    """Whether the entry's retry intent is for the attempt due now, of this very spec."""
    intent = entry.retries.intent if entry.retries else None
    return intent is not None and intent.attempt == made + 1 and intent.tag == attempt_tag(want.spec_hash,
                                                                                           intent.attempt)


async def _lost_retries(api: Api, entries: dict[str, Entry]) -> dict[str, dict]:
    """name -> the retry batch its recorded intent made, where the server has one the state does not."""
    intents = {name: e.retries.intent for name, e in entries.items() if e.retries and e.retries.intent}
    if not intents:
        return {}
    # found through the retry inputs' uploads, down to the oldest of them: no clock is read (remote.find_batches)
    inputs = [entries[name].fields.model_copy(update={"input_sha256": intent.input_sha256, "input_file_id": None})
              for name, intent in intents.items()]
    tagged = (await find_batches(api, inputs)).tagged
    found = {}
    for name, intent in intents.items():
        known = {rec.id for rec in attempt_records(entries[name])}
        if batch := find_tagged(tagged, name, intent.tag, known):
            found[name] = batch
    return found


async def _selection(api: Api, want: Desired, records: tuple[BatchRecord, ...], root: Path,
                     cache: ResultsCache) -> RetrySelection | None:
    """The lines to send again, once the latest attempt has ended and attempts are left; else None."""
    assert want.retry is not None and want.input is not None
    if records[-1].status not in RETRY_ENDS or len(records) >= want.retry.max_attempts or _all_done(records):
        return None
    files = await asyncio.gather(*(_attempt_files(api, rec, cache) for rec in records))
    shard = (want.shard.start, want.shard.end) if want.shard else None  # a shard's retry: its lines only
    return retry_candidates(root / want.input, classify_results(files), want.retry, shard)


def _all_done(records: tuple[BatchRecord, ...]) -> bool:
    """Whether the batches' own counts say every request succeeded: then no result file is read."""
    total = (records[0].request_counts or {}).get("total")
    return bool(total) and sum((rec.request_counts or {}).get("completed", 0) for rec in records) >= total


async def _attempt_files(api: Api, record: BatchRecord, cache: ResultsCache) -> AttemptFiles:
    output, errors = record.output_file_id, record.error_file_id
    return AttemptFiles(await cache.fetch(api, output) if output else None,
                        await cache.fetch(api, errors) if errors else None)


def retry_desired(want: Desired, attempt: int, selection: RetrySelection, root: Path, work: Path) -> Desired:
    """The retry input as a Desired the uploader and the estimate take like any input.

    Its lines are written (streamed, checked against the selection's sha256) to
    `work/inputs/NAME/STEM.attempt-N.jsonl` unless that file already holds them, so the
    upload is named `STEM.attempt-N.batchplan-<sha256>.jsonl` (retries.retry_filename):
    content-addressed, and found again by that name after a lost answer."""
    assert want.input is not None
    path = work / "inputs" / want.name / f"{Path(want.input).stem}.attempt-{attempt}.jsonl"
    if not path.is_file() or hash_file(path) != selection.sha256:
        write_retry_input(root / want.input, selection, path)
    shown = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
    return dataclasses.replace(want, input=shown, input_sha256=selection.sha256, input_bytes=selection.size,
                               requests=selection.requests, shard=None)  # the whole retry file, even for a shard
