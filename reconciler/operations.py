"""The commands' work: one function per command, taking a Project and returning a result.

Each function reads the specs, the state (through the project's store) and the server,
changes what its command changes, and returns a value for cli.py to render; it prints
nothing and asks nothing itself. A command that changes the state does it inside one
`store.transaction(...)`: lock, load, change, save once if anything changed. A command
talks to the servers through one Session: one event loop and one client per provider,
each batch's work sent to the provider it is on (providers.py). Where the user
must approve (apply), the caller's `review` runs between two turns of that loop, with the
plan made and the lock held, never while a request is waiting.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (BatchplanError, ConfigError, Interrupted, LockError, NotFound, PlanError, StalePlanError,
                     StateError, ValidationFailed)
from .session import Session

if TYPE_CHECKING:
    from .ledger import ApplyResult
    from .desired import Desired
    from .download import Manifest, Report, Target
    from .importer import Imported
    from .joined import JoinPart
    from .plan import Change, Plan
    from .project import Project
    from .queue import Limits
    from .scaffold import Scaffolded
    from .batch import BatchFields, BatchRecord
    from .state import Entry, State
    from .stores.base import LockInfo, Transaction
    from .remote import Snapshot
    from .status import StatusRow
    from .tokens import TokenCache
    from .watch import Display, WaitResult


def _command() -> str:
    """This command line, for the note of who holds the state lock (any database password masked:
    the note is stored and shown to others)."""
    from .stores.postgres import masked_url

    line = " ".join(["batchplan", *sys.argv[1:]])
    return re.sub(r"postgres(?:ql)?://\S+", lambda url: masked_url(url.group()), line)[:200]


def _load_state(project: Project) -> State | None:
    """The stored state, read without the lock (None: none yet)."""
    with closing(project.store()) as store:
        return store.load()


@contextmanager
def _transaction(project: Project) -> Iterator[Transaction]:
    """The state under the lock, for a command that changes it; the store is closed after (its
    database connection, for a PostgreSQL state). See stores/base.py."""
    with closing(project.store()) as store, store.transaction(_command(), project.lock_timeout) as txn:
        yield txn


def _load_desired(project: Project) -> list[Desired]:
    """Every spec with its input, validated (ValidationFailed lists every problem)."""
    from .desired import load_desired

    cache = project.hash_cache()
    desired = load_desired(project.specs_dir, project.root, cache, os.path.relpath(project.results_dir, project.root),
                           project.retry, project.providers)
    cache.save()
    return desired


def _entries(state: State | None, names: tuple[str, ...]) -> dict[str, Entry]:
    from .state import select_entries

    return select_entries(state, names)


def _snapshot(session: Session, entries: dict[str, Entry]) -> Snapshot:
    """What the servers say now about `entries`; each is asked only about its batches still running."""
    from .remote import Snapshot, any_unfinished, take_snapshot_all

    if not any_unfinished(entries):
        return Snapshot.of(entries)
    return session.run(lambda s: take_snapshot_all(s, entries, session.project.base_urls()))


# -- init, validate, plan, apply -------------------------------------------------------


def init(project: Project) -> Scaffolded:
    """Write the files a new project starts from (example spec, batchplan.yaml, .gitignore), never overwriting."""
    from .scaffold import scaffold

    return scaffold(project.root, project.specs_dir)


def sandbox_hint(project: Project) -> str | None:
    """For a command that found the state empty: a sentence when the sandbox's state holds batches
    (the user most likely forgot --sandbox), else None."""
    if project.sandbox or project.state_url:  # a PostgreSQL state keeps its sandbox in another workspace
        return None
    from .stores.file import FileStore

    path = project.state_path.parent / "sandbox" / project.state_path.name
    try:
        sandboxed = FileStore(path).load() if path.is_file() else None
    except StateError:
        return None  # a damaged sandbox state is the sandbox's business, said when it is used
    if sandboxed is None or not sandboxed.entries:
        return None
    shown = [os.path.relpath(p, project.root) for p in (project.state_path, path)]
    return (f"the state {shown[0]} has no batches, but the sandbox's state {shown[1]} holds "
            f"{len(sandboxed.entries)}: did you mean --sandbox?")


@dataclass(frozen=True)
class Validated:
    specs: int
    files: int
    requests: int
    splits: dict[str, str] = field(default_factory=dict)  # spec name -> why it makes its shards


def validate(project: Project) -> Validated:
    """Check every spec and input file, offline; say how each spec over a batch's limits is split."""
    desired = _load_desired(project)
    requests: dict[str, int] = {}  # input file -> its requests, counted once however many specs read it
    first_reader: dict[str, str] = {}
    for want in desired:
        if want.input and first_reader.setdefault(want.input, want.spec) == want.spec:
            requests[want.input] = requests.get(want.input, 0) + (want.requests or 0)
    splits = {want.spec: want.split for want in desired if want.split}
    return Validated(len({want.spec for want in desired}), len(requests), sum(requests.values()), splits)


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: `--target`, `--replace`, `--scan-all`."""

    targets: frozenset[str] = frozenset()
    replace: frozenset[str] = frozenset()
    scan_all: bool = False


async def _make_plan(project: Project, session: Session, desired: list[Desired], state: State | None,
                     request: PlanRequest) -> Plan:
    from .attempts import read_attempts_all
    from .plan import build_plan
    from .remote import read_remote_all
    from .results import ResultsCache

    remote = await read_remote_all(session, desired, state, full_scan=request.scan_all,
                                   base_urls=project.base_urls())
    attempts = await read_attempts_all(session, desired, state, remote, root=project.root,
                                       cache=ResultsCache(project.retries_dir / "results"))
    return build_plan(desired, state, remote, targets=request.targets, force_replace=request.replace,
                      attempts=attempts)


def _with_estimates(project: Project, the_plan: Plan) -> Plan:
    """The plan with what each change that sends requests may cost, and the apply's budget.

    Only inputs that would be sent are counted, offline, each content once ever on this
    machine (the token cache, `state/tokens.json`): a plan with nothing to create counts nothing.
    """
    if not the_plan.sending:
        return the_plan.with_estimates({}, project.budget_usd)
    from .estimate import estimate_desired

    cache, prices = project.token_cache(), project.price_table()
    estimates = {c.name: estimate_desired(_sent_input(project, c), project.root, cache, prices,
                                          project.default_max_output_tokens)
                 for c in the_plan.sending}
    cache.save()
    return the_plan.with_estimates(estimates, project.budget_usd)


def _sent_input(project: Project, change: Change) -> Desired:
    """What a change sends: its spec's input, or for a retry the lines it sends again."""
    if change.retry is None:
        return change.desired
    from .attempts import retry_desired

    return retry_desired(change.desired, change.retry.attempt, change.retry.selection, project.root,
                         project.retries_dir)


