"""Every error batchplan raises on purpose, in one tree.

    BatchplanError                  anything the user can act on; cli.py prints it, exit 1
     ├── ConfigError                flags, environment, batchplan.yaml
     │    └── PathError             a path a user named leaves the repository or lands on our own files
     ├── ValidationFailed           one or more Problems in specs or input files
     ├── InputError                 an input file changed while apply was uploading it
     ├── StateError                 the state file cannot be read, or is newer than us
     │    └── LockError             another process holds the state lock
     ├── PlanError                  a plan that cannot be made or carried out
     │    ├── StalePlanError        a saved plan whose state or inputs moved on
     │    └── OverBudget            a plan that may cost more than a budget, or an unknown amount under one
     ├── ApiError                   the server answered with an error
     │    ├── NotFound              404 for a batch or file id
     │    ├── AmbiguousWrite        a create whose outcome is unknown (sent, no answer)
     │    └── BadAnswer             an answer that is not what the API sends (a null id, a huge body,
     │                              pages that never end)
     ├── TransportError             the server could not be reached
     └── Interrupted                Ctrl-C / SIGTERM stopped an apply

    Notice (a UserWarning, never raised): something the user should know that stopped
    nothing, e.g. a damaged cache that is rebuilt; cli.py prints it as a note.

Foreign exceptions (httpx, yaml, pydantic, OSError) are translated where they are
raised, chained with `from exc`; only cli.py turns these into text and exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchplanError(Exception):
    """An error whose message is meant for the user."""


class ConfigError(BatchplanError):
    pass


class PathError(ConfigError):
    """A path that leaves the repository, or would be written over batchplan's own files.

    Its message says what is wrong (`resolves to /x, outside the repository /repo`); the
    caller, who knows where the path was named, puts that in front (see paths.py)."""


class Notice(UserWarning):
    """Issued with warnings.warn where something went wrong that stopped nothing (a damaged
    cache, rebuilt); cli.py shows it as `Note: ...`, so the operations still print nothing."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a spec or input file, located as precisely as we can.

    For an input line, `code` is the Batch API's error code and `field` its `param`; the scan
    names the file by its path, and the spec's loader renames it as the user wrote it."""

    file: str
    message: str
    line: int | None = None
    field: str | None = None
    code: str = "invalid"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.field}: " if self.field else ""
        return f"{where}: {what}{self.message}"


class ValidationFailed(BatchplanError):
    """Specs or inputs are wrong; nothing was sent and nothing was written."""

    def __init__(self, problems: list[Problem], notes: list[str] | None = None):
        self.problems = problems
        self.notes = notes or []
        lines = [str(p) for p in problems] + self.notes
        count = len(problems)
        head = f"{count} problem{'s' if count != 1 else ''} found; nothing was sent or written"
        super().__init__("\n".join([head, *lines]))


class InputError(BatchplanError):
    pass


class StateError(BatchplanError):
    pass


class LockError(StateError):
    pass


class PlanError(BatchplanError):
    pass


class StalePlanError(PlanError):
    pass


class OverBudget(PlanError):
    """Apply refused a plan over a budget (or of unknown cost under one); nothing was sent."""


class ApiError(BatchplanError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None, request: str = ""):
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        detail = ", ".join(f"{k}={v}" for k, v in (("type", type), ("param", param), ("code", code)) if v)
        prefix = f"{request}: " if request else ""
        super().__init__(f"{prefix}server answered {status}: {message}" + (f" ({detail})" if detail else ""))


class NotFound(ApiError):
    pass


class AmbiguousWrite(ApiError):
    """A write was sent but its answer was lost: the server may or may not have done it."""


class BadAnswer(ApiError):
    """The server answered, but not as the API does: `GET /batches: data[3].created_at is null, ...`.

    Never retried: a server that answers like this would answer like this again."""

    def __init__(self, request: str, problem: str, status: int = 200):
        BatchplanError.__init__(self, f"{request}: unexpected answer from the server: {problem}")
        self.status, self.message, self.request = status, problem, request
        self.type = self.param = self.code = None


class TransportError(BatchplanError):
    pass


class Interrupted(BatchplanError):
    pass
