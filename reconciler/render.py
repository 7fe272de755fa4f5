"""Renderings for people: a plan as Terraform-like text, the public JSON document and Markdown,
and the results of the other commands.

Everything here is a pure function from a value to a string, sorted by name, so tests
compare whole strings and reviewers see stable diffs. Colour (ANSI styles) only when
the caller asks: cli.py asks on a terminal without NO_COLOR.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from .plan import ORDER, Action, Change, Plan
from .spec import shard_of, spec_of

if TYPE_CHECKING:
    from .ledger import ApplyResult
    from .desired import Desired
    from .download import Report
    from .operations import ImportedBatch, Migrated, Refreshed, Removed, StatusReport, Waited, Watched
    from .scaffold import Scaffolded
    from .state import Entry

JSON_FORMAT_VERSION = "1"
_COLOURS = {Action.CREATE: "green", Action.ADOPT: "cyan", Action.UPDATE: "yellow", Action.REPLACE: "yellow",
            Action.CANCEL: "red", Action.FORGET: "magenta", Action.RETRY: "blue", Action.NOOP: None}
_PHRASES = {Action.CREATE: "to create", Action.ADOPT: "to adopt", Action.UPDATE: "to update (state only)",
            Action.REPLACE: "to replace", Action.RETRY: "to retry", Action.CANCEL: "to cancel",
            Action.FORGET: "to forget",
            Action.NOOP: "unchanged"}
SHORT_HASH = 12  # hex digits of a sha256 shown in plans: enough to tell two contents apart


def _value(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _short_hash(value: object) -> str:
    return str(value)[:SHORT_HASH] if value else "none"


def _requests_phrase(before: int | None, after: int | None) -> str:
    """`6 → 7 requests (+1)`; just the new count when the old one is not known."""
    if before is None or after is None:
        return f"{after} requests" if after is not None else "requests unknown"
    delta = f" ({after - before:+d})" if after != before else ""
    return f"{before} → {after} requests{delta}"


def _diff_lines(change: Change) -> list[str]:
    """A replace's or update's changed fields; an input's content as short hashes and request counts."""
    lines = []
    for d in change.diff:
        if d.path == "input_sha256":
            old = (change.batch.request_counts or {}).get("total") if change.batch else None
            new = change.desired.requests if change.desired else None
            lines.append(f"~ input: sha256 {_short_hash(d.before)} -> {_short_hash(d.after)}, "
                         f"{_requests_phrase(old or None, new)}")
        else:
            lines.append(f"~ {d.path}: {_value(d.before)} -> {_value(d.after)}")
    return lines + _rerun_lines(change)


def _rerun_lines(change: Change) -> list[str]:
    """A replace of a completed batch runs its work again: say how much (the cost estimate belongs here too)."""
    old, want = change.batch, change.desired
    if change.action is not Action.REPLACE or not old or old.status != "completed" or not want or not want.requests:
        return []
    return [f"re-runs {want.requests} requests: batch {old.id} already completed"]


def _create_lines(want: Desired) -> list[str]:
    """What a create makes: endpoint, model, input, metadata, expiry, and where download puts its results."""
    lines_of = f" lines {want.shard.first_line:,}-{want.shard.last_line:,}" if want.shard else ""
    source = (f"{want.input}{lines_of} (sha256 {_short_hash(want.input_sha256)}, {want.requests} requests)"
              if want.input and want.input_sha256 else want.input_file_id)
    lines = [f"provider: {want.provider}"] if want.provider else []
    lines.append(f"endpoint: {want.endpoint}")
    if want.models:
        lines.append(f"model{'s' * (len(want.models) > 1)}: {', '.join(want.models)}")
    lines.append(f"input: {source}")
    if want.metadata:
        lines.append(f"metadata: {_value(want.metadata)}")
    if want.output_expires_after:
        seconds = want.output_expires_after["seconds"]
        lines.append(f"results expire: {seconds} s ({seconds / 86400:g} days) after the batch is created")
    if want.output:
        lines.append(f"output: {want.output}")
    return lines


def _detail_lines(change: Change) -> list[str]:
    queued = [change.queued] if change.queued else []  # first: it says this apply will not make it yet
    if change.action in (Action.REPLACE, Action.UPDATE):
        return queued + _diff_lines(change)
    if change.action is Action.CREATE and change.desired:
        return queued + _create_lines(change.desired)
    if change.action is Action.RETRY and change.retry and change.desired and not change.found:
        sent, shard = change.retry.selection, change.desired.shard
        lines = f" {shard.first_line:,}-{shard.last_line:,}" if shard else ""  # a shard's retry: its lines only
        return [f"input: {sent.requests:,} of the {sent.total:,} lines{lines} of {change.desired.input}, as they are "
                f"there (sha256 {_short_hash(sent.sha256)})"]
    return queued


