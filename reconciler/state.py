"""The state: which batch batchplan made for each spec name, from which fields, and what came before.

These are the models only. Where the state lives, how it is locked, loaded and saved
(atomically, with a backup, compare-and-swap on `serial`) is a store's business:
see stores/base.py and stores/file.py.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from .batch import BatchFields, BatchRecord, BatchStatus
from .errors import ConfigError
from .spec import ADDRESS_PATTERN, address_key, spec_of

__all__ = ["FORMAT_VERSION", "UPGRADE", "BatchFields", "BatchRecord", "BatchStatus", "Entry", "HistoryItem", "Intent",
           "Retries", "RetryIntent", "ShardPart", "State", "Upload", "format_refusal", "select_entries"]

FORMAT_VERSION = 1
UPGRADE = "upgrade batchplan to use this state"  # the fix for a state a newer batchplan wrote, in every store


class Intent(BaseModel):
    """A create about to be sent: recorded first, so a lost answer can be found by its tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec_hash: str
    fields: BatchFields
    tags: dict[str, str]
    at: int


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    spec_hash: str
    status: str
    replaced_at: int
    provider: str | None = Field(default=None, exclude_if=lambda value: value is None)  # where that batch is


class RetryIntent(BaseModel):
    """A retry batch about to be made: recorded first, so a lost answer is found by its tag.

    `tag`: the `batchplan_spec` value the batch carries (the spec hash and the attempt, see
    retries.attempt_tag); `input_sha256`: the retry input's content address."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempt: int
    tag: str
    input_sha256: str
    at: int


class Retries(BaseModel):
    """The follow-up batches of an entry's batch: attempts 2 and up, oldest first.

    `first` is the id of the batch they follow (attempt 1). When the entry's batch is no
    longer that one (a replace made a new batch), these retries are of the old one and count
    for nothing (retries.py: `attempt_records`)."""

    model_config = ConfigDict(extra="forbid")

    first: str
    batches: list[BatchRecord] = Field(default_factory=list)
    intent: RetryIntent | None = None

    def record(self, fresh: BatchRecord) -> bool:
        """Replace the record of the batch with fresh's id, if it is one of these; whether it changed."""
        for index, known in enumerate(self.batches):
            if known.id == fresh.id and known != fresh:
                self.batches[index] = fresh
                return True
        return False


