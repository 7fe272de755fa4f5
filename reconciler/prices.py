"""Prices: what a batch is billed per 1M tokens, built in and overridden by `batchplan.yaml`.

The built-in table is dated (PRICES_AS_OF): prices change, so `prices:` in batchplan.yaml
overrides a model or adds one, with the values a batch is billed (not the standard ones):

    prices:
      gpt-4o-mini: {input: 0.075, output: 0.30}
      my-fine-tune: {input: 0.15, output: 0.60, cached_input: 0.075}

A dated snapshot (`gpt-4o-2024-08-06`) costs what its model (`gpt-4o`) costs unless the
table or an override names the snapshot itself. A model nobody priced has no price: its
cost is unknown, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

# Batch prices (50 % of the standard ones) from the LiteLLM price list
# (model_prices_and_context_window.json, fields *_batches) as packaged in tokencostauto 0.1.717
# on this date; the gpt-4o, gpt-4.1, gpt-5 and o-series rows agree with OpenAI's pricing page.
PRICES_AS_OF = "2026-10-21"
_SNAPSHOT_DATE = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class ModelPrice(BaseModel):
    """USD per 1M tokens as a batch is billed; `cached_input` only where the API discounts it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)

    def cost(self, input_tokens: int, output_tokens: int = 0) -> float:
        """USD for these tokens, rounded to a millionth of a dollar (stable in JSON)."""
        return round((input_tokens * self.input + output_tokens * self.output) / 1_000_000, 6)


def _price(input: float, output: float, cached_input: float | None = None) -> ModelPrice:
    return ModelPrice(input=input, output=output, cached_input=cached_input)


BATCH_PRICES: dict[str, ModelPrice] = {
    # the gpt-5 families: batch also discounts cached input
    "gpt-5": _price(0.625, 5.00, 0.0625),
    "gpt-5-mini": _price(0.125, 1.00, 0.0125),
    "gpt-5-nano": _price(0.025, 0.20, 0.0025),
    "gpt-5-pro": _price(7.50, 60.00),
    "gpt-5.1": _price(0.625, 5.00, 0.0625),
    "gpt-5.2": _price(0.875, 7.00, 0.0875),
    "gpt-5.2-pro": _price(10.50, 84.00),
    "gpt-5.4": _price(1.25, 7.50, 0.125),
    "gpt-5.4-mini": _price(0.375, 2.25, 0.0375),
    "gpt-5.4-nano": _price(0.10, 0.625, 0.01),
    "gpt-5.4-pro": _price(15.00, 90.00),
    "gpt-5.5": _price(2.50, 15.00, 0.25),
    "gpt-5.5-pro": _price(15.00, 90.00),
    "gpt-5.6": _price(2.00, 10.00, 0.20),
    "gpt-5.6-luna": _price(0.10, 0.60, 0.01),
    "gpt-5.6-sol": _price(2.00, 10.00, 0.20),
    "gpt-5.6-terra": _price(1.00, 6.00, 0.10),
    "gpt-6-astra": _price(5.00, 25.00, 0.50),
    "gpt-6-luna": _price(0.05, 0.25, 0.005),
    "gpt-6-sol": _price(1.00, 5.00, 0.10),
    "gpt-6.1-sol": _price(1.00, 5.00, 0.05),
    # gpt-4.1, gpt-4o, gpt-4.5
    "gpt-4.1": _price(1.00, 4.00),
    "gpt-4.1-mini": _price(0.20, 0.80),
    "gpt-4.1-nano": _price(0.05, 0.20),
    "gpt-4o": _price(1.25, 5.00),
    "gpt-4o-2024-05-13": _price(2.50, 7.50),
    "gpt-4o-mini": _price(0.075, 0.30),
    "gpt-4.5-preview": _price(37.50, 75.00),
    # reasoning
    "o1": _price(7.50, 30.00),
    "o1-pro": _price(75.00, 300.00),
    "o3": _price(1.00, 4.00),
    "o3-mini": _price(0.55, 2.20),
    "o3-pro": _price(10.00, 40.00),
    "o4-mini": _price(0.55, 2.20),
    # older chat and completion models (the undated names are today's snapshots)
    "gpt-4": _price(15.00, 30.00),
    "gpt-4-0613": _price(15.00, 30.00),
    "gpt-4-turbo": _price(5.00, 15.00),
    "gpt-3.5-turbo": _price(0.25, 0.75),
    "gpt-3.5-turbo-0125": _price(0.25, 0.75),
    "gpt-3.5-turbo-1106": _price(1.00, 2.00),
    "davinci-002": _price(1.00, 1.00),
    "babbage-002": _price(0.20, 0.20),
    # embeddings: input only
    "text-embedding-3-small": _price(0.01, 0.0),
    "text-embedding-3-large": _price(0.065, 0.0),
    "text-embedding-ada-002": _price(0.05, 0.0),
}


class PriceTable:
    """The built-in batch prices with a project's overrides on top."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None):
        self.overrides = dict(overrides or {})

    def price(self, model: str) -> ModelPrice | None:
        """The price of a model or, failing that, of the model a dated snapshot belongs to."""
        for name in dict.fromkeys([model, _SNAPSHOT_DATE.sub("", model)]):
            found = self.overrides.get(name) or BATCH_PRICES.get(name)
            if found is not None:
                return found
        return None


def parse_overrides(data: object, source: str = "batchplan.yaml") -> dict[str, ModelPrice]:
    """The `prices:` mapping of batchplan.yaml, checked; ConfigError names the model and field."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: prices: must be a mapping of model names to "
                          "{input: USD, output: USD} per 1M tokens")
    prices = {}
    for model, value in data.items():
        try:
            prices[str(model)] = ModelPrice.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, ("prices", model, *err["loc"])))
            raise ConfigError(f"{source}: {where}: {err['msg']}; give USD per 1M tokens as a batch is billed, "
                              "e.g. {input: 0.075, output: 0.30}") from exc
    return prices
