"""The sandbox's world: files and batches, their lifecycle, and where they are kept.

No HTTP here. server.py turns requests into calls on `Emulator`, whose answers are
plain dicts already in the official wire shape; an `EmulatorError` is an error the
real API would answer (status, message, param, code).

Batches move on lazily: every call first brings the whole world up to `clock()`,
replaying each step at the moment it was due. So a world persisted on disk keeps
"running" while no process serves it, and separate CLI invocations that each start
a server for a few seconds see one consistent history.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

import orjson
from filelock import FileLock

from reconciler.errors import ConfigError, StateError
from reconciler.inputs import MAX_REQUESTS, load_line, scan_input
from reconciler.sandbox import capacity, files, line_errors, results
from reconciler.sandbox.line_errors import RequestError
from reconciler.sandbox.outcomes import FAIL_RATE_ANSWER, BatchFaults, RequestFault, plan_failures
from reconciler.sandbox.world_index import WorldIndex
from reconciler.spec import ENDPOINTS

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
COMPLETION_WINDOWS = ("24h",)
ACTIVE = ("validating", "in_progress", "finalizing")
BATCH_LIFETIME = 86400
EXPIRY_SECONDS = (3600, 2592000)
WORLD_VERSION = 1
SHUFFLE_BLOCK = 1000  # output lines are shuffled within blocks this long: out of order, in bounded memory
STEP_SECONDS_ENV = "BATCHPLAN_SANDBOX_STEP_SECONDS"


@dataclass(frozen=True)
class Timing:
    """Seconds each batch step lasts. Floats are fine: tests run with 0.05."""

    validating: float = 2.0
    in_progress: float = 3.0
    finalizing: float = 1.0
    cancelling: float = 1.0

    @classmethod
    def uniform(cls, seconds: float) -> Timing:
        return cls(seconds, seconds, seconds, seconds)


def timing_from_env() -> Timing:
    """`BATCHPLAN_SANDBOX_STEP_SECONDS` (one float for every step), else the default Timing."""
    value = os.environ.get(STEP_SECONDS_ENV)
    if value is None or not value.strip():
        return Timing()
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{STEP_SECONDS_ENV} must be a number of seconds (e.g. 0.5), not {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{STEP_SECONDS_ENV} must be zero or more seconds, not {value!r}")
    return Timing.uniform(seconds)


class EmulatorError(Exception):
    """An error answer of the API: HTTP status plus the official error envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> EmulatorError:
    return EmulatorError(400, message, param=param, code=code)


def _wire_time(value: float | None) -> int | None:
    return None if value is None else int(value)


class WorldStore:
    """Where the world lives: in memory, or in `root` shared by several processes.

    Persisted, the world is `world.json` (rewritten atomically after every change)
    plus `files/<id>` for contents. `world.lock` serialises processes; each
    transaction reloads `world.json` first when another process replaced it.

    `index` (world_index.py) is the emulator's, derived from `data`: None whenever it may
    no longer match (another world loaded, a transaction that failed part way, or one
    that did not promise to keep it), and the emulator builds it again.
    """

    def __init__(self, root: Path | None):
        self.persistent = root is not None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="batchplan-sandbox-"))
        self.files_dir = self.root / "files"
        self.staging_dir = self.root / "staging"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.world_path = self.root / "world.json"
        self.data = self._empty()
        self._thread_lock = threading.RLock()
        self._process_lock = FileLock(self.root / "world.lock", thread_local=False) if self.persistent else None
        self._loaded_signature: tuple | None = None
        self.index: WorldIndex | None = None

    @staticmethod
    def _empty() -> dict:
        return {"version": WORLD_VERSION, "seq": 0, "files": {}, "batches": {}}

    @contextmanager
    def transaction(self, *, keeps_index: bool = False) -> Iterator[dict]:
        """Exclusive access to the world; saved on exit if anything changed.

        Only the emulator, which updates `index` with every change it makes, passes
        `keeps_index=True`; any other change of the world drops the index."""
        with self._thread_lock, (self._process_lock or nullcontext()):
            if self.persistent:
                self._reload_if_changed()
            before = orjson.dumps(self.data) if self.persistent else b""
            try:
                yield self.data
            except EmulatorError:
                raise  # an API's error answer: the emulator kept the index up to what it changed
            except BaseException:
                self.index = None  # a change may have stopped part way
                raise
            if not keeps_index:
                self.index = None
            if self.persistent and orjson.dumps(self.data) != before:
                self._save()

    def _signature(self) -> tuple | None:
        try:
            st = self.world_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reload_if_changed(self) -> None:
        signature = self._signature()
        if signature == self._loaded_signature:
            return
        data = orjson.loads(self.world_path.read_bytes()) if signature else self._empty()
        if data.get("version") != WORLD_VERSION:
            raise StateError(f"{self.world_path} holds a sandbox world of version {data.get('version')}, "
                             f"this batchplan reads version {WORLD_VERSION}; delete {self.root} to start afresh")
        self.data, self._loaded_signature, self.index = data, signature, None

    def _save(self) -> None:
        tmp = self.root / f".world.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(orjson.dumps(self.data, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2))
        os.replace(tmp, self.world_path)
        self._loaded_signature = self._signature()

    def next_seq(self) -> int:
        """A world-wide creation counter: lists sort by it, as timestamps can tie."""
        self.data["seq"] += 1
        return self.data["seq"]

    def content_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def close(self) -> None:
        if not self.persistent:
            shutil.rmtree(self.root, ignore_errors=True)


