"""The command line: parses arguments, asks for approval, renders results. The work is in operations.py.

The only module that turns errors into text and exit codes. Exit codes: 0 success; 1 any
error (a message naming the file, field or line, never a traceback unless --debug); 2
from `plan --detailed-exitcode` when there are changes; 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import shutil
import sys
import threading
import traceback
import warnings
from pathlib import Path

import click

from . import __version__, feedback, operations  # operations loads nothing heavy until a command runs
from .errors import BatchplanError, Interrupted, Notice, PlanError
from .options import (OFFLINE, STATE_ONLY, Group, Invocation, common_options, debug_option, global_options,
                      lock_timeout_option, names_argument, plan_options, project_options)


def _render():
    from . import render  # here: --help does not load the models a plan is made of

    return render


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def colour_on() -> bool:
    return not os.environ.get("NO_COLOR") and _is_terminal(sys.stdout)


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    colour = False if os.environ.get("NO_COLOR") else None  # None: only when writing to a terminal
    click.echo(text, err=err, nl=nl, color=colour)


def emit(output) -> None:
    """Print a render.Output (its standard output part, then its standard error part) or a str."""
    for text, err in ((output, False),) if isinstance(output, str) else ((output.out, False), (output.err, True)):
        if text:
            echo(text, err=err, nl=False)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchplan", help="Show the version and exit.")
@global_options
def cli() -> None:
    """Declarative, Terraform-style reconciler for the OpenAI Batch API.

    Keep batch specs in specs/*.yaml; `plan` shows what would change against the state
    file and the server; `apply` makes it so, idempotently (never a duplicate batch).
    Shell completion: eval "$(_BATCHPLAN_COMPLETE=bash_source batchplan)" (zsh_source, fish_source).
    """


# -- init / validate / plan / apply --------------------------------------------------------


@cli.command()
@project_options(*OFFLINE)
def init(project) -> None:
    """Start a project here: specs/ with a commented example spec, batchplan.yaml, .gitignore.

    Never overwrites: a file already there is kept as it is; .gitignore only gets the lines it lacks.
    """
    emit(_render().render_init(operations.init(project)))


@cli.command()
@project_options(*OFFLINE)
def validate(project) -> None:
    """Check every spec and input file, offline: no key, no network."""
    checked = operations.validate(project)  # rendered here: render.py loads the plan's models, validate needs none
    echo(f"{checked.specs} spec(s) valid; {checked.files} input file(s), {checked.requests:,} request(s).")
    for name, why in sorted(checked.splits.items()):
        echo(f"  {name}: {why}")


def _hint_if_empty(project, empty: bool) -> None:
    """Say on standard error when the state is empty but the sandbox's holds batches (a forgotten --sandbox)."""
    hint = operations.sandbox_hint(project) if empty else None
    if hint:
        echo(f"Note: {hint}", err=True)


@cli.command()
@common_options
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON document (see README).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default=None,
              help="Output format [default: text].")
@click.option("--out", type=click.Path(dir_okay=False), help="Also save the plan to FILE for `apply FILE`.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 0 when nothing changes, 2 when something would.")
def plan(project, request, as_json, fmt, out, detailed_exitcode) -> int:
    """Show what apply would change and what it may cost. Reads the server; writes nothing but the caches."""
    the_plan = operations.plan(project, request, project.root / out if out else None)  # -C DIR: relative to DIR
    emit(_render().render_plan(the_plan, "json" if as_json else (fmt or "text"), colour=colour_on()))
    _hint_if_empty(project, the_plan.serial == 0)
    if out:
        echo(f"Saved the plan to {out}; apply exactly it with `batchplan apply {out}`.", err=True)
    return 2 if detailed_exitcode and the_plan.has_changes else 0


def _confirm(auto_approve: bool) -> None:
    if auto_approve:
        return
    if not _is_terminal(sys.stdin):
        raise PlanError("apply needs confirmation but standard input is not a terminal; nothing was changed. "
                        "Review the plan, then run `batchplan apply --auto-approve`")
    answer = click.prompt("Do you want to perform these actions? Only 'yes' will be accepted", default="",
                          show_default=False)
    if answer.strip() != "yes":
        raise PlanError("apply cancelled; nothing was changed")


interval_option = click.option("--interval", type=click.FloatRange(0.01), default=None, metavar="SECONDS",
                               help="Seconds between polls [default: 15; 1 with --sandbox].")


@cli.command()
@common_options
@plan_options
@lock_timeout_option
@click.argument("planfile", required=False, type=click.Path(dir_okay=False))
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
@click.option("--watch", is_flag=True,
              help="Run the whole job: create what fits under the enqueued-token limits, poll, create the rest "
                   "as batches finish; exit when every batch has ended (0: all completed).")
@interval_option
def apply(project, request, planfile, auto_approve, watch, interval) -> int:
    """Create, adopt, replace, cancel and forget batches so the server matches the specs.

    With PLANFILE (from `plan --out`), carry out exactly that saved plan, without asking.
    Creates that do not fit under batchplan.yaml's `limits:` now stay queued for a later
    apply; `--watch` stays until all are made and every batch has ended, as `wait` shows it.
    """
    def review(the_plan) -> None:
        emit(_render().render_text(the_plan, colour_on()))
        if the_plan.has_changes and not planfile:
            _confirm(auto_approve)

    def report(name: str, text: str) -> None:
        echo(f"  {name}: {text}")

    if watch:
        if planfile:
            raise click.UsageError("--watch plans every round itself; it takes no PLANFILE")
        watched = operations.apply_watch(project, request, review=review, report=report, interval=interval,
                                         display=lambda names: _display(names, no_batch="queued"))
        emit(_render().render_watched(watched))
        waited = watched.waited
        return 1 if watched.failed or waited.result and waited.result.problems(waited.names) else 0
    applied = operations.apply(project, request, planfile=project.root / planfile if planfile else None,
                               review=review, report=report)
    if applied.result is None:
        return 0
    emit(_render().render_apply_result(applied.result))
    return 1 if applied.result.failed else 0


# -- watching and collecting: status, wait, download, refresh, import, state ---------------


@cli.command("status")
@common_options
@names_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (format_version 1).")
@click.option("-o", "--output", "layout", type=click.Choice(["wide"]), default=None,
              help="wide: also the full batch ids and the output and error file ids.")
@click.option("--shards", is_flag=True, help="Under a spec split into shards, also a line per shard.")
def status_cmd(project, names, as_json, layout, shards) -> int:
    """Every batch in the state (or the NAMEs): status, request counts, age, notes.

    A spec split into shards is one line, its shards' counts summed (`--shards`: and a line
    per shard; NAME[K] names one shard). Asks the server about batches still running.
    Read-only: it prints what the server says and writes nothing; `batchplan refresh`
    records it in the state.
    """
    report = operations.status(project, names, shards)
    width = shutil.get_terminal_size().columns if _is_terminal(sys.stdout) else None
    emit(_render().render_status(report, as_json=as_json, width=width, colour=colour_on(), wide=layout == "wide"))
    _hint_if_empty(project, not report.rows and not as_json)
    return 0


def _display(names: list[str], no_batch: str = "no batch"):
    """A live progress display on a terminal, one line per change otherwise."""
    from .watch import LineDisplay, ProgressDisplay

    return ProgressDisplay(names, no_batch=no_batch) if _is_terminal(sys.stdout) else LineDisplay(echo)


@cli.command("wait")
@common_options
@lock_timeout_option
@names_argument
@click.option("--timeout", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Give up after SECONDS, exit 1 [default: no limit].")
@interval_option
def wait_cmd(project, names, timeout, interval) -> int:
    """Poll until every batch in the state (or the NAMEs) has finished.

    A live progress display on a terminal (each batch's age and a rough ETA); in logs a
    line when a batch's status changes, else at most one a minute per batch. Exit 0 when
    all completed; 1 when any failed, expired or was cancelled, or the timeout passed. The
    final statuses are recorded in the state (under the state lock).
    """
    waited = operations.wait(project, names, interval=interval, timeout=timeout, display=_display)
    emit(_render().render_wait(waited, timeout))
    _hint_if_empty(project, waited.result is None)
    return 1 if waited.result and waited.result.problems(waited.names) else 0


@cli.command("download")
@common_options
@names_argument
@click.option("--batch", "batch_id", metavar="BATCH_ID",
              help="Download this batch of NAME instead of its latest: any batch in its history (a replaced "
                   "or cancelled one too). For a spec split into shards NAME may be the spec's name: the "
                   "shard whose batch it is.")
@click.option("--join", is_flag=True,
              help="Also write joined.jsonl next to the results: each input request with its response, by "
                   "custom_id, in input order. A spec split into shards gets one <results>/NAME/joined.jsonl "
                   "of every shard, in input order.")
def download_cmd(project, names, batch_id, join) -> int:
    """Save each finished batch's output and error files (of the NAMEs, default all).

    Each batch's files go to <results>/<name>/<batch id>/output.jsonl and errors.jsonl,
    and the latest batch's also to the spec's `output:` / `errors:` paths (relative to the
    repo root), else <results>/<name>/output.jsonl and errors.jsonl. Files already
    downloaded intact are skipped without asking the server; batches still running are
    skipped with a note. Exit 1 when a file could not be downloaded (e.g. it expired).
    """
    if batch_id and len(names) != 1:
        raise click.UsageError("--batch BATCH_ID needs exactly one NAME: `batchplan download NAME --batch ID`")
    report = operations.download(project, names, batch_id=batch_id, join=join)
    emit(_render().render_download(report))
    _hint_if_empty(project, report.empty)
    return 1 if report.failed else 0


@cli.command("refresh")
@common_options
@lock_timeout_option
def refresh_cmd(project) -> None:
    """Record in the state what the server says now about batches still running.

    Sends only GET requests: nothing changes on the server.
    """
    emit(_render().render_refresh(operations.refresh(project)))


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
    emit(_render().render_import(operations.import_batch(project, name, batch_id), name))


@cli.group("state")
def state_group() -> None:
    """Read, edit or move the state by hand; never calls the server.

    For the sandbox's state: `batchplan --sandbox state list`.
    """


@state_group.command("list")
@project_options(*STATE_ONLY)
def state_list(project) -> None:
    """Every name in the state, with its batch id and status as last recorded."""
    entries = operations.state_entries(project)
    emit(_render().render_entries(entries))
    _hint_if_empty(project, not entries)


@state_group.command("show")
@project_options(*STATE_ONLY)
@click.argument("name")
def state_show(project, name) -> None:
    """One entry of the state, as JSON."""
    import json

    (entry,) = operations.state_entries(project, (name,)).values()
    echo(json.dumps(entry.model_dump(mode="json"), indent=2, sort_keys=True))


@state_group.command("rm")
@project_options(*STATE_ONLY)
@lock_timeout_option
@click.argument("name")
def state_rm(project, name) -> None:
    """Stop tracking NAME: remove its entry from the state. Its batch is left alone on the server."""
    emit(_render().render_removed(name, operations.remove_entry(project, name)))


@state_group.command("migrate")
@project_options(*STATE_ONLY)
@lock_timeout_option
@click.option("--to", "to", required=True, metavar="URL|FILE",
              help="Where to copy the state: postgresql://USER@HOST:PORT/DATABASE, or a state file path.")
@click.option("--workspace", metavar="NAME", help="The target's workspace in PostgreSQL [default: this one's].")
@click.option("--force", is_flag=True, help="Replace a state the target already holds (kept as its backup).")
def state_migrate(project, to, workspace, force) -> None:
    """Copy the state, lineage and serial kept, to another place: a state file into PostgreSQL
    or back. Prints the batchplan.yaml lines that switch to it. Never calls the server."""
    emit(_render().render_migrated(operations.migrate_state(project, to, workspace, force)))


# -- locks and the sandbox -----------------------------------------------------------------


@cli.command("force-unlock")
@project_options(*STATE_ONLY)
@click.argument("lock_id")
@click.option("--force", is_flag=True,
              help="Take the lock even from a holder that is alive (a state file: the next command locks afresh; "
                   "PostgreSQL: its database session is ended).")
def force_unlock_cmd(project, lock_id, force) -> None:
    """Remove the state lock LOCK_ID (the id the lock error and the lock note show) left by a process that
    is gone. A holder still alive is refused, unless --force."""
    location, held = operations.force_unlock(project, lock_id, force)
    echo(f"Removed the lock on {location} (held by {held.describe()}).")


@cli.group()
def sandbox() -> None:
    """The embedded Files + Batches API emulator."""


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8089, show_default=True, type=int, help="Port to listen on.")
@click.option("--dir", "world", type=click.Path(file_okay=False), help="Keep the world on disk here.")
@click.option("--step-seconds", type=click.FloatRange(0), default=None,
              help="Seconds per lifecycle step (validating, in_progress, finalizing) [default: 2/3/1].")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests that fail into the error file.")
@click.option("--latency", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds added to every request.")
@click.option("--no-auth", is_flag=True, help="Accept requests without an API key.")
@click.option("--enqueued-token-limit", "limits", multiple=True, metavar="MODEL=TOKENS",
              help="Fail a batch of MODEL with token_limit_exceeded when its input tokens would take the model's "
                   "batches in progress over TOKENS, as the API does (repeatable) [default: BATCHPLAN_SANDBOX_LIMITS].")
@click.option("--auth", type=click.Choice(["bearer", "api-key"]), default="bearer", show_default=True,
              help="The header the key must come in: Authorization: Bearer KEY (OpenAI), or api-key: KEY "
                   "(Azure OpenAI).")
@click.option("--prefix", default="/v1", show_default=True, metavar="PATH",
              help="Where the API is served, e.g. /openai/v1 as Azure OpenAI serves it.")
@debug_option
def sandbox_serve(host, port, world, step_seconds, fail_rate, latency, no_auth, limits, auth, prefix) -> None:
    """Serve the emulator over HTTP at http://HOST:PORT/v1 (or --prefix) until Ctrl-C."""
    from .sandbox import Timing, serve
    from .sandbox.capacity import parse_limits

    if not prefix.startswith("/") or prefix.rstrip("/") in ("", "/_sandbox"):
        raise click.BadParameter("give a path such as /v1 or /openai/v1", param_hint="--prefix")
    timing = Timing.uniform(step_seconds) if step_seconds is not None else Timing()
    serve(host=host, port=port, root=Path(world) if world else None, timing=timing, fail_rate=fail_rate,
          latency=latency, require_auth=not no_auth, auth=auth, prefix=prefix.rstrip("/"),
          enqueued_token_limits=parse_limits(limits, "--enqueued-token-limit") if limits else None)


def _feedback() -> feedback.Feedback:
    """Progress bars for big files on a terminal; a line per retry on standard error everywhere."""
    def notice(text: str) -> None:
        echo(f"  {text}", err=True)

    return feedback.ProgressBars(notice) if _is_terminal(sys.stderr) else feedback.Feedback(notice)


@contextlib.contextmanager
def _notices():
    """Print each Notice the work issues as `Note: ...` on standard error, as it happens."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", Notice)
        other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, Notice):
                echo(f"Note: {message}", err=True)
            else:
                other(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM ends any command as Ctrl-C does (exit 130, the state saved), not silently mid-write;
    apply installs its own handlers for both while it carries a plan out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI and maps every outcome to an exit code."""
    invocation = Invocation()  # one per run: tests call main() many times in one process
    try:
        with feedback.use(_feedback()), _notices(), _sigterm_as_ctrl_c():
            code = cli.main(args=argv, prog_name="batchplan", standalone_mode=False, obj=invocation)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort: it is still 130
            echo("Interrupted.", err=True)
            code = 130
        else:
            echo("Aborted; nothing was changed.", err=True)
            code = 1
    except click.ClickException as exc:
        exc.show()
        code = 1
    except (Interrupted, KeyboardInterrupt) as exc:
        echo(f"Error: {exc}" if isinstance(exc, Interrupted) else "Interrupted.", err=True)
        code = 130
    except Exception as exc:  # BatchplanError: its message; anything else is a bug: say so plainly
        if invocation.debug:
            traceback.print_exc()
        echo(f"Error: {exc}" if isinstance(exc, BatchplanError) else f"Internal error: {type(exc).__name__}: "
             f"{exc}. Run again with --debug for the traceback, and please report it.", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
