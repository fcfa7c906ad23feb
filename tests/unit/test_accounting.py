"""The charge that travels in Envoy's dynamic metadata (ext_authz → response filter)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from extproc.core.access import VirtualKey
from extproc.core.budgets import BudgetRef, spend_key
from extproc.core.charges import Charge, deployment_budgets, exhausted_deployments
from extproc.core.limits import tpm_key
from extproc.core.usage import Usage
from extproc.policy import compile_policy, load_policy, parse_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICIES = Path(__file__).resolve().parent.parent / "policies"

CHARGE = Charge(
    "a" * 32,
    "openai",
    "chat_completions",
    "auto",
    "dep-a",
    True,
    True,
    8200,
    (spend_key("key", "x"), spend_key("team_member", "t", "u:1", "1d")),
    (3600.0, None),
    f"{{t:key:{'ab' * 32}}}:key:{'ab' * 32}:ratelimit:tpm",
    1795440000.5,
    25,
    4096,
)


def test_token_round_trip() -> None:
    assert Charge.parse(CHARGE.token()) == CHARGE


def test_trailing_defaults_are_left_out_so_older_processes_read_the_token() -> None:
    plain = dataclasses.replace(CHARGE, failover=True, fallbacks=0)
    values = json.loads(plain.token())
    assert values[-1] is True  # ends at the failover flag: the shape two releases read
    assert Charge.parse(plain.token()) == plain
    hopped = dataclasses.replace(plain, fallbacks=3)
    assert json.loads(hopped.token())[-1] == 3  # the previous release's shape
    assert Charge.parse(hopped.token()) == hopped


def test_tokens_of_earlier_releases_parse_with_the_added_fields_defaulted() -> None:
    """A process not yet upgraded wrote its charges without the fields added since
    (the translation fields, and before them the fallback hops): during a rolling
    upgrade they are settled all the same."""
    hopped = dataclasses.replace(
        CHARGE, failover=True, fallbacks=2, client_api="anthropic", client_usage=True
    )
    previous = json.loads(hopped.token())[:-2]
    assert previous[-1] == 2  # the fallback hops end the previous shape
    expected = dataclasses.replace(hopped, client_api=None, client_usage=False)
    assert Charge.parse(json.dumps(previous)) == expected
    older = previous[:-1]
    assert older[-1] is True  # the failover flag ends the one before
    expected = dataclasses.replace(hopped, fallbacks=0, client_api=None, client_usage=False)
    assert Charge.parse(json.dumps(older)) == expected
    assert Charge.parse(hopped.token()) == hopped


_NAMES = [f.name for f in dataclasses.fields(Charge)]
_FAILOVER, _HOPS, _CLIENT = (_NAMES.index(n) for n in ("failover", "fallbacks", "client_api"))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v[:_FAILOVER],  # short of the oldest shape still read (it ends at failover)
        lambda v: [*v[:_FAILOVER], 1],  # the oldest shape, a number for the failover flag
        lambda v: [*v, 1],  # one too many
        lambda v: ["short", *v[1:]],  # not a reservation id
        lambda v: [*v[:8], ["spend:key:x"], *v[9:]],  # a key without a tag
        lambda v: [*v[:8], ["{spend}:key:x"], *v[9:]],  # a key budget outside its tenant
        lambda v: [*v[:8], ["{t:key:x}:tag:x"], *v[9:]],  # a shared budget in a tenant
        lambda v: [*v[:8], ["{t:anon:s}:key:x"], *v[9:]],  # no budget of an anonymous one
        lambda v: [*v[:8], ["{spend}:reservations:expiry"], *v[9:]],  # not a budget
        lambda v: [*v[:8], ["{spend}:key:x}"], *v[9:]],  # not as the builder writes it
        lambda v: [*v[:8], ["{spend}:key:%78"], *v[9:]],  # nor this ("x" spelled escaped)
        lambda v: [*v[:7], True, *v[8:]],  # a bool for the estimate
        lambda v: [*v[:_FAILOVER], 1, *v[_FAILOVER + 1 :]],  # a number for the failover flag
        lambda v: [*v[:_HOPS], True, *v[_HOPS + 1 :]],  # a bool for the fallback hops
        lambda v: [*v[:_HOPS], -1, *v[_HOPS + 1 :]],  # fewer than none
        lambda v: [*v[:_CLIENT], "klingon", *v[_CLIENT + 1 :]],  # no API the gateway speaks
        lambda v: [*v[: _CLIENT + 1], 1],  # a number for the usage-chunk flag
        lambda v: [*v[:10], "ratelimit-not", *v[11:]],
        lambda v: [*v[:10], "{t:key:x}:key:x:ratelimit:tpm", *v[11:]],  # not a key hash
        lambda v: [*v[:10], f"{{t:key:{'ab' * 32}}}:key:{'ab' * 32}:ratelimit:rpm", *v[11:]],
        lambda v: [*v[:10], f"{{key:{'ab' * 32}}}:ratelimit:tpm", *v[11:]],  # the old form
    ],
)
def test_foreign_or_malformed_tokens_are_refused(mutate: object) -> None:
    # every field written: no trailing default left out
    full = dataclasses.replace(CHARGE, fallbacks=1, client_api="openai", client_usage=True)
    values = json.loads(full.token())
    assert len(values) == len(_NAMES)
    assert Charge.parse(json.dumps(mutate(values))) is None  # type: ignore[operator]


@pytest.mark.parametrize("text", ["", "{}", "null", "[" * 100_000, '"x"'])
def test_junk(text: str) -> None:
    assert Charge.parse(text) is None


def _provider_budget(entry: dict[str, object]) -> tuple[Decimal | None, str | None]:
    policy = compile_policy(
        parse_policy(
            {
                "model_groups": [
                    {"name": "g", "deployments": [{"id": "d", "cluster": "c", "model": "m"}]}
                ],
                "provider_budgets": {"openai": entry},
            }
        )
    )
    (ref,) = deployment_budgets(policy.groups["g"].deployments[0], policy, NOW)
    return ref.limit, ref.duration.text if ref.duration else None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"budget_limit": 5, "time_period": "1d"}, (Decimal(5), "1d")),
        ({"max_budget": 5, "budget_duration": "7d"}, (Decimal(5), "7d")),  # BudgetConfig's
        ({"max_budget": 5, "time_period": "1h"}, (Decimal(5), "1h")),
        ({"time_period": "1d"}, (None, "1d")),  # no limit: counted, never refused
        ({"budget_limit": None}, (None, None)),
        ({"budget_limit": 0.000000000001}, (Decimal("1e-12"), None)),  # no window: lifetime
    ],
)
def test_provider_budgets_take_litellm_shapes(
    entry: dict[str, object], expected: tuple[Decimal | None, str | None]
) -> None:
    assert _provider_budget(entry) == expected


@pytest.mark.parametrize(
    ("entry", "spent", "exhausted"),
    [
        ({"time_period": "1d"}, 10**12, False),  # no limit never exhausts
        ({"max_budget": 0}, 0, True),  # a zero limit refuses every call
        ({"budget_limit": 0.000000000001}, 0, False),  # a tiny one admits the first ...
        ({"budget_limit": 0.000000000001}, 1, True),  # ... and no more
    ],
)
def test_provider_budget_limits(entry: dict[str, object], spent: int, exhausted: bool) -> None:
    policy = compile_policy(
        parse_policy(
            {
                "model_groups": [
                    {"name": "g", "deployments": [{"id": "d", "cluster": "c", "model": "m"}]}
                ],
                "provider_budgets": {"openai": entry},
            }
        )
    )
    group = policy.groups["g"]
    refs = {"d": deployment_budgets(group.deployments[0], policy, NOW)}
    found = exhausted_deployments(group, refs, {refs["d"][0].store_key: spent})
    assert ("d" in found) is exhausted


@pytest.mark.parametrize("ident", ["u1", "x:{y}", "}{", "a b\n", "é%"])
def test_tokens_with_any_id_round_trip(ident: str) -> None:
    """A charge for a budget whose id holds ':' or braces still settles on the
    response path: its keys are the builder's, and parse checks them by its format."""
    refs = [
        BudgetRef("end_user", ident, "end user", Decimal(1)),
        BudgetRef("team_member", "t", "member", Decimal(1), member=ident),
    ]
    key = VirtualKey(hash="ab" * 32, tpm_limit=10)
    charge = dataclasses.replace(
        CHARGE, keys=tuple(r.store_key for r in refs), ttls=(None, None), tpm_key=tpm_key(key)
    )
    assert Charge.parse(charge.token()) == charge


