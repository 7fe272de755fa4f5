"""The sandbox's HTTP behaviour with no socket: auth, latency, faults, routes, the request log.

`EmulatorService.respond` is the one request dispatch. The sandbox has two doors
onto it, never two emulators: `EmulatorServer` (server.py) serves it on loopback
sockets, for other processes and for faults that need a real connection;
`EmulatorTransport` (transport.py) hands it httpx requests in this process.

Control requests (`/_sandbox/...`) are never delayed, faulted or logged: the log is
what clients did to the API.

A service can stand for another provider than OpenAI (see reconciler/providers.py): `auth`
says which header the key must come in (`bearer`: Authorization: Bearer KEY; `api-key`:
Azure OpenAI's api-key: KEY), and `prefix` where the API is served (`/v1`, or Azure's
`/openai/v1`). The headers that say who is asking are kept with each logged request.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from email.utils import formatdate
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TextIO

import orjson

from reconciler.sandbox.emulator import Emulator, EmulatorError
from reconciler.sandbox.faults import ArmedFault, DripStream, Fault, HugeListStream
from reconciler.sandbox.routes import (API_ROUTES, CONTROL_ROUTES, Reply, Request, Route, error_reply, json_reply,
                                       route)


class LoggedRequest(NamedTuple):
    method: str
    path: str
    status: int | str  # "dropped" when the client got no answer


# The request headers kept in the log (lower case): how the client authenticated and for whom.
LOGGED_HEADERS = ("authorization", "api-key", "openai-project", "openai-organization")
API_PREFIX = "/v1"  # where the routes are (routes.py); a service under another prefix maps it here


class TimedRequest(NamedTuple):
    """A logged request with when it arrived and when it was answered (time.monotonic())."""

    arrived: float
    answered: float
    request: LoggedRequest


class EmulatorService:
    """An `Emulator` behind HTTP semantics, with latency, faults and a request log.

    `requests` lists `(method, path, status)` for every API request, "dropped" as the
    status when no answer was sent. Thread safe: each door calls `respond` from the
    thread that handles the request.
    """

    def __init__(self, emulator: Emulator, latency: float = 0.0, require_auth: bool = True, *,
                 log_stream: TextIO | None = None, owns_emulator: bool = False, auth: str = "bearer",
                 prefix: str = API_PREFIX):
        self.emulator = emulator
        self.latency = latency
        self.require_auth = require_auth
        self.auth = auth  # "bearer" or "api-key": the header a key must come in
        self.prefix = "/" + prefix.strip("/")
        self.log_stream = log_stream
        self.owns_emulator = owns_emulator  # closing the door also closes the emulator
        self._lock = threading.Lock()
        self._log: list[LoggedRequest] = []
        self._headers: list[dict[str, str]] = []  # LOGGED_HEADERS of each logged request
        self._times: list[tuple[float, float]] = []  # (arrived, answered), one per log entry
        self._in_flight = 0  # API requests being handled right now
        self._faults: list[ArmedFault] = []
        self._release = threading.Event()  # set by release_held: what `hold` faults wait for

    @property
    def is_open(self) -> bool:
        """Whether the door still answers; a request that stalled past its closing is dropped."""
        return True

    # faults and log

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(ArmedFault(fault))

    def set_faults(self, faults: list[Fault]) -> None:
        with self._lock:
            self._faults = [ArmedFault(f) for f in faults]

    def clear_faults(self) -> None:
        self.set_faults([])

    def release_held(self) -> None:
        """Let every request a `hold` fault holds now go on: each is done and answered (to a
        client that has most likely given up); requests held from here on wait for the next call."""
        with self._lock:
            gate, self._release = self._release, threading.Event()
        gate.set()

    def fault_status(self) -> list[dict]:
        with self._lock:
            return [{**armed.fault.model_dump(), "seen": armed.seen, "fired": armed.fired}
                    for armed in self._faults]

    def _fault_for(self, method: str, path: str) -> tuple[Fault, int] | None:
        """The first fault (in order added) that fires on this request, and how often it has fired
        (this time included); later ones never see the request."""
        with self._lock:
            for armed in self._faults:
                if armed.trigger(method, path):
                    return armed.fault, armed.fired
        return None

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def headers(self) -> list[tuple[LoggedRequest, dict[str, str]]]:
        """Each logged request with the headers that say who asked (LOGGED_HEADERS present, lower case)."""
        with self._lock:
            return list(zip(self._log, self._headers))

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
            self._headers.clear()

    def _record(self, method: str, path: str, status: int | str, started: float, headers: Any = None) -> None:
        # Recorded before the answer is written, so a client that has its answer sees it logged.
        with self._lock:
            self._log.append(LoggedRequest(method, path, status))
            self._times.append((started, time.monotonic()))
            self._headers.append({name: headers.get(name) for name in LOGGED_HEADERS
                                  if headers is not None and headers.get(name) is not None})
        if self.log_stream is not None:
            elapsed = (time.monotonic() - started) * 1000
            print(f"{method} {path} {status} {elapsed:.0f}ms", file=self.log_stream, flush=True)

    # one request

    def respond(self, req: Request) -> Reply | None:
        """The reply to send, or None when a fault loses it (the door hangs up without an answer).

        Blocks for latency and stalls. The body is read to its end before this returns;
        ConnectionError means the client went away (or the door closed mid-stall) and
        nothing is logged. The caller sends the reply and closes it.
        """
        if req.path.startswith("/_sandbox/"):
            return _drained(req, self._dispatch(CONTROL_ROUTES, req))
        started = time.monotonic()
        with self._counted_in_flight():
            reply = _drained(req, self._api_reply(req))
            self._record(req.method, req.path, "dropped" if reply is None else reply.status, started, req.headers)
        if reply is not None:  # the server's clock, skew and all, as the real API's Date header says it
            reply.headers.setdefault("Date", formatdate(self.emulator.clock(), usegmt=True))
        return reply

    @contextmanager
    def _counted_in_flight(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def _api_reply(self, req: Request) -> Reply | None:
        if self.latency:
            time.sleep(self.latency)
        if self.require_auth and not _authorized(req.headers, self.auth):
            return error_reply(_unauthorized(self.auth))
        routed = self._routed(req)
        if routed is None:
            return error_reply(EmulatorError(404, f"Invalid URL ({req.method} {req.path})."))
        req = routed
        fired = self._fault_for(req.method, req.path)
        if fired is None:
            return self._dispatch(API_ROUTES, req)
        fault, times = fired
        if fault.action == "reject":
            return error_reply(fault.error(429), fault.retry_headers())
        if fault.action == "not_found":
            return error_reply(fault.error(404))
        if fault.action in ("stall", "hold"):
            self._wait_out(fault)
            if not self.is_open:  # closed while we slept: the world may be gone
                raise ConnectionAbortedError("the sandbox closed while a request stalled")
        if fault.action == "endless_pages":
            req.query.pop("after", None)  # a server that ignores the cursor
        reply = self._dispatch(API_ROUTES, req)  # the request is done, whatever the client hears
        if fault.action == "error_after_commit":
            reply.close()
            return error_reply(fault.error(500))
        if fault.action == "drop_after_commit" or fault.then == "drop":
            reply.close()
            return None
        return _misbehaving(fault, times, reply)

    def _routed(self, req: Request) -> Request | None:
        """The request with this service's prefix mapped to the routes' `/v1`; None when outside it."""
        if self.prefix == API_PREFIX:
            return req
        if req.path != self.prefix and not req.path.startswith(self.prefix + "/"):
            return None
        return dataclasses.replace(req, path=API_PREFIX + req.path[len(self.prefix):])

    def _wait_out(self, fault: Fault) -> None:
        if fault.action == "stall":
            time.sleep(fault.seconds)
            return
        with self._lock:
            gate = self._release
        gate.wait(fault.seconds or None)

    def _dispatch(self, routes: list[Route], req: Request) -> Reply:
        try:
            return route(routes, self, req)
        except EmulatorError as exc:
            return error_reply(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:  # a bug in the sandbox: say so like the API would, and show it
            traceback.print_exc()
            return error_reply(EmulatorError(500, "The sandbox failed on this request (see its stderr).",
                                             type="server_error"))


def _misbehaving(fault: Fault, fired: int, reply: Reply) -> Reply:
    """The answer of an `endless_pages`, `drip`, `huge_body` or `damage` fault, made from the real `reply`."""
    if fault.action == "huge_body":
        reply.close()
        return Reply(200, stream=HugeListStream(fault.size), stream_size=max(fault.size, HugeListStream.SMALLEST))
    if fault.action == "drip":
        body = b"".join(reply.chunks())
        reply.close()
        return Reply(reply.status, content_type=reply.content_type, stream=DripStream(body, fault.seconds),
                     stream_size=len(body))
    if fault.action in ("endless_pages", "damage") and reply.stream is None:
        return json_reply(fault.rewrite(orjson.loads(reply.body), fired), reply.status, reply.headers)
    return reply


def _drained(req: Request, reply: Reply | None) -> Reply | None:
    """Read what is left of the body, so the next request on this connection starts clean."""
    try:
        req.body.drain()
    except BaseException:
        if reply is not None:
            reply.close()
        raise
    return reply


def _authorized(headers: Any, auth: str = "bearer") -> bool:
    if auth == "api-key":  # as Azure OpenAI takes a key: its own header, no scheme
        return bool((headers.get("api-key") or "").strip())
    scheme, _, key = headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(key.strip())


def _unauthorized(auth: str = "bearer") -> EmulatorError:
    if auth == "api-key":
        return EmulatorError(401, "Access denied due to missing subscription key. Make sure to include "
                                  "subscription key when making requests to an API (header api-key).")
    return EmulatorError(401, "You didn't provide an API key. You need to provide your API key in an "
                              "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
