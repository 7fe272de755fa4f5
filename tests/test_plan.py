"""The pure planner: every action, decided from specs, state and what the server said."""

from __future__ import annotations

import json

import pytest

from reconciler.desired import Desired
from reconciler.errors import PlanError
from reconciler.plan import Action, RemoteView, build_plan
from reconciler.render import render_json, render_markdown, render_text
from reconciler.state import BatchRecord, Entry, Intent, State


def want(name: str, team: str = "research", sha: str = "a" * 64, prevent_cancel: bool = False) -> Desired:
    return Desired(name=name, file="specs/x.yaml", endpoint="/v1/chat/completions", completion_window="24h",
                   metadata={"team": team}, output_expires_after=None, input="data/x.jsonl", input_sha256=sha,
                   input_file_id=None, requests=3, prevent_cancel=prevent_cancel, output=None, errors=None)


def batch(batch_id: str, status: str = "in_progress", tags: dict | None = None, created_at: int = 1000) -> dict:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": created_at,
            "input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": tags, "request_counts": {"total": 3, "completed": 1, "failed": 0}}


def entry_for(d: Desired, batch_id: str, status: str = "in_progress", **kw) -> Entry:
    return Entry(spec_hash=d.spec_hash, fields=d.fields(),
                 batch=BatchRecord.from_api(batch(batch_id, status)), **kw)


def state_with(**entries: Entry) -> State:
    return State(lineage="L", serial=3, entries=entries)


def actions(plan) -> dict[str, Action]:
    return {c.name: c.action for c in plan.changes}


def test_create_when_nothing_exists():
    plan = build_plan([want("a"), want("b")], None, RemoteView())
    assert actions(plan) == {"a": Action.CREATE, "b": Action.CREATE}
    assert plan.summary()["create"] == 2 and plan.has_changes


def test_adopt_a_tagged_batch_with_the_same_spec_hash():
    d = want("a")
    remote = RemoteView(tagged={"a": [batch("batch_1", tags=d.tags())]})
    plan = build_plan([d], None, remote)
    (change,) = plan.changes
    assert change.action is Action.ADOPT and change.found["id"] == "batch_1"


def test_a_tagged_batch_of_another_spec_hash_is_not_adopted():
    d = want("a")
    stale_tags = {**d.tags(), "batchplan_spec": "0" * 32}
    plan = build_plan([d], None, RemoteView(tagged={"a": [batch("batch_1", tags=stale_tags)]}))
    assert [(c.action, c.reason_code.value) for c in plan.changes] == [(Action.CREATE, "no_batch"),
                                                                      (Action.CANCEL, "superseded")]


def test_a_cancelled_or_failed_batch_of_the_spec_is_not_adopted_so_it_runs_again():
    d = want("a")
    for status in ("cancelled", "cancelling", "failed", "expired"):
        plan = build_plan([d], None, RemoteView(tagged={"a": [batch("batch_1", status, d.tags())]}))
        assert actions(plan) == {"a": Action.CREATE}, status


def test_an_ended_batch_in_the_state_gives_way_to_its_running_untracked_replacement():
    d = want("a")
    replacement = batch("batch_2", tags=d.tags(), created_at=1100)
    state = state_with(a=entry_for(d, "batch_1", "cancelled"))
    plan = build_plan([d], state, RemoteView(tagged={"a": [replacement, batch("batch_1", "cancelled", d.tags())]}))
    assert [(c.action, c.reason_code.value) for c in plan.changes] == [(Action.ADOPT, "found_untracked")]
    assert plan.changes[0].found["id"] == "batch_2" and plan.changes[0].batch.id == "batch_1"
    assert render_text(plan) == (
        "batchplan will perform these actions:\n\n"
        "  = a  adopt    the state's batch batch_1 is cancelled, and batch batch_2 of this spec runs but is not "
        "in the state (made by a replace the state does not know of); recording it\n\n"
        "Plan: 1 to adopt, 0 unchanged.\n")


def test_noop_when_state_and_spec_agree():
    d = want("a")
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1", "completed")), RemoteView())
    assert actions(plan) == {"a": Action.NOOP} and not plan.has_changes


