"""Faults, latency, the request log, control endpoints and the persisted world.

Real HTTP on 127.0.0.1 with httpx and no retries, so each test sees exactly what
one request did: whether the server committed it, and what (if anything) came back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from reconciler.errors import ConfigError, StateError
from reconciler.sandbox import Emulator, EmulatorServer, Fault, LoggedRequest, Timing, start_sandbox, timing_from_env

AUTH = {"Authorization": "Bearer test"}
REPO = Path(__file__).resolve().parents[1]


def chat_jsonl(n: int) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}  # a body the API accepts
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}).encode() + b"\n" for i in range(n))


@pytest.fixture
def http(emulator_server) -> httpx.Client:
    with httpx.Client(base_url=emulator_server.url, headers=AUTH, timeout=5) as client:
        yield client


@pytest.fixture
def input_file_id(emulator_server) -> str:
    return emulator_server.emulator.upload_bytes(chat_jsonl(2), "in.jsonl", "batch")["id"]


def batch_body(file_id: str) -> dict:
    return {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def batch_count(server: EmulatorServer) -> int:
    return len(server.emulator.list_batches(limit=100)["data"])


# --- the four fault actions ---

def test_drop_after_commit_creates_the_batch_but_answers_nothing(emulator_server, http, input_file_id):
    emulator_server.add_fault(Fault(action="drop_after_commit", method="POST", path="/v1/batches"))
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/batches", json=batch_body(input_file_id))
    assert batch_count(emulator_server) == 1
    assert emulator_server.requests[-1] == LoggedRequest("POST", "/v1/batches", "dropped")
    assert http.post("/batches", json=batch_body(input_file_id)).status_code == 200  # times=1: spent
    assert batch_count(emulator_server) == 2


def test_error_after_commit_answers_500_after_doing_it(emulator_server, http, input_file_id):
    emulator_server.add_fault(Fault(action="error_after_commit", method="POST", path="/v1/batches"))
    answer = http.post("/batches", json=batch_body(input_file_id))
    assert answer.status_code == 500 and answer.json()["error"]["type"] == "server_error"
    assert batch_count(emulator_server) == 1


def test_reject_429_says_when_to_retry_and_does_nothing(emulator_server, http, input_file_id):
    emulator_server.add_fault(Fault(action="reject", method="POST", path="/v1/batches", retry_after=2,
                                    retry_after_ms=1500))
    answer = http.post("/batches", json=batch_body(input_file_id))
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "rate_limit_exceeded"
    assert answer.headers["Retry-After"] == "2" and answer.headers["retry-after-ms"] == "1500"
    assert batch_count(emulator_server) == 0
    assert http.post("/batches", json=batch_body(input_file_id)).status_code == 200


def test_rejected_upload_leaves_the_connection_usable(emulator_server, http):
    emulator_server.add_fault(Fault(action="reject", path="/v1/files", method="POST", status=503))
    files = {"file": ("in.jsonl", chat_jsonl(500))}
    assert http.post("/files", files=files, data={"purpose": "batch"}).status_code == 503
    assert http.post("/files", files=files, data={"purpose": "batch"}).status_code == 200
    assert http.get("/files").json()["data"][0]["bytes"] == len(chat_jsonl(500))


def test_stall_outlasts_the_client_then_still_commits(emulator_server, input_file_id):
    emulator_server.add_fault(Fault(action="stall", method="POST", path="/v1/batches", seconds=0.4))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{emulator_server.url}/batches", json=batch_body(input_file_id), headers=AUTH, timeout=0.1)
    deadline = time.monotonic() + 3
    while not emulator_server.count("POST", "/v1/batches") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batch_count(emulator_server) == 1


def test_stall_then_drop(emulator_server, http, input_file_id):
    emulator_server.add_fault(Fault(action="stall", method="POST", path="/v1/batches", seconds=0.1, then="drop"))
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/batches", json=batch_body(input_file_id))
    assert time.monotonic() - started >= 0.1 and batch_count(emulator_server) == 1


def test_every_kth_request_without_limit(emulator_server, http):
    emulator_server.add_fault(Fault(action="reject", path_regex=r"^/v1/batches$", every=2, times=None, status=503))
    assert [http.get("/batches").status_code for _ in range(5)] == [200, 503, 200, 503, 200]
    assert http.get("/files").status_code == 200


def test_nth_request_from_then_on_a_limited_number_of_times(emulator_server, http):
    emulator_server.add_fault(Fault(action="reject", method="GET", nth=2, times=2, status=500))
    assert [http.get("/batches").status_code for _ in range(5)] == [200, 500, 500, 200, 200]


# --- latency and the log ---

def test_latency_delays_api_requests_but_not_control_requests(emulator_server_factory):
    server = emulator_server_factory(latency=1.5, require_auth=False)
    started = time.monotonic()
    assert httpx.get(f"{server.url}/batches").status_code == 200
    assert time.monotonic() - started >= 1.5
    started = time.monotonic()
    assert httpx.get(f"{server.control_url}/requests").status_code == 200
    assert time.monotonic() - started < 1.0  # a loopback GET, even on a busy machine


def test_request_log_counts(emulator_server, http, input_file_id):
    http.get("/batches")
    http.post("/batches", json=batch_body(input_file_id))
    http.get("/batches/batch_missing")
    httpx.post(f"{emulator_server.control_url}/reset-log").raise_for_status()
    assert emulator_server.requests == []
    http.post("/batches", json=batch_body(input_file_id))
    http.get("/batches")
    http.delete(f"/files/{input_file_id}")
    http.get("/batches/batch_missing")
    httpx.get(f"{emulator_server.control_url}/requests")
    assert emulator_server.count() == 4
    assert emulator_server.count("GET") == 2
    assert emulator_server.count(path_prefix="/v1/batches") == 3
    assert emulator_server.count(path_prefix="/_sandbox") == 0  # control requests are not logged
    assert emulator_server.writes() == 2
    assert ("GET", "/v1/batches/batch_missing", 404) in emulator_server.requests


# --- control endpoints, for a server in another process ---

def test_faults_over_http_replace_the_list_and_never_hit_control_paths(emulator_server, http):
    control = emulator_server.control_url
    emulator_server.add_fault(Fault(action="reject", path="/v1/batches", status=500))
    faults = [{"action": "reject", "path_regex": ".*", "times": None, "status": 503}]
    assert httpx.post(f"{control}/faults", json=faults).json()["data"][0]["action"] == "reject"
    assert http.get("/batches").status_code == 503
    log = httpx.get(f"{control}/requests").json()["data"]
    assert log[-1] == {"method": "GET", "path": "/v1/batches", "status": 503}
    assert httpx.get(f"{control}/faults").json()["data"][0]["fired"] == 1
    assert httpx.post(f"{control}/faults", json=[{"action": "explode"}]).status_code == 400
    assert httpx.post(f"{control}/faults", json=[]).status_code == 200
    assert http.get("/batches").status_code == 200


# --- uploads stream to disk ---

def test_chunked_upload_of_several_megabytes(emulator_server):
    boundary = "sandbox-boundary"
    payload = chat_jsonl(40_000)  # ~4 MB: past the in-memory threshold, so written to disk

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
               f"Content-Type: application/jsonl\r\n\r\n").encode()
        for start in range(0, len(payload), 256 * 1024):
            yield payload[start:start + 256 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    answer = httpx.post(f"{emulator_server.url}/files", content=body(), headers={
        **AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status_code == 200 and answer.request.headers.get("Transfer-Encoding") == "chunked"
    assert answer.json()["bytes"] == len(payload) and answer.json()["filename"] == "big.jsonl"
    content = httpx.get(f"{emulator_server.url}/files/{answer.json()['id']}/content", headers=AUTH)
    assert content.content == payload
    assert list(emulator_server.emulator.staging_dir.iterdir()) == []


def test_upload_without_file_part_is_a_400(emulator_server, http):
    answer = http.post("/files", data={"purpose": "batch"}, files={"other": ("x", b"x")})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "file"
    assert list(emulator_server.emulator.staging_dir.iterdir()) == []


# --- the persisted world ---

def test_two_emulators_on_one_root_share_the_world(tmp_path, emulator_factory):
    first = emulator_factory(root=tmp_path / "world")
    second = emulator_factory(root=tmp_path / "world")
    file = first.upload_bytes(chat_jsonl(3), "in.jsonl", "batch")
    batch = second.create_batch(batch_body(file["id"]))
    assert first.get_batch(batch["id"])["input_file_id"] == file["id"]
    deadline = time.monotonic() + 3
    while first.get_batch(batch["id"])["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    done = second.get_batch(batch["id"])
    assert done["status"] == "completed" and done["output_file_id"]
    assert second.list_files(purpose="batch_output")["data"][0]["id"] == done["output_file_id"]
    assert (tmp_path / "world" / "world.json").exists()


def test_another_process_sees_the_world(tmp_path, emulator_factory):
    root = tmp_path / "world"
    emulator = emulator_factory(root=root)
    file = emulator.upload_bytes(chat_jsonl(1), "in.jsonl", "batch")
    batch = emulator.create_batch(batch_body(file["id"]))
    script = ("import sys; from pathlib import Path; from reconciler.sandbox import Emulator; "
              "e = Emulator(Path(sys.argv[1])); print(e.list_batches()['data'][0]['id']); "
              "e.create_batch({'input_file_id': sys.argv[2], 'endpoint': '/v1/chat/completions', "
              "'completion_window': '24h'})")
    out = subprocess.run([sys.executable, "-c", script, str(root), file["id"]], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == batch["id"]
    assert len(emulator.list_batches()["data"]) == 2


def test_concurrent_writers_on_a_persisted_world_lose_nothing(tmp_path, emulator_server_factory, emulator_factory):
    server = emulator_server_factory(emulator=emulator_factory(root=tmp_path / "world"))
    file_id = server.emulator.upload_bytes(chat_jsonl(1), "in.jsonl", "batch")["id"]

    def create_five() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            for _ in range(5):
                client.post("/batches", json=batch_body(file_id)).raise_for_status()

    threads = [threading.Thread(target=create_five) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(emulator_factory(root=tmp_path / "world").list_batches(limit=100)["data"]) == 40


def test_a_world_of_another_version_is_refused_with_the_fix(tmp_path):
    root = tmp_path / "world"
    root.mkdir()
    (root / "world.json").write_text(json.dumps({"version": 99}))
    emulator = Emulator(root)
    with pytest.raises(StateError, match="delete"):
        emulator.list_batches()


# --- entry points ---

def test_start_sandbox_persists_and_needs_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHPLAN_SANDBOX_STEP_SECONDS", "0.05")
    with start_sandbox(tmp_path / "sandbox") as server:
        assert server.emulator.timing == Timing.uniform(0.05)
        answer = httpx.post(f"{server.url}/files", files={"file": ("a.jsonl", chat_jsonl(1))},
                            data={"purpose": "batch"})
        assert answer.status_code == 200
    with start_sandbox(tmp_path / "sandbox") as again:
        assert httpx.get(f"{again.url}/files/{answer.json()['id']}").status_code == 200


def test_step_seconds_from_the_environment(monkeypatch):
    monkeypatch.delenv("BATCHPLAN_SANDBOX_STEP_SECONDS", raising=False)
    assert timing_from_env() == Timing()
    monkeypatch.setenv("BATCHPLAN_SANDBOX_STEP_SECONDS", "soon")
    with pytest.raises(ConfigError, match="BATCHPLAN_SANDBOX_STEP_SECONDS"):
        timing_from_env()


def test_serve_runs_in_the_foreground_until_ctrl_c():
    script = "from reconciler.sandbox import serve; serve(port=0, require_auth=False)"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        assert httpx.get(f"{url}/batches").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "GET /v1/batches 200" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_server_answers_nobody_not_even_keep_alive_clients(emulator_factory):
    with httpx.Client() as client:
        with EmulatorServer(emulator_factory(), require_auth=False) as server:
            url = server.url
            assert client.get(f"{url}/batches").status_code == 200
        with pytest.raises(httpx.TransportError):
            client.get(f"{url}/batches")


def test_fail_rate_out_of_range_is_refused():
    with pytest.raises(ValueError, match="fail_rate"):
        Emulator(fail_rate=1.5)