class Emulator:
    """The OpenAI Files + Batches API, minus HTTP. Thread safe; see the module doc for time.

    Knobs, all keyword-only: `models` the model ids it serves (default: every id the
    request schemas list; see models.py); `request_faults` and `expire_after` what goes
    wrong inside new batches (see outcomes.BatchFaults; `batch_faults` can be replaced
    while it runs); `max_requests` per batch (50,000) and `max_upload_bytes` per batch
    input file (200 MB), lower to show the limits with small files; `seed` the order of
    result lines (never the input order, as the real API promises none);
    `enqueued_token_limits` model -> the input tokens its batches may hold in flight (see
    capacity.py; a model not named has no limit); `skew` seconds added to `clock`: a server
    clock that leads (or, negative, lags) the client's, in every created_at and Date header.
    """

    def __init__(self, root: Path | None = None, timing: Timing = Timing(), fail_rate: float = 0.0,
                 clock: Callable[[], float] = time.time, *, models: Iterable[str] | None = None,
                 request_faults: Iterable[RequestFault] = (), expire_after: float | None = None,
                 max_requests: int = MAX_REQUESTS, max_upload_bytes: int = files.MAX_BATCH_UPLOAD_BYTES,
                 seed: int = 0, enqueued_token_limits: Mapping[str, int] | None = None, skew: float = 0.0):
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be between 0 and 1, not {fail_rate}")
        self.store = WorldStore(root)
        self.timing = timing
        self.fail_rate = fail_rate
        self.clock = (lambda: clock() + skew) if skew else clock
        self.models = None if models is None else frozenset(models)
        self.batch_faults = BatchFaults(requests=tuple(request_faults), expire_after=expire_after)
        self.max_requests, self.max_upload_bytes, self.seed = max_requests, max_upload_bytes, seed
        self.enqueued_token_limits = dict(enqueued_token_limits or {})

    @property
    def staging_dir(self) -> Path:
        """Where uploads are written while they arrive; same disk as the store, so moving is free."""
        return self.store.staging_dir

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _world(self) -> Iterator[tuple[dict, float]]:
        """The world, brought up to now: every batch step that fell due has run."""
        with self.store.transaction(keeps_index=True) as world:
            now = self.clock()
            self._advance(world, now)
            yield world, now

    def _index(self, world: dict) -> WorldIndex:
        """The world's indexes, built again when the store dropped them (see WorldStore)."""
        if self.store.index is None:
            self.store.index = WorldIndex(world, lambda batch: self._next_event(batch)[0])
        return self.store.index

    # --- files ---

    def create_file(self, staged: Path, filename: str, purpose: str | None,
                    expires_after: dict | None = None) -> dict:
        """Adopt an upload already written to `staged` (moved, never copied)."""
        try:
            self._check_upload(purpose, expires_after)
            refusal = files.upload_refusal(purpose, filename, staged.stat().st_size, self.max_upload_bytes)
            if refusal is not None:
                raise bad_request(refusal, None, None)
        except EmulatorError:
            staged.unlink(missing_ok=True)
            raise
        with self._world() as (world, now):
            expires_at = now + int(expires_after["seconds"]) if expires_after else files.default_expiry(purpose, now)
            return self._file_wire(self._add_file(world, staged, filename, purpose, now, expires_at))

    def upload_bytes(self, content: bytes, filename: str, purpose: str, expires_after: dict | None = None) -> dict:
        """Create a file from bytes in hand (tests and benches that skip HTTP)."""
        fd, name = tempfile.mkstemp(dir=self.staging_dir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        return self.create_file(Path(name), filename, purpose, expires_after)

    @staticmethod
    def _check_upload(purpose: str | None, expires_after: dict | None) -> None:
        if not purpose:
            raise bad_request("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(f"Invalid value: '{purpose}'. Supported values are: "
                              + ", ".join(f"'{p}'" for p in UPLOAD_PURPOSES) + ".", "purpose")
        if expires_after is not None:
            _check_expires_after(expires_after, "expires_after")

    def _add_file(self, world: dict, staged: Path, filename: str, purpose: str, now: float,
                  expires_at: float | None) -> dict:
        file_id = f"file-{secrets.token_hex(12)}"
        os.replace(staged, self.store.content_path(file_id))
        record = {"id": file_id, "bytes": self.store.content_path(file_id).stat().st_size, "created_at": now,
                  "expires_at": expires_at, "filename": filename, "purpose": purpose,
                  "seq": self.store.next_seq()}
        world["files"][file_id] = record
        self._index(world).add_file(record)
        return record

    def list_files(self, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                   order: str = "desc") -> dict:
        _check_limit(limit, 10000)
        if order not in ("asc", "desc"):
            raise bad_request(f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.", "order")
        with self._world() as (world, now):
            self._purge_expired_files(world, now)
            ids, has_more = self._index(world).file_order(purpose).page(after, limit, newest_first=order == "desc")
            return _page([world["files"][file_id] for file_id in ids], has_more, self._file_wire)

    def get_file(self, file_id: str) -> dict:
        with self._world() as (world, now):
            return self._file_wire(self._live_file(world, file_id, now))

    def delete_file(self, file_id: str) -> dict:
        with self._world() as (world, now):
            self._live_file(world, file_id, now)
            self._remove_file(world, file_id)
            return {"id": file_id, "object": "file", "deleted": True}

    def open_content(self, file_id: str) -> tuple[BinaryIO, int]:
        """An open handle on a file's bytes, and their size; the caller streams and closes it.

        Opened inside the lock, so a delete that follows cannot cut the stream short.
        """
        with self._world() as (world, now):
            record = self._live_file(world, file_id, now)
            return self.store.content_path(file_id).open("rb"), record["bytes"]

    def expire_file(self, file_id: str) -> dict:
        """Make a file's expiry moment now: from here on it answers 404, like an expired file."""
        with self._world() as (world, now):
            record = self._live_file(world, file_id, now)
            record["expires_at"] = now
            self._index(world).expire_at(record)
            return self._file_wire(record)

    def _live_file(self, world: dict, file_id: str, now: float) -> dict:
        record = world["files"].get(file_id)
        if record is not None and record["expires_at"] is not None and record["expires_at"] <= now:
            self._remove_file(world, file_id)  # expired files are deleted, as the real API does
            record = None
        if record is None:
            raise EmulatorError(404, f"No such File object: {file_id}", param="id")
        return record

    def _purge_expired_files(self, world: dict, now: float) -> None:
        for file_id in list(self._index(world).expired_by(now)):
            record = world["files"].get(file_id)  # an entry outlives a file deleted or expired sooner
            if record is not None and record["expires_at"] is not None and record["expires_at"] <= now:
                self._remove_file(world, file_id)

    def _remove_file(self, world: dict, file_id: str) -> None:
        self._index(world).remove_file(world["files"].pop(file_id))
        self.store.content_path(file_id).unlink(missing_ok=True)

    @staticmethod
    def _file_wire(record: dict) -> dict:
        return {"id": record["id"], "object": "file", "bytes": record["bytes"],
                "created_at": _wire_time(record["created_at"]), "expires_at": _wire_time(record["expires_at"]),
                "filename": record["filename"], "purpose": record["purpose"], "status": "processed",
                "status_details": None}

    # --- batches ---

    def create_batch(self, body: object) -> dict:
        body = _check_create_batch(body)
        with self._world() as (world, now):
            self._check_input_file(world, body["input_file_id"], now)
            batch_id = f"batch_{secrets.token_hex(16)}"
            batch = world["batches"][batch_id] = self._new_batch(batch_id, body, now)
            self._index(world).add_batch(batch, self._next_event(batch)[0])
            return self._batch_wire(batch, now)

    def _check_input_file(self, world: dict, file_id: str, now: float) -> None:
        try:
            record = self._live_file(world, file_id, now)
        except EmulatorError:
            raise bad_request(f"Cannot find input file {file_id}: no such File object.", "input_file_id",
                              None) from None
        if record["purpose"] != "batch":
            raise bad_request(f"File {file_id} has purpose '{record['purpose']}'; a batch input file must "
                              "be uploaded with purpose 'batch'.", "input_file_id", None)

    def _new_batch(self, batch_id: str, body: dict, now: float) -> dict:
        return {
            "id": batch_id, "seq": self.store.next_seq(), "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
            "metadata": body.get("metadata"), "output_expires_after": body.get("output_expires_after"),
            "timing": asdict(self.timing), "fail_rate": self.fail_rate, "seed": self.seed,
            "faults": self.batch_faults.model_dump(mode="json"),
            "status": "validating", "model": None, "errors": None, "created_at": now,
            "in_progress_at": None, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "total": 0, "planned_failures": 0, "counts": None,
            "output_file_id": None, "error_file_id": None, "usage": None,
        }

    def list_batches(self, after: str | None = None, limit: int = 20) -> dict:
        _check_limit(limit, 100)
        with self._world() as (world, now):
            ids, has_more = self._index(world).batches.page(after, limit)
            return _page([world["batches"][batch_id] for batch_id in ids], has_more,
                         lambda b: self._batch_wire(b, now))

    def get_batch(self, batch_id: str) -> dict:
        with self._world() as (world, now):
            return self._batch_wire(_find_batch(world, batch_id), now)

    def cancel_batch(self, batch_id: str) -> dict:
        with self._world() as (world, now):
            batch = _find_batch(world, batch_id)
            if batch["status"] in ACTIVE:
                batch["counts"] = self._counts(batch, now)
                batch["status"], batch["cancelling_at"] = "cancelling", now
                self._index(world).reschedule(batch, self._next_event(batch)[0])
            elif batch["status"] != "cancelling":  # a repeated cancel is harmless, like the real one
                raise EmulatorError(409, f"Cannot cancel a batch with status {batch['status']}.")
            return self._batch_wire(batch, now)

    def expire_batch(self, batch_id: str) -> dict:
        """Let a running batch hit its completion window now (a sandbox control, not an API call)."""
        with self._world() as (world, now):
            batch = _find_batch(world, batch_id)
            if batch["status"] not in ACTIVE:
                raise EmulatorError(409, f"Cannot expire a batch with status {batch['status']}.")
            self._expire(world, batch, now)
            return self._batch_wire(batch, now)

    def enqueued_timeline(self) -> list[capacity.Occupancy]:
        """When each batch of a model with a limit held its tokens (a sandbox control, for tests)."""
        with self._world() as (world, now):
            return capacity.timeline(world["batches"].values())

    # --- the lifecycle: one handler per step, each run at the moment it fell due ---

    def _advance(self, world: dict, now: float) -> None:
        """Run every step due by `now`, across all batches in the order they fell due: a step
        may read the other batches as they were at that moment (capacity.refusal does).
        The index's schedule holds each batch's next step; an entry its batch has moved
        past (a cancel came first) is stale and dropped."""
        index = self._index(world)
        for at, _, batch_id in index.due_by(now):
            batch = world["batches"][batch_id]
            due, step = self._next_event(batch)
            if due != at or step is None:
                continue
            step(world, batch, at)
            index.reschedule(batch, self._next_event(batch)[0])

    def _next_event(self, batch: dict) -> tuple[float, Callable[[dict, dict, float], None] | None]:
        """The batch's next step, or its expiry when the completion window closes first."""
        due, step = self._next_step(batch)
        deadline = batch["created_at"] + BATCH_LIFETIME
        if step is not None and batch["status"] in ACTIVE and deadline <= due:
            return deadline, self._expire
        return due, step

    def _next_step(self, batch: dict) -> tuple[float, Callable[[dict, dict, float], None] | None]:
        timing = batch["timing"]
        status = batch["status"]
        if status == "validating":
            return batch["created_at"] + timing["validating"], self._validated
        if status == "in_progress":
            expire_after = batch.get("faults", {}).get("expire_after")
            if expire_after is not None:  # a sandbox fault: the window closes part way through
                return batch["in_progress_at"] + expire_after * timing["in_progress"], self._expire
            return batch["in_progress_at"] + timing["in_progress"], self._processed
        if status == "finalizing":
            return batch["finalizing_at"] + timing["finalizing"], self._completed
        if status == "cancelling":
            return batch["cancelling_at"] + timing["cancelling"], self._cancelled
        return math.inf, None

    def _validated(self, world: dict, batch: dict, at: float) -> None:
        input_file = world["files"].get(batch["input_file_id"])
        if input_file is None:
            batch["errors"] = _errors([{"code": "invalid_file", "line": None, "param": "input_file_id",
                                        "message": f"The input file {batch['input_file_id']} was deleted."}])
            batch["status"], batch["failed_at"] = "failed", at
            return
        report = scan_input(self.store.content_path(input_file["id"]), batch["endpoint"])
        # The request limit is this emulator's (max_requests), not scan_input's fixed one.
        errors = line_errors.api_worded([p for p in report.problems if p.code != "too_many_tasks"])
        if report.requests > self.max_requests:
            errors.insert(0, line_errors.too_many_tasks(self.max_requests))
        if errors:
            batch["errors"] = _errors(errors)
            batch["status"], batch["failed_at"] = "failed", at
            return
        batch["model"] = report.models[0] if report.models else None
        batch["total"] = report.requests
        if self._over_capacity(world, batch, at):
            return
        faults = BatchFaults.model_validate(batch.get("faults", {}))
        batch["failures"] = plan_failures(batch["endpoint"], self._requests(batch), models=self.models,
                                          faults=faults.requests, fail_rate=batch["fail_rate"])
        batch["planned_failures"] = len(batch["failures"])
        batch["status"], batch["in_progress_at"] = "in_progress", at

    def _over_capacity(self, world: dict, batch: dict, at: float) -> bool:
        """Fail the batch if its tokens would take its model over its enqueued-token limit."""
        limit = self.enqueued_token_limits.get(batch["model"])
        if limit is None:
            return False
        path = self.store.content_path(batch["input_file_id"])
        batch["enqueued_tokens"] = capacity.batch_tokens(path, batch["endpoint"], batch["model"])
        index = self._index(world)
        refusal = capacity.refusal(index.holding_batches(world, batch["model"]), batch, batch["enqueued_tokens"],
                                   limit)
        if refusal is not None:
            batch["errors"] = _errors([refusal])
            batch["status"], batch["failed_at"] = "failed", at
        else:
            index.hold(batch)  # it goes in_progress: its tokens count from now on
        return refusal is not None

    def _processed(self, world: dict, batch: dict, at: float) -> None:
        batch["status"], batch["finalizing_at"] = "finalizing", at

    def _completed(self, world: dict, batch: dict, at: float) -> None:
        batch["counts"] = self._counts(batch, at)
        self._write_results(world, batch, at, expired=False)
        batch["status"], batch["completed_at"] = "completed", at

    def _cancelled(self, world: dict, batch: dict, at: float) -> None:
        self._write_results(world, batch, at, expired=False)  # partial results, as the real API keeps
        batch["status"], batch["cancelled_at"] = "cancelled", at

    def _expire(self, world: dict, batch: dict, at: float) -> None:
        batch["counts"] = self._counts(batch, at)
        self._write_results(world, batch, at, expired=True)
        batch["status"], batch["expired_at"] = "expired", at

    def _counts(self, batch: dict, at: float) -> dict:
        """request_counts at `at`: frozen once stopped, else growing linearly while in progress."""
        if batch["counts"] is not None:
            return dict(batch["counts"])
        if batch["status"] == "in_progress":
            done = min(1.0, max(0.0, (at - batch["in_progress_at"]) / (batch["timing"]["in_progress"] or 1)))
        else:
            done = 1.0 if batch["status"] == "finalizing" else 0.0
        failures = batch["planned_failures"]
        return {"total": batch["total"], "completed": math.floor((batch["total"] - failures) * done),
                "failed": math.floor(failures * done)}

    def _requests(self, batch: dict) -> Iterator[tuple[str, dict]]:
        """(custom_id, body) of each line of a batch's (already validated) input file."""
        with self.store.content_path(batch["input_file_id"]).open("rb") as fh:
            for raw in fh:
                request = load_line(raw)
                yield request["custom_id"], request["body"]

    def _write_results(self, world: dict, batch: dict, at: float, expired: bool) -> None:
        """Write the output and error files of the requests processed so far, and sum their usage."""
        if batch["total"] == 0 or batch["input_file_id"] not in world["files"]:
            return
        written = _Results(self.staging_dir, batch.get("seed", 0))
        try:
            self._replay(batch, int(at), expired, written)
        finally:
            paths = written.close()
        batch["counts"]["failed"] += written.expired
        batch["usage"] = written.usage or results.batch_usage(0, 0)
        for kind in ("output", "error"):
            batch[f"{kind}_file_id"] = self._adopt_result(world, batch, paths[kind], kind, written.lines[kind], at)

    def _replay(self, batch: dict, created: int, expired: bool, written: _Results) -> None:
        """Answer the requests that ran: `counts` says how many successes and failures did.

        The rest never ran: an expired batch reports each of them as `batch_expired`.
        """
        left = {"ok": batch["counts"]["completed"], "failed": batch["counts"]["failed"]}
        for custom_id, body in self._requests(batch):
            failure = _failure_of(batch, custom_id)
            kind = "failed" if failure else "ok"
            if left[kind] == 0:
                if expired:
                    written.write("error", results.expired_line(batch["id"], custom_id))
                    written.expired += 1
                continue
            left[kind] -= 1
            if kind == "ok":
                written.write("output", *results.success_line(batch["id"], batch["endpoint"], custom_id,
                                                               body, created))
            else:
                written.write("error", results.failure_line(batch["id"], custom_id, failure.status,
                                                             failure.error_object()))

    def _adopt_result(self, world: dict, batch: dict, staged: Path, kind: str, lines: int,
                      at: float) -> str | None:
        if lines == 0:
            staged.unlink()
            return None
        policy = batch["output_expires_after"]
        expires_at = at + policy["seconds"] if policy else None
        record = self._add_file(world, staged, f"{batch['id']}_{kind}.jsonl", "batch_output", at, expires_at)
        return record["id"]

    def _batch_wire(self, batch: dict, now: float) -> dict:
        wire = {key: batch[key] for key in ("id", "endpoint", "model", "errors", "input_file_id",
                                            "completion_window", "status", "output_file_id",
                                            "error_file_id", "usage", "metadata")}
        for key in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                    "expired_at", "cancelling_at", "cancelled_at"):
            wire[key] = _wire_time(batch[key])
        wire["object"] = "batch"
        wire["expires_at"] = int(batch["created_at"]) + BATCH_LIFETIME
        wire["request_counts"] = self._counts(batch, now)
        return dict(sorted(wire.items()))


class _Results:
    """A batch's output and error files while they are written, and the usage they add up to.

    Lines are not written in input order: the real API promises no order, and a client
    that matches results to requests by position must fail here, not in production.
    Each block of SHUFFLE_BLOCK lines is shuffled (seeded, so reproducible) and written.
    """

    def __init__(self, staging_dir: Path, seed: int):
        self.files = {kind: tempfile.NamedTemporaryFile("wb", dir=staging_dir, delete=False)
                      for kind in ("output", "error")}
        self.pending: dict[str, list[bytes]] = {"output": [], "error": []}
        self.rng = random.Random(seed)
        self.lines = {"output": 0, "error": 0}
        self.expired = 0
        self.usage: dict | None = None

    def write(self, kind: str, line: dict, usage: dict | None = None) -> None:
        self.pending[kind].append(orjson.dumps(line) + b"\n")
        if len(self.pending[kind]) >= SHUFFLE_BLOCK:
            self._flush(kind)
        self.lines[kind] += 1
        self.usage = results.add_usage(self.usage, usage)

    def _flush(self, kind: str) -> None:
        self.rng.shuffle(self.pending[kind])
        self.files[kind].writelines(self.pending[kind])
        self.pending[kind] = []

    def close(self) -> dict[str, Path]:
        for kind, fh in self.files.items():
            self._flush(kind)
            fh.close()
        return {kind: Path(fh.name) for kind, fh in self.files.items()}


# --- request checks and small helpers ---

def _failure_of(batch: dict, custom_id: str) -> RequestError | None:
    """How this request of the batch fails, or None; decided in the validating step."""
    failures = batch.get("failures")
    if failures is None:  # a batch validated by an older sandbox: only fail_rate existed
        return FAIL_RATE_ANSWER if results.request_fails(custom_id, batch["fail_rate"]) else None
    record = failures.get(custom_id)
    return None if record is None else RequestError.from_record(record)

def _find_batch(world: dict, batch_id: str) -> dict:
    batch = world["batches"].get(batch_id)
    if batch is None:
        raise EmulatorError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


def _errors(data: list[dict]) -> dict:
    return {"object": "list", "data": data}


def _page(page: list[dict], has_more: bool, render: Callable[[dict], dict]) -> dict:
    """One page of a cursor-paginated list (world_index.Ordered.page chose it) in the wire's shape."""
    return {"object": "list", "data": [render(item) for item in page],
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
            "has_more": has_more}


def _check_limit(limit: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise bad_request(f"Invalid 'limit': must be between 1 and {maximum}, got {limit}.", "limit")


def _check_expires_after(policy: object, param: str) -> None:
    if not isinstance(policy, dict):
        raise bad_request(f"Invalid type for '{param}': expected an object.", param, "invalid_type")
    if policy.get("anchor") != "created_at":
        raise bad_request(f"Invalid value for '{param}.anchor': only 'created_at' is supported.",
                          f"{param}.anchor")
    seconds = policy.get("seconds")
    low, high = EXPIRY_SECONDS
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not low <= seconds <= high:
        raise bad_request(f"Invalid value for '{param}.seconds': must be an integer between {low} and {high}, "
                          f"got {seconds!r}.", f"{param}.seconds")


def _check_create_batch(body: object) -> dict:
    """The checks the real API makes before it creates a batch; each error names its param."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", None, None)
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata",
                                  "output_expires_after"})
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    for key in ("input_file_id", "endpoint", "completion_window"):
        if key not in body:
            raise bad_request(f"Missing required parameter: '{key}'.", key, "missing_required_parameter")
        if not isinstance(body[key], str):
            raise bad_request(f"Invalid type for '{key}': expected a string.", key, "invalid_type")
    for key, allowed_values in (("endpoint", ENDPOINTS), ("completion_window", COMPLETION_WINDOWS)):
        if body[key] not in allowed_values:
            raise bad_request(f"Invalid value: '{body[key]}'. Supported values are: "
                              + ", ".join(f"'{v}'" for v in allowed_values) + ".", key)
    _check_metadata(body.get("metadata"))
    if body.get("output_expires_after") is not None:
        _check_expires_after(body["output_expires_after"], "output_expires_after")
    return body


def _check_metadata(metadata: object) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise bad_request("Invalid type for 'metadata': expected an object.", "metadata", "invalid_type")
    if len(metadata) > 16:
        raise bad_request(f"Invalid 'metadata': at most 16 key-value pairs, got {len(metadata)}.", "metadata")
    for key, value in metadata.items():
        if len(key) > 64:
            raise bad_request(f"Invalid 'metadata': key {key[:20]!r}... is longer than 64 characters.",
                              "metadata")
        if not isinstance(value, str):
            raise bad_request(f"Invalid type for 'metadata.{key}': expected a string.", f"metadata.{key}",
                              "invalid_type")
        if len(value) > 512:
            raise bad_request(f"Invalid 'metadata.{key}': longer than 512 characters.", f"metadata.{key}")