def test_usage_cap_travels_in_the_token() -> None:
    capped = dataclasses.replace(CHARGE, usage_cap=132_096)
    assert Charge.parse(capped.token()) == capped
    values = json.loads(capped.token())
    assert Charge.parse(json.dumps([*values[:-1], -1])) is None
    assert Charge.parse(json.dumps([*values[:-1], 1.5])) is None


def test_counts_above_the_cap_are_clamped() -> None:
    charge = dataclasses.replace(CHARGE, usage_cap=1000)
    fine = Usage(input_tokens=900, output_tokens=1000, cached_input_tokens=5)
    assert charge.bounded(fine) == (fine, False)
    hostile = Usage(input_tokens=10, output_tokens=10**30, reasoning_tokens=10**30)
    assert charge.bounded(hostile) == (
        Usage(input_tokens=10, output_tokens=1000, reasoning_tokens=1000),
        True,
    )
    assert charge.bounded(None) == (None, False)


async def test_settle_charges_the_clamped_usage_and_counts_it() -> None:
    policy = load_policy(POLICIES / "spend.yaml", env={"TEST_KEY_A": "a", "TEST_KEY_B": "b"})
    gateway = Gateway(Settings(policy_path=POLICIES / "spend.yaml"), policy, MemoryStore())
    dep = policy.deployment("dep-a")
    assert dep is not None
    charge = Charge.new(
        rid=uuid.uuid4().hex,
        api="openai",
        endpoint="chat_completions",
        dep=dep,
        stream=False,
        strip_usage=False,
        estimate=5000,
        refs=(),
        now=datetime.now(UTC),
        usage_cap=2000,
    )
    cost = await gateway.settle(charge, Usage(input_tokens=100, output_tokens=10**30), policy)
    # dep-a: $0.000001 in, $0.000002 out: 100 in + 2000 out (clamped)
    assert cost == 100 + 4000
    assert gateway.metrics.usage_clamped.labels("chat_completions")._value.get() == 1
    assert gateway.metrics.usage_missing.labels("chat_completions")._value.get() == 0
    assert await gateway.settle(charge, None, policy) == 5000  # no usage: the estimate
    assert gateway.metrics.usage_missing.labels("chat_completions")._value.get() == 1


