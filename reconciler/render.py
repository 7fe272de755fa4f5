"""Renderings of a plan: Terraform-like text, the public JSON document, and Markdown.

Everything here is a pure function from a Plan to a string, sorted by name, so tests
compare whole strings and reviewers see stable diffs. Colour (ANSI styles) only when
the caller asks: cli.py asks on a terminal without NO_COLOR.
"""

from __future__ import annotations

import json

import click

from .plan import ORDER, Action, Change, FieldChange, Plan

JSON_FORMAT_VERSION = "1"
_COLOURS = {Action.CREATE: "green", Action.ADOPT: "cyan", Action.REPLACE: "yellow",
            Action.CANCEL: "red", Action.FORGET: "magenta", Action.NOOP: None}
_PHRASES = {Action.CREATE: "to create", Action.ADOPT: "to adopt", Action.REPLACE: "to replace",
            Action.CANCEL: "to cancel", Action.FORGET: "to forget", Action.NOOP: "unchanged"}


def _value(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _diff_lines(diff: tuple[FieldChange, ...]) -> list[str]:
    return [f"~ {d.path}: {_value(d.before)} -> {_value(d.after)}" for d in diff]


def _detail_lines(change: Change) -> list[str]:
    if change.action is Action.REPLACE:
        return _diff_lines(change.diff)
    if change.action is Action.CREATE and change.desired:
        want = change.desired
        source = (f"{want.input} (sha256 {want.input_sha256[:12]}, {want.requests} requests)"
                  if want.input and want.input_sha256 else want.input_file_id)
        return [f"endpoint: {want.endpoint}", f"input: {source}"]
    return []


def summary_line(plan: Plan) -> str:
    counts = plan.summary()
    if not plan.has_changes:
        return f"No changes. {counts['noop']} batch(es) match their specs."
    parts = [f"{counts[a.value]} {_PHRASES[a]}" for a in ORDER if counts[a.value] or a is Action.NOOP]
    return "Plan: " + ", ".join(parts) + "."


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
        lines += [style(f"      ! {w}", fg="yellow") for w in change.warnings]
    body = ["batchplan will perform these actions:", "", *lines, ""] if plan.has_changes else \
        ([*lines, ""] if lines else [])
    return "\n".join([*body, style(summary_line(plan), bold=True)]) + "\n"


def plan_document(plan: Plan) -> dict:
    """The public JSON plan (format_version 1): documented in the README; keep it stable."""
    return {
        "format_version": JSON_FORMAT_VERSION,
        "actions": [{"name": c.name, "action": c.action.value, "reason": c.reason,
                     "before": c.before, "after": c.after} for c in plan.changes],
        "summary": plan.summary(),
    }


def render_json(plan: Plan) -> str:
    return json.dumps(plan_document(plan), indent=2, sort_keys=True) + "\n"


def _md_heading(action: Action, name: str) -> str:
    """`+` name: create; noop has no symbol (its blank would read as nothing)."""
    symbol = f"`{action.symbol}` " if action.symbol.strip() else ""
    return f"{symbol}{name}: {action.value}"


def render_markdown(plan: Plan) -> str:
    """A pull-request comment: a summary table, then one section per change."""
    counts = plan.summary()
    lines = ["## batchplan plan", "", "| action | count |", "| --- | ---: |"]
    lines += [f"| {f'{a.symbol} {a.value}'.strip()} | {counts[a.value]} |" for a in ORDER]
    lines += ["", f"**{summary_line(plan)}**", ""]
    for change in plan.changes:
        if change.action is Action.NOOP and not change.warnings:
            continue
        lines += [f"### {_md_heading(change.action, change.name)}", "", change.reason, ""]
        details = _detail_lines(change) + [f"! {w}" for w in change.warnings]
        if details:
            lines += ["```diff" if change.action is Action.REPLACE else "```", *details, "```", ""]
    return "\n".join(lines).rstrip() + "\n"
