"""The sandbox's indexes (world_index.py) answer exactly what a walk of the whole world answers.

Issue 19, item 3: a request no longer walks every batch. Two checks: a list page deep in
50,000 batches, through HTTP on 127.0.0.1, against the world sorted by hand; and random
histories (uploads, creates, cancels, expiries, deletes, time passing, enqueued-token limits)
played on two emulators side by side, one keeping its indexes and one made to rebuild them
from the whole world before every call (which is the walk the emulator did before), with
every answer compared.
"""

from __future__ import annotations

import json
import re
import secrets

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.sandbox import Emulator, EmulatorError, Timing

CHAT = "/v1/chat/completions"
GENERATED_ID = re.compile(r"file-[0-9a-f]{24}|batch_[0-9a-f]{32}")
AUTH = {"Authorization": "Bearer test"}


def chat_file(n: int, model: str = "gpt-4o-mini") -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {
        "model": model, "messages": [{"role": "user", "content": f"question {i}"}]}}).encode() + b"\n"
        for i in range(n))


def seed_batches(emulator: Emulator, count: int) -> list[str]:
    """`count` batches written straight into the world (as bench_find does), oldest first."""
    file_id = emulator.upload_bytes(chat_file(1), "in.jsonl", "batch")["id"]
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    ids = [f"batch_{secrets.token_hex(16)}" for _ in range(count)]
    with emulator.store.transaction() as world:
        for batch_id in ids:
            world["batches"][batch_id] = emulator._new_batch(batch_id, body, emulator.clock())  # noqa: SLF001
    return ids


def test_a_page_deep_in_50000_batches_starts_right_after_its_cursor(emulator_server_factory):
    emulator = Emulator(timing=Timing.uniform(3600))
    server = emulator_server_factory(emulator=emulator)
    oldest_first = seed_batches(emulator, 50_000)
    newest_first = oldest_first[::-1]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        for position in (0, 1, 17_333, 49_899, 49_900, 49_998, 49_999):
            page = client.get("/batches", params={"after": newest_first[position], "limit": 100}).json()
            expected = newest_first[position + 1:position + 101]
            assert [b["id"] for b in page["data"]] == expected
            assert page["has_more"] == (position + 101 < 50_000)
            assert (page["first_id"], page["last_id"]) == ((expected[0], expected[-1]) if expected else (None, None))
        gone = client.get("/batches", params={"after": "batch_deleted", "limit": 100}).json()
        assert gone["data"] == [] and gone["has_more"] is False
        made = client.post("/batches", json={"input_file_id": emulator.list_files()["data"][0]["id"],
                                             "endpoint": CHAT, "completion_window": "24h"}).json()
        first = client.get("/batches", params={"limit": 2}).json()
        assert [b["id"] for b in first["data"]] == [made["id"], newest_first[0]] and first["has_more"]
    emulator.close()


# --- random histories: indexes kept vs the whole world walked ---

