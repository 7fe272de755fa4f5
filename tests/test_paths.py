"""Issue 18 (paths) and the local parts of 15: every path a user names stays in the repository.

Spec files, inputs, `output:` / `errors:`, the directories batchplan.yaml names, the
state file and the inputs a saved plan names are resolved (symlinks included) and refused
when they leave the repository or land on batchplan's own files. Every refusal is one
clear message, exit 1, with nothing sent to the server and nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reconciler.inputs import HashCache
from tests.helpers import Repo, applied, run_cli, spawn_cli, waited

@pytest.fixture
def server(emulator_server):
    """conftest's sandbox on loopback (0.05 s steps), under a short name."""
    return emulator_server


@pytest.fixture
def env(api_env) -> dict:
    return api_env


def cli(repo: Repo, env: dict | None, *args: str):
    return run_cli(*args, "-C", str(repo.root), env=env or {"NO_COLOR": "1"})


def finished(repo: Repo, env: dict) -> None:
    """Apply every spec and wait until its batch has finished."""
    applied(repo, env)
    waited(repo, env)


def outside(repo: Repo, name: str = "elsewhere") -> Path:
    """A directory next to the repository, outside it."""
    path = repo.root.parent / name
    path.mkdir(exist_ok=True)
    return path


def refused(result, *fragments: str) -> None:
    assert result.code == 1, (result.out, result.err)
    assert "Traceback" not in result.err and "Internal error" not in result.err, result.err
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)


# -- 5: output: and errors: only under the results directory ------------------------------------


@pytest.mark.parametrize("dest, fragment", [
    ("state/batchplan.state.json", "is not under the results directory results/"),
    ("specs/a.yaml", "is not under the results directory results/"),
    ("data/a.jsonl", "is not under the results directory results/"),
    (".git/config", "is not under the results directory results/"),
    ("batchplan.yaml", "is not under the results directory results/"),
    ("out/a.jsonl", "is not under the results directory results/"),
    ("results/.batchplan-downloads.json", "is the download manifest"),
])
def test_output_may_not_name_a_file_outside_the_results_directory(repo, server, env, dest, fragment):
    (repo.root / ".git").mkdir()
    (repo.root / ".git" / "config").write_text("[core]\n")
    repo.spec("a", output=dest)
    finished(repo, env)
    before = {p: p.read_bytes() for p in repo.root.rglob("*") if p.is_file() and "results" not in p.parts}
    downloads = server.count("GET", "/v1/files/")

    result = cli(repo, env, "download")
    refused(result, "specs/a.yaml:", f"output: {dest!r}", fragment)
    assert server.count("GET", "/v1/files/") == downloads  # nothing fetched
    assert {p: p.read_bytes() for p in before} == before
    assert not (repo.root / "results" / "a").exists()


def test_results_directory_may_hold_the_state_but_output_never_overwrites_it(repo, server, env):
    (repo.root / "batchplan.yaml").write_text("results: state\n")
    repo.spec("a", errors="state/batchplan.state.json")
    finished(repo, env)
    state = repo.state_path.read_bytes()

    result = cli(repo, env, "download")
    refused(result, "specs/a.yaml:", "errors: 'state/batchplan.state.json' is the state file")
    assert repo.state_path.read_bytes() == state


def test_output_may_not_overwrite_an_input_under_the_results_directory(repo, server, env):
    repo.spec("first", input=repo.data("first.jsonl"))
    (repo.root / "results").mkdir()
    (repo.root / "results" / "chained.jsonl").write_bytes((repo.root / "data" / "first.jsonl").read_bytes())
    repo.spec("second", input="../results/chained.jsonl")
    repo.spec("first", input="../data/first.jsonl", output="results/chained.jsonl")
    finished(repo, env)

    result = cli(repo, env, "download")
    refused(result, "specs/first.yaml:", "output: 'results/chained.jsonl' is the input of second")


