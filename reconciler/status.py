"""`batchplan status`: one row per batch in the state, as a rich table or the status JSON document.

The rows are built from a Snapshot (remote.take_snapshot: the server is asked only about
batches still running); nothing here talks to the server or writes the state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .batch import BatchStatus, combined_status, short_id, status_tally
from .remote import Snapshot
from .spec import shard_of, spec_of
from .state import Entry

STATUS_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class StatusRow:
    """One line of `batchplan status`."""

    name: str
    batch_id: str | None
    status: str
    completed: int
    failed: int
    total: int
    created_at: int | None
    output_file_id: str | None
    error_file_id: str | None
    note: str = ""
    shards: int = 0  # a spec's line that stands for this many shards (their rows follow with --shards)


def status_rows(entries: dict[str, Entry], snapshot: Snapshot, shards: bool = False) -> list[StatusRow]:
    """One row per batch; a spec split into shards is one row with their counts summed, followed by
    one row per shard when `shards`. `entries` are in address order (state.select_entries)."""
    groups: dict[str, list[StatusRow]] = {}
    for name in entries:
        groups.setdefault(spec_of(name), []).append(_batch_row(name, snapshot, entries[name]))
    out = []
    for spec, rows in groups.items():
        if len(rows) == 1 and rows[0].name == spec:
            out += rows
        else:
            out += [_spec_row(spec, rows), *(rows if shards else [])]
    return out


def with_attempts(rows: list[StatusRow], phrases: dict[str, str]) -> list[StatusRow]:
    """The rows with what each name's attempts came to (attempts.attempts_phrase) added to its note."""
    return [replace(r, note="; ".join(filter(None, (r.note, phrases[r.name])))) if r.name in phrases else r
            for r in rows]


def _batch_row(name: str, snapshot: Snapshot, entry: Entry) -> StatusRow:
    """The row of one address, whose state entry is `entry`."""
    rec = snapshot.records.get(name)
    if rec is None:
        return StatusRow(name, None, "none", 0, 0, 0, None, None, None,
                         "no batch: an apply was interrupted before creating it; run `batchplan apply`")
    counts = rec.request_counts or {}
    status = "missing" if name in snapshot.missing else rec.status
    by_hand = None if entry.cancelled_by_batchplan(rec) else rec.cancelled_outside(name)
    note = "the server has no such batch (404)" if name in snapshot.missing else by_hand or rec.error_codes()
    return StatusRow(name, rec.id, status, counts.get("completed", 0), counts.get("failed", 0),
                     counts.get("total", 0), rec.created_at, rec.output_file_id if rec.terminal else None,
                     rec.error_file_id if rec.terminal else None, note)


def _spec_row(spec: str, rows: list[StatusRow]) -> StatusRow:
    """A spec's shards as one row: the combined status, the summed counts, the oldest age."""
    statuses = [r.status for r in rows]
    created = [r.created_at for r in rows if r.created_at is not None]
    notes = sorted({r.note for r in rows if r.note and r.batch_id})
    tally = status_tally(statuses) if len(set(statuses)) > 1 else ""
    return StatusRow(spec, None, combined_status(statuses), sum(r.completed for r in rows),
                     sum(r.failed for r in rows), sum(r.total for r in rows), min(created) if created else None,
                     None, None, "; ".join(part for part in [tally, *notes] if part), shards=len(rows))


def age(seconds: float) -> str:
    """3s, 4m 05s, 2h 07m, 3d 04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def status_document(table: list[StatusRow], now: float) -> dict:
    """The `status --json` document (format_version 1); keep it stable."""
    return {"format_version": STATUS_FORMAT_VERSION, "batches": [
        {"name": r.name, "spec": spec_of(r.name), "shard": shard_of(r.name), "shards": r.shards or None,
         "batch_id": r.batch_id, "status": r.status,
         "request_counts": {"completed": r.completed, "failed": r.failed, "total": r.total},
         "created_at": r.created_at, "age_seconds": None if r.created_at is None else int(now - r.created_at),
         "output_file_id": r.output_file_id, "error_file_id": r.error_file_id, "note": r.note or None}
        for r in table]}


def _row_style(row: StatusRow) -> str | None:
    if row.status == "completed":
        return "green"
    return "red" if row.status == "missing" or BatchStatus(row.status).failed else None


def status_table(table: list[StatusRow], now: float, wide: bool = False):
    """A rich Table of the rows that never cuts a name or a status short: a column that does not fit
    wraps. Short batch ids; `wide` adds the full ids and the result file ids (rich is imported here:
    only status needs it)."""
    from rich import box
    from rich.table import Table

    grid = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    columns = ["name", "batch", "status", "done", "failed", "age"] + ["output", "errors"] * wide
    status_width = max(len(r.status) for r in table)
    for column in columns:
        numeric = column in ("done", "failed", "age")
        grid.add_column(column, justify="right" if numeric else "left", overflow="fold",
                        no_wrap=numeric or column == "status", min_width=status_width if column == "status" else None)
    for r in table:
        batch = f"{r.shards} shards" if r.shards else "-" if r.batch_id is None else \
            r.batch_id if wide else short_id(r.batch_id)
        cells = [r.name, batch, r.status, f"{r.completed}/{r.total}", str(r.failed),
                 "-" if r.created_at is None else age(now - r.created_at)]
        grid.add_row(*cells, *([r.output_file_id or "-", r.error_file_id or "-"] if wide else []),
                     style=_row_style(r))
    return grid


def status_notes(table: list[StatusRow]) -> list[str]:
    """The notes of the rows that have one, as `name: note` (printed under the table, where they can wrap)."""
    return [f"{r.name}: {r.note}" for r in table if r.note]
