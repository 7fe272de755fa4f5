"""The Files + Batches API client: async httpx, bounded concurrency, careful retries.

Every request goes through one retry loop (`_request`). Reads, lists, cancels and
downloads are retried on 429, 408/409, 5xx and connection errors, with exponential
backoff and jitter, honouring `Retry-After` and `retry-after-ms`, bounded in count and
in time. A 429 pauses every request of this client, not only its own.

Every command ends in bounded time, whatever the server does: no single wait is longer
than `max_wait` (a server asking for longer gets a clear refusal, not a hang), and
`stopping` cuts any wait short; a request has a deadline for the whole of it (see
_Deadline), not only per read; a JSON answer is read up to MAX_JSON_BYTES; a list walk
stops on a repeated cursor and after `max_pages`. Every JSON answer is checked
(answers.py) before anyone reads it, so a `null` id is one clear BadAnswer.

Creates (of batches and uploads) are never blindly retried: once a create may have
reached the server (a timeout, a dropped connection, a 5xx), it raises AmbiguousWrite
and the caller looks for the result on the server before trying again. Once `stopping`
is set (Ctrl-C, SIGTERM), no new create is sent: one still waiting for a connection
slot, a pause or a retry raises Interrupted, so the caller knows it was never sent
(and so does a read that would wait).

The network is an httpx transport: real HTTP by default, or one the caller hands in
(`Api(transport=...)`; the sandbox's EmulatorTransport runs the emulator in process).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

import orjson

from . import __version__, feedback
from .answers import checked, checked_page
from .errors import AmbiguousWrite, ApiError, BadAnswer, ConfigError, Interrupted, NotFound, TransportError
from .startup import httpx

T = TypeVar("T")

# Tests set this to run every Api of the current context (a whole CLI run, say) against an
# in-process transport such as sandbox.EmulatorTransport; an Api given a transport ignores it.
TEST_TRANSPORT: ContextVar[httpx.AsyncBaseTransport | None] = ContextVar("TEST_TRANSPORT", default=None)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_MAX_WAIT = 60.0  # seconds: the longest single wait (a backoff, a Retry-After); `max_wait:` in batchplan.yaml
MAX_JSON_BYTES = 32 << 20  # the largest JSON answer read: 10,000 files listed are about 3 MB
MAX_PAGES = 10_000  # pages of one list walk: 1,000,000 batches at 100 a page
UPLOAD_PIECE = 1 << 20  # bytes of a file read and sent at a time (see _multipart_upload)
MIN_RATE = 16 << 10  # bytes per second a request's body and answer must average, past its timeout
SMALL_UPLOAD = 1 << 20  # bytes: an upload up to this size is read whole and sent as one body (_multipart_upload)


def http2_available() -> bool:
    """Whether this install can speak HTTP/2: h2 is installed (`pip install 'batchplan-openai[http2]'`).

    Found without importing it, so a command that never connects pays nothing. httpx then offers
    HTTP/2 in the TLS handshake (ALPN) and uses it where the server accepts it, else HTTP/1.1;
    plain http stays HTTP/1.1 (no cleartext upgrade), so a loopback proxy or sandbox is unaffected.
    One HTTP/2 connection carries every concurrent request, which costs the client less CPU per
    request than a pool of HTTP/1.1 connections (bench/README.md)."""
    return importlib.util.find_spec("h2") is not None


def check_base_url(base_url: str, allow_insecure: bool = False, source: str = "OPENAI_BASE_URL") -> str:
    """Refuse plain http to anything but loopback: the API key would travel in clear.

    `source` names where the URL was given (the variable, or a provider's base_url), for the message."""
    parts = urlsplit(base_url)
    shown = masked_url(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}={shown!r} is not an http(s) URL")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"{source}={shown!r} uses plain http to a host that is not this machine, so the "
            "API key would travel in clear; use https, or pass --allow-insecure-http if you really mean it")
    return base_url.rstrip("/")


