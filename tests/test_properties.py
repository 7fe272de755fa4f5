"""Property: whatever the specs were and became, apply then plan is always empty."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Repo, run_cli

NAMES = ("a", "b", "c", "d")
spec_sets = st.dictionaries(
    keys=st.sampled_from(NAMES),
    values=st.fixed_dictionaries({
        "input": st.sampled_from(["one", "two", "three"]),           # shared inputs are common
        "team": st.sampled_from(["x", "y"]),
        "expiry": st.sampled_from([None, 3600, 86400]),
    }),
    max_size=4,
)
_counter = itertools.count()


def write_specs(repo: Repo, specs: dict) -> None:
    for old in (repo.root / "specs").glob("*.yaml"):
        old.unlink()
    for name, s in specs.items():
        fields = {"input": f"../data/{s['input']}.jsonl", "metadata": {"team": s["team"]}}
        if s["expiry"]:
            fields["output_expires_after"] = {"anchor": "created_at", "seconds": s["expiry"]}
        repo.spec(name, **fields)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=spec_sets, second=spec_sets, edited=st.sampled_from([None, "one", "two"]))
def test_apply_then_plan_is_empty(tmp_path_factory, sandbox, sandbox_env, first, second, edited):
    repo = Repo(tmp_path_factory.mktemp(f"prop{next(_counter)}"))
    for data in ("one", "two", "three"):
        repo.data(f"{data}.jsonl", count=2, prefix=data)
    args = ("-C", str(repo.root))

    write_specs(repo, first)
    assert run_cli("apply", "--auto-approve", *args, env=sandbox_env).code == 0
    assert run_cli("plan", "--detailed-exitcode", *args, env=sandbox_env).code == 0

    if edited:  # an input's content changes between the two applies
        repo.data(f"{edited}.jsonl", count=3, prefix=edited)
    write_specs(repo, second)
    result = run_cli("apply", "--auto-approve", *args, env=sandbox_env)
    assert result.code == 0, result.out + result.err
    after = run_cli("plan", "--detailed-exitcode", *args, env=sandbox_env)
    assert after.code == 0, after.out

    state = repo.state()["entries"] if repo.state_path.exists() else {}  # no specs ever: no state
    assert sorted(state) == sorted(second)
    live = {b["id"]: b for b in sandbox.emulator.list_batches(limit=100)["data"]}
    for name, entry in state.items():
        assert live[entry["batch"]["id"]]["metadata"]["batchplan_name"] == name