def _with_queue(project: Project, the_plan: Plan, state: State | None) -> Plan:
    """The plan with the creates that do not fit under `limits:` now marked queued (queue.py).

    PlanError when a batch is over its model's whole limit: it could never run. Weights come
    from the token cache, which the estimates filled moments ago; a running batch's input
    not in it is counted again if its content is still the one it was made from. Each
    provider is queued against its own limits: its profile's `limits:`, else the top-level ones.
    """
    if not the_plan.sending or not any(_limits_of(project, p).root for p in _sending_providers(the_plan)):
        return the_plan
    from .queue import plan_candidates, plan_in_flight, schedule_by_provider

    cache = project.token_cache()

    def weigh(fields: BatchFields) -> dict[str, int] | None:
        return _weight(project.root, cache, fields)

    found = schedule_by_provider(plan_candidates(the_plan, weigh), plan_in_flight(state, the_plan, weigh),
                                 lambda provider: _limits_of(project, provider))
    cache.save()
    found.check()
    return the_plan.with_queue(found)


def _sending_providers(the_plan: Plan) -> set[str | None]:
    return {c.desired.provider for c in the_plan.sending if c.desired}


def _limits_of(project: Project, provider: str | None) -> Limits:
    """The enqueued-token limits on `provider`: its profile's own `limits:`, else the top-level block."""
    return project.provider_limits(provider) or project.limits


def _weight(root: Path, cache: TokenCache, fields: BatchFields) -> dict[str, int] | None:
    """A batch's input tokens per model (queue.weight), None when its input cannot be counted: no local
    file, an endpoint batchplan does not count, or a file whose content is no longer the one hashed."""
    from .paths import confine
    from .queue import weight
    from .tokens import COUNTED_ENDPOINTS

    if not fields.input or not fields.input_sha256 or fields.endpoint not in COUNTED_ENDPOINTS:
        return None
    try:
        tokens = cache.count(confine(fields.input, root, root), fields.endpoint, sha256=fields.input_sha256)
    except (OSError, BatchplanError):  # gone, unreadable, or (a hand-edited state) outside the repository
        return None
    return weight(tokens) if tokens.sha256 == fields.input_sha256 else None


def plan(project: Project, request: PlanRequest, out: Path | None = None) -> Plan:
    """What apply would change, with its cost and what waits for capacity. Reads the server;
    writes only the per-machine caches (input hashes, token counts) and `out`."""
    desired = _load_desired(project)
    state = _load_state(project)
    with Session(project) as session:
        the_plan = session.run(lambda s: _make_plan(project, s, desired, state, request))
    the_plan = _with_queue(project, _with_estimates(project, the_plan), state)
    if out is not None:
        from .planfile import save_plan

        save_plan(out, the_plan, project)
    return the_plan


