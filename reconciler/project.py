"""The project: where specs, state and results live, and how to reach the server.

Settings come from command-line flags, then an optional `batchplan.yaml` at the repo
root, then defaults. Every path is relative to the repo root and, symlinks resolved, must
stay inside it (paths.confine); only a state file given with `--state` may live elsewhere,
with its lock and caches next to it. The API key and base URL come from the environment,
exactly as the official SDK reads them (OPENAI_API_KEY, OPENAI_BASE_URL); the key is never
written anywhere. `--sandbox` swaps the server for the embedded emulator, with its own
state file and world under `state/sandbox/`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, PathError
from .inputs import HashCache
from .paths import Area, confine, not_a_file, shown
if TYPE_CHECKING:
    from .api import Api
    from .stores.base import StateStore

CONFIG_FILE = "batchplan.yaml"


class Settings(BaseModel):
    """The optional batchplan.yaml (paths are relative to the repo root)."""

    model_config = ConfigDict(extra="forbid")

    specs: str = "specs"
    state: str = "state/batchplan.state.json"
    results: str = "results"
    parallelism: int = Field(default=16, ge=1, le=64)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)


def _read_settings(root: Path) -> Settings:
    path = root / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        return Settings()
    try:
        if why := not_a_file(confine(CONFIG_FILE, root, root)):
            raise ConfigError(f"{CONFIG_FILE}: {why}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Settings.model_validate(data)
    except PathError as exc:
        raise ConfigError(f"{CONFIG_FILE}: {exc}; batchplan reads it only from inside the repository") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_FILE}: YAML syntax error: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "top level"  # a list or a string where the settings belong
        raise ConfigError(f"{CONFIG_FILE}: {where}: {err['msg']}") from exc


def _inside(root: Path, settings: Settings, key: str, flag: str | None) -> Path:
    """The directory or file `key` names (the flag's value, else batchplan.yaml's), kept in the repo."""
    raw = flag or getattr(settings, key)
    try:
        return confine(raw, root, root)
    except PathError as exc:
        where = f"--{key}" if flag else f"{CONFIG_FILE}: {key}" if key in settings.model_fields_set else \
            f"{key} (default)"
        raise ConfigError(f"{where}: {raw!r} {exc}; batchplan reads and writes only inside the repository "
                          "(-C DIR says where it is)") from None


@dataclass(frozen=True)
class Project:
    root: Path
    specs_dir: Path
    state_path: Path
    results_dir: Path
    sandbox: bool
    parallelism: int
    timeout: float
    max_retries: int
    lock_timeout: float = 0.0
    allow_insecure_http: bool = False

    @classmethod
    def open(cls, chdir: str | None = None, specs: str | None = None, state: str | None = None,
             sandbox: bool = False, parallelism: int | None = None, lock_timeout: float = 0.0,
             allow_insecure_http: bool = False) -> Project:
        root = Path(chdir or ".").resolve()
        if not root.is_dir():
            raise ConfigError(f"-C {chdir}: no such directory")
        settings = _read_settings(root)
        # --state on the command line may name a file anywhere: the user chose it, not a reviewed file
        state_path = root / state if state else _inside(root, settings, "state", None)
        if sandbox:  # the sandbox keeps its own state, apart from the real one
            state_path = state_path.parent / "sandbox" / state_path.name
        return cls(root=root, specs_dir=_inside(root, settings, "specs", specs), state_path=state_path,
                   results_dir=_inside(root, settings, "results", None), sandbox=sandbox,
                   parallelism=parallelism or settings.parallelism, timeout=settings.timeout,
                   max_retries=settings.max_retries, lock_timeout=lock_timeout,
                   allow_insecure_http=allow_insecure_http)

    def store(self) -> StateStore:
        """Where this project's state lives: every command reads and changes the state through it.
        (The PostgreSQL store will be chosen here, by the `state:` URL.)"""
        from .stores.file import FileStore  # here: `validate` never loads the state models

        return FileStore(self.state_path)

    def results_area(self, inputs: dict[Path, str]) -> Area:
        """Where download may write: under the results directory, never over the state, its lock,
        the caches, the specs, batchplan.yaml, .git or `inputs` (resolved path -> "the input of NAME")."""
        from .download import MANIFEST

        owned = {self.root / ".git": "git's own directory", self.root / CONFIG_FILE: "batchplan's settings",
                 self.specs_dir: "the spec directory", self.results_dir / MANIFEST: "the download manifest",
                 self.hash_cache().path: "the input hash cache", self.state_path.parent / "tokens.json":
                 "the token count cache", self.sandbox_world: "the sandbox's world",
                 **self.store().local_files(), **inputs}
        return Area(self.root, self.results_dir, f"the results directory {shown(self.results_dir, self.root)}/",
                    {path.resolve(): what for path, what in owned.items()})

    @property
    def sandbox_world(self) -> Path:
        return self.state_path.parent / "world"

    def hash_cache(self) -> HashCache:
        return HashCache(self.state_path.parent / "cache.json")

    def credentials(self) -> tuple[str, str]:
        """(base_url, api_key), checked before anything is sent."""
        if self.sandbox:
            return "", "sandbox"
        from .api import DEFAULT_BASE_URL, check_base_url

        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise ConfigError("OPENAI_API_KEY is not set; this command talks to the server. Set it, or "
                              "pass --sandbox to use the embedded emulator (no key, no network)")
        base = os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        return check_base_url(base, self.allow_insecure_http), key

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Api]:
        """An Api client for the real server, or for a sandbox emulator started here."""
        from .api import Api

        base, key = self.credentials()
        server = None
        if self.sandbox:
            from .sandbox import start_sandbox

            server = start_sandbox(self.sandbox_world)
            base = server.url
        try:
            async with Api(base, key, parallelism=self.parallelism, timeout=self.timeout,
                           max_retries=self.max_retries) as api:
                yield api
        finally:
            if server is not None:
                server.stop()
