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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .inputs import HashCache
if TYPE_CHECKING:
    from .api import Api
    from .prices import ModelPrice, PriceTable
    from .stores.base import StateStore
    from .tokens import TokenCache

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
    # Cost (see README "Cost"): the most one apply may cost, the output bound of requests that
    # set none, and prices that override or add to the built-in table (checked by prices.py).
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)
    default_max_output_tokens: int | None = Field(default=None, ge=1, strict=True)
    prices: Any = None


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


def _price_overrides(data: object) -> dict[str, ModelPrice]:
    """batchplan.yaml's `prices:`, checked (ConfigError names the model and field)."""
    if data is None:
        return {}
    from .prices import parse_overrides  # here: most projects set no prices

    return parse_overrides(data, CONFIG_FILE)


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
    budget_usd: float | None = None
    default_max_output_tokens: int | None = None
    price_overrides: dict[str, ModelPrice] = field(default_factory=dict)

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
                   allow_insecure_http=allow_insecure_http, budget_usd=settings.budget_usd,
                   default_max_output_tokens=settings.default_max_output_tokens,
                   price_overrides=_price_overrides(settings.prices))

    def store(self) -> StateStore:
        """Where this project's state lives: every command reads and changes the state through it.
        (The PostgreSQL store will be chosen here, by the `state:` URL.)"""
        from .stores.file import FileStore  # here: `validate` never loads the state models

        return FileStore(self.state_path)

    @property
    def sandbox_world(self) -> Path:
        return self.state_path.parent / "world"

    def hash_cache(self) -> HashCache:
        return HashCache(self.state_path.parent / "cache.json")

    def token_cache(self) -> TokenCache:
        from .tokens import TokenCache  # here: only plans with something to create count tokens

        return TokenCache(self.state_path.parent / "tokens.json")

    def price_table(self) -> PriceTable:
        from .prices import PriceTable

        return PriceTable(self.price_overrides)

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