@dataclass(frozen=True)
class Applied:
    plan: Plan
    result: ApplyResult | None  # None: the plan had no changes


def apply(project: Project, request: PlanRequest, *, planfile: Path | None, review: Callable[[Plan], None],
          report: Callable[[str, str], None], session: Session | None = None) -> Applied:
    """Plan (or load a saved plan), let `review` see it (and refuse it), then carry it out, under the lock.

    A plan over a budget is refused (OverBudget) before `review` and before anything is written or
    sent: a saved plan, which carries its estimates, before connecting; a new one once planned.
    So is one with a batch over its model's whole enqueued-token limit; creates that do not fit
    under it now are left queued (a saved plan keeps the queue it was made with). `session`: one
    the caller keeps open across applies (apply_watch); else this apply's own.
    """
    from .budget import check_budget

    saved = None
    if planfile is not None:
        from .planfile import load_plan

        saved_plan, inputs = load_plan(planfile, project)
        saved = dataclasses.replace(saved_plan, budget_usd=project.budget_usd), inputs  # today's budget
        check_budget(saved[0])
    desired = None if saved else _load_desired(project)
    with (nullcontext(session) if session else Session(project)) as session:
        session.require(_providers_needed(desired, saved[0] if saved else None))  # before the lock: said at once
        return _apply_locked(project, session, request, (planfile, saved) if saved else None, desired, review,
                             report)


def _providers_needed(desired: list[Desired] | None, saved: Plan | None) -> set[str | None]:
    """The providers an apply surely talks to (the environment's when no spec names one, as before providers)."""
    from .apply import providers_of

    needed = providers_of(saved) if saved else {d.provider for d in desired or []}
    return needed or {None}


def _apply_locked(project: Project, session: Session, request: PlanRequest,
                  from_file: tuple[Path, tuple[Plan, dict]] | None, desired: list[Desired] | None,
                  review: Callable[[Plan], None], report: Callable[[str, str], None]) -> Applied:
    """apply's work under the state lock: plan (or check the saved plan `from_file`), review, carry out."""
    from .apply import Applier, apply_plan, providers_of
    from .budget import check_budget

    planfile, saved = from_file or (None, None)
    with _transaction(project) as txn:  # the clients are made on first use: after the lock
        state = txn.state if txn.existed else None
        if saved:
            from .planfile import check_fresh

            check_fresh(planfile, *saved, state, project.root)
        the_plan = saved[0] if saved else _with_queue(project, _with_estimates(
            project, session.run(lambda s: _make_plan(project, s, desired, state, request))), state)
        check_budget(the_plan)
        review(the_plan)  # the loop is idle here: asking the user holds up no request
        if not the_plan.has_changes:
            txn.state.record_batches(the_plan.refreshed)  # newly seen statuses; saved if any changed
            return Applied(the_plan, None)

        async def carry_out(s: Session) -> ApplyResult:
            apis = await s.clients(providers_of(the_plan))
            return await apply_plan(Applier(apis, txn, the_plan, repo_root=project.root, report=report,
                                            work_dir=project.retries_dir))

        result = session.run(carry_out)
    return Applied(the_plan, result)


@dataclass(frozen=True)
class Watched:
    """How `apply --watch` ended: every batch it watched as last seen, and the creates that failed."""

    waited: Waited
    failed: dict[str, str]  # name -> why its create failed (the watch stops at the first round with one)


def apply_watch(project: Project, request: PlanRequest, *, review: Callable[[Plan], None],
                report: Callable[[str, str], None], display: Callable[[list[str]], Display],
                interval: float | None) -> Watched:
    """Apply, then poll; apply again whenever a batch ends while creates wait for enqueued-token
    capacity (or a batch failed for want of it); stop once every batch of the first plan has ended.

    Each round is an ordinary apply under the lock, so a watch killed at any point is resumed
    by the next, like any apply; the lock is free while it polls. Later rounds only create
    and adopt: a spec edited meanwhile stops the watch (`_creates_only`). Ctrl-C while it
    polls stops it with the state as the last round saved it.
    """
    interval = interval or (1.0 if project.sandbox else 15.0)
    with Session(project) as session:
        applied = apply(project, request, planfile=None, review=review, report=report, session=session)
        names = [c.name for c in applied.plan.changes if c.desired is not None]  # not those cancelled or forgotten
        shown = display(names)
        try:
            while not (applied.result and applied.result.failed):
                queued, polled = bool(applied.plan.queued), _watched_entries(project, names)
                if not queued and not _any_running(polled, names):
                    break
                session.run(lambda s: _poll_until_freed(project, s, polled, shown, interval, queued))
                applied = apply(project, PlanRequest(targets=frozenset(names)), planfile=None, review=_creates_only,
                                report=report, session=session)
        except KeyboardInterrupt:
            raise Interrupted("interrupted: the state is saved; run `batchplan apply --watch` again to go on") from None
        finally:
            shown.close()
    from .remote import Snapshot
    from .watch import WaitResult

    final = {n: e for n, e in _watched_entries(project, names).items() if n in names}
    return Watched(Waited(names, WaitResult(Snapshot.of(final), timed_out=False) if names else None),
                   dict(applied.result.failed) if applied.result else {})


