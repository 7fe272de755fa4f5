"""Issue 15: several OpenAI-compatible Batch APIs from one repo (providers: in batchplan.yaml).

Two emulator servers on loopback stand for two providers: `research` (OpenAI, bearer, with a
project and an organization) and `azure-east` (Azure OpenAI: the api-key header, under
/openai/v1). What each server was sent is read from its own request log, headers included.
"""

from __future__ import annotations

import json

import pytest

from reconciler.batch import BatchFields
from reconciler.desired import spec_hash
from reconciler.sandbox import EmulatorServer, Timing
from tests.helpers import KEY, run_cli

RESEARCH_KEY = "sk-research-secret-0001"
AZURE_KEY = "azure-secret-key-0002"
SLOW = Timing.uniform(30)  # batches stay validating for the whole test: a replace must cancel


def settings(research: EmulatorServer, azure: EmulatorServer, research_url: str | None = None) -> str:
    return f"""providers:
  azure-east:
    base_url: {azure.url}
    api_key_env: AZURE_OPENAI_API_KEY
    auth: api-key
  research:
    base_url: {research_url or research.url}
    api_key_env: OPENAI_RESEARCH_KEY
    project: proj_abc123
    organization: org_xyz789
    parallelism: 4
"""


@pytest.fixture
def servers(emulator_factory):
    """Two providers: (research: bearer under /v1, azure: api-key under /openai/v1), fast batches."""
    started = [EmulatorServer(emulator_factory(timing=Timing.uniform(0.05))).start(),
               EmulatorServer(emulator_factory(timing=Timing.uniform(0.05)), auth="api-key",
                              prefix="/openai/v1").start()]
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def slow_servers(emulator_factory):
    started = [EmulatorServer(emulator_factory(timing=SLOW)).start(),
               EmulatorServer(emulator_factory(timing=SLOW), auth="api-key", prefix="/openai/v1").start()]
    yield started
    for server in started:
        server.stop()


def env(research: EmulatorServer, **changes: str | None) -> dict:
    """Every key set; the environment's own provider is the research server too (no project there)."""
    return {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": research.url, "OPENAI_RESEARCH_KEY": RESEARCH_KEY,
            "AZURE_OPENAI_API_KEY": AZURE_KEY, "OPENAI_PROJECT_ID": None, "OPENAI_ORG_ID": None,
            "NO_COLOR": "1", **changes}


def three_specs(repo, research, azure) -> None:
    (repo.root / "batchplan.yaml").write_text(settings(research, azure))
    repo.spec("plain")
    repo.spec("eval", provider="research")
    repo.spec("embed", provider="azure-east", metadata={"team": "search"})


def cli(repo, *args: str, environment: dict):
    return run_cli(*args, "-C", str(repo.root), env=environment)


def api_requests(server: EmulatorServer) -> list[tuple[str, str, dict]]:
    return [(r.method, r.path, headers) for r, headers in server.headers()]


def test_one_repo_applies_to_two_providers_each_with_its_own_headers(repo, servers):
    research, azure = servers
    three_specs(repo, research, azure)
    environment = env(research)
    applied = cli(repo, "apply", "--auto-approve", environment=environment)
    assert applied.code == 0, applied.err

    assert [b["metadata"]["batchplan_name"] for b in azure.emulator.list_batches()["data"]] == ["embed"]
    assert sorted(b["metadata"]["batchplan_name"] for b in research.emulator.list_batches()["data"]) == [
        "eval", "plain"]
    azure_calls = api_requests(azure)
    assert azure_calls and all(path.startswith("/openai/v1/") for _, path, _ in azure_calls)
    assert all(headers == {"api-key": AZURE_KEY} for _, _, headers in azure_calls)
    research_headers = {json.dumps(headers, sort_keys=True) for _, _, headers in api_requests(research)}
    assert research_headers == {
        json.dumps({"authorization": f"Bearer {KEY}"}),  # the environment's provider: no project set
        json.dumps({"authorization": f"Bearer {RESEARCH_KEY}", "openai-organization": "org_xyz789",
                    "openai-project": "proj_abc123"}, sort_keys=True)}

    state = repo.state()
    assert {n: e["fields"].get("provider") for n, e in state["entries"].items()} == {
        "embed": "azure-east", "eval": "research", "plain": None}
    assert state["entries"]["embed"]["base_url"] == azure.url and "base_url" not in state["entries"]["plain"]
    assert set(state["provider_uploads"]) == {"azure-east", "research"}

    again = cli(repo, "plan", "--detailed-exitcode", environment=environment)
    assert again.code == 0, again.out + again.err


