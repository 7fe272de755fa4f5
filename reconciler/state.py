"""The state: which batch batchplan made for each spec name, from which fields, and what came before.

These are the models only. Where the state lives, how it is locked, loaded and saved
(atomically, with a backup, compare-and-swap on `serial`) is a store's business:
see stores/base.py and stores/file.py.
"""

from __future__ import annotations

import re
import time
import uuid

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .batch import BatchFields, BatchRecord, BatchStatus
from .errors import ConfigError
from .spec import NAME_PATTERN

__all__ = ["FORMAT_VERSION", "BatchFields", "BatchRecord", "BatchStatus", "Entry", "HistoryItem", "Intent", "State",
           "Upload", "select_entries"]

FORMAT_VERSION = 1


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


class Entry(BaseModel):
    """One spec name: the batch made for it, from which fields, and what came before."""

    model_config = ConfigDict(extra="forbid")

    spec_hash: str
    fields: BatchFields
    batch: BatchRecord | None = None
    intent: Intent | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    prevent_cancel: bool = False
    # A named provider's base_url when the batch was made there: a profile moved since is shown as
    # drift by the plan, not followed (its batch is not on the new server). None for the environment's.
    base_url: str | None = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def provider(self) -> str | None:
        """The named provider this entry's batch is on (None: the environment's)."""
        return self.fields.provider


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
    uploads: dict[str, Upload] = Field(default_factory=dict)  # sha256 -> the environment provider's upload
    # named provider -> sha256 -> its upload there: a file id is only good on the server that gave it
    provider_uploads: dict[str, dict[str, Upload]] = Field(default_factory=dict, exclude_if=lambda value: not value)
    entries: dict[str, Entry] = Field(default_factory=dict)

    @field_validator("entries")
    @classmethod
    def _spec_names(cls, entries: dict[str, Entry]) -> dict[str, Entry]:
        """Names become paths (`results/<name>/`): a hand-edited `../../x` must not."""
        for name in entries:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a name batchplan gives a spec (letters, digits, '.', '_', '-')")
        return entries

    def uploads_on(self, provider: str | None) -> dict[str, Upload]:
        """sha256 -> upload, on one provider (None: the environment's)."""
        return self.provider_uploads.setdefault(provider, {}) if provider else self.uploads

    def all_uploads(self) -> list[tuple[str, Upload]]:
        """(sha256, upload) of every upload recorded, on any provider."""
        return [*self.uploads.items(), *(item for on in self.provider_uploads.values() for item in on.items())]

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


def select_entries(state: State | None, names: tuple[str, ...]) -> dict[str, Entry]:
    """The state entries named (all of them when none are), sorted by name."""
    entries = state.entries if state else {}
    unknown = sorted(set(names) - set(entries))
    if unknown:
        known = ", ".join(sorted(entries)) or "none"
        raise ConfigError(f"no batch named {', '.join(unknown)} in the state (known: {known}); "
                          "`batchplan state list` shows them")
    return {name: entries[name] for name in sorted(set(names) or entries)}
