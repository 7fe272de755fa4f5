"""The sandbox does not flatter: what the real API refuses, it refuses too, in the API's words.

Issues 17 (item 11), 10 and 12: request bodies checked against the API's OpenAPI schemas
and a known-models list, the upload and request limits, result lines out of order,
requests that fail with 500/429 and batches that expire part way. Real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from reconciler.errors import ConfigError
from reconciler.sandbox import EmulatorServer, Timing
from reconciler.sandbox.bodies import check_body
from reconciler.sandbox.models import MODELS_ENV, models_from_env, schema_models
from reconciler.sandbox.outcomes import RequestFault, request_failure

AUTH = {"Authorization": "Bearer test"}
CHAT = "/v1/chat/completions"
REPO = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]


def line(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_lines(n: int, model: str = "gpt-4o-mini") -> list[dict]:
    return [line(f"r{i}", {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]})
            for i in range(n)]


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(ln).encode() + b"\n" for ln in lines)


def upload(client: httpx.Client, content: bytes, name: str = "in.jsonl", purpose: str = "batch") -> httpx.Response:
    return client.post("/files", files={"file": (name, content)}, data={"purpose": purpose})


def run_batch(server: EmulatorServer, lines: list[dict], *statuses: str) -> tuple[dict, list[dict], list[dict]]:
    """Upload `lines`, make a batch, wait until it reaches one of `statuses`: (batch, output, errors)."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
        file_id = upload(client, jsonl(lines)).raise_for_status().json()["id"]
        batch = client.post("/batches", json={"input_file_id": file_id, "endpoint": lines[0]["url"],
                                              "completion_window": "24h"}).raise_for_status().json()
        deadline = time.monotonic() + 10
        while batch["status"] not in (statuses or ("completed",)) and time.monotonic() < deadline:
            time.sleep(0.02)
            batch = client.get(f"/batches/{batch['id']}").json()
        return batch, _content(client, batch["output_file_id"]), _content(client, batch["error_file_id"])


def _content(client: httpx.Client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(ln) for ln in client.get(f"/files/{file_id}/content").text.splitlines()]


def answers(errors: list[dict]) -> dict[str, tuple]:
    """custom_id -> (status, error object) of each error-file line."""
    return {e["custom_id"]: (e["response"]["status_code"], e["response"]["body"]["error"]) for e in errors}


# --- bodies and models ---

BAD_BODIES = {
    "no-model": {"messages": HI},
    "no-messages": {"model": "gpt-4o-mini"},
    "messages-string": {"model": "gpt-4o-mini", "messages": "hello"},
    "messages-empty": {"model": "gpt-4o-mini", "messages": []},
    "role-wizard": {"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "hi"}]},
    "temperature-hot": {"model": "gpt-4o-mini", "messages": HI, "temperature": "hot"},
    "temperature-3": {"model": "gpt-4o-mini", "messages": HI, "temperature": 3},
}


def _error(message: str, param: str | None, code: str | None) -> dict:
    return {"message": message, "type": "invalid_request_error", "param": param, "code": code}


def test_each_bad_body_is_a_400_line_naming_its_param(emulator_server):
    good = line("good", {"model": "gpt-4o-mini", "messages": HI, "max_tokens": None})  # nullable: null is fine
    lines = [good] + [line(name, body) for name, body in BAD_BODIES.items()]
    batch, output, errors = run_batch(emulator_server, lines)
    assert batch["status"] == "completed" and [o["custom_id"] for o in output] == ["good"]
    assert batch["request_counts"] == {"total": 8, "completed": 1, "failed": 7}
    assert all(e["error"] is None and e["id"].startswith("batch_req_") and e["response"]["request_id"]
               for e in errors)
    assert answers(errors) == {
        "no-model": (400, _error("you must provide a model parameter", None, None)),
        "no-messages": (400, _error("Missing required parameter: 'messages'.", "messages",
                                    "missing_required_parameter")),
        "messages-string": (400, _error("Invalid type for 'messages': expected an array, but got a string "
                                        "instead.", "messages", "invalid_type")),
        "messages-empty": (400, _error("Invalid 'messages': empty array. Expected an array with minimum length 1, "
                                       "but got an empty array instead.", "messages", "empty_array")),
        "role-wizard": (400, _error("Invalid value: 'wizard'. Supported values are: 'developer', 'system', "
                                    "'user', 'assistant', 'tool', and 'function'.", "messages[0].role",
                                    "invalid_value")),
        "temperature-hot": (400, _error("Invalid type for 'temperature': expected a decimal, but got a string "
                                        "instead.", "temperature", "invalid_type")),
        "temperature-3": (400, _error("Invalid 'temperature': decimal above maximum value. Expected a value <= 2, "
                                      "but got 3 instead.", "temperature", "decimal_above_max_value")),
    }


def test_a_misspelled_model_is_model_not_found(emulator_server):
    batch, output, errors = run_batch(emulator_server, chat_lines(3, model="gpt-4o-minii"))
    assert batch["status"] == "completed" and output == [] and batch["output_file_id"] is None
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    expected = _error("The model `gpt-4o-minii` does not exist or you do not have access to it.", None,
                      "model_not_found")
    assert answers(errors) == {f"r{i}": (404, expected) for i in range(3)}


def test_a_models_list_replaces_the_default(emulator_server_factory, tmp_path, monkeypatch):
    server = emulator_server_factory(models=["my-model"])
    _, output, errors = run_batch(server, chat_lines(2, model="my-model"))
    assert len(output) == 2 and errors == []
    _, output, errors = run_batch(server, chat_lines(2))
    assert output == [] and {e["response"]["body"]["error"]["code"] for e in errors} == {"model_not_found"}

    models = tmp_path / "models.txt"
    models.write_text("# ours\nmy-model\n\nother-model  # newer\n")
    monkeypatch.setenv(MODELS_ENV, str(models))
    assert models_from_env() == {"my-model", "other-model"}
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="cannot read the sandbox models file"):
        models_from_env()


