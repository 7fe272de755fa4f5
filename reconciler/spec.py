"""Batch specs: the YAML documents under specs/ that say which batches should exist.

Each YAML document is one batch. Every problem is reported with the spec file, the
field and, where YAML knows it, the line; all problems are collected, not just the first.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from .errors import Problem

ENDPOINTS = (
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos",
)
RESERVED_PREFIX = "batchplan_"
TAG_NAME = "batchplan_name"
TAG_SPEC = "batchplan_spec"
MAX_METADATA = 16
USER_METADATA = MAX_METADATA - 2  # two keys are batchplan's tags
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

Endpoint = Literal[
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos",
]


class OutputExpiry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class Lifecycle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prevent_cancel: bool = False


class Spec(BaseModel):
    """One batch as the user wants it. Paths are as written in the YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    input: str | None = None
    input_file_id: str | None = None
    endpoint: Endpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    output_expires_after: OutputExpiry | None = None
    output: str | None = None
    errors: str | None = None
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if k.startswith(RESERVED_PREFIX))
        if reserved:
            raise ValueError(f"keys starting with {RESERVED_PREFIX!r} are reserved for batchplan: {reserved}")
        if len(value) > USER_METADATA:
            raise ValueError(
                f"{len(value)} keys; the API allows {MAX_METADATA} and batchplan uses 2 "
                f"({TAG_NAME}, {TAG_SPEC}), so a spec may have at most {USER_METADATA}")
        for key, val in value.items():
            if len(key) > 64:
                raise ValueError(f"key {key[:20]!r}... is {len(key)} characters; the limit is 64")
            if len(val) > 512:
                raise ValueError(f"value of {key!r} is {len(val)} characters; the limit is 512")
        return value


FIELDS = tuple(Spec.model_fields)


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


def _node_lines(node: yaml.Node, loc: tuple = ()) -> dict[tuple, int]:
    """Map each field path in a YAML document to its 1-based line."""
    lines = {loc: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            lines.update(_node_lines(value, child))
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            lines.update(_node_lines(value, (*loc, i)))
    return lines


def _documents(text: str, file: str) -> list[tuple[object, dict[tuple, int]]]:
    loader = yaml.SafeLoader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            docs.append((loader.construct_document(node), _node_lines(node)))
    finally:
        loader.dispose()
    return docs


def _pydantic_problems(exc: ValidationError, source: SpecSource) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(source.problem(_unknown_field_message(loc), loc, "unknown_field"))
        elif err["type"] == "literal_error" and loc == ("endpoint",):
            problems.append(source.problem(
                f"{err['input']!r} is not an endpoint the Batch API accepts; use one of: {', '.join(ENDPOINTS)}", loc))
        elif err["type"] == "string_pattern_mismatch" and loc == ("name",):
            problems.append(source.problem(
                "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", loc))
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "string_type" and loc[:1] == ("metadata",):
                message += " (quote numbers and booleans in YAML)"
            problems.append(source.problem(message, loc))
    return problems


def _unknown_field_message(loc: tuple) -> str:
    parent_fields = {(): FIELDS, ("output_expires_after",): ("anchor", "seconds"),
                     ("lifecycle",): ("prevent_cancel",)}.get(loc[:-1], ())
    guess = difflib.get_close_matches(str(loc[-1]), parent_fields, n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"unknown field{hint}"


def _check_document(data: object, source: SpecSource, index: int) -> tuple[LoadedSpec | None, list[Problem]]:
    if not isinstance(data, dict):
        return None, [Problem(source.file, f"document {index + 1} must be a mapping of fields", source.line())]
    if "name" not in data:
        return None, [source.problem("missing: every spec needs a unique name", ("name",), "missing")]
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        return None, _pydantic_problems(exc, source)
    if (spec.input is None) == (spec.input_file_id is None):
        both = "both" if spec.input else "neither"
        return None, [source.problem(f"give exactly one of input or input_file_id ({both} given)", ("input",))]
    return LoadedSpec(spec, source), []


def load_spec_file(path: Path, repo_root: Path) -> tuple[list[LoadedSpec], list[Problem]]:
    """Every spec in one YAML file, and every problem found in it."""
    file = _relative(path, repo_root)
    try:
        text = path.read_text(encoding="utf-8")
        docs = _documents(text, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        return [], [Problem(file, f"YAML syntax error: {exc.problem}", line, code="yaml")]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [], [Problem(file, f"cannot read: {exc}", code="yaml")]
    specs, problems = [], []
    for index, (data, lines) in enumerate(docs):
        if data is None:
            continue  # an empty document, e.g. a trailing '---'
        loaded, found = _check_document(data, SpecSource(file, path, lines), index)
        problems += found
        if loaded:
            specs.append(loaded)
    return specs, problems


def find_spec_files(specs_dir: Path) -> list[Path]:
    return sorted(p for p in specs_dir.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_specs(specs_dir: Path, repo_root: Path) -> tuple[list[LoadedSpec], list[Problem]]:
    """All specs under specs_dir, sorted by name, with duplicate names reported."""
    specs: list[LoadedSpec] = []
    problems: list[Problem] = []
    if not specs_dir.is_dir():
        return [], [Problem(_relative(specs_dir, repo_root), "no such directory; create it or pass --specs DIR")]
    for path in find_spec_files(specs_dir):
        found, bad = load_spec_file(path, repo_root)
        specs += found
        problems += bad
    first: dict[str, LoadedSpec] = {}
    for loaded in specs:
        name = loaded.spec.name
        if name in first:
            other = first[name].source
            problems.append(loaded.source.problem(
                f"duplicate name {name!r}; also used at {other.file}:{other.line(('name',))}", ("name",)))
        else:
            first[name] = loaded
    return sorted(first.values(), key=lambda s: s.spec.name), problems


def resolve_input(loaded: LoadedSpec, repo_root: Path) -> tuple[Path | None, Problem | None]:
    """The input file's real path, refused when it leaves the repo (symlinks included)."""
    raw = loaded.spec.input
    assert raw is not None
    path = (loaded.source.path.parent / raw).resolve()
    root = repo_root.resolve()
    if not path.is_relative_to(root):
        return None, loaded.source.problem(
            f"{raw!r} resolves to {path}, outside the repository {root}; batchplan only uploads files "
            "inside the repository so that a spec cannot send local secrets to the server", ("input",), "outside_repo")
    if not path.is_file():
        return None, loaded.source.problem(f"{raw!r}: no such file ({_relative(path, root)})", ("input",), "missing_input")
    return path, None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