def test_a_spec_output_inside_the_results_directory_is_written(repo, server, env):
    repo.spec("a", output="results/eval/out.jsonl")
    finished(repo, env)
    result = cli(repo, env, "download")
    assert result.code == 0, result.err
    assert len((repo.root / "results/eval/out.jsonl").read_text().splitlines()) == 3


# -- 6: symlinks out of the repository, names from the state, paths batchplan.yaml names --------


def test_a_committed_results_symlink_to_elsewhere_is_refused(repo, server, env):
    elsewhere = outside(repo)
    repo.spec("a")
    finished(repo, env)
    (repo.root / "results").symlink_to(elsewhere, target_is_directory=True)

    result = cli(repo, env, "download")
    refused(result, "results (default): 'results' resolves to", "outside the repository")
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_directory_under_results_is_refused(repo, server, env):
    elsewhere = outside(repo)
    (repo.root / "results").mkdir()
    (repo.root / "results" / "a").symlink_to(elsewhere, target_is_directory=True)
    repo.spec("a")
    finished(repo, env)

    result = cli(repo, env, "download")
    refused(result, "results/a/output.jsonl", "outside the repository")
    assert list(elsewhere.iterdir()) == []


def test_a_state_entry_named_like_a_path_is_refused(repo, server, env):
    repo.spec("a")
    finished(repo, env)
    state = repo.state()
    state["entries"]["../../x"] = state["entries"].pop("a")
    repo.state_path.write_text(json.dumps(state, indent=2))
    written = repo.state_path.read_bytes()

    for command in ("download", "status", "apply"):
        result = cli(repo, env, command, *(["--auto-approve"] if command == "apply" else []))
        refused(result, "state/batchplan.state.json: entries: '../../x' is not a name batchplan gives")
    assert not (repo.root.parent / "x").exists() and not (repo.root / "results").exists()
    assert repo.state_path.read_bytes() == written


@pytest.mark.parametrize("key", ["state", "specs", "results"])
def test_a_path_in_batchplan_yaml_may_not_leave_the_repository(repo, key):
    elsewhere = outside(repo)
    value = str(elsewhere / "batchplan.state.json") if key == "state" else str(elsewhere)
    (repo.root / "batchplan.yaml").write_text(f"{key}: {value}\n")
    repo.spec("a")

    result = cli(repo, None, "validate")
    refused(result, f"batchplan.yaml: {key}: {value!r} resolves to", "outside the repository")
    assert list(elsewhere.iterdir()) == []  # no cache, no lock made there


def test_a_state_directory_symlinked_out_of_the_repository_is_refused(repo):
    elsewhere = outside(repo)
    (repo.root / "state").symlink_to(elsewhere, target_is_directory=True)
    repo.spec("a")
    refused(cli(repo, None, "validate"), "state (default): 'state/batchplan.state.json' resolves to",
            "outside the repository")
    assert list(elsewhere.iterdir()) == []


def test_a_state_file_given_on_the_command_line_may_live_elsewhere(repo, server, env):
    elsewhere = outside(repo)
    repo.spec("a")
    os.utime(repo.root / "data" / "a.jsonl", (1e9, 1e9))  # settled long ago: its hash is cached
    result = cli(repo, env, "apply", "--auto-approve", "--state", str(elsewhere / "my.state.json"))
    assert result.code == 0, result.err
    assert (elsewhere / "my.state.json").is_file() and (elsewhere / "cache.json").is_file()
    assert not (repo.root / "state").exists()


# -- 7: a saved plan names its inputs again: they are confined again -----------------------------


