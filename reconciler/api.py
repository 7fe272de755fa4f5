"""The Files + Batches API client: async httpx, bounded concurrency, careful retries.

Every request goes through one retry loop (`_request`). Reads, lists, cancels and
downloads are retried on 429, 408/409, 5xx and connection errors, with exponential
backoff and jitter, honouring `Retry-After` and `retry-after-ms`, bounded in count and
in time. A 429 pauses every request of this client, not only its own.

Creates (of batches and uploads) are never blindly retried: once a create may have
reached the server (a timeout, a dropped connection, a 5xx), it raises AmbiguousWrite
and the caller looks for the result on the server before trying again. Once `stopping`
is set (Ctrl-C, SIGTERM), no new create is sent: one still waiting for a connection
slot, a pause or a retry raises Interrupted, so the caller knows it was never sent.

The network is an httpx transport: real HTTP by default, or one the caller hands in
(`Api(transport=...)`; the sandbox's EmulatorTransport runs the emulator in process).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from . import __version__, feedback
from .errors import AmbiguousWrite, ApiError, ConfigError, Interrupted, NotFound, TransportError
from .startup import httpx

T = TypeVar("T")

# Tests set this to run every Api of the current context (a whole CLI run, say) against an
# in-process transport such as sandbox.EmulatorTransport; an Api given a transport ignores it.
TEST_TRANSPORT: ContextVar[httpx.AsyncBaseTransport | None] = ContextVar("TEST_TRANSPORT", default=None)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def check_base_url(base_url: str, allow_insecure: bool = False, source: str = "OPENAI_BASE_URL") -> str:
    """Refuse plain http to anything but loopback: the API key would travel in clear.

    `source` names where the URL was given (the variable, or a provider's base_url), for the message."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{source}={base_url!r} is not an http(s) URL")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"{source}={base_url!r} uses plain http to a host that is not this machine, so the "
            "API key would travel in clear; use https, or pass --allow-insecure-http if you really mean it")
    return base_url.rstrip("/")


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


def _api_error(response: httpx.Response, what: str) -> ApiError:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = error.get("message") or response.reason_phrase or "no message"
    cls = NotFound if response.status_code == 404 else ApiError
    return cls(response.status_code, message, type=error.get("type"), param=error.get("param"),
               code=error.get("code"), request=what)


def _auth_header(style: str, api_key: str) -> dict[str, str]:
    return {"api-key": api_key} if style == "api-key" else {"Authorization": f"Bearer {api_key}"}


async def _read_whole(response: httpx.Response) -> httpx.Response:
    await response.aread()
    return response


