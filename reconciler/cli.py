"""The command line. The only module that turns errors into text and exit codes.

Exit codes: 0 success; 1 any error (a message naming the file, field or line, never
a traceback unless --debug); 2 from `plan --detailed-exitcode` when there are changes;
130 when interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import BatchplanError, Interrupted, PlanError

_DEBUG = False


def _colour() -> bool | None:
    return False if os.environ.get("NO_COLOR") else None  # None: only when writing to a terminal


def colour_on() -> bool:
    return not os.environ.get("NO_COLOR") and _stdout_is_terminal()


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _run(coroutine):
    """asyncio.run, imported here so that --help and validate do not pay for loading asyncio.

    The result leaves through a list, not as the main task's result: Python 3.11's asyncio.run
    formats the repr of its main task, result included, when it restores the Ctrl-C handler,
    and the repr of a 1,000-spec plan takes 0.1 s.
    """
    import asyncio

    result = []

    async def main() -> None:
        result.append(await coroutine)

    asyncio.run(main())
    return result[0]


def _with_api(project, work):
    """Run `await work(api)` with a client for the project's server (checks credentials first)."""
    project.credentials()

    async def run():
        async with project.connect() as api:
            return await work(api)
    return _run(run())


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    click.echo(text, err=err, nl=nl, color=_colour())


def common_options(func):
    """Options every command takes, after the command name."""
    @click.option("-C", "--chdir", metavar="DIR", help="Run as if batchplan was started in DIR (the repo root).")
    @click.option("--specs", metavar="DIR", help="Spec directory [default: specs, or batchplan.yaml].")
    @click.option("--state", metavar="FILE", help="State file [default: state/batchplan.state.json].")
    @click.option("--sandbox", is_flag=True, envvar="BATCHPLAN_SANDBOX",
                  help="Use the embedded emulator: no key, no network, its own state (also BATCHPLAN_SANDBOX=1).")
    @click.option("--parallelism", type=click.IntRange(1, 64), help="Concurrent requests [default: 16].")
    @click.option("--allow-insecure-http", is_flag=True, help="Allow an http:// OPENAI_BASE_URL that is not loopback.")
    @click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
    @functools.wraps(func)
    def wrapper(*args, chdir, specs, state, sandbox, parallelism, allow_insecure_http, debug, **kwargs):
        global _DEBUG
        _DEBUG = _DEBUG or debug
        from .project import Project

        project = Project.open(chdir=chdir, specs=specs, state=state, sandbox=sandbox, parallelism=parallelism,
                               lock_timeout=kwargs.pop("lock_timeout", 0.0) or 0.0,
                               allow_insecure_http=allow_insecure_http)
        return func(project, *args, **kwargs)
    return wrapper


lock_timeout_option = click.option(
    "--lock-timeout", type=click.FloatRange(0), default=0.0, metavar="SECONDS",
    help="Wait up to SECONDS for another batchplan holding the state lock [default: fail at once].")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchplan")
def cli() -> None:
    """Declarative, Terraform-style reconciler for the OpenAI Batch API.

    Keep batch specs in specs/*.yaml; `plan` shows what would change against the state
    file and the server; `apply` makes it so, idempotently (never a duplicate batch).
    """


# -- validate / plan / apply ---------------------------------------------------------------


@cli.command()
@common_options
def validate(project) -> None:
    """Check every spec and input file, offline: no key, no network."""
    from .desired import load_desired

    cache = project.hash_cache()
    desired = load_desired(project.specs_dir, project.root, cache)
    cache.save()
    files = {d.input for d in desired if d.input}
    requests = sum(d.requests or 0 for d in {d.input: d for d in desired if d.input}.values())
    echo(f"{len(desired)} spec(s) valid; {len(files)} input file(s), {requests} request(s).")


def _load_desired(project):
    from .desired import load_desired

    cache = project.hash_cache()
    desired = load_desired(project.specs_dir, project.root, cache)
    cache.save()
    return desired


async def _make_plan(project, api, desired, state, targets, replace, scan_all):
    from .plan import build_plan
    from .refresh import refresh

    remote = await refresh(api, desired, state, parallelism=project.parallelism, full_scan=scan_all)
    return build_plan(desired, state, remote, targets=frozenset(targets), force_replace=frozenset(replace))


