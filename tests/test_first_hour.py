"""Issue 17, the first hour of a new user: init, options before the command and help, a status table
that fits 80 columns, plans that say what they do (and lifecycle.ignore_changes), the forgotten
--sandbox, each batch's results kept apart (`download --batch`, `--join`), feedback on long work,
and which base a path is relative to. Rendered output is compared as whole strings, colour off.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import time

import click
from rich.console import Console

from reconciler import feedback
from reconciler.batch import BatchRecord, short_id
from reconciler.cli import cli as cli_group
from reconciler.desired import Desired
from reconciler.operations import StatusReport
from reconciler.plan import Action, ReasonCode, build_plan
from reconciler.remote import RemoteView, Snapshot
from reconciler.render import render_status, render_text
from reconciler.sandbox import Timing
from reconciler.state import Entry, State
from reconciler.status import StatusRow
from reconciler.watch import LineDisplay, eta_phrase
from tests.helpers import applied, batch_of, cli, request_line, run_cli, waited, write_jsonl

SLOW = Timing(validating=0.05, in_progress=60.0, finalizing=0.05, cancelling=0.05)


# -- 3. init --------------------------------------------------------------------------------


def test_init_writes_a_project_that_validates_and_never_overwrites(tmp_path):
    root = tmp_path / "new"
    root.mkdir()
    first = run_cli("-C", str(root), "init")
    assert first.code == 0, first.err
    assert first.out == ("  created data/example.jsonl\n"
                         "  created specs/example.yaml\n"
                         "  created batchplan.yaml\n"
                         "  created .gitignore\n"
                         "Next: edit the example spec, then `batchplan validate` and `batchplan plan --sandbox` "
                         "(no key, no cost).\n")
    assert run_cli("-C", str(root), "validate").out == "1 spec(s) valid; 1 input file(s), 2 request(s).\n"
    assert all(line.startswith("# ") for line in (root / "batchplan.yaml").read_text().splitlines())

    (root / "batchplan.yaml").write_text("parallelism: 4\n")
    again = run_cli("-C", str(root), "init")
    assert again.out == ("  kept    specs/ (it holds specs already, so no example was added)\n"
                         "  kept    batchplan.yaml (already there)\n"
                         "  kept    .gitignore (it ignores all batchplan writes already)\n"
                         "Next: edit the example spec, then `batchplan validate` and `batchplan plan --sandbox` "
                         "(no key, no cost).\n")
    assert (root / "batchplan.yaml").read_text() == "parallelism: 4\n"


def test_init_adds_only_the_missing_lines_to_an_existing_gitignore(tmp_path):
    (tmp_path / ".gitignore").write_text("results/\n.venv/")
    result = run_cli("-C", str(tmp_path), "init")
    assert "  ignored state/sandbox/ (added to .gitignore)\n" in result.out
    assert (tmp_path / ".gitignore").read_text() == (
        "results/\n.venv/\n# batchplan: per machine or per run\nstate/sandbox/\nstate/cache.json\n"
        "state/tokens.json\nstate/*.lock\nstate/*.lock.info\nstate/*.backup\nstate/retries/\n")


def test_init_gitignore_hides_what_batchplan_writes_from_git_status(tmp_path):
    run_cli("-C", str(tmp_path), "init")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    written = ["results/a/output.jsonl", "state/sandbox/batchplan.state.json", "state/cache.json",
               "state/tokens.json", "state/batchplan.state.json.lock", "state/batchplan.state.json.lock.info",
               "state/batchplan.state.json.backup", "state/retries/results/file-1.jsonl", "state/batchplan.state.json"]
    for rel in written:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            check=True, capture_output=True, text=True).stdout
    assert sorted(line[3:] for line in status.splitlines()) == [
        ".gitignore", "batchplan.yaml", "data/example.jsonl", "specs/example.yaml", "state/batchplan.state.json"]


# -- 4. options before the command, help, completion ----------------------------------------


def test_options_work_before_the_command_and_after_it(repo):
    repo.spec("a")
    before = run_cli("-C", str(repo.root), "validate")
    after = run_cli("validate", "-C", str(repo.root))
    assert before.code == after.code == 0 and before.out == after.out
    sandboxed = run_cli("--sandbox", "-C", str(repo.root), "status")
    assert sandboxed.code == 0, sandboxed.err  # no key needed: --sandbox before the command counted
    assert sandboxed.out == "No batches in the state yet; `batchplan apply` makes them.\n"
    wrong = run_cli("-C", "/nonexistent", "validate", "-C", str(repo.root))
    assert wrong.code == 0, wrong.err  # after the command wins


def test_help_lists_commands_in_workflow_order_and_own_options_first():
    top = run_cli("--help").out
    listed = re.findall(r"^  (\S+)  ", top.split("Commands:")[1], re.M)
    assert listed == ["init", "validate", "plan", "apply", "status", "wait", "download", "refresh", "import",
                      "state", "force-unlock", "sandbox"]
    assert run_cli("state", "list", "--help").out == (
        "Usage: batchplan state list [OPTIONS]\n"
        "\n"
        "  Every name in the state, with its batch id and status as last recorded.\n"
        "\n"
        "Options:\n"
        "  -h, --help  Show this message and exit.\n"
        "\n"
        "Global options (also before the command):\n"
        "  -C, --chdir DIR   Run as if batchplan was started in DIR (the repo root).\n"
        "  --state FILE|URL  State file, or postgresql://USER@HOST:PORT/DATABASE (also\n"
        "                    BATCHPLAN_STATE_URL) [default:\n"
        "                    state/batchplan.state.json].\n"
        "  --debug           Show Python tracebacks for errors.\n")
    validate = run_cli("validate", "--help").out
    assert "--parallelism" not in validate and "--sandbox" not in validate
    status = run_cli("status", "--help").out
    assert status.index("-o, --output") < status.index("Global options") < status.index("--sandbox")


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_option_of_every_command_has_a_description():
    undescribed = [f"{path} {param.name}" for path, command in [("", cli_group), *_commands(cli_group)]
                   for param in command.params if isinstance(param, click.Option) and not param.help]
    assert undescribed == []


def test_shell_completion_script_and_completions():
    script = run_cli(env={"_BATCHPLAN_COMPLETE": "bash_source"})
    assert script.code == 0 and "_batchplan_completion()" in script.out
    words = run_cli(env={"_BATCHPLAN_COMPLETE": "bash_complete", "COMP_WORDS": "batchplan st", "COMP_CWORD": "1"})
    assert words.out.split() == ["plain,status", "plain,state"]


# -- 5. status at 80 columns ----------------------------------------------------------------


def _rows(now: float) -> list[StatusRow]:
    return [StatusRow("nightly-eval-archive-of-every-question", "batch_" + "3f2a9c1d" * 4, "in_progress", 1200, 3,
                      5000, int(now) - 245, None, None),
            StatusRow("docs", "batch_" + "0b1c2d3e" * 4, "completed", 3, 0, 3, int(now) - 7600,
                      "file-" + "a" * 24, None),
            StatusRow("gone", None, "none", 0, 0, 0, None, None, None,
                      "no batch: an apply was interrupted before creating it; run `batchplan apply`")]


def test_status_table_at_80_columns_never_cuts_a_name_or_status():
    now = 1_000_000.0
    text = render_status(StatusReport(_rows(now), now), as_json=False, width=80, colour=False)
    assert text == (
        "name                 batch             status             done   failed      age\n"
        f"{'─' * 80}\n"
        "nightly-eval-archi   batch_3f2a9c1d…   in_progress   1200/5000        3   4m 05s\n"
        "ve-of-every-questi\n"
        "on\n"
        "docs                 batch_0b1c2d3e…   completed           3/3        0   2h 06m\n"
        "gone                 -                 none                0/0        0        -\n"
        "gone: no batch: an apply was interrupted before creating it; run `batchplan\n"
        "apply`\n")
    assert "…" not in text.replace("batch_3f2a9c1d…", "").replace("batch_0b1c2d3e…", "")
    assert max(len(line) for line in text.splitlines()) <= 80


def test_status_wide_shows_full_ids_and_result_files():
    now = 1_000_000.0
    text = render_status(StatusReport(_rows(now)[1:2], now), as_json=False, width=None, colour=False, wide=True)
    assert text.splitlines()[0].split() == ["name", "batch", "status", "done", "failed", "age", "output", "errors"]
    assert text.splitlines()[2].split() == ["docs", "batch_" + "0b1c2d3e" * 4, "completed", "3/3", "0", "2h",
                                            "06m", "file-" + "a" * 24, "-"]


def test_short_ids():
    assert short_id("batch_" + "3f2a9c1d" * 4) == "batch_3f2a9c1d…"
    assert short_id("file-" + "ab" * 12) == "file-abababab…"
    assert short_id("batch_d") == "batch_d"


# -- 6. plans that say what they do ---------------------------------------------------------


def desired(name="eval", *, requests=7, sha="b" * 64, metadata=None, ignore=(), expiry=None) -> Desired:
    return Desired(name=name, file="specs/eval.yaml", endpoint="/v1/chat/completions", completion_window="24h",
                   metadata=metadata if metadata is not None else {"team": "research"},
                   output_expires_after=expiry, input="data/eval.jsonl", input_sha256=sha, input_file_id=None,
                   requests=requests, prevent_cancel=False, output=f"results/{name}/output.jsonl", errors=None,
                   models=("gpt-4o-mini",), ignore_changes=ignore)


def _entry(want: Desired, status: str, total: int) -> Entry:
    record = BatchRecord(id="batch_old", status=status, created_at=0, input_file_id="file-1",
                         request_counts={"total": total, "completed": total, "failed": 0})
    return Entry(spec_hash=want.spec_hash, fields=want.fields(), batch=record)


def _plan(want: Desired, entry: Entry | None):
    state = State(lineage="L", serial=1, entries={want.name: entry} if entry else {})
    return build_plan([want], state, RemoteView(batches={}, tagged={}, missing=frozenset()))


def test_create_shows_model_requests_metadata_expiry_and_output():
    want = desired(expiry={"anchor": "created_at", "seconds": 604800})
    assert render_text(_plan(want, None)) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  + eval  create   no batch for this spec in the state or on the server\n"
        "      endpoint: /v1/chat/completions\n"
        "      model: gpt-4o-mini\n"
        "      input: data/eval.jsonl (sha256 bbbbbbbbbbbb, 7 requests)\n"
        "      metadata: {\"team\": \"research\"}\n"
        "      results expire: 604800 s (7 days) after the batch is created\n"
        "      output: results/eval/output.jsonl\n"
        "\n"
        "Plan: 1 to create, 0 unchanged.\n")


def test_input_change_shows_short_hashes_and_the_request_delta_and_what_is_rerun():
    entry = _entry(desired(requests=6, sha="a" * 64), "completed", 6)
    assert render_text(_plan(desired(), entry)) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  ± eval  replace  changed: input_sha256\n"
        "      ~ input: sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb, 6 → 7 requests (+1)\n"
        "      re-runs 7 requests: batch batch_old already completed\n"
        "\n"
        "Plan: 1 to replace, 0 unchanged.\n")


def test_ignore_changes_plans_an_update_of_the_state_only():
    entry = _entry(desired(ignore=("metadata",)), "in_progress", 7)
    the_plan = _plan(desired(metadata={"team": "ml"}, ignore=("metadata",)), entry)
    (change,) = the_plan.changes
    assert (change.action, change.reason_code) == (Action.UPDATE, ReasonCode.CHANGES_IGNORED)
    assert render_text(the_plan) == (
        "batchplan will perform these actions:\n"
        "\n"
        "  ~ eval  update   state only: changed metadata.team (lifecycle.ignore_changes); batch batch_old is kept, "
        "not re-run\n"
        "      ~ metadata.team: \"research\" -> \"ml\"\n"
        "\n"
        "Plan: 1 to update (state only), 0 unchanged.\n")
    input_too = _plan(desired(metadata={"team": "ml"}, sha="c" * 64, ignore=("metadata",)), entry)
    assert input_too.changes[0].action is Action.REPLACE  # an input edit is never ignored


def test_ignore_changes_apply_writes_the_state_and_sends_nothing(repo, emulator_server, api_env):
    repo.spec("a", metadata={"team": "research"}, lifecycle={"ignore_changes": ["metadata"]})
    applied(repo, api_env)
    batch = batch_of(repo, "a")
    repo.spec("a", metadata={"team": "ml"}, input="../data/a.jsonl", lifecycle={"ignore_changes": ["metadata"]})
    planned = cli(repo, api_env, "plan", "--json").json
    assert [(a["action"], a["reason_code"]) for a in planned["actions"]] == [("update", "changes_ignored")]
    writes = emulator_server.writes()
    result = applied(repo, api_env)
    assert f"  a: updated the state only; batch {batch} kept\n" in result.out
    assert emulator_server.writes() == writes
    assert repo.state()["entries"]["a"]["fields"]["metadata"] == {"team": "ml"}
    assert batch_of(repo, "a") == batch
    assert cli(repo, api_env, "plan", "--detailed-exitcode").code == 0


def test_ignore_changes_accepts_only_fields_a_batch_result_does_not_depend_on(repo):
    repo.spec("a", lifecycle={"ignore_changes": ["input"]})
    result = run_cli("validate", "-C", str(repo.root))
    assert result.code == 1 and "specs/a.yaml:" in result.err and "lifecycle.ignore_changes.0" in result.err


# -- 7. the forgotten --sandbox ---------------------------------------------------------------


def test_an_empty_state_next_to_a_sandbox_state_asks_did_you_mean_sandbox(repo, emulator_server, api_env):
    repo.spec("a")
    applied(repo, api_env)
    sandbox = repo.root / "state" / "sandbox"
    sandbox.mkdir()
    repo.state_path.rename(sandbox / "batchplan.state.json")
    note = ("Note: the state state/batchplan.state.json has no batches, but the sandbox's state "
            "state/sandbox/batchplan.state.json holds 1: did you mean --sandbox?\n")
    for args in (("status",), ("state", "list"), ("plan",)):
        result = cli(repo, api_env, *args)
        assert result.code == 0 and result.err == note, args
    assert cli(repo, api_env, "--sandbox", "state", "list").err == ""


# -- 8. each batch's results kept apart -------------------------------------------------------


def test_download_keeps_each_batch_and_any_batch_can_be_fetched_and_joined(repo, emulator_server, api_env):
    write_jsonl(repo.root / "data" / "a.jsonl", [request_line(f"q-{i}") for i in range(3)])
    repo.spec("a", input="../data/a.jsonl")
    applied(repo, api_env)
    waited(repo, api_env)
    first = batch_of(repo, "a")
    assert cli(repo, api_env, "download").code == 0
    applied(repo, api_env, "--replace", "a")
    waited(repo, api_env)
    second = batch_of(repo, "a")
    result = cli(repo, api_env, "download", "--join")
    assert result.code == 0, result.err
    assert f"  a: wrote results/a/output.jsonl and results/a/{second}/output.jsonl (" in result.out
    assert f"  a: wrote results/a/{second}/joined.jsonl (3 requests)\n" in result.out
    assert sorted(p.name for p in (repo.root / "results/a").iterdir()) == sorted([first, second, "output.jsonl"])
    assert (repo.root / f"results/a/{second}/output.jsonl").read_bytes() == \
        (repo.root / "results/a/output.jsonl").read_bytes()
    joined = [json.loads(line) for line in (repo.root / f"results/a/{second}/joined.jsonl").read_text().splitlines()]
    assert [(j["custom_id"], j["request"]["messages"][0]["content"], j["response"]["status_code"], j["error"])
            for j in joined] == [(f"q-{i}", f"q-{i}", 200, None) for i in range(3)]

    shutil.rmtree(repo.root / "results" / "a" / first)
    old = cli(repo, api_env, "download", "a", "--batch", first)
    assert old.code == 0, old.err
    assert old.out.startswith(f"  a: wrote results/a/{first}/output.jsonl (")
    assert (repo.root / f"results/a/{first}/output.jsonl").is_file()
    assert (repo.root / "results/a/output.jsonl").read_bytes() == \
        (repo.root / f"results/a/{second}/output.jsonl").read_bytes()  # the latest is left as it is


def test_download_batch_refuses_another_names_batch_and_needs_one_name(repo, emulator_server, api_env):
    repo.spec("a")
    repo.spec("b")
    applied(repo, api_env)
    other = batch_of(repo, "b")
    result = cli(repo, api_env, "download", "a", "--batch", other)
    assert result.code == 1
    assert result.err == (f"Error: batch {other} is not a batch of a: it is neither in its state entry nor tagged "
                          "batchplan_name=a; `batchplan state show a` lists its batches\n")
    assert "--batch BATCH_ID needs exactly one NAME" in cli(repo, api_env, "download", "--batch", other).err


def test_a_cancelled_batch_of_a_removed_spec_can_still_be_downloaded(repo, emulator_server_factory):
    server = emulator_server_factory(timing=SLOW)
    env = {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    repo.spec("a")
    applied(repo, env)
    batch = batch_of(repo, "a")
    repo.remove_spec("a")
    applied(repo, env)  # cancels it; the name leaves the state
    deadline = time.monotonic() + 5
    while server.emulator.get_batch(batch)["status"] != "cancelled":
        assert time.monotonic() < deadline, "the cancel did not finish"
        time.sleep(0.02)
    repo.spec("a")  # the spec is back (it names where results go); the batch is found by its tag
    result = cli(repo, env, "download", "a", "--batch", batch)
    assert result.code == 0, result.err
    assert result.out == f"  a: batch {batch} is cancelled and has no result files\nDownloaded 0 file(s); 0 already there.\n"


# -- 9. feedback on long work ---------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_line_per_retry_instead_of_silence(repo):
    repo.spec("a")
    (repo.root / "batchplan.yaml").write_text("max_retries: 2\n")
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{_closed_port()}/v1", "OPENAI_API_KEY": "sk-test", "NO_COLOR": "1"}
    result = cli(repo, env, "plan")
    assert result.code == 1
    lines = result.err.splitlines()
    assert re.fullmatch(r"  GET /\S+: connection refused; retrying in [\d.]+ s, 1 of 2", lines[0]), lines
    assert re.fullmatch(r"  GET /\S+: connection refused; retrying in [\d.]+ s, 2 of 2", lines[1]), lines
    assert lines[2].startswith("Error: GET ") and "cannot reach" in lines[2]


def test_progress_bars_only_for_big_files():
    out = io.StringIO()
    bars = feedback.ProgressBars(console=Console(file=out, force_terminal=True, width=100))
    with bars.transfer("upload small.jsonl", 1000) as advance:
        advance(1000)
    assert out.getvalue() == "" and bars.progress is None  # rich not even loaded
    with bars.transfer("upload big.jsonl", feedback.LARGE_FILE) as advance:
        advance(feedback.LARGE_FILE // 2)
        bars.progress.refresh()
    assert "upload big.jsonl" in out.getvalue()


def _record(status: str, done: int, total: int = 100, created_at: int = 0) -> BatchRecord:
    return BatchRecord(id="batch_1", status=status, created_at=created_at, input_file_id="file-1",
                       request_counts={"total": total, "completed": done, "failed": 0})


def test_eta_from_the_rate_so_far():
    assert eta_phrase(_record("in_progress", 25), now=100.0) == "~5m 00s left"
    assert eta_phrase(_record("in_progress", 0), now=100.0) == ""
    assert eta_phrase(_record("completed", 100), now=100.0) == ""


def test_wait_in_logs_prints_a_status_change_at_once_and_progress_at_most_once_a_minute():
    lines: list[str] = []
    clock = [0.0]
    display = LineDisplay(lines.append, clock=lambda: clock[0], wall=lambda: 1000.0 + clock[0])
    for t, status, done in [(0, "in_progress", 10), (15, "in_progress", 20), (30, "in_progress", 30),
                            (61, "in_progress", 40), (75, "finalizing", 100), (90, "completed", 100)]:
        clock[0] = t
        display.show(Snapshot({"a": _record(status, done, created_at=900)}))
    assert lines == [
        "a: in_progress, 10/100 requests completed, age 1m 40s, ~15m 00s left",
        "a: in_progress, 40/100 requests completed, age 2m 41s, ~4m 01s left",
        "a: finalizing, 100/100 requests completed, age 2m 55s",
        "a: completed, 100/100 requests completed, age 3m 10s",
    ]


# -- 10. which base a path is relative to ---------------------------------------------------


def test_a_missing_input_says_it_is_relative_to_the_spec_file(repo):
    repo.spec("a", input="data/a.jsonl")  # relative to the repo root by mistake
    result = run_cli("validate", "-C", str(repo.root))
    assert result.code == 1
    assert ("specs/a.yaml:2: input: 'data/a.jsonl' does not exist (looked for specs/data/a.jsonl: input: is "
            "relative to the spec file specs/a.yaml, not to the repo root)") in result.err


def test_an_output_outside_the_repo_says_it_is_relative_to_the_repo_root(repo, emulator_server, api_env):
    repo.spec("a", output="../elsewhere.jsonl")
    applied(repo, api_env)
    result = cli(repo, api_env, "download")
    assert result.code == 1 and "output: and errors: are relative to the repo root" in result.err
