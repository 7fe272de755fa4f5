"""A command's session with the servers: one event loop and at most one Api client per provider.

A command may talk to the servers several times (apply: plan, then, once the user said
`yes`, carry the plan out). Each of those runs to completion on the same event loop with
the same clients (and, with --sandbox, the same emulators), and between them the loop is
not running, so the command can ask the user a question without holding up a request.
A client is made on first use: a command whose batches have all finished never needs a
key, a connection, or asyncio itself.

Providers (providers.py): the work asks `await session.client(provider)` for the client of
the provider a batch lives on (None: the environment's). Before its first request, a
command names every provider it may talk to (`require`): each is resolved then, so a
missing key is said before anything is sent to any of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import asyncio

    from .api import Api
    from .project import Project
    from .providers import Connection

T = TypeVar("T")


class Session:
    """Use as `with Session(project) as session: session.run(lambda s: ... await s.client(provider) ...)`."""

    def __init__(self, project: Project):
        self.project = project
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stack: AsyncExitStack | None = None
        self._clients: dict[str | None, Api] = {}
        self._connections: dict[str | None, Connection] = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require(self, providers: Iterable[str | None]) -> None:
        """Resolve every provider this command may talk to, before any request: a missing key, an
        unknown provider or an unsafe URL is a ConfigError while nothing has been sent to any of them."""
        from .providers import sort_key  # here: `--help` does not load pydantic

        for provider in sorted(set(providers), key=sort_key):
            self.connection(provider)

    def connection(self, provider: str | None) -> Connection:
        if provider not in self._connections:
            self._connections[provider] = self.project.connection(provider)
        return self._connections[provider]

    def run(self, work: Callable[[Session], Awaitable[T]]) -> T:
        """`await work(session)` on this command's loop; the work asks for clients with `client(provider)`.

        The result leaves through a list, not as the task's result: Python 3.11 formats the
        repr of a main task, result included, when it restores the Ctrl-C handler, and the
        repr of a 1,000-spec plan takes 0.1 s.
        """
        import asyncio  # here: --help and validate do not pay for loading asyncio

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        result: list[T] = []

        async def main() -> None:
            result.append(await work(self))

        task = self._loop.create_task(main())
        try:
            self._loop.run_until_complete(task)
        except BaseException:
            _end_task(self._loop, task)
            raise
        return result[0]

    async def client(self, provider: str | None = None) -> Api:
        """The Api client of `provider` (None: the environment's), connected on first use."""
        if provider not in self._clients:
            self.connection(provider)  # a missing key is said here, before the client exists
            if self._stack is None:
                self._stack = AsyncExitStack()
            self._clients[provider] = await self._stack.enter_async_context(self.project.connect(provider))
        return self._clients[provider]

    async def clients(self, providers: Iterable[str | None]) -> dict[str | None, Api]:
        """The clients of several providers at once (apply's stages route each change to its own)."""
        providers = set(providers)
        self.require(providers)
        return {p: await self.client(p) for p in sorted(providers, key=lambda p: p or "")}

    def close(self) -> None:
        """Close the clients (and stop the sandboxes), then the loop, as asyncio.run does."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            if self._stack is not None:
                loop.run_until_complete(self._stack.aclose())
        finally:
            self._stack = None
            self._clients = {}
            _cancel_leftover_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()


def _end_task(loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
    """End the work's task after a Ctrl-C or SIGTERM: one that landed in a task the work started (the
    reads of several providers run side by side) leaves the work's own task waiting on it, and it would
    raise the KeyboardInterrupt again from whatever the loop runs next (closing the clients)."""
    if task.done():
        return
    task.cancel()
    try:
        loop.run_until_complete(task)
    except BaseException:  # its end is all that matters now: the first interrupt is the one raised
        pass


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Tasks a Ctrl-C left behind: cancel them and let them finish, so nothing is destroyed pending."""
    import asyncio

    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