def test_the_default_models_are_the_schemas_and_fine_tunes_of_them():
    known = schema_models()
    assert {"gpt-4o-mini", "text-embedding-3-small", "omni-moderation-latest", "gpt-image-1", "sora-2"} <= known
    body = {"model": "ft:gpt-4o-mini-2024-07-18:acme::abc123", "messages": HI}
    assert request_failure(CHAT, "x", body, models=None, faults=(), fail_rate=0.0) is None


def test_the_projects_own_examples_and_test_lines_pass():
    lines = [json.loads(raw) for path in sorted((REPO / "data").glob("*.jsonl")) for raw in path.open()]
    from tests.helpers import request_line

    lines.append(request_line("helper"))
    assert lines and [request_failure(ln["url"], ln["custom_id"], ln["body"], models=None, faults=(),
                                      fail_rate=0.0) for ln in lines] == [None] * len(lines)


@pytest.mark.parametrize("endpoint, body, param", [
    # oneOf branches overlap here (EasyInputMessage and InputMessage): read as anyOf, accepted as the API does
    ("/v1/responses", {"model": "gpt-4o-mini", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}]}, None),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": [{"role": "user", "content": [
        {"type": "input_txt", "text": "hi"}]}]}, "input[0].content[0].type"),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": {"text": "hi"}}, "input"),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi", "dimension": 8}, "dimension"),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "suffix": None}, None),
])
def test_other_endpoints_bodies(endpoint, body, param):
    error = check_body(endpoint, body)
    assert (error is None) == (param is None) and (error is None or error.param == param)


# --- results, files and limits ---

def test_output_lines_are_not_in_input_order_but_all_there_and_reproducible(emulator_server):
    lines = chat_lines(30)
    _, first, _ = run_batch(emulator_server, lines)
    _, second, _ = run_batch(emulator_server, lines)
    order = [o["custom_id"] for o in first]
    assert order != [ln["custom_id"] for ln in lines]
    assert sorted(order) == sorted(ln["custom_id"] for ln in lines)
    assert [o["custom_id"] for o in second] == order  # seeded: the same input gives the same order


def test_batch_files_expire_after_30_days_and_others_do_not(emulator_server):
    with httpx.Client(base_url=emulator_server.url, headers=AUTH) as client:
        batch_file = upload(client, jsonl(chat_lines(1))).json()
        other = upload(client, b"notes", "notes.txt", "user_data").json()
    assert batch_file["expires_at"] == batch_file["created_at"] + 30 * 86400
    assert other["expires_at"] is None


def test_a_batch_upload_that_is_not_jsonl_is_refused(emulator_server):
    with httpx.Client(base_url=emulator_server.url, headers=AUTH) as client:
        answer = upload(client, jsonl(chat_lines(1)), "in.txt")
        listed = client.get("/files").json()["data"]
    assert answer.status_code == 400 and listed == []
    assert answer.json() == {"error": _error("Invalid file format for Batch API. Must be .jsonl", None, None)}