def _watched_entries(project: Project, names: list[str]) -> dict[str, Entry]:
    """The state's entries of `names` that have a batch, and every other entry whose batch may still be
    running: those hold enqueued tokens too, and their end frees capacity."""
    state = _load_state(project)
    entries = state.entries if state else {}
    return {n: e for n, e in sorted(entries.items()) if e.batch and (n in names or not e.batch.terminal)}


def _any_running(entries: dict[str, Entry], names: list[str]) -> bool:
    from .remote import any_unfinished

    return any_unfinished({n: e for n, e in entries.items() if n in names})


async def _poll_until_freed(project: Project, session: Session, entries: dict[str, Entry], shown: Display,
                            interval: float, queued: bool) -> None:
    """Poll until every batch has ended, or until one ended that freed capacity while creates wait for it
    (queued, or a batch to make again because it failed for want of capacity). A batch that failed for
    capacity frees none: the server's capacity is smaller than batchplan thought (someone else's batches
    hold some), so it is made again once one of ours ends, or when none of ours runs any more. Each
    batch is asked about on its own provider (remote.take_snapshot_all)."""
    import asyncio

    from .queue import failed_for_capacity
    from .remote import take_snapshot_all
    from .watch import wait_until_finished

    running = {n for n, e in entries.items() if not e.batch.terminal}
    if not running:  # the capacity is held by no batch of this state (another tool's): look again later
        await asyncio.sleep(interval)
        return

    def freed(snapshot: Snapshot) -> bool:
        ended = [r for n, r in snapshot.records.items() if n in running and (r.terminal or n in snapshot.missing)]
        waiting = queued or any(failed_for_capacity(r) for r in snapshot.records.values())
        return waiting and any(not failed_for_capacity(r) for r in ended)

    await wait_until_finished(lambda current: take_snapshot_all(session, current, project.base_urls()), entries,
                              shown, interval=interval, timeout=None, until=freed)


def _creates_only(the_plan: Plan) -> None:
    """A later round of `apply --watch` carries out, unasked, only what the first plan asked for:
    the creates it queued or whose batch failed for capacity, and adoptions of batches already made."""
    from .plan import Action, ReasonCode

    for change in the_plan.changes:
        if change.action not in (Action.CREATE, Action.ADOPT, Action.NOOP) and \
                change.reason_code is not ReasonCode.INTERRUPTED_REPLACE:
            raise PlanError(f"{change.name}: would {change.action.value} ({change.reason}), which the plan this "
                            "watch began with did not ask for: its spec or batch changed since; nothing more was "
                            "sent. Run `batchplan apply --watch` again to review the new plan")


def force_unlock(project: Project, lock_id: str, force: bool = False) -> tuple[str, LockInfo]:
    """Remove the state lock `lock_id` that a process that is gone left; where it was, and whose it was.

    A live holder is refused, unless `force` (after a Notice naming it): the file store then lets the
    next command lock afresh, the PostgreSQL store ends the holder's database session."""
    with closing(project.store()) as store:
        return store.location, store.force_unlock(lock_id, force=force)


# -- status, wait, refresh, download ---------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    rows: list[StatusRow]
    now: float


def status(project: Project, names: tuple[str, ...], shards: bool = False) -> StatusReport:
    """Every batch in the state (or the names) as the server says now: a spec split into shards as one
    row, and a row per shard too when `shards` (or when a shard is named). Writes nothing."""
    from .spec import shard_of
    from .status import status_rows, with_attempts

    entries = _entries(_load_state(project), names)
    latest = _latest(entries)
    with Session(project) as session:
        snapshot = _snapshot(session, latest)
    shards = shards or any(shard_of(name) is not None for name in names)
    return StatusReport(with_attempts(status_rows(latest, snapshot, shards),
                                      _attempt_phrases(project, entries, snapshot)), time.time())


def _latest(entries: dict[str, Entry]) -> dict[str, Entry]:
    """The entries with each one's latest attempt as its batch: a retry batch once one is made."""
    from .attempts import latest_entries

    return latest_entries(entries)


