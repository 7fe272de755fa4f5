"""Plans: what apply would do to bring the server and the state in line with the specs.

`build_plan` is pure. It reads the desired batches, the state and a `RemoteView` (what
the server said: remote.py) and returns a frozen `Plan`; it writes nothing and
sends nothing. Apply walks the plan's changes; renderers print them.

The diff is set arithmetic over spec names: desired − state = create or adopt,
state − desired = cancel or forget, and the intersection is compared by spec hash.
Where the server holds more than one running batch of a spec (a create whose answer was
lost and that landed late, or two checkouts), the oldest is kept (remote.keep_oldest) and
every other one gets a change of its own: a cancel with reason_code `duplicate`. A running
batch of the name made from an earlier version of its spec that the state does not track (a
lost state, an interrupted apply's create) is cancelled too (reason_code `superseded`): at most
one batch runs per spec name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from .batch import BatchFields, BatchRecord, BatchStatus
from .desired import Desired
from .errors import PlanError
from .queue import failed_for_capacity
from .remote import RemoteView, adoptable, find_tagged, keep_oldest, moved_provider, superseded_batches, tagged_batches
from .spec import TAG_NAME, TAG_SPEC, address_key, spec_of
from .state import Entry, State, expand_names

if TYPE_CHECKING:
    from .attempts import AttemptsView
    from .estimate import Estimate
    from .retries import RetrySelection
    from .queue import Schedule


class Action(str, Enum):
    CREATE = "create"
    ADOPT = "adopt"
    UPDATE = "update"  # the state only: fields the spec's lifecycle.ignore_changes lists; nothing is sent
    NOOP = "noop"
    REPLACE = "replace"
    CANCEL = "cancel"
    FORGET = "forget"
    RETRY = "retry"  # a follow-up batch of the requests the spec's ended batches left without a result

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {Action.CREATE: "+", Action.ADOPT: "=", Action.UPDATE: "~", Action.NOOP: " ", Action.REPLACE: "±",
            Action.CANCEL: "-", Action.FORGET: "#", Action.RETRY: "↻"}
ORDER = (Action.CREATE, Action.ADOPT, Action.UPDATE, Action.REPLACE, Action.RETRY, Action.CANCEL, Action.FORGET,
         Action.NOOP)


class ReasonCode(str, Enum):
    """Why a change is planned, for machines: the JSON plan's `reason_code` (see the README).

    The prose `reason` says the same for people, with the details (which fields, which batch).
    """

    NO_BATCH = "no_batch"                            # create: nothing in the state or on the server
    INTERRUPTED_CREATE = "interrupted_create"        # create: an apply stopped before its create;
    #                                                  forget: ... and the spec is gone too
    BATCH_MISSING = "batch_missing"                  # create / forget: the server no longer has the batch
    FOUND_UNTRACKED = "found_untracked"              # adopt: a batch made for this spec, not in the state
    UP_TO_DATE = "up_to_date"                        # noop
    INPUT_CHANGED = "input_changed"                  # replace: only the input's content or file changed
    PARAMETERS_CHANGED = "parameters_changed"        # replace: only endpoint, window, metadata or expiry
    SPEC_CHANGED = "spec_changed"                    # replace: both, or the spec's identity otherwise
    FORCED = "forced"                                # replace: --replace
    INTERRUPTED_REPLACE = "interrupted_replace"      # replace: finishing one an apply left half done
    SPEC_REMOVED = "spec_removed"                    # cancel / forget: the spec is gone
    RESHARDED = "resharded"                          # cancel / forget: the spec is split otherwise now,
    #                                                  and no longer has this address (NAME or NAME[K])
    CHANGES_IGNORED = "changes_ignored"              # update: only fields lifecycle.ignore_changes lists
    PROVIDER_MOVED = "provider_moved"                # replace / forget: the batch's provider now points at
    #                                                  another server (its base_url changed): not followed
    WITHOUT_RESULT = "without_result"                # retry: requests the ended batches left without a result
    #                                                  (found_untracked: the retry batch is already made)
    KEEP_OLDEST = "keep_oldest"                      # adopt: an older running batch of this spec is kept,
    #                                                  and the state's is cancelled as its duplicate
    DUPLICATE = "duplicate"                          # cancel: a second running batch of the same spec
    INTENT_RESOLVED = "intent_resolved"              # update: an interrupted apply's create left no batch to
    #                                                  adopt (or only one superseded): its intent is dropped
    SUPERSEDED = "superseded"                        # cancel: a running batch of an earlier version of the
    #                                                  spec that the state does not track
    TOKEN_LIMIT_EXCEEDED = "token_limit_exceeded"    # create: the last batch failed for want of enqueued-token
    #                                                  capacity (someone else's batches used it): made again


_INPUT_FIELDS = frozenset({"input", "input_sha256", "input_file_id"})


@dataclass(frozen=True)
class FieldChange:
    path: str
    before: object
    after: object


@dataclass(frozen=True)
class PlannedRetry:
    """A retry's attempt number (2 and up) and the input lines it sends (retries.RetrySelection)."""

    attempt: int
    selection: RetrySelection


