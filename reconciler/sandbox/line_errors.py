"""Errors about the lines of a batch input file, worded as the real Batch API words them.

Two kinds, as in the real API:

- a `RequestError` is one request's answer that went wrong (400 bad body, 404 unknown
  model, 429, 500): it becomes a line of the batch's error file;
- a validation problem fails the whole batch in its `validating` step: it becomes an
  entry of `batch.errors.data` ({code, line, message, param}).

`reconciler.inputs.scan_input` finds the validation problems with batchplan's own,
more helpful wording (it is what `batchplan validate` prints); the sandbox rewords them
with `api_worded` so a client sees what the real API would send.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.errors import Problem


@dataclass(frozen=True)
class RequestError:
    """One request's error answer: its HTTP status and the body's `error` object."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def error_object(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def to_record(self) -> list:
        """A compact form for the persisted world: [status, message, type, param, code]."""
        return [self.status, self.message, self.type, self.param, self.code]

    @classmethod
    def from_record(cls, record: list) -> RequestError:
        return cls(*record)


# The real API's sentence per validation code. `invalid_json_line` is quoted from a live
# answer; the others follow the documented codes with the API's short, fixed sentences
# (no line content echoed back: the line number is in the entry's `line`).
API_WORDING = {
    "invalid_json_line": "This line is not parseable as valid JSON.",
    "duplicate_custom_id": "The custom_id for this request is a duplicate of another request. The custom_id "
                           "parameter must be unique for each request in a batch.",
    "url_mismatch": "The provided URL does not match the endpoint of the batch.",
    "model_mismatch": "The provided model does not match the model of the other requests in the batch. A batch "
                      "may only contain requests for one model.",
    "invalid_method": "The HTTP method for this request must be POST.",
    "invalid_request": "This line is not a valid batch request: it must be a JSON object with custom_id, method, "
                       "url and body.",
    "empty_file": "The batch input file is empty. Please provide a file with at least one request.",
    "file_too_large": "The batch input file is larger than the 200 MB limit.",
    "too_many_inputs": "The batch has more than 50,000 embedding inputs, the limit for a batch.",
}


def too_many_tasks(limit: int) -> dict:
    return {"code": "too_many_tasks", "line": None, "param": None,
            "message": f"The number of requests in the batch input file exceeds the limit of {limit:,} requests "
                       "per batch."}


def api_worded(problems: list[Problem]) -> list[dict]:
    """`batch.errors.data` entries for scan_input's problems, in the real API's wording."""
    return [{"code": p.code, "line": p.line, "message": API_WORDING.get(p.code, p.message), "param": p.field}
            for p in problems]
