"""Apply: carry out a plan, idempotently, recording every step in the state.

The order is: record the intent of every create (one atomic state write), upload
missing inputs, create, then cancel and forget. A create whose answer is lost is never
sent again blindly: its tags (an upload: its content hash) are looked up on the server
first, and again after a settling delay (a request that timed out may still land), and
only one still absent is sent again. An intent left moments ago by an apply that was
killed may belong to a create still in flight, so it gets the same settling delay and
look before anything is sent. The state is saved as work completes and once more at
the end, whatever happened, so a re-run converges.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .api import Api
from .desired import Desired
from .errors import AmbiguousWrite, ApiError, BatchplanError, Interrupted, PlanError, TransportError
from .plan import Action, Change, Plan
from .remote import find_tagged, tagged_since, upload_filename, uploaded_files
from .state import BatchRecord, Entry, HistoryItem, Intent, Upload
from .stores.base import Transaction

CREATE_ROUNDS = 3
SAVE_EVERY = 0.5  # seconds between state saves while creates complete
SETTLE_MAX = 10.0  # seconds: the longest we wait for a create sent without an answer to land


@dataclass
class ApplyResult:
    done: dict[str, str] = field(default_factory=dict)      # name -> what was done
    failed: dict[str, str] = field(default_factory=dict)    # name -> why


class Applier:
    """Walks a plan's changes with one handler per action (see `run`)."""

    def __init__(self, api: Api, txn: Transaction, plan: Plan, *, repo_root: Path,
                 report: Callable[[str, str], None] = lambda name, text: None):
        self.api = api
        self.txn = txn
        self.state = txn.state
        self.plan = plan
        self.repo_root = repo_root
        self.report = report
        self.result = ApplyResult()
        self.stopping = api.stopping  # set by apply_plan on a signal; the Api then sends no new create
        self._last_save = 0.0
        self._fresh: set[str] = set()  # names whose intent this apply recorded, with none before it
        self._maybe_sent: set[str] = set()  # names with a create whose answer was lost
        self._held: dict[str, dict] = {}  # replacements recorded once their old batch is cancelled

    # -- the table of contents -----------------------------------------------------------

    async def run(self) -> ApplyResult:
        started = int(time.time())
        try:
            self.state.record_batches(self.plan.refreshed)
            creates = [c for c in self.plan.changes if c.action in (Action.CREATE, Action.REPLACE) and not c.found]
            creates = await self._record_intents(creates)
            file_ids = await self._ensure_uploads(creates)
            for change in self.plan.changes:
                if change.found:
                    self._record_batch(change, change.found)
            await self._create_all([c for c in creates if c.name not in self.result.failed], file_ids)
            await self._cancel_all([c for c in self.plan.changes
                                    if c.action is Action.CANCEL or c.cancels_old and c.name in self.result.done])
            for change in self.plan.changes:
                if change.action is Action.FORGET:
                    self._forget(change)
            if not self.result.failed and not self.stopping.is_set():
                self.state.scan_floor = started
        finally:
            self._save()
        if self.stopping.is_set():
            raise Interrupted(f"interrupted: {len(self.result.done)} change(s) done and saved in the state; "
                              "run `batchplan apply` again to finish")
        return self.result

    # -- state bookkeeping ---------------------------------------------------------------

    def _save(self) -> None:
        self.txn.save()  # written only when something changed since the last save
        self._last_save = time.monotonic()

    def _maybe_save(self) -> None:
        if time.monotonic() - self._last_save >= SAVE_EVERY:
            self._save()

    def _entry_for(self, want: Desired) -> Entry:
        entry = self.state.entries.get(want.name)
        if entry is None:
            entry = Entry(spec_hash=want.spec_hash, fields=want.fields(), prevent_cancel=want.prevent_cancel)
            self.state.entries[want.name] = entry
        return entry

    def _record_batch(self, change: Change, batch: dict, verb: str | None = None) -> None:
        """Record a batch made (or found) for a change.

        A replacement whose old batch is still running is held back until that batch is
        cancelled: a state that named the new batch would plan nothing more, and the old one
        would run on. Until then the intent stands for it, and the next apply finds it by its
        tags and cancels again.
        """
        verb = verb or {Action.ADOPT: "adopted", Action.REPLACE: "replaced by"}.get(change.action, "created")
        self._done(change.name, f"{verb} {batch['id']}")
        if change.cancels_old:
            self._held[change.name] = batch
        else:
            self._write_batch(change, batch)

    def _write_batch(self, change: Change, batch: dict, old_status: str | None = None) -> None:
        want = change.desired
        assert want is not None
        entry = self._entry_for(want)
        old = entry.batch
        if old and old.id != batch["id"]:
            entry.history.append(HistoryItem(batch_id=old.id, spec_hash=entry.spec_hash,
                                             status=old_status or old.status, replaced_at=int(time.time())))
        # fields stay exactly the desired ones (the uploaded file id is on the batch record),
        # so the next plan's diff shows only what the user changed
        entry.spec_hash, entry.fields, entry.prevent_cancel = want.spec_hash, want.fields(), want.prevent_cancel
        entry.batch, entry.intent = BatchRecord.from_api(batch), None

    def _done(self, name: str, text: str) -> None:
        self.result.done[name] = text
        self.report(name, text)

    def _fail(self, name: str, error: BatchplanError) -> None:
        self.result.failed[name] = str(error)
        self.report(name, f"failed: {error}")

    # -- uploads -------------------------------------------------------------------------

    async def _ensure_uploads(self, creates: list[Change]) -> dict[str, str]:
        """sha256 -> uploaded file id, for every local input the creates need."""
        needed: dict[str, list[Change]] = {}
        for change in creates:
            want = change.desired
            if want and want.input_sha256:
                needed.setdefault(want.input_sha256, []).append(change)
        if not needed:
            return {}
        on_server = await self._uploaded_files()
        missing = [sha for sha in needed if sha not in on_server]
        results = await asyncio.gather(*(self._upload(needed[sha][0].desired) for sha in missing),
                                       return_exceptions=True)
        for sha, result in zip(missing, results):
            if isinstance(result, BaseException):
                if not isinstance(result, BatchplanError):
                    raise result
                for change in needed[sha]:
                    self._fail(change.name, result)
                    self._not_sent(change)
            else:
                on_server[sha] = result
        for sha, file in on_server.items():
            if sha in needed:
                self.state.uploads[sha] = Upload(file_id=file["id"], bytes=file["bytes"])
        return {sha: file["id"] for sha, file in on_server.items()}

    async def _uploaded_files(self) -> dict[str, dict]:
        """Files on the server whose name carries a content hash, and whose size matches it."""
        sizes = {u: up.bytes for u, up in self.state.uploads.items()}
        sizes.update({c.desired.input_sha256: c.desired.input_bytes for c in self.plan.changes
                      if c.desired and c.desired.input_sha256 and c.desired.input_bytes is not None})
        return await uploaded_files(self.api, sizes)

    async def _upload(self, want: Desired) -> dict:
        assert want.input and want.input_sha256
        path = self.repo_root / want.input
        for _ in range(CREATE_ROUNDS):
            try:
                file = await self.api.upload_file(path, upload_filename(want))
                self.report(want.name, f"uploaded {want.input} as {file['id']}")
                return file
            except AmbiguousWrite:
                again = await self._find_lost_upload(want.input_sha256)
                if again:
                    return again
        raise TransportError(f"uploading {want.input} failed {CREATE_ROUNDS} times with no answer; "
                             "run apply again")

    async def _find_lost_upload(self, sha: str) -> dict | None:
        """The file an upload without an answer made, if it landed (looking twice: see _adopt_lost)."""
        found = (await self._uploaded_files()).get(sha)
        if found is None and not self.stopping.is_set():
            await self._wait(self._settle())
            found = (await self._uploaded_files()).get(sha)
        return found

    # -- creates -------------------------------------------------------------------------

    async def _wait(self, seconds: float) -> None:
        """Sleep, but wake at once when apply is stopping (a second Ctrl-C is not needed)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    def _settle(self) -> float:
        """Seconds a create sent without an answer may still take to land: the client's timeout, capped."""
        return min(self.api.timeout, SETTLE_MAX)

    def _landed_by(self, intent: Intent) -> float:
        """When a create sent under this intent has surely landed (`at` is in whole seconds)."""
        return intent.at + 1 + self._settle()

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
            want = change.desired
            assert want is not None
            entry = self._entry_for(want)
            earlier = entry.intent if entry.intent and entry.intent.spec_hash == want.spec_hash else None
            if entry.intent is None:
                self._fresh.add(want.name)
            if earlier and self._landed_by(earlier) > time.time():
                recent.append(change)
            # an earlier intent keeps its time: the look for its batch must reach back that far
            entry.intent = Intent(spec_hash=want.spec_hash, fields=want.fields(), tags=want.tags(),
                                  at=earlier.at if earlier else now)
        self._save()
        if not recent:
            return creates
        landed_by = max(self._landed_by(self.state.entries[c.name].intent) for c in recent)  # type: ignore[arg-type]
        wait = max(0.0, landed_by - time.time())
        for change in recent:
            self.report(change.name, f"an apply stopped moments ago may have sent this create; "
                                     f"looking for it in {wait:.1f}s before creating")
        await self._wait(wait)
        absent = await self._look_for(recent)
        self._save()
        return [c for c in creates if c not in recent or c in absent]

    async def _create_all(self, creates: list[Change], file_ids: dict[str, str]) -> None:
        pending = creates
        for _ in range(CREATE_ROUNDS):
            if not pending:
                return
            results = await asyncio.gather(*(self._create(c, file_ids) for c in pending))
            unsure = [c for c, ok in zip(pending, results) if ok is None]
            pending = await self._adopt_lost(unsure) if unsure else []
        for change in pending:
            self._fail(change.name, TransportError("create got no answer three times; run apply again "
                                                   "(the intent is recorded, nothing will be duplicated)"))

    def _create_params(self, want: Desired, file_ids: dict[str, str]) -> dict:
        params = {
            "input_file_id": want.input_file_id or file_ids[want.input_sha256 or ""],
            "endpoint": want.endpoint,
            "completion_window": want.completion_window,
            "metadata": {**want.metadata, **want.tags()},
        }
        if want.output_expires_after:
            params["output_expires_after"] = want.output_expires_after
        return params

    async def _create(self, change: Change, file_ids: dict[str, str]) -> bool | None:
        """True when settled (created, failed for sure, or not sent); None when the answer was lost."""
        want = change.desired
        assert want is not None
        try:
            batch = await self.api.create_batch(self._create_params(want, file_ids))
        except Interrupted:
            self._not_sent(change)  # the next apply creates it
            return True
        except AmbiguousWrite:
            self._maybe_sent.add(change.name)
            return None
        except (ApiError, TransportError) as exc:  # refused, or never reached: certainly not made
            self._fail(change.name, exc)
            self._not_sent(change)
            return True
        self._record_batch(change, batch)
        self._maybe_save()
        return True

    def _not_sent(self, change: Change) -> None:
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
        self._save()
        return absent

    async def _look_for(self, changes: list[Change]) -> list[Change]:
        """Adopt the batch each change's intent may have made; return the changes with none on the server."""
        since = min(self.state.entries[c.name].intent.at for c in changes)  # type: ignore[union-attr]
        tagged = await tagged_since(self.api, since)
        absent = []
        for change in changes:
            want = change.desired
            assert want is not None
            skip = {h.batch_id for h in self.state.entries[want.name].history}
            if change.batch:  # the batch this change replaces (or that is gone) is not its lost create
                skip.add(change.batch.id)
            batch = find_tagged(tagged, want.name, want.spec_hash, skip)
            if batch:
                self._record_batch(change, batch, verb="found its lost create on the server:")
            else:
                absent.append(change)
        return absent

    # -- cancels and forgets -------------------------------------------------------------

    async def _cancel_all(self, changes: list[Change]) -> None:
        await asyncio.gather(*(self._cancel(c) for c in changes))

    async def _cancel(self, change: Change) -> None:
        assert change.batch is not None
        batch_id = change.batch.id
        if self.stopping.is_set():
            return
        try:
            batch = await self.api.cancel_batch(batch_id)
        except ApiError as exc:
            if exc.status != 409:  # 409: it finished meanwhile; nothing left to cancel
                self._fail(change.name, exc)
                return
            batch = None
        except TransportError as exc:
            self._fail(change.name, exc)
            return
        status = batch["status"] if batch else "finished"
        if change.action is Action.CANCEL:
            self.state.entries.pop(change.name, None)
            self._done(change.name, f"cancelled {batch_id} ({status})")
        else:
            self._write_batch(change, self._held.pop(change.name), old_status=status)
            self.report(change.name, f"cancelled old batch {batch_id} ({status})")
        self._maybe_save()

    def _forget(self, change: Change) -> None:
        self.state.entries.pop(change.name, None)
        self._done(change.name, "forgotten (removed from the state; nothing sent)")


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


def check_plan_applicable(plan: Plan) -> None:
    for change in plan.changes:
        if change.action in (Action.CREATE, Action.REPLACE, Action.ADOPT) and change.desired is None:
            raise PlanError(f"{change.name}: the plan has no spec for a {change.action.value}")
