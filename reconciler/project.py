"""The project: where specs, state and results live, and how to reach the server.

Settings come from command-line flags, then an optional `batchplan.yaml` at the repo
root, then defaults. Every path is relative to the repo root and, symlinks resolved, must
stay inside it (paths.confine); only a state file given with `--state` may live elsewhere,
with its lock and caches next to it. The API key and base URL come from the environment,
exactly as the official SDK reads them (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_PROJECT_ID,
OPENAI_ORG_ID), or for a spec that names a provider, from its profile in batchplan.yaml
(`providers:`, see providers.py) and the variable that profile names; a key is never
written anywhere. `--sandbox` swaps every provider for an embedded emulator of its own,
with its own state file and worlds under `state/sandbox/`.

The state is a file, or a workspace in PostgreSQL when its location is a
`postgresql://` URL (`--state URL`, else BATCHPLAN_STATE_URL, else `state:` in
batchplan.yaml); `workspace:` (or BATCHPLAN_WORKSPACE) names the workspace, and the
sandbox uses `<workspace>-sandbox` there. Either way the per-machine caches stay in
the directory of the state file (`state/`, `state/sandbox/`). `store()` is the one
place a store is chosen.
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

from .errors import ConfigError, PathError
from .inputs import HashCache
from .paths import Area, confine, not_a_file, shown
from .providers import Connection, Defaults, Profile, check_names
from .retries import RetryPolicy
from .yamldoc import CONFIG_ALIAS_BUDGET, AliasBudgetExceeded, composed
from .queue import Limits

if TYPE_CHECKING:
    from .api import Api
    from .prices import ModelPrice, PriceTable
    from .stores.base import StateStore
    from .tokens import TokenCache

CONFIG_FILE = "batchplan.yaml"
DEFAULT_STATE = "state/batchplan.state.json"
STATE_URL_ENV = "BATCHPLAN_STATE_URL"
WORKSPACE_ENV = "BATCHPLAN_WORKSPACE"
PG_SCHEMES = ("postgresql://", "postgres://")


def is_state_url(location: str) -> bool:
    """Whether a state location names a PostgreSQL database rather than a file."""
    return location.startswith(PG_SCHEMES)


class Settings(BaseModel):
    """The optional batchplan.yaml (paths are relative to the repo root)."""

    model_config = ConfigDict(extra="forbid")

    specs: str = "specs"
    state: str = DEFAULT_STATE  # a file, or postgresql://USER@HOST:PORT/DATABASE
    workspace: str = "default"  # the state's workspace in PostgreSQL
    results: str = "results"
    parallelism: int = Field(default=16, ge=1, le=64)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    # Cost (see README "Cost"): the most one apply may cost, the output bound of requests that
    # set none, and prices that override or add to the built-in table (checked by prices.py).
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)
    default_max_output_tokens: int | None = Field(default=None, ge=1, strict=True)
    prices: Any = None
    retry: RetryPolicy | None = None  # every spec's `retry:` unless the spec has its own (retries.py)
    max_wait: float = Field(default=60.0, gt=0, le=3600)  # seconds: the longest wait for a server that asks to wait
    # Big jobs (see README "Big jobs"): each model's enqueued-token limit; apply queues what does not fit.
    limits: Limits = Field(default_factory=Limits)
    providers: dict[str, Profile] = Field(default_factory=dict)  # named profiles (providers.py)


def _read_settings(root: Path) -> Settings:
    path = root / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        return Settings()
    try:
        if why := not_a_file(confine(CONFIG_FILE, root, root)):
            raise ConfigError(f"{CONFIG_FILE}: {why}")
        data = _one_document(path.read_text(encoding="utf-8"))
        settings = Settings.model_validate(data)
        check_names(settings.providers, CONFIG_FILE)
        return settings
    except PathError as exc:
        raise ConfigError(f"{CONFIG_FILE}: {exc}; batchplan reads it only from inside the repository") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE}: cannot read: {exc.strerror or exc}") from exc
    except AliasBudgetExceeded as exc:
        raise ConfigError(f"{CONFIG_FILE}:{exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_FILE}: YAML syntax error: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "top level"  # a list or a string where the settings belong
        raise ConfigError(f"{CONFIG_FILE}: {where}: {_settings_message(err)}") from exc


def _settings_message(err: Any) -> str:
    """Pydantic's message, or what to write instead of a key in a committed file (never its value)."""
    loc = tuple(err["loc"])
    if loc[:1] == ("providers",) and len(loc) == 3 and err["type"] == "extra_forbidden" and "key" in str(loc[2]):
        return ("a key never goes in this file (it is committed): put it in an environment variable and name "
                "that variable in api_key_env")
    return err["msg"]


