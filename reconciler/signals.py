"""What a command does with Ctrl-C and SIGTERM.

SIGTERM ends any command as Ctrl-C does; apply takes both over while it carries a plan out (the
first stops new requests, the second abandons those in flight); once a command is ending, both are
ignored so that nothing cuts its report short; and cli.main puts back what it found.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_as_ctrl_c():
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


def ignore_signals() -> None:
    """From here on Ctrl-C and SIGTERM do nothing: the command is ending (it reports its outcome, or
    an interrupted apply closes its connections), and a second Ctrl-C landing now would cut the line
    "interrupted: run `batchplan apply` again" short with a traceback. cli.main puts back, with
    `signals_kept`, what was there before the command."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def signals_kept():
    """Put back the SIGINT and SIGTERM handlers a command found (tests run many commands in one process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
