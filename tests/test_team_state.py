"""Team state on PostgreSQL (issue 14): every command on a workspace in a real database
(tests/conftest_pg.py), two checkouts applying at once, killed and forced-out holders, a
compare-and-swap conflict, `state migrate` both ways, and the password in no output."""

from __future__ import annotations

import json
import os
import signal
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from reconciler.sandbox import Fault
from tests.helpers import PgRepo, Repo, run_cli, spawn_cli
from tests.test_reliability import (FAST_SETTINGS, KEY, apply, assert_converged, make_repo,
                                    uploads_by_name, wait_for)
from tests.test_store_postgres import closed_port, query


def with_password(url: str, password: str = "s3cret-pw") -> str:
    """The test server trusts loopback, so any password is accepted: enough to see where it shows."""
    return url.replace("://batchplan@", f"://batchplan:{password}@", 1)


def masked(url: str) -> str:
    return url.replace("://batchplan@", "://batchplan:***@", 1)


@pytest.fixture
def pg_repo(tmp_path, pg_url) -> PgRepo:
    return PgRepo(tmp_path / "repo", pg_url, workspace="team")


def server_env(server) -> dict:
    return {"OPENAI_BASE_URL": server.url, "OPENAI_API_KEY": KEY, "NO_COLOR": "1"}


def age_inputs(repo: Repo) -> None:
    """Date the inputs an hour back: the hash cache skips files modified in the last 2 seconds."""
    for data in (repo.root / "data").iterdir():
        os.utime(data, (time.time() - 3600,) * 2)


def cli(repo: Repo, *args: str, env: dict | None = None):
    return run_cli(*args, "-C", str(repo.root), env=env)


# -- every command ------------------------------------------------------------------------------

def test_every_command_works_on_a_postgresql_workspace(pg_repo, emulator_server, api_env):
    names = make_repo(pg_repo, 2, settings=pg_repo.settings(FAST_SETTINGS))
    age_inputs(pg_repo)
    assert apply(pg_repo, api_env).code == 0
    assert_converged(pg_repo, emulator_server, api_env, names)
    ran = {args[0] if args[0] != "state" else " ".join(args[:2]): cli(pg_repo, *args, env=api_env) for args in [
        ("status", "--json"), ("wait", "--interval", "0.05", "--timeout", "20"), ("refresh",), ("download",),
        ("state", "list"), ("state", "show", "s0")]}
    assert {command: result.code for command, result in ran.items()} == dict.fromkeys(ran, 0), ran
    assert [row["name"] for row in ran["status"].json["batches"]] == names
    assert json.loads(ran["state show"].out)["batch"]["status"] == "completed"
    assert (pg_repo.root / "results" / "s0" / "output.jsonl").is_file()

    batch_id = pg_repo.state()["entries"]["s1"]["batch"]["id"]
    removed = cli(pg_repo, "state", "rm", "s1", env=api_env)
    assert removed.out == (f"Removed s1 from the state; batch {batch_id} (completed) was not touched on the server. "
                           "The previous state is in the table batchplan.backup (workspace team).\n")
    assert cli(pg_repo, "import", "s1", batch_id, env=api_env).code == 0
    assert cli(pg_repo, "plan", "--detailed-exitcode", env=api_env).code == 0
    unlocked = cli(pg_repo, "force-unlock", "lock-1", env=api_env)  # nothing held: nothing to do, and says so
    assert unlocked.code == 1 and "the state is not locked, so there is no lock lock-1 to remove" in unlocked.err

    # the state is only in the database; the per-machine caches stay in the repo's state/
    assert sorted(p.name for p in (pg_repo.root / "state").iterdir()) == ["cache.json", "tokens.json"]
    assert query(pg_repo.url, "SELECT workspace FROM batchplan.state") == [("team",)]


def test_the_state_url_may_come_from_the_flag_or_the_environment(repo, pg_url, emulator_server, api_env):
    make_repo(repo, 1)
    assert apply(repo, api_env, "--state", pg_url).code == 0
    env = {**api_env, "BATCHPLAN_STATE_URL": pg_url, "BATCHPLAN_WORKSPACE": "staging"}
    assert apply(repo, env).code == 0
    assert query(pg_url, "SELECT workspace FROM batchplan.state ORDER BY 1") == [("default",), ("staging",)]
    assert not repo.state_path.exists()


