"""Issue 7 as a user meets it: `batchplan sandbox serve` for any client, and `--sandbox` for every command."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time

import openai
import pytest

from tests.helpers import request_line, run_cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """`batchplan sandbox serve` in its own process, on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "sandbox", "serve", "--port", str(port),
                             "--step-seconds", "0.05", "--dir", str(tmp_path / "world")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


def test_serve_speaks_to_the_official_sdk(served):
    client = openai.OpenAI(base_url=served, api_key="sk-anything", max_retries=0)
    lines = [request_line(f"q-{i}") for i in range(3)]
    upload = client.files.create(file=("in.jsonl", io.BytesIO("".join(json.dumps(ln) + "\n" for ln in lines)
                                                              .encode())), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"k": "v"})
    assert batch.id in [b.id for b in client.batches.list(limit=10)]
    deadline = time.monotonic() + 10
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
    assert batch.request_counts.completed == 3
    output = client.files.content(batch.output_file_id).text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == ["q-0", "q-1", "q-2"]

    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/nope", completion_window="24h")
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_does_not_exist")


def test_serve_refuses_requests_without_a_key(served):
    import httpx  # the SDK will not send a request without a key, so ask plainly

    answer = httpx.get(f"{served}/batches", timeout=5)
    assert answer.status_code == 401 and answer.json()["error"]["type"] == "invalid_request_error"


def test_sandbox_needs_no_key_and_keeps_its_world_apart(repo):
    repo.spec("alpha")
    env = {"OPENAI_API_KEY": None, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "NO_COLOR": "1",
           "BATCHPLAN_SANDBOX_STEP_SECONDS": "0.05"}
    first = run_cli("apply", "--sandbox", "--auto-approve", "-C", str(repo.root), env=env)
    assert first.code == 0, first.err
    assert not repo.state_path.exists()  # the real state is untouched
    sandbox_state = repo.root / "state" / "sandbox" / "batchplan.state.json"
    assert "alpha" in json.loads(sandbox_state.read_text())["entries"]
    # a separate invocation sees the same world: nothing left to do
    again = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env={**env, "BATCHPLAN_SANDBOX": "1"})
    assert again.code == 0, again.out + again.err


def test_the_quickstart_flow_with_no_key(repo):
    """apply, wait, download in the sandbox: an output line for every request, then nothing to do."""
    shared = repo.data("shared.jsonl", count=4)
    repo.spec("alpha", input=shared)
    repo.spec("beta", input=shared, metadata={"team": "x"})
    repo.spec("gamma", input=repo.data("gamma.jsonl", count=2, prefix="g"))
    env = {"OPENAI_API_KEY": None, "NO_COLOR": "1", "BATCHPLAN_SANDBOX_STEP_SECONDS": "0.05"}
    args = ("--sandbox", "-C", str(repo.root))
    for command in (("apply", "--auto-approve"), ("wait", "--timeout", "30"), ("download",)):
        result = run_cli(*command, *args, env=env)
        assert result.code == 0, f"{command}: {result.out}{result.err}"
    for name, count in (("alpha", 4), ("beta", 4), ("gamma", 2)):
        lines = (repo.root / "results" / name / "output.jsonl").read_text().splitlines()
        assert len(lines) == count
        assert all(json.loads(line)["response"]["status_code"] == 200 for line in lines)
    assert run_cli("plan", "--detailed-exitcode", *args, env=env).code == 0