def masked_url(url: str) -> str:
    """The URL with its user and password (`http://user:secret@host`) shown as ***, as the key is never shown."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that could not be parsed)"
    userinfo, at, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"***@{host}").geturl() if at else url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait, from retry-after-ms or Retry-After."""
    ms = response.headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _say_retry(what: str, why: str, delay: float, retry: int, retries: int) -> None:
    """One line per retry, instead of seconds of silence: `GET /batches: connection refused; retrying in 2 s, 2 of 5`."""
    feedback.current().notice(f"{what}: {why}; retrying in {round(delay, 1):g} s, {retry} of {retries}")


def _route(path: str) -> str:
    """`batches/batch_abc/cancel` -> `/batches/{id}/cancel`: one counter per kind of call."""
    parts = path.split("?")[0].split("/")
    return "/" + "/".join("{id}" if i == 1 else part for i, part in enumerate(parts))


def _api_error(response: httpx.Response, body: bytes, what: str) -> ApiError:
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):  # not JSON, or JSON that is not an object
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = error.get("message") or response.reason_phrase or "no message"
    cls = NotFound if response.status_code == 404 else ApiError
    return cls(response.status_code, message, type=error.get("type"), param=error.get("param"),
               code=error.get("code"), request=what)


def _auth_header(style: str, api_key: str) -> dict[str, str]:
    return {"api-key": api_key} if style == "api-key" else {"Authorization": f"Bearer {api_key}"}


class _Deadline:
    """The whole request's time budget: `timeout` seconds, plus the time its bytes need at MIN_RATE.

    httpx's timeout holds per read, so a server that drips a byte a second never trips it;
    this ends the request once it is over budget however the bytes trickle, while a big
    upload or download that keeps moving gets the time it needs.
    """

    def __init__(self, scope: asyncio.Timeout, timeout: float, sending: int):
        self.scope = scope
        self.start = asyncio.get_running_loop().time()
        self.timeout = timeout
        self.sending = sending
        self._extend(0)

    def _extend(self, received: int) -> None:
        if self.scope.expired():  # it fired (the request is being cut off): asyncio refuses a reschedule now
            return
        self.scope.reschedule(self.start + self.timeout + (self.sending + received) / MIN_RATE)

    async def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The answer's body (decoded), each piece moving the deadline by the time it earned."""
        received = 0
        async for chunk in response.aiter_bytes(1 << 16):
            received += len(chunk)
            self._extend(received)
            yield chunk


async def _read_capped(response: httpx.Response, body: AsyncIterator[bytes], what: str) -> bytes:
    """The whole answer, refused past MAX_JSON_BYTES: a JSON answer is never read without bound."""
    too_big = BadAnswer(what, f"the answer is larger than {MAX_JSON_BYTES >> 20} MB, more than batchplan reads for "
                              "one JSON answer; stopped reading (is OPENAI_BASE_URL an OpenAI-compatible API?)",
                        response.status_code)
    if int(response.headers.get("content-length") or 0) > MAX_JSON_BYTES:
        raise too_big
    parts, size = [], 0
    async for chunk in body:
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class _Failure:
    """An attempt that may be tried again: what to raise if not, the words of the retry line, the asked wait."""

    error: ApiError | TransportError
    why: str
    asked: float | None = None


