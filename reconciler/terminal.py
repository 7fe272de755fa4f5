"""The terminal the command line talks to: what it prints, how, and what it listens for.

Colour only on a terminal and never with NO_COLOR; rendered output (`emit`) split between
standard output and standard error; a live progress display on a terminal and a line per
change in logs; notes and retries on standard error as they happen.
The commands in cli.py, cli_state.py and cli_sandbox.py print through here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import click

from . import feedback, operations  # operations loads nothing heavy until a command runs
from .errors import Notice


def renderer():
    """reconciler.render, loaded when a command has something to render: --help does not load the
    models a plan is made of."""
    from . import render

    return render


def is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def colour_on() -> bool:
    return not os.environ.get("NO_COLOR") and is_terminal(sys.stdout)


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    colour = False if os.environ.get("NO_COLOR") else None  # None: only when writing to a terminal
    click.echo(text, err=err, nl=nl, color=colour)


def emit(output) -> None:
    """Print a render.Output (its standard output part, then its standard error part) or a str."""
    for text, err in ((output, False),) if isinstance(output, str) else ((output.out, False), (output.err, True)):
        if text:
            echo(text, err=err, nl=False)


def hint_if_empty(project, empty: bool) -> None:
    """Say on standard error when the state is empty but the sandbox's holds batches (a forgotten --sandbox)."""
    hint = operations.sandbox_hint(project) if empty else None
    if hint:
        echo(f"Note: {hint}", err=True)


def progress_display(names: list[str], no_batch: str = "no batch"):
    """A live progress display on a terminal, one line per change otherwise."""
    from .watch import LineDisplay, ProgressDisplay

    return ProgressDisplay(names, no_batch=no_batch) if is_terminal(sys.stdout) else LineDisplay(echo)


def run_feedback() -> feedback.Feedback:
    """Progress bars for big files on a terminal; a line per retry on standard error everywhere."""
    def notice(text: str) -> None:
        echo(f"  {text}", err=True)

    return feedback.ProgressBars(notice) if is_terminal(sys.stderr) else feedback.Feedback(notice)


@contextlib.contextmanager
def notices():
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
