"""The sandbox in this process: an httpx transport in front of EmulatorService.

`httpx.AsyncClient(transport=EmulatorTransport(emulator))` talks to the emulator with
no socket and no port; `--sandbox` and most tests go this way. It is the same
service the socket server fronts (service.py), so auth, latency, faults and the
request log behave alike, and a client sees what a socket would give it:

- each request body is spooled (in memory up to 1 MiB, then to a temp file), so an
  upload of any size is streamed, and answered on a worker thread like the socket
  server's: latency and stalls never block the event loop;
- the client's read timeout holds as on a socket: an answer later than it raises
  httpx.ReadTimeout, while the request itself still lands;
- an answer a fault drops raises httpx.RemoteProtocolError, as a hang-up does;
- a download streams from the emulator's file in 1 MiB pieces.

Requests are answered on the client loop's default executor, which the loop waits for
when it closes; pass `executor` to answer on a pool of the test's own instead, so that
a request still held or stalled outlives the client that sent it (as on a real server).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path
from typing import IO

from reconciler.sandbox.capacity import limits_from_env
from reconciler.sandbox.emulator import Emulator, Timing, timing_from_env
from reconciler.sandbox.models import models_from_env
from reconciler.sandbox.routes import CHUNK, Body, Reply, Request
from reconciler.sandbox.service import EmulatorService
from reconciler.startup import httpx


class EmulatorTransport(EmulatorService, httpx.AsyncBaseTransport):
    """An EmulatorService as an httpx transport (see EmulatorService for the log and faults).

    Closing a client closes its transport: that closes the emulator only when this
    transport owns it, so one transport can serve many clients in turn (tests do).
    """

    # A base URL for clients of this transport. Nothing listens there: requests never
    # leave the process. Loopback, so batchplan's check for keys sent in clear passes.
    url = "http://localhost/v1"

    def __init__(self, emulator: Emulator, latency: float = 0.0, require_auth: bool = True, *,
                 owns_emulator: bool = False, executor: Executor | None = None):
        super().__init__(emulator, latency, require_auth, owns_emulator=owns_emulator)
        self._closed = False
        self.executor = executor  # None: the client loop's default one

    @property
    def is_open(self) -> bool:
        return not self._closed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        spool, length = await _spool(request.stream)
        req = Request.of(request.method, request.url.raw_path.decode("ascii"), request.headers,
                         Body(spool, length))
        answer = asyncio.get_running_loop().run_in_executor(self.executor, self._respond_and_close, req, spool)
        reply = await _in_time(answer, request)
        if reply is None:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(reply.status, headers=reply.wire_headers(), stream=_ReplyStream(reply),
                              request=request)

    def _respond_and_close(self, req: Request, spool: IO[bytes]) -> Reply | None:
        with spool:
            return self.respond(req)

    async def aclose(self) -> None:
        if self.owns_emulator and not self._closed:
            self._closed = True
            self.emulator.close()


def open_sandbox(root: Path, timing: Timing | None = None) -> EmulatorTransport:
    """The `--sandbox` emulator in this process, its world persisted under `root` (no key needed),
    with the enqueued-token limits BATCHPLAN_SANDBOX_LIMITS sets.

    The client that uses it closes it.
    """
    emulator = Emulator(root, timing or timing_from_env(), models=models_from_env(),
                        enqueued_token_limits=limits_from_env())
    return EmulatorTransport(emulator, require_auth=False, owns_emulator=True)


async def _spool(stream: httpx.AsyncByteStream) -> tuple[IO[bytes], int]:
    spool = tempfile.SpooledTemporaryFile(max_size=CHUNK)
    async for chunk in stream:
        spool.write(chunk)
    length = spool.tell()
    spool.seek(0)
    return spool, length


async def _in_time(answer: asyncio.Future, request: httpx.Request) -> Reply | None:
    """The answer, waited for as long as the client's read timeout; the work goes on regardless."""
    try:
        return await asyncio.wait_for(asyncio.shield(answer), (request.extensions.get("timeout") or {}).get("read"))
    except BaseException as exc:
        answer.add_done_callback(_close_late_reply)  # nobody will stream it, whenever it comes
        if isinstance(exc, asyncio.TimeoutError):
            raise httpx.ReadTimeout("the sandbox did not answer within the read timeout", request=request) from None
        if isinstance(exc, ConnectionError):
            raise httpx.ReadError(str(exc), request=request) from exc
        raise


def _close_late_reply(answer: asyncio.Future) -> None:
    if not answer.cancelled() and answer.exception() is None and answer.result() is not None:
        answer.result().close()


class _ReplyStream(httpx.AsyncByteStream):
    def __init__(self, reply: Reply):
        self.reply = reply

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.reply.chunks():
            yield chunk

    async def aclose(self) -> None:
        self.reply.close()