def _attempt_phrases(project: Project, entries: dict[str, Entry], snapshot: Snapshot) -> dict[str, str]:
    """name -> what its attempts came to, for the specs (and shards) that retry or have retried (`status`);
    a sharded spec's name -> its shards' summed."""
    from .attempts import attempts_phrase, shards_attempts_phrase
    from .spec import load_specs, shard_of, spec_of

    loaded, _ = load_specs(project.specs_dir, project.root)  # status works with a broken spec: its policy is unknown
    policies = {item.spec.name: item.spec.retry_policy(project.retry) for item in loaded}
    phrases, sharded = {}, {}
    for name, entry in entries.items():
        latest = snapshot.records.get(name)
        if latest and (phrase := attempts_phrase(entry, latest, policies.get(spec_of(name)))):
            phrases[name] = phrase
        if shard_of(name) is not None:
            sharded.setdefault(spec_of(name), []).append((entry, latest))
    for spec, shards in sharded.items():
        if phrase := shards_attempts_phrase(shards, policies.get(spec)):
            phrases[spec] = phrase
    return phrases


@dataclass(frozen=True)
class Waited:
    names: list[str]
    result: WaitResult | None          # None: nothing to wait for
    not_recorded: LockError | None = None  # the state lock was held: the final statuses are not saved


def wait(project: Project, names: tuple[str, ...], *, interval: float | None, timeout: float | None,
         display: Callable[[list[str]], Display]) -> Waited:
    """Poll until the batches have finished (or `timeout`), then record what was seen, under the lock."""
    from .remote import any_unfinished, providers_to_ask, take_snapshot_all
    from .spec import spec_of
    from .watch import BySpec, WaitResult, wait_until_finished

    entries = _latest(_entries(_load_state(project), names))
    if not entries:
        return Waited([], None)
    interval = interval or (1.0 if project.sandbox else 15.0)
    with Session(project) as session:
        if not any_unfinished(entries):
            return Waited(list(entries), WaitResult(_snapshot(session, entries), timed_out=False))
        session.require(providers_to_ask(entries, project.base_urls()))  # a missing key: said before the display
        shown = BySpec(display(list(dict.fromkeys(spec_of(name) for name in entries))))
        try:
            result = session.run(lambda s: wait_until_finished(
                lambda current: take_snapshot_all(s, current, project.base_urls()), entries, shown,
                interval=interval, timeout=timeout))
        finally:
            shown.close()
    try:
        with _transaction(project) as txn:
            txn.state.record_batches(result.snapshot.records)
    except LockError as exc:
        return Waited(list(entries), result, not_recorded=exc)
    return Waited(list(entries), result)


@dataclass(frozen=True)
class Refreshed:
    changed: list[str]
    snapshot: Snapshot | None  # None: every batch had finished, nothing was asked


def refresh(project: Project) -> Refreshed:
    """Record in the state what the server says now about batches still running."""
    from .remote import any_unfinished

    with Session(project) as session, _transaction(project) as txn:
        entries = _latest(_entries(txn.state, ()))
        if not any_unfinished(entries):
            return Refreshed([], None)
        snapshot = _snapshot(session, entries)
        return Refreshed(txn.state.record_batches(snapshot.records), snapshot)


async def _batch_of(session: Session, provider: str | None, name: str, batch_id: str, entry: Entry | None) -> dict:
    """The batch `batch_id` on `provider`, once it is known to be one of `name`'s: in its entry (current or
    history), or tagged with its name (a batch cancelled with its removed spec has no entry any more)."""
    from .spec import TAG_NAME, spec_of

    try:
        batch = await (await session.client(provider)).retrieve_batch(batch_id)
    except NotFound:
        raise ConfigError(f"the server has no batch {batch_id}; `batchplan state show {name}` lists its "
                          "batches (`batch` and `history`)") from None
    tag = (batch.get("metadata") or {}).get(TAG_NAME)
    if batch_id not in _batch_ids(entry) and name not in (tag, spec_of(tag or "")):
        raise ConfigError(f"batch {batch_id} is not a batch of {name}: it is neither in its state entry nor "
                          f"tagged {TAG_NAME}={name}; `batchplan state show {name}` lists its batches")
    return batch


@dataclass(frozen=True)
class _ToDownload:
    records: dict[str, BatchRecord | None]  # name -> the record of the batch to download
    state: State | None
    latest: bool                            # whether those are the names' latest batches
    providers: dict[str, str | None]        # name -> the provider that batch is on


def _batch_ids(entry: Entry | None) -> set[str]:
    """The batches an entry knows: its current one and those it replaced (its history)."""
    if entry is None:
        return set()
    return {entry.batch.id if entry.batch else "", *(h.batch_id for h in entry.history)}


