"""Estimates: what a batch will cost, from the tokens of its input and the price table.

`cost_usd_min` is the input alone (every request answered with nothing), `cost_usd_max`
adds every request's output bound. Either is None when it cannot be known: no price for
the model, or (max only) a request without an output bound. `estimate` and `estimate_file`
are pure; `estimate_input` and `estimate_desired` read the input file when the token cache
does not know it.

An estimate is of the requests an action sends: a plan's create or replace sends a spec's
whole input (`estimate_desired`); an action that sends part of one (a shard, a retry) is
estimated from that part and can be summed (`combine`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from .errors import InputError
from .prices import PriceTable
from .tokens import COUNTED_ENDPOINTS, FileTokens, InputTokens, TokenCache

if TYPE_CHECKING:
    from .desired import Desired


class Estimate(BaseModel):
    """The cost of one model's requests in one batch (the JSON plan's `estimate`).

    `lower_bound` is True when some input (images, tools, ...) was not counted, so the
    input tokens and both costs are at least what they say.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    requests: int
    input_tokens: int
    output_tokens_max: int | None
    cost_usd_min: float | None
    cost_usd_max: float | None
    lower_bound: bool


def estimate(tokens: InputTokens, prices: PriceTable) -> Estimate:
    price = prices.price(tokens.model)
    cost_min = cost_max = None
    if price is not None:
        cost_min = price.cost(tokens.input_tokens)
        if tokens.output_tokens_max is not None:
            cost_max = price.cost(tokens.input_tokens, tokens.output_tokens_max)
    return Estimate(model=tokens.model, requests=tokens.requests, input_tokens=tokens.input_tokens,
                    output_tokens_max=tokens.output_tokens_max, cost_usd_min=cost_min, cost_usd_max=cost_max,
                    lower_bound=tokens.lower_bound)


def estimate_file(tokens: FileTokens, prices: PriceTable) -> tuple[Estimate, ...]:
    """One Estimate per model of the file, sorted by model (a valid batch has exactly one)."""
    return tuple(estimate(model, prices) for model in tokens.models)


def estimate_input(path: Path, endpoint: str, cache: TokenCache, prices: PriceTable, *,
                   sha256: str | None = None, default_max_output: int | None = None,
                   byte_range: tuple[int, int] | None = None) -> tuple[Estimate, ...] | None:
    """The estimates of one local input file (or of its bytes [start, end): a shard), counted
    through the cache; None for an endpoint whose requests are not counted (moderations,
    images, videos). OSError is the caller's."""
    if endpoint not in COUNTED_ENDPOINTS:
        return None
    tokens = cache.count(path, endpoint, sha256=sha256, default_max_output=default_max_output,
                         byte_range=byte_range)
    return estimate_file(tokens, prices)


def estimate_desired(want: Desired, root: Path, cache: TokenCache, prices: PriceTable,
                     default_max_output: int | None = None) -> Estimate | None:
    """The estimate of a batch made from a spec's input (a shard's lines only: each shard is
    counted once, under its own hash); None when batchplan cannot count it (an uploaded file
    named by input_file_id, or an endpoint whose requests it does not count)."""
    if want.input is None:
        return None
    try:
        found = estimate_input(root / want.input, want.endpoint, cache, prices, sha256=want.input_sha256,
                               default_max_output=default_max_output,
                               byte_range=want.upload_range() if want.shard else None)
    except OSError as exc:  # validated moments ago: it was removed or locked since
        raise InputError(f"{want.input}: cannot read it to count its tokens: {exc.strerror or exc}") from exc
    return combine(found) if found else None


def _sum(values: Iterable[float | int | None]) -> float | int | None:
    """The sum, or None when any value is unknown."""
    total: float | int = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def combine(estimates: Iterable[Estimate]) -> Estimate:
    """One estimate for several sets of requests (models of one file, shards of a batch)."""
    parts = list(estimates)
    if len(parts) == 1:
        return parts[0]
    costs = [_sum(p.cost_usd_min for p in parts), _sum(p.cost_usd_max for p in parts)]
    return Estimate(model=", ".join(sorted({p.model for p in parts})), requests=sum(p.requests for p in parts),
                    input_tokens=sum(p.input_tokens for p in parts),
                    output_tokens_max=_sum(p.output_tokens_max for p in parts),
                    cost_usd_min=None if costs[0] is None else round(costs[0], 6),
                    cost_usd_max=None if costs[1] is None else round(costs[1], 6),
                    lower_bound=any(p.lower_bound for p in parts))


def cost_range(estimates: Iterable[Estimate | None]) -> tuple[float | None, float | None]:
    """(min, max) USD of several actions; either is None when any action's is unknown."""
    found = list(estimates)
    if any(e is None for e in found):
        return None, None
    low, high = _sum(e.cost_usd_min for e in found), _sum(e.cost_usd_max for e in found)
    return (None if low is None else round(low, 6)), (None if high is None else round(high, 6))


def usd(amount: float | None) -> str:
    """$1,234.50 from a dollar up; below, three significant digits ($0.426, $0.0121, $0.000155),
    so that the small batches of a first try do not all read $0.00."""
    if amount is None:
        return "?"
    if amount == 0 or amount >= 1:
        return f"${amount:,.2f}"
    decimals = 2 - math.floor(math.log10(amount))
    digits = f"{amount:.{decimals}f}".rstrip("0")
    return "$" + digits.ljust(max(len(digits), 4), "0")  # at least cents: $0.30, not $0.3


def usd_range(low: float | None, high: float | None) -> str:
    return "unknown" if low is None and high is None else f"{usd(low)} – {usd(high)}"


def unknown_cost(want: Desired | None, found: Estimate | None) -> str | None:
    """Why the most a batch may cost is unknown, in a phrase that says what to do; None when known."""
    if found is None:
        if want is not None and want.input_file_id:
            return f"its input is the uploaded file {want.input_file_id}, whose requests batchplan cannot read"
        return f"batchplan does not count requests to {want.endpoint if want else 'this endpoint'}"
    if found.cost_usd_min is None:
        return f"model {found.model!r} has no price; add it under prices: in batchplan.yaml"
    if found.cost_usd_max is None:
        return ("some requests set no max_tokens, max_completion_tokens or max_output_tokens; set one, or "
                "default_max_output_tokens in batchplan.yaml")
    return None
