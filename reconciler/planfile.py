"""Saved plans (`plan --out FILE`, `apply FILE`), as Terraform's plan files.

A saved plan is a versioned JSON document: the tool version, the lineage and serial of
the state it was made against, every change with what apply needs to carry it out,
and the content hash of every input it planned to upload. Applying it refuses, as
stale, a plan whose state moved on or whose inputs changed since: nothing is sent.

A plan file may have been edited by hand, so it is read like a spec: its shape is
checked, and every input path in it is confined to the repository again (paths.confine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from . import __version__
from .desired import Desired
from .errors import PathError, PlanError, StalePlanError
from .fsutil import atomic_write
from .inputs import hash_file
from .paths import confine
from .plan import Action, Change, FieldChange, Plan, PlannedRetry, ReasonCode
from .shards import Shard, open_range
from .batch import BatchFields, BatchRecord
from .state import State, format_refusal

PLANFILE_VERSION = 4  # 2: before/after hold only the batch fields; reason_code. 3: estimates, budget_usd. 4: retries
_READS_INPUT = (Action.CREATE, Action.REPLACE, Action.RETRY)  # the actions that send lines of a local input


class _Document(BaseModel):
    """The top of a plan file, checked before any change in it is read."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    batchplan_version: str
    sandbox: bool
    lineage: str | None
    serial: int
    inputs: dict[str, str]
    changes: list[dict]
    refreshed: dict[str, dict]
    estimated: bool


def _change_to_json(change: Change) -> dict:
    return {
        "name": change.name, "action": change.action.value, "reason": change.reason,
        "reason_code": change.reason_code.value,
        "before": change.before.model_dump(mode="json") if change.before else None,
        "after": change.after.model_dump(mode="json") if change.after else None,
        "desired": _desired_to_json(change.desired) if change.desired else None,
        "batch": change.batch.model_dump(mode="json") if change.batch else None,
        "found": change.found, "diff": [dataclasses.asdict(d) for d in change.diff],
        "warnings": list(change.warnings),
        "estimate": change.estimate.model_dump(mode="json") if change.estimate else None,
        "retry": _retry_to_json(change.retry) if change.retry else None,
        "queued": change.queued,
    }


def _desired_to_json(want: Desired) -> dict:
    return {**dataclasses.asdict(want), "retry": want.retry.model_dump(mode="json") if want.retry else None}


def _desired_from_json(data: dict) -> Desired:
    from .retries import RetryPolicy

    shard = data.get("shard")
    return Desired(**{**data, "retry": RetryPolicy.model_validate(data["retry"]) if data.get("retry") else None,
                      "shard": Shard(**shard) if shard else None})


def _retry_to_json(retry: PlannedRetry) -> dict:
    chosen = retry.selection  # field by field: dataclasses.asdict would count a Counter's pairs
    return {"attempt": retry.attempt, "selection": {
        "total": chosen.total, "succeeded": chosen.succeeded, "reasons": dict(chosen.reasons),
        "kept": dict(chosen.kept), "spans": [list(span) for span in chosen.spans], "sha256": chosen.sha256,
        "size": chosen.size}}


def _retry_from_json(data: dict | None) -> PlannedRetry | None:
    if data is None:
        return None
    from collections import Counter

    from .retries import RetrySelection

    chosen = data["selection"]
    selection = RetrySelection(**{**chosen, "reasons": Counter(chosen["reasons"]), "kept": Counter(chosen["kept"]),
                                  "spans": tuple((int(a), int(b)) for a, b in chosen["spans"])})
    return PlannedRetry(attempt=int(data["attempt"]), selection=selection)


def _change_from_json(data: dict) -> Change:
    return Change(
        name=data["name"], action=Action(data["action"]), reason=data["reason"],
        reason_code=ReasonCode(data["reason_code"]),
        before=BatchFields.model_validate(data["before"]) if data["before"] else None,
        after=BatchFields.model_validate(data["after"]) if data["after"] else None,
        desired=_desired_from_json(data["desired"]) if data["desired"] else None,
        batch=BatchRecord.model_validate(data["batch"]) if data["batch"] else None,
        found=data["found"], diff=tuple(FieldChange(**d) for d in data["diff"]),
        warnings=tuple(data["warnings"]),
        estimate=_estimate_from_json(data["estimate"]), retry=_retry_from_json(data.get("retry")),
        queued=_queued_from_json(data.get("queued")),
    )


def _queued_from_json(phrase: object) -> str | None:
    """What a change waits for (enqueued-token capacity): apply leaves it, as it was planned."""
    if phrase is not None and not isinstance(phrase, str):
        raise ValueError(f"queued: {phrase!r} is not a phrase")
    return phrase


def _estimate_from_json(data: dict | None):
    if data is None:
        return None
    from .estimate import Estimate  # here: a saved plan without creates needs no prices

    return Estimate.model_validate(data)


RANGE_MARK = "#bytes="  # an input key `data/big.jsonl#bytes=0-1048576`: a shard's bytes of the file


