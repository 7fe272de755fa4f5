"""The sandbox over HTTP: routes, auth, latency, injected faults and the request log.

Built on stdlib `http.server` on purpose: faults need raw control of the socket
(answer nothing and close, or answer long after the client gave up), which an
ASGI stack would hide. Uploads are parsed with python-multipart, streamed to disk
in 1 MiB pieces, so a 150 MB upload never sits in memory.

Control endpoints under `/_sandbox/` let a test drive a server that runs in another
process (expire things, set faults, read the log); they are never delayed or faulted.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, Callable, Literal, NamedTuple, TextIO
from urllib.parse import parse_qsl, urlsplit

import orjson
import python_multipart
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from reconciler.errors import ConfigError
from reconciler.sandbox.emulator import Emulator, EmulatorError, Timing, bad_request
from reconciler.sandbox.files import content_disposition
from reconciler.sandbox.models import models_from_env
from reconciler.sandbox.outcomes import BatchFaults

CHUNK = 1 << 20
STEP_SECONDS_ENV = "BATCHPLAN_SANDBOX_STEP_SECONDS"


# --- faults ---

class Fault(BaseModel):
    """One injected failure: which requests it hits, when, and what it does.

    It matches `method` (any when None) and a path: `path` is a prefix, `path_regex`
    (when given) a `re.search` pattern instead. Counting only matching requests, it
    fires from the `nth` on, or on every `every`-th, at most `times` times (None: no limit).

    - `drop_after_commit`: do the request, then close the socket without an answer;
    - `error_after_commit`: do the request, then answer `status` (500) with an error;
    - `reject`: answer `status` (429) without doing anything; `retry_after` (seconds)
      and `retry_after_ms` set the `Retry-After` / `retry-after-ms` headers;
    - `stall`: wait `seconds`, then do the request and answer, or drop if `then="drop"`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["drop_after_commit", "error_after_commit", "reject", "stall"]
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


FAULT_LIST = TypeAdapter(list[Fault])


@dataclass
class _ArmedFault:
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


# --- requests and replies ---

class LoggedRequest(NamedTuple):
    method: str
    path: str
    status: int | str  # "dropped" when the client got no answer


class TimedRequest(NamedTuple):
    """A logged request with when it arrived and when it was answered (time.monotonic())."""

    arrived: float
    answered: float
    request: LoggedRequest


class _Body:
    """A request body as a stream: Content-Length bounded, or chunked transfer encoding."""

    def __init__(self, rfile: BinaryIO, headers):
        self.rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.left = 0 if self.chunked else int(headers.get("Content-Length") or 0)
        self.done = not self.chunked and self.left == 0

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
    headers: Message
    body: _Body
    params: dict[str, str] = field(default_factory=dict)

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


def json_reply(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(payload), headers=headers or {})


