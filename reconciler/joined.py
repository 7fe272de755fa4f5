"""`download --join`: each input request next to its result, by custom_id, in input order.

The Batch API writes results out of input order, successes and failures to two files. An
eval script wants one line per request: `joined.jsonl` holds, for each input line,
`{"custom_id", "request", "response", "error"}`: the request's body, the result line's
`response` (status_code, request_id, body) and `error`, both null when the batch produced no
result for it (it expired or was cancelled first). A spec split into shards is joined part by
part (`JoinPart`: a shard's lines of the input and its batch's result files) into one file, in
input order. The result lines of one part are held in memory by custom_id (a batch has at most
50,000); the input is streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from .fsutil import atomic_writer
from .inputs import load_line
from .shards import Shard, open_lines

JOINED = "joined.jsonl"


@dataclass(frozen=True)
class Joined:
    """What a join wrote: one line per request of the input, `without_result` of them with neither
    an output nor an error line."""

    requests: int
    without_result: int


@dataclass(frozen=True)
class JoinPart:
    """One batch's input lines (the whole file, or a shard's bytes, checked against its sha256
    as they are read) and that batch's result files (output and errors, those that exist)."""

    input_path: Path
    shard: Shard | None
    result_files: list[Path]

    def open_input(self) -> BinaryIO:
        if self.shard is None:
            return open_lines(self.input_path)
        return open_lines(self.input_path, (self.shard.start, self.shard.end), self.shard.sha256 or None)


def _results_by_custom_id(files: list[Path]) -> dict[str, dict]:
    answers: dict[str, dict] = {}
    for path in files:
        with path.open("rb") as fh:
            for raw in fh:
                if raw.strip():
                    line = orjson.loads(raw)
                    answers[line.get("custom_id")] = line
    return answers


def write_joined(parts: list[JoinPart], dest: Path) -> Joined:
    """Write `dest` from each part's input lines and results, part after part, atomically.

    A shard whose bytes changed since its batch was made raises StalePlanError and `dest` is
    left as it was."""
    requests = missing = 0
    with atomic_writer(dest) as out:
        for part in parts:
            answers = _results_by_custom_id(part.result_files)
            with part.open_input() as src:
                for raw in src:
                    if not raw.strip():
                        continue
                    request = load_line(raw)
                    answer = answers.get(request.get("custom_id"), {})
                    requests += 1
                    missing += not answer
                    out.write(orjson.dumps({"custom_id": request.get("custom_id"), "request": request.get("body"),
                                            "response": answer.get("response"), "error": answer.get("error")},
                                           option=orjson.OPT_SORT_KEYS) + b"\n")
    return Joined(requests, missing)