def test_replace_when_metadata_changed_names_the_field():
    old = want("a", team="research")
    new = want("a", team="ml")
    plan = build_plan([new], state_with(a=entry_for(old, "batch_1", "in_progress")), RemoteView())
    (change,) = plan.changes
    assert change.action is Action.REPLACE
    assert [(d.path, d.before, d.after) for d in change.diff] == [("metadata.team", "research", "ml")]
    assert change.cancels_old
    assert "will be cancelled" in change.reason


def test_replace_when_input_content_changed():
    old, new = want("a", sha="a" * 64), want("a", sha="b" * 64)
    plan = build_plan([new], state_with(a=entry_for(old, "batch_1", "completed")), RemoteView())
    (change,) = plan.changes
    assert change.action is Action.REPLACE and not change.cancels_old
    assert [d.path for d in change.diff] == ["input_sha256"]


def test_interrupted_replace_adopts_the_new_batch_instead_of_creating_again():
    old, new = want("a", team="research"), want("a", team="ml")
    entry = entry_for(old, "batch_1", "completed",
                      intent=Intent(spec_hash=new.spec_hash, fields=new.fields(), tags=new.tags(), at=900))
    remote = RemoteView(tagged={"a": [batch("batch_2", tags=new.tags())]})
    (change,) = build_plan([new], state_with(a=entry), remote).changes
    assert change.action is Action.REPLACE and change.found["id"] == "batch_2"


def test_an_interrupted_forced_replace_adopts_its_batch_and_cancels_the_old_one():
    d = want("a")
    entry = entry_for(d, "batch_1", "in_progress",
                      intent=Intent(spec_hash=d.spec_hash, fields=d.fields(), tags=d.tags(), at=900))
    remote = RemoteView(tagged={"a": [batch("batch_2", tags=d.tags()), batch("batch_1", tags=d.tags())]})
    for forced in (frozenset(), frozenset({"a"})):  # with or without --replace again: never a third batch
        (change,) = build_plan([d], state_with(a=entry), remote, force_replace=forced).changes
        assert change.action is Action.REPLACE and change.found["id"] == "batch_2" and change.cancels_old


def test_an_untracked_running_batch_of_an_earlier_spec_version_is_cancelled_as_superseded():
    old, new = want("a", team="research"), want("a", team="ml")
    entry = entry_for(new, "batch_1", "completed",
                      intent=Intent(spec_hash=old.spec_hash, fields=old.fields(), tags=old.tags(), at=900))
    remote = RemoteView(tagged={"a": [batch("batch_9", tags={"team": "research", **old.tags()})]})
    plan = build_plan([new], state_with(a=entry), remote)
    assert [(c.action, c.reason_code.value) for c in plan.changes] == [(Action.UPDATE, "intent_resolved"),
                                                                      (Action.CANCEL, "superseded")]
    assert plan.changes[1].cancels_duplicate and plan.changes[1].batch.id == "batch_9"
    assert render_text(plan) == (
        "batchplan will perform these actions:\n\n"
        "  ~ a  update   state only: an interrupted apply's create left nothing to adopt; its intent is dropped, "
        "and batch batch_1 (completed) is kept\n"
        "  - a  cancel   batch batch_9 (in_progress) runs an earlier version of this spec and is not tracked "
        "(made before the state was lost, or by an interrupted apply)\n\n"
        "Plan: 1 to update (state only), 1 to cancel, 0 unchanged.\n")
    (cancel,) = [c for c in json.loads(render_json(plan))["actions"] if c["action"] == "cancel"]
    assert (cancel["reason_code"], cancel["before"]["batch_id"], cancel["before"]["metadata"]) == \
        ("superseded", "batch_9", {"team": "research"})
    assert actions(build_plan([new], state_with(a=entry_for(new, "batch_1", "completed")),
                              RemoteView(tagged={"a": [batch("batch_9", "cancelled", old.tags())]}))) == \
        {"a": Action.NOOP}  # one that ended is left alone


def test_a_superseded_batch_is_not_cancelled_when_the_spec_prevents_cancels():
    old, new = want("a", team="research"), want("a", team="ml", prevent_cancel=True)
    remote = RemoteView(tagged={"a": [batch("batch_9", tags=old.tags())]})
    with pytest.raises(PlanError, match="a: batch batch_9 \\(in_progress\\) runs an earlier version of this spec "
                                        "and is not tracked, and the spec sets lifecycle.prevent_cancel"):
        build_plan([new], None, remote)


