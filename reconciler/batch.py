"""One vocabulary of batches: their statuses, the fields they are made from, and what we last knew of one.

    BatchStatus   the server's status, and what it means to batchplan (running, terminal, failed)
    BatchFields   what a batch is made from: what specs ask for, the state records and plans diff
    BatchRecord   what we last knew of a batch on the server, with its error codes and counts in words
    check_batch_id  a batch id a user typed, refused unless it looks like one (`batch_...`)

Every module asks these instead of keeping its own set of statuses or its own phrase.
"""

from __future__ import annotations

import re
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError

# The API's batch ids are `batch_` and letters and digits. An id goes into a URL path, so
# `../files` would reach another endpoint: what does not look like an id is never sent.
BATCH_ID = re.compile(r"batch_[A-Za-z0-9_-]{1,200}")


def check_batch_id(raw: str) -> str:
    """`raw` when it looks like a batch id; ConfigError (nothing sent) when it does not."""
    if not BATCH_ID.fullmatch(raw):
        raise ConfigError(f"{raw!r} is not a batch id: the API's batch ids look like batch_abc123 (`batchplan "
                          "status` and the API's batch list show them); nothing was sent")
    return raw


SHORT_ID_CHARS = 8  # of an id's hex part: enough to tell one's batches apart, short enough for 80 columns


def short_id(identifier: str) -> str:
    """`batch_3f2a9c1d…` for `batch_3f2a9c1d0b…`: the prefix and SHORT_ID_CHARS characters (ids as they are
    when no longer than that)."""
    prefix, sep, rest = identifier.rpartition("_") if "_" in identifier else identifier.rpartition("-")
    if len(rest) <= SHORT_ID_CHARS + 1:
        return identifier
    return f"{prefix}{sep}{rest[:SHORT_ID_CHARS]}…"


class BatchStatus(str, Enum):
    """A batch's status, as the API names it, and what each means here.

    running:    work is under way that a cancel would stop (validating, in_progress, finalizing).
    terminal:   it never changes again (completed, failed, expired, cancelled): nobody asks about it.
    failed:     terminal without completing (failed, expired, cancelled).
    cancelling: a cancel is under way: not running (there is nothing left to cancel, so a plan
                forgets it rather than cancelling it again) and not terminal (it still changes,
                so refresh keeps asking about it).
    UNKNOWN stands for a status this batchplan does not know (a newer API): it is treated like
    cancelling, as neither running nor terminal.
    """

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> BatchStatus:
        return cls.UNKNOWN

    @property
    def running(self) -> bool:
        return self in _RUNNING

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def failed(self) -> bool:
        return self in _FAILED


_RUNNING = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING})
_FAILED = frozenset({BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
_TERMINAL = _FAILED | {BatchStatus.COMPLETED}


# Which status stands for several batches (a spec's shards): the first of these that any has.
# Trouble first (a batch gone or never made), then the least advanced running one (the spec is
# as far as its slowest shard), and only when all finished, how the worst one ended.
_COMBINED_ORDER = ("missing", "none", "validating", "in_progress", "finalizing", "cancelling", "unknown",
                   "failed", "expired", "cancelled", "completed")


def combined_status(statuses: list[str]) -> str:
    """The one status that stands for several batches, e.g. the shards of one spec (see _COMBINED_ORDER)."""
    present = {s if s in _COMBINED_ORDER else "unknown" for s in statuses}
    return next((s for s in _COMBINED_ORDER if s in present), "unknown")


def status_tally(statuses: list[str]) -> str:
    """`3 shards: 2 completed, 1 in_progress` (in _COMBINED_ORDER)."""
    counts = {s: statuses.count(s) for s in sorted(set(statuses), key=lambda s: (
        _COMBINED_ORDER.index(s) if s in _COMBINED_ORDER else len(_COMBINED_ORDER), s))}
    return f"{len(statuses)} shards: " + ", ".join(f"{n} {s}" for s, n in counts.items())


class BatchFields(BaseModel):
    """What a batch is made from: the view that plans diff, the state records and the JSON plan shows.

    A local input is named by its repo-relative path and content hash; an uploaded one by its
    file id. The field names are the state file's and the JSON plan's keys: keep them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str
    completion_window: str
    metadata: dict[str, str] = Field(default_factory=dict)
    output_expires_after: dict | None = None
    input: str | None = None
    input_sha256: str | None = None
    input_file_id: str | None = None
    # The named provider the batch is made on (providers.py). Left out when None, so the fields of a
    # spec that names none dump, hash and diff exactly as they did before providers existed.
    provider: str | None = Field(default=None, exclude_if=lambda value: value is None)


class BatchRecord(BaseModel):
    """What we last knew of a batch on the server (refreshed by plan, apply, refresh)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    status: str  # a str, not a BatchStatus: a status a newer API adds is kept as it was said
    created_at: int
    input_file_id: str
    request_counts: dict[str, int] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] | None = None

    @classmethod
    def from_api(cls, batch: dict) -> BatchRecord:
        errors = (batch.get("errors") or {}).get("data") or None
        return cls(
            id=batch["id"], status=batch["status"], created_at=batch["created_at"],
            input_file_id=batch["input_file_id"], request_counts=batch.get("request_counts"),
            output_file_id=batch.get("output_file_id"), error_file_id=batch.get("error_file_id"),
            errors=errors,
        )

    @property
    def running(self) -> bool:
        return BatchStatus(self.status).running

    @property
    def terminal(self) -> bool:
        return BatchStatus(self.status).terminal

    @property
    def failed(self) -> bool:
        return BatchStatus(self.status).failed

    @classmethod
    def combined(cls, records: list[BatchRecord]) -> BatchRecord:
        """What several batches (a spec's shards) say together, for displays: the combined status,
        the summed request counts, the oldest creation time; its id says how many they are."""
        counts: dict[str, int] = {}
        for rec in records:
            for key, value in (rec.request_counts or {}).items():
                counts[key] = counts.get(key, 0) + value
        errors = [e for rec in records for e in rec.errors or []]
        return cls(id=f"{len(records)} shards", status=combined_status([r.status for r in records]),
                   created_at=min(r.created_at for r in records), input_file_id="",
                   request_counts=counts or None, errors=errors or None)

    def error_codes(self) -> str:
        """The batch-level error codes, sorted and joined: `invalid_json_line, too_many_tasks`; "" for none."""
        return ", ".join(sorted({e.get("code") or "?" for e in self.errors or []}))

    def cancelled_outside(self, name: str, detail: str = "") -> str | None:
        """`was cancelled outside batchplan; ...` for a recorded batch cancelled (or being cancelled) by hand;
        None for any other status. batchplan's own cancels take a batch out of the state (a removed spec,
        a replaced batch), so a recorded batch in this state was stopped by someone, on purpose: it is
        said, and not run again unless asked."""
        done = {BatchStatus.CANCELLING: "is being cancelled", BatchStatus.CANCELLED: "was cancelled"}.get(
            BatchStatus(self.status))
        return done and f"{done} outside batchplan{detail}; `batchplan apply --replace {name}` runs it again"

    def counts_phrase(self, with_failed: bool = True) -> str:
        """`3/5 requests completed`, with `, 1 failed` when any failed (and `with_failed`)."""
        counts = self.request_counts or {}
        failed = f", {counts.get('failed', 0)} failed" if counts.get("failed") and with_failed else ""
        return f"{counts.get('completed', 0)}/{counts.get('total', 0)} requests completed{failed}"
