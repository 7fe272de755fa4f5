"""Paths a user names, kept inside the repository.

Spec files, a spec's `input:` / `output:` / `errors:`, the directories batchplan.yaml
names and the inputs a saved plan names may all come from someone other than the person
running batchplan (a pull request, a hand-edited plan). Each is resolved here before it
is read or written, symlinks included, so a link that points out of the repository is
refused exactly like a `../..` path. Writes also go through an `Area`: the directory they
must stay under, and batchplan's own files (the state, its lock, the caches, the specs,
`.git`) that nothing is ever written over.

PathError messages say what is wrong with a path but not where it was named: the caller
knows the file, line or option, and puts it in front (`specs/a.yaml:9: output: '...' ...`).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PathError


def confine(raw: str | Path, base: Path, root: Path) -> Path:
    """`base / raw` with every symlink resolved; PathError when it leaves `root` (resolved already)."""
    try:
        real = (base / raw).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise PathError(f"cannot be resolved ({exc})") from None
    if not real.is_relative_to(root):
        raise PathError(f"resolves to {real}, outside the repository {root}")
    return real


def shown(path: Path, root: Path) -> str:
    """A resolved path as messages show it: relative to the repository when inside it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None when it is a regular file, symlinks followed)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device)"
    return None


@dataclass(frozen=True)
class Area:
    """Where batchplan may write a file a user named: under `directory`, never over `owned`.

    `owned` maps each of batchplan's own paths (files or directories, resolved) to what it
    is ("the state file"); a write to one, or into one, is refused.
    """

    root: Path
    directory: Path
    label: str                                   # "the results directory results/", for messages
    owned: dict[Path, str] = field(default_factory=dict)

    def check(self, raw: str | Path) -> Path:
        """Where a write to `raw` (relative to the repository root) would land; PathError when
        it leaves the area, lands on batchplan's own files, or cannot hold a file."""
        real = confine(raw, self.root, self.root)
        if not real.is_relative_to(self.directory):
            raise PathError(f"is not under {self.label}; batchplan writes results only there")
        for path, what in self.owned.items():
            if real == path or real.is_relative_to(path):
                where = "is" if real == path else f"is inside {shown(path, self.root)},"
                raise PathError(f"{where} {what}; batchplan never writes over its own files")
        self._ensure_room(real)
        return real

    def _ensure_room(self, real: Path) -> None:
        """Refuse, before anything is fetched, a path where no file can be written."""
        for parent in reversed(real.parents):
            if parent.is_relative_to(self.directory) and parent.exists() and not parent.is_dir():
                raise PathError(f"{shown(parent, self.root)} is a file, not a directory; move it away")
        if real.exists() and not real.is_file():
            raise PathError(f"{not_a_file(real)}; move it away")
