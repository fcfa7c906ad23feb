"""The charge that travels in Envoy's dynamic metadata (ext_authz → response filter)."""

from __future__ import annotations

import json

import pytest

from extproc.accounting import Charge

CHARGE = Charge(
    "a" * 32,
    "openai",
    "chat_completions",
    "auto",
    "dep-a",
    True,
    True,
    8200,
    ("{spend}:key:x",),
    (3600.0,),
    "ratelimit:{key:x}:tpm",
    1795440000.5,
    25,
    4096,
)


def test_token_round_trip() -> None:
    assert Charge.parse(CHARGE.token()) == CHARGE


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v[:-1],  # a field short
        lambda v: [*v, 1],  # one too many
        lambda v: ["short", *v[1:]],  # not a reservation id
        lambda v: [*v[:8], ["spend:key:x"], *v[9:]],  # a key outside the {spend} tag
        lambda v: [*v[:7], True, *v[8:]],  # a bool for the estimate
        lambda v: [*v[:10], "ratelimit-not", *v[11:]],
    ],
)
def test_foreign_or_malformed_tokens_are_refused(mutate: object) -> None:
    values = json.loads(CHARGE.token())
    assert Charge.parse(json.dumps(mutate(values))) is None  # type: ignore[operator]


@pytest.mark.parametrize("text", ["", "{}", "null", "[" * 100_000, '"x"'])
def test_junk(text: str) -> None:
    assert Charge.parse(text) is None
