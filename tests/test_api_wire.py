"""What the Api client puts on the wire: small uploads in one piece, JSON by orjson, HTTP/2 where it can be had."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import orjson

from reconciler.api import SMALL_UPLOAD, Api, http2_available
from tests.helpers import KEY

LINE = b'{"custom_id":"r-%d","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini"}}\n'


def jsonl(path: Path, size: int) -> Path:
    """A JSONL input of at least `size` bytes."""
    lines, total, i = [], 0, 0
    while total < size:
        lines.append(LINE % i)
        total, i = total + len(lines[-1]), i + 1
    path.write_bytes(b"".join(lines))
    return path


def test_small_and_large_uploads_reach_the_server_byte_for_byte(emulator_server, tmp_path):
    small, large = jsonl(tmp_path / "small.jsonl", 700), jsonl(tmp_path / "large.jsonl", SMALL_UPLOAD + 1)

    async def upload_both() -> list[dict]:
        async with Api(emulator_server.url, KEY) as api:
            return [await api.upload_file(path, path.name) for path in (small, large)]

    files = asyncio.run(upload_both())
    for path, file in zip((small, large), files):
        assert (file["filename"], file["bytes"]) == (path.name, path.stat().st_size)
        content, _ = emulator_server.emulator.open_content(file["id"])
        with content:
            assert content.read() == path.read_bytes()


class CountingPieces(httpx.AsyncBaseTransport):
    """A server that counts the pieces each upload's body streams in (httpx.MockTransport reads the
    body whole before its handler sees it, so it cannot tell)."""

    def __init__(self):
        self.pieces: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = [chunk async for chunk in request.stream]
        name = "small" if b"small.jsonl" in b"".join(body) else "large"
        self.pieces[name] = len(body)
        return httpx.Response(200, json={"id": f"file-{name}", "object": "file", "bytes": 1, "created_at": 1,
                                         "filename": f"{name}.jsonl", "purpose": "batch", "status": "processed"})


def test_a_small_upload_is_one_piece_of_body_and_a_large_one_streams(tmp_path):
    server = CountingPieces()
    small, large = jsonl(tmp_path / "small.jsonl", 700), jsonl(tmp_path / "large.jsonl", SMALL_UPLOAD + 1)

    async def upload_both() -> None:
        async with Api("http://127.0.0.1:9/v1", KEY, transport=server) as api:
            for path in (small, large):
                await api.upload_file(path, path.name)

    asyncio.run(upload_both())
    assert server.pieces["small"] == 1  # one socket write for the body
    assert server.pieces["large"] > 1  # streamed from disk: never held whole in memory


def test_a_create_is_sent_as_json_encoded_by_orjson():
    seen: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["Content-Type"], request.read()))
        return httpx.Response(200, json={"id": "batch_1", "object": "batch", "status": "validating",
                                         "created_at": 1, "endpoint": "/v1/embeddings", "input_file_id": "file-1",
                                         "completion_window": "24h"})

    params = {"input_file_id": "file-1", "endpoint": "/v1/embeddings", "completion_window": "24h",
              "metadata": {"team": "ünïcode"}}

    async def create() -> None:
        async with Api("http://127.0.0.1:9/v1", KEY, transport=httpx.MockTransport(handler)) as api:
            await api.create_batch(params)

    asyncio.run(create())
    assert seen == [("application/json", orjson.dumps(params))]


def test_http2_is_offered_to_https_servers_only_when_h2_is_installed(monkeypatch):
    async def offered(url: str, **kwargs) -> bool:
        async with Api(url, KEY, **kwargs) as api:
            return api.http2

    assert http2_available()  # the test extra installs h2, as the http2 extra does
    assert asyncio.run(offered("https://api.example.test/v1"))
    assert not asyncio.run(offered("http://127.0.0.1:9/v1"))  # plain http: no cleartext upgrade, no h2 import
    assert not asyncio.run(offered("https://api.example.test/v1", http2=False))
    assert not asyncio.run(offered("https://api.example.test/v1", transport=httpx.MockTransport(lambda r: None)))
    monkeypatch.setitem(sys.modules, "h2", None)  # as if the http2 extra were not installed
    assert not http2_available()
    assert not asyncio.run(offered("https://api.example.test/v1"))


def test_the_sandbox_server_on_loopback_is_spoken_to_in_http_1_1_even_with_h2_installed(emulator_server):
    async def list_files() -> Api:
        async with Api(emulator_server.url, KEY, http2=True) as api:
            await api.list_files()
            return api

    api = asyncio.run(list_files())
    assert dict(api.http_versions) == {"HTTP/1.1": 1}
