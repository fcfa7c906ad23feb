"""What a call costs: prices per token, the bundled price table, and estimates.

Cost arithmetic is Decimal, rounded up once per call to whole micro-dollars (the
store's unit), so sums never drift and a call is never charged less than it cost.
"""

from __future__ import annotations

import json
import math
import re
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extproc.usage import Usage

__all__ = [
    "MICROS_PER_DOLLAR",
    "Prices",
    "bundled_prices",
    "cost_micros",
    "estimate_prompt_tokens",
    "requested_output_tokens",
]

MICROS_PER_DOLLAR = Decimal(1_000_000)
_DATED = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


class Prices(BaseModel):
    """Prices in dollars per token (LiteLLM's price-table field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_cost_per_token: Decimal = Field(default=Decimal(0), ge=0)
    output_cost_per_token: Decimal = Field(default=Decimal(0), ge=0)
    #: Cache reads; the input price when unset.
    cache_read_input_token_cost: Decimal | None = Field(default=None, ge=0)
    #: Cache writes; the input price when unset.
    cache_creation_input_token_cost: Decimal | None = Field(default=None, ge=0)

    @property
    def is_zero(self) -> bool:
        return not (
            self.input_cost_per_token
            or self.output_cost_per_token
            or self.cache_read_input_token_cost
            or self.cache_creation_input_token_cost
        )


def cost_micros(prices: Prices, usage: Usage) -> int:
    """The cost of ``usage`` in whole micro-dollars, rounded up."""
    read = prices.cache_read_input_token_cost
    write = prices.cache_creation_input_token_cost
    dollars = (
        usage.input_tokens * prices.input_cost_per_token
        + usage.output_tokens * prices.output_cost_per_token
        + usage.cached_input_tokens * (prices.input_cost_per_token if read is None else read)
        + usage.cache_creation_tokens * (prices.input_cost_per_token if write is None else write)
    )
    return int((dollars * MICROS_PER_DOLLAR).to_integral_value(rounding=ROUND_CEILING))


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    text = resources.files("extproc").joinpath("data/prices.json").read_text(encoding="utf-8")
    models: dict[str, dict[str, Any]] = json.loads(text)["models"]
    return models


def bundled_entry(model: str) -> dict[str, Any] | None:
    """The bundled table's entry for an upstream model name.

    Tried in order: the name, without a ``provider/`` prefix, and without a date
    suffix (``gpt-4o-2024-08-06`` → ``gpt-4o``).
    """
    table = _table()
    name = model.split("/", 1)[1] if "/" in model else model
    for candidate in (model, name):
        if candidate in table:
            return table[candidate]
    match = _DATED.match(name)
    if match and match.group("base") in table:
        return table[match.group("base")]
    return None


def bundled_prices(model: str) -> Prices | None:
    """Prices from the bundled table, or None for a model it does not list."""
    entry = bundled_entry(model)
    if entry is None:
        return None
    fields = {k: Decimal(entry[k]) for k in Prices.model_fields if k in entry}
    return Prices(**fields)


def bundled_context_window(model: str) -> int | None:
    """The bundled table's ``max_input_tokens`` for a model, if listed."""
    entry = bundled_entry(model)
    value = entry.get("max_input_tokens") if entry else None
    return value if isinstance(value, int) else None


def estimate_prompt_tokens(raw_body: bytes) -> int:
    """A deliberately high estimate of the input tokens: a token per 4 bytes of body.

    Reservations must not undershoot; the response settles to the real count.
    """
    return max(1, math.ceil(len(raw_body) / 4))


def requested_output_tokens(body: dict[str, Any], default: int) -> int:
    """The output the caller allows (``max_completion_tokens``, ``max_tokens``,
    ``max_output_tokens``), else ``default``."""
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default
