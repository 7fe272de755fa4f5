"""Injected failures: what a test arms on the sandbox so a request is lost, refused or late.

A `Fault` is a plain value; `ArmedFault` counts the requests it saw. EmulatorService
asks its armed faults about every API request, whichever door (socket or in-process
transport) it came through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from reconciler.sandbox.emulator import EmulatorError

FAULT_ERRORS = {
    429: ("Rate limit reached for requests (sandbox fault). Please try again later.", "requests",
          "rate_limit_exceeded"),
    500: ("The server had an error while processing your request (sandbox fault).", "server_error", None),
    503: ("The server is overloaded or not ready yet (sandbox fault).", "server_error", None),
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
    - `hold`: wait until the test calls `release_held()` on the service (or `seconds` passed,
      when given), then do the request and answer: a create that lands late, at a moment the
      test chooses, long after its client gave up on it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["drop_after_commit", "error_after_commit", "reject", "stall", "hold"]
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

    def retry_headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = f"{self.retry_after:g}"
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.retry_after_ms)
        return headers


FAULT_LIST = TypeAdapter(list[Fault])


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