def test_status_wait_download_each_ask_the_provider_their_batch_is_on(repo, servers):
    research, azure = servers
    three_specs(repo, research, azure)
    environment = env(research)
    assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
    research.reset_log(), azure.reset_log()

    waited = cli(repo, "wait", "--interval", "0.05", "--timeout", "20", environment=environment)
    assert waited.code == 0, waited.out + waited.err
    downloaded = cli(repo, "download", environment=environment)
    assert downloaded.code == 0, downloaded.out + downloaded.err
    for name in ("plain", "eval", "embed"):
        assert (repo.root / "results" / name / "output.jsonl").read_text().count("\n") == 3
    assert {(m, p.split("/")[3]) for m, p, _ in api_requests(azure)} == {("GET", "batches"), ("GET", "files")}
    assert all(p.startswith("/openai/v1/") for _, p, _ in api_requests(azure))
    status = cli(repo, "status", "--json", environment=environment)
    assert status.code == 0 and len(status.json["batches"]) == 3


def test_moving_a_spec_to_another_provider_creates_there_and_cancels_on_the_old(repo, slow_servers):
    research, azure = slow_servers
    three_specs(repo, research, azure)
    environment = env(research)
    assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
    old_id = repo.state()["entries"]["eval"]["batch"]["id"]
    research.reset_log(), azure.reset_log()

    repo.spec("eval", provider="azure-east")
    planned = cli(repo, "plan", environment=environment)
    assert planned.code == 0, planned.err
    assert '~ provider: "research" -> "azure-east"' in planned.out
    assert f"batch {old_id} is validating and will be cancelled" in planned.out
    applied = cli(repo, "apply", "--auto-approve", environment=environment)
    assert applied.code == 0, applied.out + applied.err

    assert [(m, p) for m, p, _ in api_requests(research) if m == "POST"] == [("POST", f"/v1/batches/{old_id}/cancel")]
    assert [p for m, p, _ in api_requests(azure) if m == "POST"] == ["/openai/v1/files", "/openai/v1/batches"]
    entry = repo.state()["entries"]["eval"]
    assert entry["fields"]["provider"] == "azure-east" and entry["base_url"] == azure.url
    assert entry["history"] == [{**entry["history"][0], "batch_id": old_id, "provider": "research"}]
    assert research.emulator.get_batch(old_id)["status"] in ("cancelling", "cancelled")


def test_a_move_that_would_cancel_a_prevent_cancel_batch_is_refused_before_anything_is_sent(repo, slow_servers):
    research, azure = slow_servers
    three_specs(repo, research, azure)
    repo.spec("eval", provider="research", lifecycle={"prevent_cancel": True})
    environment = env(research)
    assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
    research.reset_log(), azure.reset_log()

    repo.spec("eval", provider="azure-east", lifecycle={"prevent_cancel": True})
    refused = cli(repo, "apply", "--auto-approve", environment=environment)
    assert refused.code == 1 and "prevent_cancel" in refused.err and "Traceback" not in refused.err
    assert research.writes() == azure.writes() == 0