def test_the_sandbox_keeps_its_batches_in_a_workspace_of_its_own(pg_repo):
    make_repo(pg_repo, 1, settings=pg_repo.settings())
    age_inputs(pg_repo)
    result = cli(pg_repo, "apply", "--sandbox", "--auto-approve", env={"NO_COLOR": "1"})
    assert result.code == 0, result.err
    assert query(pg_repo.url, "SELECT workspace FROM batchplan.state") == [("team-sandbox",)]
    assert cli(pg_repo, "state", "list").out == "The state has no entries.\n"
    assert (pg_repo.root / "state" / "sandbox" / "cache.json").is_file()


# -- configuration and the password -------------------------------------------------------------

COMMANDS = [("plan",), ("apply", "--auto-approve"), ("status",), ("wait",), ("refresh",), ("download",),
            ("import", "s0", "batch_abc"), ("state", "list"), ("state", "show", "s0"), ("state", "rm", "s0"),
            ("force-unlock", "lock-1"), ("state", "migrate", "--to", "state/copy.json")]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_an_unreachable_database_is_one_line_with_no_password_and_nothing_is_sent(repo, emulator_server, api_env,
                                                                                   args):
    make_repo(repo, 1)
    url = f"postgresql://batchplan:s3cret-pw@127.0.0.1:{closed_port()}/batchplan"
    result = cli(repo, *args, env={**api_env, "BATCHPLAN_STATE_URL": url})
    assert result.code == 1 and result.out == ""
    assert result.err.startswith(f"Error: {masked(url.replace(':s3cret-pw', ''))} (workspace default): cannot "
                                 "connect to the state database: connection failed: ")
    assert result.err.count("\n") == 1 and "s3cret" not in result.err
    assert emulator_server.requests == []
    assert not (repo.root / "state" / "copy.json").exists()


@pytest.mark.parametrize(("settings", "env", "args", "message"), [
    ("state: postgresql://ci:s3cret@db.internal/batchplan\n", {}, (),
     "batchplan.yaml: state: the URL holds a password, and this file is committed; remove it from the URL and give "
     "it in PGPASSWORD or ~/.pgpass (or the whole URL in BATCHPLAN_STATE_URL, kept as a secret)"),
    ("state: postgresql://ci@db.internal/batchplan\nworkspace: prod env\n", {}, (),
     "batchplan.yaml: workspace: 'prod env': use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
     "or digit"),
    ("", {"BATCHPLAN_WORKSPACE": "-x"}, (),
     "BATCHPLAN_WORKSPACE: '-x': use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    ("", {"BATCHPLAN_STATE_URL": "state/other.json"}, (),
     "BATCHPLAN_STATE_URL: not a PostgreSQL URL; write postgresql://USER@HOST:PORT/DATABASE (a state file is set "
     "with --state FILE or `state:` in batchplan.yaml)"),
    ("", {}, ("--state", "mysql://bob:s3cret@db/x"),
     "--state: mysql://bob:***@db/x is not a PostgreSQL URL; write postgresql://USER@HOST:PORT/DATABASE, or a file "
     "path for a state file"),
])
def test_a_bad_state_setting_is_one_message_naming_where_it_was_said(repo, settings, env, args, message):
    (repo.root / "batchplan.yaml").write_text(settings)
    result = cli(repo, "state", "list", *args, env={"BATCHPLAN_STATE_URL": None, "BATCHPLAN_WORKSPACE": None, **env})
    assert (result.code, result.out, result.err) == (1, "", f"Error: {message}\n")


# -- two checkouts, one database ----------------------------------------------------------------

def two_checkouts(tmp_path, pg_url, count: int) -> tuple[list[PgRepo], list[str]]:
    """Two clones in different folders (no shared files), one workspace; the same specs and inputs."""
    repos = [PgRepo(tmp_path / f"checkout-{n}", pg_url, workspace="shared") for n in (1, 2)]
    names = [make_repo(repo, count, settings=repo.settings(FAST_SETTINGS)) for repo in repos][0]
    return repos, names