def _one_document(text: str) -> object:
    """batchplan.yaml's settings (an empty file: none), its aliases within budget (yamldoc)."""
    documents = [data for _, data in composed(text, CONFIG_ALIAS_BUDGET)]
    if len(documents) > 1:
        raise ConfigError(f"{CONFIG_FILE}: holds {len(documents)} YAML documents (separated by ---); write the "
                          "settings as one")
    return (documents[0] if documents else None) or {}


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


def _state_location(given: str | None, settings: Settings) -> str:
    """The state's file path or URL: the flag, else the environment, else batchplan.yaml."""
    from_env = os.environ.get(STATE_URL_ENV, "").strip()
    location, source = ((given, "--state") if given else (from_env, STATE_URL_ENV) if from_env
                        else (settings.state, f"{CONFIG_FILE}: state"))
    if source == STATE_URL_ENV and not is_state_url(location):
        raise ConfigError(f"{STATE_URL_ENV}: not a PostgreSQL URL; write postgresql://USER@HOST:PORT/DATABASE "
                          "(a state file is set with --state FILE or `state:` in batchplan.yaml)")
    check_state_location(location, source)
    if source.startswith(CONFIG_FILE) and is_state_url(location):
        from .stores.postgres import url_password

        if url_password(location):  # the file is committed: the password would be published
            raise ConfigError(f"{source}: the URL holds a password, and this file is committed; remove it from "
                              f"the URL and give it in PGPASSWORD or ~/.pgpass (or the whole URL in {STATE_URL_ENV}, "
                              "kept as a secret)")
    return location


def check_state_location(location: str, source: str) -> None:
    """Refuse a URL that is not PostgreSQL's (it would become a strange file name)."""
    if "://" in location and not is_state_url(location):
        from .stores.postgres import masked_url

        raise ConfigError(f"{source}: {masked_url(location)} is not a PostgreSQL URL; write "
                          "postgresql://USER@HOST:PORT/DATABASE, or a file path for a state file")