def test_a_profile_whose_base_url_changed_is_drift_not_followed(repo, servers, emulator_factory):
    research, azure = servers
    three_specs(repo, research, azure)
    environment = env(research)
    assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
    old_id = repo.state()["entries"]["eval"]["batch"]["id"]
    with EmulatorServer(emulator_factory(timing=Timing.uniform(0.05))) as elsewhere:
        (repo.root / "batchplan.yaml").write_text(settings(research, azure, research_url=elsewhere.url))
        research.reset_log()
        planned = cli(repo, "plan", "--json", environment=environment)
        assert planned.code == 0, planned.err
        (change,) = [a for a in planned.json["actions"] if a["name"] == "eval"]
        assert (change["action"], change["reason_code"]) == ("replace", "provider_moved")
        assert f"batch {old_id} stays on {research.url}" in change["reason"]
        text = cli(repo, "plan", environment=environment).out
        assert f'~ provider.base_url: "{research.url}" -> "{elsewhere.url}"' in text

        assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
        assert [b["metadata"]["batchplan_name"] for b in elsewhere.emulator.list_batches()["data"]] == ["eval"]
        assert all(not p.endswith("/cancel") and old_id not in p for _, p, _ in api_requests(research))
        entry = repo.state()["entries"]["eval"]
        assert entry["base_url"] == elsewhere.url and entry["history"][0]["batch_id"] == old_id


@pytest.mark.parametrize("command", [("plan",), ("apply", "--auto-approve")])
def test_a_missing_key_names_its_variable_and_nothing_is_sent_to_any_provider(repo, servers, command):
    research, azure = servers
    three_specs(repo, research, azure)
    result = cli(repo, *command, environment=env(research, AZURE_OPENAI_API_KEY=None))
    assert result.code == 1
    assert result.err.startswith("Error: AZURE_OPENAI_API_KEY is not set; provider azure-east")
    assert research.requests == [] and azure.requests == []
    assert not repo.state_path.exists()


def test_an_unknown_provider_is_a_validation_error_naming_the_known_ones_offline(repo, servers):
    research, azure = servers
    three_specs(repo, research, azure)
    repo.spec("stray", provider="azure-west")
    offline = {k: None for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_RESEARCH_KEY", "AZURE_OPENAI_API_KEY")}
    result = cli(repo, "validate", environment={**offline, "NO_COLOR": "1"})
    assert result.code == 1
    assert ("specs/stray.yaml:2: provider: unknown provider 'azure-west'; known providers: azure-east, research"
            in result.err)
    assert research.requests == [] and azure.requests == []


def test_a_key_in_batchplan_yaml_is_refused_without_echoing_it(repo, servers):
    research, azure = servers
    three_specs(repo, research, azure)
    text = settings(research, azure).replace("    auth: api-key\n", f"    auth: api-key\n    api_key: {AZURE_KEY}\n")
    (repo.root / "batchplan.yaml").write_text(text)
    result = cli(repo, "validate", environment=env(research))
    assert result.code == 1 and AZURE_KEY not in result.out + result.err
    assert "providers.azure-east.api_key: a key never goes in this file" in result.err


def test_keys_are_never_printed_or_written(repo, servers):
    research, azure = servers
    three_specs(repo, research, azure)
    environment = env(research)
    outputs = [cli(repo, *args, environment=environment) for args in (
        ("plan",), ("apply", "--auto-approve"), ("status", "-o", "wide"), ("refresh",),
        ("wait", "--interval", "0.05", "--timeout", "20"), ("download",), ("state", "show", "embed"))]
    written = "".join(p.read_text(errors="replace") for p in repo.root.rglob("*") if p.is_file())
    for secret in (KEY, RESEARCH_KEY, AZURE_KEY):
        assert all(secret not in r.out + r.err for r in outputs)
        assert secret not in written


def test_sandbox_maps_every_provider_to_a_world_of_its_own(repo, tmp_path):
    (repo.root / "batchplan.yaml").write_text(
        "providers:\n  azure-east:\n    base_url: https://my-resource.openai.azure.com/openai/v1\n"
        "    api_key_env: AZURE_OPENAI_API_KEY\n    auth: api-key\n"
        "  research:\n    api_key_env: OPENAI_RESEARCH_KEY\n    project: proj_abc123\n")
    repo.spec("plain")
    repo.spec("eval", provider="research")
    repo.spec("embed", provider="azure-east")
    no_keys = {"OPENAI_API_KEY": None, "OPENAI_RESEARCH_KEY": None, "AZURE_OPENAI_API_KEY": None, "NO_COLOR": "1",
               "BATCHPLAN_SANDBOX_STEP_SECONDS": "0.05"}
    applied = run_cli("--sandbox", "apply", "--auto-approve", "-C", str(repo.root), env=no_keys)
    assert applied.code == 0, applied.out + applied.err
    world = repo.root / "state" / "sandbox" / "world"
    for provider, name in ((world / "research", "eval"), (world / "azure-east", "embed"), (world, "plain")):
        batches = json.loads((provider / "world.json").read_text())["batches"]
        assert [b["metadata"]["batchplan_name"] for b in batches.values()] == [name]
    waited = run_cli("--sandbox", "wait", "--interval", "0.05", "--timeout", "20", "-C", str(repo.root), env=no_keys)
    assert waited.code == 0, waited.out + waited.err
    assert run_cli("--sandbox", "download", "-C", str(repo.root), env=no_keys).code == 0
    assert sorted(p.parent.name for p in (repo.root / "results").glob("*/output.jsonl")) == ["embed", "eval", "plain"]


def test_a_spec_that_names_no_provider_keeps_its_fields_and_hash():
    fields = BatchFields(endpoint="/v1/chat/completions", completion_window="24h", input="data/a.jsonl",
                         input_sha256="0" * 64)
    assert "provider" not in fields.model_dump()
    import hashlib

    before = {"endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {},
              "output_expires_after": None, "input_sha256": "0" * 64, "input_file_id": None}
    assert spec_hash(fields) == hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":"))
                                               .encode()).hexdigest()[:32]
    assert spec_hash(fields.model_copy(update={"provider": "research"})) != spec_hash(fields)