def error_reply(error: EmulatorError, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(error.envelope(), error.status, headers)


FAULT_ERRORS = {
    429: ("Rate limit reached for requests (sandbox fault). Please try again later.", "requests",
          "rate_limit_exceeded"),
    500: ("The server had an error while processing your request (sandbox fault).", "server_error", None),
    503: ("The server is overloaded or not ready yet (sandbox fault).", "server_error", None),
}


def _fault_error(fault: Fault, default_status: int) -> EmulatorError:
    status = fault.status or default_status
    message, kind, code = FAULT_ERRORS.get(status, (f"Sandbox fault: status {status}.", "server_error", None))
    return EmulatorError(status, fault.message or message, code=code, type=kind)


def _int_query(req: Request, name: str, default: int) -> int:
    value = req.query.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise bad_request(f"Invalid '{name}': expected an integer, got '{value}'.", name, "invalid_type") from None


# --- API routes ---

def files_create(app: EmulatorServer, req: Request) -> Reply:
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


def files_list(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.list_files(req.query.get("purpose"), _int_query(req, "limit", 10000),
                                              req.query.get("after"), req.query.get("order", "desc")))


def files_get(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.get_file(req.params["id"]))


def files_delete(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.delete_file(req.params["id"]))


def files_content(app: EmulatorServer, req: Request) -> Reply:
    disposition = content_disposition(app.emulator.get_file(req.params["id"])["filename"])
    stream, size = app.emulator.open_content(req.params["id"])
    return Reply(200, content_type="application/octet-stream", headers={"Content-Disposition": disposition},
                 stream=stream, stream_size=size)


def batches_create(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.create_batch(req.json()))


def batches_list(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.list_batches(req.query.get("after"), _int_query(req, "limit", 20)))


def batches_get(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.get_batch(req.params["id"]))


def batches_cancel(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.cancel_batch(req.params["id"]))


# --- control routes ---

def control_expire_batch(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.expire_batch(req.params["id"]))


def control_expire_file(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.expire_file(req.params["id"]))


def control_set_faults(app: EmulatorServer, req: Request) -> Reply:
    try:
        faults = FAULT_LIST.validate_python(req.json())
    except ValidationError as exc:
        raise bad_request(f"Invalid fault list: {exc}", "faults") from None
    app.set_faults(faults)
    return control_get_faults(app, req)


def control_get_faults(app: EmulatorServer, req: Request) -> Reply:
    return json_reply({"data": app.fault_status()})


def control_set_batch_faults(app: EmulatorServer, req: Request) -> Reply:
    try:
        app.emulator.batch_faults = BatchFaults.model_validate(req.json())
    except ValidationError as exc:
        raise bad_request(f"Invalid batch faults: {exc}", "batch_faults") from None
    return control_get_batch_faults(app, req)


def control_get_batch_faults(app: EmulatorServer, req: Request) -> Reply:
    return json_reply(app.emulator.batch_faults.model_dump(mode="json"))


def control_requests(app: EmulatorServer, req: Request) -> Reply:
    return json_reply({"data": [entry._asdict() for entry in app.requests]})


def control_reset_log(app: EmulatorServer, req: Request) -> Reply:
    app.reset_log()
    return json_reply({"ok": True})


Route = tuple[str, "re.Pattern[str]", Callable[["EmulatorServer", Request], Reply]]
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
    ("GET", "/_sandbox/requests", control_requests),
    ("POST", "/_sandbox/reset-log", control_reset_log),
])


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


# --- the server ---

class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: EmulatorServer):
        self.app = app
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on keep-alive clients too: a stopped server must not answer anyone."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can hang on a DNS lookup: we need none.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            traceback.print_exc()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients expect
    disable_nagle_algorithm = True  # headers and body go out as two writes: don't wait 40 ms between
    server: _HTTPServer

    def do_GET(self) -> None:
        self.server.app.handle(self)

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass  # EmulatorServer keeps its own log


