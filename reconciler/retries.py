"""Retries: the requests of a spec that ended without a result, sent again as a follow-up batch.

A spec (or `batchplan.yaml`, for every spec) opts in with
`retry: {max_attempts: 3, on: [expired, server_error, rate_limited]}`: at most 3 batches
in all for that spec, the first included. Once its latest batch has ended (completed or
expired; a batch cancelled by a replace, or failed on a bad input, is never retried), the
requests with no 2xx line in any attempt whose latest error is one of `on` make the next
attempt's input: those lines byte for byte as in the original file, in its order. A
request that failed with another 4xx is never retried: a bad request would fail again.

    RetryPolicy          the `retry:` block
    retry_candidates     which input lines to send again, and that input's sha256 (one pass,
                         nothing written: planning stays pure)
    iter_retry_lines     those lines, streamed and checked against the sha256
    write_retry_input    the same, written atomically to a file to upload
    next_attempt         the attempt a plan should make now, if any
    attempt_tag          the spec tag a retry batch carries, attempt number included
    retry_reason, status_phrase   the words of `plan` and `status`

The outcome of earlier attempts comes from results.classify_results over the result files
of every attempt; every attempt's input is cut from the original file, never from an
earlier retry's.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import StalePlanError
from .fsutil import atomic_writer
from .results import ErrorClass, Outcome, request_lines

MAX_ATTEMPTS = 10
REASONS = (ErrorClass.EXPIRED, ErrorClass.SERVER_ERROR, ErrorClass.RATE_LIMITED)  # what `on` may hold
MISSING = "missing"  # a request with no line in any result file: nothing says why, so it is not retried
RETRY_ENDS = frozenset({"completed", "expired"})  # the batch statuses after which a retry may follow
RETRY_SYMBOL = "↻"

_REASON_NAMES = ", ".join(REASONS)


def _retry_reason(item: object) -> object:
    """One item of `on`, checked here so that each wrong one is reported at its own index."""
    if item in REASONS:
        return item
    where = {"value": _short(item), "names": _REASON_NAMES}
    if item == ErrorClass.CLIENT_ERROR or item in ("4xx", 400):
        raise PydanticCustomError("retry_on", "{value} is never retried: a request that failed with a 4xx "
                                  "other than 429 would fail again; use {names}", where)
    guess = difflib.get_close_matches(str(item), [str(reason) for reason in REASONS], n=1, cutoff=0.6)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    raise PydanticCustomError("retry_on", "{value} is not a reason to retry; " + hint + "use any of {names}",
                              where)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class RetryPolicy(BaseModel):
    """A spec's `retry:` block. `max_attempts` counts every batch, the first included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None is never kept: the validator turns a missing value into a message that says what to write.
    max_attempts: int = Field(None, validate_default=True)
    on: tuple[Annotated[ErrorClass, BeforeValidator(_retry_reason)], ...] = REASONS

    @model_validator(mode="before")
    @classmethod
    def _on_as_written(cls, data: object) -> object:
        """YAML 1.1 (pyyaml) reads a bare `on:` key as the boolean true: it is the `on` written."""
        if isinstance(data, dict) and True in data and "on" not in data:
            return {("on" if key is True else key): value for key, value in data.items()}
        return data

    @field_validator("max_attempts", mode="before")
    @classmethod
    def _attempts_in_range(cls, value: object) -> int:
        if value is None:
            raise PydanticCustomError("missing", "missing; say how many batches in all, the first included: "
                                      f"1 to {MAX_ATTEMPTS} (max_attempts: 3 is the first and up to two retries)")
        if type(value) is not int:
            raise PydanticCustomError("retry_attempts", "must be a whole number from 1 to {most}, not {value}",
                                      {"most": MAX_ATTEMPTS, "value": _short(value)})
        if value < 1:
            raise PydanticCustomError("retry_attempts", "{value} is too few: max_attempts counts every batch, the "
                                      "first included; use 1 to {most} (3 is the first and up to two retries)",
                                      {"most": MAX_ATTEMPTS, "value": value})
        if value > MAX_ATTEMPTS:
            raise PydanticCustomError("retry_attempts", "{value} is too many: at most {most} batches in all "
                                      "(the first and up to {retries} retries)",
                                      {"most": MAX_ATTEMPTS, "retries": MAX_ATTEMPTS - 1, "value": value})
        return value

    @field_validator("on", mode="before")
    @classmethod
    def _a_list(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value  # `on: expired` means [expired]
        if not isinstance(items, list | tuple):
            raise PydanticCustomError("retry_on", "must be a list of {names}, not {value}",
                                      {"names": _REASON_NAMES, "value": _short(value)})
        if not items:
            raise PydanticCustomError("retry_on", "empty; list at least one of {names}, or leave `on` out "
                                      "to retry on all three", {"names": _REASON_NAMES})
        return items

    @field_validator("on")
    @classmethod
    def _each_once_in_order(cls, value: tuple[ErrorClass, ...]) -> tuple[ErrorClass, ...]:
        return tuple(reason for reason in REASONS if reason in value)  # sorted output, whatever the order written


# -- which requests to send again ---------------------------------------------------------

@dataclass(frozen=True)
class RetrySelection:
    """The requests of one spec's input to send again, and why.

    `total`: requests in the input; `succeeded`: those with a 2xx line in some attempt;
    `reasons`: the latest error class of each selected request; `kept`: the requests
    without a result that are not selected, by class (client_error, other, a class not in
    the policy's `on`, or MISSING). `spans`: the selected lines' byte ranges in the input, in
    input order; `sha256` and `size`: of those lines put together, the retry input's content
    address, known before anything is written.
    """

    total: int
    succeeded: int
    reasons: Counter[str]
    kept: Counter[str]
    spans: tuple[tuple[int, int], ...]
    sha256: str
    size: int

    @property
    def requests(self) -> int:
        return len(self.spans)

    @property
    def without_result(self) -> int:
        return self.total - self.succeeded


def retry_candidates(input_path: Path, outcome: Outcome, policy: RetryPolicy,
                     byte_range: tuple[int, int] | None = None) -> RetrySelection:
    """One streaming pass over the input: which lines to send again (see RetrySelection).

    `byte_range`: a shard's bytes [start, end): only its lines are counted and chosen from
    (its attempts' result files say nothing of the other shards' requests)."""
    spans: list[tuple[int, int]] = []
    reasons: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    digest, total, succeeded, size = hashlib.sha256(), 0, 0, 0
    for custom_id, start, stop, raw in request_lines(input_path, *(byte_range or (0, None))):
        total += 1
        if custom_id in outcome.succeeded:
            succeeded += 1
            continue
        failure = outcome.failed.get(custom_id) if custom_id is not None else None
        kind = failure.kind if failure is not None else MISSING
        if kind not in policy.on:
            kept[kind] += 1
            continue
        reasons[kind] += 1
        spans.append((start, stop))
        digest.update(raw)
        size += stop - start
    return RetrySelection(total=total, succeeded=succeeded, reasons=reasons, kept=kept, spans=tuple(spans),
                          sha256=digest.hexdigest(), size=size)


def iter_retry_lines(input_path: Path, selection: RetrySelection) -> Iterator[bytes]:
    """The selected lines, byte for byte, in input order, for an upload to stream.

    They are hashed as they go; if they are not what `retry_candidates` saw (the input
    changed since), StalePlanError is raised in place of the last line, so an upload of
    changed bytes never completes.
    """
    digest = hashlib.sha256()
    with input_path.open("rb") as fh:
        for index, (start, stop) in enumerate(selection.spans):
            line = os.pread(fh.fileno(), stop - start, start)
            digest.update(line)
            if index == len(selection.spans) - 1 and digest.hexdigest() != selection.sha256:
                raise StalePlanError(f"{input_path} changed since the retry was planned (the lines to send again "
                                     "are not those the plan saw); run the plan again")
            yield line


def write_retry_input(input_path: Path, selection: RetrySelection, dest: Path) -> Path:
    """Write the retry input to `dest` atomically (nothing is written if the input changed)."""
    with atomic_writer(dest) as out:
        for line in iter_retry_lines(input_path, selection):
            out.write(line)
    return dest


def retry_filename(input_name: str, attempt: int, sha256: str) -> str:
    """The upload's name: content-addressed like every batchplan upload, and saying its attempt."""
    return f"{Path(input_name).stem}.attempt-{attempt}.batchplan-{sha256}.jsonl"


def attempt_tag(spec_hash: str, attempt: int) -> str:
    """The `batchplan_spec` tag of a spec's attempt: the spec hash for the first batch, the spec
    hash and `/N` for attempt N of a retry.

    Carried in the spec tag rather than a key of its own, so a spec keeps 14 metadata keys, and
    every look for a spec's batch by its tags (adopt, a lost create, in any version of
    batchplan) compares the whole tag: a retry batch is never taken for the first, nor
    attempt 2 for attempt 3.
    """
    return spec_hash if attempt == 1 else f"{spec_hash}/{attempt}"


def next_attempt(status: str, attempts_made: int, policy: RetryPolicy | None,
                 selection: RetrySelection) -> int | None:
    """The attempt number a follow-up batch would have now, or None when none is due."""
    if policy is None or status not in RETRY_ENDS or attempts_made >= policy.max_attempts:
        return None
    return attempts_made + 1 if selection.requests else None


# -- the words -------------------------------------------------------------------------

def retry_reason(selection: RetrySelection, attempt: int, policy: RetryPolicy) -> str:
    """The plan's reason for a retry, e.g. "37 of 5,000 requests without a result (expired); attempt 2 of 3"."""
    text = (f"{selection.requests:,} of {_requests(selection.total)} without a result "
            f"({_classes(selection.reasons)}); attempt {attempt} of {policy.max_attempts}")
    if selection.kept:
        text += f"; {selection.without_result - selection.requests:,} not retried ({_classes(selection.kept)})"
    return text


def status_phrase(selection: RetrySelection, attempts: int, policy: RetryPolicy | None, used: bool = True) -> str:
    """What `status` says of a spec's attempts, e.g. "4,988 of 5,000 requests done over 2 attempts".

    `used`: False when some requests still have attempts left (a shard that made fewer than another)."""
    most = policy.max_attempts if policy is not None else 1
    if selection.without_result and attempts >= most and used:
        return (f"{attempts} of {most} attempt{'s' if most != 1 else ''} used; "
                f"{_requests(selection.without_result)} without a result")
    return f"{selection.succeeded:,} of {_requests(selection.total)} done over {attempts} " \
           f"attempt{'s' if attempts != 1 else ''}"


def _requests(count: int) -> str:
    return f"{count:,} request{'s' if count != 1 else ''}"


def _classes(counts: Counter[str]) -> str:
    """One class: its name ("expired"); several: each with its count ("30 expired, 7 server_error")."""
    order = [*REASONS, ErrorClass.CLIENT_ERROR, ErrorClass.OTHER, MISSING]
    present = [kind for kind in order if counts.get(kind)]
    if len(present) == 1:
        return str(present[0])
    return ", ".join(f"{counts[kind]:,} {kind}" for kind in present)
