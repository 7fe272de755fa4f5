"""The project: where specs, state and results live, and how to reach the server.

Settings come from command-line flags, then an optional `batchplan.yaml` at the repo
root, then defaults. The API key and base URL come from the environment, exactly as
the official SDK reads them (OPENAI_API_KEY, OPENAI_BASE_URL); the key is never
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

from .errors import ConfigError
from .inputs import HashCache
if TYPE_CHECKING:
    from .api import Api
    from .state import StateFile

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
    if not path.exists():
        return Settings()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Settings.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_FILE}: YAML syntax error: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{CONFIG_FILE}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from exc


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
        state_path = root / (state or settings.state)
        if sandbox:  # the sandbox keeps its own state, apart from the real one
            state_path = state_path.parent / "sandbox" / state_path.name
        return cls(root=root, specs_dir=root / (specs or settings.specs), state_path=state_path,
                   results_dir=root / settings.results, sandbox=sandbox,
                   parallelism=parallelism or settings.parallelism, timeout=settings.timeout,
                   max_retries=settings.max_retries, lock_timeout=lock_timeout,
                   allow_insecure_http=allow_insecure_http)

    @property
    def state_file(self) -> StateFile:
        from .state import StateFile  # here: `validate` never loads the state models

        return StateFile(self.state_path)

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
        """An Api client for the real server, or for the sandbox emulator in this process."""
        from .api import Api

        base, key = self.credentials()
        transport = None
        if self.sandbox:  # in this process: no server, no port; closing the Api closes it
            from .sandbox import open_sandbox

            transport = open_sandbox(self.sandbox_world)
            base = transport.url
        async with Api(base, key, parallelism=self.parallelism, timeout=self.timeout,
                       max_retries=self.max_retries, transport=transport) as api:
            yield api
