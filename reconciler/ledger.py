"""The apply's ledger: what an apply writes in the state as it goes, and what it tells the user.

Apply (apply.py) decides what to send; the ledger records each step in the state entry
of its spec name (the intent before a create, the batch once made, the batch it replaced
in the history, the uploads by content hash), keeps the ApplyResult (done / failed by
name) and reports each step as it happens. It saves the state through the command's
transaction: at once where a step must be durable before the next (an intent), and at
most every SAVE_EVERY seconds while creates complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .batch import BatchRecord
from .plan import Action, Change
from .state import Entry, HistoryItem, Intent, Retries, RetryIntent, ShardPart, Upload

if TYPE_CHECKING:
    from .desired import Desired
    from .errors import BatchplanError
    from .stores.base import Transaction

SAVE_EVERY = 0.5  # seconds between state saves while creates complete


@dataclass
class ApplyResult:
    done: dict[str, str] = field(default_factory=dict)      # name -> what was done
    failed: dict[str, str] = field(default_factory=dict)    # name -> why
    queued: dict[str, str] = field(default_factory=dict)    # name -> what it waits for (nothing was sent)


def shard_part(want: Desired) -> ShardPart | None:
    """Which part of its input a shard's batch holds, as the state records it (None: the whole input)."""
    s = want.shard
    return None if s is None else ShardPart(index=s.index, start=s.start, end=s.end, first_line=s.first_line,
                                            last_line=s.last_line)


