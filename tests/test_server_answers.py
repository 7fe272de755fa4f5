"""A server answer that is not what the API sends is one line naming the request and the field (issue 18, 14).

The emulator's `damage` fault makes fields null or leaves them out of its real answers; the
commands must end with exit 1 and that one line, never a traceback or a KeyError.
"""

from __future__ import annotations

import pytest

from reconciler.sandbox import Fault, Timing
from tests.helpers import Repo, env_for, run_cli


def cli(repo: Repo, *args: str, env: dict):
    return run_cli(*args, "-C", str(repo.root), env=env)


@pytest.fixture
def running(repo, sandbox_factory):
    """A repo with one spec whose batch is running (the state records it), and its sandbox."""
    sandbox = sandbox_factory(timing=Timing.uniform(60))
    (repo.root / "batchplan.yaml").write_text("max_retries: 0\n")
    repo.spec("s0")
    assert cli(repo, "apply", "--auto-approve", env=env_for(sandbox)).code == 0
    return sandbox


@pytest.mark.parametrize("fields, said", [
    (("status",), "data[0].status is null, where a string belongs"),
    (("created_at",), "data[0].created_at is null, where an integer belongs"),
    (("id",), "data[0].id is null, where a string belongs"),
    (("data",), "data is null, where a list belongs"),
])
def test_a_list_answer_with_a_null_is_one_line_naming_the_field(repo, running, fields, said):
    running.add_fault(Fault(action="damage", method="GET", path="/v1/batches", set_null=fields, times=None))
    (repo.root / "state" / "batchplan.state.json").unlink()  # plan walks the list to find the batch again
    result = cli(repo, "plan", env=env_for(running))
    assert (result.code, result.out) == (1, "")
    assert result.err == f"Error: GET /batches: unexpected answer from the server: {said}\n"


def test_a_batch_answer_with_a_null_status_is_one_line(repo, running):
    running.add_fault(Fault(action="damage", method="GET", path_regex="^/v1/batches/batch_", set_null=("status",),
                            times=None))
    result = cli(repo, "status", "s0", env=env_for(running))
    assert result.code == 1 and "Traceback" not in result.err
    assert result.err in ("Error: GET /batches/{id}: unexpected answer from the server: status is null, where a "
                          "string belongs\n",
                          "Error: GET /batches: unexpected answer from the server: data[0].status is null, where "
                          "a string belongs\n")


def test_a_create_answer_without_an_id_fails_that_spec_and_keeps_its_intent(repo, sandbox):
    env = env_for(sandbox)
    (repo.root / "batchplan.yaml").write_text("max_retries: 0\n")
    repo.spec("s0")
    sandbox.add_fault(Fault(action="damage", method="POST", path="/v1/batches", remove=("id",)))
    result = cli(repo, "apply", "--auto-approve", env=env)
    assert result.code == 1
    assert "  s0: failed: POST /batches: unexpected answer from the server: id is missing\n" in result.out
    assert repo.state()["entries"]["s0"]["intent"] is not None  # it may exist: the next apply looks first
    again = cli(repo, "apply", "--auto-approve", env=env)
    assert again.code == 0, again.err
    assert "  s0: adopted batch_" in again.out  # the plan found it by its tags: never made twice
    assert len(sandbox.emulator.list_batches(limit=10)["data"]) == 1


def test_an_upload_answer_with_a_null_size_fails_that_spec(repo, sandbox):
    (repo.root / "batchplan.yaml").write_text("max_retries: 0\n")
    repo.spec("s0")
    sandbox.add_fault(Fault(action="damage", method="POST", path="/v1/files", set_null=("bytes",)))
    result = cli(repo, "apply", "--auto-approve", env=env_for(sandbox))
    assert result.code == 1
    assert "  s0: failed: POST /files: unexpected answer from the server: bytes is null, where an integer " \
           "belongs\n" in result.out
