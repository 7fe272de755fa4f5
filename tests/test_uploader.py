"""The uploader hashes an input while httpx streams it, and never completes an upload of content
that is not the planned one (one mechanism for whole files and shards: shards.ShardReader)."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import xxhash

from reconciler import operations
from reconciler.api import SMALL_UPLOAD
from reconciler.desired import Desired
from reconciler.errors import StalePlanError
from reconciler.operations import PlanRequest
from reconciler.project import Project
from reconciler.uploader import VerifiedSource
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


def test_a_saved_plan_hashes_its_input_as_it_uploads_and_refuses_an_edit_made_after_the_plan(repo, emulator_server,
                                                                                           api_env, monkeypatch):
    """`apply PLANFILE` checks the inputs when it starts (stale plan); an edit after that check, same size,
    is caught by the same hashing upload: nothing named after the planned hash holds other content."""
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    repo.spec("a")
    data = repo.root / "data" / "a.jsonl"
    planfile = repo.root / "tfplan"
    assert run_cli("plan", "--out", str(planfile), "-C", str(repo.root), env=api_env).code == 0
    size = data.stat().st_size

    def edit_the_input(plan) -> None:
        data.write_text(data.read_text().replace('"a-1"', '"a-7"'))
        assert data.stat().st_size == size

    applied = operations.apply(Project.open(chdir=str(repo.root)), PlanRequest(), planfile=planfile,
                               review=edit_the_input, report=lambda name, text: None)
    (why,) = applied.result.failed.values()
    assert why.startswith("data/a.jsonl changed since the plan was made") and "nothing of it was uploaded" in why
    assert emulator_server.emulator.list_files()["data"] == [] and emulator_server.count("POST", "/v1/batches") == 0


def test_an_upload_of_another_size_under_the_planned_name_is_never_reused(repo, emulator_server, api_env):
    repo.spec("a")
    data = repo.root / "data" / "a.jsonl"
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    emulator_server.emulator.upload_bytes(data.read_bytes() + b"\n", f"a.batchplan-{sha}.jsonl", "batch")
    result = run_cli("apply", "--auto-approve", "-C", str(repo.root), env=api_env)
    assert result.code == 0, result.out + result.err
    assert emulator_server.count("POST", "/v1/files") == 1  # uploaded again, at its own size
    batch = emulator_server.emulator.list_batches()["data"][0]
    assert emulator_server.emulator.get_file(batch["input_file_id"])["bytes"] == data.stat().st_size


def test_a_streamed_upload_edited_in_its_first_piece_is_refused_at_its_last_and_leaves_no_thread(
        repo, emulator_server, api_env, monkeypatch):
    """Over SMALL_UPLOAD bytes the body streams in 1 MiB pieces hashed by a second thread; an edit of the
    first piece is still caught before the last piece is sent, and the hashing thread ends either way."""
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    repo.spec("a", input=repo.data("a.jsonl", count=400, content_pad="x" * 10_000))
    data = repo.root / "data" / "a.jsonl"
    assert data.stat().st_size > 3 * SMALL_UPLOAD

    def edit_the_input(plan) -> None:
        data.write_text(data.read_text().replace('"a-0"', '"b-0"', 1))  # same size

    applied = operations.apply(Project.open(chdir=str(repo.root)), PlanRequest(), planfile=None,
                               review=edit_the_input, report=lambda name, text: None)
    (why,) = applied.result.failed.values()
    assert why.startswith("data/a.jsonl changed since the plan was made") and "nothing of it was uploaded" in why
    assert emulator_server.emulator.list_files()["data"] == []
    assert not [t for t in threading.enumerate() if t.name == "upload-sha256"]

    again = run_cli("apply", "--auto-approve", "-C", str(repo.root), env=api_env)
    assert again.code == 0, again.out + again.err
    (file,) = emulator_server.emulator.list_files()["data"]
    assert file["bytes"] == data.stat().st_size


# -- a shard's bytes checked by the xxh3_128 the scan gave it (sha256 stays the address) ----------

def sharded_spec(repo) -> None:
    """`big`, 10 requests in shards of 4: big[0] lines 1-4, big[1] lines 5-8, big[2] lines 9-10."""
    repo.spec("big", input=repo.data("big.jsonl", count=10), shard={"max_requests": 4})


def read_all(source: VerifiedSource) -> bytes:
    with source.open("rb") as reader:
        return b"".join(iter(lambda: reader.read(7), b""))


def test_a_shard_edited_after_the_plan_is_refused_by_its_xxh3_and_the_other_shards_upload(repo, emulator_server,
                                                                                        api_env, monkeypatch):
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    sharded_spec(repo)
    data = repo.root / "data" / "big.jsonl"
    content = data.read_bytes()
    seen: dict[str, Desired] = {}

    def edit_one_shard(plan) -> None:  # big[1]'s bytes, same size
        seen.update((c.name, c.desired) for c in plan.changes)
        data.write_text(data.read_text().replace('"big-5"', '"big-Y"'))

    applied = operations.apply(Project.open(chdir=str(repo.root)), PlanRequest(), planfile=None,
                               review=edit_one_shard, report=lambda name, text: None)
    assert list(applied.result.failed) == ["big[1]"]
    assert applied.result.failed["big[1]"].startswith("data/big.jsonl lines 5-8 changed since the plan was made")
    uploaded = sorted(f["filename"] for f in emulator_server.emulator.list_files()["data"] if f["purpose"] == "batch")
    assert uploaded == sorted(f"big.batchplan-{seen[n].input_sha256}.jsonl" for n in ("big[0]", "big[2]"))

    shard = seen["big[1]"].shard
    assert shard.xxh3 == xxhash.xxh3_128(content[shard.start:shard.end]).hexdigest()
    source = VerifiedSource(data, seen["big[1]"], lambda n: None)
    with pytest.raises(StalePlanError, match=rf"\(xxh3_128 [0-9a-f]{{12}}, expected {shard.xxh3[:12]}\)"):
        read_all(source)
    assert source.reader.tell() < shard.size  # its last bytes were never handed out
    assert read_all(VerifiedSource(data, seen["big[0]"], lambda n: None)) == data.read_bytes()[:shard.start]


def test_a_plan_file_of_the_previous_format_applies_and_checks_its_shards_by_sha256(repo, emulator_server, api_env,
                                                                                  monkeypatch):
    """A plan file written before Shard.xxh3 (no `xxh3` in its shards) still applies; an edit made after
    its inputs were checked is still refused, by the sha256 each shard's upload falls back to."""
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    sharded_spec(repo)
    data = repo.root / "data" / "big.jsonl"
    planfile = repo.root / "tfplan"
    assert run_cli("plan", "--out", str(planfile), "-C", str(repo.root), env=api_env).code == 0
    document = json.loads(planfile.read_text())
    shards = [c["desired"]["shard"] for c in document["changes"]]
    content = data.read_bytes()
    assert [s["xxh3"] for s in shards] == [xxhash.xxh3_128(content[s["start"]:s["end"]]).hexdigest() for s in shards]
    for shard in shards:
        del shard["xxh3"]
    planfile.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    seen: dict[str, Desired] = {}

    def edit_after_the_check(plan) -> None:
        seen.update((c.name, c.desired) for c in plan.changes)
        data.write_text(data.read_text().replace('"big-9"', '"big-Z"'))  # big[2], same size

    applied = operations.apply(Project.open(chdir=str(repo.root)), PlanRequest(), planfile=planfile,
                               review=edit_after_the_check, report=lambda name, text: None)
    assert [d.shard.xxh3 for d in seen.values()] == ["", "", ""]
    assert list(applied.result.failed) == ["big[2]"]
    assert "changed since the plan was made" in applied.result.failed["big[2]"]
    with pytest.raises(StalePlanError, match=r"\(sha256 [0-9a-f]{12}, expected "):
        read_all(VerifiedSource(data, seen["big[2]"], lambda n: None))

    data.write_bytes(content)
    assert run_cli("plan", "--out", str(planfile), "-C", str(repo.root), env=api_env).code == 0
    document = json.loads(planfile.read_text())
    for change in document["changes"]:
        if change["desired"]:
            del change["desired"]["shard"]["xxh3"]
    planfile.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    again = run_cli("apply", str(planfile), "-C", str(repo.root), env=api_env)
    assert again.code == 0, again.out + again.err
    inputs = [f for f in emulator_server.emulator.list_files()["data"] if f["purpose"] == "batch"]
    assert sorted(f["bytes"] for f in inputs) == sorted(s["end"] - s["start"] for s in shards)