class Ledger:
    """The state entries, result and report of one apply."""

    def __init__(self, txn: Transaction, report: Callable[[str, str], None]):
        self.txn = txn
        self.state = txn.state
        self.report = report
        self.result = ApplyResult()
        self._last_save = 0.0
        self._fresh: set[str] = set()  # names whose intent this apply recorded, with none before it
        self._maybe_sent: set[str] = set()  # names with a create whose answer was lost
        self._held: dict[str, dict] = {}  # replacements recorded once their old batch is cancelled

    # -- saving --------------------------------------------------------------------------

    def save(self) -> None:
        self.txn.save()  # written only when something changed since the last save
        self._last_save = time.monotonic()

    def save_soon(self) -> None:
        """Save unless the last save was less than SAVE_EVERY seconds ago (1,000 creates: not 1,000 writes)."""
        if time.monotonic() - self._last_save >= SAVE_EVERY:
            self.save()

    # -- intents -------------------------------------------------------------------------

    def record_intent(self, want: Desired, now: int) -> Intent | None:
        """Record the create about to be sent for `want`; the earlier intent for the same spec, if any.

        An earlier intent keeps its time, as a record of when it was first sent; nothing compares
        it with a clock (apply settles on every earlier intent, see Applier.record_intent)."""
        entry = self._entry_for(want)
        earlier = entry.intent if entry.intent and entry.intent.spec_hash == want.spec_hash else None
        if entry.intent is None:
            self._fresh.add(want.name)
        entry.intent = Intent(spec_hash=want.spec_hash, fields=want.fields(), tags=want.tags(),
                              at=earlier.at if earlier else now)
        return earlier

    def intent_of(self, name: str) -> Intent:
        intent = self.state.entries[name].intent
        assert intent is not None, name
        return intent

    def maybe_sent(self, name: str) -> None:
        """A create for `name` got no answer: the server may have made it."""
        self._maybe_sent.add(name)

    def not_sent(self, change: Change) -> None:
        """A create certainly never made: drop the intent this apply recorded for it, so the
        next apply need not wait for it to land. An older intent, or an earlier attempt
        whose answer was lost, keeps it."""
        entry = self.state.entries.get(change.name)
        if entry is None or change.name not in self._fresh or change.name in self._maybe_sent:
            return
        if entry.batch is None and not entry.history:
            del self.state.entries[change.name]
        else:
            entry.intent = None

    # -- batches, uploads, removals ------------------------------------------------------

    def record_batch(self, change: Change, batch: dict, verb: str | None = None) -> None:
        """Record a batch made (or found) for a change.

        A replacement whose old batch is still running is held back until that batch is
        cancelled: a state that named the new batch would plan nothing more, and the old one
        would run on. Until then the intent stands for it, and the next apply finds it by its
        tags and cancels again.
        """
        verb = verb or {Action.ADOPT: "adopted", Action.REPLACE: "replaced by"}.get(change.action, "created")
        self.done(change.name, f"{verb} {batch['id']}")
        if change.cancels_old:
            self._held[change.name] = batch
        else:
            self._write_batch(change, batch)

    def replaced(self, change: Change, old_status: str) -> None:
        """The old batch of a replace is cancelled (or finished): now record the new one."""
        self._write_batch(change, self._held.pop(change.name), old_status=old_status)

    def _write_batch(self, change: Change, batch: dict, old_status: str | None = None) -> None:
        want = change.desired
        assert want is not None
        entry = self._entry_for(want)
        old = entry.batch
        if old and old.id != batch["id"]:
            entry.history.append(HistoryItem(batch_id=old.id, spec_hash=entry.spec_hash,
                                             status=old_status or old.status, replaced_at=int(time.time()),
                                             provider=entry.provider))
        # fields stay exactly the desired ones (the uploaded file id is on the batch record),
        # so the next plan's diff shows only what the user changed
        entry.spec_hash, entry.fields, entry.prevent_cancel = want.spec_hash, want.fields(), want.prevent_cancel
        entry.batch, entry.intent, entry.shard = BatchRecord.from_api(batch), None, shard_part(want)
        entry.base_url, entry.cancel_sent = want.base_url, None

    def record_cancels(self, changes: list[Change]) -> None:
        """Mark each entry whose recorded batch is about to be cancelled (a removed spec's, a replaced
        one), in one write before any cancel is sent: a state cut off after a cancel still tells it
        from one made by hand (Entry.cancel_sent)."""
        for change in changes:
            entry = self.state.entries.get(change.name)
            if entry and entry.batch and change.batch and entry.batch.id == change.batch.id:
                entry.cancel_sent = change.batch.id
        self.save()

    def cancel_not_sent(self, name: str, batch_id: str) -> None:
        """The cancel of `batch_id` was never sent, or the server refused it: it did not happen, so
        the mark goes (a later cancel of that batch, by hand, is not batchplan's)."""
        entry = self.state.entries.get(name)
        if entry is not None and entry.cancel_sent == batch_id:
            entry.cancel_sent = None

    def drop_intent(self, name: str) -> None:
        """The plan kept the name's batch, having searched for what its intent may have made (an
        interrupted apply's create, of this version of the spec or an earlier one) and found nothing
        left to adopt or cancel, or cancelled it: the intent is resolved. One that lands later still
        is the next plan's (its batch runs, so it is searched)."""
        entry = self.state.entries.get(name)
        if entry is not None and entry.intent is not None:
            entry.intent = None

    def update_fields(self, change: Change) -> None:
        """Record the spec's new fields without touching its batch (lifecycle.ignore_changes: nothing is sent)."""
        want, entry = change.desired, self.state.entries[change.name]
        assert want is not None and entry.batch is not None
        entry.spec_hash, entry.fields, entry.prevent_cancel = want.spec_hash, want.fields(), want.prevent_cancel
        self.done(change.name, f"updated the state only; batch {entry.batch.id} kept")

    def record_upload(self, sha256: str, file: dict, provider: str | None = None) -> None:
        self.state.uploads_on(provider)[sha256] = Upload(file_id=file["id"], bytes=file["bytes"])

    def remove(self, name: str, text: str) -> None:
        """The name leaves the state (cancelled or forgotten)."""
        self.state.entries.pop(name, None)
        self.done(name, text)

    def _entry_for(self, want: Desired) -> Entry:
        entry = self.state.entries.get(want.name)
        if entry is None:
            entry = Entry(spec_hash=want.spec_hash, fields=want.fields(), prevent_cancel=want.prevent_cancel,
                          shard=shard_part(want))
            self.state.entries[want.name] = entry
        return entry

    # -- retries: the follow-up batches of an entry's batch (retries.py) ----------------

    def record_retry_intent(self, change: Change, tag: str, sha256: str, now: int) -> RetryIntent | None:
        """Record the retry batch about to be made; the earlier intent for the same attempt, if any
        (it keeps its time: the look for its batch must reach back that far)."""
        assert change.retry is not None
        retries = self._retries_of(change.name)
        known = retries.intent
        earlier = known if known and (known.attempt, known.tag) == (change.retry.attempt, tag) else None
        retries.intent = RetryIntent(attempt=change.retry.attempt, tag=tag, input_sha256=sha256,
                                     at=earlier.at if earlier else now)
        return earlier

    def retry_intent(self, name: str) -> RetryIntent:
        intent = self._retries_of(name).intent
        assert intent is not None, name
        return intent

    def drop_retry_intent(self, name: str) -> None:
        """The retry batch was certainly not made: the next apply need not look for it."""
        self._retries_of(name).intent = None

    def record_retry(self, change: Change, batch: dict, verb: str = "created retry") -> None:
        """Record a retry batch made (or found) for a change, after the attempt it follows."""
        assert change.retry is not None and change.batch is not None
        retries = self._retries_of(change.name)
        self.state.record_batches({change.name: change.batch})  # the attempt it follows, as the plan saw it
        if all(known.id != batch["id"] for known in retries.batches):
            retries.batches.append(BatchRecord.from_api(batch))
        retries.intent = None
        self.done(change.name, f"{verb} {batch['id']} (attempt {change.retry.attempt}, "
                               f"{change.retry.selection.requests:,} requests)")

    def _retries_of(self, name: str) -> Retries:
        """The entry's retries, started afresh when none are recorded for its current batch."""
        entry = self.state.entries[name]
        assert entry.batch is not None, name
        if entry.retries is None or entry.retries.first != entry.batch.id:
            entry.retries = Retries(first=entry.batch.id)
        return entry.retries

    # -- what the user is told -----------------------------------------------------------

    def done(self, name: str, text: str) -> None:
        self.result.done[name] = text
        self.report(name, text)

    def queue(self, name: str, phrase: str) -> None:
        """A create left for a later apply: it waits for enqueued-token capacity (queue.py)."""
        self.result.queued[name] = phrase
        self.report(name, phrase)

    def fail(self, name: str, error: BatchplanError) -> None:
        """A name failed: it is counted failed only, even when a step of it was done before (a replacement
        made, whose old batch then could not be cancelled), and that step is said with the failure."""
        earlier = self.result.done.pop(name, None)
        self.result.failed[name] = f"{earlier}, then failed: {error}" if earlier else str(error)
        self.report(name, f"failed: {error}")