def test_an_upload_over_the_limit_is_refused(emulator_server_factory):
    server = emulator_server_factory(max_upload_bytes=1000)
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        answer = upload(client, b"x" * 1001)
        assert upload(client, jsonl(chat_lines(2))).status_code == 200  # under the limit
        listed = client.get("/files").json()["data"]
    assert answer.status_code == 400 and len(listed) == 1
    assert answer.json() == {"error": _error("File is too large.", None, None)}
    assert list((server.emulator.staging_dir).iterdir()) == []  # the refused upload is gone


def test_file_content_comes_as_an_attachment(emulator_server):
    with httpx.Client(base_url=emulator_server.url, headers=AUTH) as client:
        file_id = upload(client, jsonl(chat_lines(1)), "nightly.jsonl").json()["id"]
        answer = client.get(f"/files/{file_id}/content")
    assert answer.headers["content-disposition"] == 'attachment; filename="nightly.jsonl"'


def test_too_many_requests_fail_validation_with_too_many_tasks(emulator_server_factory):
    server = emulator_server_factory(max_requests=5)
    batch, _, _ = run_batch(server, chat_lines(6), "failed")
    assert batch["status"] == "failed" and batch["errors"]["data"] == [
        {"code": "too_many_tasks", "line": None, "param": None,
         "message": "The number of requests in the batch input file exceeds the limit of 5 requests per batch."}]
    batch, _, _ = run_batch(server, chat_lines(5))
    assert batch["status"] == "completed"


def test_line_errors_use_the_apis_wording(emulator_server):
    lines = chat_lines(2)
    lines[1]["custom_id"] = "r0"
    batch, _, _ = run_batch(emulator_server, lines, "failed")
    assert batch["errors"]["data"] == [
        {"code": "duplicate_custom_id", "line": 2, "param": "custom_id",
         "message": "The custom_id for this request is a duplicate of another request. The custom_id parameter "
                    "must be unique for each request in a batch."}]


# --- faults inside a batch ---

SERVER_ERROR = {"message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error", "param": None, "code": None}
RATE_LIMITED = {"message": "Rate limit reached for requests. Please try again later.", "type": "requests",
                "param": None, "code": "rate_limit_exceeded"}


def test_request_faults_fail_chosen_requests_with_500_and_429(emulator_server_factory):
    server = emulator_server_factory(request_faults=[RequestFault(custom_id="^r1$", status=500),
                                                     RequestFault(custom_id="^r[23]$", status=429)])
    batch, output, errors = run_batch(server, chat_lines(5))
    assert sorted(o["custom_id"] for o in output) == ["r0", "r4"]
    assert answers(errors) == {"r1": (500, SERVER_ERROR), "r2": (429, RATE_LIMITED), "r3": (429, RATE_LIMITED)}
    assert batch["request_counts"] == {"total": 5, "completed": 2, "failed": 3}


def test_request_faults_armed_over_the_control_endpoint_hit_a_share(emulator_server):
    arm = {"requests": [{"share": 0.5, "status": 500}], "expire_after": None}
    answer = httpx.post(f"{emulator_server.control_url}/batch-faults", json=arm)
    assert answer.status_code == 200 and answer.json() == {
        "requests": [{"custom_id": None, "share": 0.5, "status": 500, "message": None}], "expire_after": None}
    _, output, errors = run_batch(emulator_server, chat_lines(40))
    assert 8 < len(errors) < 32 and len(output) + len(errors) == 40
    assert {status for status, _ in answers(errors).values()} == {500}
    bad = httpx.post(f"{emulator_server.control_url}/batch-faults", json={"requests": [{"status": 503}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "batch_faults"


def test_a_batch_that_expires_part_way_keeps_what_it_finished(emulator_server_factory):
    server = emulator_server_factory(timing=Timing(validating=0.05, in_progress=0.4, finalizing=0.05),
                                     expire_after=0.5, request_faults=[RequestFault(custom_id="^r0$")])
    batch, output, errors = run_batch(server, chat_lines(10), "expired")
    counts = batch["request_counts"]
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert counts == {"total": 10, "completed": 4, "failed": 6}  # half of the 9 good ones ran, and no failure
    assert len(output) == counts["completed"] and len(output) + len(errors) == counts["total"]
    expired = [e for e in errors if e["response"] is None]
    assert len(expired) == 6 and {e["error"]["code"] for e in expired} == {"batch_expired"}