def input_key(want: Desired) -> str:
    """How the plan file's `inputs` names what a change uploads: the input's path, and for a
    shard its byte range, so each is checked by its own sha256."""
    assert want.input is not None
    if want.shard is None:
        return want.input
    return f"{want.input}{RANGE_MARK}{want.shard.start}-{want.shard.end}"


def _split_key(key: str) -> tuple[str, tuple[int, int] | None]:
    rel, mark, span = key.rpartition(RANGE_MARK)
    if not mark:
        return key, None
    start, _, end = span.partition("-")
    return rel, (int(start), int(end))


def save_plan(path: Path, plan: Plan, project) -> None:
    inputs = {input_key(c.desired): c.desired.input_sha256 for c in plan.changes
              if c.desired and c.desired.input and c.action in _READS_INPUT}
    document = {
        "format_version": PLANFILE_VERSION, "batchplan_version": __version__,
        "sandbox": project.sandbox, "lineage": plan.lineage, "serial": plan.serial,
        "inputs": dict(sorted(inputs.items())),
        "changes": [_change_to_json(c) for c in plan.changes],
        "refreshed": {n: r.model_dump(mode="json") for n, r in sorted(plan.refreshed.items())},
        "estimated": plan.estimated,
    }
    try:
        atomic_write(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise PlanError(f"{path}: cannot write the plan file: {exc}") from exc


def load_plan(path: Path, project) -> tuple[Plan, dict]:
    """The saved plan and its input hashes; PlanError when it is not one we can apply."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file; make one with `batchplan plan --out {path}`") from None
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: not a batchplan plan file ({exc})") from exc
    version = document.get("format_version") if isinstance(document, dict) else None
    refusal = format_refusal(version, PLANFILE_VERSION, "plan file", wrong_fix="make a new plan with this batchplan",
                             newer_fix="apply it with that batchplan, or make a new plan with this one")
    if refusal:
        raise PlanError(f"{path}: {refusal}")
    if document.get("batchplan_version") != __version__:
        raise PlanError(f"{path}: made by batchplan {document.get('batchplan_version')}, this is {__version__}; "
                        "plan again with this version")
    if bool(document.get("sandbox")) != project.sandbox:
        where = "the sandbox" if document.get("sandbox") else "the real server"
        raise PlanError(f"{path}: this plan was made against {where}; apply it the same way")
    try:
        checked = _Document.model_validate(document)
        plan = Plan(changes=tuple(_change_from_json(c) for c in checked.changes),
                    lineage=checked.lineage, serial=checked.serial,
                    refreshed={n: BatchRecord.model_validate(r) for n, r in checked.refreshed.items()},
                    estimated=checked.estimated)
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise PlanError(f"{path}: damaged plan file ({_first_line(exc)}); plan again") from exc
    _confine_inputs(path, plan, checked.inputs, project.root.resolve())
    return plan, checked.inputs


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _confine_inputs(path: Path, plan: Plan, inputs: dict[str, str], root: Path) -> None:
    """Refuse a plan that names an input outside the repo, or uploads one it did not hash."""
    try:
        named = {_split_key(key)[0] for key in inputs}
    except ValueError:
        raise PlanError(f"{path}: damaged plan file: an input's byte range is not two numbers; plan again") from None
    named |= {c.desired.input for c in plan.changes if c.desired and c.desired.input}
    for rel in sorted(named):
        try:
            confine(rel, root, root)
        except PathError as exc:
            raise PlanError(f"{path}: input: {rel!r} {exc}; a plan uploads only files inside the repository. "
                            "Nothing was sent; plan again") from None
    for change in plan.changes:
        want = change.desired
        uploads = want and want.input and change.action in _READS_INPUT
        if uploads and inputs.get(input_key(want)) != want.input_sha256:
            raise PlanError(f"{path}: damaged plan file: {want.name}'s input {want.input} is not among the plan's "
                            "inputs with its sha256; nothing was sent. Plan again")


def check_fresh(path: Path, plan: Plan, inputs: dict, state: State | None, root: Path) -> None:
    """Refuse a plan whose state moved on or whose input files changed since it was made."""
    lineage, serial = (state.lineage, state.serial) if state else (None, 0)
    if (lineage, serial) != (plan.lineage, plan.serial):
        then = f"state serial {plan.serial}" if plan.lineage else "no state"
        other = " of another lineage" if plan.lineage and lineage != plan.lineage else ""
        now = f"at serial {serial}{other}" if state else "gone"
        raise StalePlanError(f"{path}: stale plan: it was made against {then} but the state is now {now}; "
                             "nothing was sent. Run `batchplan plan --out` again")
    for key, sha in inputs.items():
        rel, span = _split_key(key)
        file = root / rel
        if not file.is_file() or _hash_of(file, span) != sha:
            raise StalePlanError(f"{path}: stale plan: input {rel} changed since the plan was made; nothing was "
                                 "sent. Run `batchplan plan --out` again")


def _hash_of(file: Path, span: tuple[int, int] | None) -> str:
    """The sha256 of a whole file, or of its bytes [start, end)."""
    if span is None:
        return hash_file(file)
    try:
        with open_range(file, *span) as reader:
            return hashlib.file_digest(reader, "sha256").hexdigest()
    except StalePlanError:  # the file is shorter now
        return ""