class EmulatorServer:
    """An `Emulator` served on loopback HTTP, with latency, faults and a request log.

    `requests` lists `(method, path, status)` for every API request, "dropped" as the
    status when no answer was sent. Control requests (`/_sandbox/...`) are not logged:
    the log is what clients did to the API.
    """

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 require_auth: bool = True, *, log_stream: TextIO | None = None, owns_emulator: bool = False):
        self.emulator = emulator
        self.host, self.port = host, port
        self.latency = latency
        self.require_auth = require_auth
        self.log_stream = log_stream
        self.owns_emulator = owns_emulator  # stop() also closes the emulator
        self._lock = threading.Lock()
        self._log: list[LoggedRequest] = []
        self._times: list[tuple[float, float]] = []  # (arrived, answered), one per log entry
        self._in_flight = 0  # API requests being handled right now
        self._faults: list[_ArmedFault] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> EmulatorServer:
        self._bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, announce: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until Ctrl-C; `announce(url)` runs once the port is bound."""
        self._bind()
        if announce is not None:
            announce(self.url)
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def _bind(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("this EmulatorServer is already started")
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._thread is not None:
            httpd.shutdown()
            self._thread.join()
            self._thread = None
        httpd.server_close()
        httpd.close_connections()
        if self.owns_emulator:
            self.emulator.close()

    def __enter__(self) -> EmulatorServer:
        return self if self._httpd is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The API base URL, `/v1` included, as clients take it."""
        if self._httpd is None:
            raise RuntimeError("start the EmulatorServer before asking for its url")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def control_url(self) -> str:
        return self.url.removesuffix("/v1") + "/_sandbox"

    # faults and log

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(_ArmedFault(fault))

    def set_faults(self, faults: list[Fault]) -> None:
        with self._lock:
            self._faults = [_ArmedFault(f) for f in faults]

    def clear_faults(self) -> None:
        self.set_faults([])

    def fault_status(self) -> list[dict]:
        with self._lock:
            return [{**armed.fault.model_dump(), "seen": armed.seen, "fired": armed.fired}
                    for armed in self._faults]

    def _fault_for(self, method: str, path: str) -> Fault | None:
        """The first fault (in order added) that fires on this request; later ones never see it."""
        with self._lock:
            for armed in self._faults:
                if armed.trigger(method, path):
                    return armed.fault
        return None

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def timeline(self) -> list[TimedRequest]:
        """The request log with arrival and answer times, in the order answered."""
        with self._lock:
            return [TimedRequest(a, b, r) for (a, b), r in zip(self._times, self._log)]

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no API request is being handled (a stalled one may finish after its client left)."""
        deadline = time.monotonic() + timeout
        while self._in_flight:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def count(self, method: str | None = None, path_prefix: str | None = None) -> int:
        return sum(1 for entry in self.requests
                   if (method is None or entry.method == method.upper())
                   and entry.path.startswith(path_prefix or ""))

    def writes(self) -> int:
        """POST and DELETE requests to the API: what a no-op plan must not send."""
        return sum(1 for entry in self.requests
                   if entry.method in ("POST", "DELETE") and not entry.path.startswith("/_sandbox"))

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._times.clear()

    def _record(self, method: str, path: str, status: int | str, started: float) -> None:
        # Recorded before the answer is written, so a client that has its answer sees it logged.
        with self._lock:
            self._log.append(LoggedRequest(method, path, status))
            self._times.append((started, time.monotonic()))
        if self.log_stream is not None:
            elapsed = (time.monotonic() - started) * 1000
            print(f"{method} {path} {status} {elapsed:.0f}ms", file=self.log_stream, flush=True)

    # one request

    def handle(self, handler: _Handler) -> None:
        """Answer one request (called on the connection's thread)."""
        started = time.monotonic()
        url = urlsplit(handler.path)
        req = Request(handler.command, url.path, dict(parse_qsl(url.query)), handler.headers,
                      _Body(handler.rfile, handler.headers))
        try:
            if req.path.startswith("/_sandbox/"):
                self._answer(handler, req, self._dispatch(CONTROL_ROUTES, req), started, log=False)
            else:
                with self._lock:
                    self._in_flight += 1
                try:
                    self._handle_api(handler, req, started)
                finally:
                    with self._lock:
                        self._in_flight -= 1
        except (ConnectionError, TimeoutError):
            handler.close_connection = True  # the client went away; nobody is left to answer

    def _handle_api(self, handler: _Handler, req: Request, started: float) -> None:
        if self.latency:
            time.sleep(self.latency)
        if self.require_auth and not _authorized(handler.headers):
            self._answer(handler, req, error_reply(_unauthorized()), started)
            return
        fault = self._fault_for(req.method, req.path)
        if fault is None:
            self._answer(handler, req, self._dispatch(API_ROUTES, req), started)
        elif fault.action == "reject":
            self._answer(handler, req, error_reply(_fault_error(fault, 429), _retry_headers(fault)), started)
        elif fault.action == "stall":
            time.sleep(fault.seconds)
            if self._httpd is None:  # stopped while we slept: the world may be gone
                handler.close_connection = True
                return
            reply = self._dispatch(API_ROUTES, req)
            self._drop(handler, req, reply, started) if fault.then == "drop" else \
                self._answer(handler, req, reply, started)
        elif fault.action == "drop_after_commit":
            self._drop(handler, req, self._dispatch(API_ROUTES, req), started)
        else:  # error_after_commit
            _close_stream(self._dispatch(API_ROUTES, req))
            self._answer(handler, req, error_reply(_fault_error(fault, 500)), started)

    def _dispatch(self, routes: list[Route], req: Request) -> Reply:
        try:
            return self._route(routes, req)
        except EmulatorError as exc:
            return error_reply(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:  # a bug in the sandbox: say so like the API would, and show it
            traceback.print_exc()
            return error_reply(EmulatorError(500, "The sandbox failed on this request (see its stderr).",
                                             type="server_error"))

    def _route(self, routes: list[Route], req: Request) -> Reply:
        path_known = False
        for method, pattern, handler in routes:
            match = pattern.match(req.path)
            if match:
                path_known = True
                if method == req.method:
                    req.params = match.groupdict()
                    return handler(self, req)
        what = "method" if path_known else "URL"
        raise EmulatorError(404, f"Invalid {what} ({req.method} {req.path}).")

    def _answer(self, handler: _Handler, req: Request, reply: Reply, started: float, log: bool = True) -> None:
        req.body.drain()
        if log:
            self._record(req.method, req.path, reply.status, started)
        try:
            handler.send_response(reply.status)
            headers = {"Content-Type": reply.content_type, "Content-Length": str(len(reply.body) + reply.stream_size),
                       "x-request-id": f"req_{secrets.token_hex(16)}", **reply.headers}
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(reply.body)
            while reply.stream is not None and (chunk := reply.stream.read(CHUNK)):
                handler.wfile.write(chunk)
        finally:
            _close_stream(reply)

    def _drop(self, handler: _Handler, req: Request, reply: Reply, started: float) -> None:
        """The request is done, but its answer is lost: close the connection and say nothing."""
        _close_stream(reply)
        req.body.drain()
        self._record(req.method, req.path, "dropped", started)
        handler.close_connection = True


def _close_stream(reply: Reply) -> None:
    if reply.stream is not None:
        reply.stream.close()


def _authorized(headers) -> bool:
    scheme, _, key = headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(key.strip())


def _unauthorized() -> EmulatorError:
    return EmulatorError(401, "You didn't provide an API key. You need to provide your API key in an "
                              "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def _retry_headers(fault: Fault) -> dict[str, str]:
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = str(fault.retry_after_ms)
    return headers


# --- entry points for the CLI ---

def timing_from_env() -> Timing:
    """`BATCHPLAN_SANDBOX_STEP_SECONDS` (one float for every step), else the default Timing."""
    value = os.environ.get(STEP_SECONDS_ENV)
    if value is None or not value.strip():
        return Timing()
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{STEP_SECONDS_ENV} must be a number of seconds (e.g. 0.5), not {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{STEP_SECONDS_ENV} must be zero or more seconds, not {value!r}")
    return Timing.uniform(seconds)


def start_sandbox(root: Path, timing: Timing | None = None) -> EmulatorServer:
    """A started sandbox on 127.0.0.1 (free port) whose world persists under `root`; stop() it."""
    emulator = Emulator(root, timing or timing_from_env(), models=models_from_env())
    return EmulatorServer(emulator, port=0, require_auth=False, owns_emulator=True).start()


def serve(host: str = "127.0.0.1", port: int = 8089, root: Path | None = None, timing: Timing | None = None,
          fail_rate: float = 0.0, latency: float = 0.0, require_auth: bool = True,
          models: frozenset[str] | None = None) -> None:
    """Run a sandbox in the foreground until Ctrl-C or SIGTERM; one line per request goes to stderr.

    `models` (see models.py) defaults to the list `BATCHPLAN_SANDBOX_MODELS` names, else the built-in one."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too ends cleanly: no temp world left
    emulator = Emulator(root, timing or timing_from_env(), fail_rate, models=models or models_from_env())
    server = EmulatorServer(emulator, host, port, latency, require_auth, log_stream=sys.stderr,
                            owns_emulator=True)
    where = f"world in {root}" if root is not None else "world in memory"
    server.serve_forever(lambda url: print(f"batchplan sandbox listening on {url} ({where}); Ctrl-C to stop",
                                           flush=True))
