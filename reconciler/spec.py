"""Batch specs: the YAML documents under specs/ that say which batches should exist.

Each YAML document is one batch. Every problem is reported with the spec file, the
field and, where YAML knows it, the line; all problems are collected, not just the first.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints, ValidationError

from .errors import PathError, Problem
from .inputs import MAX_BYTES, MAX_REQUESTS
from .paths import confine, not_a_file
from .providers import PROVIDER_NAME
from .retries import RetryPolicy
from .yamldoc import AliasBudgetExceeded, composed
from .shards import ShardLimits

RESERVED_PREFIX = "batchplan_"
TAG_NAME = "batchplan_name"
TAG_SPEC = "batchplan_spec"
MAX_METADATA = 16
USER_METADATA = MAX_METADATA - 2  # two keys are batchplan's tags
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 512
EXPIRY_SECONDS = (3600, 2_592_000)  # 1 hour to 30 days
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# A batch's address: its spec's name, or NAME[K] for shard K of a spec split into several batches.
ADDRESS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(\[(0|[1-9][0-9]{0,5})\])?$"

MetadataKey = Annotated[StrictStr, StringConstraints(max_length=MAX_KEY_LENGTH)]
MetadataValue = Annotated[StrictStr, StringConstraints(max_length=MAX_VALUE_LENGTH)]

# The endpoints the Batch API accepts: the one list (the sandbox checks creates against it too).
Endpoint = Literal[
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos",
]
ENDPOINTS: tuple[str, ...] = get_args(Endpoint)


class OutputExpiry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRY_SECONDS[0], le=EXPIRY_SECONDS[1])


IGNORABLE = ("metadata", "output_expires_after")  # what a batch's results do not depend on


class Lifecycle(BaseModel):
    """prevent_cancel: never cancel the batch. ignore_changes: an edit of these fields only updates
    the state (as Terraform's ignore_changes): the batch keeps running, is never made again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prevent_cancel: bool = False
    ignore_changes: tuple[Literal["metadata", "output_expires_after"], ...] = ()


class Spec(BaseModel):
    """One batch as the user wants it. Paths are as written in the YAML.

    Checks that need the whole document (exactly one of input / input_file_id, the
    metadata key count and reserved keys) are made on the document by `_check_document`,
    so that each is reported with its own line even when other fields are wrong.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    input: str | None = None
    input_file_id: str | None = None
    endpoint: Endpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict)
    output_expires_after: OutputExpiry | None = None
    output: str | None = None
    errors: str | None = None
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)
    shard: ShardLimits | None = None  # smaller shards than the API's limits (see shards.py)
    # USD this spec's batch may cost at most (its estimate's maximum); not a batch parameter, so
    # changing it replaces nothing. Checked by apply (budget.py).
    budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)
    # A profile of batchplan.yaml's `providers:` (providers.py); none: the environment's server.
    # Part of what the batch is made from: moving a spec to another provider replaces its batch.
    provider: str | None = Field(default=None, pattern=PROVIDER_NAME)
    # Follow-up batches for the requests that end without a result (retries.py); None: the
    # default of batchplan.yaml, if any. Not a batch parameter: changing it replaces nothing.
    retry: RetryPolicy | None = None

    def retry_policy(self, default: RetryPolicy | None) -> RetryPolicy | None:
        """Its own `retry:`, else batchplan.yaml's (`default`) when it has a local input to send again."""
        return self.retry or (default if self.input is not None else None)


FIELDS = tuple(Spec.model_fields)


# -- addresses: NAME, or NAME[K] for shard K of a spec whose input is split ----------------


def shard_address(name: str, index: int) -> str:
    return f"{name}[{index}]"


def spec_of(address: str) -> str:
    """The spec name of an address: `big` for `big[2]` (and for `big`)."""
    return address.partition("[")[0]


def shard_of(address: str) -> int | None:
    """K of `NAME[K]`; None for a plain name."""
    _, bracket, rest = address.partition("[")
    return int(rest.rstrip("]")) if bracket else None


def address_key(address: str) -> tuple[str, int]:
    """Sort key: by spec name, then shards in input order (`big[2]` before `big[10]`)."""
    index = shard_of(address)
    return spec_of(address), -1 if index is None else index


@dataclass(frozen=True)
class SpecSource:
    """Where a spec came from: its file (relative to the repo root) and YAML line numbers."""

    file: str
    path: Path
    lines: dict[tuple, int] = field(default_factory=dict, compare=False, hash=False)

    def line(self, loc: tuple = ()) -> int | None:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc)

    def problem(self, message: str, loc: tuple = (), code: str = "invalid") -> Problem:
        return Problem(self.file, message, self.line(loc), ".".join(map(str, loc)) or None, code)