@dataclass(frozen=True)
class Change:
    """One spec name and what apply does for it.

    before: the fields the current batch was made from (its id and status are on `batch`);
        None for create and adopt (nothing is recorded yet).
    after:  the desired fields (the id of an adopted batch is on `found`);
        None for cancel and forget (the name leaves the state).
    reason: why, for people; apply never reads it. reason_code: the same, for machines.
    batch:  the existing batch this change is about (to keep, replace, cancel or forget; for a
        create, the batch the server no longer has; for a cancel of a duplicate, the duplicate,
        while the name's entry stays).
    found:  a batch already on the server that satisfies the desired spec (made by an
        earlier, interrupted apply, or before the state was lost): apply records it
        instead of creating one.
    estimate: what the requests this change sends may cost (estimate.py), for a change that
        sends requests; None for the others, and where batchplan cannot count the input.
    retry:  for a retry, its attempt and the lines it sends (`batch` is then the latest attempt,
        `found` a retry batch an interrupted apply made).
    queued: for a change that sends requests but does not fit under its model's enqueued-token
        limit now (queue.py), the phrase that says what it waits for; apply skips it, and a
        later apply (or `apply --watch`) makes it once capacity frees. None: not queued.
    """

    name: str
    action: Action
    reason: str
    reason_code: ReasonCode
    before: BatchFields | None = None
    after: BatchFields | None = None
    desired: Desired | None = None
    batch: BatchRecord | None = None
    found: dict | None = None
    diff: tuple[FieldChange, ...] = ()
    warnings: tuple[str, ...] = ()
    estimate: Estimate | None = None
    retry: PlannedRetry | None = None
    queued: str | None = None

    @property
    def cancels_old(self) -> bool:
        return self.action is Action.REPLACE and self.batch is not None and self.batch.running

    @property
    def sends_requests(self) -> bool:
        """It makes a batch, so its requests are billed: a create, replace or retry that adopts nothing."""
        return self.action in (Action.CREATE, Action.REPLACE, Action.RETRY) and not self.found

    @property
    def cancels_duplicate(self) -> bool:
        """A cancel of an extra running batch of a name whose entry stays: a duplicate of the batch
        kept, or a batch of an earlier version of the spec (superseded). Apply's net sends these first."""
        return self.action is Action.CANCEL and self.reason_code in (ReasonCode.DUPLICATE, ReasonCode.SUPERSEDED)


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    lineage: str | None
    serial: int
    refreshed: dict[str, BatchRecord] = field(default_factory=dict)  # name -> record seen now
    budget_usd: float | None = None  # the most this apply may cost (batchplan.yaml); see budget.py
    estimated: bool = False  # with_estimates was applied: a change's estimate None means "cannot be known"

    def summary(self) -> dict[str, int]:
        counts = {action.value: 0 for action in ORDER}
        for change in self.changes:
            counts[change.action.value] += 1
        return counts

    @property
    def has_changes(self) -> bool:
        return any(c.action is not Action.NOOP for c in self.changes)

    @property
    def sending(self) -> tuple[Change, ...]:
        """The changes that send requests, whose estimates add up to what this plan may cost."""
        return tuple(c for c in self.changes if c.sends_requests)

    def with_estimates(self, estimates: Mapping[str, Estimate | None], budget_usd: float | None) -> Plan:
        """This plan with each sending change's estimate (by name) and the budget it is held to. Pure."""
        changes = tuple(replace(c, estimate=estimates.get(c.name)) if c.sends_requests else c
                        for c in self.changes)
        return replace(self, changes=changes, budget_usd=budget_usd, estimated=True)

    def with_queue(self, schedule: Schedule) -> Plan:
        """This plan with the changes `schedule` leaves waiting marked `queued` (by name). Pure."""
        phrases = {waiting.candidate.name: waiting.phrase for waiting in schedule.queued}
        return replace(self, changes=tuple(replace(c, queued=phrases[c.name]) if c.name in phrases else c
                                           for c in self.changes))

    @property
    def queued(self) -> tuple[Change, ...]:
        """The changes that wait for enqueued-token capacity: apply leaves them for a later run."""
        return tuple(c for c in self.changes if c.queued)


