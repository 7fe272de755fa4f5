"""Providers: the OpenAI-compatible Batch APIs one repo talks to, as named profiles in batchplan.yaml.

    providers:
      azure-east:
        base_url: https://my-resource.openai.azure.com/openai/v1
        api_key_env: AZURE_OPENAI_API_KEY
        auth: api-key            # header style: bearer (default) or api-key
      research:
        api_key_env: OPENAI_RESEARCH_KEY
        project: proj_abc123     # sent as OpenAI-Project
        organization: org_xyz789 # sent as OpenAI-Organization
        parallelism: 4

A spec names one with `provider: NAME`; a spec without one uses the environment, as the
official SDK does (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_PROJECT_ID, OPENAI_ORG_ID).
That provider has no name: `None` everywhere (ENVIRONMENT when shown to people).

`Profile` is what batchplan.yaml says (checked offline: `validate` reads it with no key).
`Connection` is a profile resolved against the environment just before a command talks to
the server: the key is read from the variable the profile names (never from the file), and
a missing one is a ConfigError naming that variable, raised before anything is sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError
from .queue import Limits

ENVIRONMENT = "the environment (OPENAI_API_KEY)"  # how the unnamed provider is shown
DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the same as api.DEFAULT_BASE_URL, without importing httpx
PROVIDER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
# The sandbox keeps a named provider's world in state/sandbox/world/<name>, next to the unnamed
# provider's own files there: a profile may not take one of those names.
SANDBOX_RESERVED = frozenset({"files", "staging"})


class Profile(BaseModel):
    """One entry of `providers:` in batchplan.yaml. No secret is ever in it: only the variable's name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = Field(pattern=ENV_NAME)
    auth: Literal["bearer", "api-key"] = "bearer"  # Authorization: Bearer KEY, or Azure's api-key: KEY
    project: str | None = None       # OpenAI-Project
    organization: str | None = None  # OpenAI-Organization
    parallelism: int | None = Field(default=None, ge=1, le=64)
    timeout: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0, le=20)
    limits: Limits | None = None  # the queue's enqueued-token limits on this provider (queue.py)


def check_names(providers: dict[str, Profile], where: str) -> None:
    """Refuse profile names batchplan cannot use (ConfigError naming the profile)."""
    import re

    for name in sorted(providers):
        if not re.fullmatch(PROVIDER_NAME, name):
            raise ConfigError(f"{where}: providers: {name!r}: use 1-64 letters, digits, '_' or '-', starting with "
                              "a letter or digit")
        if name in SANDBOX_RESERVED:
            raise ConfigError(f"{where}: providers: {name!r} is a name the sandbox uses for its own files; "
                              "rename the profile")


def shown(provider: str | None) -> str:
    """`provider azure-east`, or the environment for the unnamed one: for messages."""
    return f"provider {provider}" if provider else ENVIRONMENT


def sort_key(provider: str | None) -> str:
    """Providers in a stable order: the environment's first, then named ones by name."""
    return provider or ""


@dataclass(frozen=True)
class Connection:
    """A provider resolved for one command: where to send, how to authenticate, how hard to push.

    `api_key` is the secret itself: it is kept out of repr and never printed or written."""

    provider: str | None
    base_url: str
    api_key: str = field(repr=False)
    auth: str = "bearer"
    headers: dict[str, str] = field(default_factory=dict)  # OpenAI-Project, OpenAI-Organization
    parallelism: int = 16
    timeout: float = 60.0
    max_retries: int = 5


@dataclass(frozen=True)
class Defaults:
    """The project-wide request settings a profile's own override."""

    parallelism: int
    timeout: float
    max_retries: int
    allow_insecure_http: bool = False


def _headers(project: str | None, organization: str | None) -> dict[str, str]:
    found = {"OpenAI-Project": project, "OpenAI-Organization": organization}
    return {name: value.strip() for name, value in found.items() if value and value.strip()}


def from_environment(defaults: Defaults) -> Connection:
    """The unnamed provider, read from the environment as the official SDK reads it."""
    from .api import check_base_url

    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not key:
        raise ConfigError("OPENAI_API_KEY is not set; this command talks to the server. Set it, or "
                          "pass --sandbox to use the embedded emulator (no key, no network)")
    base = os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    return Connection(None, check_base_url(base, defaults.allow_insecure_http), key,
                      headers=_headers(os.environ.get("OPENAI_PROJECT_ID"), os.environ.get("OPENAI_ORG_ID")),
                      parallelism=defaults.parallelism, timeout=defaults.timeout, max_retries=defaults.max_retries)


def from_profile(name: str, profile: Profile, defaults: Defaults) -> Connection:
    """A named provider: its key from the variable the profile names, its settings over the defaults."""
    from .api import check_base_url

    key = os.environ.get(profile.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"{profile.api_key_env} is not set; provider {name} (providers: in batchplan.yaml) "
                          f"reads its API key from it, and this command talks to that provider. Set it, or pass "
                          "--sandbox to use the embedded emulator (no key, no network)")
    base = check_base_url(profile.base_url, defaults.allow_insecure_http,
                          source=f"batchplan.yaml: providers: {name}: base_url")
    return Connection(name, base, key, profile.auth, _headers(profile.project, profile.organization),
                      parallelism=profile.parallelism or defaults.parallelism,
                      timeout=profile.timeout or defaults.timeout,
                      max_retries=defaults.max_retries if profile.max_retries is None else profile.max_retries)


def sandbox_connection(provider: str | None, profile: Profile | None, defaults: Defaults) -> Connection:
    """A provider mapped to its in-process emulator by --sandbox: no key, no network (the URL is the transport's)."""
    return Connection(provider, "", "sandbox", parallelism=(profile and profile.parallelism) or defaults.parallelism,
                      timeout=(profile and profile.timeout) or defaults.timeout,
                      max_retries=defaults.max_retries if profile is None or profile.max_retries is None
                      else profile.max_retries)