@dataclass(frozen=True)
class LoadedSpec:
    spec: Spec
    source: SpecSource


def _node_lines(node: yaml.Node, loc: tuple = (), repeated: list | None = None) -> dict[tuple, int]:
    """Map each field path in a YAML document to its 1-based line; note keys given twice in `repeated`."""
    lines = {loc: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            if child in lines and repeated is not None:
                repeated.append((child, lines[child], key.start_mark.line + 1))
            lines.update(_node_lines(value, child, repeated))
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines.update(_node_lines(value, (*loc, i), repeated))
    return lines


@dataclass
class _Document:
    data: object
    lines: dict[tuple, int]
    repeated: list[tuple[tuple, int, int]]  # (field, first line, repeated line)


def _documents(text: str) -> list[_Document]:
    """Every document with its lines; a spec with an alias is refused before anything walks it (yamldoc)."""
    docs = []
    for node, data in composed(text, alias_budget=0):
        repeated: list = []
        lines = _node_lines(node, repeated=repeated)
        docs.append(_Document(data, lines, repeated))
    return docs


def _yaml_problem(file: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark
    line = mark.line + 1 if mark else None
    message = f"YAML syntax error: {exc.problem}"
    if exc.context and exc.context_mark and exc.context_mark.line + 1 != line:
        message += f" ({exc.context} that starts on line {exc.context_mark.line + 1})"
    elif exc.context:
        message += f" ({exc.context})"
    return Problem(file, message, line, code="yaml")


def _pydantic_problems(exc: ValidationError, source: SpecSource) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if loc[:1] == ("metadata",) and len(loc) > 1:
            problems.append(_metadata_problem(err, loc, source))
        else:
            problems.append(source.problem(_message(err, loc), loc, "unknown_field"
                                           if err["type"] == "extra_forbidden" else "invalid"))
    return problems


def _message(err: dict, loc: tuple) -> str:
    """Pydantic's error, said in terms of the spec and what to write instead."""
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return _unknown_field_message(loc)
    if kind == "missing" and loc[:1] == ("retry",):
        return err["msg"]  # RetryPolicy's own: it says what to write
    if kind == "missing":
        return {("endpoint",): f"missing; say which endpoint the requests go to, one of: {', '.join(ENDPOINTS)}",
                ("output_expires_after", "anchor"): "missing; write anchor: created_at",
                ("output_expires_after", "seconds"): "missing; give seconds from 3600 (1 hour) to 2592000 (30 days)",
                }.get(loc, "missing")
    if loc == ("endpoint",) and kind == "literal_error":
        guess = difflib.get_close_matches(str(value), ENDPOINTS, n=1, cutoff=0.8)
        hint = f"did you mean {guess[0]!r}?" if guess else f"use one of: {', '.join(ENDPOINTS)}"
        return f"{_short(value)} is not an endpoint the Batch API accepts; {hint}"
    if loc == ("completion_window",) and kind == "literal_error":
        return f"{_short(value)} is not supported; the Batch API only accepts '24h' (or leave the field out)"
    if loc == ("output_expires_after", "anchor") and kind == "literal_error":
        return f"{_short(value)} is not supported; the only anchor the API accepts is 'created_at'"
    if loc == ("output_expires_after", "seconds") and kind in ("greater_than_equal", "less_than_equal"):
        low, high = EXPIRY_SECONDS
        return f"{value} is out of range; use {low} (1 hour) to {high} (30 days)"
    if loc[:1] == ("shard",) and kind in ("greater_than_equal", "less_than_equal"):
        return _shard_limit_message(loc, value)
    if loc == ("name",) and kind == "string_pattern_mismatch":
        return f"{_short(value)}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
    message = err["msg"].removeprefix("Value error, ")
    return f"{message}, not {_short(value)}" if kind.endswith("_type") or kind.endswith("_parsing") else message


def _shard_limit_message(loc: tuple, value: object) -> str:
    most = {"max_requests": f"{MAX_REQUESTS:,} requests", "max_bytes": f"{MAX_BYTES:,} bytes (200 MB)"}[loc[-1]]
    return (f"{_short(value)} is out of range; use 1 to {most}, the Batch API's limit per batch (leave shard: "
            "out to split at the API's limits)")


def _metadata_problem(err: dict, loc: tuple, source: SpecSource) -> Problem:
    key = str(loc[1])
    if len(loc) > 2:  # ('metadata', key, '[key]'): the key itself is wrong
        message = (f"key {_short(key)} is {len(key)} characters; the API allows at most {MAX_KEY_LENGTH}"
                   if err["type"] == "string_too_long" else f"keys must be strings, not {_short(key)}")
        return dataclasses.replace(source.problem(message, loc[:2], "invalid_metadata"), field="metadata")
    if err["type"] == "string_too_long":
        message = f"value is {len(err['input'])} characters; the API allows at most {MAX_VALUE_LENGTH}"
    else:
        message = f"values must be strings, not {_short(err['input'])} (quote numbers and booleans in YAML)"
    return source.problem(message, loc[:2], "invalid_metadata")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown_field_message(loc: tuple) -> str:
    parent_fields = {(): FIELDS, ("output_expires_after",): ("anchor", "seconds"),
                     ("lifecycle",): ("prevent_cancel", "ignore_changes"),
                     ("retry",): tuple(RetryPolicy.model_fields),
                     ("shard",): tuple(ShardLimits.model_fields)}.get(loc[:-1], ())
    guess = difflib.get_close_matches(str(loc[-1]), parent_fields, n=1)
    if guess:
        return f"unknown field; did you mean {guess[0]!r}?"
    return f"unknown field; remove it (known fields here: {', '.join(parent_fields)})"


def _input_problem(data: dict, source: SpecSource) -> Problem | None:
    """Exactly one of input / input_file_id, checked on the raw document so it shows with the rest."""
    given = [f for f in ("input", "input_file_id") if data.get(f) is not None]
    if len(given) == 1:
        return None
    if given:
        return source.problem("give exactly one of input (a JSONL file in this repo) or input_file_id "
                              "(a file already uploaded), not both", ("input_file_id",), "input")
    return source.problem("missing; give input (a JSONL file in this repo) or input_file_id (a file already "
                          "uploaded)", ("input",), "input")


def _retry_problem(data: dict, source: SpecSource) -> Problem | None:
    """A retry sends some lines of the input again: batchplan must be able to read them."""
    if data.get("retry") is None or data.get("input_file_id") is None:
        return None
    return source.problem("needs input: (a JSONL file in this repo): with input_file_id batchplan cannot read the "
                          "requests to send again; use input:, or remove retry:", ("retry",), "retry")


def _metadata_limits(data: dict, source: SpecSource) -> list[Problem]:
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        return []
    problems = [source.problem(f"keys starting with {RESERVED_PREFIX!r} are reserved for batchplan's own tags; "
                               "rename it", ("metadata", key), "invalid_metadata")
                for key in metadata if str(key).startswith(RESERVED_PREFIX)]
    if len(metadata) > USER_METADATA:
        problems.append(source.problem(
            f"{len(metadata)} keys is too many: the API allows {MAX_METADATA} and batchplan uses 2 of them "
            f"({TAG_NAME}, {TAG_SPEC}), so a spec may have at most {USER_METADATA}", ("metadata",),
            "invalid_metadata"))
    return problems


def _check_document(doc: _Document, source: SpecSource, index: int) -> tuple[LoadedSpec | None, list[Problem]]:
    data = doc.data
    if not isinstance(data, dict):
        return None, [Problem(source.file, f"document {index + 1} must be a mapping of fields (name: ..., "
                              f"endpoint: ...), not a {type(data).__name__}", source.line())]
    problems = [source.problem(f"given twice (lines {first} and {again}); YAML would keep only the last, so "
                               "remove one", loc, "duplicate_field") for loc, first, again in doc.repeated]
    if "name" not in data:
        problems.append(source.problem("missing; every spec needs a unique name (letters, digits, '.', '_', '-')",
                                       ("name",), "missing"))
    spec = None
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems += [p for p in _pydantic_problems(exc, source) if p.field != "name" or "name" in data]
    if problem := _input_problem(data, source):
        problems.append(problem)
    if problem := _retry_problem(data, source):
        problems.append(problem)
    problems += _metadata_limits(data, source)
    if problems:
        return None, problems
    return LoadedSpec(spec, source), []


def load_spec_file(path: Path, repo_root: Path) -> tuple[list[LoadedSpec], list[Problem]]:
    """Every spec in one YAML file, and every problem found in it."""
    file = _relative(path, repo_root)
    try:
        docs = _documents(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        return [], [_yaml_problem(file, exc)]
    except AliasBudgetExceeded as exc:
        return [], [Problem(file, str(exc), exc.line, code="yaml")]
    except UnicodeDecodeError as exc:
        return [], [Problem(file, f"not UTF-8 text (byte {exc.start}); save the file as UTF-8", code="yaml")]
    except (OSError, yaml.YAMLError) as exc:
        return [], [Problem(file, f"cannot read: {exc}", code="yaml")]
    specs, problems = [], []
    for index, doc in enumerate(docs):
        if doc.data is None:
            continue  # an empty document, e.g. a trailing '---'
        loaded, found = _check_document(doc, SpecSource(file, path, doc.lines), index)
        problems += found
        if loaded:
            specs.append(loaded)
    return specs, sorted(problems, key=lambda p: p.line or 0)


def find_spec_files(specs_dir: Path) -> list[Path]:
    return sorted(p for p in specs_dir.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_specs(specs_dir: Path, repo_root: Path) -> tuple[list[LoadedSpec], list[Problem]]:
    """All specs under specs_dir, sorted by name, with duplicate names reported."""
    repo_root = repo_root.resolve()
    specs: list[LoadedSpec] = []
    problems: list[Problem] = []
    if not specs_dir.is_dir():
        return [], [Problem(_relative(specs_dir, repo_root), "no such directory; create it, pass --specs DIR, or "
                            "run batchplan from the repo root (or with -C DIR)")]
    for path in find_spec_files(specs_dir):
        try:
            confine(path, repo_root, repo_root)
        except PathError as exc:  # read nothing of it: its values would show in messages
            problems.append(Problem(_relative(path, repo_root), f"{exc}; spec files are read only from inside it"))
            continue
        found, bad = load_spec_file(path, repo_root)
        specs += found
        problems += bad
    first: dict[str, LoadedSpec] = {}
    for loaded in specs:
        name = loaded.spec.name
        if name in first:
            other = first[name].source
            problems.append(loaded.source.problem(
                f"duplicate name {name!r}, also used at {other.file}:{other.line(('name',))}; names must be "
                "unique across all spec files, so rename one", ("name",), "duplicate_name"))
        else:
            first[name] = loaded
    return sorted(first.values(), key=lambda s: s.spec.name), problems


def resolve_input(loaded: LoadedSpec, repo_root: Path) -> tuple[Path | None, Problem | None]:
    """The input file's real path, refused when it leaves the repo (symlinks included).

    `repo_root` must be resolved already (the caller resolves it once for all specs).
    """
    raw = loaded.spec.input
    assert raw is not None
    try:
        path = confine(raw, loaded.source.path.parent, repo_root)
    except PathError as exc:
        return None, loaded.source.problem(
            f"{raw!r} {exc} (input: is relative to the spec file, output: and errors: to the repo root); "
            "batchplan only uploads files inside the repository so that a spec cannot send local secrets to the "
            "server", ("input",), "outside_repo")
    if why := not_a_file(path):
        return None, loaded.source.problem(
            f"{raw!r} {why} (looked for {_relative(path, repo_root)}: input: is relative to the spec file "
            f"{loaded.source.file}, not to the repo root)",
            ("input",), "missing_input")
    return path, None


def _relative(path: Path, root: Path) -> str:
    """`path` as shown to users: relative to the (resolved) repo root when it is inside it."""
    if not path.is_relative_to(root):
        path = path.resolve()  # only when needed: resolving costs a stat per path component
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
