"""The sandbox speaks the official API: checked against the OpenAPI file and the `openai` SDK.

Every request the SDK sends and every 2xx answer it gets goes through openapi-core;
error answers (which the spec does not describe) are checked against the error envelope.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import time
import zlib
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

from reconciler.sandbox import Emulator, EmulatorError, EmulatorServer, Timing
from reconciler.sandbox import results
from reconciler.sandbox.emulator import ENDPOINTS

SPEC_PATH = Path(__file__).resolve().parent / "openapi" / "openai-batches-files.openapi.yaml"  # see its README
ERROR_ENVELOPE = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


# --- the contract: the official spec, relaxed where the README says the real API differs ---

def relaxed_spec(spec: dict) -> dict:
    """The spec with its documented quirks relaxed (we relax the schema, not strip our nulls).

    - optional properties may be null: the live API returns null there (README, "quirks");
    - list `first_id`/`last_id` may be null: an empty list has neither;
    - `CreateFileRequest.file` accepts any value: openapi-core hands the multipart part over
      as bytes, which no JSON schema type matches (`format: binary` is 3.0 style).
    """
    spec = copy.deepcopy(spec)
    schemas = spec["components"]["schemas"]
    for schema in schemas.values():
        required = set(schema.get("required", []))
        for name, sub in schema.get("properties", {}).items():
            if name not in required:
                schema["properties"][name] = {"anyOf": [sub, {"type": "null"}]}
    for name in ("ListFilesResponse", "ListBatchesResponse"):
        for prop in ("first_id", "last_id"):
            schemas[name]["properties"][prop] = {"anyOf": [schemas[name]["properties"][prop], {"type": "null"}]}
    schemas["CreateFileRequest"]["properties"]["file"] = {}
    return spec


class _SpecRequest:
    """An httpx request seen as openapi-core's Request, at the spec's server URL."""

    def __init__(self, request):
        self.host_url = "https://api.openai.com"  # the spec's server; paths carry the /v1 prefix
        self.path = request.url.path
        self.method = request.method.lower()
        self.parameters = RequestParameters(query=ImmutableMultiDict(list(request.url.params.multi_items())),
                                            header=Headers(list(request.headers.items())),
                                            cookie=ImmutableMultiDict())
        self.content_type = request.headers.get("content-type", "")
        self.body = request.read() or None


class _SpecResponse:
    def __init__(self, response):
        self.status_code = response.status_code
        self.content_type = response.headers.get("content-type", "")
        self.headers = Headers(list(response.headers.items()))
        self.data = response.read()


class ContractRecorder:
    """An httpx event hook that checks each exchange and keeps the failures for the test to assert."""

    def __init__(self, openapi: OpenAPI):
        self.openapi = openapi
        self.checked = 0
        self.failures: list[str] = []

    def __call__(self, response) -> None:
        response.read()
        request = _SpecRequest(response.request)
        try:
            if response.status_code >= 400:  # tests send bad requests on purpose: check the answer only
                jsonschema.validate(response.json(), ERROR_ENVELOPE)
                self.checked += 1
                return
            self.openapi.validate_request(request)  # what the sandbox accepted, the spec must accept
            if not request.path.endswith("/content"):  # the spec types raw file bytes as a JSON string
                self.openapi.validate_response(request, _SpecResponse(response))
            self.checked += 1
        except Exception as exc:  # noqa: BLE001 - every kind of mismatch is a finding
            self.failures.append(f"{request.method.upper()} {request.path}: {exc!r} {exc.__cause__!r}")


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_dict(relaxed_spec(yaml.safe_load(SPEC_PATH.read_text())))


@pytest.fixture
def contract(openapi) -> ContractRecorder:
    recorder = ContractRecorder(openapi)
    yield recorder
    assert recorder.failures == []


def sdk(server: EmulatorServer, contract: ContractRecorder) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(event_hooks={"response": [contract]})
    return openai.OpenAI(base_url=server.url, api_key="test", max_retries=0, http_client=http)


# --- helpers ---

def jsonl(requests: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in requests)


def chat_requests(n: int, prefix: str = "req") -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(n)]


def upload(client: openai.OpenAI, requests: list[dict], name: str = "in.jsonl"):
    return client.files.create(file=(name, jsonl(requests)), purpose="batch")


def create_chat_batch(client: openai.OpenAI, n: int, **kwargs):
    file = upload(client, chat_requests(n))
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", **kwargs)


def wait_for(client: openai.OpenAI, batch_id: str, *statuses: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            assert batch.status in statuses, f"{batch_id} is still {batch.status}"
            return batch
        time.sleep(0.02)


def content_lines(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- the SDK drives the sandbox ---

def test_upload_create_list_complete_download(emulator_server, contract):
    client = sdk(emulator_server, contract)
    first = create_chat_batch(client, 5, metadata={"spec": "nightly"})
    second = create_chat_batch(client, 3)
    assert first.status == "validating" and first.model is None and first.metadata == {"spec": "nightly"}
    assert first.expires_at == first.created_at + 86400

    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    page = client.batches.list(limit=1, after=page.last_id)
    assert [b.id for b in page.data] == [first.id] and not page.has_more

    done = wait_for(client, first.id, "completed")
    assert done.model == "gpt-4o-mini" and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 5, 0)
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
    lines = content_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(5)]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    assert done.usage.total_tokens == sum(line["response"]["body"]["usage"]["total_tokens"] for line in lines)
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{done.id}_output.jsonl"
    assert contract.checked == emulator_server.count() >= 9  # every exchange went through the contract


def test_cancel_a_running_batch_keeps_partial_results(emulator_server_factory, contract):
    server = emulator_server_factory(timing=Timing(validating=0.05, in_progress=3.0, finalizing=0.05,
                                                   cancelling=0.1))
    client = sdk(server, contract)
    batch = create_chat_batch(client, 20)
    wait_for(client, batch.id, "in_progress")
    time.sleep(0.4)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = wait_for(client, batch.id, "cancelled")
    assert 0 < cancelled.request_counts.completed < 20
    assert cancelled.request_counts == cancelling.request_counts  # frozen when the cancel arrived
    assert len(content_lines(client, cancelled.output_file_id)) == cancelled.request_counts.completed
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status cancelled"):
        client.batches.cancel(batch.id)


def test_errors_name_their_param(emulator_server, contract):
    client = sdk(emulator_server, contract)
    file = upload(client, chat_requests(1))
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.create(input_file_id=file.id, endpoint="/v1/nope",  # type: ignore[arg-type]
                              completion_window="24h")
    assert bad.value.status_code == 400 and bad.value.param == "endpoint"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_does_not_exist")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-does-not-exist")
    with pytest.raises(openai.BadRequestError) as missing:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert missing.value.param == "input_file_id"


@pytest.mark.parametrize("change, param", [
    ({"completion_window": "48h"}, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after.seconds"),
    ({"endpoint": None}, "endpoint"),
    ({"surprise": 1}, "surprise"),
])
def test_create_batch_validation(emulator_server, change, param):
    headers = {"Authorization": "Bearer test"}
    file_id = emulator_server.emulator.upload_bytes(jsonl(chat_requests(1)), "in.jsonl", "batch")["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **change}
    answer = httpx.post(f"{emulator_server.url}/batches", json=body, headers=headers)
    assert answer.status_code == 400
    jsonschema.validate(answer.json(), ERROR_ENVELOPE)
    assert answer.json()["error"]["param"] == param


def test_input_file_must_have_purpose_batch(emulator_server, contract):
    client = sdk(emulator_server, contract)
    file = client.files.create(file=("notes.jsonl", jsonl(chat_requests(1))), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'") as bad:
        client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert bad.value.param == "input_file_id"


def test_bad_input_file_fails_the_batch_with_line_errors(emulator_server, contract):
    client = sdk(emulator_server, contract)
    requests = chat_requests(3)
    requests[2]["custom_id"] = requests[0]["custom_id"]
    file = upload(client, requests)
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(client, batch.id, "failed")
    assert failed.failed_at is not None and failed.output_file_id is None and failed.usage is None
    [error] = failed.errors.data
    assert (error.code, error.line, error.param) == ("duplicate_custom_id", 3, "custom_id")


def test_fail_rate_splits_results_between_output_and_error_files(emulator_server_factory, contract):
    client = sdk(emulator_server_factory(fail_rate=0.5), contract)
    batch = wait_for(client, create_chat_batch(client, 40).id, "completed")
    output, errors = content_lines(client, batch.output_file_id), content_lines(client, batch.error_file_id)
    assert output and errors and len(output) + len(errors) == 40
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
    assert {line["response"]["status_code"] for line in errors} == {400}
    assert {line["custom_id"] for line in output}.isdisjoint(line["custom_id"] for line in errors)


def test_every_request_failing_leaves_no_output_file(emulator_server_factory, contract):
    client = sdk(emulator_server_factory(fail_rate=1.0), contract)
    batch = wait_for(client, create_chat_batch(client, 4).id, "completed")
    assert batch.output_file_id is None and len(content_lines(client, batch.error_file_id)) == 4


def test_files_list_filter_order_delete(emulator_server, contract):
    client = sdk(emulator_server, contract)
    a = upload(client, chat_requests(1), "a.jsonl")
    b = client.files.create(file=("b.txt", b"hello"), purpose="user_data",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert b.expires_at == b.created_at + 3600 and b.bytes == 5 and b.status == "processed"
    assert [f.id for f in client.files.list()] == [b.id, a.id]
    assert [f.id for f in client.files.list(order="asc")] == [a.id, b.id]
    assert [f.id for f in client.files.list(purpose="batch")] == [a.id]
    assert client.files.content(b.id).content == b"hello"
    deleted = client.files.delete(a.id)
    assert deleted.deleted and deleted.id == a.id
    with pytest.raises(openai.NotFoundError):
        client.files.content(a.id)
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("x.txt", b"x"), purpose="nonsense")  # type: ignore[arg-type]
    assert bad.value.param == "purpose"


def test_auth_is_required(emulator_server):
    answer = httpx.get(f"{emulator_server.url}/batches")
    assert answer.status_code == 401
    jsonschema.validate(answer.json(), ERROR_ENVELOPE)
    assert httpx.get(f"{emulator_server.url}/batches", headers={"Authorization": "Basic k"}).status_code == 401
    assert httpx.get(f"{emulator_server.url}/batches", headers={"Authorization": "Bearer k"}).status_code == 200


def test_unknown_route_is_a_404_envelope(emulator_server):
    answer = httpx.get(f"{emulator_server.url}/nothing", headers={"Authorization": "Bearer k"})
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "invalid_request_error"


# --- time: a fake clock walks the lifecycle without sleeping ---

def test_lifecycle_follows_the_clock(emulator_factory):
    clock = FakeClock()
    emulator = emulator_factory(timing=Timing(), clock=clock)  # 2 / 3 / 1 / 1 seconds
    file = emulator.upload_bytes(jsonl(chat_requests(10)), "in.jsonl", "batch")
    batch_id = emulator.create_batch({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                      "completion_window": "24h"})["id"]
    seen = []
    for step in (1.0, 1.5, 1.5, 1.5, 1.0, 1.0):
        clock.advance(step)
        batch = emulator.get_batch(batch_id)
        seen.append((batch["status"], batch["request_counts"]["completed"]))
    assert seen == [("validating", 0), ("in_progress", 1), ("in_progress", 6), ("finalizing", 10),
                    ("completed", 10), ("completed", 10)]
    assert batch["in_progress_at"] - batch["created_at"] == 2
    assert batch["completed_at"] - batch["created_at"] == 6


def test_output_expires_after_makes_results_disappear(emulator_server_factory, emulator_factory, contract):
    clock = FakeClock()
    server = emulator_server_factory(emulator=emulator_factory(timing=Timing(), clock=clock))
    client = sdk(server, contract)
    batch = create_chat_batch(client, 2, output_expires_after={"anchor": "created_at", "seconds": 3600})
    clock.advance(10)
    done = client.batches.retrieve(batch.id)
    output = client.files.retrieve(done.output_file_id)
    assert output.expires_at == done.completed_at + 3600
    clock.advance(3600)
    with pytest.raises(openai.NotFoundError):
        client.files.content(done.output_file_id)


def test_batches_expire_after_24_hours_with_batch_expired_lines(emulator_factory):
    clock = FakeClock()
    emulator = emulator_factory(timing=Timing(in_progress=200_000), clock=clock)
    file = emulator.upload_bytes(jsonl(chat_requests(10)), "in.jsonl", "batch")
    batch_id = emulator.create_batch({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                      "completion_window": "24h"})["id"]
    clock.advance(86_400)
    batch = emulator.get_batch(batch_id)
    assert batch["status"] == "expired" and batch["expired_at"] == batch["expires_at"]
    counts = batch["request_counts"]
    assert counts["completed"] + counts["failed"] == 10 and counts["completed"] == 4
    stream, _ = emulator.open_content(batch["error_file_id"])
    with stream:
        errors = [json.loads(line) for line in stream]
    assert len(errors) == 6 and {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_control_endpoints_expire_batches_and_files(emulator_server_factory, contract):
    server = emulator_server_factory(timing=Timing(validating=0.05, in_progress=60))
    client = sdk(server, contract)
    batch = create_chat_batch(client, 3)
    wait_for(client, batch.id, "in_progress")
    expired = httpx.post(f"{server.control_url}/batches/{batch.id}/expire").json()
    assert expired["status"] == "expired"
    assert client.batches.retrieve(batch.id).status == "expired"
    assert httpx.post(f"{server.control_url}/batches/{batch.id}/expire").status_code == 409
    file = upload(client, chat_requests(1))
    assert httpx.post(f"{server.control_url}/files/{file.id}/expire").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.files.content(file.id)


# --- result bodies: shaped per endpoint, deterministic ---

BODIES = {
    "/v1/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "n": 2},
    "/v1/responses": {"model": "gpt-4.1-mini", "input": "hi"},
    "/v1/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"},
    "/v1/embeddings": {"model": "text-embedding-3-small", "input": ["a", "b", "c"], "dimensions": 8},
    "/v1/moderations": {"model": "omni-moderation-latest", "input": ["a", "b"]},
    "/v1/images/generations": {"model": "gpt-image-1", "prompt": "a cat", "n": 2},
    "/v1/images/edits": {"model": "gpt-image-1", "prompt": "a hat"},
    "/v1/videos": {"model": "sora-2", "prompt": "a wave"},
}
SHAPES = {
    "/v1/chat/completions": lambda b: b["object"] == "chat.completion" and len(b["choices"]) == 2
    and b["choices"][0]["message"]["role"] == "assistant",
    "/v1/responses": lambda b: b["object"] == "response" and b["output"][0]["content"][0]["type"] == "output_text",
    "/v1/completions": lambda b: b["object"] == "text_completion" and b["choices"][0]["text"],
    "/v1/embeddings": lambda b: [len(d["embedding"]) for d in b["data"]] == [8, 8, 8],
    "/v1/moderations": lambda b: len(b["results"]) == 2 and b["results"][0]["flagged"] is False,
    "/v1/images/generations": lambda b: len(b["data"]) == 2 and _is_png(b["data"][0]["b64_json"]),
    "/v1/images/edits": lambda b: _is_png(b["data"][0]["b64_json"]),
    "/v1/videos": lambda b: b["object"] == "video" and b["status"] == "completed",
}


def _is_png(b64: str) -> bool:
    raw = base64.b64decode(b64)
    length = struct.unpack(">I", raw[8:12])[0]
    crc = struct.unpack(">I", raw[16 + length:20 + length])[0]
    return raw.startswith(b"\x89PNG\r\n\x1a\n") and crc == zlib.crc32(raw[12:16 + length])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_result_bodies_are_endpoint_shaped_and_deterministic(endpoint):
    line, usage = results.success_line("batch_x", endpoint, "c-1", BODIES[endpoint], 1_700_000_000)
    again, _ = results.success_line("batch_x", endpoint, "c-1", BODIES[endpoint], 1_700_000_000)
    other, _ = results.success_line("batch_x", endpoint, "c-2", BODIES[endpoint], 1_700_000_000)
    assert line == again and line != other
    assert line["id"].startswith("batch_req_") and line["error"] is None
    assert SHAPES[endpoint](line["response"]["body"])
    has_usage = endpoint not in ("/v1/moderations", "/v1/videos")
    assert (usage is not None) == has_usage
    if has_usage:
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
        assert set(usage) == {"input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
                              "total_tokens"}


def test_fail_rate_decisions_are_stable_and_proportional():
    ids = [f"id-{i}" for i in range(2000)]
    picks = [results.request_fails(i, 0.3) for i in ids]
    assert picks == [results.request_fails(i, 0.3) for i in ids]
    assert 500 < sum(picks) < 700
    assert not any(results.request_fails(i, 0.0) for i in ids)


def test_emulator_error_envelope():
    error = EmulatorError(400, "bad", param="endpoint", code="invalid_value")
    jsonschema.validate(error.envelope(), ERROR_ENVELOPE)


def test_in_memory_world_cleans_up_its_temp_dir():
    emulator = Emulator()
    root = emulator.store.root
    emulator.upload_bytes(b"x", "x.txt", "user_data")
    emulator.close()
    assert not root.exists()
