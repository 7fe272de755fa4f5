"""Issue 2 end to end: specs → plan → apply → state, against the emulator (in this process, over httpx)."""

from __future__ import annotations

import json
import time

import yaml

from tests.helpers import run_cli


def three_specs(repo):
    """Three specs, two of them sharing one input file."""
    shared = repo.data("shared.jsonl", count=4)
    repo.spec("alpha", input=shared, metadata={"team": "research"})
    repo.spec("beta", input=shared, metadata={"team": "research", "cost_center": "42"},
              output_expires_after={"anchor": "created_at", "seconds": 604800})
    repo.spec("gamma", input=repo.data("gamma.jsonl", count=2), endpoint="/v1/chat/completions")


def batches_by_name(server) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for batch in server.emulator.list_batches(limit=100)["data"]:
        name = (batch.get("metadata") or {}).get("batchplan_name")
        found.setdefault(name, []).append(batch)
    return found


def test_plan_json_says_create_three_and_sends_no_post(repo, sandbox, sandbox_env):
    three_specs(repo)
    result = run_cli("plan", "--json", "-C", str(repo.root), env=sandbox_env)
    assert result.code == 0, result.err
    document = result.json
    assert [(a["name"], a["action"]) for a in document["actions"]] == [
        ("alpha", "create"), ("beta", "create"), ("gamma", "create")]
    assert document["summary"]["create"] == 3
    assert sandbox.writes() == 0
    assert not repo.state_path.exists()


def test_apply_without_terminal_or_auto_approve_changes_nothing(repo, sandbox, sandbox_env):
    three_specs(repo)
    result = run_cli("apply", "-C", str(repo.root), env=sandbox_env)
    assert result.code == 1
    assert "--auto-approve" in result.err and "Traceback" not in result.err
    assert sandbox.writes() == 0
    assert not repo.state_path.exists()


def test_apply_creates_exactly_the_specs_then_converges(repo, sandbox, sandbox_env):
    three_specs(repo)
    result = run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env)
    assert result.code == 0, result.err
    assert sandbox.count("POST", "/v1/files") == 2  # the shared file once, gamma's once
    assert sandbox.count("POST", "/v1/batches") == 3

    on_server = batches_by_name(sandbox)
    assert sorted(on_server) == ["alpha", "beta", "gamma"] and all(len(v) == 1 for v in on_server.values())
    beta = on_server["beta"][0]
    assert beta["endpoint"] == "/v1/chat/completions" and beta["completion_window"] == "24h"
    assert beta["metadata"]["team"] == "research" and beta["metadata"]["cost_center"] == "42"
    assert set(beta["metadata"]) == {"team", "cost_center", "batchplan_name", "batchplan_spec"}
    assert on_server["alpha"][0]["input_file_id"] == beta["input_file_id"]

    state = repo.state()
    assert {n: e["batch"]["id"] for n, e in state["entries"].items()} == {
        n: v[0]["id"] for n, v in on_server.items()}
    assert state["format_version"] == 1 and state["serial"] >= 1

    writes = sandbox.writes()
    again = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=sandbox_env)
    assert again.code == 0, again.out + again.err
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env).code == 0
    assert sandbox.writes() == writes  # a second apply sends no write at all


def test_output_expiry_is_sent_exactly(repo, sandbox, sandbox_env):
    three_specs(repo)
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env).code == 0
    beta_id = repo.state()["entries"]["beta"]["batch"]["id"]
    emulator = sandbox.emulator
    deadline = time.monotonic() + 10
    while (batch := emulator.get_batch(beta_id))["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    output = emulator.get_file(batch["output_file_id"])
    assert output["expires_at"] - batch["completed_at"] in (604800, 604801)  # anchored at the output's birth


def test_editing_metadata_replaces_only_that_spec(repo, sandbox, sandbox_env):
    three_specs(repo)
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env).code == 0
    spec = repo.root / "specs" / "beta.yaml"
    data = yaml.safe_load(spec.read_text())
    data["metadata"]["team"] = "ml"
    spec.write_text(yaml.safe_dump(data))

    result = run_cli("plan", "--json", "-C", str(repo.root), env=sandbox_env)
    actions = {a["name"]: a for a in result.json["actions"]}
    assert {n: a["action"] for n, a in actions.items()} == {"alpha": "noop", "beta": "replace", "gamma": "noop"}
    assert "metadata.team" in actions["beta"]["reason"]

    text = run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=sandbox_env)
    assert text.code == 2
    assert '~ metadata.team: "research" -> "ml"' in text.out

    old_id = repo.state()["entries"]["beta"]["batch"]["id"]
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env).code == 0
    entry = repo.state()["entries"]["beta"]
    assert entry["batch"]["id"] != old_id and entry["history"][0]["batch_id"] == old_id
    assert run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=sandbox_env).code == 0


def test_state_file_is_sorted_pretty_json_and_keeps_a_backup(repo, sandbox, sandbox_env):
    three_specs(repo)
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env).code == 0
    text = repo.state_path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    backup = repo.state_path.with_name("batchplan.state.json.backup")
    assert not backup.exists()  # the backup is the state before the run, and there was none
    repo.spec("delta")
    assert run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env).code == 0
    assert backup.read_text() == text and json.loads(text)["serial"] < repo.state()["serial"]


def test_batchplan_yaml_and_flags_move_specs_and_state(repo, sandbox, sandbox_env):
    (repo.root / "specs").rename(repo.root / "batches")
    repo.root.joinpath("specs").mkdir()
    repo.spec("solo", file="../batches/solo.yaml")
    (repo.root / "batchplan.yaml").write_text("specs: batches\nstate: ops/state.json\n")
    result = run_cli("apply", "--auto-approve", "-C", str(repo.root), env=sandbox_env)
    assert result.code == 0, result.err
    assert (repo.root / "ops" / "state.json").exists() and not repo.state_path.exists()
    flagged = run_cli("plan", "--json", "--state", "other.json", "-C", str(repo.root), env=sandbox_env)
    assert [a["action"] for a in flagged.json["actions"]] == ["adopt"]


def test_missing_key_is_named_and_nothing_is_sent(repo, sandbox, sandbox_env):
    three_specs(repo)
    result = run_cli("plan", "-C", str(repo.root), env={**sandbox_env, "OPENAI_API_KEY": None})
    assert result.code == 1 and "OPENAI_API_KEY" in result.err and "--sandbox" in result.err
    assert sandbox.requests == []