class Api:
    """One client per command run. Use as `async with Api(...) as api:`.

    `transport` replaces the network (the in-process sandbox, a test's); when None, the
    TEST_TRANSPORT of the current context, else real HTTP. `auth` is how the key is sent:
    `bearer` (Authorization: Bearer KEY, OpenAI's) or `api-key` (api-key: KEY, Azure OpenAI's);
    `headers` go with every request (OpenAI-Project, OpenAI-Organization).
    """

    def __init__(self, base_url: str, api_key: str, *, parallelism: int = 16, timeout: float = 60.0,
                 max_retries: int = 5, max_retry_seconds: float = 120.0, backoff: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None, auth: str = "bearer",
                 headers: dict[str, str] | None = None):
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_seconds = max_retry_seconds
        self.backoff = backoff
        self.calls: Counter[str] = Counter()  # "POST /batches" -> attempts sent
        self._slots = asyncio.Semaphore(parallelism)
        self._paused_until = 0.0
        self.stopping = asyncio.Event()  # set: send no new create
        self._client = httpx.AsyncClient(
            base_url=base_url + "/",
            headers={**(headers or {}), **_auth_header(auth, api_key), "User-Agent": f"batchplan/{__version__}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=parallelism, max_keepalive_connections=parallelism),
            transport=transport or TEST_TRANSPORT.get(),
            trust_env=False,
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    # -- the one place requests are sent -------------------------------------------------

    def _delay(self, attempt: int, asked: float | None) -> float:
        if asked is not None:
            return asked
        return random.uniform(0, min(8.0, self.backoff * 2 ** attempt))  # full jitter

    async def _pause(self) -> None:
        while (wait := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def _request(self, method: str, path: str, *, write: bool = False,
                       retry_statuses: frozenset[int] = RETRY_STATUSES,
                       body: Callable[[], dict] | None = None,
                       receive: Callable[[httpx.Response], Awaitable[T]] = _read_whole, **kwargs) -> T:
        """Send one request, retrying what is safe to retry; `write` marks a create.

        `receive` takes a successful answer as it streams in (by default it reads it whole);
        a connection lost while it runs is retried like one lost before the answer.
        """
        what = f"{method} {_route(path)}"
        started = time.monotonic()
        for attempt in range(self.max_retries + 1):
            asked = None
            try:
                async with self._slots:
                    await self._pause()  # in the slot: a 429 that came while we queued holds us too
                    if write and self.stopping.is_set():
                        raise Interrupted(f"{what}: not sent, apply is stopping")
                    self.calls[what] += 1
                    async with self._client.stream(method, path, **(body() if body else {}), **kwargs) as response:
                        if response.is_success:
                            return await receive(response)
                        await response.aread()
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure: ApiError | TransportError = TransportError(
                    f"{what}: cannot reach {self.base_url}: {exc or type(exc).__name__}")
                failure.__cause__ = exc
                why = "connection refused" if isinstance(exc, httpx.ConnectError) else "cannot connect in time"
            except httpx.TransportError as exc:
                reason = f"{what}: no answer from {self.base_url} ({type(exc).__name__}: {exc})"
                if write:
                    raise AmbiguousWrite(0, reason + "; it may or may not have been done", request=what) from exc
                failure = TransportError(reason)
                failure.__cause__ = exc
                why = f"no answer ({type(exc).__name__})"
            else:
                failure = _api_error(response, what)
                if response.status_code not in retry_statuses:
                    raise failure
                if write and response.status_code != 429:  # 429: refused, so certainly not done
                    raise AmbiguousWrite(failure.status, failure.message, type=failure.type,
                                         param=failure.param, request=what) from failure
                asked = _retry_after(response)
                why = f"server answered {response.status_code}"
            delay = self._delay(attempt, asked)
            if isinstance(failure, ApiError) and failure.status == 429:  # everyone waits, not just us
                self._paused_until = max(self._paused_until, time.monotonic() + delay)
            if attempt == self.max_retries or time.monotonic() - started + delay > self.max_retry_seconds:
                raise failure
            _say_retry(what, why, delay, attempt + 1, self.max_retries)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, **kwargs) -> dict:
        response = await self._request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "the answer is not JSON", request=f"{method} /{path}") from exc
        if not isinstance(data, dict):
            raise ApiError(response.status_code, "the answer is not a JSON object", request=f"{method} /{path}")
        return data

    async def _pages(self, path: str, params: dict) -> AsyncIterator[dict]:
        """Every item of a list endpoint, one page request at a time (cursor: the last id seen)."""
        after = None
        while True:
            page = await self._json("GET", path, params={**params, **({"after": after} if after else {})})
            items = page.get("data") or []
            for item in items:
                yield item
            if not page.get("has_more") or not items:
                return
            after = items[-1]["id"]

    # -- batches -------------------------------------------------------------------------

    async def create_batch(self, params: dict) -> dict:
        return await self._json("POST", "batches", json=params, write=True)

    async def retrieve_batch(self, batch_id: str) -> dict:
        return await self._json("GET", f"batches/{batch_id}")

    async def cancel_batch(self, batch_id: str) -> dict:
        return await self._json("POST", f"batches/{batch_id}/cancel", retry_statuses=RETRY_STATUSES - {409})

    def iter_batches(self, page_size: int = 100) -> AsyncIterator[dict]:
        """Every batch in the account, newest first, one page request at a time."""
        return self._pages("batches", {"limit": page_size})

    # -- files ---------------------------------------------------------------------------

    async def list_files(self, purpose: str = "batch") -> list[dict]:
        return [file async for file in self._pages("files", {"purpose": purpose, "limit": 10_000})]

    async def upload_file(self, path: Path, filename: str) -> dict:
        """Upload streamed from disk (httpx reads the file in chunks as it sends)."""
        def body() -> dict:
            return {"files": {"file": (filename, path.open("rb"), "application/jsonl")},
                    "data": {"purpose": "batch"}}
        return await self._json("POST", "files", body=body, write=True)

    async def retrieve_file(self, file_id: str) -> dict:
        return await self._json("GET", f"files/{file_id}")

    async def delete_file(self, file_id: str) -> dict:
        return await self._json("DELETE", f"files/{file_id}")

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to `dest` atomically (temp + rename); returns the byte count.

        A connection lost mid-file is retried from the start, like any read.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")

        async def save(response: httpx.Response) -> int:
            size = 0
            total = int(response.headers.get("content-length") or 0)
            with tmp.open("wb") as fh, feedback.current().transfer(f"download {file_id}", total) as done:
                async for chunk in response.aiter_bytes(1 << 16):
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