def build_plan(desired: list[Desired], state: State | None, remote: RemoteView, *,
               targets: frozenset[str] = frozenset(), force_replace: frozenset[str] = frozenset(),
               attempts: Mapping[str, AttemptsView] | None = None) -> Plan:
    """Decide one action per address (a spec name, or NAME[K] for a shard). Pure: reads its
    arguments, writes nothing. A spec name in `targets` or `force_replace` names all its shards.

    `attempts`: what the result files of the specs that retry say (attempts.read_attempts)."""
    attempts = attempts or {}
    state = state or State(serial=0, lineage="")
    wanted = {d.name: d for d in desired}
    addresses = set(wanted) | set(state.entries)
    _ensure_known(targets | force_replace, addresses)
    names = sorted(addresses, key=address_key)
    if targets:
        names = [n for n in names if n in expand_names(targets, addresses)]
    forced = expand_names(force_replace, addresses)
    shards_of: dict[str, list[str]] = {}
    for want in desired:
        shards_of.setdefault(want.spec, []).append(want.name)
    changes, refused = [], []
    for name in names:
        entry = state.entries.get(name)
        try:
            if name in wanted:
                planned = _plan_desired(wanted[name], entry, remote, name in forced)
                if planned[0].action is Action.NOOP and name in attempts:
                    planned[0] = _plan_retry(wanted[name], entry, attempts[name], planned[0])
                changes += planned
            else:
                changes.append(_plan_removed(name, entry, remote, _why_gone(name, shards_of.get(spec_of(name)))))
        except PlanError as exc:  # every refusal is said, not only the first (as Terraform does)
            refused.append(str(exc))
    if refused:
        raise PlanError(refused[0] if len(refused) == 1 else
                        f"{len(refused)} changes are refused; nothing was sent or written\n" + "\n".join(refused))
    refreshed = {name: BatchRecord.from_api(remote.batches[entry.batch.id])
                 for name, entry in state.entries.items()
                 if entry.batch and entry.batch.id in remote.batches}
    refreshed.update({name: view.latest for name, view in attempts.items() if view.made > 1})  # a retry batch
    return Plan(tuple(changes), state.lineage or None, state.serial, refreshed)


def _ensure_known(names: frozenset[str], addresses: set[str]) -> None:
    specs = {spec_of(a) for a in addresses}
    unknown = sorted(n for n in names if n not in addresses and n not in specs)
    if unknown:
        raise PlanError(f"no spec and no state entry named {', '.join(unknown)}; "
                        "check --target / --replace against `batchplan state list`")


