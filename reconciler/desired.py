"""Desired batches: specs resolved against their input files, hashed, ready to plan.

`load_desired` is the one gate every command that reads specs passes through: it
validates every spec and every input file (streaming, with the hash cache) and
raises ValidationFailed listing every problem, before any network is touched.

A spec whose input is over a batch's limits (or its `shard:` block) makes one Desired
per shard, addressed `NAME[K]` (spec.shard_address): each is one batch with its own
content hash, so plan, apply and the state treat a shard like any batch. A spec that
fits one batch keeps its plain name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .batch import BatchFields
from .errors import Problem, ValidationFailed
from .inputs import HashCache, InputReport
from .retries import RetryPolicy
from .shards import Shard, ShardLimits, describe_split
from .spec import TAG_NAME, TAG_SPEC, LoadedSpec, load_specs, resolve_input, shard_address, spec_of

if TYPE_CHECKING:
    from .providers import Profile


@dataclass(frozen=True)
class Desired:
    """One batch as it should exist, with its input resolved to a content hash.

    For a shard, `name` is its address (`big[1]`), `input_sha256` and `input_bytes` are the
    shard's own, and `shard` says which lines and bytes of the input it holds."""

    name: str
    file: str                      # spec file, relative to the repo root
    endpoint: str
    completion_window: str
    metadata: dict
    output_expires_after: dict | None
    input: str | None              # repo-relative input path, when the spec names a local file
    input_sha256: str | None
    input_file_id: str | None      # when the spec names an uploaded file instead
    requests: int | None
    prevent_cancel: bool
    output: str | None             # where `download` writes the latest output (the spec's, or the default)
    errors: str | None
    input_bytes: int | None = None  # the local input's size: an upload is reused only when its size matches
    models: tuple[str, ...] = ()    # the models the input's requests name, for the plan's create lines
    ignore_changes: tuple[str, ...] = ()  # lifecycle.ignore_changes: fields whose edit only updates the state
    budget_usd: float | None = None  # the spec's own budget (budget.py); not part of the batch's fields
    provider: str | None = None  # the spec's named provider (None: the environment's); part of the fields
    base_url: str | None = None  # that provider's base_url now, recorded with the batch to show a move as drift
    retry: RetryPolicy | None = None  # the spec's retry: (else batchplan.yaml's); not part of the batch's fields
    shard: Shard | None = None      # the part of the input this batch holds, when the spec is split
    split: str = ""                 # why the spec makes its shards (shards.describe_split), when split

    @property
    def spec(self) -> str:
        """The spec's name (a shard's address less its `[K]`)."""
        return spec_of(self.name)

    def upload_range(self) -> tuple[int, int]:
        """The bytes [start, end) of the input file to upload: a shard's, or the whole file."""
        return (self.shard.start, self.shard.end) if self.shard else (0, self.input_bytes or 0)

    def fields(self) -> BatchFields:
        """What the batch is made from: the view that plans diff and state records."""
        return self._fields

    @functools.cached_property  # asked for several times per spec by plan and apply
    def _fields(self) -> BatchFields:
        return BatchFields(endpoint=self.endpoint, completion_window=self.completion_window,
                           metadata=dict(self.metadata), output_expires_after=self.output_expires_after,
                           input=self.input, input_sha256=self.input_sha256, input_file_id=self.input_file_id,
                           provider=self.provider)

    @functools.cached_property
    def spec_hash(self) -> str:
        return spec_hash(self.fields())

    def tags(self) -> dict[str, str]:
        return {TAG_NAME: self.name, TAG_SPEC: self.spec_hash}


def spec_hash(fields: BatchFields) -> str:
    """Identity of a batch's parameters and input content (not of the input's path).

    It is sent as a tag with every batch and kept in every state: the dict hashed must stay
    exactly what it always was (the BatchFields keys, less `input`; `provider` only when a spec
    names one, so the hashes of specs that name none never change)."""
    identity = fields.model_dump(exclude={"input"})
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _scan(path: Path, endpoint: str, cache: HashCache, rel: str,
          limits: tuple[int, int]) -> InputReport | Problem:
    try:
        return cache.scan(path, endpoint, limits)
    except OSError as exc:
        return Problem(rel, f"cannot read: {exc.strerror or exc}", code="unreadable")


def _input_problems(file: str, report: InputReport, used_by: str) -> list[Problem]:
    """A file's problems; those with no line also say which spec reads the file."""
    problems = [dataclasses.replace(p, file=file, message=p.message if p.line else f"{p.message} (input of {used_by})")
                for p in report.problems]
    if report.more_problems:
        problems.append(Problem(file, f"... and {report.more_problems} more problem"
                                f"{'s' if report.more_problems != 1 else ''} in this file", code="more"))
    return problems


