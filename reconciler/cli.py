"""The command line: parses arguments, asks for approval, renders results. The work is in operations.py.

The only module that turns errors into text and exit codes. Exit codes: 0 success; 1 any
error (a message naming the file, field or line, never a traceback unless --debug); 2
from `plan --detailed-exitcode` when there are changes; 130 when interrupted.
"""

from __future__ import annotations

import shutil
import sys
import traceback

import click

from . import __version__, feedback, operations  # operations loads nothing heavy until a command runs
from .cli_sandbox import sandbox_group
from .cli_state import state_group
from .errors import BatchplanError, Interrupted, PlanError
from .options import (OFFLINE, STATE_ONLY, Group, Invocation, common_options, global_options, lock_timeout_option,
                      names_argument, plan_options, project_options)
from .terminal import (colour_on, echo, emit, hint_if_empty, is_terminal, notices, progress_display, renderer,
                       run_feedback)
from .signals import ignore_signals, sigterm_as_ctrl_c, signals_kept


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
    emit(renderer().render_init(operations.init(project)))


@cli.command()
@project_options(*OFFLINE)
def validate(project) -> None:
    """Check every spec and input file, offline: no key, no network."""
    checked = operations.validate(project)  # rendered here: render.py loads the plan's models, validate needs none
    echo(f"{checked.specs} spec(s) valid; {checked.files} input file(s), {checked.requests:,} request(s).")
    for name, why in sorted(checked.splits.items()):
        echo(f"  {name}: {why}")


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
    emit(renderer().render_plan(the_plan, "json" if as_json else (fmt or "text"), colour=colour_on()))
    hint_if_empty(project, the_plan.serial == 0)
    if out:
        echo(f"Saved the plan to {out}; apply exactly it with `batchplan apply {out}`.", err=True)
    return 2 if detailed_exitcode and the_plan.has_changes else 0


def _confirm(auto_approve: bool) -> None:
    if auto_approve:
        return
    if not is_terminal(sys.stdin):
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
        emit(renderer().render_text(the_plan, colour_on()))
        if the_plan.has_changes and not planfile:
            _confirm(auto_approve)

    def report(name: str, text: str) -> None:
        echo(f"  {name}: {text}")

    if watch:
        if planfile:
            raise click.UsageError("--watch plans every round itself; it takes no PLANFILE")
        watched = operations.apply_watch(project, request, review=review, report=report, interval=interval,
                                         display=lambda names: progress_display(names, no_batch="queued"))
        emit(renderer().render_watched(watched))
        waited = watched.waited
        return 1 if watched.failed or waited.result and waited.result.problems(waited.names) else 0
    applied = operations.apply(project, request, planfile=project.root / planfile if planfile else None,
                               review=review, report=report)
    if applied.result is None:
        return 0
    emit(renderer().render_apply_result(applied.result))
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
    width = shutil.get_terminal_size().columns if is_terminal(sys.stdout) else None
    emit(renderer().render_status(report, as_json=as_json, width=width, colour=colour_on(), wide=layout == "wide"))
    hint_if_empty(project, not report.rows and not as_json)
    return 0


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
    waited = operations.wait(project, names, interval=interval, timeout=timeout, display=progress_display)
    emit(renderer().render_wait(waited, timeout))
    hint_if_empty(project, waited.result is None)
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
    emit(renderer().render_download(report))
    hint_if_empty(project, report.empty)
    return 1 if report.failed else 0


@cli.command("refresh")
@common_options
@lock_timeout_option
def refresh_cmd(project) -> None:
    """Record in the state what the server says now about batches still running.

    Sends only GET requests: nothing changes on the server.
    """
    emit(renderer().render_refresh(operations.refresh(project)))


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
    emit(renderer().render_import(operations.import_batch(project, name, batch_id), name))


cli.add_command(state_group)  # cli_state.py; added here, as help lists commands in the order added


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


cli.add_command(sandbox_group)  # cli_sandbox.py: `sandbox serve`


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI and maps every outcome to an exit code."""
    invocation = Invocation()  # one per run: tests call main() many times in one process
    with signals_kept():
        try:
            try:
                with feedback.use(run_feedback()), notices(), sigterm_as_ctrl_c():
                    code = cli.main(args=argv, prog_name="batchplan", standalone_mode=False, obj=invocation)
            except BaseException as exc:
                ignore_signals()
                code = _reported(exc, invocation)
        except KeyboardInterrupt:  # a second Ctrl-C that landed before the report began: the first is reported
            code = 130
    sys.exit(code if isinstance(code, int) else 0)


def _reported(exc: BaseException, invocation: Invocation) -> int:
    """Say how a command ended, as one message (a traceback only with --debug); its exit code."""
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort):
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort: it is still 130
            echo("Interrupted.", err=True)
            return 130
        echo("Aborted; nothing was changed.", err=True)
        return 1
    if isinstance(exc, click.ClickException):
        exc.show()
        return 1
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        echo(f"Error: {exc}" if isinstance(exc, Interrupted) else "Interrupted.", err=True)
        return 130
    if not isinstance(exc, Exception):  # SystemExit and the like: not an outcome to report
        raise exc
    # BatchplanError: its message; anything else is a bug: say so plainly
    if invocation.debug:
        traceback.print_exception(exc)
    echo(f"Error: {exc}" if isinstance(exc, BatchplanError) else f"Internal error: {type(exc).__name__}: "
         f"{exc}. Run again with --debug for the traceback, and please report it.", err=True)
    return 1
