"""Apply: carry out a plan, idempotently, recording every step in the state.

The stages (see `Applier.run`), named as the steps of the model in model/apply.pml:
`record_intent` for every create (one atomic state write; a create the plan queued for
enqueued-token capacity is left for a later apply and gets none), `cancel_duplicates` (the net:
a second running batch of a spec is cancelled before the one kept is recorded), `upload`
missing inputs (uploader.py), `adopt` what the plan found already made, `create_batch`, make the follow-up
batches of retries (retrier.py), then cancel and forget. A create whose answer is lost is never sent again blindly:
`look_for` searches the server for it (remote.find_batches, down to its input's upload:
no clock is read), `settle` waits the client timeout (a request that timed out may still
land), it looks again, and only one still absent is sent again. An intent that an earlier
apply left may belong to a create still in flight (that apply was killed mid-request), so
it gets the same settling wait and look before anything is sent: always, whatever its
age, since its time was read on another clock (a shared state may be applied from several
machines). The ledger (ledger.py) saves the state as work completes and once more at the
end, whatever happened, so a re-run converges.

Each change goes to its own provider's client (providers.py): uploads, creates, retries and the
look for a lost create to the provider the spec names, the cancel of a replaced or removed batch
to the provider it was made on, so moving a spec to another provider creates on the new one and
cancels on the old. A duplicate is cancelled where it was found: on the spec's provider.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .api import Api
from .desired import Desired
from .errors import AmbiguousWrite, ApiError, BadAnswer, Interrupted, TransportError
from .ledger import ApplyResult, Ledger
from .plan import Action, Change, Plan
from .remote import adoptable, find_batches, keep_oldest, tagged_batches
from .stores.base import Transaction
from .signals import ignore_signals
from .uploader import Uploader

__all__ = ["ApplyResult", "Applier", "apply_plan"]

CREATE_ROUNDS = 3
SETTLE_MAX = 10.0  # seconds: the longest we wait for a create sent without an answer to land


class Applier:
    """Walks a plan's changes in stages, one handler per action (see `run`)."""

    def __init__(self, apis: Mapping[str | None, Api], txn: Transaction, plan: Plan, *, repo_root: Path,
                 report: Callable[[str, str], None] = lambda name, text: None, work_dir: Path | None = None):
        self.apis = apis  # provider (None: the environment's) -> its client
        self.repo_root = repo_root
        self.work_dir = work_dir or repo_root / "state" / "retries"  # per machine: retry inputs (retrier.py)
        self.plan = plan
        self.report = report
        self.ledger = Ledger(txn, report)
        # one uploader per provider: a file id is only good on the server that gave it
        self.uploaders = {provider: Uploader(api, repo_root, report, settle=self.settle)
                          for provider, api in apis.items()}
        self.stopping = asyncio.Event()  # set by apply_plan on a signal; then no client sends a new create
        for api in apis.values():
            api.stopping = self.stopping

    # -- the table of contents -----------------------------------------------------------

    async def run(self) -> ApplyResult:
        try:
            self.ledger.state.record_batches(self.plan.refreshed)
            creates = [c for c in self.plan.changes if c.action in (Action.CREATE, Action.REPLACE) and not c.found]
            for change in (c for c in creates if c.queued):
                self.ledger.queue(change.name, change.queued)
            creates = [c for c in creates if not c.queued]
            creates = await self.record_intent(creates)
            blocked = await self.cancel_duplicates([c for c in self.plan.changes if c.cancels_duplicate])
            file_ids = await self.upload(creates)
            for change in self.plan.changes:
                if change.found and change.name not in blocked and change.action is not Action.RETRY:
                    self.adopt(change, change.found)  # a found retry is the retry stage's
            result = self.ledger.result
            await self._create_all([c for c in creates if c.name not in result.failed], file_ids)
            await self._retry_all([c for c in self.plan.changes if c.action is Action.RETRY])
            cancels = [c for c in self.plan.changes if c.action is Action.CANCEL and not c.cancels_duplicate
                       or c.cancels_old and c.name in result.done]
            if cancels:
                self.ledger.record_cancels(cancels)
            await self._cancel_all(cancels)
            for change in self.plan.changes:
                if change.action is Action.FORGET:
                    self.ledger.remove(change.name, "forgotten (removed from the state; nothing sent)")
                elif change.action is Action.UPDATE:
                    self.ledger.update_fields(change)
                    if change.name not in result.failed:  # the plan searched for the intent's batch
                        self.ledger.drop_intent(change.name)
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

    def _settle_seconds(self) -> float:
        """Seconds a create sent without an answer may still take to land: the client's timeout, capped."""
        return min(max(api.timeout for api in self.apis.values()), SETTLE_MAX)

    async def settle(self) -> None:
        """Wait until every create this client sent without an answer has landed, or never will:
        the client timeout bounds an ordinary one (one later still is caught by the next plan's net)."""
        await self._wait(self._settle_seconds())

    async def _settle_then_look_for(self, changes: list[Change], note: str) -> list[Change]:
        """Tell each change why it waits (`note`, with the wait in {seconds}), settle, and look for their batches
        again: returns the changes still with no batch on the server."""
        for change in changes:
            self.report(change.name, note.format(seconds=self._settle_seconds()))
        await self.settle()
        return await self.look_for(changes)

    # -- stage 1: intents ----------------------------------------------------------------

    async def record_intent(self, creates: list[Change]) -> list[Change]:
        """Intent before action: record every create in one atomic write; return those still to make.

        An intent an earlier apply left may be a create the server is still working on (that
        apply was killed mid-request): settle, then look for it, so it is adopted rather than
        made twice. Its age is not asked: it was read on a clock that may not be this machine's.
        """
        if not creates:
            return []
        now = int(time.time())
        earlier = []
        for change in creates:
            assert change.desired is not None
            if self.ledger.record_intent(change.desired, now):
                earlier.append(change)
        self.ledger.save()
        if not earlier:
            return creates
        absent = await self._settle_then_look_for(earlier, "an earlier apply may have sent this create; looking for "
                                                           "it in {seconds:g}s before creating")
        self.ledger.save()
        return [c for c in creates if c not in earlier or c in absent]

    # -- stage 2: the net ----------------------------------------------------------------

    async def cancel_duplicates(self, duplicates: list[Change]) -> set[str]:
        """Cancel each duplicate the plan found, before the batch kept is recorded: killed in between,
        the next plan sees the kept one running alone and adopts it. A name whose duplicate could
        not be cancelled records nothing new this time: returns those names."""
        done = await self._cancel_all(duplicates)
        return {c.name for c, ok in zip(duplicates, done) if not ok}

    # -- stage 3: uploads ----------------------------------------------------------------

    async def upload(self, creates: list[Change]) -> FileIds:
        """(provider, sha256) -> uploaded file id, for every local input the creates need, each on the
        provider that creates from it."""
        sending = by_provider(c for c in creates if c.desired and c.desired.input_sha256)
        sizes = {sha: upload.bytes for sha, upload in self.ledger.state.all_uploads()}
        sizes.update({c.desired.input_sha256: c.desired.input_bytes for c in self.plan.changes
                      if c.desired and c.desired.input_sha256 and c.desired.input_bytes is not None})
        found = await asyncio.gather(*(self._upload_to(p, cs, sizes) for p, cs in sending.items()))
        return {(p, sha): file_id for p, ids in zip(sending, found) for sha, file_id in ids.items()}

    async def _upload_to(self, provider: str | None, creates: list[Change], sizes: dict[str, int]) -> dict[str, str]:
        """sha256 -> file id on one provider, for the inputs of that provider's creates."""
        needed: dict[str, list[Change]] = {}
        for change in creates:
            needed.setdefault(change.desired.input_sha256, []).append(change)  # type: ignore[union-attr]
        on_server, failed = await self.uploaders[provider].ensure({sha: cs[0].desired for sha, cs in needed.items()},
                                                                  sizes)
        for sha, error in failed.items():
            for change in needed[sha]:
                self.ledger.fail(change.name, error)
                self.ledger.not_sent(change)
        for sha, file in on_server.items():
            if sha in needed:
                self.ledger.record_upload(sha, file, provider)
        return {sha: file["id"] for sha, file in on_server.items()}

    # -- stage 4: adopt and create -------------------------------------------------------

    def adopt(self, change: Change, batch: dict, verb: str | None = None) -> None:
        """Record a batch already on the server for this change (a replacement is held until its
        old batch is cancelled: see Ledger.record_batch)."""
        self.ledger.record_batch(change, batch, verb)

    async def _create_all(self, creates: list[Change], file_ids: FileIds) -> None:
        pending = creates
        for _ in range(CREATE_ROUNDS):
            if not pending:
                return
            results = await asyncio.gather(*(self.create_batch(c, file_ids) for c in pending))
            unsure = [c for c, ok in zip(pending, results) if ok is None]
            pending = await self._adopt_lost(unsure) if unsure else []
        for change in pending:  # the intent stays: the next apply settles on it, looks, and finishes it
            self.ledger.fail(change.name, TransportError(f"create got no answer {CREATE_ROUNDS} times; run apply "
                                                         "again (the intent is recorded, nothing will be duplicated)"))

    def _create_params(self, want: Desired, file_ids: FileIds) -> dict:
        params = {
            "input_file_id": want.input_file_id or file_ids[(want.provider, want.input_sha256 or "")],
            "endpoint": want.endpoint,
            "completion_window": want.completion_window,
            "metadata": {**want.metadata, **want.tags()},
        }
        if want.output_expires_after:
            params["output_expires_after"] = want.output_expires_after
        return params

    async def create_batch(self, change: Change, file_ids: FileIds) -> bool | None:
        """POST /batches: True when settled (created, failed for sure, or not sent); None when the answer was lost."""
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
        except BadAnswer as exc:  # it answered, so it may have made the batch: the intent stays for the next apply
            self.ledger.maybe_sent(change.name)
            self.ledger.fail(change.name, exc)
            return True
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
        still be queued on the server, so what is not found is looked for once more after
        settling before it counts as absent.
        """
        absent = await self.look_for(unsure)
        if absent and not self.stopping.is_set():
            absent = await self._settle_then_look_for(absent, "create got no answer and is not on the server yet; "
                                                              "looking again in {seconds:g}s before sending it again")
        self.ledger.save()
        return absent

    async def look_for(self, changes: list[Change]) -> list[Change]:
        """The search for what each change's create may have made (remote.find_batches, down to its
        input's upload, on the spec's provider): the batch kept (keep_oldest: running, else completed)
        is adopted and its duplicates are cancelled. Returns the changes with no batch on the server."""
        groups = by_provider(changes)
        absent = await asyncio.gather(*(self._look_for_on(p, cs) for p, cs in groups.items()))
        gone = {id(change) for group in absent for change in group}
        return [change for change in changes if id(change) in gone]  # in the plan's order

    async def _look_for_on(self, provider: str | None, changes: list[Change]) -> list[Change]:
        """`look_for` on one provider's server, for the changes whose spec names it."""
        found = await find_batches(self.apis[provider], [c.desired.fields() for c in changes if c.desired])
        absent = []
        for change in changes:
            want = change.desired
            assert want is not None
            skip = {h.batch_id for h in self.ledger.state.entries[want.name].history}
            if change.batch:  # the batch this change replaces (or that is gone) is not its lost create
                skip.add(change.batch.id)
            # running or completed only: an ended batch of the same spec (a removed spec's, put back) is not it
            keeper, duplicates = keep_oldest(adoptable(tagged_batches(found.tagged, want.name, want.spec_hash, skip)))
            if keeper is None:
                absent.append(change)
                continue
            cancelled = await asyncio.gather(*(self._send_cancel(want.name, d["id"], provider) for d in duplicates))
            if None not in cancelled:  # else: nothing recorded; the next apply cancels them, then adopts
                self.adopt(change, keeper, verb="found its lost create on the server:")
        return absent

    # -- stage 4b: retries (retrier.py) --------------------------------------------------

    async def _retry_all(self, retries: list[Change]) -> None:
        """Each planned retry's follow-up batch, made once, with the creates' guarantees."""
        if retries and not self.stopping.is_set():
            from .retrier import Retrier

            await Retrier(self).run(retries)

    # -- stage 5: cancels ----------------------------------------------------------------

    async def _cancel_all(self, changes: list[Change]) -> list[bool]:
        return list(await asyncio.gather(*(self._cancel(c) for c in changes)))

    async def _send_cancel(self, name: str, batch_id: str, provider: str | None) -> str | None:
        """POST /batches/{id}/cancel on `provider`: the batch's status after it ("finished" when it had
        already finished); None when it was not sent (stopping) or failed (recorded as `name`'s failure)."""
        if self.stopping.is_set():
            self.ledger.cancel_not_sent(name, batch_id)
            return None
        try:
            return (await self.apis[provider].cancel_batch(batch_id))["status"]
        except ApiError as exc:
            if exc.status == 409:  # it finished meanwhile; nothing left to cancel
                return "finished"
            if 400 <= exc.status < 500 and not isinstance(exc, (AmbiguousWrite, BadAnswer)):
                self.ledger.cancel_not_sent(name, batch_id)  # refused: the cancel did not happen
            self.ledger.fail(name, exc)
        except TransportError as exc:  # it may have landed: the mark stays
            self.ledger.fail(name, exc)
        return None

    async def _cancel(self, change: Change) -> bool:
        """Carry out a change's cancel (a spec removed, a replaced batch, a duplicate); whether it was done."""
        assert change.batch is not None
        batch_id = change.batch.id
        status = await self._send_cancel(change.name, batch_id, _old_provider(change))
        if status is None:
            return False
        if change.cancels_duplicate:  # a duplicate, or a batch of an earlier version: superseded
            self.ledger.done(change.name, f"cancelled {change.reason_code.value} {batch_id} ({status})")
        elif change.action is Action.CANCEL:
            self.ledger.remove(change.name, f"cancelled {batch_id} ({status})")
        else:
            self.ledger.replaced(change, old_status=status)
            self.report(change.name, f"cancelled old batch {batch_id} ({status})")
        self.ledger.save_soon()
        return True


FileIds = dict[tuple[str | None, str], str]  # (provider, sha256) -> the file id of that input there


def by_provider(changes: Iterable[Change]) -> dict[str | None, list[Change]]:
    """The changes grouped by the provider their spec names (None: the environment's), in order."""
    groups: dict[str | None, list[Change]] = {}
    for change in changes:
        groups.setdefault(change.desired.provider if change.desired else None, []).append(change)
    return groups


def _old_provider(change: Change) -> str | None:
    """The provider the batch a change cancels was made on (a replace may move the spec to another;
    a duplicate's `before` is its spec's fields, where it was found)."""
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
        if hits:  # interrupted: the command is ending, and a further signal must not cut its report short
            ignore_signals()
