"""Prices and estimates: the built-in table, overrides from batchplan.yaml, cost ranges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from reconciler.errors import ConfigError
from reconciler.estimate import Estimate, estimate, estimate_input
from reconciler.prices import BATCH_PRICES, PRICES_AS_OF, ModelPrice, PriceTable, parse_overrides
from reconciler.tokens import InputTokens, TokenCache

CHECKOUT = Path(__file__).resolve().parent.parent


def tokens(model: str = "gpt-4o-mini", input_tokens: int = 2_000_000, output_max: int | None = 500_000,
           uncounted: tuple[str, ...] = ()) -> InputTokens:
    return InputTokens(model=model, encoding="o200k_base", known_model=True, requests=1000,
                       input_tokens=input_tokens, output_tokens_max=output_max, uncounted=uncounted)


def test_built_in_prices_and_snapshots():
    table = PriceTable()
    assert table.price("gpt-4o-mini") == ModelPrice(input=0.075, output=0.30)
    assert table.price("gpt-4o-2024-08-06") == table.price("gpt-4o")  # a snapshot costs what its model costs
    assert table.price("gpt-4o-2024-05-13") == ModelPrice(input=2.50, output=7.50)  # unless it is priced itself
    assert table.price("gpt-5-mini-2025-08-07").cached_input == 0.0125
    assert table.price("gpt-4o-mini-tts") is None and table.price("acme-llm-7") is None


def test_the_table_is_batch_prices():
    # Batch bills half the standard price: every output price is at least its input price, and every
    # cached price below its input price; spot-check three against the standard prices halved.
    assert all(p.cached_input is None or p.cached_input < p.input for p in BATCH_PRICES.values())
    standard = {"gpt-4o": (2.50, 10.00), "gpt-4.1": (2.00, 8.00), "text-embedding-3-small": (0.02, 0.0)}
    for model, (inp, out) in standard.items():
        assert (BATCH_PRICES[model].input, BATCH_PRICES[model].output) == (inp / 2, out / 2)


def test_overrides_from_batchplan_yaml_replace_and_add_models():
    config = yaml.safe_load("prices:\n"
                            "  gpt-4o-mini: {input: 0.06, output: 0.25}\n"
                            "  gpt-4o: {input: 1.0, output: 4.0, cached_input: 0.5}\n"
                            "  acme-llm-7: {input: 1, output: 2}\n")
    table = PriceTable(parse_overrides(config["prices"]))
    assert table.price("gpt-4o-mini") == ModelPrice(input=0.06, output=0.25)
    assert table.price("gpt-4o-2024-08-06") == ModelPrice(input=1.0, output=4.0, cached_input=0.5)
    assert table.price("gpt-4o-2024-05-13") == ModelPrice(input=2.50, output=7.50)  # its own built-in row wins
    assert table.price("acme-llm-7") == ModelPrice(input=1.0, output=2.0)
    assert table.price("gpt-5") == BATCH_PRICES["gpt-5"]
    assert parse_overrides(None) == {}


@pytest.mark.parametrize("prices, message", [
    ({"gpt-4o": {"input": 1}}, "batchplan.yaml: prices.gpt-4o.output: Field required; give USD per 1M tokens as a "
                               "batch is billed, e.g. {input: 0.075, output: 0.30}"),
    ({"gpt-4o": {"input": -1, "output": 2}}, "batchplan.yaml: prices.gpt-4o.input: Input should be greater than or "
                                             "equal to 0; give USD per 1M tokens as a batch is billed, e.g. "
                                             "{input: 0.075, output: 0.30}"),
    ({"gpt-4o": {"input": 1, "output": 2, "cache": 1}}, "batchplan.yaml: prices.gpt-4o.cache: Extra inputs are not "
                                                        "permitted; give USD per 1M tokens as a batch is billed, "
                                                        "e.g. {input: 0.075, output: 0.30}"),
    ([1, 2], "batchplan.yaml: prices: must be a mapping of model names to {input: USD, output: USD} per 1M tokens"),
])
def test_bad_overrides_name_the_model_and_field(prices, message):
    with pytest.raises(ConfigError) as caught:
        parse_overrides(prices)
    assert str(caught.value) == message


def test_an_estimate_is_a_range_from_input_alone_to_input_plus_the_output_bound():
    got = estimate(tokens(), PriceTable())
    # 2M input tokens at $0.075/M; plus 0.5M output tokens at $0.30/M
    assert json.dumps(got.model_dump(), sort_keys=True) == (
        '{"cost_usd_max": 0.3, "cost_usd_min": 0.15, "input_tokens": 2000000, "lower_bound": false, '
        '"model": "gpt-4o-mini", "output_tokens_max": 500000, "requests": 1000}')


def test_unknown_prices_and_bounds_give_null_costs():
    assert estimate(tokens(output_max=None), PriceTable()) == Estimate(
        model="gpt-4o-mini", requests=1000, input_tokens=2_000_000, output_tokens_max=None, cost_usd_min=0.15,
        cost_usd_max=None, lower_bound=False)
    unpriced = estimate(tokens(model="acme-llm-7", uncounted=("images",)), PriceTable())
    assert (unpriced.cost_usd_min, unpriced.cost_usd_max, unpriced.lower_bound) == (None, None, True)


def test_estimate_input_counts_through_the_cache(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "text-embedding-3-small", "input": [1] * 1000}}) + "\n")
    cache = TokenCache(tmp_path / "tokens.json")
    [got] = estimate_input(path, "/v1/embeddings", cache, PriceTable())
    assert (got.input_tokens, got.output_tokens_max, got.cost_usd_min, got.cost_usd_max) == (1000, 0, 1e-05, 1e-05)
    assert estimate_input(path, "/v1/moderations", cache, PriceTable()) is None


def test_the_readme_gives_the_tables_date():
    readme = (CHECKOUT / "README.md").read_text()
    assert re.search(rf"\b{PRICES_AS_OF}\b", readme), "README's Cost section must say how old the price table is"