def _shard_holding(state: State | None, name: str, batch_id: str) -> str:
    """`download SPEC --batch ID` of a spec split into shards: the shard whose batch ID is (its current
    or a replaced one); else `name` as given."""
    from .spec import shard_of, spec_of

    if state is None or name in state.entries:
        return name
    return next((address for address, entry in state.entries.items() if spec_of(address) == name
                 and shard_of(address) is not None and batch_id in _batch_ids(entry)), name)


def _batch_provider(entry: Entry | None, batch_id: str, spec_provider: str | None) -> str | None:
    """The provider batch `batch_id` of an entry is on: its current one's, a replaced one's (history),
    else the spec's (a batch cancelled with its removed spec has no entry any more)."""
    if entry is None:
        return spec_provider
    if entry.batch and entry.batch.id == batch_id:
        return entry.provider
    return next((h.provider for h in entry.history if h.batch_id == batch_id), entry.provider)


def _download_records(project: Project, session: Session, names: tuple[str, ...], batch_id: str | None,
                      spec_providers: dict[str, str | None]) -> _ToDownload:
    from .batch import BatchRecord
    from .state import select_entries

    state = _load_state(project)
    if batch_id is None:
        entries = _latest(_entries(state, names))
        snapshot = _snapshot(session, entries)
        return _ToDownload({n: snapshot.records.get(n) for n in entries}, state, True,
                           {n: e.provider for n, e in entries.items()})
    name = _shard_holding(state, names[0], batch_id)
    entry = state.entries.get(name) if state else None
    provider = _batch_provider(entry, batch_id, spec_providers.get(name))
    session.require([provider])
    batch = session.run(lambda s: _batch_of(s, provider, name, batch_id, entry))
    current = entry is not None and entry.batch is not None and entry.batch.id == batch_id
    if current:
        select_entries(state, (name,))
    return _ToDownload({name: BatchRecord.from_api(batch)}, state, current, {name: provider})


def download(project: Project, names: tuple[str, ...], *, batch_id: str | None = None, join: bool = False) -> Report:
    """Write each finished batch's result files, skipping those already on disk intact.

    `batch_id`: that batch of the one name instead of its latest. `join`: also joined.jsonl."""
    from .download import (MANIFEST, Manifest, Report, destinations, every_attempt, files_to_download, merge_shards,
                           not_yet_downloaded, notes_on_earlier_files, restore_latest, sharded_specs, spec_inputs)
    from .spec import load_specs, shard_of, spec_of

    specs, problems = load_specs(project.specs_dir, project.root)
    if problems:
        raise ValidationFailed(problems)
    manifest = Manifest(project.results_dir / MANIFEST)
    with Session(project) as session:
        found = _download_records(project, session, names, batch_id, {s.spec.name: s.spec.provider for s in specs})
        records, state, latest = found.records, found.state, found.latest
        own = [n for n in records if shard_of(n) is None]  # a shard's latest files are its spec's, merged
        area = project.results_area(spec_inputs(specs, project.root))
        dests = destinations(specs, list(dict.fromkeys([*own, *map(spec_of, records)])), area)
        wanted, notes = files_to_download(records, {n: dests[n] for n in own}, project.root, project.results_dir,
                                          latest)
        earlier = _earlier_attempts(state, records) if latest else {}  # every attempt of a retried spec or shard
        wanted = every_attempt(wanted, earlier, dests, project.root, project.results_dir)
        if latest:
            notes += notes_on_earlier_files({n: r for n, r in records.items() if n not in earlier}, dests,
                                            project.root, manifest)
        report = Report(notes=notes)
        todo, restore = not_yet_downloaded(wanted, manifest, report)
        try:
            restore_latest(restore, manifest, report)
            if todo:
                session.run(lambda s: _download_from_each(s, todo, found.providers, manifest, report))
            _merge_attempts(project, state, {n: e for n, e in earlier.items() if n in own}, records, dests,
                            manifest, report)
            for spec, shards in (sharded_specs(records, state) if latest else {}).items():
                merge_shards(spec, shards, records, state, dests[spec], project.results_dir, project.root,
                             manifest, report, earlier)
        finally:
            manifest.save()
    if join:
        _join_all(project, found.state, records, report, latest)
    return report


async def _download_from_each(session: Session, todo: list[Target], providers: dict[str, str | None],
                              manifest: Manifest, report: Report) -> None:
    """Each file from the provider its batch is on, one provider after the other (a stable report)."""
    from .download import download_files
    from .providers import sort_key

    session.require(providers[t.name] for t in todo)  # every key before the first download
    for provider in sorted({providers[t.name] for t in todo}, key=sort_key):
        share = [t for t in todo if providers[t.name] == provider]
        await download_files(await session.client(provider), share, manifest, report)
