"""Download: each finished batch's output and error files, written to disk once.

A spec that has retried (retries.py) has several batches, its attempts: each one's files go
to its own directory, and the name's output and errors files hold every attempt merged
(merge_results), not a copy of the latest's.

Where: every batch's files to `<results>/<name>/<batch id>/output.jsonl` and
`errors.jsonl`, so a replace never overwrites the results of the run before it; and the
latest batch's also to the spec's `output:` / `errors:` paths (relative to the repo root),
else `<results>/<name>/output.jsonl` and `<results>/<name>/errors.jsonl` (a copy, not a
link: editing the latest never changes the kept one). A spec split into shards keeps each
shard's files under `<results>/<name>/<batch id>/` too, and its latest files are merged
from them, in input order, once every shard has finished (`merge_shards`; every attempt of every shard
once a shard has retried, `merge_shard_attempts`). Every destination is checked before
anything is fetched (Project.results_area): symlinks resolved, it must be under the
results directory and never over a spec, an input, the state, its lock or a cache. Each
file is streamed to a temp file and renamed into place (api.download_file), and recorded
in a small manifest (`<results>/.batchplan-downloads.json`: file id, size, sha256 per
destination), so a second run skips files whose bytes are still the ones downloaded
without sending a single request.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BatchplanError, ConfigError, NotFound, PathError, StalePlanError
from .fsutil import atomic_writer
from .inputs import CacheFile, hash_file
from .paths import Area, confine, shown
from .shards import Shard, merge_in_input_order, merge_jsonl
from .spec import LoadedSpec, shard_of, spec_of
from .batch import BatchRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from .api import Api
    from .results import AttemptFiles, MergeReport
    from .state import Entry, State

MANIFEST = ".batchplan-downloads.json"
KINDS = (("output", "output_file_id", "output.jsonl"), ("errors", "error_file_id", "errors.jsonl"))


@dataclass(frozen=True)
class Target:
    """One file to fetch: a batch's output or error file, and where it goes."""

    name: str
    kind: str          # "output" or "errors"
    file_id: str
    dest: Path         # <results>/<name>/<batch id>/<kind file>: this batch's own copy
    rel: str           # dest relative to the repo root, for messages and the manifest
    batch_id: str = ""
    latest: Path | None = None  # where the latest batch's file also goes (None: not the latest batch)
    latest_rel: str = ""

    def as_latest(self) -> Target:
        """The same file at its `latest` place (for the manifest)."""
        assert self.latest is not None
        return Target(self.name, self.kind, self.file_id, self.latest, self.latest_rel, self.batch_id)


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    fetched: list[Target] = field(default_factory=list)  # on disk intact now (downloaded or already there)

    @property
    def empty(self) -> bool:
        """Nothing to say at all (no batch was named or found)."""
        return not (self.written or self.skipped or self.notes or self.failed)


def destinations(specs: list[LoadedSpec], names: list[str], area: Area) -> dict[str, dict[str, Path]]:
    """name -> {"output": path, "errors": path}, each checked against `area` (ConfigError, nothing fetched)."""
    by_name = {s.spec.name: s for s in specs}
    out: dict[str, dict[str, Path]] = {}
    for name in names:
        loaded = by_name.get(name)
        out[name] = {}
        for kind, _, default in KINDS:
            raw = getattr(loaded.spec, kind) if loaded else None
            out[name][kind] = _destination(area, raw or area.directory / name / default, loaded if raw else None,
                                           kind)
    _ensure_distinct(out, area.root)
    return out


def _destination(area: Area, raw: str | Path, loaded: LoadedSpec | None, kind: str) -> Path:
    try:
        return area.check(raw)
    except PathError as exc:
        if loaded is None:  # the default path: say it, relative to the repo
            raise ConfigError(f"{shown(Path(raw), area.root)}: {exc}") from None
        where = f"{loaded.source.file}:{loaded.source.line((kind,)) or '?'}: {kind}"
        raise ConfigError(f"{where}: {raw!r} {exc} (output: and errors: are relative to the repo root, input: to "
                          "the spec file)") from None