class Api:
    """One client per command run. Use as `async with Api(...) as api:`.

    `transport` replaces the network (the in-process sandbox, a test's); when None, the
    TEST_TRANSPORT of the current context, else real HTTP. `max_wait` caps every single
    wait (a backoff, a Retry-After, a 429's pause); `max_pages` a list walk. `auth` is how the
    key is sent: `bearer` (Authorization: Bearer KEY, OpenAI's) or `api-key` (api-key: KEY,
    Azure OpenAI's); `headers` go with every request (OpenAI-Project, OpenAI-Organization).
    `http2`: offer HTTP/2 to an https server (None: when h2 is installed, see http2_available).
    """

    def __init__(self, base_url: str, api_key: str, *, parallelism: int = 16, timeout: float = 60.0,
                 max_retries: int = 5, max_retry_seconds: float = 120.0, backoff: float = 0.5,
                 max_wait: float = DEFAULT_MAX_WAIT, max_pages: int = MAX_PAGES,
                 transport: httpx.AsyncBaseTransport | None = None, auth: str = "bearer",
                 headers: dict[str, str] | None = None, http2: bool | None = None):
        self.base_url = base_url
        self.shown_url = masked_url(base_url)  # what messages say: never the user and password in it
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_seconds = max_retry_seconds
        self.backoff = backoff
        self.max_wait = max_wait
        self.max_pages = max_pages
        self.calls: Counter[str] = Counter()  # "POST /batches" -> attempts sent
        self.http_versions: Counter[str] = Counter()  # "HTTP/1.1", "HTTP/2" -> answers received
        # only where it can be negotiated (TLS, over the network): elsewhere it would only cost h2's import
        transport = transport or TEST_TRANSPORT.get()
        self.http2 = (http2_available() if http2 is None else http2) and transport is None \
            and base_url.startswith("https://")
        self._slots = asyncio.Semaphore(parallelism)
        self._paused_until = 0.0
        self.stopping = asyncio.Event()  # set: send no new create, wait for nothing, list no further
        self._client = httpx.AsyncClient(
            base_url=base_url + "/",
            headers={**(headers or {}), **_auth_header(auth, api_key), "User-Agent": f"batchplan/{__version__}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=parallelism, max_keepalive_connections=parallelism),
            transport=transport,
            trust_env=False,
            http2=self.http2,
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    # -- waiting: every wait is capped, and stopping cuts it short -------------------------

    def _delay(self, attempt: int, asked: float | None) -> float:
        if asked is not None:
            return asked
        return random.uniform(0, min(8.0, self.backoff * 2 ** attempt))  # full jitter

    async def _sleep(self, seconds: float, what: str) -> None:
        """Wait `seconds`, but raise Interrupted at once when the command is stopping (Ctrl-C, SIGTERM)."""
        if seconds > 0 and not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), seconds)
            except TimeoutError:
                return
        if self.stopping.is_set():
            raise Interrupted(f"{what}: not sent, batchplan is stopping")

    async def _pause(self, what: str) -> None:
        while (wait := self._paused_until - time.monotonic()) > 0:
            await self._sleep(wait, what)

    def _too_long(self, failure: _Failure, what: str) -> ApiError:
        """A server that asks for a longer wait than `max_wait`: give up now rather than hang."""
        status = failure.error.status if isinstance(failure.error, ApiError) else 0
        return ApiError(status, f"asked to wait {failure.asked:g} s before trying again (Retry-After), "
                                f"longer than batchplan waits ({self.max_wait:g} s, `max_wait:` in batchplan.yaml); "
                                "nothing more was sent. Try again later", request=what)

    def _describe(self, exc: Exception) -> str:
        """What went wrong with a connection, in words even when httpx gives none (a timeout has none)."""
        if isinstance(exc, httpx.ConnectTimeout):
            return f"the connection timed out after {min(self.timeout, 10.0):g} s"
        if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
            return f"the request timed out after {self.timeout:g} s (`timeout:` in batchplan.yaml)"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    # -- the one place requests are sent -------------------------------------------------

    async def _request(self, method: str, path: str, *, write: bool = False,
                       retry_statuses: frozenset[int] = RETRY_STATUSES,
                       body: Callable[[], dict] | None = None, sending: int = 0,
                       receive: Callable[[httpx.Response, AsyncIterator[bytes]], Awaitable[T]] | None = None,
                       **kwargs) -> T:
        """Send one request, retrying what is safe to retry; `write` marks a create.

        `receive(response, body)` takes a successful answer as it streams in (by default the
        JSON answer is read whole, up to MAX_JSON_BYTES); a connection lost while it runs is
        retried like one lost before the answer. `sending`: the bytes of the request body,
        which earn the request more time (see _Deadline).
        """
        what = f"{method} {_route(path)}"
        started = time.monotonic()
        for attempt in range(self.max_retries + 1):
            outcome = await self._attempt(method, path, what, write, retry_statuses, body, sending,
                                          receive or (lambda response, chunks: _read_capped(response, chunks, what)),
                                          kwargs)
            if not isinstance(outcome, _Failure):
                return outcome
            delay = self._delay(attempt, outcome.asked)
            if delay > self.max_wait:
                raise self._too_long(outcome, what) from outcome.error
            if isinstance(outcome.error, ApiError) and outcome.error.status == 429:  # everyone waits, not just us
                self._paused_until = max(self._paused_until, time.monotonic() + delay)
            if attempt == self.max_retries or time.monotonic() - started + delay > self.max_retry_seconds:
                raise outcome.error
            _say_retry(what, outcome.why, delay, attempt + 1, self.max_retries)
            await self._sleep(delay, what)
        raise AssertionError("unreachable")

    async def _attempt(self, method: str, path: str, what: str, write: bool, retry_statuses: frozenset[int],
                       body: Callable[[], dict] | None, sending: int, receive: Callable, kwargs: dict):
        """One attempt: the answer `receive` made of it, or a _Failure that may be retried."""
        try:
            async with self._slots:
                await self._pause(what)  # in the slot: a 429 that came while we queued holds us too
                if write and self.stopping.is_set():
                    raise Interrupted(f"{what}: not sent, apply is stopping")
                self.calls[what] += 1
                async with asyncio.timeout(None) as scope:
                    deadline = _Deadline(scope, self.timeout, sending)
                    async with self._client.stream(method, path, **(body() if body else {}), **kwargs) as response:
                        self.http_versions[response.http_version] += 1
                        if response.is_success:
                            return await receive(response, deadline.chunks(response))
                        failure = _api_error(response, await _read_capped(response, deadline.chunks(response), what),
                                             what)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = TransportError(f"{what}: cannot reach {self.shown_url}: {self._describe(exc)}")
            error.__cause__ = exc
            return _Failure(error, "connection refused" if isinstance(exc, httpx.ConnectError)
                            else "cannot connect in time")
        except (httpx.TransportError, TimeoutError) as exc:  # TimeoutError: the whole request's deadline
            reason = f"{what}: no answer from {self.shown_url} ({self._describe(exc)})"
            if write:
                raise AmbiguousWrite(0, reason + "; it may or may not have been done", request=what) from exc
            error = TransportError(reason)
            error.__cause__ = exc
            return _Failure(error, f"no answer ({type(exc).__name__})")
        if response.status_code not in retry_statuses:
            raise failure
        if write and response.status_code != 429:  # 429: refused, so certainly not done
            raise AmbiguousWrite(failure.status, failure.message, type=failure.type,
                                 param=failure.param, request=what) from failure
        return _Failure(failure, f"server answered {response.status_code}", _retry_after(response))

    async def _json(self, method: str, path: str, **kwargs) -> dict:
        what = f"{method} {_route(path)}"
        raw = await self._request(method, path, **kwargs)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadAnswer(what, "the answer is not JSON") from exc
        if not isinstance(data, dict):
            raise BadAnswer(what, "the answer is not a JSON object")
        return data

    async def _pages(self, path: str, params: dict, kind: str) -> AsyncIterator[dict]:
        """Every item of a list endpoint, one page request at a time (cursor: the last id seen).

        A server that ignores the cursor (the same last id again) or never stops saying
        `has_more` is stopped, at max_pages, with a BadAnswer; so is the walk when the
        command is stopping."""
        what = f"GET /{path}"
        after, cursors = None, set()
        for _ in range(self.max_pages):
            if self.stopping.is_set():
                raise Interrupted(f"{what}: stopped listing, batchplan is stopping")
            page = await self._json("GET", path, params={**params, **({"after": after} if after else {})})
            items, more = checked_page(page, kind, what)
            for item in items:
                yield item
            if not more or not items:
                return
            after = items[-1]["id"]
            if after in cursors:
                raise BadAnswer(what, f"a page ended with {after!r} again: the server ignores `after` and would "
                                      "list the same items forever; stopped listing")
            cursors.add(after)
        raise BadAnswer(what, f"still more after {self.max_pages:,} pages; stopped listing (a server that never "
                              "stops saying has_more)")

    # -- batches -------------------------------------------------------------------------

    async def create_batch(self, params: dict) -> dict:
        return checked(await self._json("POST", "batches", body=lambda: _json_body(params), write=True),
                       "batch", "POST /batches")

    async def retrieve_batch(self, batch_id: str) -> dict:
        return checked(await self._json("GET", f"batches/{batch_id}"), "batch", "GET /batches/{id}")

    async def cancel_batch(self, batch_id: str) -> dict:
        answer = await self._json("POST", f"batches/{batch_id}/cancel", retry_statuses=RETRY_STATUSES - {409})
        return checked(answer, "batch", "POST /batches/{id}/cancel")

    def iter_batches(self, page_size: int = 100) -> AsyncIterator[dict]:
        """Every batch in the account, newest first, one page request at a time."""
        return self._pages("batches", {"limit": page_size}, "batch")

    # -- files ---------------------------------------------------------------------------

    async def list_files(self, purpose: str = "batch") -> list[dict]:
        return [file async for file in self._pages("files", {"purpose": purpose, "limit": 10_000}, "file")]

    async def upload_file(self, path: Path, filename: str) -> dict:
        """Upload streamed from disk (httpx reads the file in chunks as it sends); one of up to
        SMALL_UPLOAD bytes is read whole and sent in one piece.

        Each attempt opens the file afresh and the one before is closed: a 429 retried five
        times leaves no file open."""
        opened: list[BinaryIO] = []
        size = _size(path)

        def body() -> dict:
            while opened:
                opened.pop().close()
            opened.append(path.open("rb"))
            return _multipart_upload(opened[0], size, filename, {"purpose": "batch"})

        try:
            answer = await self._json("POST", "files", body=body, sending=size, write=True)
        finally:
            while opened:
                opened.pop().close()
        return checked(answer, "file", "POST /files")

    async def retrieve_file(self, file_id: str) -> dict:
        return checked(await self._json("GET", f"files/{file_id}"), "file", "GET /files/{id}")

    async def delete_file(self, file_id: str) -> dict:
        return await self._json("DELETE", f"files/{file_id}")

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to `dest` atomically (temp + rename); returns the byte count.

        A connection lost mid-file is retried from the start, like any read.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")

        async def save(response: httpx.Response, chunks: AsyncIterator[bytes]) -> int:
            size = 0
            total = int(response.headers.get("content-length") or 0)
            with tmp.open("wb") as fh, feedback.current().transfer(f"download {file_id}", total) as done:
                async for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                    done(len(chunk))
            return size

        try:
            size = await self._request("GET", f"files/{file_id}/content", receive=save)
            os.replace(tmp, dest)
            return size
        finally:
            tmp.unlink(missing_ok=True)