def _estimate_lines(change: Change, estimated: bool) -> list[str]:
    """What a change that sends requests may cost: its requests, tokens and cost range."""
    if not change.sends_requests or not estimated:
        return []
    from .estimate import unknown_cost, usd_range

    found, why = change.estimate, unknown_cost(change.desired, change.estimate)
    if found is None:
        return [f"estimate: unknown ({why})"]
    bound = found.output_tokens_max
    output = " + unbounded output tokens" if bound is None else \
        " tokens, no output" if bound == 0 else f" + ≤ {bound:,} output tokens"
    cost = usd_range(found.cost_usd_min, found.cost_usd_max)
    notes = [why] if why else []
    if found.lower_bound:
        notes.append("at least: some input (images, tools, ...) is not counted")
    note = f" ({'; '.join(notes)})" if notes else ""
    return [f"estimate: {found.model}, {found.requests:,} requests, {found.input_tokens:,} input{output}: "
            f"{cost}{note}"]


def _about(cost: str) -> str:
    """≈ before a cost range, not before "unknown"."""
    return cost if cost == "unknown" else f"≈ {cost}"


def total_line(plan: Plan) -> str:
    """`Cost: ≈ $0.42 – $1.10 for 3 batches ...`: what the changes that send requests may cost."""
    from .estimate import cost_range, usd, usd_range
    from .prices import PRICES_AS_OF

    batches = len(plan.sending)
    budget = f"; budget {usd(plan.budget_usd)}" if plan.budget_usd is not None else ""
    total = _about(usd_range(*cost_range(c.estimate for c in plan.sending)))
    return (f"Cost: {total} for {batches} "
            f"batch{'es' if batches != 1 else ''}{budget} (batch prices as of {PRICES_AS_OF}).")


def _budget_problems(plan: Plan) -> list[str]:
    if not plan.estimated:  # a plan made without costs (tests, tools): nothing to hold to a budget yet
        return []
    from .budget import over_budget

    return over_budget(plan)


OVER_BUDGET = "Warning: over budget; apply will refuse this plan:"


def summary_line(plan: Plan) -> str:
    counts = plan.summary()
    if not plan.has_changes:
        return f"No changes. {counts['noop']} batch(es) match their specs."
    parts = [f"{counts[a.value]} {_PHRASES[a]}{_queued_count(plan, a)}" for a in ORDER
             if counts[a.value] or a is Action.NOOP]
    return "Plan: " + ", ".join(parts) + "."


def _queued_count(plan: Plan, action: Action) -> str:
    """` (2 queued)` after the count of an action some of whose changes wait for capacity."""
    queued = sum(1 for c in plan.queued if c.action is action)
    return f" ({queued} queued)" if queued else ""


def render_text(plan: Plan, colour: bool = False) -> str:
    """The human plan: one line per change, its details, drift warnings, a summary."""
    def style(text: str, **kw) -> str:
        return click.style(text, **kw) if colour and any(kw.values()) else text

    width = max((len(c.name) for c in plan.changes), default=0)
    lines: list[str] = []
    for change in plan.changes:
        if change.action is Action.NOOP and not change.warnings:
            continue
        head = f"  {change.action.symbol} {change.name.ljust(width)}  {change.action.value:<7}  {change.reason}"
        lines.append(style(head, fg=_COLOURS[change.action]))
        lines += [f"      {d}" for d in _detail_lines(change)]
        lines += [f"      {d}" for d in _estimate_lines(change, plan.estimated)]
        lines += [style(f"      ! {w}", fg="yellow") for w in change.warnings]
    body = ["batchplan will perform these actions:", "", *lines, ""] if plan.has_changes else \
        ([*lines, ""] if lines else [])
    costs = [total_line(plan)] if plan.sending and plan.estimated else []
    if problems := _budget_problems(plan):
        costs += [style(line, fg="yellow") for line in (OVER_BUDGET, *(f"  ! {p}" for p in problems))]
    return "\n".join([*body, style(summary_line(plan), bold=True), *costs]) + "\n"


def _before(change: Change) -> dict | None:
    """What exists now: the fields the batch was made from, its id and status."""
    if change.before is None:
        return None
    facts = {"batch_id": change.batch.id, "status": change.batch.status} if change.batch else {}
    return {**change.before.model_dump(mode="json"), **facts}


def _after(change: Change) -> dict | None:
    """What will exist: the desired fields, and for adopt the adopted batch's id."""
    if change.after is None:
        return None
    adopted = {"batch_id": change.found["id"]} if change.action is Action.ADOPT and change.found else {}
    return {**change.after.model_dump(mode="json"), **adopted}