def _current(entry: Entry, remote: RemoteView) -> BatchRecord:
    assert entry.batch is not None
    fresh = remote.batches.get(entry.batch.id)
    return BatchRecord.from_api(fresh) if fresh else entry.batch


def _plan_desired(want: Desired, entry: Entry | None, remote: RemoteView, forced: bool) -> list[Change]:
    """The change for a spec, then a cancel for each duplicate of the batch it keeps, and one for
    each untracked running batch of an earlier version of the spec."""
    return _plan_version(want, entry, remote, forced) + _superseded(want, entry, remote)


def _plan_version(want: Desired, entry: Entry | None, remote: RemoteView, forced: bool) -> list[Change]:
    """The change for a spec (create, adopt, update, replace or keep), then its duplicates' cancels."""
    if entry is None or entry.batch is None:
        return _plan_new(want, entry, remote)
    if moved := moved_provider(entry, remote.base_urls):
        return _plan_moved_replace(want, entry, remote, moved)
    after = want.fields()
    record = _current(entry, remote)
    if record.id in remote.missing:
        return [Change(want.name, Action.CREATE, f"batch {record.id} no longer exists on the server",
                       ReasonCode.BATCH_MISSING, before=entry.fields, after=after, desired=want, batch=record)]
    if entry.cancelled_by_batchplan(record):  # as after that apply's clean end: the spec has no batch
        return _plan_new(want, entry, remote)
    resumed = _interrupted_replacement(want, entry, record, remote)
    if not forced and not resumed and entry.spec_hash != want.spec_hash and (update := _plan_update(want, entry,
                                                                                                   record)):
        return [update]
    if forced or entry.spec_hash != want.spec_hash or resumed:
        return _plan_replace(want, entry, record, remote, forced, resumed)
    return _plan_kept(want, entry, record, remote)


def _plan_new(want: Desired, entry: Entry | None, remote: RemoteView) -> list[Change]:
    """A spec with no batch in the state (or only one batchplan cancelled): adopt the one the server has
    (keep_oldest), else create."""
    after = want.fields()
    earlier = {h.batch_id for h in entry.history} if entry else set()
    found, duplicates = keep_oldest(adoptable(tagged_batches(remote.tagged, want.name, want.spec_hash, earlier)))
    if found:
        return [Change(want.name, Action.ADOPT, f"batch {found['id']} on the server was made for this spec "
                       "but is not in the state; recording it, creating nothing", ReasonCode.FOUND_UNTRACKED,
                       after=after, desired=want, found=found), *_duplicates(want, found, duplicates)]
    if entry and entry.intent:
        return [Change(want.name, Action.CREATE, "an earlier apply was interrupted before its batch was created",
                       ReasonCode.INTERRUPTED_CREATE, after=after, desired=want)]
    if entry and entry.batch:  # Entry.cancelled_by_batchplan
        return [Change(want.name, Action.CREATE, f"batch {entry.batch.id} was cancelled by an apply (its spec was "
                       "removed or replaced) that was cut off before it recorded so", ReasonCode.NO_BATCH,
                       before=entry.fields, after=after, desired=want, batch=entry.batch)]
    return [Change(want.name, Action.CREATE, f"no batch for this {'shard' if want.shard else 'spec'} in the "
                   "state or on the server", ReasonCode.NO_BATCH, after=after, desired=want)]