def _earlier_attempts(state: State | None, records: dict[str, BatchRecord | None]) -> dict[str, list[BatchRecord]]:
    """name -> the attempts before its latest, for each name that has retried and whose latest has ended."""
    from .attempts import attempt_records

    earlier = {}
    for name, rec in records.items():
        attempts = attempt_records(state.entries[name]) if state and name in state.entries else []
        if rec is not None and rec.terminal and len(attempts) > 1:
            earlier[name] = attempts[:-1]
    return earlier


def _merge_attempts(project: Project, state: State | None, earlier: dict[str, list[BatchRecord]],
                    records: dict[str, BatchRecord | None], dests: dict, manifest, report: Report) -> None:
    """Each retried name's output and errors files: every attempt merged, in the order of its input."""
    from .download import merge_results

    for name, before in earlier.items():
        first = before[0]
        source, why = _input_of(project, state, name, first)
        if source is None:
            report.notes.append(f"{name}: its {len(before) + 1} attempts were not merged: {why}")
            continue
        merge_results(name, [*before, records[name]], source, dests[name], project.root, project.results_dir,
                      manifest, report)


def _join_all(project: Project, state: State | None, records: dict[str, BatchRecord | None], report: Report,
              latest: bool) -> None:
    """joined.jsonl for each finished batch whose results are here, from its own input, in the batch's
    directory; for a spec split into shards and named whole, one in the spec's directory: every
    shard's, in input order."""
    from .download import batch_dir, sharded_specs
    from .joined import JOINED

    whole = sharded_specs(records, state) if latest else {}
    for spec, names in whole.items():
        _join_spec(project, state, spec, names, records, report)
    joined_whole = {name for names in whole.values() for name in names}
    for name, rec in records.items():
        if rec is not None and rec.terminal and name not in joined_whole:
            part, why = _join_part(project, state, name, rec, report)
            dest = batch_dir(project.results_dir, name, rec.id) / JOINED
            _write_join(project, name, [part] if part else [], why, dest, report, of_batch=rec.id)


def _join_spec(project: Project, state: State | None, spec: str, names: list[str],
               records: dict[str, BatchRecord | None], report: Report) -> None:
    """One joined.jsonl for a sharded spec, once every shard has finished and each one's input is here."""
    from .joined import JOINED

    if any(records[n] is None or not records[n].terminal for n in names):
        report.notes.append(f"{spec}: no {JOINED} until every shard has finished (`batchplan wait {spec}`)")
        return
    parts, why = [], ""
    for name in names:
        part, why = _join_part(project, state, name, records[name], report)
        if part is None:
            break
        parts.append(part)
    _write_join(project, spec, parts if len(parts) == len(names) else [], why, project.results_dir / spec / JOINED,
                report, how=f", from {len(names)} shards, in input order")


def _join_part(project: Project, state: State | None, name: str, rec: BatchRecord,
               report: Report) -> tuple[JoinPart | None, str]:
    """What joins batch `rec` of `name`: its input (a shard's lines of it) and its result files here."""
    from .download import entry_shard
    from .joined import JoinPart

    files = [t.dest for t in report.fetched if t.name == name and t.batch_id == rec.id]
    entry = state.entries.get(name) if state else None
    if entry is not None and entry.shard is not None and entry.fields.input:
        if _input_sha(state, entry, rec) != entry.fields.input_sha256:
            return None, (f"{name}'s batch {rec.id} was not made from the lines of {entry.fields.input} the "
                          "shard holds now (a retry's, or the state does not say)")
        return JoinPart(project.root / entry.fields.input, entry_shard(entry), files), ""
    source, why = _input_of(project, state, name, rec)
    return (JoinPart(source, None, files), "") if source else (None, why)


def _write_join(project: Project, name: str, parts: list[JoinPart], why: str, dest: Path, report: Report, *,
                how: str = "", of_batch: str = "") -> None:
    """Write `dest` from `parts` and say so; with no parts (or an input that changed), say why not.
    `how` ends the line said when written; `of_batch` names the one batch joined, when not a whole spec."""
    from .joined import JOINED, write_joined

    try:
        joined = write_joined(parts, dest) if parts else None
    except (StalePlanError, OSError):  # a shard's lines changed since (checked as they were read), or gone
        joined, why = None, (f"{os.path.relpath(parts[0].input_path, project.root)} is not the input it was made "
                             "from (it changed since)")
    if joined is None:
        report.notes.append(f"{name}: no {JOINED}{f' for batch {of_batch}' if of_batch else ''}: {why}")
        return
    missing = f", {joined.without_result} without a result" if joined.without_result else ""
    report.written.append(f"{name}: wrote {os.path.relpath(dest, project.root)} ({joined.requests} requests"
                          f"{missing}{how})")


