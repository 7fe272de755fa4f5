"""The retrier: apply's retry stage, which makes each planned retry's follow-up batch once.

A retry goes through the same steps as a create, with the same guarantees: its intent is
recorded first (Entry.retries.intent, one atomic state write), its input is uploaded once
(the selected lines, written per machine by attempts.retry_desired and put on the server by
the Uploader under a content-addressed name), and its create is never sent again blindly:
a create whose answer is lost, or an intent an apply left moments ago, is looked for by its
tag (`batchplan_spec` = the spec hash and the attempt, retries.attempt_tag) first, and
again after a settling delay. A retry batch is made on its spec's provider (providers.py),
where the batches it follows are: its input is uploaded there and looked for there.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .apply import by_provider
from .attempts import retry_desired
from .errors import AmbiguousWrite, ApiError, BatchplanError, Interrupted, TransportError
from .batch import BatchFields
from .remote import find_batches, find_tagged
from .retries import attempt_tag
from .spec import TAG_SPEC

if TYPE_CHECKING:
    from .apply import Applier
    from .desired import Desired
    from .plan import Change
    from .state import RetryIntent

CREATE_ROUNDS = 3


class Retrier:
    """The retries of one apply, carried out with its applier's clients, ledger, uploaders and waits."""

    def __init__(self, applier: Applier):
        self.applier = applier
        self.ledger = applier.ledger
        self._maybe_sent: set[str] = set()  # names whose create got no answer: their intent stays

    async def run(self, changes: list[Change]) -> None:
        for change in changes:
            if change.found:
                self.ledger.record_retry(change, change.found, verb="adopted retry")
        todo = await self._record_intents([c for c in changes if not c.found])
        inputs = self._inputs(todo)
        file_ids = await self._upload([c for c in todo if c.name in inputs], inputs)
        await self._create_all([c for c in todo if c.name in file_ids], inputs, file_ids)

    def _tag(self, change: Change) -> str:
        assert change.desired is not None and change.retry is not None
        return attempt_tag(change.desired.spec_hash, change.retry.attempt)

    # -- intents ---------------------------------------------------------------------------

    async def _record_intents(self, changes: list[Change]) -> list[Change]:
        """Intent before action; an intent an earlier apply left may be a retry still landing (that
        apply was killed mid-request): settle, then look for it, whatever its age (as apply.record_intent).
        Returns the retries still to make."""
        now = int(time.time())
        earlier = []
        for change in changes:
            assert change.retry is not None
            if self.ledger.record_retry_intent(change, self._tag(change), change.retry.selection.sha256, now):
                earlier.append(change)
        self.ledger.save()
        if not earlier:
            return changes
        for change in earlier:
            self.applier.report(change.name, "an earlier apply may have made this retry; looking for it in "
                                             f"{self.applier._settle_seconds():g}s before making it")
        await self.applier.settle()
        absent = await self._look_for(earlier)
        self.ledger.save()
        return [c for c in changes if c not in earlier or c in absent]

    async def _look_for(self, changes: list[Change]) -> list[Change]:
        """Record the retry batch each change's intent may have made; return the changes with none."""
        groups = by_provider(changes)
        absent = await asyncio.gather(*(self._look_for_on(p, cs) for p, cs in groups.items()))
        gone = {id(change) for group in absent for change in group}
        return [change for change in changes if id(change) in gone]  # in the plan's order

    async def _look_for_on(self, provider: str | None, changes: list[Change]) -> list[Change]:
        """`_look_for` on one provider's server, for the retries of the specs that name it."""
        intents: dict[str, RetryIntent] = {c.name: self.ledger.retry_intent(c.name) for c in changes}
        found = await find_batches(self.applier.apis[provider], [_retry_fields(c, intents[c.name]) for c in changes])
        tagged = found.tagged
        absent = []
        for change in changes:
            entry = self.ledger.state.entries[change.name]
            known = {entry.batch.id if entry.batch else "", *(r.id for r in entry.retries.batches)}
            batch = find_tagged(tagged, change.name, intents[change.name].tag, known)
            if batch:
                self.ledger.record_retry(change, batch, verb="found its lost retry on the server:")
            else:
                absent.append(change)
        return absent

    # -- the input -------------------------------------------------------------------------

    def _inputs(self, changes: list[Change]) -> dict[str, Desired]:
        """name -> the retry input, written per machine; a change whose input changed since the plan fails."""
        inputs = {}
        for change in changes:
            assert change.desired is not None and change.retry is not None
            try:
                inputs[change.name] = retry_desired(change.desired, change.retry.attempt, change.retry.selection,
                                                    self.applier.repo_root, self.applier.work_dir)
            except BatchplanError as exc:
                self.ledger.fail(change.name, exc)
                self.ledger.drop_retry_intent(change.name)
        return inputs

    async def _upload(self, changes: list[Change], inputs: dict[str, Desired]) -> dict[str, str]:
        """name -> the uploaded file id of its retry input (one upload per content and provider, reused if
        on the server)."""
        groups = by_provider(changes)
        found = await asyncio.gather(*(self._upload_to(p, cs, inputs) for p, cs in groups.items()))
        return {name: file_id for ids in found for name, file_id in ids.items()}

    async def _upload_to(self, provider: str | None, changes: list[Change],
                         inputs: dict[str, Desired]) -> dict[str, str]:
        """`_upload` to one provider's server, for the retries of the specs that name it."""
        needed = {inputs[c.name].input_sha256: inputs[c.name] for c in changes}
        sizes = {sha: want.input_bytes for sha, want in needed.items()}
        on_server, failed = await self.applier.uploaders[provider].ensure(needed, sizes)  # type: ignore[arg-type]
        file_ids = {}
        for change in changes:
            sha = inputs[change.name].input_sha256
            if sha in failed:
                self.ledger.fail(change.name, failed[sha])
                self.ledger.drop_retry_intent(change.name)
            elif sha in on_server:
                self.ledger.record_upload(sha, on_server[sha], provider)
                file_ids[change.name] = on_server[sha]["id"]
        return file_ids

    # -- creates ---------------------------------------------------------------------------

    async def _create_all(self, changes: list[Change], inputs: dict[str, Desired], file_ids: dict[str, str]) -> None:
        pending = changes
        for _ in range(CREATE_ROUNDS):
            if not pending:
                return
            answered = await asyncio.gather(*(self._create(c, inputs[c.name], file_ids[c.name]) for c in pending))
            unsure = [c for c, ok in zip(pending, answered) if not ok]
            pending = await self._adopt_lost(unsure) if unsure else []
        for change in pending:
            self.ledger.fail(change.name, TransportError("the retry's create got no answer three times; run apply "
                                                         "again (the intent is recorded, nothing will be duplicated)"))

    async def _create(self, change: Change, sent: Desired, file_id: str) -> bool:
        """True when settled (made, refused, or not sent); False when the answer was lost."""
        params = self.applier._create_params(sent, {(sent.provider, sent.input_sha256 or ""): file_id})
        params["metadata"][TAG_SPEC] = self._tag(change)  # the spec and the attempt, not the retry input's hash
        try:
            batch = await self.applier.apis[sent.provider].create_batch(params)
        except AmbiguousWrite:
            self._maybe_sent.add(change.name)
            return False
        except (Interrupted, ApiError, TransportError) as exc:  # certainly not made
            if not isinstance(exc, Interrupted):
                self.ledger.fail(change.name, exc)
            if change.name not in self._maybe_sent:
                self.ledger.drop_retry_intent(change.name)
            return True
        self.ledger.record_retry(change, batch)
        self.ledger.save_soon()
        return True

    async def _adopt_lost(self, unsure: list[Change]) -> list[Change]:
        """Look for the retry batches whose answers were lost, now and after a settling delay."""
        absent = await self._look_for(unsure)
        if absent and not self.applier.stopping.is_set():
            await self.applier.settle()
            absent = await self._look_for(absent)
        self.ledger.save()
        return absent


def _retry_fields(change: Change, intent: RetryIntent) -> BatchFields:
    """What find_batches needs of a retry batch: its input, the retry input uploaded under its content hash."""
    assert change.desired is not None
    return change.desired.fields().model_copy(update={"input_sha256": intent.input_sha256, "input_file_id": None})
