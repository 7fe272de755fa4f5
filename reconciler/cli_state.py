"""`batchplan state`: read, edit or move the state by hand. Parses and renders; the work is in operations.py.

cli.py adds this group to the command line; errors end up in cli.main like every command's.
"""

from __future__ import annotations

import click

from . import operations
from .options import STATE_ONLY, Group, lock_timeout_option, project_options
from .terminal import echo, emit, hint_if_empty, renderer


@click.group("state", cls=Group)
def state_group() -> None:
    """Read, edit or move the state by hand; never calls the server.

    For the sandbox's state: `batchplan --sandbox state list`.
    """


@state_group.command("list")
@project_options(*STATE_ONLY)
def state_list(project) -> None:
    """Every name in the state, with its batch id and status as last recorded."""
    entries = operations.state_entries(project)
    emit(renderer().render_entries(entries))
    hint_if_empty(project, not entries)


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
    emit(renderer().render_removed(name, operations.remove_entry(project, name)))


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
    emit(renderer().render_migrated(operations.migrate_state(project, to, workspace, force)))
