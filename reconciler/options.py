"""The options every command takes, and the Invocation that carries them in click's context.

The options that say where the project is and how to reach the server (`-C`, `--specs`,
`--state`, `--sandbox`, `--parallelism`, `--allow-insecure-http`, `--lock-timeout`) are
not passed to the commands: their values are kept in the Invocation (`ctx.obj`), and
the command gets the Project they open as its first argument. `--debug` is kept there
too, for main() to read when an error ends the run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import click

from .operations import PlanRequest


@dataclass
class Invocation:
    """One run of batchplan, carried in click's context (`ctx.obj`): what the options every
    command takes said (main() makes one per run; tests call main() many times in one process)."""

    debug: bool = False  # show tracebacks: read by main() when an error ends the run
    settings: dict = field(default_factory=dict)  # Project.open's arguments


def _remember(ctx: click.Context, param: click.Parameter, value):
    """Keep an option's value for Project.open (options are read here, not passed to the command)."""
    ctx.ensure_object(Invocation).settings[param.name] = value
    return value


def _remember_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.ensure_object(Invocation).debug |= value
    return value


def _option(*names: str, **kwargs):
    return click.option(*names, expose_value=False, callback=_remember, **kwargs)


debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_remember_debug,
                            help="Show Python tracebacks for errors.")
COMMON_OPTIONS = (
    _option("-C", "--chdir", metavar="DIR", help="Run as if batchplan was started in DIR (the repo root)."),
    _option("--specs", metavar="DIR", help="Spec directory [default: specs, or batchplan.yaml]."),
    _option("--state", metavar="FILE|URL",
            help="State file, or postgresql://USER@HOST:PORT/DATABASE (also BATCHPLAN_STATE_URL) "
                 "[default: state/batchplan.state.json]."),
    _option("--sandbox", is_flag=True, envvar="BATCHPLAN_SANDBOX",
            help="Use the embedded emulator: no key, no network, its own state (also BATCHPLAN_SANDBOX=1)."),
    _option("--parallelism", type=click.IntRange(1, 64), help="Concurrent requests [default: 16]."),
    _option("--allow-insecure-http", is_flag=True, help="Allow an http:// OPENAI_BASE_URL that is not loopback."),
    debug_option,
)
lock_timeout_option = _option(
    "--lock-timeout", type=click.FloatRange(0), default=0.0, metavar="SECONDS",
    help="Wait up to SECONDS for another batchplan holding the state lock [default: fail at once].")


def common_options(func):
    """Options every command takes, after the command name; the command gets the Project first."""
    @functools.wraps(func)
    def with_project(*args, **kwargs):
        from .project import Project

        return func(Project.open(**click.get_current_context().ensure_object(Invocation).settings), *args, **kwargs)
    for option in reversed(COMMON_OPTIONS):
        with_project = option(with_project)
    return with_project


def plan_options(func):
    @click.option("--target", multiple=True, metavar="NAME", help="Plan only these spec names (repeatable).")
    @click.option("--replace", multiple=True, metavar="NAME", help="Make a new batch for NAME even if unchanged.")
    @click.option("--scan-all", is_flag=True,
                  help="Look through every batch in the account for ones batchplan made (slow on big accounts).")
    @functools.wraps(func)
    def with_request(*args, target, replace, scan_all, **kwargs):
        return func(*args, PlanRequest(frozenset(target), frozenset(replace), scan_all), **kwargs)
    return with_request


names_argument = click.argument("names", nargs=-1, metavar="[NAME]...")