def test_sandbox_serve_in_azure_style_refuses_a_bearer_key_and_anything_outside_its_prefix(emulator_factory):
    import httpx

    with EmulatorServer(emulator_factory(), auth="api-key", prefix="/openai/v1") as azure:
        origin = azure.url.removesuffix("/openai/v1")
        assert httpx.get(f"{azure.url}/batches", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        assert httpx.get(f"{azure.url}/batches", headers={"api-key": KEY}).status_code == 200
        assert httpx.get(f"{origin}/v1/batches", headers={"api-key": KEY}).status_code == 404


def test_per_provider_settings_and_limits_parse_and_a_bad_one_names_its_field(repo):
    from reconciler.errors import ConfigError
    from reconciler.project import Project

    (repo.root / "batchplan.yaml").write_text(
        "parallelism: 8\nproviders:\n  research:\n    api_key_env: OPENAI_RESEARCH_KEY\n    parallelism: 4\n"
        "    limits: {gpt-4o-mini: {enqueued_tokens: 2000000}, default: {enqueued_tokens: 500000}}\n")
    project = Project.open(str(repo.root))
    assert project.provider_limits("research").limit_for("gpt-4o") == 500_000
    assert project.provider_limits(None) is None
    assert project.sandbox is False and project.parallelism == 8
    (repo.root / "batchplan.yaml").write_text(
        "providers:\n  research:\n    api_key_env: OPENAI_RESEARCH_KEY\n    auth: basic\n")
    with pytest.raises(ConfigError, match=r"batchplan.yaml: providers.research.auth: Input should be 'bearer' or "
                                          r"'api-key'"):
        Project.open(str(repo.root))


def test_a_duplicate_on_a_named_provider_is_cancelled_there_and_nothing_goes_to_the_other(repo, slow_servers):
    from reconciler.remote import keep_oldest

    research, azure = slow_servers
    three_specs(repo, research, azure)
    environment = env(research)
    assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
    recorded = azure.emulator.get_batch(repo.state()["entries"]["embed"]["batch"]["id"])
    second = azure.emulator.create_batch({key: recorded[key] for key in ("input_file_id", "endpoint",
                                                                         "completion_window", "metadata")})
    keeper, (duplicate,) = keep_oldest([recorded, second])  # the same second: the lower id is kept
    research.reset_log(), azure.reset_log()

    planned = cli(repo, "plan", "--json", environment=environment)
    changes = [(a["name"], a["action"], a["reason_code"]) for a in planned.json["actions"] if a["action"] != "noop"]
    assert changes == [("embed", "cancel", "duplicate")] if keeper is recorded else \
        [("embed", "adopt", "keep_oldest"), ("embed", "cancel", "duplicate")]
    assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
    assert [p for m, p, _ in api_requests(azure) if m == "POST"] == [f"/openai/v1/batches/{duplicate['id']}/cancel"]
    assert [p for m, p, _ in api_requests(research) if m == "POST"] == []
    assert repo.state()["entries"]["embed"]["batch"]["id"] == keeper["id"]


def test_a_profile_s_own_limits_queue_its_specs_and_the_top_level_ones_the_rest(repo, servers):
    from reconciler.tokens import count_file

    research, azure = servers
    three_specs(repo, research, azure)
    repo.spec("eval2", provider="research")
    repo.spec("plain2")
    tokens = sorted(count_file(repo.root / "data" / f"{n}.jsonl", "/v1/chat/completions").input_tokens
                    for n in ("eval", "eval2"))
    (repo.root / "batchplan.yaml").write_text(  # room for either research spec, not for both
        settings(research, azure) + f"    limits: {{gpt-4o-mini: {{enqueued_tokens: {sum(tokens) - 1}}}}}\n"
        "limits: {gpt-4o-mini: {enqueued_tokens: 2000000}}\n")
    planned = cli(repo, "plan", "--json", environment=env(research))
    assert planned.code == 0, planned.err
    assert {a["name"]: a["queued"] for a in planned.json["actions"]} == {
        "embed": False, "eval": False, "eval2": True, "plain": False, "plain2": False}


def test_a_retry_is_made_on_its_spec_s_provider_and_its_results_read_there(repo, emulator_factory):
    from reconciler.sandbox.outcomes import BatchFaults, RequestFault

    research = EmulatorServer(emulator_factory(timing=Timing.uniform(0.05))).start()
    azure = EmulatorServer(emulator_factory(timing=Timing.uniform(0.05), request_faults=[
        RequestFault(custom_id="^embed-1$", status=500)]), auth="api-key", prefix="/openai/v1").start()
    try:
        three_specs(repo, research, azure)
        repo.spec("embed", provider="azure-east", retry={"max_attempts": 2})
        environment = env(research)
        assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
        assert cli(repo, "wait", "--interval", "0.05", "--timeout", "20", environment=environment).code == 0
        azure.emulator.batch_faults = BatchFaults()
        research.reset_log()
        planned = cli(repo, "plan", "--json", environment=environment)
        assert [(a["name"], a["action"], a["requests"]) for a in planned.json["actions"] if a["action"] != "noop"] \
            == [("embed", "retry", 1)]
        assert cli(repo, "apply", "--auto-approve", environment=environment).code == 0
        retry = repo.state()["entries"]["embed"]["retries"]["batches"][0]["id"]
        assert azure.emulator.get_batch(retry)["metadata"]["batchplan_name"] == "embed"
        assert [p for m, p, _ in api_requests(research) if m == "POST"] == []
        assert set(repo.state()["provider_uploads"]["azure-east"]) >= {
            f["filename"].split("batchplan-")[1][:64] for f in azure.emulator.list_files(purpose="batch")["data"]}
    finally:
        research.stop(), azure.stop()
