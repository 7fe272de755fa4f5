"""Feedback on long work while a command runs: progress bars for big files, a line per retry.

The code that does the work (hashing in inputs.py, uploads in uploader.py, downloads and
retries in api.py) says what it is doing through the Feedback in use; it never prints.
cli.py puts one in use for the run (`use`): on a terminal, rich progress bars on standard
error for files of at least LARGE_FILE bytes, and every notice (a retry) as a line on
standard error; elsewhere the default, which shows nothing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LARGE_FILE = 8 << 20  # bytes: a file that takes long enough to hash, send or fetch to deserve a bar
Advance = Callable[[int], None]


def _nothing(_: int) -> None:
    pass


class Feedback:
    """Shows nothing: for tests, pipes and logs (retries still say so through `notice`)."""

    def __init__(self, notice: Callable[[str], None] | None = None):
        self._notice = notice

    def notice(self, text: str) -> None:
        if self._notice is not None:
            self._notice(text)

    @contextmanager
    def transfer(self, description: str, total: int) -> Iterator[Advance]:
        """A callable to report bytes done of `total` while the block runs."""
        yield _nothing


class ProgressBars(Feedback):
    """rich progress bars (on standard error) for files of at least LARGE_FILE bytes.

    rich is loaded at the first big file, not before: most commands never draw a bar."""

    def __init__(self, notice: Callable[[str], None] | None = None, console=None):
        super().__init__(notice)
        self.console = console
        self.progress = None

    def _bars(self):
        if self.progress is None:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(),
                                     console=self.console or Console(stderr=True), transient=True)
        return self.progress

    def notice(self, text: str) -> None:
        if self.progress is not None and self.progress.live.is_started:  # above the bars, not through them
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            super().notice(text)

    @contextmanager
    def transfer(self, description: str, total: int) -> Iterator[Advance]:
        if total < LARGE_FILE:
            yield _nothing
            return
        bars = self._bars()
        task = bars.add_task(description, total=total)
        bars.start()  # several transfers share one live display (uploads run concurrently)
        try:
            yield lambda n: bars.advance(task, n)
        finally:
            bars.remove_task(task)
            if not bars.tasks:
                bars.stop()


_current: contextvars.ContextVar[Feedback] = contextvars.ContextVar("feedback", default=Feedback())


def current() -> Feedback:
    return _current.get()


@contextmanager
def use(feedback: Feedback) -> Iterator[Feedback]:
    """Put `feedback` in use for the block (one command run)."""
    token = _current.set(feedback)
    try:
        yield feedback
    finally:
        _current.reset(token)