def test_a_hand_edited_plan_cannot_upload_a_file_from_outside_the_repository(repo, server, env):
    secret = outside(repo) / "secret.jsonl"
    repo.spec("a")
    secret.write_bytes((repo.root / "data" / "a.jsonl").read_bytes())  # same content: the hashes still match
    assert cli(repo, env, "plan", "--out", "plan.json").code == 0
    plan = json.loads((repo.root / "plan.json").read_text())
    sneaky = "../elsewhere/secret.jsonl"
    plan["inputs"] = {sneaky: sha for sha in plan["inputs"].values()}
    for change in plan["changes"]:
        change["desired"]["input"] = sneaky
    (repo.root / "plan.json").write_text(json.dumps(plan))

    result = cli(repo, env, "apply", "plan.json")
    refused(result, "plan.json: input: '../elsewhere/secret.jsonl' resolves to", "outside the repository")
    assert server.writes() == 0


def test_a_plan_whose_changes_name_an_input_it_did_not_hash_is_refused(repo, server, env):
    repo.spec("a")
    repo.data("other.jsonl", count=5)
    assert cli(repo, env, "plan", "--out", "plan.json").code == 0
    plan = json.loads((repo.root / "plan.json").read_text())
    plan["changes"][0]["desired"]["input"] = "data/other.jsonl"
    (repo.root / "plan.json").write_text(json.dumps(plan))

    result = cli(repo, env, "apply", "plan.json")
    refused(result, "plan.json: damaged plan file: a's input data/other.jsonl is not among the plan's inputs")
    assert server.writes() == 0


# -- 8: a symlinked state file is written through, and locked as its target ----------------------


def test_a_symlinked_state_file_stays_a_link_and_is_locked_as_its_target(repo, server, env):
    real = repo.root / "state" / "real" / "batchplan.state.json"
    real.parent.mkdir(parents=True)
    repo.spec("a")
    assert cli(repo, env, "apply", "--auto-approve", "--state", str(real)).code == 0
    repo.state_path.symlink_to(Path("real") / "batchplan.state.json")
    repo.spec("b")

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import filelock, sys, time
        lock = filelock.FileLock({str(real) + '.lock'!r}); lock.acquire(); print("held", flush=True); time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(cli(repo, env, "apply", "--auto-approve"), "is locked")
    finally:
        holder.kill()
        holder.wait()
    assert cli(repo, env, "apply", "--auto-approve").code == 0
    assert repo.state_path.is_symlink()
    assert sorted(json.loads(real.read_text())["entries"]) == ["a", "b"]


# -- 20: spec files symlinked out of the repository are not read ---------------------------------


def test_a_spec_file_symlinked_out_of_the_repository_is_not_read(repo):
    secret = outside(repo) / "secret.yaml"
    secret.write_text("name: a\nendpoint: TOPSECRET-TOKEN-1234\ninput: ../data/a.jsonl\n")
    (repo.root / "specs" / "a.yaml").symlink_to(secret)

    result = cli(repo, None, "validate")
    refused(result, "specs/a.yaml: resolves to", "outside the repository", "spec files are read only from inside it")
    assert "TOPSECRET" not in result.out + result.err


def test_a_spec_directory_given_on_the_command_line_outside_the_repository_is_refused(repo):
    elsewhere = outside(repo)
    (elsewhere / "a.yaml").write_text("name: a\nendpoint: TOPSECRET\n")
    result = cli(repo, None, "validate", "--specs", str(elsewhere))
    refused(result, f"--specs: {str(elsewhere)!r} resolves to", "outside the repository")
    assert "TOPSECRET" not in result.out + result.err


# -- 15: local problems, one clear message each ---------------------------------------------------


def test_batchplan_yaml_that_is_not_utf8_is_one_clear_message(repo):
    (repo.root / "batchplan.yaml").write_bytes(b"results: r\xe9sultats\n")
    refused(cli(repo, None, "validate"), "batchplan.yaml: not UTF-8 text (byte 10); save the file as UTF-8")


def test_batchplan_yaml_that_is_a_directory_is_one_clear_message(repo):
    (repo.root / "batchplan.yaml").mkdir()
    refused(cli(repo, None, "validate"), "batchplan.yaml: is a directory, not a file")