def plan_options(func):
    @click.option("--target", multiple=True, metavar="NAME", help="Plan only these spec names (repeatable).")
    @click.option("--replace", multiple=True, metavar="NAME", help="Make a new batch for NAME even if unchanged.")
    @click.option("--scan-all", is_flag=True,
                  help="Look through every batch in the account for ones batchplan made (slow on big accounts).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)
    return wrapper


@cli.command()
@common_options
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON document (see README).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default=None,
              help="Output format [default: text].")
@click.option("--out", type=click.Path(dir_okay=False), help="Also save the plan to FILE for `apply FILE`.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0 when nothing changes, 2 when something would.")
def plan(project, target, replace, scan_all, as_json, fmt, out, detailed_exitcode) -> int:
    """Show what apply would change. Reads the server; writes nothing but the input hash cache."""
    from .render import render_json, render_markdown, render_text

    desired = _load_desired(project)
    state = project.store().load()
    the_plan = _with_api(project, lambda api: _make_plan(project, api, desired, state, target, replace, scan_all))
    if out:
        from .planfile import save_plan

        save_plan(project.root / out, the_plan, project)  # -C DIR: relative to DIR
    fmt = "json" if as_json else (fmt or "text")
    renderers = {"json": render_json, "markdown": render_markdown,
                 "text": functools.partial(render_text, colour=colour_on())}
    echo(renderers[fmt](the_plan), nl=False)
    if out:
        echo(f"Saved the plan to {out}; apply exactly it with `batchplan apply {out}`.", err=True)
    return 2 if detailed_exitcode and the_plan.has_changes else 0


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _confirm(auto_approve: bool) -> None:
    if auto_approve:
        return
    if not _stdin_is_terminal():
        raise PlanError("apply needs confirmation but standard input is not a terminal; nothing was changed. "
                        "Review the plan, then run `batchplan apply --auto-approve`")
    answer = click.prompt("Do you want to perform these actions? Only 'yes' will be accepted", default="",
                          show_default=False)
    if answer.strip() != "yes":
        raise PlanError("apply cancelled; nothing was changed")


@cli.command()
@common_options
@plan_options
@lock_timeout_option
@click.argument("planfile", required=False, type=click.Path(dir_okay=False))
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
def apply(project, target, replace, scan_all, planfile, auto_approve) -> int:
    """Create, adopt, replace, cancel and forget batches so the server matches the specs.

    With PLANFILE (from `plan --out`), carry out exactly that saved plan, without asking.
    """
    from .render import render_text
    from .state import command_line

    saved = plan_path = None
    if planfile:
        from .planfile import check_fresh, load_plan

        plan_path = project.root / planfile  # -C DIR: relative to DIR
        saved = load_plan(plan_path, project)
    desired = None if saved else _load_desired(project)
    project.credentials()  # before taking the lock: a missing key is said at once
    with project.store().transaction(command_line(), project.lock_timeout) as txn:
        state = txn.state if txn.existed else None
        if saved:
            check_fresh(plan_path, *saved, state, project.root)

        async def work(api):
            the_plan = saved[0] if saved else \
                await _make_plan(project, api, desired, state, target, replace, scan_all)
            echo(render_text(the_plan, colour_on()), nl=False)
            if not the_plan.has_changes:
                txn.state.record_batches(the_plan.refreshed)  # newly seen statuses; saved if any changed
                return 0
            if not saved:
                _confirm(auto_approve)
            return await _execute(project, api, txn, the_plan)

        return _with_api(project, work)


def _report(name: str, text: str) -> None:
    echo(f"  {name}: {text}")


async def _execute(project, api, txn, the_plan) -> int:
    from .apply import Applier, apply_plan

    applier = Applier(api, txn, the_plan, repo_root=project.root, report=_report)
    result = await apply_plan(applier)
    if result.failed:
        echo(f"Apply finished with errors: {len(result.done)} done, {len(result.failed)} failed "
             "(the state records what was done; fix the cause and run apply again).", err=True)
        return 1
    echo(click.style(f"Apply complete: {len(result.done)} change(s).", bold=True))
    return 0


# -- locks and the sandbox -----------------------------------------------------------------