def _cost_summary(plan: Plan) -> dict:
    """The plan's cost range: the sum over the changes that send requests (null when any is unknown)."""
    from .estimate import cost_range

    low, high = cost_range(c.estimate for c in plan.sending) if plan.sending else (0.0, 0.0)
    return {"cost_usd_min": low, "cost_usd_max": high}


def _retry_fields(change: Change) -> dict:
    """A retry's `requests` (sent again) and `attempt` (2 and up); nothing for other actions."""
    if change.retry is None:
        return {}
    return {"requests": change.retry.selection.requests, "attempt": change.retry.attempt}


def plan_document(plan: Plan) -> dict:
    """The public JSON plan (format_version 1): documented in the README; keep it stable."""
    return {
        "format_version": JSON_FORMAT_VERSION,
        "actions": [{"name": c.name, "spec": spec_of(c.name), "shard": shard_of(c.name), "action": c.action.value,
                     "reason": c.reason, "reason_code": c.reason_code.value, "before": _before(c), "after": _after(c),
                     "estimate": c.estimate.model_dump(mode="json") if c.estimate else None, **_retry_fields(c),
                     "queued": c.queued is not None}
                    for c in plan.changes],
        "summary": {**plan.summary(), **_cost_summary(plan)},
    }


def render_json(plan: Plan) -> str:
    return json.dumps(plan_document(plan), indent=2, sort_keys=True) + "\n"


def render_plan(plan: Plan, fmt: str, colour: bool = False) -> str:
    """The plan in one of `plan --format`'s formats: text, json or markdown."""
    if fmt == "text":
        return render_text(plan, colour)
    return render_json(plan) if fmt == "json" else render_markdown(plan)


def _md_heading(action: Action, name: str) -> str:
    """`+` name: create; noop has no symbol (its blank would read as nothing)."""
    symbol = f"`{action.symbol}` " if action.symbol.strip() else ""
    return f"{symbol}{name}: {action.value}"


def _md_cost(plan: Plan, action: Action | None = None) -> str:
    """The cost column: what the changes of one action (or of all) that send requests may cost."""
    from .estimate import cost_range, usd_range

    sending = [c.estimate for c in plan.sending if action in (None, c.action)]
    return usd_range(*cost_range(sending)) if sending and plan.estimated else ""