@pytest.mark.parametrize("damage", [
    pytest.param(b"{not json", id="syntax"),
    pytest.param(b"[1, 2, 3]", id="list"),
    pytest.param(b'{"version": %d, "entries": {"data/a.jsonl": 7}}' % HashCache.VERSION, id="entry"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep"),
    pytest.param(b"\xff\xfe", id="binary"),
])
def test_a_damaged_input_hash_cache_is_rebuilt_with_a_note(repo, damage):
    repo.spec("a")
    cache = repo.root / "state" / "cache.json"
    cache.parent.mkdir()
    cache.write_bytes(damage)

    result = cli(repo, None, "validate")
    assert result.code == 0, result.err
    assert "1 spec(s) valid" in result.out
    assert result.err.startswith("Note: ")
    assert "state/cache.json was damaged and is rebuilt (it only saves re-reading inputs)\n" in result.err
    assert "Note:" not in cli(repo, None, "validate").err  # rebuilt: the next run has nothing to say


def test_a_state_nested_100k_levels_deep_is_a_clear_state_error_and_never_overwritten(repo, server, env):
    repo.spec("a")
    repo.state_path.parent.mkdir()
    deep = b'{"format_version": 1, "entries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    repo.state_path.write_bytes(deep)
    for command in (("status",), ("plan",), ("apply", "--auto-approve")):
        refused(cli(repo, env, *command), "state/batchplan.state.json: nested too deeply",
                "batchplan will not overwrite it")
    assert repo.state_path.read_bytes() == deep
    assert server.writes() == 0


@pytest.mark.parametrize("edit", ["changes", "inputs", "refreshed", "change"])
def test_a_plan_file_with_lists_where_objects_belong_is_a_clear_plan_error(repo, server, env, edit):
    repo.spec("a")
    assert cli(repo, env, "plan", "--out", "plan.json").code == 0
    plan = json.loads((repo.root / "plan.json").read_text())
    if edit == "change":
        plan["changes"] = [["a", "create"]]
    else:
        plan[edit] = [[1, 2]] if edit != "changes" else {"a": []}
    (repo.root / "plan.json").write_text(json.dumps(plan))
    refused(cli(repo, env, "apply", "plan.json"), "plan.json: damaged plan file", "plan again")
    assert server.writes() == 0


def test_a_fifo_as_input_is_not_a_regular_file(repo):
    os.mkfifo(repo.root / "data" / "a.jsonl")
    repo.spec("a", input="../data/a.jsonl")
    refused(cli(repo, None, "validate"), "specs/a.yaml:", "input: '../data/a.jsonl' is not a regular file")


@pytest.mark.parametrize("batch_id", ["../files", "batch_1/../../files", "file-abc", "batch_1?limit=1", ""])
def test_import_refuses_what_is_not_a_batch_id(repo, server, env, batch_id):
    repo.spec("a")
    result = cli(repo, env, "import", "a", batch_id)
    refused(result, f"{batch_id!r} is not a batch id")
    assert server.count() == 0


def test_a_full_disk_while_writing_the_lock_note_is_a_clear_message_and_leaves_no_temp_file(repo, server, env):
    repo.spec("a")
    finished(repo, env)
    repo.spec("b")
    state = repo.state_path.read_bytes()
    sent = server.count()
    # RLIMIT_FSIZE stands in for a full disk: a write past 100 bytes fails with EFBIG (Python ignores SIGXFSZ)
    limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); " \
            "sys.argv = ['batchplan', *sys.argv[1:]]; runpy.run_module('reconciler', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", limit, "apply", "--auto-approve", "-C", str(repo.root)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "state/batchplan.state.json.lock.info: cannot write the lock note" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert repo.state_path.read_bytes() == state
    assert not [p.name for p in repo.state_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert server.count() == sent  # the lock comes before the first request
    unlocked = spawn_cli("apply", "--auto-approve", "-C", str(repo.root), env=env)
    assert unlocked.wait(timeout=60) == 0, unlocked.stderr.read()  # the lock was let go
