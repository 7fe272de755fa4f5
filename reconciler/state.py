"""The state: which batch batchplan made for each spec name, from which fields, and what came before.

These are the models only. Where the state lives, how it is locked, loaded and saved
(atomically, with a backup, compare-and-swap on `serial`) is a store's business:
see stores/base.py and stores/file.py.
"""

from __future__ import annotations

import time
import uuid

import orjson
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
RUNNING = frozenset({"validating", "in_progress", "finalizing"})


class BatchRecord(BaseModel):
    """What we last knew of a batch on the server (refreshed by plan, apply, refresh)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    status: str
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
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Intent(BaseModel):
    """A create about to be sent: recorded first, so a lost answer can be found by its tags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec_hash: str
    fields: dict
    tags: dict[str, str]
    at: int


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    spec_hash: str
    status: str
    replaced_at: int


class Entry(BaseModel):
    """One spec name: the batch made for it, from which fields, and what came before."""

    model_config = ConfigDict(extra="forbid")

    spec_hash: str
    fields: dict
    batch: BatchRecord | None = None
    intent: Intent | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    prevent_cancel: bool = False


class Upload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file_id: str
    bytes: int


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    lineage: str = Field(default_factory=lambda: str(uuid.uuid4()))
    serial: int = 0
    created_at: int = Field(default_factory=lambda: int(time.time()))
    scan_floor: int | None = None
    uploads: dict[str, Upload] = Field(default_factory=dict)
    entries: dict[str, Entry] = Field(default_factory=dict)

    def record_batches(self, records: dict[str, BatchRecord]) -> list[str]:
        """Copy newer records of the batches the entries name (same id only); the names that changed."""
        changed = []
        for name, fresh in records.items():
            entry = self.entries.get(name)
            if entry and entry.batch and entry.batch.id == fresh.id and entry.batch != fresh:
                entry.batch = fresh
                changed.append(name)
        return changed

    def to_json(self) -> str:
        # orjson: sorted and indented as json.dumps did (non-ASCII as UTF-8, not \u escapes), ~5x faster
        text = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        return text.decode() + "\n"
