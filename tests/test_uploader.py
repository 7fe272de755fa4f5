"""The uploader hashes an input while httpx streams it, and never completes an upload of content
that is not the planned one (one mechanism for whole files and shards: shards.ShardReader)."""

from __future__ import annotations

import hashlib

from reconciler import operations
from reconciler.operations import PlanRequest
from reconciler.project import Project
from tests.helpers import run_cli


def test_an_input_edited_after_the_plan_is_not_uploaded_as_the_planned_one(repo, emulator_server, api_env,
                                                                          monkeypatch):
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    repo.spec("a")
    data = repo.root / "data" / "a.jsonl"

    def edit_the_input(plan) -> None:  # between the plan and the upload: same size, other content
        data.write_text(data.read_text().replace('"a-0"', '"a-9"'))

    reported: list[str] = []
    applied = operations.apply(Project.open(chdir=str(repo.root)), PlanRequest(), planfile=None,
                               review=edit_the_input, report=lambda name, text: reported.append(f"{name}: {text}"))
    (why,) = applied.result.failed.values()
    assert why.startswith("data/a.jsonl changed since the plan was made (the plan hashed it as sha256 ")
    assert "nothing of it was uploaded" in why and "Run `batchplan plan`" in why
    assert emulator_server.emulator.list_files()["data"] == []  # the body was never completed
    assert emulator_server.count("POST", "/v1/batches") == 0
    assert repo.state()["entries"] == {}  # its intent was dropped: nothing was made

    again = run_cli("apply", "--auto-approve", "-C", str(repo.root), env=api_env)
    assert again.code == 0, again.out + again.err
    (file,) = emulator_server.emulator.list_files()["data"]
    assert hashlib.sha256(data.read_bytes()).hexdigest() in file["filename"]