def _json_body(params: dict) -> dict:
    """A JSON request body encoded by orjson, the codec every answer is read with (httpx's `json=`
    would use the json module)."""
    return {"content": orjson.dumps(params), "headers": {"Content-Type": "application/json"}}


def _multipart_upload(opened: BinaryIO, size: int, filename: str, fields: dict[str, str]) -> dict:
    """httpx.stream's keywords for a multipart/form-data body: `fields`, then the `file` part of `size`
    bytes read from `opened` UPLOAD_PIECE at a time. httpx's own encoder (`files=`) reads 64 KiB at a
    time, and each piece costs a trip through httpx, h11 and asyncio: a 1 GB input was 16,000 of them,
    with the client's CPU time half again what 1 MiB pieces take (bench/README.md, issue 10)."""
    boundary = os.urandom(16).hex()
    quoted = filename.replace("\\", "\\\\").replace('"', "%22")  # as httpx quotes a form parameter
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                   for name, value in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
             "Content-Type: application/jsonl\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n".encode()
    content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if size <= SMALL_UPLOAD:  # read whole (a verified source checks it) before anything is sent: one write
        return {"content": head.encode() + opened.read() + tail, "headers": content_type}

    async def pieces() -> AsyncIterator[bytes]:
        yield head.encode()
        # Read on the loop's thread: reading in a worker thread (asyncio.to_thread) cost more CPU
        # than it saved on two cores shared with the server (measured, issue 10).
        while piece := opened.read(UPLOAD_PIECE):
            yield piece
        yield tail

    return {"content": pieces(),
            "headers": {**content_type, "Content-Length": str(len(head.encode()) + size + len(tail))}}


def _size(path: Path) -> int:
    """The bytes an upload will send (0 when the file cannot be asked: opening it will say why);
    a source that is a part of a file (uploader.VerifiedSource) knows its own `size`."""
    if (size := getattr(path, "size", None)) is not None:
        return size
    try:
        return path.stat().st_size
    except OSError:
        return 0