def spec_inputs(specs: list[LoadedSpec], root: Path) -> dict[Path, str]:
    """Each local input the specs read (resolved) -> "the input of NAME": download never writes over one."""
    inputs = {}
    for loaded in specs:
        if loaded.spec.input is not None:
            try:
                inputs[confine(loaded.spec.input, loaded.source.path.parent, root)] = f"the input of {loaded.spec.name}"
            except PathError:
                continue  # outside the repo: no write can land there anyway
    return inputs


def _ensure_distinct(out: dict[str, dict[str, Path]], root: Path) -> None:
    seen: dict[Path, str] = {}
    for name, paths in out.items():
        for kind, path in paths.items():
            if path in seen:
                raise ConfigError(f"{name} {kind} and {seen[path]} would both be written to "
                                  f"{_rel(path, root)}; give them different output:/errors: paths")
            seen[path] = f"{name} {kind}"


def batch_dir(results: Path, name: str, batch_id: str) -> Path:
    """Where one batch's own files are kept: `<results>/<name>/<batch id>/` (a shard's under its spec's name)."""
    return results / spec_of(name) / batch_id


def files_to_download(records: dict[str, BatchRecord | None], dests: dict[str, dict[str, Path]],
                      root: Path, results: Path, latest: bool = True) -> tuple[list[Target], list[str]]:
    """The files to fetch for each named batch, and a note for each batch with nothing to fetch.

    Each goes to the batch's own directory and, when `latest` (the batch is its name's current
    one), also to `dests` (the spec's paths, or the default ones)."""
    found, notes = [], []
    for name, rec in records.items():
        if rec is None:
            notes.append(f"{name}: no batch (an interrupted apply); nothing to download")
            continue
        if not rec.terminal:
            notes.append(f"{name}: batch {rec.id} is {rec.status}; skipped (run `batchplan wait {name}` first)")
            continue
        for kind, key, default in KINDS:
            file_id = getattr(rec, key)
            if file_id:
                own = batch_dir(results, name, rec.id) / default
                last = dests[name][kind] if latest and name in dests else None  # a shard's: merged later
                found.append(Target(name, kind, file_id, own, _rel(own, root), rec.id, last,
                                    _rel(last, root) if last else ""))
        notes += _missing_files(name, rec)
    return found, notes


def every_attempt(wanted: list[Target], earlier: dict[str, list[BatchRecord]], dests: dict[str, dict[str, Path]],
                  root: Path, results: Path) -> list[Target]:
    """`wanted` and, for each name in `earlier` (its earlier attempts: it has retried), their files too,
    each only to its batch's own directory: the latest places get every attempt merged (merge_results)."""
    out = [replace(t, latest=None, latest_rel="") if t.name in earlier else t for t in wanted]
    for name, records in earlier.items():
        for rec in records:
            out += files_to_download({name: rec}, dests, root, results, latest=False)[0]
    return out


def merge_results(name: str, records: list[BatchRecord], source: Path, dests: dict[str, Path], root: Path,
                  results: Path, manifest: Manifest, report: Report) -> None:
    """Merge every attempt's files (in their own directories) into the name's output and errors files:
    one line per request that succeeded in any attempt, and the latest error of each that never did,
    in the order of `source`, the input (results.merge_attempts)."""
    from .results import merge_attempts

    files = attempt_result_paths(name, records, results)
    if not _all_here(files, report):
        report.notes.append(f"{name}: its {len(records)} attempts were not merged: not every result file is here")
        return
    # In the manifest under the attempts' batch ids, so that an intact merge of the same attempts is kept
    key = "merged:" + ",".join(rec.id for rec in records)
    write_merged(name, key, f"from {len(records)} attempts", dests, root, manifest, report,
                 lambda out, err: merge_attempts(source, files, out, err))


def attempt_result_paths(name: str, records: list[BatchRecord], results: Path) -> list[AttemptFiles]:
    """Where each attempt's output and error files are downloaded (None where the batch has none)."""
    from .results import AttemptFiles

    return [AttemptFiles(*(batch_dir(results, name, rec.id) / default if getattr(rec, key) else None
                           for _, key, default in KINDS)) for rec in records]


