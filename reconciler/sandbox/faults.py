"""Injected failures: what a test arms on the sandbox so a request is lost, refused or late.

A `Fault` is a plain value; `ArmedFault` counts the requests it saw. EmulatorService
asks its armed faults about every API request, whichever door (socket or in-process
transport) it came through.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from reconciler.sandbox.emulator import EmulatorError

FAULT_ERRORS = {
    429: ("Rate limit reached for requests (sandbox fault). Please try again later.", "requests",
          "rate_limit_exceeded"),
    500: ("The server had an error while processing your request (sandbox fault).", "server_error", None),
    503: ("The server is overloaded or not ready yet (sandbox fault).", "server_error", None),
    404: ("No such object (sandbox fault: it may well exist).", "invalid_request_error", None),
}


class Fault(BaseModel):
    """One injected failure: which requests it hits, when, and what it does.

    It matches `method` (any when None) and a path: `path` is a prefix, `path_regex`
    (when given) a `re.search` pattern instead. Counting only matching requests, it
    fires from the `nth` on, or on every `every`-th, at most `times` times (None: no limit).

    - `drop_after_commit`: do the request, then close the connection without an answer;
    - `error_after_commit`: do the request, then answer `status` (500) with an error;
    - `reject`: answer `status` (429) without doing anything; `retry_after` (seconds)
      and `retry_after_ms` set the `Retry-After` / `retry-after-ms` headers;
    - `stall`: wait `seconds`, then do the request and answer, or drop if `then="drop"`;
      a create stalled past the client's timeout and settling wait is a create that lands late;
    - `not_found`: answer 404 without doing anything, as a server may for an object that
      exists (`path_regex="^/v1/batches/batch_x$"`: the next GET of that batch);
    - `hold`: wait until the test calls `release_held()` on the service (or `seconds` passed,
      when given), then do the request and answer: a create that lands late, at a moment the
      test chooses, long after its client gave up on it.

    And answers no real server gives, for the client's limits (each after doing the request):
    - `endless_pages`: a list answer that always says `has_more`; with `fresh_ids` its items get
      new ids on every page (a cursor that never repeats), else the same page comes back whatever
      `after` says;
    - `drip`: the answer's bytes one at a time, `seconds` apart (through the socket door: in
      process the sleeps would hold up the client's own event loop);
    - `huge_body`: a 200 list answer of `size` bytes (streamed: the sandbox never holds it);
    - `damage`: the JSON answer with the fields in `set_null` made null and those in `remove`
      left out, at the top and in every item of a `data` list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["drop_after_commit", "error_after_commit", "reject", "stall", "hold", "not_found",
                    "endless_pages", "drip", "huge_body", "damage"]
    method: str | None = None
    path: str = "/v1/"
    path_regex: str | None = None
    nth: int = Field(1, ge=1)
    every: int | None = Field(None, ge=1)
    times: int | None = Field(1, ge=1)
    status: int | None = None
    message: str | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    seconds: float = 0.0
    then: Literal["answer", "drop"] = "answer"
    fresh_ids: bool = False
    size: int = Field(0, ge=0)
    set_null: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return re.search(self.path_regex, path) is not None if self.path_regex else path.startswith(self.path)

    def fires_on(self, count: int) -> bool:
        """Whether the `count`-th matching request is hit (before the `times` limit)."""
        return count % self.every == 0 if self.every else count >= self.nth

    def error(self, default_status: int) -> EmulatorError:
        """The API error this fault answers with (`status`, else `default_status`)."""
        status = self.status or default_status
        message, kind, code = FAULT_ERRORS.get(status, (f"Sandbox fault: status {status}.", "server_error", None))
        return EmulatorError(status, self.message or message, code=code, type=kind)

    def rewrite(self, payload: object, fired: int) -> object:
        """The answer an `endless_pages` or `damage` fault sends instead of `payload` (its `fired`-th time)."""
        if not isinstance(payload, dict):
            return payload
        if self.action == "endless_pages":
            items = [dict(item, id=f"{item['id']}_page{fired}") if self.fresh_ids else item
                     for item in payload.get("data") or []]
            return {**payload, "data": items, "has_more": True, "last_id": items[-1]["id"] if items else None}
        items = payload.get("data")
        return {**self._damaged(payload), **({"data": [self._damaged(i) for i in items]}
                                             if isinstance(items, list) and "data" not in self.set_null else {})}

    def _damaged(self, item: object) -> object:
        if not isinstance(item, dict):
            return item
        return {**{k: v for k, v in item.items() if k not in self.remove}, **dict.fromkeys(self.set_null)}

    def retry_headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.retry_after_ms)
        return headers


FAULT_LIST = TypeAdapter(list[Fault])


class DripStream(io.RawIOBase):
    """An answer's bytes one at a time, `seconds` apart: what a `drip` fault sends."""

    def __init__(self, data: bytes, seconds: float):
        self.data, self.seconds, self.at = data, seconds, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.at >= len(self.data):
            return b""
        time.sleep(self.seconds)
        self.at += 1
        return self.data[self.at - 1:self.at]


class HugeListStream(io.RawIOBase):
    """A JSON list answer of exactly `size` bytes (one long padding string), made as it is read."""

    HEAD, TAIL = b'{"object": "list", "data": [], "has_more": false, "padding": "', b'"}'
    SMALLEST = len(HEAD) + len(TAIL)

    def __init__(self, size: int):
        self.size, self.at = max(size, self.SMALLEST), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        start = self.at
        self.at = stop = min(self.size, start + (size if size >= 0 else 1 << 20))
        tail_start = self.size - len(self.TAIL)
        pad = max(0, min(stop, tail_start) - max(start, len(self.HEAD)))
        return (self.HEAD[start:stop] + b"x" * pad
                + self.TAIL[max(start - tail_start, 0):max(stop - tail_start, 0)])


@dataclass
class ArmedFault:
    """A fault plus what it has seen so far; counters live here so a Fault stays a plain value."""

    fault: Fault
    seen: int = 0
    fired: int = 0

    def trigger(self, method: str, path: str) -> bool:
        if not self.fault.matches(method, path):
            return False
        self.seen += 1
        if self.fault.times is not None and self.fired >= self.fault.times:
            return False
        if not self.fault.fires_on(self.seen):
            return False
        self.fired += 1
        return True
