"""`batchplan status`: one row per batch in the state, as a rich table or the status JSON document.

The rows are built from a Snapshot (remote.take_snapshot: the server is asked only about
batches still running); nothing here talks to the server or writes the state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .batch import BatchStatus, short_id
from .remote import Snapshot
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


def status_rows(entries: dict[str, Entry], snapshot: Snapshot) -> list[StatusRow]:
    out = []
    for name, entry in entries.items():
        rec = snapshot.records.get(name)
        if rec is None:
            out.append(StatusRow(name, None, "none", 0, 0, 0, None, None, None,
                           "no batch: an apply was interrupted before creating it; run `batchplan apply`"))
            continue
        counts = rec.request_counts or {}
        status = "missing" if name in snapshot.missing else rec.status
        note = "the server has no such batch (404)" if name in snapshot.missing else rec.error_codes()
        out.append(StatusRow(name, rec.id, status, counts.get("completed", 0), counts.get("failed", 0),
                       counts.get("total", 0), rec.created_at, rec.output_file_id if rec.terminal else None,
                       rec.error_file_id if rec.terminal else None, note))
    return out


def with_attempts(rows: list[StatusRow], phrases: dict[str, str]) -> list[StatusRow]:
    """The rows with what each name's attempts came to (attempts.attempts_phrase) added to its note."""
    return [replace(r, note="; ".join(filter(None, (r.note, phrases[r.name])))) if r.name in phrases else r
            for r in rows]


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
        {"name": r.name, "batch_id": r.batch_id, "status": r.status,
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
        batch = "-" if r.batch_id is None else r.batch_id if wide else short_id(r.batch_id)
        cells = [r.name, batch, r.status, f"{r.completed}/{r.total}", str(r.failed),
                 "-" if r.created_at is None else age(now - r.created_at)]
        grid.add_row(*cells, *([r.output_file_id or "-", r.error_file_id or "-"] if wide else []),
                     style=_row_style(r))
    return grid


def status_notes(table: list[StatusRow]) -> list[str]:
    """The notes of the rows that have one, as `name: note` (printed under the table, where they can wrap)."""
    return [f"{r.name}: {r.note}" for r in table if r.note]
