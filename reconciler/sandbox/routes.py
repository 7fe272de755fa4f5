"""The sandbox's HTTP vocabulary: a request, a reply, and the routes that answer them.

No sockets here: `Request` reads its body from any binary file (a socket's or a
spooled one), and a `Reply` is bytes plus an optional open file to stream after them.
Uploads are parsed with python-multipart, streamed to disk in 1 MiB pieces, so a
150 MB upload never sits in memory.

Control routes under `/_sandbox/` let a test drive a sandbox it cannot reach in
process (expire things, set faults, read the log).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator
from urllib.parse import parse_qsl, urlsplit

import orjson
import python_multipart
from pydantic import ValidationError

from reconciler.sandbox.emulator import EmulatorError, bad_request
from reconciler.sandbox.faults import FAULT_LIST
from reconciler.sandbox.files import content_disposition
from reconciler.sandbox.outcomes import BatchFaults

if TYPE_CHECKING:
    from reconciler.sandbox.service import EmulatorService

CHUNK = 1 << 20


class Body:
    """A request body as a stream: `length` bytes, or chunked transfer encoding when None."""

    def __init__(self, rfile: BinaryIO, length: int | None):
        self.rfile = rfile
        self.chunked = length is None
        self.left = length or 0
        self.done = length == 0

    @classmethod
    def from_headers(cls, rfile: BinaryIO, headers: Any) -> Body:
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            return cls(rfile, None)
        return cls(rfile, int(headers.get("Content-Length") or 0))

    def read(self, size: int = CHUNK) -> bytes:
        """Up to `size` bytes; b"" only at the end of the body."""
        if self.done:
            return b""
        if self.chunked and self.left == 0 and not self._next_chunk():
            return b""
        data = self.rfile.read(min(size, self.left))
        if not data:
            raise ConnectionResetError("the client closed the connection mid-body")
        self.left -= len(data)
        if self.left == 0:
            if self.chunked:
                self.rfile.readline()  # the CRLF after each chunk
            else:
                self.done = True
        return data

    def _next_chunk(self) -> bool:
        self.left = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if self.left == 0:
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                pass
            self.done = True
        return not self.done

    def read_all(self) -> bytes:
        return b"".join(iter(self.read, b""))

    def drain(self) -> None:
        """Read and drop what is left, so the next request on this connection starts clean."""
        while self.read():
            pass


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Any  # anything with a case-insensitive .get(): http.server's Message, httpx.Headers
    body: Body
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, method: str, target: str, headers: Any, body: Body) -> Request:
        """A request for `target` (path and query string, as sent on the request line)."""
        url = urlsplit(target)
        return cls(method, url.path, dict(parse_qsl(url.query)), headers, body)

    def json(self) -> object:
        raw = self.body.read_all()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise bad_request("We could not parse the JSON body of your request. The OpenAI API expects a "
                              "JSON payload.", None, None) from None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: BinaryIO | None = None  # sent after `body`; its size is `stream_size`
    stream_size: int = 0

    def wire_headers(self) -> dict[str, str]:
        """Every header the answer carries, as the real API sends them."""
        return {"Content-Type": self.content_type, "Content-Length": str(len(self.body) + self.stream_size),
                "x-request-id": f"req_{secrets.token_hex(16)}", **self.headers}

    def chunks(self) -> Iterator[bytes]:
        """The answer's bytes in pieces of at most CHUNK: `body`, then the stream."""
        if self.body:
            yield self.body
        while self.stream is not None and (chunk := self.stream.read(CHUNK)):
            yield chunk

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def json_reply(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(payload), headers=headers or {})