def _plan_kept(want: Desired, entry: Entry, record: BatchRecord, remote: RemoteView) -> list[Change]:
    """The state's batch matches the spec: keep it, unless an older batch of the same spec runs too
    (keep_oldest: every checkout keeps that one), or it ended without completing while another batch
    of the spec runs untracked (a forced replace the state does not know of: a state restored from a
    backup); each other running batch is a duplicate."""
    found, duplicates = _running_keeper(want, entry, record, remote)
    if found and found["id"] != record.id:
        reason = f"batch {found['id']} is the oldest running batch of this spec, so it is kept; the state's " \
                 f"batch {record.id} is cancelled as its duplicate" if record.running else \
                 f"the state's batch {record.id} is {record.status}, and batch {found['id']} of this spec runs " \
                 "but is not in the state (made by a replace the state does not know of); recording it"
        code = ReasonCode.KEEP_OLDEST if record.running else ReasonCode.FOUND_UNTRACKED
        return [Change(want.name, Action.ADOPT, reason, code, before=entry.fields, after=want.fields(), desired=want,
                       batch=record, found=found), *_duplicates(want, found, duplicates)]
    if failed_for_capacity(record):  # not a result: the server had no room then; the failed one stays in history
        return [Change(want.name, Action.CREATE, f"the last batch failed: enqueued token limit (batch {record.id})",
                       ReasonCode.TOKEN_LIMIT_EXCEEDED, before=entry.fields, after=want.fields(), desired=want,
                       batch=record)]
    kept = Change(want.name, Action.NOOP, f"batch {record.id} is {record.status}", ReasonCode.UP_TO_DATE,
                  before=entry.fields, after=want.fields(), desired=want, batch=record,
                  warnings=_drift(want.name, record))
    if entry.intent:  # searched for (remote._search_inputs): what it made is kept, adopted or cancelled here
        kept = replace(kept, action=Action.UPDATE, reason_code=ReasonCode.INTENT_RESOLVED,
                       reason=f"state only: an interrupted apply's create left nothing to adopt; its intent is "
                              f"dropped, and batch {record.id} ({record.status}) is kept")
    return [kept, *_duplicates(want, found, duplicates)]


def _running_keeper(want: Desired, entry: Entry, record: BatchRecord,
                    remote: RemoteView) -> tuple[dict | None, list[dict]]:
    """keep_oldest among the spec's running batches (the state's among them) that the entry's history
    does not hold. A completed batch of the state's is kept, and every running one is its duplicate:
    a lost create that landed late (remote.LATE_CREATE_WINDOW), or a forced replace the state does not
    know of (a restored backup)."""
    tagged = tagged_batches(remote.tagged, want.name, want.spec_hash, {h.batch_id for h in entry.history})
    running = [b for b in tagged if b["id"] != record.id and BatchStatus(b["status"]).running]
    if record.status == BatchStatus.COMPLETED:
        return (_listed(record), running) if running else (None, [])
    if record.running:
        running.append(remote.batches.get(record.id) or _listed(record))
    return keep_oldest(running)


def _superseded(want: Desired, entry: Entry | None, remote: RemoteView) -> list[Change]:
    """A cancel of each running batch of this name made from an earlier version of its spec that the
    state does not track (the state was lost, or an interrupted apply made it): at most one batch
    runs per spec name. Refused, as a replace is, when the spec sets lifecycle.prevent_cancel."""
    tracked = {entry.batch.id} if entry and entry.batch else set()
    tracked |= {r.id for r in entry.retries.batches} if entry and entry.retries else set()
    batches = superseded_batches(remote.tagged, want.name, want.spec_hash, tracked)
    if batches and (want.prevent_cancel or (entry is not None and entry.prevent_cancel)):
        raise PlanError(f"{want.name}: batch {batches[0]['id']} ({batches[0]['status']}) runs an earlier version "
                        "of this spec and is not tracked, and the spec sets lifecycle.prevent_cancel, so it is "
                        "not cancelled; wait until it finishes, or remove prevent_cancel")
    return [Change(want.name, Action.CANCEL, f"batch {b['id']} ({b['status']}) runs an earlier version of this "
                   "spec and is not tracked (made before the state was lost, or by an interrupted apply)",
                   ReasonCode.SUPERSEDED, before=_served_fields(b), desired=want, batch=BatchRecord.from_api(b))
            for b in batches]


def _served_fields(batch: dict) -> BatchFields:
    """What a batch was made from, as the server tells it (an earlier version's local input is not known)."""
    metadata = {k: v for k, v in (batch.get("metadata") or {}).items() if k not in (TAG_NAME, TAG_SPEC)}
    return BatchFields(endpoint=batch["endpoint"], completion_window=batch["completion_window"],
                       metadata=metadata, input_file_id=batch["input_file_id"])


def _listed(record: BatchRecord) -> dict:
    """A state's batch record as the batch list shows a batch (what keep_oldest reads)."""
    return {"id": record.id, "status": record.status, "created_at": record.created_at,
            "input_file_id": record.input_file_id, "request_counts": record.request_counts}


def _duplicates(want: Desired, keeper: dict | None, duplicates: list[dict]) -> list[Change]:
    """A cancel of each duplicate of `keeper`: same name, same spec, also running. With no keeper (a
    forced --replace makes a new batch), of each running batch of the spec the state does not track."""
    kept = f"{keeper['id']}, which is kept (made by a create whose answer was lost, or by another checkout)" \
        if keeper else "the new batch --replace makes (not in the state: made by a replace it does not know of)"
    return [Change(want.name, Action.CANCEL, f"duplicate batch {dup['id']} ({dup['status']}): same spec as {kept}",
                   ReasonCode.DUPLICATE, before=want.fields(), desired=want, batch=BatchRecord.from_api(dup))
            for dup in duplicates]


def _earlier(entry: Entry, record: BatchRecord) -> set[str]:
    return {record.id, *(h.batch_id for h in entry.history)}


def _interrupted_replacement(want: Desired, entry: Entry, record: BatchRecord, remote: RemoteView) -> dict | None:
    """A replacement an interrupted apply made for this very spec (e.g. a forced --replace whose
    old batch was not cancelled yet): found by the intent it left, it is adopted, never made again."""
    if not entry.intent or entry.intent.spec_hash != want.spec_hash:
        return None
    return find_tagged(remote.tagged, want.name, want.spec_hash, _earlier(entry, record))


def _plan_replace(want: Desired, entry: Entry, record: BatchRecord, remote: RemoteView, forced: bool,
                  resumed: dict | None = None) -> list[Change]:
    """Replace the state's batch. The new batch may already exist (an interrupted apply made it): it is
    adopted, with its duplicates cancelled. The replaced batch and the entry's history carry this
    spec's tags too after a forced --replace: they are never counted as the new batch."""
    diff = field_diff(entry.fields, want.fields())
    reason, code = _replace_reason(diff, forced, resumed)
    if record.running and entry.prevent_cancel:
        raise PlanError(f"{want.name}: replacing it would cancel batch {record.id}, which is {record.status}, "
                        f"and its spec sets lifecycle.prevent_cancel; wait until it finishes "
                        f"(`batchplan wait {want.name}`) or remove prevent_cancel")
    same_spec = tagged_batches(remote.tagged, want.name, want.spec_hash, _earlier(entry, record))
    found, duplicates = (None, [b for b in same_spec if BatchStatus(b["status"]).running]) if forced and \
        not resumed else keep_oldest(adoptable(same_spec))  # forced: a new batch; one running untracked goes
    if found:
        reason += f"; its new batch {found['id']} already exists (an earlier apply was interrupted): adopting it"
    if record.running:
        reason += f"; batch {record.id} is {record.status} and will be cancelled"
    return [Change(want.name, Action.REPLACE, reason, code, before=entry.fields, after=want.fields(), desired=want,
                   batch=record, found=found, diff=tuple(diff)),
            *_duplicates(want, found, duplicates)]