def _input_sha(state: State, entry: Entry, rec: BatchRecord) -> str | None:
    """The sha256 of the input batch `rec` was made from, as the state knows it (its upload's)."""
    return next((s for s, up in state.all_uploads() if up.file_id == rec.input_file_id), None) \
        or (entry.fields.input_sha256 if entry.batch and entry.batch.id == rec.id else None)


def _input_of(project: Project, state: State | None, name: str, rec: BatchRecord) -> tuple[Path | None, str]:
    """The local input file batch `rec` was made from, checked by its sha256; else (None, why not)."""
    from .inputs import hash_file

    entry = state.entries.get(name) if state else None
    if entry is None or not entry.fields.input:
        return None, "its input is not a local file named in the state"
    sha = _input_sha(state, entry, rec)
    path = project.root / entry.fields.input
    if sha is None or not path.is_file() or hash_file(path) != sha:
        return None, (f"{entry.fields.input} is not the input it was made from (it changed since, or the state "
                      "does not say which content that was)")
    return path, ""


# -- import and the state by hand ------------------------------------------------------


@dataclass(frozen=True)
class ImportedBatch:
    batch_id: str
    status: str
    imported: Imported


async def _fetch_for_import(session: Session, want: Desired, batch_id: str) -> tuple[dict, dict | None]:
    """The batch, and its input file (None when gone, or when the spec names no local input), from the
    provider the spec names."""
    api = await session.client(want.provider)
    try:
        batch = await api.retrieve_batch(batch_id)
    except NotFound:
        raise ConfigError(f"the server has no batch {batch_id}; check the id (`batchplan import NAME "
                          "BATCH_ID`)") from None
    try:
        return batch, (await api.retrieve_file(batch["input_file_id"]) if want.input else None)
    except NotFound:
        return batch, None


def import_batch(project: Project, name: str, batch_id: str) -> ImportedBatch:
    """Record a batch made elsewhere as the batch of the spec `name`. Changes nothing on the server."""
    from .batch import check_batch_id
    from .importer import import_entry

    check_batch_id(batch_id)
    want = next((d for d in _load_desired(project) if d.name == name), None)
    if want is None:
        raise ConfigError(f"no spec named {name} under {project.specs_dir}; write its spec first, then import")
    with _transaction(project) as txn:  # the state first: a state that cannot be read sends nothing
        holder = next((n for n, e in txn.state.entries.items() if e.batch and e.batch.id == batch_id), None)
        if holder:
            raise StateError(f"batch {batch_id} is already in the state, as {holder}; nothing was changed")
        if name in txn.state.entries:
            raise StateError(f"the state already has an entry for {name}; `batchplan state rm {name}` first "
                             "(it leaves its batch alone on the server), then import")
        with Session(project) as session:
            batch, input_file = session.run(lambda s: _fetch_for_import(s, want, batch_id))
        imported = import_entry(want, batch, input_file, project.root / want.input if want.input else None)
        txn.state.entries[name] = imported.entry
    return ImportedBatch(batch_id, batch["status"], imported)


def state_entries(project: Project, names: tuple[str, ...] = ()) -> dict[str, Entry]:
    """The state's entries (or the names'), sorted by name. Never calls the server."""
    return _entries(_load_state(project), names)


@dataclass(frozen=True)
class Removed:
    entry: Entry
    backup: str = field(default="")  # where the state before the removal is kept


def remove_entry(project: Project, name: str) -> Removed:
    """Stop tracking `name`. Its batch is left alone on the server."""
    with closing(project.store()) as store, store.transaction(_command(), project.lock_timeout) as txn:
        _entries(txn.state, (name,))
        entry = txn.state.entries.pop(name)
    return Removed(entry, store.backup_location)


@dataclass(frozen=True)
class Migrated:
    source: str   # where the state was (any password masked)
    target: str   # where it is now
    state: State
    settings: str  # the batchplan.yaml lines that switch to the target


def migrate_state(project: Project, to: str, workspace: str | None, force: bool) -> Migrated:
    """Copy the state, lineage and serial kept, to another store (`to`: a postgresql:// URL or a file
    path); a target that holds a state is replaced only when `force`. See stores/migrate.py."""
    from .project import check_state_location, is_state_url
    from .stores.migrate import migrate
    from .stores.postgres import url_without_password

    check_state_location(to, "--to")
    if workspace and not is_state_url(to):
        raise ConfigError(f"--workspace {workspace}: a workspace is for a PostgreSQL target (--to postgresql://...); "
                          "a state file has none")
    with closing(project.store()) as source, closing(project.store(to, workspace)) as target:
        state = migrate(source, target, force=force, lock_timeout=project.lock_timeout)
    if is_state_url(to):
        settings = f"state: {url_without_password(to)}\nworkspace: {workspace or project.workspace}\n"
    else:
        settings = f"state: {to}\n"
    return Migrated(source.location, target.location, state, settings)