def _workspace(settings: Settings) -> str:
    """The PostgreSQL workspace: BATCHPLAN_WORKSPACE, else batchplan.yaml's `workspace:`, else `default`."""
    from .stores.postgres import workspace_problem

    from_env = os.environ.get(WORKSPACE_ENV, "").strip()
    name, source = (from_env, WORKSPACE_ENV) if from_env else (settings.workspace, f"{CONFIG_FILE}: workspace")
    problem = workspace_problem(name)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return name


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
    max_wait: float = 60.0
    lock_timeout: float = 0.0
    allow_insecure_http: bool = False
    # The state in PostgreSQL (None: in the file state_path). May hold a password: never print it,
    # show store().location instead. state_path's directory keeps the per-machine caches either way.
    state_url: str | None = field(default=None, repr=False)
    workspace: str = "default"
    budget_usd: float | None = None
    default_max_output_tokens: int | None = None
    price_overrides: dict[str, ModelPrice] = field(default_factory=dict)
    retry: RetryPolicy | None = None  # batchplan.yaml's `retry:`, for the specs that have none
    limits: Limits = field(default_factory=Limits)
    providers: dict[str, Profile] = field(default_factory=dict)  # batchplan.yaml's named profiles

    @classmethod
    def open(cls, chdir: str | None = None, specs: str | None = None, state: str | None = None,
             sandbox: bool = False, parallelism: int | None = None, lock_timeout: float = 0.0,
             allow_insecure_http: bool = False) -> Project:
        root = Path(chdir or ".").resolve()
        if not root.is_dir():
            raise ConfigError(f"-C {chdir}: no such directory")
        settings = _read_settings(root)
        location = _state_location(state, settings)
        state_url = location if is_state_url(location) else None
        if state_url:  # the per-machine caches stay in state/ whatever the backend
            state_path = root / DEFAULT_STATE
        elif state:  # --state on the command line may name a file anywhere: the user chose it, not a reviewed file
            state_path = root / state
        else:
            state_path = _inside(root, settings, "state", None)
        if sandbox:  # the sandbox keeps its own state, apart from the real one
            state_path = state_path.parent / "sandbox" / state_path.name
        return cls(root=root, specs_dir=_inside(root, settings, "specs", specs), state_path=state_path,
                   results_dir=_inside(root, settings, "results", None), sandbox=sandbox,
                   parallelism=parallelism or settings.parallelism, timeout=settings.timeout,
                   max_retries=settings.max_retries, max_wait=settings.max_wait, lock_timeout=lock_timeout,
                   allow_insecure_http=allow_insecure_http, state_url=state_url,
                   workspace=_workspace(settings), budget_usd=settings.budget_usd,
                   default_max_output_tokens=settings.default_max_output_tokens,
                   price_overrides=_price_overrides(settings.prices), retry=settings.retry, limits=settings.limits,
                   providers=dict(settings.providers))

    def store(self, location: str | None = None, workspace: str | None = None) -> StateStore:
        """Where this project's state lives: every command reads and changes the state through it.

        The one place a store is chosen: PostgreSQL for a `postgresql://` URL (the sandbox in
        `<workspace>-sandbox`, so its batches never mix with real ones), else the state file.
        `location` and `workspace` name another store instead (the target of `state migrate`;
        a path is relative to the repo root). Nothing is connected until the store is used."""
        location = location or self.state_url or str(self.state_path)
        if is_state_url(location):
            from .stores.postgres import PostgresStore

            workspace = workspace or self.workspace
            return PostgresStore(location, workspace=f"{workspace}-sandbox" if self.sandbox else workspace)
        from .stores.file import FileStore  # here: `validate` never loads the state models

        return FileStore(self.root / location)

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
        """Where --sandbox keeps its worlds: the unnamed provider's here, each named one's in <name>/."""
        return self.state_path.parent / "world"

    def sandbox_world_of(self, provider: str | None) -> Path:
        return self.sandbox_world / provider if provider else self.sandbox_world

    def hash_cache(self) -> HashCache:
        return HashCache(self.state_path.parent / "cache.json")

    @property
    def retries_dir(self) -> Path:
        """Per-machine work of retries (git-ignored): downloaded result files by file id, and the
        inputs of retry batches by content (see retries.py and attempts.py)."""
        return self.state_path.parent / "retries"

    def token_cache(self) -> TokenCache:
        from .tokens import TokenCache  # here: only plans with something to create count tokens

        return TokenCache(self.state_path.parent / "tokens.json")

    def price_table(self) -> PriceTable:
        from .prices import PriceTable

        return PriceTable(self.price_overrides)

    def connection(self, provider: str | None = None) -> Connection:
        """How to reach `provider` (None: the environment's), checked before anything is sent: ConfigError
        names a missing key's variable, an unknown provider, or a base URL that would send the key in clear."""
        from .providers import from_environment, from_profile, sandbox_connection

        defaults = Defaults(self.parallelism, self.timeout, self.max_retries, self.allow_insecure_http)
        profile = self.providers.get(provider) if provider else None
        if provider and profile is None:
            known = ", ".join(sorted(self.providers)) or "none"
            raise ConfigError(f"provider {provider} is not in {CONFIG_FILE} (providers: {known}); the state names it "
                              "for a batch made there: restore its profile, or `batchplan state rm NAME` to stop "
                              "tracking that batch")
        if self.sandbox:
            return sandbox_connection(provider, profile, defaults)
        return from_profile(provider, profile, defaults) if provider and profile else from_environment(defaults)

    def provider_limits(self, provider: str | None) -> Limits | None:
        """A named provider's own `limits:` (queue.py), None when its profile sets none (or for the
        environment's provider): the queue then uses the project's."""
        profile = self.providers.get(provider) if provider else None
        return profile.limits if profile else None

    def base_urls(self) -> dict[str, str]:
        """Where each named provider is now (its profile's base_url): the state records it with each batch."""
        return {name: profile.base_url.rstrip("/") for name, profile in sorted(self.providers.items())}

    @asynccontextmanager
    async def connect(self, provider: str | None = None) -> AsyncIterator[Api]:
        """An Api client for `provider`'s server, or for its own sandbox emulator in this process."""
        from .api import Api

        conn = self.connection(provider)
        base, transport = conn.base_url, None
        if self.sandbox:  # in this process: no server, no port; closing the Api closes it
            from .sandbox import open_sandbox

            transport = open_sandbox(self.sandbox_world_of(provider))
            base = transport.url
        async with Api(base, conn.api_key, parallelism=conn.parallelism, timeout=conn.timeout,
                       max_retries=conn.max_retries, max_wait=self.max_wait, transport=transport, auth=conn.auth,
                       headers=conn.headers) as api:
            yield api
