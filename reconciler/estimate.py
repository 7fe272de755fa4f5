"""Estimates: what a batch will cost, from the tokens of its input and the price table.

`cost_usd_min` is the input alone (every request answered with nothing), `cost_usd_max`
adds every request's output bound. Either is None when it cannot be known: no price for
the model, or (max only) a request without an output bound. `estimate` and `estimate_file`
are pure; `estimate_input` reads the input file when the token cache does not know it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .prices import PriceTable
from .tokens import COUNTED_ENDPOINTS, FileTokens, InputTokens, TokenCache


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
                   sha256: str | None = None, default_max_output: int | None = None) -> tuple[Estimate, ...] | None:
    """The estimates of one local input file, counted through the cache; None for an endpoint
    whose requests are not counted (moderations, images, videos). OSError is the caller's."""
    if endpoint not in COUNTED_ENDPOINTS:
        return None
    tokens = cache.count(path, endpoint, sha256=sha256, default_max_output=default_max_output)
    return estimate_file(tokens, prices)