def error_reply(error: EmulatorError, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(error.envelope(), error.status, headers)


def _int_query(req: Request, name: str, default: int) -> int:
    value = req.query.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise bad_request(f"Invalid '{name}': expected an integer, got '{value}'.", name, "invalid_type") from None


# --- API routes ---

def files_create(app: EmulatorService, req: Request) -> Reply:
    upload = _Upload(app.emulator.staging_dir)
    try:
        upload.parse(req)
        if upload.file is None:
            raise bad_request("Missing required parameter: 'file'.", "file", "missing_required_parameter")
        created = app.emulator.create_file(upload.file, upload.filename, upload.fields.get("purpose"),
                                           upload.expires_after())
    finally:
        upload.discard()
    return json_reply(created)


def files_list(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.list_files(req.query.get("purpose"), _int_query(req, "limit", 10000),
                                              req.query.get("after"), req.query.get("order", "desc")))


def files_get(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.get_file(req.params["id"]))


def files_delete(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.delete_file(req.params["id"]))


def files_content(app: EmulatorService, req: Request) -> Reply:
    disposition = content_disposition(app.emulator.get_file(req.params["id"])["filename"])
    stream, size = app.emulator.open_content(req.params["id"])
    return Reply(200, content_type="application/octet-stream", headers={"Content-Disposition": disposition},
                 stream=stream, stream_size=size)


def batches_create(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.create_batch(req.json()))


def batches_list(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.list_batches(req.query.get("after"), _int_query(req, "limit", 20)))


def batches_get(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.get_batch(req.params["id"]))


def batches_cancel(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.cancel_batch(req.params["id"]))


# --- control routes ---

def control_expire_batch(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.expire_batch(req.params["id"]))


def control_expire_file(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.expire_file(req.params["id"]))


def control_set_faults(app: EmulatorService, req: Request) -> Reply:
    try:
        faults = FAULT_LIST.validate_python(req.json())
    except ValidationError as exc:
        raise bad_request(f"Invalid fault list: {exc}", "faults") from None
    app.set_faults(faults)
    return control_get_faults(app, req)


def control_get_faults(app: EmulatorService, req: Request) -> Reply:
    return json_reply({"data": app.fault_status()})


def control_set_batch_faults(app: EmulatorService, req: Request) -> Reply:
    try:
        app.emulator.batch_faults = BatchFaults.model_validate(req.json())
    except ValidationError as exc:
        raise bad_request(f"Invalid batch faults: {exc}", "batch_faults") from None
    return control_get_batch_faults(app, req)


def control_get_batch_faults(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.batch_faults.model_dump(mode="json"))


def control_set_limits(app: EmulatorService, req: Request) -> Reply:
    """Replace the enqueued-token limits ({model: tokens}; capacity.py), for batches validated from now on."""
    limits = req.json()
    if not isinstance(limits, dict) or not all(
            isinstance(model, str) and type(tokens) is int and tokens > 0 for model, tokens in limits.items()):
        raise bad_request("Invalid limits: give {model: tokens}, each a whole number above 0.", "limits")
    app.emulator.enqueued_token_limits = dict(limits)
    return control_get_limits(app, req)


def control_get_limits(app: EmulatorService, req: Request) -> Reply:
    return json_reply(app.emulator.enqueued_token_limits)


def control_requests(app: EmulatorService, req: Request) -> Reply:
    return json_reply({"data": [entry._asdict() for entry in app.requests]})


def control_reset_log(app: EmulatorService, req: Request) -> Reply:
    app.reset_log()
    return json_reply({"ok": True})


Route = tuple[str, "re.Pattern[str]", Callable[["EmulatorService", Request], Reply]]
ID = r"(?P<id>[^/]+)"


def _routes(table: list[tuple[str, str, Callable]]) -> list[Route]:
    return [(method, re.compile(f"^{pattern}$"), handler) for method, pattern, handler in table]


API_ROUTES = _routes([
    ("POST", "/v1/files", files_create),
    ("GET", "/v1/files", files_list),
    ("GET", f"/v1/files/{ID}", files_get),
    ("DELETE", f"/v1/files/{ID}", files_delete),
    ("GET", f"/v1/files/{ID}/content", files_content),
    ("POST", "/v1/batches", batches_create),
    ("GET", "/v1/batches", batches_list),
    ("GET", f"/v1/batches/{ID}", batches_get),
    ("POST", f"/v1/batches/{ID}/cancel", batches_cancel),
])
CONTROL_ROUTES = _routes([
    ("POST", f"/_sandbox/batches/{ID}/expire", control_expire_batch),
    ("POST", f"/_sandbox/files/{ID}/expire", control_expire_file),
    ("POST", "/_sandbox/faults", control_set_faults),
    ("GET", "/_sandbox/faults", control_get_faults),
    ("POST", "/_sandbox/batch-faults", control_set_batch_faults),
    ("GET", "/_sandbox/batch-faults", control_get_batch_faults),
    ("POST", "/_sandbox/limits", control_set_limits),
    ("GET", "/_sandbox/limits", control_get_limits),
    ("GET", "/_sandbox/requests", control_requests),
    ("POST", "/_sandbox/reset-log", control_reset_log),
])


def route(routes: list[Route], app: EmulatorService, req: Request) -> Reply:
    """Answer `req` with the first route that matches its method and path; 404 when none does."""
    path_known = False
    for method, pattern, handler in routes:
        match = pattern.match(req.path)
        if match:
            path_known = True
            if method == req.method:
                req.params = match.groupdict()
                return handler(app, req)
    what = "method" if path_known else "URL"
    raise EmulatorError(404, f"Invalid {what} ({req.method} {req.path}).")


class _Upload:
    """One multipart upload: its text fields, and its `file` part streamed to a staging file.

    Each upload gets its own staging directory, removed by `discard()`: that also
    catches the half-written part of a client that hung up mid-upload.
    """

    def __init__(self, staging_dir: Path):
        self.dir = Path(tempfile.mkdtemp(dir=staging_dir, prefix="upload-"))
        self.fields: dict[str, str] = {}
        self.file: Path | None = None
        self.filename = "upload"

    def parse(self, req: Request) -> None:
        content_type = req.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise bad_request("Uploads must be sent as multipart/form-data.", None, None)
        config = {"UPLOAD_DIR": str(self.dir), "UPLOAD_DELETE_TMP": False, "MAX_MEMORY_FILE_SIZE": CHUNK}
        try:
            parser = python_multipart.FormParser("multipart/form-data", self._on_field, self._on_file,
                                                 boundary=self._boundary(content_type), config=config)
            while chunk := req.body.read():
                parser.write(chunk)
            parser.finalize()
        except python_multipart.exceptions.FormParserError as exc:
            raise bad_request(f"Could not parse the multipart body: {exc}", None, None) from None

    @staticmethod
    def _boundary(content_type: str) -> bytes:
        _, options = python_multipart.multipart.parse_options_header(content_type)
        if b"boundary" not in options:
            raise bad_request("multipart/form-data needs a boundary.", None, None)
        return options[b"boundary"]

    def _on_field(self, part: python_multipart.Field) -> None:
        self.fields[(part.field_name or b"").decode()] = (part.value or b"").decode()

    def _on_file(self, part: python_multipart.File) -> None:
        path = self._to_disk(part)
        if part.field_name == b"file" and self.file is None:
            self.file, self.filename = path, (part.file_name or b"upload").decode()

    def _to_disk(self, part: python_multipart.File) -> Path:
        """Small parts stay in memory inside the parser; give every part a staging file."""
        if not part.in_memory:
            part.file_object.close()
            return Path(os.fsdecode(part.actual_file_name))
        fd, name = tempfile.mkstemp(dir=self.dir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(part.file_object.getvalue())
        return Path(name)

    def expires_after(self) -> dict | None:
        anchor, seconds = self.fields.get("expires_after[anchor]"), self.fields.get("expires_after[seconds]")
        if anchor is None and seconds is None:
            return None
        try:
            return {"anchor": anchor, "seconds": int(seconds) if seconds is not None else None}
        except ValueError:
            raise bad_request(f"Invalid value for 'expires_after.seconds': {seconds!r} is not an integer.",
                              "expires_after.seconds") from None

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