def test_force_replace_of_an_unchanged_spec():
    d = want("a")
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1", "failed")), RemoteView(),
                      force_replace=frozenset({"a"}))
    (change,) = plan.changes
    assert change.action is Action.REPLACE and change.reason.startswith("forced by --replace")


def test_removed_spec_cancels_a_running_batch_and_forgets_a_finished_one():
    a, b = want("a"), want("b")
    state = state_with(a=entry_for(a, "batch_1", "completed"), b=entry_for(b, "batch_2", "completed"))
    remote = RemoteView(batches={"batch_2": batch("batch_2", "in_progress")})
    plan = build_plan([], state, remote)
    assert actions(plan) == {"a": Action.FORGET, "b": Action.CANCEL}


def test_prevent_cancel_turns_a_cancel_into_an_error_that_explains_itself():
    d = want("a")
    state = state_with(a=entry_for(d, "batch_1", "in_progress", prevent_cancel=True))
    with pytest.raises(PlanError, match="prevent_cancel"):
        build_plan([], state, RemoteView())


def test_a_batch_gone_from_the_server_is_created_again():
    d = want("a")
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1")), RemoteView(missing=frozenset({"batch_1"})))
    assert actions(plan) == {"a": Action.CREATE}
    assert "no longer exists" in plan.changes[0].reason


def test_failed_batch_is_drift_not_a_silent_recreate():
    d = want("a")
    failed = batch("batch_1", "failed")
    failed["errors"] = {"object": "list", "data": [{"code": "invalid_json_line", "line": 2, "message": "x"}]}
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1")), RemoteView(batches={"batch_1": failed}))
    (change,) = plan.changes
    assert change.action is Action.NOOP
    assert "invalid_json_line" in change.warnings[0] and "--replace a" in change.warnings[0]


def test_a_batch_cancelled_by_hand_is_kept_and_said_one_batchplan_cancelled_is_made_again():
    d = want("a")
    cancelled = batch("batch_1", "cancelled", d.tags())
    remote = RemoteView(batches={"batch_1": cancelled}, tagged={"a": [cancelled]})
    by_hand = build_plan([d], state_with(a=entry_for(d, "batch_1")), remote)
    assert render_text(by_hand) == (
        "    a  noop     batch batch_1 is cancelled\n"
        "      ! batch batch_1 was cancelled outside batchplan; 1/3 requests completed; "
        "`batchplan apply --replace a` runs it again\n\n"
        "No changes. 1 batch(es) match their specs.\n")
    ours = build_plan([d], state_with(a=entry_for(d, "batch_1", cancel_sent="batch_1")), remote)
    assert [(c.action, c.reason_code.value, c.reason) for c in ours.changes] == [
        (Action.CREATE, "no_batch", "batch batch_1 was cancelled by an apply (its spec was removed or replaced) "
                                    "that was cut off before it recorded so")]


def test_a_running_batch_beside_a_completed_one_in_the_state_is_its_duplicate():
    d = want("a")
    late = batch("batch_2", tags=d.tags(), created_at=1100)
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1", "completed")),
                      RemoteView(tagged={"a": [late, batch("batch_1", "completed", d.tags())]}))
    assert [(c.action, c.reason_code.value, c.batch.id) for c in plan.changes] == [
        (Action.NOOP, "up_to_date", "batch_1"), (Action.CANCEL, "duplicate", "batch_2")]


def test_target_limits_the_plan_and_unknown_names_are_an_error():
    plan = build_plan([want("a"), want("b")], None, RemoteView(), targets=frozenset({"b"}))
    assert actions(plan) == {"b": Action.CREATE}
    with pytest.raises(PlanError, match="no spec and no state entry named nope"):
        build_plan([want("a")], None, RemoteView(), targets=frozenset({"nope"}))


