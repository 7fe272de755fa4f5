"""Issue 11: what a plan will cost, and budgets that apply holds it to.

The renderings are pure (a plan built from plain values, its estimates attached) and compared
as whole strings; the commands run against the emulator over HTTP, whose request log shows
that a refused apply sent nothing but GETs (or, for a saved plan, nothing at all).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from reconciler.estimate import Estimate, usd
from reconciler.plan import RemoteView, build_plan
from reconciler.prices import PRICES_AS_OF
from reconciler.render import render_json, render_markdown, render_text
from tests.helpers import cli, request_line, write_jsonl
from tests.test_plan import entry_for, state_with, want

UNPRICED = "model 'acme-llm-7' has no price; add it under prices: in batchplan.yaml"
UNBOUNDED = ("some requests set no max_tokens, max_completion_tokens or max_output_tokens; set one, or "
             "default_max_output_tokens in batchplan.yaml")


# -- renderings -------------------------------------------------------------------------------


def _estimate(model: str = "gpt-4o-mini", low: float | None = 0.15, high: float | None = 0.3,
              output: int | None = 500_000, lower_bound: bool = False) -> Estimate:
    return Estimate(model=model, requests=1000, input_tokens=2_000_000, output_tokens_max=output,
                    cost_usd_min=low, cost_usd_max=high, lower_bound=lower_bound)


def _costed_plan(budget: float | None = None, spec_budget: float | None = None, edit: Estimate | None = None):
    """keep (noop), edit (replace, a model with no price unless `edit`), new (create, $0.15 – $0.30)."""
    keep, new = want("keep"), dataclasses.replace(want("new"), budget_usd=spec_budget)
    state = state_with(keep=entry_for(keep, "batch_k", "completed"),
                       edit=entry_for(want("edit", team="research"), "batch_e", "completed"))
    plan = build_plan([keep, want("edit", team="ml"), new], state, RemoteView())
    edit = edit or _estimate("acme-llm-7", None, None, output=600_000)
    return plan.with_estimates({"new": _estimate(), "edit": edit}, budget)


def test_text_plan_with_estimates_and_a_total_as_a_whole_string():
    plan = _costed_plan(edit=_estimate("gpt-4o", 2.5, 5.0, lower_bound=True))
    assert render_text(plan) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  ± edit  replace  changed: metadata.team\n"
        "      ~ metadata.team: \"research\" -> \"ml\"\n"
        "      re-runs 3 requests: batch batch_e already completed\n"
        "      estimate: gpt-4o, 1,000 requests, 2,000,000 input + ≤ 500,000 output tokens: $2.50 – $5.00 "
        "(at least: some input (images, tools, ...) is not counted)\n"
        "  + new   create   no batch for this spec in the state or on the server\n"
        "      endpoint: /v1/chat/completions\n"
        f"      input: data/x.jsonl (sha256 {'a' * 12}, 3 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "      estimate: gpt-4o-mini, 1,000 requests, 2,000,000 input + ≤ 500,000 output tokens: $0.15 – $0.30\n"
        "\n"
        "Plan: 1 to create, 1 to replace, 1 unchanged.\n"
        f"Cost: ≈ $2.65 – $5.30 for 2 batches (batch prices as of {PRICES_AS_OF}).\n"
    )


def test_text_plan_over_budget_warns_with_what_apply_will_refuse():
    plan = _costed_plan(budget=0.25, spec_budget=0.2)
    assert render_text(plan) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  ± edit  replace  changed: metadata.team\n"
        "      ~ metadata.team: \"research\" -> \"ml\"\n"
        "      re-runs 3 requests: batch batch_e already completed\n"
        "      estimate: acme-llm-7, 1,000 requests, 2,000,000 input + ≤ 600,000 output tokens: "
        f"unknown ({UNPRICED})\n"
        "  + new   create   no batch for this spec in the state or on the server\n"
        "      endpoint: /v1/chat/completions\n"
        f"      input: data/x.jsonl (sha256 {'a' * 12}, 3 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "      estimate: gpt-4o-mini, 1,000 requests, 2,000,000 input + ≤ 500,000 output tokens: $0.15 – $0.30\n"
        "\n"
        "Plan: 1 to create, 1 to replace, 1 unchanged.\n"
        f"Cost: unknown for 2 batches; budget $0.25 (batch prices as of {PRICES_AS_OF}).\n"
        "Warning: over budget; apply will refuse this plan:\n"
        "  ! new: may cost up to $0.30, over the budget_usd $0.20 of its spec (specs/x.yaml)\n"
        f"  ! edit: its cost is unknown ({UNPRICED}), and batchplan.yaml sets budget_usd $0.25\n"
    )


def test_markdown_plan_has_a_cost_column_and_a_total_as_a_whole_string():
    plan = _costed_plan(budget=0.25, edit=_estimate("gpt-4o", 0.5, None, output=None))
    assert render_markdown(plan) == (
        "## batchplan plan\n"
        "\n"
        "| action | count | cost |\n"
        "| --- | ---: | ---: |\n"
        "| + create | 1 | $0.15 – $0.30 |\n"
        "| = adopt | 0 |  |\n"
        "| ~ update | 0 |  |\n"
        "| ± replace | 1 | $0.50 – ? |\n"
        "| ↻ retry | 0 |  |\n"
        "| - cancel | 0 |  |\n"
        "| # forget | 0 |  |\n"
        "| noop | 1 |  |\n"
        "| **total** | | **≈ $0.65 – ?** |\n"
        "\n"
        "**Plan: 1 to create, 1 to replace, 1 unchanged.**\n"
        "\n"
        f"Cost: ≈ $0.65 – ? for 2 batches; budget $0.25 (batch prices as of {PRICES_AS_OF}).\n"
        "\n"
        "**Warning: over budget; apply will refuse this plan:**\n"
        "\n"
        f"- edit: its cost is unknown ({UNBOUNDED}), and batchplan.yaml sets budget_usd $0.25\n"
        "\n"
        "### `±` edit: replace\n"
        "\n"
        "changed: metadata.team\n"
        "\n"
        "```diff\n"
        '~ metadata.team: "research" -> "ml"\n'
        "re-runs 3 requests: batch batch_e already completed\n"
        f"estimate: gpt-4o, 1,000 requests, 2,000,000 input + unbounded output tokens: $0.50 – ? ({UNBOUNDED})\n"
        "```\n"
        "\n"
        "### `+` new: create\n"
        "\n"
        "no batch for this spec in the state or on the server\n"
        "\n"
        "```\n"
        "endpoint: /v1/chat/completions\n"
        f"input: data/x.jsonl (sha256 {'a' * 12}, 3 requests)\n"
        'metadata: {"team": "research"}\n'
        "estimate: gpt-4o-mini, 1,000 requests, 2,000,000 input + ≤ 500,000 output tokens: $0.15 – $0.30\n"
        "```\n"
    )


def test_json_plan_has_an_estimate_per_action_and_the_cost_in_the_summary():
    document = json.loads(render_json(_costed_plan(edit=_estimate("gpt-4o", 2.5, 5.0))))
    assert {a["name"]: a["estimate"] for a in document["actions"]} == {
        "edit": {"model": "gpt-4o", "requests": 1000, "input_tokens": 2_000_000, "output_tokens_max": 500_000,
                 "cost_usd_min": 2.5, "cost_usd_max": 5.0, "lower_bound": False},
        "keep": None,
        "new": {"model": "gpt-4o-mini", "requests": 1000, "input_tokens": 2_000_000, "output_tokens_max": 500_000,
                "cost_usd_min": 0.15, "cost_usd_max": 0.3, "lower_bound": False}}
    assert document["summary"] == {"create": 1, "adopt": 0, "update": 0, "replace": 1, "retry": 0, "cancel": 0, "forget": 0,
                                   "noop": 1,
                                   "cost_usd_min": 2.65, "cost_usd_max": 5.3}
    unknown = json.loads(render_json(_costed_plan()))
    assert unknown["actions"][0]["estimate"]["cost_usd_max"] is None
    assert (unknown["summary"]["cost_usd_min"], unknown["summary"]["cost_usd_max"]) == (None, None)


def test_a_plan_that_sends_nothing_costs_nothing_and_shows_no_cost_line():
    d = want("a")
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1", "completed")), RemoteView())
    plan = plan.with_estimates({}, budget_usd=0.0)
    assert render_text(plan) == "No changes. 1 batch(es) match their specs.\n"
    assert json.loads(render_json(plan))["summary"]["cost_usd_max"] == 0.0


@pytest.mark.parametrize("amount, text", [(None, "?"), (0, "$0.00"), (0.000155, "$0.000155"), (0.0042, "$0.0042"),
                                          (0.01, "$0.01"), (0.012076, "$0.0121"), (0.3, "$0.30"),
                                          (0.426, "$0.426"), (1234.5, "$1,234.50")])
def test_amounts_under_a_cent_keep_their_digits(amount, text):
    assert usd(amount) == text


# -- plan and apply against the emulator --------------------------------------------------------


def config(repo, **settings) -> None:
    (repo.root / "batchplan.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def bounded(repo, name: str, count: int = 3, model: str = "gpt-4o-mini", **body) -> str:
    """An input of `count` chat requests, each with max_completion_tokens 100 unless `body` says otherwise."""
    body.setdefault("max_completion_tokens", 100)
    write_jsonl(repo.root / "data" / f"{name}.jsonl", [request_line(f"{name}-{i}", model=model, **body)
                                                      for i in range(count)])
    return f"../data/{name}.jsonl"


def only_reads(server) -> bool:
    return all(r.method == "GET" for r in server.requests)


def test_plan_json_estimates_each_create_from_its_input(repo, emulator_server, api_env):
    repo.spec("a", input=bounded(repo, "a"))
    document = cli(repo, api_env, "plan", "--json").json
    # per request: 3 (message) + 1 ("user") + 3 ("a-0" is a, -, 0) + 3 (reply priming) = 10 tokens
    assert document["actions"][0]["estimate"] == {
        "model": "gpt-4o-mini", "requests": 3, "input_tokens": 30, "output_tokens_max": 300,
        "cost_usd_min": 0.000002, "cost_usd_max": 0.000092, "lower_bound": False}
    assert (document["summary"]["cost_usd_min"], document["summary"]["cost_usd_max"]) == (0.000002, 0.000092)


def test_apply_over_the_budget_of_batchplan_yaml_sends_nothing_but_reads(repo, emulator_server, api_env):
    repo.spec("a", input=bounded(repo, "a", count=40))
    repo.spec("b", input=bounded(repo, "b", count=20))
    config(repo, budget_usd=0.001)
    result = cli(repo, api_env, "apply", "--auto-approve")
    assert result.code == 1 and result.out == ""
    assert result.err == (
        "Error: over budget: apply refused; nothing was sent or written.\n"
        "  this apply may cost up to $0.00185 (a $0.00123, b $0.000615), over the budget_usd $0.001 of "
        "batchplan.yaml\n"
        "Raise the budget, bound the requests' output (max_completion_tokens, max_tokens, max_output_tokens), "
        "or apply fewer specs (--target NAME).\n")
    assert only_reads(emulator_server) and not repo.state_path.exists()
    plan = cli(repo, api_env, "plan")
    assert plan.code == 0 and plan.out.endswith(
        f"Cost: ≈ $0.000045 – $0.00185 for 2 batches; budget $0.001 (batch prices as of {PRICES_AS_OF}).\n"
        "Warning: over budget; apply will refuse this plan:\n"
        "  ! this apply may cost up to $0.00185 (a $0.00123, b $0.000615), over the budget_usd $0.001 of "
        "batchplan.yaml\n")
    within = cli(repo, api_env, "apply", "--auto-approve", "--target", "b")  # $0.000615 fits
    assert within.code == 0, within.err
    assert emulator_server.count("POST", "/v1/batches") == 1


def test_a_spec_over_its_own_budget_is_refused_and_named(repo, emulator_server, api_env):
    repo.spec("cheap", input=bounded(repo, "cheap"), budget_usd=1)
    repo.spec("dear", input=bounded(repo, "dear", count=10, max_completion_tokens=4000), budget_usd=0.002)
    result = cli(repo, api_env, "apply", "--auto-approve")
    assert result.code == 1
    assert ("  dear: may cost up to $0.012, over the budget_usd $0.002 of its spec (specs/dear.yaml)\n"
            in result.err) and "cheap" not in result.err
    assert only_reads(emulator_server)


def test_no_max_tokens_is_an_unknown_cost_refused_under_a_budget(repo, emulator_server, api_env):
    repo.spec("open", input=repo.data("open.jsonl"))  # requests without max_tokens
    config(repo, budget_usd=5)
    result = cli(repo, api_env, "apply", "--auto-approve")
    assert result.code == 1
    assert f"  open: its cost is unknown ({UNBOUNDED}), and batchplan.yaml sets budget_usd $5.00\n" in result.err
    assert only_reads(emulator_server)
    config(repo, budget_usd=5, default_max_output_tokens=50)
    (estimate,) = [a["estimate"] for a in cli(repo, api_env, "plan", "--json").json["actions"]]
    assert (estimate["output_tokens_max"], estimate["cost_usd_max"]) == (150, 0.000047)
    assert cli(repo, api_env, "apply", "--auto-approve").code == 0


def test_a_model_with_no_price_is_null_and_refused_under_a_spec_budget(repo, emulator_server, api_env):
    repo.spec("acme", input=bounded(repo, "acme", model="acme-llm-7"), budget_usd=1)
    (estimate,) = [a["estimate"] for a in cli(repo, api_env, "plan", "--json").json["actions"]]
    assert (estimate["model"], estimate["cost_usd_min"], estimate["cost_usd_max"]) == ("acme-llm-7", None, None)
    result = cli(repo, api_env, "apply", "--auto-approve")
    assert result.code == 1
    assert (f"  acme: its cost is unknown ({UNPRICED}), and its spec (specs/acme.yaml) sets budget_usd $1.00\n"
            in result.err)
    assert only_reads(emulator_server)


def test_prices_in_batchplan_yaml_price_a_new_model_and_override_a_known_one(repo, emulator_server, api_env):
    repo.spec("acme", input=bounded(repo, "acme", model="acme-llm-7"))
    repo.spec("mini", input=bounded(repo, "mini"))
    config(repo, prices={"acme-llm-7": {"input": 1000, "output": 2000}, "gpt-4o-mini": {"input": 100, "output": 0}})
    costs = {a["name"]: (a["estimate"]["cost_usd_min"], a["estimate"]["cost_usd_max"])
             for a in cli(repo, api_env, "plan", "--json").json["actions"]}
    assert costs == {"acme": (0.033, 0.633), "mini": (0.003, 0.003)}  # 33 and 30 input tokens; 300 output at most


def test_bad_budgets_and_prices_are_one_message_and_nothing_is_sent(repo, emulator_server, api_env):
    repo.spec("a", input=bounded(repo, "a"), budget_usd=True)
    result = cli(repo, api_env, "plan")
    assert result.code == 1 and "specs/a.yaml:3: budget_usd: Input should be a valid number, not True" in result.err
    repo.spec("a", input=bounded(repo, "a"))
    for settings, message in (
            ({"budget_usd": -1}, "batchplan.yaml: budget_usd: Input should be greater than or equal to 0"),
            ({"default_max_output_tokens": "many"}, "batchplan.yaml: default_max_output_tokens: Input should be a "
                                                    "valid integer"),
            ({"prices": {"gpt-4o": {"input": 1}}}, "batchplan.yaml: prices.gpt-4o.output: Field required")):
        config(repo, **settings)
        result = cli(repo, api_env, "plan")
        assert result.code == 1 and result.err.startswith(f"Error: {message}"), result.err
        assert "Traceback" not in result.err
    assert emulator_server.requests == []


def test_an_uploaded_input_has_an_unknown_cost_refused_under_a_budget(repo, emulator_server, api_env):
    repo.spec("up", input_file_id="file-abc123")
    config(repo, budget_usd=10)
    plan = cli(repo, api_env, "plan")
    assert ("      estimate: unknown (its input is the uploaded file file-abc123, whose requests batchplan cannot "
            "read)\n") in plan.out
    assert cli(repo, api_env, "apply", "--auto-approve").code == 1 and only_reads(emulator_server)


def test_a_saved_plan_carries_its_estimates_and_is_refused_before_connecting(repo, emulator_server, api_env):
    repo.spec("a", input=bounded(repo, "a"))
    saved = cli(repo, api_env, "plan", "--json", "--out", "plan.json")
    assert saved.code == 0
    config(repo, budget_usd=0.00005)  # lowered after the plan was made: today's budget holds
    emulator_server.reset_log()
    result = cli(repo, api_env, "apply", "plan.json")
    assert result.code == 1 and "this apply may cost up to $0.000092 (a $0.000092)" in result.err
    assert emulator_server.requests == []  # the estimates are in the file: not even a GET
    config(repo, budget_usd=0.001)
    applied = cli(repo, api_env, "apply", "plan.json")
    assert applied.code == 0, applied.err
    assert "estimate: gpt-4o-mini, 3 requests, 30 input + ≤ 300 output tokens: $0.000002 – $0.000092" in applied.out


def test_a_second_plan_counts_nothing_it_reads_the_token_cache(repo, emulator_server, api_env):
    repo.spec("a", input=bounded(repo, "a"))
    first = cli(repo, api_env, "plan", "--json").json["actions"][0]["estimate"]
    cache_file = repo.root / "state" / "tokens.json"
    cache = json.loads(cache_file.read_text())
    (key,) = cache["entries"]
    assert key.startswith(hashlib_of(repo.root / "data" / "a.jsonl"))
    cache["entries"][key][0]["input_tokens"] = 777_777  # what the next plan shows only if it does not count
    cache_file.write_text(json.dumps(cache))
    second = cli(repo, api_env, "plan", "--json").json["actions"][0]["estimate"]
    assert (first["input_tokens"], second["input_tokens"]) == (30, 777_777)


def hashlib_of(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