class ShardPart(BaseModel):
    """Which part of its spec's input a shard's batch was made from: shard `index`, lines
    first_line..last_line, bytes [start, end). Download merges shards' results by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    start: int
    end: int
    first_line: int
    last_line: int


class Entry(BaseModel):
    """One address (a spec name, or NAME[K] for a shard): the batch made for it, from which
    fields, and what came before."""

    model_config = ConfigDict(extra="forbid")

    spec_hash: str
    fields: BatchFields
    batch: BatchRecord | None = None
    intent: Intent | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    prevent_cancel: bool = False
    # Follow-up batches of `batch` (a spec's `retry:`), and the part of the input a shard's entry holds;
    # each written only when set, so the entries of specs that fit one batch and never retried stay as they were
    retries: Retries | None = Field(default=None, exclude_if=lambda value: value is None)
    shard: ShardPart | None = Field(default=None, exclude_if=lambda value: value is None)
    # A named provider's base_url when the batch was made there: a profile moved since is shown as
    # drift by the plan, not followed (its batch is not on the new server). None for the environment's.
    base_url: str | None = Field(default=None, exclude_if=lambda value: value is None)
    # The id of `batch` when an apply is cancelling it (a removed spec's, a replaced one), written before the
    # cancel is sent: a state cut off after it then knows the cancel was batchplan's, not someone's by hand.
    cancel_sent: str | None = Field(default=None, exclude_if=lambda value: value is None)

    def cancelled_by_batchplan(self, record: BatchRecord) -> bool:
        """Whether `record` (this entry's batch, as the server has it now) is cancelled, or being
        cancelled, by an apply of batchplan's own that was cut off before it recorded so: then the
        entry has no batch of its spec, as after a clean cancel."""
        return record.id == self.cancel_sent and record.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)

    @property
    def provider(self) -> str | None:
        """The named provider this entry's batch (and its retries) are on (None: the environment's)."""
        return self.fields.provider


class Upload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file_id: str
    bytes: int


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: StrictInt = FORMAT_VERSION  # strict: "2" or 2.0 is never read as a format (format_refusal)
    lineage: str = Field(default_factory=lambda: str(uuid.uuid4()))
    serial: int = 0
    created_at: int = Field(default_factory=lambda: int(time.time()))
    scan_floor: int | None = None  # read by no one since the search goes through the uploads; kept so older
    #                                state files still load
    uploads: dict[str, Upload] = Field(default_factory=dict)  # sha256 -> the environment provider's upload
    # named provider -> sha256 -> its upload there: a file id is only good on the server that gave it
    provider_uploads: dict[str, dict[str, Upload]] = Field(default_factory=dict, exclude_if=lambda value: not value)
    entries: dict[str, Entry] = Field(default_factory=dict)

    @field_validator("entries")
    @classmethod
    def _spec_names(cls, entries: dict[str, Entry]) -> dict[str, Entry]:
        """Names become paths (`results/<name>/`): a hand-edited `../../x` must not."""
        for name in entries:
            if not re.fullmatch(ADDRESS_PATTERN, name):
                raise ValueError(f"{name!r} is not a name batchplan gives a spec (letters, digits, '.', '_', '-'; "
                                 "NAME[K] for a shard)")
        return entries

    def uploads_on(self, provider: str | None) -> dict[str, Upload]:
        """sha256 -> upload, on one provider (None: the environment's)."""
        return self.provider_uploads.setdefault(provider, {}) if provider else self.uploads

    def all_uploads(self) -> list[tuple[str, Upload]]:
        """(sha256, upload) of every upload recorded, on any provider."""
        return [*self.uploads.items(), *(item for on in self.provider_uploads.values() for item in on.items())]

    def server_now(self) -> int | None:
        """The latest server time the state has seen (its newest batch's created_at): never after the
        server's clock now, and never read from ours."""
        return max((e.batch.created_at for e in self.entries.values() if e.batch), default=None)

    def record_batches(self, records: dict[str, BatchRecord]) -> list[str]:
        """Copy newer records of the batches the entries name (same id only); the names that changed."""
        changed = []
        for name, fresh in records.items():
            entry = self.entries.get(name)
            if entry and entry.batch and entry.batch.id == fresh.id and entry.batch != fresh:
                entry.batch = fresh
                changed.append(name)
            elif entry and entry.retries and entry.retries.record(fresh):  # the latest is a retry batch
                changed.append(name)
        return changed

    def to_json(self) -> str:
        # orjson: sorted and indented as json.dumps did (non-ASCII as UTF-8, not \u escapes), ~5x faster
        text = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        return text.decode() + "\n"


def _format_verdict(version: object, known: int) -> Literal["ok", "newer", "wrong"]:
    """Whether a saved document's `format_version` is exactly the int `known` ("ok"), a later one ("newer":
    made by a newer batchplan), or anything else ("wrong").

    Compared strictly: "2", 2.0 and true are not 2 (a lax read took "2" for a format it could read),
    though a number or numeric text above `known` still says "newer" rather than "damaged"."""
    if type(version) is int and version == known:
        return "ok"
    try:
        number = float(version) if isinstance(version, int | float | str) and not isinstance(version, bool) else None
    except ValueError:
        number = None
    return "newer" if number is not None and number > known else "wrong"


def format_refusal(version: object, known: int, kind: str, *, newer_fix: str, wrong_fix: str) -> str | None:
    """Why a saved document with this `format_version` cannot be read, or None when it is `known`: the one
    wording of every refusal (`kind`: "state", "plan file"), ending with the fix for each case."""
    verdict = _format_verdict(version, known)
    if verdict == "newer":
        return f"written by a newer batchplan ({kind} format {version}, this one reads {known}); {newer_fix}"
    if verdict == "wrong":
        return (f"format_version: {version!r} is not a {kind} format this batchplan reads (the integer {known}); "
                f"{wrong_fix}")
    return None


def select_entries(state: State | None, names: tuple[str, ...]) -> dict[str, Entry]:
    """The state entries named (all of them when none are), shards in order. A spec's name
    names all its shards: `big` selects big[0], big[1], ..."""
    entries = state.entries if state else {}
    chosen = expand_names(names, entries)
    unknown = sorted(n for n in names if n not in chosen and not any(spec_of(c) == n for c in chosen))
    if unknown:
        known = ", ".join(sorted(entries, key=address_key)) or "none"
        raise ConfigError(f"no batch named {', '.join(unknown)} in the state (known: {known}); "
                          "`batchplan state list` shows them")
    selected = chosen if names else set(entries)
    return {name: entries[name] for name in sorted(selected, key=address_key)}


def expand_names(names: tuple[str, ...] | frozenset[str], addresses) -> set[str]:
    """The addresses among `addresses` that `names` name: an address itself, or every shard of a
    spec name (`big` -> big[0], big[1], ...)."""
    wanted = set(names)
    return {a for a in addresses if a in wanted or spec_of(a) in wanted}