class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Twins:
    """Two emulators on one clock: `kept` keeps its indexes, `walked` rebuilds them before every call."""

    def __init__(self, clock: Clock):
        kwargs = {"timing": Timing(0.5, 1.0, 0.5, 0.5), "clock": clock, "enqueued_token_limits": {"gpt-4o": 45}}
        self.kept, self.walked = Emulator(**kwargs), Emulator(**kwargs)
        self.ids: list[tuple[str, str]] = []  # (kept's id, walked's id) of every file and batch made
        self.kinds: dict[str, list[str]] = {"file": [], "batch": []}  # the names of each kind
        self.names: dict[str, str] = {}  # an id of either twin -> a name both share

    def call(self, method: str, *args: object, remember: bool = False, **kwargs: object) -> object:
        """`method` on both twins with the same (named) arguments; their answers must be the same."""
        answers = [self._answer(twin, side, method, args, kwargs) for side, twin in enumerate((self.kept,
                                                                                               self.walked))]
        if remember and all(isinstance(answer, dict) for answer in answers):
            self.kinds[answers[0]["object"]].append(self.remember(answers[0]["id"], answers[1]["id"]))
        named = [self._named(answer) for answer in answers]
        assert named[0] == named[1], method
        return named[0]

    def _answer(self, twin: Emulator, side: int, method: str, args: tuple, kwargs: dict) -> object:
        if twin is self.walked:
            twin.store.index = None  # rebuilt from the whole world: the walk the emulator did before
        args = tuple(self._real(arg, side) for arg in args)
        try:
            return getattr(twin, method)(*args, **{k: self._real(v, side) for k, v in kwargs.items()})
        except EmulatorError as exc:
            message = exc.message
            for real in self.ids:
                message = message.replace(real[side], "ID")
            return "error", exc.status, message

    def remember(self, kept_id: str, walked_id: str) -> str:
        name = f"id{len(self.ids)}"
        self.ids.append((kept_id, walked_id))
        self.names[kept_id] = self.names[walked_id] = name
        return name

    def _real(self, value: object, side: int) -> object:
        if isinstance(value, dict):
            return {k: self._real(v, side) for k, v in value.items()}
        if isinstance(value, str) and value.startswith("id") and value[2:].isdigit():
            return self.ids[int(value[2:])][side]
        return value

    def _named(self, value: object) -> object:
        """The answer with every id replaced by its shared name, so the twins' answers compare."""
        if isinstance(value, dict):
            return {k: self._named(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._named(v) for v in value]
        if isinstance(value, str):  # a result file's id is no one's: it stands for any
            return GENERATED_ID.sub(lambda found: self.names.get(found[0], "a-result-file"), value)
        return value


OPERATIONS = st.lists(st.tuples(
    st.sampled_from(["upload", "upload", "upload_other", "create", "create", "create", "cancel", "expire",
                     "delete", "expire_file", "wait", "wait", "wait", "list_batches", "list_files"]),
    st.integers(0, 30), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0, 1.5])), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
@example([("upload", 0, 0), ("create", 0, 0), ("wait", 0, 0.25), ("cancel", 0, 0), ("wait", 0, 1.0)])
@example([("upload", 1, 0), ("upload", 5, 0), ("create", 0, 0), ("wait", 0, 0.7), ("create", 1, 0), ("wait", 0, 0.7)])
@example([("upload", 0, 0), ("expire_file", 0, 0), ("list_files", 1, 0)])
def test_the_indexes_answer_as_the_whole_world_walked(operations):
    clock = Clock()
    twins = Twins(clock)
    try:
        for operation, pick, seconds in operations:
            play(twins, clock, operation, pick, seconds)
        clock.now += 5.0  # every batch runs to its end
        for after in [None, *(f"id{i}" for i in range(len(twins.ids)))]:
            twins.call("list_batches", after=after, limit=3)
            twins.call("list_files", after=after, limit=2, order="asc")
    finally:
        twins.kept.close()
        twins.walked.close()


def play(twins: Twins, clock: Clock, operation: str, pick: int, seconds: float) -> None:
    """One step of a history; `pick` chooses the file or batch it acts on (of the kind it takes)."""
    kind = "batch" if operation in ("cancel", "expire", "list_batches") else "file"
    some = twins.kinds[kind][pick % len(twins.kinds[kind])] if twins.kinds[kind] else None
    if operation in ("upload", "upload_other"):
        content, purpose = (chat_file(1 + pick % 3, "gpt-4o" if pick % 2 else "gpt-4o-mini"), "batch") \
            if operation == "upload" else (b"x", "user_data")
        expiry = {"anchor": "created_at", "seconds": 3600} if pick % 4 == 0 else None
        twins.call("upload_bytes", content, "in.jsonl", purpose, expiry, remember=True)
    elif operation == "wait":
        clock.now += seconds
        twins.call("list_batches", limit=100)
    elif operation == "list_batches":
        twins.call("list_batches", after=some, limit=1 + pick % 5)
    elif operation == "list_files":
        twins.call("list_files", purpose=("batch", None, "user_data")[pick % 3], after=some, limit=1 + pick % 4,
                   order=("desc", "asc")[pick % 2])
    elif some is not None and operation == "create":
        twins.call("create_batch", {"input_file_id": some, "endpoint": CHAT, "completion_window": "24h"},
                   remember=True)
    elif some is not None:
        method = {"cancel": "cancel_batch", "expire": "expire_batch", "delete": "delete_file",
                  "expire_file": "expire_file"}[operation]
        twins.call(method, some)
