"""What becomes of each request of a batch: an answer in the output file, or a line of the error file.

Decided once per batch, in its `validating` step, as the real API does: a body its
endpoint refuses is a 400, an unknown model a 404, then the sandbox's own knobs
(`BatchFaults` rules: 500 or 429 on chosen requests; `fail_rate`: a 400 on a share of
them). Only the failures are kept (custom_id -> RequestError record), so a batch of
50,000 good requests costs nothing to remember.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from reconciler.sandbox import results
from reconciler.sandbox.bodies import check_body
from reconciler.sandbox.line_errors import RequestError
from reconciler.sandbox.models import model_error

FAULT_ANSWERS = {
    500: RequestError(500, "The server had an error while processing your request. Sorry about that!",
                      type="server_error"),
    429: RequestError(429, "Rate limit reached for requests. Please try again later.", type="requests",
                      code="rate_limit_exceeded"),
}
FAIL_RATE_ANSWER = RequestError(400, "The emulator failed this request on purpose (fail_rate).")


class RequestFault(BaseModel):
    """Requests inside a batch that fail on purpose, so a client's retry of them can be seen.

    A request is hit when its custom_id matches `custom_id` (a `re.search` pattern; None:
    every request) and it falls in the `share` of the matching ones (picked stably by
    custom_id). It lands in the error file answered `status`: 500 (server error) or 429
    (rate limit), with the real API's error-line shape; `message` replaces the API's text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    custom_id: str | None = None
    share: float = Field(1.0, ge=0, le=1)
    status: Literal[500, 429] = 500
    message: str | None = None

    @field_validator("custom_id")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return pattern

    def hits(self, rule_index: int, custom_id: str) -> bool:
        if self.custom_id is not None and re.search(self.custom_id, custom_id) is None:
            return False
        return self.share >= 1 or results.request_fails(f"{rule_index}\0{custom_id}", self.share)

    def answer(self) -> RequestError:
        answer = FAULT_ANSWERS[self.status]
        return answer if self.message is None else RequestError(answer.status, self.message, answer.type,
                                                                answer.param, answer.code)


class BatchFaults(BaseModel):
    """What goes wrong inside the batches created from now on.

    `requests`: rules that fail requests (see RequestFault). `expire_after`: every batch
    expires once this share of its `in_progress` time has passed, with the requests done
    by then in its output file and the rest as `batch_expired` lines of its error file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: tuple[RequestFault, ...] = ()
    expire_after: float | None = Field(None, ge=0, le=1)


def request_failure(endpoint: str, custom_id: str, body: dict, *, models: Iterable[str] | None,
                    faults: Iterable[RequestFault], fail_rate: float) -> RequestError | None:
    """The error one request is answered with, or None when it succeeds."""
    found = check_body(endpoint, body) or model_error(body.get("model"), models)
    if found is not None:
        return found
    for index, rule in enumerate(faults):
        if rule.hits(index, custom_id):
            return rule.answer()
    return FAIL_RATE_ANSWER if results.request_fails(custom_id, fail_rate) else None


def plan_failures(endpoint: str, requests: Iterable[tuple[str, dict]], *, models: Iterable[str] | None,
                  faults: Iterable[RequestFault], fail_rate: float) -> dict[str, list]:
    """custom_id -> RequestError record of every request of a batch that fails."""
    faults = list(faults)
    failures = {}
    for custom_id, body in requests:
        error = request_failure(endpoint, custom_id, body, models=models, faults=faults, fail_rate=fail_rate)
        if error is not None:
            failures[custom_id] = error.to_record()
    return failures