@cli.command("force-unlock")
@common_options
@click.argument("lock_id", required=False)
def force_unlock_cmd(project, lock_id) -> None:
    """Remove the state lock left by a process that is gone. LOCK_ID is the id the lock error printed."""
    held = project.store().force_unlock(lock_id)
    who = f" (held by {held.describe()})" if held else ""
    echo(f"Removed the lock on {project.state_path}{who}.")


@cli.group()
def sandbox() -> None:
    """The embedded Files + Batches API emulator."""


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8089, show_default=True, type=int)
@click.option("--dir", "world", type=click.Path(file_okay=False), help="Keep the world on disk here.")
@click.option("--step-seconds", type=click.FloatRange(0), default=None,
              help="Seconds per lifecycle step (validating, in_progress, finalizing) [default: 2/3/1].")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests that fail into the error file.")
@click.option("--latency", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds added to every request.")
@click.option("--no-auth", is_flag=True, help="Accept requests without an API key.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def sandbox_serve(host, port, world, step_seconds, fail_rate, latency, no_auth, debug) -> None:
    """Serve the emulator over HTTP at http://HOST:PORT/v1 until Ctrl-C."""
    from .sandbox import Timing, serve

    global _DEBUG
    _DEBUG = _DEBUG or debug
    timing = Timing.uniform(step_seconds) if step_seconds is not None else Timing()
    serve(host=host, port=port, root=Path(world) if world else None, timing=timing, fail_rate=fail_rate,
          latency=latency, require_auth=not no_auth)


# -- watching and collecting: status, wait, refresh, download, import, state ---------------


def _look(project, entries):
    """A Snapshot of `entries`: the server is asked only about batches still running."""
    from .watch import Snapshot, look, running

    return _with_api(project, lambda api: look(api, entries)) if running(entries) else Snapshot.of(entries)


def _record(project, snapshot) -> list[str]:
    """Save newer batch records in the state, under the lock; the names that changed."""
    from .state import command_line

    with project.store().transaction(command_line(), project.lock_timeout) as txn:
        return txn.state.record_batches(snapshot.records)


names_argument = click.argument("names", nargs=-1, metavar="[NAME]...")


@cli.command("status")
@common_options
@names_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (format_version 1).")
def status_cmd(project, names, as_json) -> int:
    """Every batch in the state (or the NAMEs): status, request counts, age, result file ids.

    Asks the server about batches still running. Read-only: it prints what the server says
    and writes nothing; `batchplan refresh` records it in the state.
    """
    import json
    import time

    from .watch import rows, select, status_document, status_table

    entries = select(project.store().load(), names)
    table, now = rows(entries, _look(project, entries)), time.time()
    if as_json:
        echo(json.dumps(status_document(table, now), indent=2, sort_keys=True))
    elif not table:
        echo("No batches in the state yet; `batchplan apply` makes them.")
    elif _stdout_is_terminal():
        from rich.console import Console

        Console(no_color=not colour_on()).print(status_table(table, now))
    else:
        from rich.console import Console

        console = Console(width=1000, no_color=True)
        with console.capture() as captured:
            console.print(status_table(table, now))
        echo("\n".join(line.rstrip() for line in captured.get().splitlines()))
    return 0


def _wait_and_record(project, entries, interval, timeout):
    """Poll until `entries` have finished (or time runs out), then record what was seen in the state."""
    from .errors import LockError
    from .watch import LineDisplay, ProgressDisplay, wait

    display = ProgressDisplay(list(entries)) if _stdout_is_terminal() else LineDisplay(echo)
    try:
        result = _with_api(project, lambda api: wait(api, entries, display, interval=interval, timeout=timeout))
    finally:
        display.close()
    try:
        _record(project, result.snapshot)
    except LockError as exc:
        echo(f"Note: the final statuses were not recorded in the state ({exc}); "
             "`batchplan refresh` records them later.", err=True)
    return result


@cli.command("wait")
@common_options
@lock_timeout_option
@names_argument
@click.option("--timeout", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Give up after SECONDS, exit 1 [default: no limit].")
@click.option("--interval", type=click.FloatRange(0.01), default=None, metavar="SECONDS",
              help="Seconds between polls [default: 15; 1 with --sandbox].")
def wait_cmd(project, names, timeout, interval) -> int:
    """Poll until every batch in the state (or the NAMEs) has finished.

    A live progress display on a terminal, one line per change otherwise. Exit 0 when all
    completed; 1 when any failed, expired or was cancelled, or the timeout passed. The
    final statuses are recorded in the state (under the state lock).
    """
    from .watch import WaitResult, running, select

    entries = select(project.store().load(), names)
    if not entries:
        echo("Nothing to wait for: the state has no batches.")
        return 0
    interval = interval or (1.0 if project.sandbox else 15.0)
    result = _wait_and_record(project, entries, interval, timeout) if running(entries) else \
        WaitResult(_look(project, entries), timed_out=False)
    problems = result.problems(list(entries))
    if not problems:
        echo(f"All {len(entries)} batch(es) completed.")
        return 0
    head = f"Timed out after {timeout:g}s" if result.timed_out else "Finished"
    echo(f"{head}: {len(problems)} of {len(entries)} batch(es) did not complete:", err=True)
    for line in problems:
        echo(f"  {line}", err=True)
    return 1


@cli.command("refresh")
@common_options
@lock_timeout_option
def refresh_cmd(project) -> None:
    """Record in the state what the server says now about batches still running.

    Sends only GET requests: nothing changes on the server.
    """
    from .state import command_line
    from .watch import look, running, select

    with project.store().transaction(command_line(), project.lock_timeout) as txn:
        entries = select(txn.state, ())
        if not running(entries):
            echo("Nothing to refresh: every batch in the state has finished.")
            return
        snapshot = _with_api(project, lambda api: look(api, entries))
        changed = txn.state.record_batches(snapshot.records)
    for name in changed:
        echo(f"  {name}: {snapshot.records[name].id} is {snapshot.records[name].status}")
    for name in sorted(snapshot.missing):
        echo(f"  {name}: batch {snapshot.records[name].id} no longer exists on the server "
             "(`batchplan plan` shows what to do)")
    echo(f"Refreshed the state: {len(changed)} batch(es) changed." if changed else "The state was up to date.")


@cli.command("download")
@common_options
@names_argument
def download_cmd(project, names) -> int:
    """Save each finished batch's output and error files (of the NAMEs, default all).

    To the spec's `output:` / `errors:` paths (relative to the repo root), else to
    <results>/<name>/output.jsonl and errors.jsonl. Files already downloaded intact are
    skipped without asking the server; batches still running are skipped with a note.
    Exit 1 when a file could not be downloaded (e.g. it expired on the server).
    """
    from .download import MANIFEST, Manifest, Report, destinations, fetch, leftovers, pending, targets
    from .errors import ValidationFailed
    from .spec import load_specs
    from .watch import select

    entries = select(project.store().load(), names)
    specs, problems = load_specs(project.specs_dir, project.root)
    if problems:
        raise ValidationFailed(problems)
    dests = destinations(specs, list(entries), project.root, project.results_dir)
    snapshot = _look(project, entries)
    records = {n: snapshot.records.get(n) for n in entries}
    wanted, notes = targets(records, dests, project.root)
    manifest = Manifest(project.results_dir / MANIFEST)
    report = Report(notes=notes + leftovers(records, dests, project.root, manifest))
    todo = pending(wanted, manifest, report)
    try:
        if todo:
            _with_api(project, lambda api: fetch(api, todo, manifest, report))
    finally:
        manifest.save()
    for line in report.written + report.skipped + report.notes:
        echo(f"  {line}")
    for line in report.failed:
        echo(f"  {line}", err=True)
    echo(f"Downloaded {len(report.written)} file(s); {len(report.skipped)} already there"
         f"{f'; {len(report.failed)} failed' if report.failed else ''}.")
    return 1 if report.failed else 0


@cli.command("import")
@common_options
@lock_timeout_option
@click.argument("name")
@click.argument("batch_id")
def import_cmd(project, name, batch_id) -> None:
    """Record BATCH_ID, made elsewhere, as the batch of the spec NAME. Changes nothing on the server.

    The next plan is a noop for NAME when the batch was made from what the spec says
    (endpoint, completion window, metadata, input), else a replace that shows the difference.
    """
    from .errors import ConfigError, NotFound, StateError
    from .importer import import_entry
    from .state import command_line

    want = next((d for d in _load_desired(project) if d.name == name), None)
    if want is None:
        raise ConfigError(f"no spec named {name} under {project.specs_dir}; write its spec first, then import")

    async def fetch(api):
        try:
            batch = await api.retrieve_batch(batch_id)
        except NotFound:
            raise ConfigError(f"the server has no batch {batch_id}; check the id (`batchplan import NAME "
                              "BATCH_ID`)") from None
        try:
            return batch, (await api.retrieve_file(batch["input_file_id"]) if want.input else None)
        except NotFound:
            return batch, None

    batch, input_file = _with_api(project, fetch)
    imported = import_entry(want, batch, input_file, project.root / want.input if want.input else None)
    with project.store().transaction(command_line(), project.lock_timeout) as txn:
        state = txn.state
        holder = next((n for n, e in state.entries.items() if e.batch and e.batch.id == batch_id), None)
        if holder:
            raise StateError(f"batch {batch_id} is already in the state, as {holder}; nothing was changed")
        if name in state.entries:
            raise StateError(f"the state already has an entry for {name}; `batchplan state rm {name}` first "
                             "(it leaves its batch alone on the server), then import")
        state.entries[name] = imported.entry
    echo(f"Imported {batch_id} ({batch['status']}) as {name}.")
    if imported.differs:
        echo(f"It differs from the spec in: {', '.join(imported.differs)}; the next plan replaces it "
             "(`batchplan plan` shows the diff).")
    else:
        echo("It matches the spec: the next plan leaves it as it is.")
    for note in imported.notes:
        echo(f"Note: {note}.")


@cli.group("state")
def state_group() -> None:
    """Read or edit the state file by hand; never calls the server."""


@state_group.command("list")
@common_options
def state_list(project) -> None:
    """Every name in the state, with its batch id and status as last recorded."""
    from .watch import select

    entries = select(project.store().load(), ())
    width = max((len(n) for n in entries), default=0)
    for name, entry in entries.items():
        batch = f"{entry.batch.id}  {entry.batch.status}" if entry.batch else "-  no batch (an interrupted create)"
        echo(f"{name.ljust(width)}  {batch}")
    if not entries:
        echo("The state has no entries.")


@state_group.command("show")
@common_options
@click.argument("name")
def state_show(project, name) -> None:
    """One entry of the state, as JSON."""
    import json

    from .watch import select

    (entry,) = select(project.store().load(), (name,)).values()
    echo(json.dumps(entry.model_dump(mode="json"), indent=2, sort_keys=True))


@state_group.command("rm")
@common_options
@lock_timeout_option
@click.argument("name")
def state_rm(project, name) -> None:
    """Stop tracking NAME: remove its entry from the state. Its batch is left alone on the server."""
    from .state import command_line
    from .watch import select

    store = project.store()
    with store.transaction(command_line(), project.lock_timeout) as txn:
        select(txn.state, (name,))
        entry = txn.state.entries.pop(name)
    batch = f"batch {entry.batch.id} ({entry.batch.status}) was not touched on the server" if entry.batch \
        else "it had no batch"
    echo(f"Removed {name} from the state; {batch}. The previous state is in {store.backup_location}.")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI and maps every outcome to an exit code."""
    global _DEBUG
    _DEBUG = False  # set by --debug for this run only (tests call main() many times in one process)
    try:
        code = cli.main(args=argv, prog_name="batchplan", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        echo("Aborted; nothing was changed.", err=True)
        code = 1
    except click.ClickException as exc:
        exc.show()
        code = 1
    except Interrupted as exc:
        echo(f"Error: {exc}", err=True)
        code = 130
    except BatchplanError as exc:
        if _DEBUG:
            traceback.print_exc()
        echo(f"Error: {exc}", err=True)
        code = 1
    except KeyboardInterrupt:
        echo("Interrupted.", err=True)
        code = 130
    except Exception as exc:  # a bug: say so plainly, traceback only with --debug
        if _DEBUG:
            traceback.print_exc()
        echo(f"Internal error: {type(exc).__name__}: {exc}. Run again with --debug for the traceback, "
             "and please report it.", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
