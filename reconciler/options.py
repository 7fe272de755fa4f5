"""The options commands share, the Invocation that carries them, and the help layout.

The options that say where the project is and how to reach the server (`-C`, `--specs`,
`--state`, `--sandbox`, `--parallelism`, `--allow-insecure-http`, `--lock-timeout`) are
not passed to the commands: their values are kept in the Invocation (`ctx.obj`), and
the command gets the Project they open as its first argument. `--debug` is kept there
too, for main() to read when an error ends the run.

They are taken before the command as in git and terraform (`batchplan -C dir plan`,
`batchplan --sandbox status`) and after it (`batchplan plan -C dir`), where a command
offers only the ones it uses. A value given after the command wins over one given
before it; an option left out after the command keeps the value given before it.
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


class SharedOption(click.Option):
    """An option many commands share: help lists it apart, under "Global options"."""


class Command(click.Command):
    """A command whose help lists its own options first, then the shared ones in their own group."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own, shared = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                (shared if isinstance(param, SharedOption) else own).append(record)
        for title, records in (("Options", own), ("Global options (also before the command)", shared)):
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


class Group(click.Group):
    """A group that lists its commands in the order they are defined (workflow order), not A to Z."""

    command_class = Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        Command.format_options(self, ctx, formatter)  # type: ignore[arg-type]
        self.format_commands(ctx, formatter)


Group.group_class = Group


def _remember(ctx: click.Context, param: click.Parameter, value):
    """Keep an option's value for Project.open (options are read here, not passed to the command).

    An option left at its default after the command keeps what it said before the command
    (click tells a callback the value, not yet whether it was given, so the default is compared)."""
    settings = ctx.ensure_object(Invocation).settings
    left_out = value is None or value == param.get_default(ctx)  # click >= 8.2 says UNSET, not None, for "no default"
    if param.name not in settings or not left_out:
        settings[param.name] = value
    return value


def _remember_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.ensure_object(Invocation).debug |= value
    return value


def _option(*names: str, **kwargs):
    return click.option(*names, cls=SharedOption, expose_value=False, callback=_remember, **kwargs)


debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_remember_debug,
                            cls=SharedOption, help="Show Python tracebacks for errors.")
SHARED_OPTIONS = {
    "chdir": _option("-C", "--chdir", metavar="DIR", help="Run as if batchplan was started in DIR (the repo root)."),
    "specs": _option("--specs", metavar="DIR", help="Spec directory [default: specs, or batchplan.yaml]."),
    "state": _option("--state", metavar="FILE|URL",
                     help="State file, or postgresql://USER@HOST:PORT/DATABASE (also BATCHPLAN_STATE_URL) "
                          "[default: state/batchplan.state.json]."),
    "sandbox": _option("--sandbox", is_flag=True, envvar="BATCHPLAN_SANDBOX",
                       help="Use the embedded emulator: no key, no network, its own state under state/sandbox/ "
                            "(also BATCHPLAN_SANDBOX=1)."),
    "parallelism": _option("--parallelism", type=click.IntRange(1, 64), help="Concurrent requests [default: 16]."),
    "allow_insecure_http": _option("--allow-insecure-http", is_flag=True,
                                   help="Allow an http:// OPENAI_BASE_URL that is not loopback."),
    "debug": debug_option,
}
ONLINE = tuple(SHARED_OPTIONS)             # commands that read the server
OFFLINE = ("chdir", "specs", "debug")     # validate: specs and inputs only
STATE_ONLY = ("chdir", "state", "debug")  # state list/show/rm, force-unlock: the state file only
lock_timeout_option = _option(
    "--lock-timeout", type=click.FloatRange(0), default=0.0, metavar="SECONDS",
    help="Wait up to SECONDS for another batchplan holding the state lock [default: fail at once].")


def global_options(func):
    """Every shared option, on the group: taken before the command name."""
    for name in reversed(ONLINE):
        func = SHARED_OPTIONS[name](func)
    return func


def project_options(*names: str):
    """The shared options `names`, after the command name; the command gets the Project first."""
    def decorate(func):
        @functools.wraps(func)
        def with_project(*args, **kwargs):
            from .project import Project

            settings = click.get_current_context().ensure_object(Invocation).settings
            return func(Project.open(**settings), *args, **kwargs)
        for name in reversed(names):
            with_project = SHARED_OPTIONS[name](with_project)
        return with_project
    return decorate


common_options = project_options(*ONLINE)


def plan_options(func):
    @click.option("--target", multiple=True, metavar="NAME", help="Plan only these spec names, or NAME[K] for one shard (repeatable).")
    @click.option("--replace", multiple=True, metavar="NAME", help="Make a new batch for NAME (every shard of it; NAME[K]: one) even if unchanged.")
    @click.option("--scan-all", is_flag=True,
                  help="Look through every batch in the account for ones batchplan made (slow on big accounts).")
    @functools.wraps(func)
    def with_request(*args, target, replace, scan_all, **kwargs):
        return func(*args, PlanRequest(frozenset(target), frozenset(replace), scan_all), **kwargs)
    return with_request


names_argument = click.argument("names", nargs=-1, metavar="[NAME]...")
