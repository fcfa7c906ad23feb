"""What a call costs: prices per token, the bundled price table, and estimates.

Cost arithmetic is Decimal, rounded up once per call to whole micro-dollars (the
store's unit), so sums never drift and a call is never charged less than it cost
(up to the store's bound of $1,000,000 a call).

What a request asks for is read here too: output tokens per choice, choices (``n``,
``best_of``), the prompts or inputs of a batch. Each is checked (a 400 naming the
parameter) and bounded, so no estimate leaves the store's range.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from extproc.core.errors import InvalidParameterError
from extproc.core.provider_input import ProviderInput, provider_input
from extproc.core.usage import Usage
from extproc.store.base import MAX_AMOUNT_MICROS

__all__ = [
    "CONTEXT_WINDOW_BOUND",
    "MAX_CHOICES",
    "MAX_OUTPUT_TOKENS_BOUND",
    "MICROS_PER_DOLLAR",
    "Estimate",
    "OutputAsk",
    "Prices",
    "bundled_max_output_tokens",
    "bundled_prices",
    "cost_micros",
    "estimate_call",
    "estimate_prompt_tokens",
    "requested_output",
]

#: Output tokens per choice for a deployment whose maximum neither the policy
#: (``max_output_tokens``) nor the bundled table knows: above any public model's.
MAX_OUTPUT_TOKENS_BOUND = 1_000_000
#: The context window assumed for a deployment that names none (the usage clamp).
CONTEXT_WINDOW_BOUND = 2_000_000
#: The most choices a call may ask for (``n``, ``best_of``): OpenAI's cap for ``n``.
MAX_CHOICES = 128

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
    micros = int((dollars * MICROS_PER_DOLLAR).to_integral_value(rounding=ROUND_CEILING))
    # Rule: one call never moves more than the store's bound (an absurd price or count
    # must not take the store out of its exact range).
    return min(micros, MAX_AMOUNT_MICROS)


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


def bundled_max_output_tokens(model: str) -> int | None:
    """The bundled table's ``max_output_tokens`` (per choice) for a model, if listed."""
    entry = bundled_entry(model)
    value = entry.get("max_output_tokens") if entry else None
    return value if isinstance(value, int) else None


def estimate_prompt_tokens(raw_body: bytes) -> int:
    """A deliberately high estimate of the input tokens: a token per 4 bytes of body.

    Reservations must not undershoot; the response settles to the real count.
    """
    return max(1, math.ceil(len(raw_body) / 4))


@dataclass(frozen=True, slots=True)
class OutputAsk:
    """What a request asks the model for, as far as its price goes."""

    #: Output tokens per choice the caller allows; None when it names none (or 0).
    max_tokens: int | None = None
    #: Choices per prompt the provider bills: the larger of ``n`` and ``best_of``.
    choices: int = 1
    #: Prompts (completions) or inputs (embeddings) of a batch, each its own answer.
    batch: int = 1
    #: Input given as token ids, counted one by one (their JSON may be shorter than
    #: four bytes a token).
    token_ids: int = 0
    #: Whether the endpoint produces output tokens at all (embeddings do not).
    output: bool = True
    #: The provider adds input the body does not hold (``provider_input``): the prompt
    #: is reserved at the whole context window.
    remote_input: bool = False
    #: Input tokens of images the provider fetches by URL.
    image_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Estimate:
    """A call's high estimates, and the most tokens of one kind its usage may report."""

    prompt_tokens: int
    output_tokens: int
    #: Larger reported counts are a broken or hostile upstream: clamped to this.
    usage_cap: int


def estimate_call(
    ask: OutputAsk,
    raw_body: bytes,
    *,
    default_max_tokens: int,
    max_output_tokens: int | None,
    context_window: int | None,
) -> Estimate:
    """Estimate a call to a deployment with these limits (its maximum output per
    choice and context window; None where neither the policy nor the table knows).

    Output: the tokens asked for per choice (else ``default_max_tokens``), never more
    than the deployment's maximum (else :data:`MAX_OUTPUT_TOKENS_BOUND`), times the
    choices and the prompts of a batch. The usage cap: per prompt, the context window
    (else :data:`CONTEXT_WINDOW_BOUND`) plus the maximum output of every choice.
    """
    per_choice_max = max_output_tokens or MAX_OUTPUT_TOKENS_BOUND
    per_choice = min(ask.max_tokens or default_max_tokens, per_choice_max) if ask.output else 0
    output = per_choice * ask.choices * ask.batch
    window = context_window or CONTEXT_WINDOW_BOUND
    prompt = max(estimate_prompt_tokens(raw_body), ask.token_ids) + ask.image_tokens
    if ask.remote_input:
        prompt = max(prompt, window)
    most_output = per_choice_max * ask.choices if ask.output else 0
    cap = max(ask.batch * (window + most_output), prompt + output)
    return Estimate(prompt_tokens=prompt, output_tokens=output, usage_cap=cap)


#: Endpoint → (fields naming output tokens per choice, fields naming choices, the
#: field that may hold a batch of prompts or inputs).
_ASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    "chat_completions": (("max_completion_tokens", "max_tokens"), ("n",), None),
    "completions": (("max_tokens",), ("n", "best_of"), "prompt"),
    "embeddings": ((), (), "input"),
    "responses": (("max_output_tokens",), (), None),
    "messages": (("max_tokens",), (), None),
}


def _count_param(body: dict[str, Any], field: str, *, least: int, most: int | None) -> int | None:
    """An integer parameter in ``[least, most]``; None when absent or null."""
    value = body.get(field)
    if value is None:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < least
        or (most is not None and value > most)
    ):
        bound = f"between {least} and {most}" if most is not None else f"at least {least}"
        raise InvalidParameterError(f"'{field}' must be an integer {bound}.", param=field)
    return value


def _batch(value: Any) -> tuple[int, int]:
    """(prompts or inputs, token ids) of a ``prompt``/``input`` value: a string, a list
    of strings, a list of token ids, or a list of token-id lists."""
    if not isinstance(value, list) or not value:
        return 1, 0
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return 1, len(value)  # one prompt given as token ids
    ids = sum(len(v) for v in value if isinstance(v, list))
    return len(value), ids


def requested_output(endpoint: str, body: dict[str, Any], raw: bytes | None = None) -> OutputAsk:
    """The output ``body`` asks for, checked: token counts must be non-negative
    integers, ``n``/``best_of`` integers in ``[1, MAX_CHOICES]`` (null: not given);
    anything else is a 400 naming the parameter."""
    token_fields, choice_fields, batch_field = _ASKS.get(endpoint, ((), (), None))
    asked = [_count_param(body, f, least=0, most=None) for f in token_fields]
    given = [v for v in asked if v]
    choices = [_count_param(body, f, least=1, most=MAX_CHOICES) for f in choice_fields]
    batch, ids = _batch(body.get(batch_field)) if batch_field else (1, 0)
    remote = ProviderInput() if endpoint == "embeddings" else provider_input(body, raw)
    return OutputAsk(
        # several fields (max_tokens beside max_completion_tokens): the larger counts
        max_tokens=max(given) if given else None,
        choices=max([c for c in choices if c is not None], default=1),
        batch=batch,
        token_ids=ids,
        output=endpoint != "embeddings",
        remote_input=remote.unbounded,
        image_tokens=remote.image_tokens,
    )
