"""The sandbox's in-process door (EmulatorTransport): what a client sees matches the socket's.

Same emulator, same dispatch: uploads stream in, downloads stream out, the key is
checked, faults and the request log work, a late answer is a read timeout that still
lands, and a lost one is a hang-up.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from reconciler.api import Api
from reconciler.errors import AmbiguousWrite
from reconciler.sandbox import EmulatorServer, EmulatorTransport, Fault, Timing, open_sandbox
from tests.helpers import ENDPOINT, KEY, request_line, write_jsonl


def api_for(sandbox, **kwargs) -> Api:
    return Api(sandbox.url, KEY, transport=sandbox, **{"backoff": 0.01, **kwargs})


def batch_params(file_id: str) -> dict:
    return {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}


def test_an_upload_larger_than_the_spool_streams_in_and_its_results_stream_out(sandbox, tmp_path):
    """3 MB in (over the 1 MiB kept in memory) and an output file out, byte for byte."""
    path = write_jsonl(tmp_path / "in.jsonl", [request_line(f"r{i}", padding="x" * 1500) for i in range(2_200)])
    assert path.stat().st_size > 3 << 20

    async def run() -> bytes:
        async with api_for(sandbox) as api:
            file = await api.upload_file(path, "in.jsonl")
            batch = await api.create_batch(batch_params(file["id"]))
            while (batch := await api.retrieve_batch(batch["id"]))["status"] != "completed":
                await asyncio.sleep(0.05)
            size = await api.download_file(batch["output_file_id"], tmp_path / "out.jsonl")
            assert size == (tmp_path / "out.jsonl").stat().st_size
            return file["bytes"]

    assert asyncio.run(run()) == path.stat().st_size
    stream, _ = sandbox.emulator.open_content(sandbox.emulator.list_files(purpose="batch_output")["data"][0]["id"])
    with stream:
        assert (tmp_path / "out.jsonl").read_bytes() == stream.read()
    assert [(r.method, r.status) for r in sandbox.requests][:2] == [("POST", 200), ("POST", 200)]


def test_the_key_is_checked_and_control_requests_are_not_logged(sandbox):
    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=sandbox, base_url="http://localhost") as client:
            armed = await client.post("/_sandbox/faults", json=[{"action": "reject", "status": 503}])
            return armed, await client.get("/v1/batches")

    armed, refused = asyncio.run(run())
    assert armed.status_code == 200 and armed.json()["data"][0]["action"] == "reject"
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    assert sandbox.requests == [("GET", "/v1/batches", 401)]
    assert sandbox.fault_status()[0]["fired"] == 0  # no key: refused before any fault


@pytest.mark.parametrize("fault", [dict(action="stall", seconds=0.6), dict(action="drop_after_commit")],
                         ids=["late", "lost"])
def test_a_create_whose_answer_is_late_or_lost_is_ambiguous_and_still_lands(sandbox, fault):
    file_id = sandbox.emulator.upload_bytes(b'{"custom_id": "a"}\n', "in.jsonl", "batch")["id"]
    sandbox.add_fault(Fault(method="POST", path="/v1/batches", **fault))

    async def run() -> None:
        async with api_for(sandbox, timeout=0.2) as api:
            with pytest.raises(AmbiguousWrite, match="it may or may not have been done"):
                await api.create_batch(batch_params(file_id))

    asyncio.run(run())
    assert sandbox.wait_idle()
    assert len(sandbox.emulator.list_batches()["data"]) == 1


def test_a_held_create_outlives_its_client_and_lands_when_released(emulator_factory):
    """A `hold` fault on a transport with its own executor: the client times out and closes its loop
    at once (the default executor would wait for the held request); the batch appears only on release."""
    from concurrent.futures import ThreadPoolExecutor

    emulator = emulator_factory()
    file_id = emulator.upload_bytes(b'{"custom_id": "a"}\n', "in.jsonl", "batch")["id"]
    with ThreadPoolExecutor(2) as pool:
        sandbox = EmulatorTransport(emulator, executor=pool)
        sandbox.add_fault(Fault(action="hold", method="POST", path="/v1/batches"))

        async def run() -> None:
            async with api_for(sandbox, timeout=0.1) as api:
                with pytest.raises(AmbiguousWrite):
                    await api.create_batch(batch_params(file_id))

        asyncio.run(run())
        assert not sandbox.wait_idle(timeout=0.2) and emulator.list_batches()["data"] == []
        sandbox.release_held()
        assert sandbox.wait_idle()
    assert len(emulator.list_batches()["data"]) == 1
    assert sandbox.requests == [("POST", "/v1/batches", 200)]


def test_a_429_through_the_transport_is_waited_out_and_retried(sandbox):
    sandbox.add_fault(Fault(action="reject", method="GET", status=429, retry_after_ms=200))

    async def run() -> None:
        async with api_for(sandbox) as api:
            assert [b async for b in api.iter_batches()] == []

    asyncio.run(run())
    rejected, retried = sandbox.timeline()
    assert [rejected.request.status, retried.request.status] == [429, 200]
    assert retried.arrived - rejected.answered >= 0.19


def test_both_doors_open_onto_one_emulator(emulator_factory):
    emulator = emulator_factory()
    inside = EmulatorTransport(emulator)
    file_id = emulator.upload_bytes(b'{"custom_id": "a"}\n', "in.jsonl", "batch")["id"]

    async def create() -> str:
        async with api_for(inside) as api:
            return (await api.create_batch(batch_params(file_id)))["id"]

    batch_id = asyncio.run(create())
    with EmulatorServer(emulator) as outside:
        answer = httpx.get(f"{outside.url}/batches/{batch_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.json()["input_file_id"] == file_id
    assert inside.requests == [("POST", "/v1/batches", 200)] and outside.requests == [
        ("GET", f"/v1/batches/{batch_id}", 200)]


def test_open_sandbox_persists_needs_no_key_and_closes_with_its_client(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHPLAN_SANDBOX_STEP_SECONDS", "0.05")

    async def upload(transport: EmulatorTransport) -> str:
        async with Api(transport.url, "", transport=transport) as api:
            return (await api.upload_file(write_jsonl(tmp_path / "a.jsonl", [request_line("a")]), "a.jsonl"))["id"]

    first = open_sandbox(tmp_path / "world")
    assert first.emulator.timing == Timing.uniform(0.05)
    file_id = asyncio.run(upload(first))
    assert not first.is_open  # the client closed it
    again = open_sandbox(tmp_path / "world")
    assert again.emulator.get_file(file_id)["filename"] == "a.jsonl"
    again.emulator.close()