def _mixed_plan():
    keep, edit, gone, done = want("keep"), want("edit", team="ml"), want("gone"), want("done")
    state = state_with(keep=entry_for(keep, "batch_k", "completed"),
                       edit=entry_for(want("edit", team="research"), "batch_e", "completed"),
                       gone=entry_for(gone, "batch_g", "in_progress"),
                       done=entry_for(done, "batch_d", "completed"))
    return build_plan([keep, edit, want("new")], state, RemoteView())


def test_rendered_text_plan_as_a_whole_string():
    sha = want("new").input_sha256[:12]
    assert render_text(_mixed_plan()) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  # done  forget   spec removed; batch batch_d is completed, so only the state entry goes\n"
        "  ± edit  replace  changed: metadata.team\n"
        "      ~ metadata.team: \"research\" -> \"ml\"\n"
        "      re-runs 3 requests: batch batch_e already completed\n"
        "  - gone  cancel   spec removed; batch batch_g is in_progress\n"
        "  + new   create   no batch for this spec in the state or on the server\n"
        "      endpoint: /v1/chat/completions\n"
        f"      input: data/x.jsonl (sha256 {sha}, 3 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "\n"
        "Plan: 1 to create, 1 to replace, 1 to cancel, 1 to forget, 1 unchanged.\n"
    )


def test_rendered_text_of_an_empty_plan():
    d = want("a")
    plan = build_plan([d], state_with(a=entry_for(d, "batch_1", "completed")), RemoteView())
    assert render_text(plan) == "No changes. 1 batch(es) match their specs.\n"


def test_json_plan_is_the_documented_public_shape():
    document = json.loads(render_json(_mixed_plan()))
    assert document["format_version"] == "1"
    assert [a["name"] for a in document["actions"]] == ["done", "edit", "gone", "keep", "new"]
    assert set(document["actions"][0]) == {"name", "spec", "shard", "action", "reason", "reason_code", "before",
                                           "after", "estimate", "queued"}
    assert (document["actions"][0]["spec"], document["actions"][0]["shard"]) == ("done", None)
    assert {a["name"]: a["reason_code"] for a in document["actions"]} == {
        "done": "spec_removed", "edit": "parameters_changed", "gone": "spec_removed", "keep": "up_to_date",
        "new": "no_batch"}
    assert document["summary"] == {"create": 1, "adopt": 0, "update": 0, "replace": 1, "retry": 0, "cancel": 1,
                                   "forget": 1, "noop": 1, "cost_usd_min": None, "cost_usd_max": None}  # not estimated: see test_cost.py
    new = document["actions"][-1]
    assert new["before"] is None and new["after"]["metadata"] == {"team": "research"}
    gone = document["actions"][2]
    assert gone["after"] is None and gone["before"]["batch_id"] == "batch_g"
    assert gone["before"] == {"batch_id": "batch_g", "status": "in_progress", "endpoint": "/v1/chat/completions",
                              "completion_window": "24h", "metadata": {"team": "research"},
                              "output_expires_after": None, "input": "data/x.jsonl", "input_sha256": "a" * 64,
                              "input_file_id": None}


def test_reason_codes_say_what_changed_for_machines():
    old = want("a", team="research", sha="a" * 64)
    state = state_with(a=entry_for(old, "batch_1", "completed"))
    codes = {}
    for label, new, forced in (("input", want("a", sha="b" * 64), ()), ("both", want("a", team="ml", sha="b" * 64), ()),
                               ("forced", old, ("a",))):
        (change,) = build_plan([new], state, RemoteView(), force_replace=frozenset(forced)).changes
        codes[label] = change.reason_code.value
    assert codes == {"input": "input_changed", "both": "spec_changed", "forced": "forced"}
    adopted = build_plan([old], None, RemoteView(tagged={"a": [batch("batch_1", tags=old.tags())]}))
    assert json.loads(render_json(adopted))["actions"][0]["reason_code"] == "found_untracked"
    assert json.loads(render_json(adopted))["actions"][0]["after"]["batch_id"] == "batch_1"
    missing = build_plan([old], state, RemoteView(missing=frozenset({"batch_1"})))
    assert missing.changes[0].reason_code.value == "batch_missing"


def test_markdown_plan_has_a_summary_table_and_a_section_per_change():
    text = render_markdown(_mixed_plan())
    assert "| + create | 1 |" in text and "| ± replace | 1 |" in text
    assert "### `±` edit: replace" in text
    assert '```diff\n~ metadata.team: "research" -> "ml"\nre-runs 3 requests: batch batch_e already completed\n```' in text
    assert "keep" not in text  # unchanged batches are counted, not listed


