"""A command's session with the server: one event loop and at most one Api client per command.

A command may talk to the server several times (apply: plan, then, once the user said
`yes`, carry the plan out). Each of those runs to completion on the same event loop with
the same client (and, with --sandbox, the same emulator), and between them the loop is
not running, so the command can ask the user a question without holding up a request.
The client is made on first use: a command whose batches have all finished never
needs a key, a connection, or asyncio itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import asyncio

    from .api import Api
    from .project import Project

T = TypeVar("T")


class Session:
    """Use as `with Session(project) as session: session.run(lambda api: ...)`."""

    def __init__(self, project: Project):
        self.project = project
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stack: AsyncExitStack | None = None
        self._api: Api | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, work: Callable[[Api], Awaitable[T]]) -> T:
        """`await work(api)` on this command's loop, connecting on first use.

        The result leaves through a list, not as the task's result: Python 3.11 formats the
        repr of a main task, result included, when it restores the Ctrl-C handler, and the
        repr of a 1,000-spec plan takes 0.1 s.
        """
        import asyncio  # here: --help and validate do not pay for loading asyncio

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        result: list[T] = []

        async def main() -> None:
            result.append(await work(await self._connected()))

        self._loop.run_until_complete(main())
        return result[0]

    async def _connected(self) -> Api:
        if self._api is None:
            self._stack = AsyncExitStack()
            self._api = await self._stack.enter_async_context(self.project.connect())
        return self._api

    def close(self) -> None:
        """Close the client (and stop the sandbox), then the loop, as asyncio.run does."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            if self._stack is not None:
                loop.run_until_complete(self._stack.aclose())
        finally:
            self._stack = self._api = None
            _cancel_leftover_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Tasks a Ctrl-C left behind: cancel them and let them finish, so nothing is destroyed pending."""
    import asyncio

    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