def test_two_checkouts_applying_at_once_make_each_batch_once(tmp_path, pg_url, emulator_server_factory):
    server = emulator_server_factory(latency=0.1)
    env = server_env(server)
    repos, names = two_checkouts(tmp_path, pg_url, 4)
    procs = [spawn_cli("apply", "--auto-approve", "--lock-timeout", "30", env=env, cwd=repo.root) for repo in repos]
    results = [(proc.wait(timeout=60), *proc.communicate()) for proc in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    assert sorted(out.splitlines()[-1] for _, out, _ in results) == [
        "Apply complete: 4 change(s).", "No changes. 4 batch(es) match their specs."], results
    for repo in repos:
        assert_converged(repo, server, env, names)
    assert set(uploads_by_name(server).values()) == {1}
    assert query(pg_url, "SELECT count(*) FROM batchplan.lock") == [(0,)]


def test_a_sigkilled_apply_leaves_no_lock_and_the_other_checkout_goes_on(tmp_path, pg_url, emulator_server):
    env = server_env(emulator_server)
    (first, second), names = two_checkouts(tmp_path, pg_url, 3)
    emulator_server.add_fault(Fault(action="stall", method="POST", path_regex="^/v1/batches$", nth=2, seconds=0.5))
    proc = spawn_cli("apply", "--auto-approve", "--parallelism", "1", env=env, cwd=first.root)
    wait_for(lambda: emulator_server.fault_status()[0]["fired"] or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    emulator_server.wait_idle()

    started = time.monotonic()
    result = apply(second, env)  # no --lock-timeout, no force-unlock: the lock died with the session
    assert result.code == 0, result.err
    assert time.monotonic() - started < 10
    assert_converged(second, emulator_server, env, names)
    assert_converged(first, emulator_server, env, names)


def test_a_compare_and_swap_conflict_is_an_error_and_the_other_writers_state_stays(pg_repo, emulator_server):
    env = server_env(emulator_server)
    names = make_repo(pg_repo, 3, settings=pg_repo.settings(FAST_SETTINGS))
    emulator_server.add_fault(Fault(action="stall", method="POST", path_regex="^/v1/batches$", nth=2, seconds=1.0))
    proc = spawn_cli("apply", "--auto-approve", "--parallelism", "1", env=env, cwd=pg_repo.root)
    wait_for(lambda: emulator_server.fault_status()[0]["fired"] or proc.poll() is not None)
    # a writer that does not take the lock (a script, a restore by hand) moves the serial on
    with psycopg.connect(pg_repo.url, autocommit=True) as conn:
        conn.execute("UPDATE batchplan.state SET serial = serial + 1, "
                     "document = jsonb_set(document, '{serial}', to_jsonb(serial + 1))")
        (theirs,) = conn.execute("SELECT document::text FROM batchplan.state").fetchone()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert err.startswith(f"Error: {pg_repo.url} (workspace team): the stored state is at serial ")
    assert err.endswith(": another writer saved it meanwhile. Nothing was written; run the command again to start "
                        "from the stored state\n")
    assert query(pg_repo.url, "SELECT document::text FROM batchplan.state") == [(theirs,)]  # not overwritten
    emulator_server.wait_idle()
    assert apply(pg_repo, env).code == 0  # the next run starts from the stored state and adopts what was made
    assert_converged(pg_repo, emulator_server, env, names)


def test_force_unlock_ends_a_live_holder_only_with_force_and_the_note_hides_the_password(pg_repo, emulator_server):
    env = server_env(emulator_server)
    names = make_repo(pg_repo, 2, settings="workspace: team\n" + FAST_SETTINGS)  # the URL is given by flag
    url = with_password(pg_repo.url)
    emulator_server.add_fault(Fault(action="stall", method="POST", path_regex="^/v1/batches$", nth=1, seconds=3.0))
    proc = spawn_cli("apply", "--auto-approve", "--state", url, "--parallelism", "1",
                     env=env, cwd=pg_repo.root)
    wait_for(lambda: emulator_server.fault_status()[0]["fired"] or proc.poll() is not None)
    (command,) = query(pg_repo.url, "SELECT command FROM batchplan.lock")[0]
    assert command == f"batchplan apply --auto-approve --state {masked(pg_repo.url)} --parallelism 1"

    (lock_id,) = query(pg_repo.url, "SELECT lock_id FROM batchplan.lock")[0]
    refused = cli(pg_repo, "force-unlock", lock_id, "--state", url)
    assert refused.code == 1 and "whose database session is alive" in refused.err and "s3cret" not in refused.err
    forced = cli(pg_repo, "force-unlock", lock_id, "--force", "--state", url)
    assert forced.code == 0, forced.err
    assert forced.err.startswith(f"Note: pid {proc.pid} of ") and "s3cret" not in forced.err
    assert forced.out.startswith(f"Removed the lock on {masked(pg_repo.url)} (workspace team) (held by pid "
                                 f"{proc.pid} of ")
    assert f"({command}) since " in forced.out and "s3cret" not in forced.out

    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and err.count("\n") == 1 and "s3cret" not in out + err, out + err
    assert "lost the database connection that held the state lock" in err or "cannot save the state" in err, err
    emulator_server.wait_idle()
    assert apply(pg_repo, env, "--state", url).code == 0
    assert_converged(pg_repo, emulator_server, {**env, "BATCHPLAN_STATE_URL": url}, names)


# -- state migrate ------------------------------------------------------------------------------

def migrated(source: str, target: str, state: dict, lines: str) -> str:
    return (f"Copied the state (lineage {state['lineage']}, serial {state['serial']}, {len(state['entries'])} "
            f"entries) from {source} to {target}.\nTo use it, set in batchplan.yaml:\n{lines}"
            "The source is left as it was: remove it once the new state is in use.\n")


def test_state_migrate_copies_a_state_file_into_postgresql_and_back(repo, pg_url, emulator_server, api_env):
    names = make_repo(repo, 2)
    assert apply(repo, api_env).code == 0
    original = repo.state()
    url, (host, port) = with_password(pg_url), (urlsplit(pg_url).hostname, urlsplit(pg_url).port)
    to_pg = cli(repo, "state", "migrate", "--to", url, "--workspace", "prod")
    assert (to_pg.code, to_pg.err) == (0, "")
    assert to_pg.out == migrated(str(repo.state_path), f"{masked(pg_url)} (workspace prod)", original,
                                 f"  state: {pg_url}\n  workspace: prod\n")
    assert f"batchplan@{host}:{port}" in to_pg.out

    again = cli(repo, "state", "migrate", "--to", url, "--workspace", "prod")
    assert again.code == 1 and "already holds a state" in again.err and "s3cret" not in again.err
    assert cli(repo, "state", "migrate", "--to", url, "--workspace", "prod", "--force").code == 0

    on_pg = PgRepo(repo.root, pg_url, workspace="prod")
    (repo.root / "batchplan.yaml").write_text(on_pg.settings(FAST_SETTINGS))
    assert on_pg.state() == original  # lineage and serial kept: the same state in a new place
    assert cli(repo, "plan", "--detailed-exitcode", env=api_env).code == 0

    back = cli(repo, "state", "migrate", "--to", "state/back.json")
    assert back.out == migrated(f"{pg_url} (workspace prod)", str(repo.root / "state" / "back.json"),
                                original, "  state: state/back.json\n")
    assert json.loads((repo.root / "state" / "back.json").read_text()) == original
    (repo.root / "batchplan.yaml").write_text("state: state/back.json\n" + FAST_SETTINGS)
    assert_converged(BackRepo(repo.root), emulator_server, api_env, names)

    wrong = cli(repo, "state", "migrate", "--to", "state/x.json", "--workspace", "prod")
    assert wrong.err == ("Error: --workspace prod: a workspace is for a PostgreSQL target (--to postgresql://...); "
                         "a state file has none\n")


class BackRepo(Repo):
    """The repo after migrating back, its state in state/back.json."""

    @property
    def state_path(self):
        return self.root / "state" / "back.json"