def _plan_retry(want: Desired, entry: Entry, view: AttemptsView, noop: Change) -> Change:
    """A follow-up batch of the requests without a result, once the latest attempt has ended
    and attempts are left (retries.next_attempt); else the noop, about the latest attempt."""
    from .retries import next_attempt, retry_reason

    selection = view.selection
    attempt = next_attempt(view.latest.status, view.made, want.retry, selection) if selection else None
    if attempt is None or want.retry is None or selection is None:
        if view.made == 1:
            return noop
        latest = view.latest
        return replace(noop, reason=f"retry batch {latest.id} (attempt {view.made}) is {latest.status}",
                       batch=latest, warnings=_drift(want.name, latest))
    planned = PlannedRetry(attempt, selection)
    if view.found:
        return Change(want.name, Action.RETRY, f"retry batch {view.found['id']} (attempt {attempt}) on the server "
                      "was made for this spec but is not in the state; recording it, creating nothing",
                      ReasonCode.FOUND_UNTRACKED, before=entry.fields, after=want.fields(), desired=want,
                      batch=view.latest, found=view.found, retry=planned)
    return Change(want.name, Action.RETRY, retry_reason(selection, attempt, want.retry), ReasonCode.WITHOUT_RESULT,
                  before=entry.fields, after=want.fields(), desired=want, batch=view.latest, retry=planned)


def _moved_phrase(entry: Entry, moved: tuple[str, str]) -> str:
    assert entry.batch is not None
    return (f"provider {entry.provider}'s base_url changed ({moved[0]} -> {moved[1]}): batch {entry.batch.id} "
            f"stays on {moved[0]}, not followed (cancel it there by hand if it still runs)")


def _plan_moved_replace(want: Desired, entry: Entry, remote: RemoteView, moved: tuple[str, str]) -> list[Change]:
    """The batch's provider points at another server now: shown as drift, a new batch made on the new
    server, the old one neither asked about nor cancelled (this client cannot reach it). `batch` stays
    None so apply cancels nothing; the old batch goes to the history. A new batch already on the new
    server is adopted (keep_oldest), its duplicates there cancelled."""
    assert entry.batch is not None
    diff = (FieldChange("provider.base_url", moved[0], moved[1]), *field_diff(entry.fields, want.fields()))
    found, duplicates = keep_oldest(tagged_batches(remote.tagged, want.name, want.spec_hash,
                                                   _earlier(entry, entry.batch)))
    reason = _moved_phrase(entry, moved) + "; a new batch is made there"
    if found:
        reason += f"; its new batch {found['id']} already exists (an earlier apply was interrupted): adopting it"
    return [Change(want.name, Action.REPLACE, reason, ReasonCode.PROVIDER_MOVED, before=entry.fields,
                   after=want.fields(), desired=want, found=found, diff=diff), *_duplicates(want, found, duplicates)]


def _plan_update(want: Desired, entry: Entry, record: BatchRecord) -> Change | None:
    """An update of the state only, when every changed field is one the spec's lifecycle.ignore_changes
    lists: as in Terraform, the batch is kept (not re-run, not cancelled); else None."""
    diff = field_diff(entry.fields, want.fields())
    changed = {d.path.split(".")[0] for d in diff}
    if not changed or not changed <= set(want.ignore_changes):
        return None
    return Change(want.name, Action.UPDATE, f"state only: changed {', '.join(d.path for d in diff)} "
                  f"(lifecycle.ignore_changes); batch {record.id} is kept, not re-run",
                  ReasonCode.CHANGES_IGNORED, before=entry.fields, after=want.fields(), desired=want, batch=record,
                  diff=tuple(diff))


def _replace_reason(diff: list[FieldChange], forced: bool, resumed: dict | None) -> tuple[str, ReasonCode]:
    if forced:
        return "forced by --replace", ReasonCode.FORCED
    if not diff:
        return "an interrupted replace is finished", \
            ReasonCode.INTERRUPTED_REPLACE if resumed else ReasonCode.SPEC_CHANGED
    changed = {d.path.split(".")[0] for d in diff}
    code = ReasonCode.INPUT_CHANGED if changed <= _INPUT_FIELDS else \
        ReasonCode.PARAMETERS_CHANGED if not changed & _INPUT_FIELDS else ReasonCode.SPEC_CHANGED
    return "changed: " + ", ".join(d.path for d in diff), code


