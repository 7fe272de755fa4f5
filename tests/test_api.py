"""The Api client's one retry loop, downloads included, against the fault-injecting socket server."""

from __future__ import annotations

import asyncio
import os

import pytest

from reconciler.api import Api
from reconciler.errors import ApiError
from reconciler.sandbox import Fault
from tests.helpers import KEY

CONTENT = b"".join(b'{"line": %d, "padding": "%s"}\n' % (i, b"x" * 200) for i in range(20_000))  # ~4.5 MB


def uploaded(server) -> str:
    return server.emulator.upload_bytes(CONTENT, "big.jsonl", "batch")["id"]


def api_for(server, **kwargs) -> Api:
    return Api(server.url, KEY, **{"backoff": 0.01, **kwargs})


def test_a_download_waits_as_long_as_a_429_asked_and_every_other_request_waits_too(emulator_server, tmp_path):
    file_id = uploaded(emulator_server)
    emulator_server.add_fault(Fault(action="reject", method="GET", path_regex="/content$", status=429,
                                    retry_after=0.4))
    dest = tmp_path / "out" / "file.jsonl"

    async def run() -> int:
        async with api_for(emulator_server) as api:
            async def look_meanwhile() -> dict:
                await asyncio.sleep(0.1)  # sent while the 429's pause holds
                return await api.retrieve_file(file_id)

            size, _ = await asyncio.gather(api.download_file(file_id, dest), look_meanwhile())
            assert api.calls["GET /files/{id}/content"] == 2
            return size

    assert asyncio.run(run()) == len(CONTENT) and dest.read_bytes() == CONTENT
    rejected, *later = emulator_server.timeline()
    assert rejected.request == ("GET", f"/v1/files/{file_id}/content", 429)
    assert sorted(t.request.path for t in later) == [f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"]
    assert all(t.arrived - rejected.answered >= 0.38 for t in later), later


def test_a_download_whose_answer_is_lost_is_retried_from_the_start(emulator_server, tmp_path):
    file_id = uploaded(emulator_server)
    emulator_server.add_fault(Fault(action="drop_after_commit", method="GET", path_regex="/content$"))
    dest = tmp_path / "file.jsonl"

    async def run() -> int:
        async with api_for(emulator_server) as api:
            return await api.download_file(file_id, dest)

    assert asyncio.run(run()) == len(CONTENT) and dest.read_bytes() == CONTENT
    assert [r.status for r in emulator_server.requests] == ["dropped", 200]
    assert os.listdir(tmp_path) == ["file.jsonl"]  # no part file left


def test_a_download_that_keeps_failing_shows_the_last_error_and_writes_nothing(emulator_server, tmp_path):
    file_id = uploaded(emulator_server)
    emulator_server.add_fault(Fault(action="reject", method="GET", path_regex="/content$", status=503, times=None))
    dest = tmp_path / "file.jsonl"

    async def run() -> int:
        async with api_for(emulator_server, max_retries=2) as api:
            return await api.download_file(file_id, dest)

    with pytest.raises(ApiError, match=r"GET /files/\{id\}/content: server answered 503"):
        asyncio.run(run())
    assert emulator_server.count("GET") == 3 and os.listdir(tmp_path) == []


def test_a_deadline_that_fired_is_not_moved_and_the_request_times_out():
    """A body chunk that arrives after the whole-request deadline fired (the task is being cut off)
    does not move it: asyncio refuses to reschedule an expiring timeout ("Cannot change state of
    expiring Timeout"), and the request ends with the timeout, as apply expects."""
    from reconciler.api import _Deadline

    async def cut_off() -> None:
        async with asyncio.timeout(None) as scope:
            deadline = _Deadline(scope, 0.0, 0)
            scope.reschedule(asyncio.get_running_loop().time() - 1)
            try:
                await asyncio.sleep(0.01)
            finally:
                deadline._extend(1 << 16)  # what chunks() does with a piece that came late

    with pytest.raises(TimeoutError):
        asyncio.run(cut_off())