def test_watched_budgets_travel_in_the_token() -> None:
    from extproc.core.budgets import BudgetRef  # noqa: PLC0415
    from extproc.core.windows import cached_duration, calendar_period, zone  # noqa: PLC0415

    day = cached_duration("1d")
    period = calendar_period(day, datetime(2026, 11, 23, 12, tzinfo=UTC), zone("Europe/Berlin"))
    team = BudgetRef("team", "t1", "team t1", Decimal("50"), Decimal("40"), day, period)
    key = BudgetRef("key", "x", "API key x", None, Decimal("1.5"))
    charge = dataclasses.replace(
        CHARGE, keys=(team.store_key, key.store_key), ttls=(3600.0, None), watch=(team, key)
    )
    assert Charge.parse(charge.token()) == charge
    values = json.loads(charge.token())
    watch = _NAMES.index("watch")
    entry = values[watch][0]
    broken = [*values[:watch], [[*entry[:3], "lots", *entry[4:]]], *values[watch + 1 :]]
    assert Charge.parse(json.dumps(broken)) is None  # a limit that is no number
    other = ["key", "other", "API key other", None, "1", None, None, None]
    foreign = [*values[:watch], [other], False, 0]
    assert Charge.parse(json.dumps(foreign)) is None  # a budget the charge does not spend