def _why_gone(name: str, shards: list[str] | None) -> tuple[str, ReasonCode]:
    """Why an address in the state has no desired batch: its spec is gone, or is split otherwise now."""
    if not shards:
        return "spec removed", ReasonCode.SPEC_REMOVED
    spec = spec_of(name)
    now = f"fits one batch ({spec})" if shards == [spec] else \
        f"makes {len(shards)} shards ({shards[0]}..{shards[-1]})"
    return f"{spec} now {now}, so {name} goes", ReasonCode.RESHARDED


def _plan_removed(name: str, entry: Entry, remote: RemoteView, why: tuple[str, ReasonCode]) -> Change:
    gone, code = why
    if entry.batch is None:
        intent = entry.intent
        found = intent and find_tagged(remote.tagged, name, intent.spec_hash)
        if not found:
            return Change(name, Action.FORGET, f"{gone}; its interrupted create left no batch",
                          ReasonCode.INTERRUPTED_CREATE, before=entry.fields)
        entry = entry.model_copy(update={"batch": BatchRecord.from_api(found)})
    if moved := moved_provider(entry, remote.base_urls):
        return Change(name, Action.FORGET, f"{gone}; {_moved_phrase(entry, moved)}; only the state entry goes",
                      ReasonCode.PROVIDER_MOVED, before=entry.fields)
    record = _current(entry, remote)
    before = entry.fields
    if record.id in remote.missing:
        return Change(name, Action.FORGET, f"{gone}; batch {record.id} no longer exists on the server",
                      ReasonCode.BATCH_MISSING, before=before, batch=record)
    if not record.running:
        return Change(name, Action.FORGET, f"{gone}; batch {record.id} is {record.status}, "
                      "so only the state entry goes", code, before=before, batch=record)
    if entry.prevent_cancel:
        said = "its spec was removed" if code is ReasonCode.SPEC_REMOVED else gone
        raise PlanError(f"{name}: {said} while batch {record.id} is {record.status}, and the spec "
                        "set lifecycle.prevent_cancel; restore the spec until the batch finishes, or "
                        f"`batchplan state rm {name}` to stop tracking it without cancelling")
    return Change(name, Action.CANCEL, f"{gone}; batch {record.id} is {record.status}", code,
                  before=before, batch=record)


def _drift(name: str, record: BatchRecord) -> tuple[str, ...]:
    """What a kept batch that did not complete says: a batch cancelled by hand is a deliberate stop
    of spending, so it is kept (not run again unasked) and said; any other failure is drift."""
    tally = f"; {record.counts_phrase(with_failed=False)}" if record.request_counts else ""
    if cancelled := record.cancelled_outside(name, tally):
        return (f"batch {record.id} {cancelled}",)
    if not record.failed:
        return ()
    codes = record.error_codes()
    detail = f" ({codes})" if codes else ""
    return (f"batch {record.id} {record.status}{detail}{tally}; "
            f"run `batchplan plan --replace {name}` to make a new one",)


def field_diff(before: BatchFields, after: BatchFields) -> list[FieldChange]:
    """Field-level differences, as dotted paths, sorted (deepdiff does the comparing)."""
    from deepdiff import DeepDiff  # imported here: it is slow to import and only replaces need it

    tree = DeepDiff(before.model_dump(), after.model_dump(), view="tree")
    changes = []
    for level in (lvl for levels in tree.values() for lvl in levels):
        path = ".".join(str(p) for p in level.path(output_format="list"))
        old = None if _absent(level.t1) else level.t1
        new = None if _absent(level.t2) else level.t2
        changes.append(FieldChange(path, old, new))
    return sorted(changes, key=lambda c: c.path)


def _absent(value: object) -> bool:
    return type(value).__name__ == "NotPresent"
