"""The sandbox on loopback sockets: the door other processes (and fault tests) go through.

Built on stdlib `http.server` on purpose: faults need raw control of the socket
(answer nothing and close, or answer long after the client gave up), which an
ASGI stack would hide. What a request does is EmulatorService's (service.py): this
module only reads requests off connections and writes the replies back.

`serve` runs the `batchplan sandbox serve` command; the CLI's `--sandbox` talks to
the emulator in process instead (transport.py).
"""

from __future__ import annotations

import errno
import signal
import socket
import socketserver
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, TextIO

from reconciler.errors import ConfigError
from reconciler.sandbox.capacity import limits_from_env
from reconciler.sandbox.emulator import Emulator, Timing, timing_from_env
from reconciler.sandbox.models import models_from_env
from reconciler.sandbox.routes import Body, Reply, Request
from reconciler.sandbox.service import EmulatorService

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


class EmulatorServer(EmulatorService):
    """An EmulatorService served on loopback HTTP (see EmulatorService for the log and faults)."""

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 require_auth: bool = True, *, log_stream: TextIO | None = None, owns_emulator: bool = False,
                 auth: str = "bearer", prefix: str = "/v1"):
        super().__init__(emulator, latency, require_auth, log_stream=log_stream, owns_emulator=owns_emulator,
                         auth=auth, prefix=prefix)
        self.host, self.port = host, port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_open(self) -> bool:
        return self._httpd is not None

    # lifecycle

    def start(self) -> EmulatorServer:
        self._bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, announce: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until Ctrl-C; `announce(url)` runs once the port is bound.

        A port that cannot be had (in use, or privileged) is one ConfigError naming it."""
        try:
            self._bind()
        except OSError as exc:
            if self.owns_emulator:
                self.emulator.close()
            why = "another program is listening there" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
            raise ConfigError(f"sandbox serve: cannot listen on {self.host}:{self.port}: {why}; pick another port "
                              "with --port (or stop that program)") from None
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
        """The API base URL, its prefix (`/v1`, or e.g. `/openai/v1`) included, as clients take it."""
        return self._origin() + self.prefix

    @property
    def control_url(self) -> str:
        return self._origin() + "/_sandbox"

    def _origin(self) -> str:
        if self._httpd is None:
            raise RuntimeError("start the EmulatorServer before asking for its url")
        return f"http://{self.host}:{self.port}"

    # one request

    def handle(self, handler: _Handler) -> None:
        """Answer one request (called on the connection's thread)."""
        req = Request.of(handler.command, handler.path, handler.headers,
                         Body.from_headers(handler.rfile, handler.headers))
        try:
            reply = self.respond(req)
            if reply is None:
                handler.close_connection = True  # the answer is lost: say nothing
            else:
                _write(handler, reply)
        except (ConnectionError, TimeoutError):
            handler.close_connection = True  # the client went away; nobody is left to answer


def _write(handler: _Handler, reply: Reply) -> None:
    try:
        handler.send_response_only(reply.status)  # not send_response: its Date header is this machine's clock
        handler.send_header("Server", handler.version_string())
        for name, value in reply.wire_headers().items():
            handler.send_header(name, value)
        handler.end_headers()
        for chunk in reply.chunks():
            handler.wfile.write(chunk)
    finally:
        reply.close()


# --- entry points for the CLI ---

def start_sandbox(root: Path, timing: Timing | None = None) -> EmulatorServer:
    """A started sandbox on 127.0.0.1 (free port) whose world persists under `root`; stop() it."""
    emulator = Emulator(root, timing or timing_from_env(), models=models_from_env(),
                        enqueued_token_limits=limits_from_env())
    return EmulatorServer(emulator, port=0, require_auth=False, owns_emulator=True).start()


def serve(host: str = "127.0.0.1", port: int = 8089, root: Path | None = None, timing: Timing | None = None,
          fail_rate: float = 0.0, latency: float = 0.0, require_auth: bool = True,
          models: frozenset[str] | None = None, enqueued_token_limits: dict[str, int] | None = None,
          auth: str = "bearer", prefix: str = "/v1") -> None:
    """Run a sandbox in the foreground until Ctrl-C or SIGTERM; one line per request goes to stderr.

    `models` (see models.py) defaults to the list `BATCHPLAN_SANDBOX_MODELS` names, else the built-in one;
    `enqueued_token_limits` (capacity.py) to those BATCHPLAN_SANDBOX_LIMITS sets. `auth` and `prefix`
    make it stand for another provider (Azure OpenAI: `api-key`, `/openai/v1`)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too ends cleanly: no temp world left
    limits = limits_from_env() if enqueued_token_limits is None else enqueued_token_limits
    emulator = Emulator(root, timing or timing_from_env(), fail_rate, models=models or models_from_env(),
                        enqueued_token_limits=limits)
    server = EmulatorServer(emulator, host, port, latency, require_auth, log_stream=sys.stderr,
                            owns_emulator=True, auth=auth, prefix=prefix)
    where = f"world in {root}" if root is not None else "world in memory"
    if limits:
        where += "; enqueued-token limits: " + ", ".join(f"{m} {tokens:,}" for m, tokens in sorted(limits.items()))
    server.serve_forever(lambda url: print(f"batchplan sandbox listening on {url} ({where}); Ctrl-C to stop",
                                           flush=True))
