"""Input JSONL files: streaming validation, content hashing, and the hash cache.

The Batch API only finds a bad input after upload (the batch goes `failed`), so we
find the same mistakes here, line by line, before anything is sent. One pass over
the file both hashes it and checks it; nothing holds the whole file in memory.

The sandbox emulator reuses `scan_input` to decide whether a batch fails its
`validating` step, so the problem codes are the API's own error codes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

MAX_BYTES = 200 * 1024 * 1024
MAX_REQUESTS = 50_000
MAX_EMBEDDING_INPUTS = 50_000
MAX_REPORTED = 20
REQUIRED_FIELDS = ("custom_id", "method", "url", "body")


@dataclass(frozen=True)
class LineProblem:
    """One problem in an input file. `code` is the Batch API's error code for it."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


@dataclass
class InputReport:
    """What one pass over an input file found."""

    sha256: str = ""
    size: int = 0
    requests: int = 0
    models: list[str] = field(default_factory=list)
    embedding_inputs: int = 0
    problems: list[LineProblem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: LineProblem, limit: int) -> None:
        if len(self.problems) < limit:
            self.problems.append(problem)
        else:
            self.more_problems += 1


class _Scanner:
    """Checks one request line at a time; keeps only what cross-line checks need."""

    def __init__(self, endpoint: str, report: InputReport, limit: int):
        self.endpoint = endpoint
        self.report = report
        self.limit = limit
        self.first_line_of: dict[str, int] = {}
        self.model_line: dict[str, int] = {}

    def problem(self, code: str, message: str, line: int, param: str | None = None) -> None:
        self.report.add(LineProblem(code, message, line, param), self.limit)

    def feed(self, raw: bytes, n: int) -> None:
        self.report.requests += 1
        if self.report.requests == MAX_REQUESTS + 1:
            self.problem("too_many_tasks", f"more than {MAX_REQUESTS:,} requests; split the file", n)
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            reason = "empty line" if not raw.strip() else str(exc).split(":")[0]
            self.problem("invalid_json_line", f"not valid JSON ({reason})", n)
            return
        if not isinstance(request, dict):
            self.problem("invalid_request", "each line must be a JSON object", n)
            return
        missing = [f for f in REQUIRED_FIELDS if f not in request]
        if missing:
            self.problem("invalid_request", f"missing {', '.join(missing)}", n, missing[0])
            return
        self.check_request(request, n)

    def check_request(self, request: dict, n: int) -> None:
        custom_id, body = request["custom_id"], request["body"]
        if not isinstance(custom_id, str) or not custom_id:
            self.problem("invalid_request", "custom_id must be a non-empty string", n, "custom_id")
        elif custom_id in self.first_line_of:
            first = self.first_line_of[custom_id]
            self.problem("duplicate_custom_id",
                         f"custom_id {custom_id!r} is used on line {first} and line {n}", n, "custom_id")
        else:
            self.first_line_of[custom_id] = n
        if request["method"] != "POST":
            self.problem("invalid_method", f"method must be POST, not {request['method']!r}", n, "method")
        if request["url"] != self.endpoint:
            self.problem("url_mismatch",
                         f"url {request['url']!r} does not match the batch endpoint {self.endpoint!r}", n, "url")
        if not isinstance(body, dict):
            self.problem("invalid_request", "body must be a JSON object", n, "body")
            return
        self.check_body(body, n)

    def check_body(self, body: dict, n: int) -> None:
        model = body.get("model")
        if isinstance(model, str) and model not in self.model_line:
            self.model_line[model] = n
            self.report.models.append(model)
            if len(self.model_line) == 2:
                first_model, first = self.report.models[0], self.model_line[self.report.models[0]]
                self.problem("model_mismatch",
                             f"body.model {model!r} differs from {first_model!r} on line {first}; "
                             "a batch uses one model", n, "body.model")
        if self.endpoint == "/v1/embeddings":
            inputs = body.get("input")
            self.report.embedding_inputs += len(inputs) if isinstance(inputs, list) else 1
            if self.report.embedding_inputs > MAX_EMBEDDING_INPUTS and not self._reported_inputs:
                self._reported_inputs = True
                self.problem("too_many_inputs",
                             f"more than {MAX_EMBEDDING_INPUTS:,} embedding inputs in one batch", n, "body.input")

    _reported_inputs = False


def scan_input(path: Path, endpoint: str, *, limit: int = MAX_REPORTED) -> InputReport:
    """Hash and validate one JSONL input file in a single streaming pass."""
    report = InputReport()
    report.size = path.stat().st_size
    if report.size > MAX_BYTES:
        report.add(LineProblem("file_too_large", f"{report.size:,} bytes is over the 200 MB limit"), limit)
    scanner = _Scanner(endpoint, report, limit)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            digest.update(raw)
            scanner.feed(raw, n)
    report.sha256 = digest.hexdigest()
    if report.requests == 0:
        report.add(LineProblem("empty_file", "the file holds no requests"), limit)
    return report


def hash_file(path: Path) -> str:
    """The sha256 of a file, read in chunks (the plain baseline the bench compares with)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 and validation results of input files, keyed by path, size, mtime and endpoint.

    Kept in `state/cache.json`, apart from the reviewed state: mtimes are per machine.
    Only clean reports are cached, so a cached entry means "this file was valid".
    """

    VERSION = 1

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == self.VERSION:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError):
                self.entries = {}  # a cache is never precious: start again

    @staticmethod
    def _key(path: Path, endpoint: str) -> tuple[str, int, int, str]:
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns, endpoint

    def lookup(self, path: Path, endpoint: str) -> InputReport | None:
        name, size, mtime, ep = self._key(path, endpoint)
        hit = self.entries.get(name)
        if not hit or [hit["size"], hit["mtime_ns"], hit["endpoint"]] != [size, mtime, ep]:
            return None
        return InputReport(sha256=hit["sha256"], size=size, requests=hit["requests"], models=hit["models"])

    def store(self, path: Path, endpoint: str, report: InputReport) -> None:
        if not report.ok:
            return
        name, size, mtime, ep = self._key(path, endpoint)
        self.entries[name] = {"size": size, "mtime_ns": mtime, "endpoint": ep, "sha256": report.sha256,
                              "requests": report.requests, "models": report.models}
        self.dirty = True

    def save(self) -> None:
        """Best effort, atomic: a cache that cannot be written is simply not kept."""
        if self.path is None or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": self.VERSION, "entries": self.entries}, sort_keys=True))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass
