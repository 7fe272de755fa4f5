"""Apply: carry out a plan, idempotently, recording every step in the state.

The stages (see `Applier.run`): record the intent of every create (one atomic state
write), upload missing inputs (uploader.py), record what the plan found already made,
create, then cancel and forget. A create whose answer is lost is never sent again
blindly: its tags are looked up on the server first, and again after a settling delay
(a request that timed out may still land), and only one still absent is sent again. An
intent left moments ago by an apply that was killed may belong to a create still in
flight, so it gets the same settling delay and look before anything is sent. The ledger
(ledger.py) saves the state as work completes and once more at the end, whatever
happened, so a re-run converges.

Each change goes to its own provider's client (providers.py): uploads and creates to the
provider the spec names, the cancel of a replaced or removed batch to the provider it was
made on, so moving a spec to another provider creates on the new one and cancels on the old.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .api import Api
from .desired import Desired
from .errors import AmbiguousWrite, ApiError, Interrupted, TransportError
from .ledger import ApplyResult, Ledger
from .plan import Action, Change, Plan
from .remote import find_tagged, tagged_since
from .state import Intent
from .stores.base import Transaction
from .uploader import Uploader

__all__ = ["ApplyResult", "Applier", "apply_plan"]

CREATE_ROUNDS = 3
SETTLE_MAX = 10.0  # seconds: the longest we wait for a create sent without an answer to land


class Applier:
    """Walks a plan's changes in stages, one handler per action (see `run`)."""

    def __init__(self, apis: Mapping[str | None, Api], txn: Transaction, plan: Plan, *, repo_root: Path,
                 report: Callable[[str, str], None] = lambda name, text: None):
        self.apis = apis  # provider (None: the environment's) -> its client
        self.plan = plan
        self.report = report
        self.ledger = Ledger(txn, report)
        self.uploaders = {provider: Uploader(api, repo_root, report, settle=lambda: self._wait(self._settle()))
                          for provider, api in apis.items()}
        self.stopping = asyncio.Event()  # set by apply_plan on a signal; then no client sends a new create
        for api in apis.values():
            api.stopping = self.stopping

    # -- the table of contents -----------------------------------------------------------

    async def run(self) -> ApplyResult:
        started = int(time.time())
        try:
            self.ledger.state.record_batches(self.plan.refreshed)
            creates = [c for c in self.plan.changes if c.action in (Action.CREATE, Action.REPLACE) and not c.found]
            creates = await self._record_intents(creates)
            file_ids = await self._ensure_uploads(creates)
            for change in self.plan.changes:
                if change.found:
                    self.ledger.record_batch(change, change.found)
            result = self.ledger.result
            await self._create_all([c for c in creates if c.name not in result.failed], file_ids)
            await self._cancel_all([c for c in self.plan.changes
                                    if c.action is Action.CANCEL or c.cancels_old and c.name in result.done])
            for change in self.plan.changes:
                if change.action is Action.FORGET:
                    self.ledger.remove(change.name, "forgotten (removed from the state; nothing sent)")
                elif change.action is Action.UPDATE:
                    self.ledger.update_fields(change)
            if not self.ledger.result.failed and not self.stopping.is_set():
                self.ledger.state.scan_floor = started
        finally:
            self.ledger.save()
        if self.stopping.is_set():
            raise Interrupted(f"interrupted: {len(self.ledger.result.done)} change(s) done and saved in the state; "
                              "run `batchplan apply` again to finish")
        return self.ledger.result

    # -- waiting for a create that may still land ----------------------------------------

    async def _wait(self, seconds: float) -> None:
        """Sleep, but wake at once when apply is stopping (a second Ctrl-C is not needed)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    def _settle(self) -> float:
        """Seconds a create sent without an answer may still take to land: the client's timeout, capped."""
        return min(max(api.timeout for api in self.apis.values()), SETTLE_MAX)

    def _landed_by(self, intent: Intent) -> float:
        """When a create sent under this intent has surely landed (`at` is in whole seconds)."""
        return intent.at + 1 + self._settle()

    # -- stage 1: intents ----------------------------------------------------------------

    async def _record_intents(self, creates: list[Change]) -> list[Change]:
        """Intent before action: record every create in one atomic write; return those still to make.

        An intent an earlier apply left less than a settling delay ago may be a create the
        server is still working on (that apply was killed mid-request): wait until it would
        have landed and look for it, so it is adopted rather than made twice.
        """
        if not creates:
            return []
        now = int(time.time())
        recent = []
        for change in creates:
            assert change.desired is not None
            earlier = self.ledger.record_intent(change.desired, now)
            if earlier and self._landed_by(earlier) > time.time():
                recent.append(change)
        self.ledger.save()
        if not recent:
            return creates
        wait = max(0.0, max(self._landed_by(self.ledger.intent_of(c.name)) for c in recent) - time.time())
        for change in recent:
            self.report(change.name, f"an apply stopped moments ago may have sent this create; "
                                     f"looking for it in {wait:.1f}s before creating")
        await self._wait(wait)
        absent = await self._look_for(recent)
        self.ledger.save()
        return [c for c in creates if c not in recent or c in absent]

    # -- stage 2: uploads ----------------------------------------------------------------

    async def _ensure_uploads(self, creates: list[Change]) -> dict[tuple[str | None, str], str]:
        """(provider, sha256) -> uploaded file id, for every local input the creates need, each on the
        provider that creates from it (a file id is only good on the server that gave it)."""
        by_provider: dict[str | None, list[Change]] = {}
        for change in creates:
            if change.desired and change.desired.input_sha256:
                by_provider.setdefault(change.desired.provider, []).append(change)
        sizes = {sha: upload.bytes for sha, upload in self.ledger.state.all_uploads()}
        sizes.update({c.desired.input_sha256: c.desired.input_bytes for c in self.plan.changes
                      if c.desired and c.desired.input_sha256 and c.desired.input_bytes is not None})
        found = await asyncio.gather(*(self._uploads_on(p, cs, sizes) for p, cs in by_provider.items()))
        return {(p, sha): file_id for p, ids in zip(by_provider, found) for sha, file_id in ids.items()}

    async def _uploads_on(self, provider: str | None, creates: list[Change], sizes: dict[str, int]) -> dict[str, str]:
        """sha256 -> file id on one provider, for the inputs of that provider's creates."""
        needed: dict[str, list[Change]] = {}
        for change in creates:
            needed.setdefault(change.desired.input_sha256, []).append(change)  # type: ignore[union-attr]
        uploader = self.uploaders[provider]
        on_server, failed = await uploader.ensure({sha: cs[0].desired for sha, cs in needed.items()}, sizes)
        for sha, error in failed.items():
            for change in needed[sha]:
                self.ledger.fail(change.name, error)
                self.ledger.not_sent(change)
        for sha, file in on_server.items():
            if sha in needed:
                self.ledger.record_upload(sha, file, provider)
        return {sha: file["id"] for sha, file in on_server.items()}

    # -- stage 3: creates ----------------------------------------------------------------

    async def _create_all(self, creates: list[Change], file_ids: dict[tuple[str | None, str], str]) -> None:
        pending = creates
        for _ in range(CREATE_ROUNDS):
            if not pending:
                return
            results = await asyncio.gather(*(self._create(c, file_ids) for c in pending))
            unsure = [c for c, ok in zip(pending, results) if ok is None]
            pending = await self._adopt_lost(unsure) if unsure else []
        for change in pending:
            self.ledger.fail(change.name, TransportError("create got no answer three times; run apply again "
                                                         "(the intent is recorded, nothing will be duplicated)"))

    def _create_params(self, want: Desired, file_ids: dict[tuple[str | None, str], str]) -> dict:
        params = {
            "input_file_id": want.input_file_id or file_ids[(want.provider, want.input_sha256 or "")],
            "endpoint": want.endpoint,
            "completion_window": want.completion_window,
            "metadata": {**want.metadata, **want.tags()},
        }
        if want.output_expires_after:
            params["output_expires_after"] = want.output_expires_after
        return params

    async def _create(self, change: Change, file_ids: dict[tuple[str | None, str], str]) -> bool | None:
        """True when settled (created, failed for sure, or not sent); None when the answer was lost."""
        assert change.desired is not None
        try:
            batch = await self.apis[change.desired.provider].create_batch(self._create_params(change.desired,
                                                                                              file_ids))
        except Interrupted:
            self.ledger.not_sent(change)  # the next apply creates it
            return True
        except AmbiguousWrite:
            self.ledger.maybe_sent(change.name)
            return None
        except (ApiError, TransportError) as exc:  # refused, or never reached: certainly not made
            self.ledger.fail(change.name, exc)
            self.ledger.not_sent(change)
            return True
        self.ledger.record_batch(change, batch)
        self.ledger.save_soon()
        return True

    async def _adopt_lost(self, unsure: list[Change]) -> list[Change]:
        """Look for the batches of creates whose answers were lost; return those certainly absent.

        Dropped connections and 5xx after a commit are found at once. A timed-out create may
        still be queued on the server, so what is not found is looked for once more after a
        settling delay before it counts as absent.
        """
        absent = await self._look_for(unsure)
        if absent and not self.stopping.is_set():
            for change in absent:
                self.report(change.name, f"create got no answer and is not on the server yet; "
                                         f"looking again in {self._settle():g}s before sending it again")
            await self._wait(self._settle())
            absent = await self._look_for(absent)
        self.ledger.save()
        return absent

    async def _look_for(self, changes: list[Change]) -> list[Change]:
        """Adopt the batch each change's intent may have made; return the changes with none on the server."""
        by_provider: dict[str | None, list[Change]] = {}
        for change in changes:
            by_provider.setdefault(change.desired.provider, []).append(change)  # type: ignore[union-attr]
        absent = await asyncio.gather(*(self._look_for_on(p, cs) for p, cs in by_provider.items()))
        gone = {id(change) for group in absent for change in group}
        return [change for change in changes if id(change) in gone]  # in the plan's order

    async def _look_for_on(self, provider: str | None, changes: list[Change]) -> list[Change]:
        """`_look_for` on one provider: the tagged batches its server made since the oldest intent."""
        tagged = await tagged_since(self.apis[provider], min(self.ledger.intent_of(c.name).at for c in changes))
        absent = []
        for change in changes:
            want = change.desired
            assert want is not None
            skip = {h.batch_id for h in self.ledger.state.entries[want.name].history}
            if change.batch:  # the batch this change replaces (or that is gone) is not its lost create
                skip.add(change.batch.id)
            batch = find_tagged(tagged, want.name, want.spec_hash, skip)
            if batch:
                self.ledger.record_batch(change, batch, verb="found its lost create on the server:")
            else:
                absent.append(change)
        return absent

    # -- stage 4: cancels ----------------------------------------------------------------

    async def _cancel_all(self, changes: list[Change]) -> None:
        await asyncio.gather(*(self._cancel(c) for c in changes))

    async def _cancel(self, change: Change) -> None:
        assert change.batch is not None
        batch_id = change.batch.id
        if self.stopping.is_set():
            return
        try:
            batch = await self.apis[_old_provider(change)].cancel_batch(batch_id)
        except ApiError as exc:
            if exc.status != 409:  # 409: it finished meanwhile; nothing left to cancel
                self.ledger.fail(change.name, exc)
                return
            batch = None
        except TransportError as exc:
            self.ledger.fail(change.name, exc)
            return
        status = batch["status"] if batch else "finished"
        if change.action is Action.CANCEL:
            self.ledger.remove(change.name, f"cancelled {batch_id} ({status})")
        else:
            self.ledger.replaced(change, old_status=status)
            self.report(change.name, f"cancelled old batch {batch_id} ({status})")
        self.ledger.save_soon()


def _old_provider(change: Change) -> str | None:
    """The provider the batch a change cancels was made on (a replace may move the spec to another)."""
    return change.before.provider if change.before else None


def providers_of(plan: Plan) -> set[str | None]:
    """Every provider applying `plan` may talk to: where its specs go, and where its old batches are."""
    return {c.desired.provider for c in plan.changes if c.desired} | \
        {c.before.provider for c in plan.changes if c.before}


async def apply_plan(applier: Applier) -> ApplyResult:
    """Run an Applier with Ctrl-C / SIGTERM handling.

    The first signal stops new requests, lets those in flight finish, and saves the
    state; a second one abandons what is in flight (the state is still saved).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    hits = 0

    def on_signal() -> None:
        nonlocal hits
        hits += 1
        applier.stopping.set()
        if hits > 1 and task:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await applier.run()
    except asyncio.CancelledError:
        raise Interrupted("interrupted twice: requests in flight were abandoned; the state is saved; "
                          "run `batchplan apply` again to finish") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