def _all_here(files: list[AttemptFiles], report: Report) -> bool:
    """Whether every one of the files is on disk intact now (downloaded or already there)."""
    here = {t.dest for t in report.fetched}
    return all(path in here for pair in files for path in pair if path)


def write_merged(name: str, key: str, origin: str, dests: dict[str, Path], root: Path, manifest: Manifest,
                 report: Report, merge: Callable[[Path, Path], MergeReport]) -> None:
    """Write a name's merged output and errors files with `merge(output, errors)`, unless both are still
    intact from the same batches (`key`, the manifest's file id); `origin` says what they are merged from."""
    targets = [Target(name, kind, key, dests[kind], _rel(dests[kind], root)) for kind, _, _ in KINDS]
    if all(manifest.intact(target) for target in targets):
        report.skipped.append(f"{name}: {targets[0].rel} and {targets[1].rel} already merged {origin}")
        return
    merged = merge(dests["output"], dests["errors"])
    for target in targets:
        manifest.add(target, target.dest.stat().st_size)
    report.written.append(f"{name}: wrote {targets[0].rel} ({merged.outputs:,} results) and {targets[1].rel} "
                          f"({merged.errors:,} without a result), merged {origin}")


def _missing_files(name: str, rec: BatchRecord) -> list[str]:
    counts = rec.request_counts or {}
    if not rec.output_file_id and not rec.error_file_id:
        codes = rec.error_codes()
        return [f"{name}: batch {rec.id} is {rec.status}{f' ({codes})' if codes else ''} and has no result files"]
    if not rec.output_file_id:
        return [f"{name}: batch {rec.id} has no output file: none of its {counts.get('total', 0)} requests "
                "succeeded; see its errors file"]
    return []


def _rel(path: Path, root: Path) -> str:
    return shown(path, root.resolve())


class Manifest(CacheFile):
    """What was downloaded where: rel path -> {file_id, bytes, sha256} of the bytes written.

    A lost or damaged manifest only costs a download again."""

    VERSION = 2  # 2: keyed like every CacheFile; no mtime (a file is intact when its sha256 is)
    SAVES = "downloading result files again"
    FIELDS = (("file_id", str), ("bytes", int), ("sha256", str))

    @property
    def files(self) -> dict[str, dict]:
        return self.entries

    def intact(self, target: Target) -> bool:
        """Whether `target.dest` holds exactly the bytes of `target.file_id` downloaded before.

        The sha256 decides, never the size and mtime alone: a file damaged in place keeps both."""
        known = self.files.get(target.rel)
        if not known or known["file_id"] != target.file_id:
            return False
        try:
            return target.dest.stat().st_size == known["bytes"] and hash_file(target.dest) == known["sha256"]
        except OSError:
            return False

    def add(self, target: Target, size: int) -> None:
        self.files[target.rel] = {"file_id": target.file_id, "bytes": size, "sha256": hash_file(target.dest)}
        self.dirty = True


def notes_on_earlier_files(records: dict[str, BatchRecord | None], dests: dict[str, dict[str, Path]], root: Path,
              manifest: Manifest) -> list[str]:
    """Notes for files on disk from an earlier batch, where the current batch has no such file."""
    notes = []
    for name, rec in records.items():
        if rec is None or not rec.terminal or name not in dests:
            continue
        for kind, key, _ in KINDS:
            rel = _rel(dests[name][kind], root)
            earlier = manifest.files.get(rel, {}).get("file_id")
            if not getattr(rec, key) and earlier and dests[name][kind].exists():
                notes.append(f"{name}: {rel} is from an earlier batch ({earlier}); batch {rec.id} has no "
                             f"{kind} file, so it was left as it is")
    return notes


