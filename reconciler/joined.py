"""`download --join`: each input request next to its result, by custom_id, in input order.

The Batch API writes results out of input order, successes and failures to two files. An
eval script wants one line per request: `joined.jsonl` holds, for each input line,
`{"custom_id", "request", "response", "error"}`: the request's body, the result line's
`response` (status_code, request_id, body) and `error`, both null when the batch produced no
result for it (it expired or was cancelled first). The result lines are held in memory by
custom_id (a batch has at most 50,000); the input is streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from .fsutil import atomic_writer

JOINED = "joined.jsonl"


@dataclass(frozen=True)
class Joined:
    requests: int
    without_result: int


def _results_by_custom_id(files: list[Path]) -> dict[str, dict]:
    answers: dict[str, dict] = {}
    for path in files:
        with path.open("rb") as fh:
            for raw in fh:
                if raw.strip():
                    line = orjson.loads(raw)
                    answers[line.get("custom_id")] = line
    return answers


def write_joined(input_path: Path, result_files: list[Path], dest: Path) -> Joined:
    """Write `dest` from the input and the batch's result files (output and errors, those that exist)."""
    answers = _results_by_custom_id(result_files)
    requests = missing = 0
    with input_path.open("rb") as src, atomic_writer(dest) as out:
        for raw in src:
            if not raw.strip():
                continue
            request = orjson.loads(raw)
            answer = answers.get(request.get("custom_id"), {})
            requests += 1
            missing += not answer
            out.write(orjson.dumps({"custom_id": request.get("custom_id"), "request": request.get("body"),
                                    "response": answer.get("response"), "error": answer.get("error")},
                                   option=orjson.OPT_SORT_KEYS) + b"\n")
    return Joined(requests, missing)
