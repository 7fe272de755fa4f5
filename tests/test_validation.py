"""Issue 3: every mistake in a spec or an input file is caught locally, before anything is sent.

Each mistake is tried in `validate`, `plan` and `apply --auto-approve`: exit 1, a message
that names the file and the field or line, no traceback, and not one request to the server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.inputs import MAX_BYTES, hash_file, scan_input
from tests.helpers import ENDPOINT, Repo, request_line, run_cli, write_jsonl

COMMANDS = {
    "validate": ("validate",),
    "plan": ("plan",),
    "apply": ("apply", "--auto-approve"),
}


@dataclass(frozen=True)
class Mistake:
    """A repo with one mistake in it, and the fragments its message must contain."""

    name: str
    make: Callable[[Repo], None]
    expect: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


def _yaml(repo: Repo, file: str, text: str) -> None:
    (repo.root / "specs" / file).write_text(text)


def _data(repo: Repo, file: str, lines: list) -> None:
    write_jsonl(repo.root / "data" / file, lines)


def _spec_with_data(repo: Repo, lines: list, endpoint: str = ENDPOINT) -> None:
    _data(repo, "a.jsonl", lines)
    repo.spec("a", input="../data/a.jsonl", endpoint=endpoint)


def _spec_with_bytes(repo: Repo, content: bytes) -> None:
    (repo.root / "data" / "a.jsonl").write_bytes(content)
    repo.spec("a", input="../data/a.jsonl")


@functools.cache
def _too_many_requests() -> bytes:
    line = '{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n'
    return "".join(line % i for i in range(50_001)).encode()


def _sparse_file(repo: Repo, size: int) -> None:
    path = repo.root / "data" / "a.jsonl"
    with path.open("wb") as fh:
        fh.truncate(size)  # no blocks written: a 200 MB test file costs nothing


def _outside_secret(repo: Repo) -> Path:
    secret = repo.root.parent / "ci-secret.txt"
    secret.write_text('{"token": "hunter2"}\n')
    return secret


def _symlink_to_secret(repo: Repo) -> None:
    (repo.root / "data" / "link.jsonl").symlink_to(_outside_secret(repo))
    repo.spec("a", input="../data/link.jsonl")


def _traversal_to_secret(repo: Repo) -> None:
    _outside_secret(repo)
    repo.spec("a", input="../../ci-secret.txt")


SPEC = "name: a\ninput: ../data/a.jsonl\nendpoint: /v1/chat/completions\n"

MISTAKES = [
    # -- specs ---------------------------------------------------------------------------
    Mistake("unknown field", lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + "metdata:\n  team: x\n")),
            ("specs/a.yaml:4: metdata: unknown field; did you mean 'metadata'?",)),
    Mistake("unknown nested field",
            lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + "lifecycle:\n  prevent_cancle: true\n")),
            ("specs/a.yaml:5: lifecycle.prevent_cancle: unknown field; did you mean 'prevent_cancel'?",)),
    Mistake("missing name",
            lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC.replace("name: a\n", ""))),
            ("specs/a.yaml:1: name: missing; every spec needs a unique name",)),
    Mistake("bad name", lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC.replace("name: a", "name: has space"))),
            ("specs/a.yaml:1: name: 'has space': use 1-128 letters, digits",)),
    Mistake("duplicate names across files", lambda r: (r.spec("a", file="one.yaml"), r.spec("a", file="two.yaml")),
            ("specs/two.yaml:1: name: duplicate name 'a', also used at specs/one.yaml:1",)),
    Mistake("field given twice", lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + "name: b\n")),
            ("specs/a.yaml:4: name: given twice (lines 1 and 4)",)),
    Mistake("input and input_file_id", lambda r: r.spec("a", input=r.data("a.jsonl"), input_file_id="file-abc"),
            ("specs/a.yaml:", "input_file_id: give exactly one of input", "not both")),
    Mistake("neither input nor input_file_id", lambda r: _yaml(r, "a.yaml", "name: a\nendpoint: /v1/embeddings\n"),
            ("specs/a.yaml:1: input: missing; give input (a JSONL file in this repo) or input_file_id",)),
    Mistake("unknown endpoint", lambda r: r.spec("a", endpoint="/v1/chat/completion"),
            ("specs/a.yaml:2: endpoint: '/v1/chat/completion' is not an endpoint the Batch API accepts; "
             "did you mean '/v1/chat/completions'?",)),
    Mistake("missing endpoint", lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", "name: a\ninput: ../data/a.jsonl\n")),
            ("specs/a.yaml:1: endpoint: missing; say which endpoint",)),
    Mistake("completion window", lambda r: r.spec("a", completion_window="48h"),
            ("specs/a.yaml:2: completion_window: '48h' is not supported; the Batch API only accepts '24h'",)),
    Mistake("too many metadata keys", lambda r: r.spec("a", metadata={f"k{i}": "v" for i in range(15)}),
            ("specs/a.yaml:2: metadata: 15 keys is too many: the API allows 16 and batchplan uses 2",
             "a spec may have at most 14")),
    Mistake("reserved metadata key", lambda r: r.spec("a", metadata={"team": "x", "batchplan_name": "b"}),
            ("specs/a.yaml:4: metadata.batchplan_name: keys starting with 'batchplan_' are reserved",)),
    Mistake("metadata key too long", lambda r: r.spec("a", metadata={"k" * 65: "v"}),
            ("specs/a.yaml:3: metadata: key 'kkkk", "is 65 characters; the API allows at most 64")),
    Mistake("metadata value too long", lambda r: r.spec("a", metadata={"team": "v" * 513}),
            ("specs/a.yaml:3: metadata.team: value is 513 characters; the API allows at most 512",)),
    Mistake("metadata value not a string", lambda r: r.spec("a", metadata={"year": 2024}),
            ("specs/a.yaml:3: metadata.year: values must be strings, not 2024 (quote numbers",)),
    Mistake("expiry anchor", lambda r: r.spec("a", output_expires_after={"anchor": "last_active", "seconds": 3600}),
            ("specs/a.yaml:3: output_expires_after.anchor: 'last_active' is not supported; "
             "the only anchor the API accepts is 'created_at'",)),
    Mistake("expiry too short", lambda r: r.spec("a", output_expires_after={"anchor": "created_at", "seconds": 60}),
            ("specs/a.yaml:4: output_expires_after.seconds: 60 is out of range; use 3600 (1 hour) to 2592000",)),
    Mistake("expiry too long",
            lambda r: r.spec("a", output_expires_after={"anchor": "created_at", "seconds": 2_592_001}),
            ("specs/a.yaml:4: output_expires_after.seconds: 2592001 is out of range",)),
    Mistake("missing input file", lambda r: r.spec("a", input="../data/nope.jsonl"),
            ("specs/a.yaml:2: input: '../data/nope.jsonl' does not exist (looked for data/nope.jsonl",)),
    Mistake("YAML syntax error", lambda r: _yaml(r, "a.yaml", "name: a\nendpoint: [oops\ninput: x\n"),
            ("specs/a.yaml:3: YAML syntax error: ", "expected ',' or ']'", "flow sequence that starts on line 2")),
    Mistake("not a mapping", lambda r: _yaml(r, "a.yaml", "- name: a\n"),
            ("specs/a.yaml:1: document 1 must be a mapping of fields",)),
    # -- security ------------------------------------------------------------------------
    Mistake("input outside the repo", _traversal_to_secret,
            ("specs/a.yaml:2: input: '../../ci-secret.txt' resolves to", "outside the repository",
             "cannot send local secrets")),
    Mistake("input symlinked outside the repo", _symlink_to_secret,
            ("specs/a.yaml:2: input: '../data/link.jsonl' resolves to", "ci-secret.txt, outside the repository")),
    Mistake("absolute input path", lambda r: r.spec("a", input="/etc/passwd"),
            ("specs/a.yaml:2: input: '/etc/passwd' resolves to /etc/passwd, outside the repository",)),
    # -- input files ---------------------------------------------------------------------
    Mistake("invalid JSON line", lambda r: _spec_with_data(r, [request_line("a"), '{"custom_id": "b",', ]),
            ("data/a.jsonl:2: not valid JSON",)),
    Mistake("byte order mark", lambda r: _spec_with_bytes(r, b"\xef\xbb\xbf" + json.dumps(request_line("a")).encode()),
            ("data/a.jsonl:1: the file starts with a byte order mark (BOM); save it as UTF-8 without one",)),
    Mistake("not UTF-8", lambda r: _spec_with_bytes(r, '{"custom_id": "caf\u00e9"}'.encode("latin-1")),
            ("data/a.jsonl:1: not UTF-8 text; save the file as UTF-8",)),
    Mistake("empty line", lambda r: _spec_with_data(r, [request_line("a"), "", request_line("b")]),
            ("data/a.jsonl:2: empty line; remove it",)),
    Mistake("line not an object", lambda r: _spec_with_data(r, [request_line("a"), [1, 2]]),
            ("data/a.jsonl:2: the line is a JSON array, not an object",)),
    Mistake("line missing fields", lambda r: _spec_with_data(r, [{"custom_id": "a", "method": "POST"}]),
            ("data/a.jsonl:1: url: missing url and body; each line needs custom_id, method, url and body",)),
    Mistake("method not POST", lambda r: _spec_with_data(r, [{**request_line("a"), "method": "GET"}]),
            ('data/a.jsonl:1: method: must be "POST", not \'GET\'',)),
    Mistake("url not the endpoint",
            lambda r: _spec_with_data(r, [request_line("a"), request_line("b", url="/v1/embeddings")]),
            ("data/a.jsonl:2: url: '/v1/embeddings' does not match the spec's endpoint '/v1/chat/completions'",)),
    Mistake("duplicate custom_id",
            lambda r: _spec_with_data(r, [request_line("x"), request_line("y"), request_line("x")]),
            ("data/a.jsonl:3: custom_id: 'x' is used on line 1 and line 3",)),
    Mistake("two models", lambda r: _spec_with_data(r, [request_line("a"), request_line("b", model="gpt-4o")]),
            ("data/a.jsonl:2: body.model: 'gpt-4o' differs from 'gpt-4o-mini' on line 1; a batch uses one model",)),
    Mistake("empty file", lambda r: (_data(r, "a.jsonl", []), r.spec("a", input="../data/a.jsonl")),
            ("data/a.jsonl: the file holds no requests", "(input of specs/a.yaml:2)")),
    Mistake("shard.max_requests 0",
            lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + "shard:\n  max_requests: 0\n")),
            ("specs/a.yaml:5: shard.max_requests: 0 is out of range; use 1 to 50,000 requests, the Batch API's "
             "limit per batch",)),
    Mistake("shard.max_bytes over the API's limit",
            lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + f"shard:\n  max_bytes: {MAX_BYTES + 1}\n")),
            ("specs/a.yaml:5: shard.max_bytes: 209715201 is out of range; use 1 to 209,715,200 bytes (200 MB)",)),
    Mistake("unknown key under shard",
            lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + "shard:\n  max_request: 9\n")),
            ("specs/a.yaml:5: shard.max_request: unknown field; did you mean 'max_requests'?",)),
    Mistake("a line over 200 MB", lambda r: (_sparse_file(r, MAX_BYTES + 1), r.spec("a", input="../data/a.jsonl")),
            ("data/a.jsonl:1: the line is 209,715,201 bytes; no batch can hold a line over 200 MB (the Batch API's "
             "file limit): shorten it",)),
    Mistake("a line over shard.max_bytes",
            lambda r: (r.data("a.jsonl"), _yaml(r, "a.yaml", SPEC + "shard:\n  max_bytes: 100\n")),
            ("data/a.jsonl:1: the line is ", "bytes, more than the spec's shard.max_bytes (100)")),
    Mistake("first 20 problems and how many more",
            lambda r: _spec_with_data(r, [request_line("a")] + ["nope"] * 25),
            ("data/a.jsonl:21: not valid JSON", "data/a.jsonl: ... and 5 more problems in this file")),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mistake", MISTAKES, ids=str)
def test_every_mistake_fails_before_anything_is_sent(mistake, command, repo, sandbox, sandbox_env):
    mistake.make(repo)
    result = run_cli(*COMMANDS[command], "-C", str(repo.root), env=sandbox_env)
    text = result.out + result.err
    assert result.code == 1, text
    for fragment in mistake.expect:
        assert fragment in text
    assert "nothing was sent or written" in text
    assert "Traceback" not in text and "Internal error" not in text
    assert sandbox.count() == 0
    assert not repo.state_path.exists()


def test_every_problem_is_listed_not_only_the_first(repo):
    repo.spec("a", completion_window="48h", metadata={"year": 2024})
    _yaml(repo, "b.yaml", "name: b\nendpoint: /v1/nope\n")
    result = run_cli("validate", "-C", str(repo.root))
    assert result.code == 1
    assert result.err.splitlines()[1:] == [
        "specs/a.yaml:2: completion_window: '48h' is not supported; the Batch API only accepts '24h' "
        "(or leave the field out)",
        "specs/a.yaml:4: metadata.year: values must be strings, not 2024 (quote numbers and booleans in YAML)",
        "specs/b.yaml:1: input: missing; give input (a JSONL file in this repo) or input_file_id "
        "(a file already uploaded)",
        "specs/b.yaml:2: endpoint: '/v1/nope' is not an endpoint the Batch API accepts; use one of: "
        "/v1/responses, /v1/chat/completions, /v1/embeddings, /v1/completions, /v1/moderations, "
        "/v1/images/generations, /v1/images/edits, /v1/videos",
    ]
    assert result.err.startswith("Error: 4 problems found; nothing was sent or written\n")


def test_a_file_shared_by_two_specs_is_reported_once(repo):
    _data(repo, "shared.jsonl", [request_line("a"), request_line("a")])
    repo.spec("one", input="../data/shared.jsonl")
    repo.spec("two", input="../data/shared.jsonl")
    result = run_cli("validate", "-C", str(repo.root))
    assert result.code == 1
    assert result.err.count("data/shared.jsonl:2: custom_id") == 1


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_missing_api_key_names_the_variable_and_sends_nothing(command, repo, sandbox, sandbox_env):
    repo.spec("a")
    result = run_cli(*COMMANDS[command], "-C", str(repo.root), env={**sandbox_env, "OPENAI_API_KEY": None})
    assert result.code == 1
    assert "OPENAI_API_KEY is not set" in result.err and "--sandbox" in result.err
    assert "Traceback" not in result.err
    assert sandbox.count() == 0
    assert not repo.state_path.exists()


def test_validate_needs_no_key_and_no_network(repo):
    """A separate process whose every socket is refused by an audit hook, with no key set.

    It also must not load what only talking to the server needs (start-up time, issue 5)."""
    repo.spec("a")
    repo.spec("b", input=repo.data("b.jsonl", count=5))
    probe = (
        "import sys\n"
        "def no_network(event, args):\n"
        "    if event.startswith('socket.'):\n"
        "        raise RuntimeError('validate opened a socket: ' + event)\n"
        "sys.addaudithook(no_network)\n"
        "from reconciler.cli import main\n"
        "HEAVY = ('httpx', 'deepdiff', 'rich', 'asyncio', 'filelock', 'reconciler.state')\n"
        "try:\n"
        "    main(['validate', '-C', sys.argv[1]])\n"
        "finally:\n"
        "    print('loaded:', sorted(m for m in HEAVY if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    done = subprocess.run([sys.executable, "-c", probe, str(repo.root)], env={**env, "NO_COLOR": "1"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2 spec(s) valid; 2 input file(s), 8 request(s).\nloaded: []\n"


def _apply(repo: Repo, env: dict) -> None:
    result = run_cli("apply", "--auto-approve", "-C", str(repo.root), env=env)
    assert result.code == 0, result.out + result.err


def test_a_file_shared_by_two_specs_is_uploaded_once(repo, sandbox, sandbox_env):
    repo.spec("one", input=repo.data("shared.jsonl"))
    repo.spec("two", input="../data/shared.jsonl")
    write_jsonl(repo.root / "data" / "copy.jsonl", [request_line(f"shared-{i}") for i in range(3)])
    repo.spec("three", input="../data/copy.jsonl")  # another path, the same content
    _apply(repo, sandbox_env)
    assert sandbox.count("POST", "/v1/files") == 1
    assert sandbox.count("POST", "/v1/batches") == 3
    state = repo.state()
    assert len(state["uploads"]) == 1


def test_a_changed_input_file_plans_replace(repo, sandbox, sandbox_env):
    repo.spec("a")
    _apply(repo, sandbox_env)
    write_jsonl(repo.root / "data" / "a.jsonl", [request_line(f"a-{i}") for i in range(4)])
    result = run_cli("plan", "--json", "-C", str(repo.root), env=sandbox_env)
    assert result.code == 0, result.err
    (action,) = result.json["actions"]
    assert action["action"] == "replace"
    assert "input_sha256" in action["reason"]


def _set_old_mtime(path: Path, ns: int = 1_600_000_000 * 10**9) -> None:
    os.utime(path, ns=(ns, ns))


def test_the_hash_cache_keys_on_path_size_and_mtime(repo, sandbox, sandbox_env):
    repo.spec("a")
    data = repo.root / "data" / "a.jsonl"
    _set_old_mtime(data)  # as after a checkout; a file written this instant is not cached (racy)
    _apply(repo, sandbox_env)
    cache = json.loads((repo.root / "state" / "cache.json").read_text())
    entry = cache["entries"][str(data.resolve())]
    assert entry["sha256"] == hash_file(data) and entry["size"] == data.stat().st_size
    assert entry["mtime_ns"] == data.stat().st_mtime_ns and entry["endpoint"] == ENDPOINT

    # Same size, same mtime: the cached hash is trusted and the file is not read again,
    # so even a same-length edit that keeps the old mtime goes unseen (as in make and git).
    original = data.read_bytes()
    data.write_bytes(original.replace(b"a-0", b"z-0"))
    _set_old_mtime(data)
    assert run_cli("plan", "--detailed-exitcode", "-C", str(repo.root), env=sandbox_env).code == 0

    # A real edit moves the mtime: the file is read again and the spec plans replace.
    os.utime(data)
    result = run_cli("plan", "--json", "-C", str(repo.root), env=sandbox_env)
    assert [a["action"] for a in result.json["actions"]] == ["replace"]


def test_a_file_written_just_now_is_not_cached(repo):
    repo.spec("a")
    assert run_cli("validate", "-C", str(repo.root)).code == 0
    assert not (repo.root / "state" / "cache.json").exists()


def test_an_invalid_file_is_not_cached(repo):
    _spec_with_data(repo, [request_line("a"), "oops"])
    _set_old_mtime(repo.root / "data" / "a.jsonl")
    assert run_cli("validate", "-C", str(repo.root)).code == 1
    assert run_cli("validate", "-C", str(repo.root)).code == 1  # checked again, not remembered as good


# -- the scanner, property-tested ----------------------------------------------------------

custom_ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
request_lists = st.lists(custom_ids, min_size=1, max_size=30, unique=True)


def _scan_lines(tmp: Path, lines: list, endpoint: str = ENDPOINT):
    path = write_jsonl(tmp / "input.jsonl", lines)
    return scan_input(path, endpoint), path


@settings(max_examples=60, deadline=None)
@given(ids=request_lists)
def test_any_list_of_distinct_valid_requests_is_ok(tmp_path_factory, ids):
    report, path = _scan_lines(tmp_path_factory.mktemp("scan"), [request_line(i) for i in ids])
    assert report.ok and report.requests == len(ids)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.models == ["gpt-4o-mini"]


@settings(max_examples=60, deadline=None)
@given(ids=request_lists, data=st.data())
def test_a_duplicate_custom_id_is_reported_with_both_lines(tmp_path_factory, ids, data):
    original = data.draw(st.integers(0, len(ids) - 1))
    at = data.draw(st.integers(original + 1, len(ids)))
    lines = [request_line(i) for i in ids]
    lines.insert(at, request_line(ids[original]))
    report, _ = _scan_lines(tmp_path_factory.mktemp("scan"), lines)
    (problem,) = report.problems
    assert problem.code == "duplicate_custom_id" and problem.line == at + 1
    assert f"used on line {original + 1} and line {at + 1}" in problem.message


@settings(max_examples=60, deadline=None)
@given(ids=request_lists, data=st.data())
def test_a_broken_line_is_reported_at_its_line(tmp_path_factory, ids, data):
    at = data.draw(st.integers(0, len(ids)))
    broken = data.draw(st.sampled_from(['{"custom_id": ', "[1, 2]", '"text"', "{}", "null"]))
    lines = [request_line(i) for i in ids]
    lines.insert(at, broken)
    report, _ = _scan_lines(tmp_path_factory.mktemp("scan"), lines)
    assert [p.line for p in report.problems] == [at + 1]
    assert report.requests == len(ids) + 1


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=8), trailing_newline=st.booleans())
def test_lines_that_span_read_chunks_are_parsed_whole(tmp_path_factory, sizes, trailing_newline):
    """Lines of any length, cut anywhere by the 1 MiB reads, come out whole and in order."""
    lines = [request_line(f"id-{n}", padding="x" * size) for n, size in enumerate(sizes)]
    text = "\n".join(json.dumps(line) for line in lines) + ("\n" if trailing_newline else "")
    path = tmp_path_factory.mktemp("scan") / "input.jsonl"
    path.write_text(text)
    report = scan_input(path, ENDPOINT, chunk_size=64)  # tiny reads: every line spans chunks
    assert report.ok and report.requests == len(sizes)
    assert report.sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_a_file_large_enough_to_be_hashed_in_the_background_gets_the_same_report(tmp_path):
    from reconciler.inputs import _BackgroundHash

    padding = "x" * 4000
    count = _BackgroundHash.PIECE // 4000 + 10  # a little over one background read
    lines = [request_line(f"r{i}", padding=padding) for i in range(count)]
    lines.append(request_line("r7", padding=padding))
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    assert path.stat().st_size > _BackgroundHash.PIECE
    report = scan_input(path, ENDPOINT)
    assert report.sha256 == hash_file(path) and report.requests == count + 1
    assert [(p.code, p.line) for p in report.problems] == [("duplicate_custom_id", count + 1)]


def _upload_as_a_crashed_run_would(server, path: Path, content: bytes | None = None) -> str:
    """Upload `path` under the name apply gives it (its content hash inside), as a run that died
    before recording the upload would have left it."""
    name = f"{path.stem}.batchplan-{hash_file(path)}.jsonl"
    return server.emulator.upload_bytes(content if content is not None else path.read_bytes(), name, "batch")["id"]


def test_an_upload_left_by_a_crashed_run_is_found_by_hash_and_reused(repo, sandbox, sandbox_env):
    repo.spec("a")
    file_id = _upload_as_a_crashed_run_would(sandbox, repo.root / "data" / "a.jsonl")
    sandbox.reset_log()
    _apply(repo, sandbox_env)
    assert sandbox.count("POST", "/v1/files") == 0
    assert sandbox.count("GET", "/v1/files") == 2  # the plan's search lists the uploads, and the uploader finds it
    (upload,) = repo.state()["uploads"].values()
    assert upload["file_id"] == file_id


def test_a_file_with_the_hash_in_its_name_but_another_size_is_not_reused(repo, sandbox, sandbox_env):
    repo.spec("a")
    data = repo.root / "data" / "a.jsonl"
    _upload_as_a_crashed_run_would(sandbox, data, content=data.read_bytes()[:-40] + b"\n")
    sandbox.reset_log()
    _apply(repo, sandbox_env)
    assert sandbox.count("POST", "/v1/files") == 1
    (upload,) = repo.state()["uploads"].values()
    assert upload["bytes"] == data.stat().st_size