def not_yet_downloaded(wanted: list[Target], manifest: Manifest, report: Report) -> tuple[list[Target], list[Target]]:
    """(the targets to fetch from the server, those whose own copy is here intact but whose latest
    place is not); those intact in both places are noted in `report` as skipped."""
    todo, restore = [], []
    for target in wanted:
        if not manifest.intact(target):
            todo.append(target)
        elif target.latest is not None and not manifest.intact(target.as_latest()):
            restore.append(target)
        else:
            report.skipped.append(f"{target.name}: {target.latest_rel or target.rel} already downloaded "
                                  f"({target.file_id})")
            report.fetched.append(target)
    return todo, restore


def copy_to_latest(target: Target, manifest: Manifest) -> None:
    """Copy a batch's own file to its latest place, atomically (a copy: editing one never changes the other)."""
    latest = target.as_latest()
    with target.dest.open("rb") as src, atomic_writer(latest.dest) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    manifest.add(latest, latest.dest.stat().st_size)


def restore_latest(restore: list[Target], manifest: Manifest, report: Report) -> None:
    """Put the latest files back from the batches' own copies, without asking the server."""
    for target in restore:
        copy_to_latest(target, manifest)
        report.written.append(f"{target.name}: wrote {target.latest_rel} from {target.rel} ({target.file_id})")
        report.fetched.append(target)


async def download_files(api: Api, todo: list[Target], manifest: Manifest, report: Report) -> None:
    """Download each target, concurrently; record each in `report`, and the good ones in `manifest`."""
    results = await asyncio.gather(*(api.download_file(t.file_id, t.dest) for t in todo), return_exceptions=True)
    for target, result in zip(todo, results):
        if isinstance(result, NotFound):
            report.failed.append(f"{target.name}: the {target.kind} file {target.file_id} is gone from the "
                                 "server: results expire (30 days, or the spec's output_expires_after); "
                                 f"nothing was written to {target.latest_rel or target.rel}")
        elif isinstance(result, BatchplanError):
            report.failed.append(f"{target.name}: {target.kind} file {target.file_id}: {result}")
        elif isinstance(result, OSError):  # a full disk, a directory made meanwhile: said, the rest go on
            report.failed.append(f"{target.name}: cannot write {target.rel}: {result.strerror or result}")
        elif isinstance(result, BaseException):
            raise result
        else:
            manifest.add(target, result)
            also = ""
            if target.latest is not None:
                copy_to_latest(target, manifest)
                also = f"{target.latest_rel} and "
            report.written.append(f"{target.name}: wrote {also}{target.rel} ({_size(result)}, {target.file_id})")
            report.fetched.append(target)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- a spec split into shards: one merged file ---------------------------------------------


def sharded_specs(records: dict[str, BatchRecord | None], state: State | None) -> dict[str, list[str]]:
    """spec name -> its shards' addresses in order, for each spec whose every shard in the state is
    among `records` (`download big` names them all; `download big[1]` only one: nothing to merge)."""
    groups: dict[str, list[str]] = {}
    for name in records:
        if shard_of(name) is not None:
            groups.setdefault(spec_of(name), []).append(name)
    entries = state.entries if state else {}
    return {spec: names for spec, names in groups.items()
            if {n for n in entries if spec_of(n) == spec and shard_of(n) is not None} == set(names)}


def merge_shards(spec: str, names: list[str], records: dict[str, BatchRecord | None], state: State,
                 dests: dict[str, Path], results: Path, root: Path, manifest: Manifest, report: Report,
                 earlier: dict[str, list[BatchRecord]] | None = None) -> None:
    """Write a sharded spec's output and errors as one file each, from its shards' own downloaded
    files, in input order (shards.merge_in_input_order), streaming; a merged file still intact
    from the same shard files is skipped. When a shard has retried (`earlier`: its attempts
    before its latest), every attempt of every shard is merged (merge_shard_attempts)."""
    recs = [records[n] for n in names]
    if any(rec is None or not rec.terminal for rec in recs):
        done = sum(1 for rec in recs if rec is not None and rec.terminal)
        report.notes.append(f"{spec}: {done} of {len(names)} shards finished; its merged files are written once "
                            f"all have (`batchplan wait {spec}`)")
        return
    if earlier and any(n in earlier for n in names):
        attempts = {n: [*earlier.get(n, []), records[n]] for n in names}
        return merge_shard_attempts(spec, attempts, state, dests, results, root, manifest, report)
    here = {t.dest for t in report.fetched}
    for kind, key, default in KINDS:
        ids = [getattr(rec, key) for rec in recs]
        parts = [batch_dir(results, n, rec.id) / default if file_id else None
                 for n, rec, file_id in zip(names, recs, ids)]
        if not any(ids) or any(part is not None and part not in here for part in parts):
            continue  # no shard has such a file, or one is not here intact (its failure is reported)
        merged = Target(spec, kind, _merged_id(ids), dests[kind], _rel(dests[kind], root))
        if manifest.intact(merged):
            report.skipped.append(f"{spec}: {merged.rel} already merged from {len(names)} shards")
            continue
        how = _merge(state, names, parts, merged.dest, root)
        manifest.add(merged, merged.dest.stat().st_size)
        report.written.append(f"{spec}: wrote {merged.rel} from {len(names)} shards, {how}")