def render_markdown(plan: Plan) -> str:
    """A pull-request comment: a summary table with costs, then one section per change."""
    counts = plan.summary()
    lines = ["## batchplan plan", "", "| action | count | cost |", "| --- | ---: | ---: |"]
    lines += [f"| {f'{a.symbol} {a.value}'.strip()} | {counts[a.value]} | {_md_cost(plan, a)} |" for a in ORDER]
    total = _md_cost(plan)
    lines += [f"| **total** | | **{_about(total)}** |"] if total else []
    lines += ["", f"**{summary_line(plan)}**", ""] + ([total_line(plan), ""] if total else [])
    if problems := _budget_problems(plan):
        lines += [f"**{OVER_BUDGET}**", "", *(f"- {p}" for p in problems), ""]
    for change in plan.changes:
        if change.action is Action.NOOP and not change.warnings:
            continue
        lines += [f"### {_md_heading(change.action, change.name)}", "", change.reason, ""]
        details = _detail_lines(change) + _estimate_lines(change, plan.estimated) + [f"! {w}" for w in change.warnings]
        if details:
            lines += ["```diff" if change.action in (Action.REPLACE, Action.UPDATE) else "```", *details, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# -- the other commands' results -------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """What a command prints: on standard output, and on standard error (each "" or whole lines)."""

    out: str = ""
    err: str = ""


def _lines(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def render_apply_result(result: ApplyResult) -> Output:
    if result.failed:
        return Output(err=f"Apply finished with errors: {len(result.done)} done, {len(result.failed)} failed "
                          "(the state records what was done; fix the cause and run apply again).\n")
    queued = len(result.queued)
    later = (f" {queued} create(s) queued for enqueued-token capacity: `batchplan apply` makes them once "
             "running batches finish (`batchplan apply --watch` waits and makes them).") if queued else ""
    return Output(click.style(f"Apply complete: {len(result.done)} change(s).", bold=True) + later + "\n")


def render_status(report: StatusReport, *, as_json: bool, width: int | None, colour: bool,
                  wide: bool = False) -> str:
    """`status`: one JSON document, or a table `width` columns wide (None: unbounded, when piped) with the
    notes under it; `wide` adds the full batch ids and the result file ids."""
    from .status import status_document, status_notes, status_table

    if as_json:
        return json.dumps(status_document(report.rows, report.now), indent=2, sort_keys=True) + "\n"
    if not report.rows:
        return "No batches in the state yet; `batchplan apply` makes them.\n"
    from rich.console import Console  # here: only status draws tables
    from rich.text import Text

    console = Console(width=width or 1000, color_system="standard" if colour else None, force_terminal=colour,
                      highlight=False)
    with console.capture() as captured:
        console.print(status_table(report.rows, report.now, wide))
        for note in status_notes(report.rows):
            console.print(Text(note))
    return _lines([line.rstrip() for line in captured.get().splitlines()])


def render_init(done: Scaffolded) -> str:
    lines = [f"  created {rel}" for rel in done.created]
    lines += [f"  kept    {rel}" for rel in done.kept]
    lines += [f"  ignored {pattern} (added to .gitignore)" for pattern in done.ignored]
    return _lines(lines + ["Next: edit the example spec, then `batchplan validate` and `batchplan plan --sandbox` "
                           "(no key, no cost)."])


def render_wait(waited: Waited, timeout: float | None) -> Output:
    if waited.result is None:
        return Output("Nothing to wait for: the state has no batches.\n")
    note = "" if waited.not_recorded is None else \
        (f"Note: the final statuses were not recorded in the state ({waited.not_recorded}); "
         "`batchplan refresh` records them later.\n")
    problems = waited.result.problems(waited.names)
    if not problems:
        return Output(f"All {len(waited.names)} batch(es) completed.\n", note)
    head = f"Timed out after {timeout:g}s" if waited.result.timed_out else "Finished"
    return Output(err=note + _lines([f"{head}: {len(problems)} of {len(waited.names)} batch(es) did not complete:",
                                     *(f"  {line}" for line in problems)]))


def render_watched(watched: Watched) -> Output:
    """`apply --watch`'s end: the creates that failed, then every watched batch as `wait` says it."""
    waited = render_wait(watched.waited, None)
    if not watched.failed:
        return waited
    failed = [f"  {name}: {why}" for name, why in sorted(watched.failed.items())]
    return Output(waited.out, _lines([f"Stopped watching: {len(failed)} create(s) failed (the state records what was "
                                      "done; fix the cause and run `batchplan apply --watch` again):", *failed])
                  + waited.err)


def render_refresh(refreshed: Refreshed) -> str:
    snapshot = refreshed.snapshot
    if snapshot is None:
        return "Nothing to refresh: every batch in the state has finished.\n"
    lines = [f"  {name}: {snapshot.records[name].id} is {snapshot.records[name].status}" for name in refreshed.changed]
    lines += [f"  {name}: batch {snapshot.records[name].id} no longer exists on the server "
              "(`batchplan plan` shows what to do)" for name in sorted(snapshot.missing)]
    changed = len(refreshed.changed)
    lines.append(f"Refreshed the state: {changed} batch(es) changed." if changed else "The state was up to date.")
    return _lines(lines)


def render_download(report: Report) -> Output:
    failed = f"; {len(report.failed)} failed" if report.failed else ""
    return Output(_lines([*(f"  {line}" for line in report.written + report.skipped + report.notes),
                          f"Downloaded {len(report.written)} file(s); {len(report.skipped)} already there{failed}."]),
                  _lines([f"  {line}" for line in report.failed]))


def render_import(done: ImportedBatch, name: str) -> str:
    lines = [f"Imported {done.batch_id} ({done.status}) as {name}."]
    if done.imported.differs:
        lines.append(f"It differs from the spec in: {', '.join(done.imported.differs)}; the next plan replaces it "
                     "(`batchplan plan` shows the diff).")
    else:
        lines.append("It matches the spec: the next plan leaves it as it is.")
    return _lines(lines + [f"Note: {note}." for note in done.imported.notes])


def render_entries(entries: dict[str, Entry]) -> str:
    """`state list`: one line per name, with its batch id and status as last recorded."""
    if not entries:
        return "The state has no entries.\n"
    width = max(len(n) for n in entries)
    return _lines([f"{name.ljust(width)}  " + (f"{entry.batch.id}  {entry.batch.status}" if entry.batch
                                               else "-  no batch (an interrupted create)")
                   for name, entry in entries.items()])


def render_removed(name: str, removed: Removed) -> str:
    batch = removed.entry.batch
    left = f"batch {batch.id} ({batch.status}) was not touched on the server" if batch else "it had no batch"
    return f"Removed {name} from the state; {left}. The previous state is in {removed.backup}.\n"


def render_migrated(migrated: Migrated) -> str:
    """What `state migrate` copied, and the batchplan.yaml lines that switch to it."""
    state = migrated.state
    lines = "".join(f"  {line}\n" for line in migrated.settings.splitlines())
    return (f"Copied the state (lineage {state.lineage}, serial {state.serial}, {len(state.entries)} entries) from "
            f"{migrated.source} to {migrated.target}.\nTo use it, set in batchplan.yaml:\n{lines}"
            "The source is left as it was: remove it once the new state is in use.\n")
