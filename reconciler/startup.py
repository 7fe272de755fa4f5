"""Imports that keep batchplan's start-up fast: take httpx from here.

Whenever they are installed, httpcore imports trio and httpx imports its own command
line (rich and pygments): 0.3 s of every start, for code batchplan never runs. Here
httpx is imported once with those two made unimportable for the moment it loads
(a None in sys.modules), then sys.modules is put back as it was, so anything that
really wants trio later still gets it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

HIDDEN = ("trio", "httpx._main")


@contextmanager
def _without(*names: str) -> Iterator[None]:
    """Make `import name` fail for these modules while the block runs (a None in sys.modules)."""
    hidden = [name for name in names if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))
    try:
        yield
    finally:
        for name in hidden:
            del sys.modules[name]


with _without(*HIDDEN):
    import httpcore  # noqa: E402,F401
    import httpx  # noqa: E402

__all__ = ["httpx"]