def test_a_cancelling_batch_is_neither_running_nor_finished():
    from reconciler.batch import BatchStatus

    assert [s.value for s in BatchStatus if s.running] == ["validating", "in_progress", "finalizing"]
    assert [s.value for s in BatchStatus if s.terminal] == ["completed", "failed", "expired", "cancelled"]
    assert [s.value for s in BatchStatus if s.failed] == ["failed", "expired", "cancelled"]
    assert BatchStatus("paused_by_a_newer_api") is BatchStatus.UNKNOWN
    d = want("a")
    state = state_with(a=entry_for(d, "batch_1", "cancelling"))
    assert actions(build_plan([], state, RemoteView())) == {"a": Action.FORGET}  # nothing left to cancel
    (change,) = build_plan([d], state, RemoteView(), force_replace=frozenset({"a"})).changes
    assert change.action is Action.REPLACE and not change.cancels_old
    assert not state.entries["a"].batch.terminal  # so refresh keeps asking about it


def test_the_oldest_running_batch_is_kept_and_every_other_one_is_a_duplicate():
    d = want("a")
    older, newer = batch("batch_1", tags=d.tags(), created_at=900), batch("batch_2", tags=d.tags(), created_at=1000)
    state = state_with(a=entry_for(d, "batch_2"))
    plan = build_plan([d], state, RemoteView(batches={"batch_2": newer}, tagged={"a": [newer, older]}))
    assert [(c.action, c.reason_code.value) for c in plan.changes] == [(Action.ADOPT, "keep_oldest"),
                                                                      (Action.CANCEL, "duplicate")]
    assert plan.changes[0].found["id"] == "batch_1" and plan.changes[1].batch.id == "batch_2"
    assert render_text(plan) == (
        "batchplan will perform these actions:\n\n"
        "  = a  adopt    batch batch_1 is the oldest running batch of this spec, so it is kept; the state's batch "
        "batch_2 is cancelled as its duplicate\n"
        "  - a  cancel   duplicate batch batch_2 (in_progress): same spec as batch_1, which is kept (made by a "
        "create whose answer was lost, or by another checkout)\n\n"
        "Plan: 1 to adopt, 1 to cancel, 0 unchanged.\n")
    kept = build_plan([d], state_with(a=entry_for(d, "batch_1")), RemoteView(tagged={"a": [newer, older]}))
    assert [(c.action, c.batch.id) for c in kept.changes] == [(Action.NOOP, "batch_1"), (Action.CANCEL, "batch_2")]


def test_with_none_running_the_oldest_completed_batch_is_adopted_and_a_cancelled_one_never():
    d = want("a")
    tagged = [batch("batch_3", "cancelled", d.tags(), 1200), batch("batch_2", "completed", d.tags(), 1100),
              batch("batch_1", "completed", d.tags(), 1000)]
    (change,) = build_plan([d], None, RemoteView(tagged={"a": tagged})).changes
    assert change.action is Action.ADOPT and change.found["id"] == "batch_1"


def test_a_forced_replace_never_counts_the_batch_it_replaces_as_its_new_one():
    d = want("a")
    state = state_with(a=entry_for(d, "batch_1"))
    remote = RemoteView(tagged={"a": [batch("batch_1", tags=d.tags())]})
    (change,) = build_plan([d], state, remote, force_replace=frozenset({"a"})).changes
    assert change.action is Action.REPLACE and change.found is None and change.cancels_old
    interrupted = state_with(a=entry_for(d, "batch_1", intent=Intent(spec_hash=d.spec_hash, fields=d.fields(),
                                                                     tags=d.tags(), at=0)))
    remote = RemoteView(tagged={"a": [batch("batch_2", tags=d.tags(), created_at=1100),
                                      batch("batch_1", tags=d.tags())]})
    (change,) = build_plan([d], interrupted, remote).changes  # the re-run, with no --replace
    assert (change.action, change.reason_code.value, change.found["id"]) == (Action.REPLACE, "interrupted_replace",
                                                                            "batch_2")
