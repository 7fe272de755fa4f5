"""Enqueued-token limits: a batch that would take its model over the limit fails, as the real API fails it.

The real Batch API caps, per model and organization, the input tokens of the batches in
flight. A batch created over the cap is accepted, then fails in its validating step with
one `errors.data` entry of code `token_limit_exceeded`. The sandbox does the same when
`Emulator(enqueued_token_limits={model: tokens})` names the batch's model: when the batch
would move to `in_progress`, the tokens of the model's batches `in_progress` or
`finalizing` plus its own must stay within the limit. Tokens are counted as batchplan
counts them (reconciler/tokens.py), so a client that schedules with the same counts never
sees this failure unless someone else used the capacity.

`limits_from_env` reads the limits `--sandbox` runs use from BATCHPLAN_SANDBOX_LIMITS
(`gpt-4o-mini=2000000,gpt-4o=500000`), and `parse_limits` the same `MODEL=N` items from
`sandbox serve --enqueued-token-limit`.

`timeline` reads back, from the world, when each counted batch held its tokens, and
`peak_in_flight` the most any model ever held at once: what a test asserts stays within
the limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.tokens import COUNTED_ENDPOINTS, count_file

CODE = "token_limit_exceeded"
LIMITS_ENV = "BATCHPLAN_SANDBOX_LIMITS"
ORGANIZATION = "org-batchplansandbox"
HOLDING = ("in_progress", "finalizing")  # the statuses whose tokens count against the limit


def parse_limits(items: Iterable[str], source: str) -> dict[str, int]:
    """`MODEL=N` items as {model: N}; ConfigError naming `source` and the item when one is not that."""
    limits: dict[str, int] = {}
    for item in items:
        model, _, count = item.strip().rpartition("=")
        if not model.strip() or not count.strip().isdigit() or int(count) <= 0:
            raise ConfigError(f"{source}: {item.strip()!r} is not MODEL=TOKENS with a whole number of tokens above "
                              "0 (e.g. gpt-4o-mini=2000000)")
        limits[model.strip()] = int(count)
    return limits


def limits_from_env() -> dict[str, int]:
    """The enqueued-token limits BATCHPLAN_SANDBOX_LIMITS sets (comma-separated MODEL=N); none when unset."""
    value = os.environ.get(LIMITS_ENV, "")
    return parse_limits([item for item in value.split(",") if item.strip()], LIMITS_ENV)


def batch_tokens(path: Path, endpoint: str, model: str) -> int:
    """The input tokens of `model` in a batch's input file; 0 for an endpoint batchplan does not count."""
    if endpoint not in COUNTED_ENDPOINTS:
        return 0
    return sum(m.input_tokens for m in count_file(path, endpoint).models if m.model == model)


def refusal(batches: Iterable[dict], batch: dict, tokens: int, limit: int) -> dict | None:
    """The `errors.data` entry that fails `batch` (of `tokens` tokens) over `limit`, or None if it fits."""
    held = sum(other.get("enqueued_tokens") or 0 for other in batches
               if other is not batch and other["model"] == batch["model"] and other["status"] in HOLDING)
    if held + tokens <= limit:
        return None
    return {"code": CODE, "line": None, "param": None,
            "message": f"Enqueued token limit reached for {batch['model']} in organization {ORGANIZATION}. "
                       f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress batches "
                       "have been completed."}


@dataclass(frozen=True)
class Occupancy:
    """A batch's tokens of its model held from `start` (in_progress) to `end` (None: still held)."""

    batch_id: str
    model: str
    tokens: int
    start: float
    end: float | None


def timeline(batches: Iterable[dict]) -> list[Occupancy]:
    """When each batch whose tokens were counted held them, in the order they started."""
    held = [Occupancy(b["id"], b["model"], b["enqueued_tokens"], b["in_progress_at"], _released_at(b))
            for b in batches if b.get("enqueued_tokens") is not None and b["in_progress_at"] is not None]
    return sorted(held, key=lambda o: (o.start, o.batch_id))


def _released_at(batch: dict) -> float | None:
    """When a batch left in_progress/finalizing: cancelled, expired or completed; None while it holds."""
    ends = [batch[key] for key in ("cancelling_at", "expired_at", "completed_at") if batch[key] is not None]
    return min(ends, default=None)


def peak_in_flight(occupancies: Iterable[Occupancy]) -> dict[str, int]:
    """The most tokens each model ever held at once. A batch ending at t frees its tokens
    before one starting at t takes them, as the emulator replays them."""
    events = sorted((when, start, o.model, o.tokens) for o in occupancies
                    for when, start in ((o.start, 1), (o.end, 0)) if when is not None)
    held: dict[str, int] = {}
    peak: dict[str, int] = {}
    for _, start, model, tokens in events:
        held[model] = held.get(model, 0) + (tokens if start else -tokens)
        peak[model] = max(peak.get(model, 0), held[model])
    return peak