def _read_input(loaded: LoadedSpec, repo_root: Path, cache: HashCache,
                scanned: dict) -> tuple[str | None, InputReport | None, list[Problem]]:
    """A spec's input file: its repo-relative path and clean report, or the problems found."""
    path, problem = resolve_input(loaded, repo_root)
    if problem:
        return None, None, [problem]
    rel = str(path.relative_to(repo_root))
    limits = _limits(loaded)
    key = (rel, loaded.spec.endpoint, limits)
    seen = key in scanned  # a file shared by two specs is scanned and reported once
    if not seen:
        scanned[key] = _scan(path, loaded.spec.endpoint, cache, rel, (limits.max_requests, limits.max_bytes))
    report = scanned[key]
    if isinstance(report, Problem):
        return rel, None, [] if seen else [report]
    if not report.ok:
        where = f"{loaded.source.file}:{loaded.source.line(('input',))}"
        return rel, None, [] if seen else _input_problems(rel, report, where)
    return rel, report, []


def _provider_problem(loaded: LoadedSpec, providers: Mapping[str, Profile]) -> Problem | None:
    """A spec's provider must be one of batchplan.yaml's profiles (checked offline)."""
    name = loaded.spec.provider
    if name is None or name in providers:
        return None
    known = f"known providers: {', '.join(sorted(providers))}" if providers else \
        "batchplan.yaml names no providers (add it under providers:, or remove the field to use the environment's)"
    return loaded.source.problem(f"unknown provider {name!r}; {known}", ("provider",), "unknown_provider")


def _limits(loaded: LoadedSpec) -> ShardLimits:
    return loaded.spec.shard or ShardLimits()


def _resolve(loaded: LoadedSpec, repo_root: Path, cache: HashCache, scanned: dict, results: str,
             default_retry: RetryPolicy | None = None,
             providers: Mapping[str, Profile] | None = None) -> tuple[list[Desired], list[Problem]]:
    """The spec's batches: one, or one per shard of its input (each on the spec's provider)."""
    providers = providers or {}
    spec = loaded.spec
    if problem := _provider_problem(loaded, providers):
        return [], [problem]
    rel_input = report = None
    if spec.input is not None:
        rel_input, report, problems = _read_input(loaded, repo_root, cache, scanned)
        if report is None:
            return [], problems
    expiry = spec.output_expires_after.model_dump() if spec.output_expires_after else None
    whole = Desired(
        name=spec.name, file=loaded.source.file, endpoint=spec.endpoint,
        completion_window=spec.completion_window, metadata=dict(sorted(spec.metadata.items())),
        output_expires_after=expiry, input=rel_input, input_sha256=report.sha256 if report else None,
        input_file_id=spec.input_file_id, requests=report.requests if report else None,
        prevent_cancel=spec.lifecycle.prevent_cancel, output=spec.output or f"{results}/{spec.name}/output.jsonl",
        errors=spec.errors, input_bytes=report.size if report else None,
        models=tuple(sorted(report.models)) if report else (), ignore_changes=spec.lifecycle.ignore_changes,
        budget_usd=spec.budget_usd,
        retry=spec.retry_policy(default_retry), provider=spec.provider,
        base_url=providers[spec.provider].base_url.rstrip("/") if spec.provider else None,
    )
    if report is None or len(report.shards) <= 1:
        return [whole], []
    split = describe_split(report.shards, _limits(loaded))
    return [dataclasses.replace(whole, name=shard_address(spec.name, s.index), input_sha256=s.sha256,
                                requests=s.requests, input_bytes=s.size, shard=s, split=split)
            for s in report.shards], []


def load_desired(specs_dir: Path, repo_root: Path, cache: HashCache, results: str = "results",
                 default_retry: RetryPolicy | None = None,
                 providers: Mapping[str, Profile] | None = None) -> list[Desired]:
    """Every spec, validated with its input file; raises ValidationFailed listing all problems.

    `results`: the results directory (repo-relative), for the output path of a spec that names none.
    `default_retry`: batchplan.yaml's `retry:`, for the specs with a local input and none of their own.
    `providers`: batchplan.yaml's profiles, which a spec's `provider:` must name."""
    repo_root = repo_root.resolve()
    loaded, problems = load_specs(specs_dir, repo_root)
    scanned: dict = {}
    desired = []
    for item in loaded:
        found, bad = _resolve(item, repo_root, cache, scanned, results, default_retry, providers)
        problems += bad
        desired += found
    if problems:
        raise ValidationFailed(problems)
    return desired