def merge_shard_attempts(spec: str, attempts: dict[str, list[BatchRecord]], state: State, dests: dict[str, Path],
                         results: Path, root: Path, manifest: Manifest, report: Report) -> None:
    """A sharded spec some of whose shards retried: every attempt of every shard (each in its batch's
    own directory) merged into the spec's output and errors files, shard by shard in input order
    (results.merge_parts), each shard's bytes checked against the sha256 it was made from."""
    from .results import InputPart, merge_parts

    parts = []
    for name, records in attempts.items():
        files, entry = attempt_result_paths(name, records, results), state.entries[name]
        if not _all_here(files, report):
            report.notes.append(f"{spec}: its shards' attempts were not merged: not every result file of {name} "
                                "is here")
            return
        parts.append(InputPart(files, entry.shard.start, entry.shard.end, entry.fields.input_sha256)
                     if entry.shard else InputPart(files))
    batches = sum(len(records) for records in attempts.values())
    # In the manifest under every attempt's batch id, shard by shard, so an intact merge of the same attempts is kept
    key = "shards-merged-" + hashlib.sha256("\n".join(",".join(r.id for r in records)
                                                      for records in attempts.values()).encode()).hexdigest()[:24]
    source = root / str(state.entries[next(iter(attempts))].fields.input)
    try:
        write_merged(spec, key, f"from {len(attempts)} shards, {batches} batches in all", dests, root, manifest,
                     report, lambda out, err: merge_parts(source, parts, out, err))
    except (StalePlanError, OSError) as exc:
        why = exc if isinstance(exc, StalePlanError) else f"{exc.filename or source}: {exc.strerror or exc}"
        report.notes.append(f"{spec}: its shards' attempts were not merged: {why}; each batch's files are in its "
                            "own directory")


def entry_shard(entry: Entry) -> Shard:
    """The shard a state entry's current batch was made from: its lines, bytes and sha256."""
    part = entry.shard
    assert part is not None
    return Shard(index=part.index, start=part.start, end=part.end, first_line=part.first_line,
                 last_line=part.last_line, requests=part.last_line - part.first_line + 1, embedding_inputs=0,
                 sha256=entry.fields.input_sha256 or "")


def _merged_id(file_ids: list[str | None]) -> str:
    """The manifest's file id of a merged file: which shard files, in order, it was made from."""
    return "shards-" + hashlib.sha256("\n".join(f or "-" for f in file_ids).encode()).hexdigest()[:24]


def _merge(state: State, names: list[str], parts: list[Path | None], dest: Path, root: Path) -> str:
    """Merge in input order when the input still holds each shard's bytes, else in shard order; says which."""
    entries = [state.entries[n] for n in names]
    if all(e.shard and e.fields.input for e in entries):
        shards = [entry_shard(e) for e in entries]
        try:
            merge_in_input_order(root / str(entries[0].fields.input), shards, parts, dest)
            return "in input order"
        except (StalePlanError, OSError):
            pass
    merge_jsonl([p for p in parts if p is not None], dest)
    return "in shard order (the input changed since, so each shard's lines are as the server wrote them)"
