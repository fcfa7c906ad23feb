"""Budget checks against spend read from the store, and the fail mode."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
import yaml

from extproc.core.access import Caller, KeyMetadata, Team, VirtualKey, hash_key, request_tags
from extproc.core.budgets import (
    MICRO,
    BudgetRef,
    check_budgets,
    limit_micros,
    spend_key,
    team_member_ref,
)
from extproc.core.decision import GatewayConfig, RouteDecision
from extproc.core.errors import GatewayError
from extproc.core.request import RequestHead
from extproc.core.usage import Usage
from extproc.policy import CompiledPolicy, compile_policy, load_policy, parse_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreTools, StoreUnavailableError
from extproc.store.base import Admission, Admitted
from tests.helpers import StoppedClock, decide_request

POLICY = Path(__file__).resolve().parent.parent / "policies" / "budgets.yaml"
ENV = {"TEST_KEY_A": "sk-a"}
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SAM = hash_key("sk-sam-budget")
UTC_ZONE = ZoneInfo("UTC")
POLICY_DATA = yaml.safe_load(POLICY.read_text())


def store_of(gateway: Gateway) -> StoreTools:
    """The gateway's store with its seeding helpers (both stores have them)."""
    return cast(StoreTools, gateway.store)


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(POLICY, env=ENV)


def route(policy: CompiledPolicy, key: str, **body: object) -> RouteDecision:
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": f"Bearer {key}"})
    raw = json.dumps({"model": "auto", "messages": [], **body}).encode()
    return decide_request(head, raw, policy, GatewayConfig(), lambda: 0.1, now=NOW)


def test_applicable_budgets_in_order(policy: CompiledPolicy) -> None:
    decision = route(
        policy, "sk-sam-budget", user="someone", metadata={"tags": ["marketing", "other"]}
    )
    assert [(b.kind, b.ident, str(b.limit)) for b in decision.budgets] == [
        ("key", SAM, "10"),
        ("org", "o-budget", "100"),
        ("end_user", "someone", "1"),  # the default end-user budget
        ("tag", "marketing", "2"),
        ("global", "all", "1000"),
    ]
    assert ("end_user", "vip", "50") in [
        (b.kind, b.ident, str(b.limit)) for b in route(policy, "sk-sam-budget", user="vip").budgets
    ]
    assert [b.kind for b in route(policy, "sk-tess-team-budget").budgets] == ["team", "global"]


def test_zero_cost_group_skips_budgets(policy: CompiledPolicy) -> None:
    assert route(policy, "sk-sam-budget", model="free").budgets == ()


async def seeded(policy: CompiledPolicy, spends: dict[str, float], **settings: str) -> Gateway:
    store = MemoryStore()
    for key, dollars in spends.items():
        await store.incr(key, int(dollars * int(MICRO)), ttl_s=3600)
    return Gateway(Settings(policy_path=POLICY, **settings), policy, store)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spends", "key", "body", "code"),
    [
        ({spend_key("key", SAM): 10}, "sk-sam-budget", {}, "key_budget_exceeded"),
        ({spend_key("team", "t-budget"): 5.5}, "sk-tess-team-budget", {}, "team_budget_exceeded"),
        ({spend_key("org", "o-budget"): 100}, "sk-sam-budget", {}, "org_budget_exceeded"),
        (
            {spend_key("end_user", "u1"): 1},
            "sk-sam-budget",
            {"user": "u1"},
            "end_user_budget_exceeded",
        ),
        (
            {spend_key("tag", "marketing"): 2},
            "sk-sam-budget",
            {"metadata": {"tags": ["marketing"]}},
            "tag_budget_exceeded",
        ),
        ({spend_key("global", "all"): 1000}, "sk-tess-team-budget", {}, "global_budget_exceeded"),
    ],
)
async def test_spend_at_budget_is_a_429(
    policy: CompiledPolicy,
    spends: dict[str, float],
    key: str,
    body: dict[str, object],
    code: str,
) -> None:
    gateway = await seeded(policy, spends)
    with pytest.raises(GatewayError) as info:
        await gateway.reserve(route(policy, key, **body), gateway.policy)
    assert (info.value.status, info.value.code) == (429, code)
    assert key not in info.value.message


async def test_spend_under_budget_passes(policy: CompiledPolicy) -> None:
    gateway = await seeded(policy, {spend_key("key", SAM): 9.999999})
    await gateway.reserve(route(policy, "sk-sam-budget"), gateway.policy)


class DownStore(MemoryStore):
    name = "down"

    async def admit(self, admission: Admission) -> Admitted:
        raise StoreUnavailableError("connection refused")


@pytest.mark.parametrize(("mode", "status"), [("open", None), ("closed", 503)])
async def test_store_down_follows_fail_mode(
    policy: CompiledPolicy, mode: str, status: int | None
) -> None:
    gateway = Gateway(Settings(policy_path=POLICY, fail_mode=mode), policy, DownStore())  # type: ignore[arg-type]
    decision = route(policy, "sk-sam-budget")
    for _ in range(3):
        if status is None:
            await gateway.reserve(decision, gateway.policy)
        else:
            with pytest.raises(GatewayError) as info:
                await gateway.reserve(decision, gateway.policy)
            assert (info.value.status, info.value.code) == (status, "store_unavailable")
    assert gateway.metrics.fail_mode_used.labels(mode)._value.get() == 3


async def call(
    gateway: Gateway, decision: RouteDecision, policy: CompiledPolicy, output: int = 1
) -> None:
    """Reserve and settle one call costing ``output`` tokens of dep-a ($0.000002 each)."""
    charge = await gateway.reserve(decision, policy)
    await gateway.settle(charge, Usage(output_tokens=output), policy)


async def test_soft_budget_alerts_once_per_window(
    policy: CompiledPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await seeded(policy, {spend_key("key", SAM): 6})
    decision = route(policy, "sk-sam-budget")
    for _ in range(3):
        await call(gateway, decision, gateway.policy)  # over the soft budget: not refused
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("key")._value.get() == 1
    assert caplog.text.count("soft budget crossed for API key sam") == 1


async def test_alerts_come_from_settled_spend_not_holds(
    policy: CompiledPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    """A large reservation is not spend: no alert while it is held, and the spend an
    alert reports is the settled figure, without the holds of calls in flight."""
    gateway = await seeded(policy, {})
    big = route(policy, "sk-sam-budget", n=4, max_tokens=10**6)  # holds ~$8 of $10
    held = await gateway.reserve(big, gateway.policy)
    assert held.estimate > 7_000_000
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("key")._value.get() == 0
    # another call settles $5.50 while the $8 hold is open: settled $5.50 >= $5 soft
    await call(gateway, route(policy, "sk-sam-budget"), gateway.policy, output=2_750_000)
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("key")._value.get() == 1
    assert "soft budget crossed for API key sam: spend $5.500000" in caplog.text
    await gateway.settle(held, Usage(output_tokens=250_000), gateway.policy)
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("key")._value.get() == 1  # once a window
    assert (await store_of(gateway).get_many([big.budgets[0].store_key]))[0] == 6_000_000


async def test_under_soft_budget_no_alert(policy: CompiledPolicy) -> None:
    gateway = await seeded(policy, {spend_key("key", SAM): 4.99})
    await call(gateway, route(policy, "sk-sam-budget"), gateway.policy, output=4000)  # +$0.008
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("key")._value.get() == 0


WALT = hash_key("sk-walt-member")
YURI = hash_key("sk-yuri-daily")


def test_team_member_budgets(policy: CompiledPolicy) -> None:
    walt = route(policy, "sk-walt-member").budgets
    assert [(b.kind, b.ident, b.member, str(b.limit)) for b in walt] == [
        ("team_member", "t-members", "walt", "1"),  # the team's default member budget
        ("global", "all", None, "1000"),
    ]
    assert walt[0].store_key.startswith("{t:team:t-members}:team_member:t-members:walt:7d:")
    assert walt[0].duration is not None
    assert walt[0].duration.text == "7d"
    xena = route(policy, "sk-xena-member").budgets
    assert (xena[0].store_key, str(xena[0].limit), xena[0].duration) == (
        "{t:team:t-members}:team_member:t-members:xena",
        "4",
        None,
    )


async def test_team_member_over_budget(policy: CompiledPolicy) -> None:
    member = route(policy, "sk-walt-member").budgets[0]
    gateway = await seeded(policy, {member.store_key: 1})
    with pytest.raises(GatewayError) as info:
        await gateway.reserve(route(policy, "sk-walt-member"), gateway.policy)
    assert (info.value.status, info.value.code) == (429, "team_member_budget_exceeded")
    await gateway.reserve(route(policy, "sk-xena-member"), gateway.policy)  # her own: 4


def test_calendar_window_is_in_the_store_key(policy: CompiledPolicy) -> None:
    (daily, _) = route(policy, "sk-yuri-daily").budgets
    # 12:00 UTC is 07:00 in New York: the window is that local day.
    assert daily.store_key == f"{{t:key:{YURI}}}:key:{YURI}:1d:20261123T050000"
    assert daily.window_s == 86_400
    assert daily.retry_after(NOW) == 17 * 3600


async def test_daily_budget_resets_at_local_midnight(policy: CompiledPolicy) -> None:
    (daily, _) = route(policy, "sk-yuri-daily").budgets
    gateway = await seeded(policy, {daily.store_key: 3})
    gateway.clock = StoppedClock(NOW)
    with pytest.raises(GatewayError) as info:
        await gateway.reserve(route(policy, "sk-yuri-daily"), gateway.policy)
    assert info.value.code == "key_budget_exceeded"
    assert info.value.headers["retry-after"] == str(17 * 3600)
    assert "resets at 2026-11-24T05:00:00+00:00" in info.value.message
    # the next local day reads a fresh key: yesterday's spend does not count
    tomorrow = NOW.replace(day=24, hour=5, minute=0)
    head = RequestHead("POST", "/v1/chat/completions", {"authorization": "Bearer sk-yuri-daily"})
    raw = json.dumps({"model": "auto", "messages": []}).encode()
    fresh = decide_request(head, raw, policy, GatewayConfig(), lambda: 0.1, now=tomorrow)
    assert fresh.budgets[0].store_key != daily.store_key
    gateway.clock = StoppedClock(tomorrow)
    await gateway.reserve(fresh, gateway.policy)


def test_tag_budget_window_rolls_from_first_spend(tmp_path: Path) -> None:
    text = POLICY.read_text().replace(
        "{name: marketing, max_budget: 2}", "{name: marketing, max_budget: 2, budget_duration: 1h}"
    )
    path = tmp_path / "p.yaml"
    path.write_text(text)
    rolled = load_policy(path, env=ENV)
    tag = next(
        b
        for b in route(rolled, "sk-sam-budget", metadata={"tags": ["marketing"]}).budgets
        if b.kind == "tag"
    )
    # no period in the key: the store's TTL (set at the first spend) is the window
    assert (tag.store_key, tag.window_s, tag.retry_after(NOW)) == (
        "{spend}:tag:marketing:1h",
        3600.0,
        None,
    )


async def test_soft_alert_once_per_calendar_window(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        POLICY.read_text().replace(
            "alias: sam, max_budget: 10, soft_budget: 5,",
            "alias: sam, max_budget: 10, soft_budget: 5, budget_duration: 1d,",
        )
    )
    daily = load_policy(path, env=ENV)
    gateway = await seeded(daily, {})
    for day in (23, 23, 24, 24):
        now = NOW.replace(day=day)
        decision = decide_request(
            RequestHead("POST", "/v1/chat/completions", {"authorization": "Bearer sk-sam-budget"}),
            json.dumps({"model": "auto", "messages": []}).encode(),
            daily,
            GatewayConfig(),
            lambda: 0.1,
            now=now,
        )
        if (await store_of(gateway).get_many([decision.budgets[0].store_key]))[0] is None:
            await store_of(gateway).incr(decision.budgets[0].store_key, 6_000_000, 86_400)
        gateway.clock = StoppedClock(now)
        await call(gateway, decision, gateway.policy)
    # over the soft budget on two days: one alert each day
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("key")._value.get() == 2


async def test_alert_at_a_share_of_the_max_budget(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        POLICY.read_text().replace(
            "budget_reset_timezone: America/New_York}",
            "budget_reset_timezone: America/New_York, budget_alert_at: 0.8}",
        )
    )
    shared = load_policy(path, env=ENV)
    tess = route(shared, "sk-tess-team-budget")  # team budget $5, no soft budget
    gateway = await seeded(shared, {spend_key("team", "t-budget"): 3.9})
    await call(gateway, tess, shared)
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("team")._value.get() == 0
    await store_of(gateway).incr(spend_key("team", "t-budget"), 200_000, 3600)  # $4.10: 82%
    await call(gateway, route(shared, "sk-tess-team-budget"), shared)
    await gateway.drain()
    await call(gateway, route(shared, "sk-tess-team-budget"), shared)
    await gateway.drain()
    assert gateway.metrics.soft_budget_alerts.labels("team")._value.get() == 1


@pytest.mark.parametrize(
    ("dollars", "micros"),
    [
        (None, None),
        ("0", 0),
        ("1e-12", 1),  # above zero is never zero
        ("0.000001", 1),
        ("0.0000011", 2),
        ("1.0000005", 1_000_001),
        ("5", 5_000_000),
    ],
)
def test_limits_round_up_to_the_micro_dollar(dollars: str | None, micros: int | None) -> None:
    assert limit_micros(None if dollars is None else Decimal(dollars)) == micros


TINY = Decimal("1e-12")


@pytest.mark.parametrize(
    ("limit", "soft", "spent", "refused", "crossed"),
    [
        (TINY, None, 0, False, False),  # a tiny budget admits its first call ...
        (TINY, None, 1, True, False),  # ... and refuses once anything was spent
        (Decimal(0), None, 0, True, False),  # a zero budget refuses every call
        (None, TINY, 0, False, False),
        (None, TINY, 1, False, True),  # a tiny soft budget alerts on the first spend
        (Decimal("0.0000015"), None, 1, False, False),
        (Decimal("0.0000015"), None, 2, True, False),
    ],
)
def test_check_budgets_compares_rounded_up_limits(
    limit: Decimal | None, soft: Decimal | None, spent: int, refused: bool, crossed: bool
) -> None:
    ref = BudgetRef("key", "k", "API key k", limit, soft)
    if refused:
        with pytest.raises(GatewayError) as info:
            check_budgets([ref], [spent], NOW)
        assert info.value.code == "key_budget_exceeded"
    else:
        assert check_budgets([ref], [spent], NOW) == ((ref,) if crossed else ())


def _with_key_budget(tmp_path: Path, budget: str) -> CompiledPolicy:
    path = tmp_path / "p.yaml"
    path.write_text(
        POLICY.read_text().replace(
            "alias: sam, max_budget: 10,", f"alias: sam, max_budget: {budget},"
        )
    )
    return load_policy(path, env=ENV)


async def test_tiny_key_budget_admits_one_call_then_refuses(tmp_path: Path) -> None:
    tiny = _with_key_budget(tmp_path, "0.000000000001")
    gateway = await seeded(tiny, {})
    charge = await gateway.reserve(route(tiny, "sk-sam-budget"), tiny)
    await gateway.settle(charge, Usage(input_tokens=1, output_tokens=1), tiny)
    with pytest.raises(GatewayError) as info:
        await gateway.reserve(route(tiny, "sk-sam-budget"), tiny)
    assert (info.value.status, info.value.code) == (429, "key_budget_exceeded")


async def test_zero_key_budget_refuses_the_first_call(tmp_path: Path) -> None:
    zero = _with_key_budget(tmp_path, "0")
    gateway = await seeded(zero, {})
    with pytest.raises(GatewayError) as info:
        await gateway.reserve(route(zero, "sk-sam-budget"), zero)
    assert (info.value.status, info.value.code) == (429, "key_budget_exceeded")


def _team(**fields: Any) -> Team:
    return Team.model_validate({"id": "t", **fields})


@pytest.mark.parametrize(
    ("team", "expected"),
    [
        # no entry: the team default, in its window
        (_team(member_max_budget=1, member_budget_duration="7d"), ("1", "7d")),
        # an entry without max_budget: still the team default (the bug: no budget at all)
        (_team(member_max_budget=1, members=[{"user": "u"}]), ("1", None)),
        (
            _team(member_max_budget=1, member_budget_duration="7d", members=[{"user": "u"}]),
            ("1", "7d"),
        ),
        # the member's own window overrides the default's, the default limit stays
        (
            _team(
                member_max_budget=1,
                member_budget_duration="7d",
                members=[{"user": "u", "budget_duration": "1d"}],
            ),
            ("1", "1d"),
        ),
        # an explicit max_budget is the member's own budget, in the member's own window
        (
            _team(
                member_max_budget=1,
                member_budget_duration="7d",
                members=[{"user": "u", "max_budget": 4}],
            ),
            ("4", None),
        ),
        (_team(members=[{"user": "u", "max_budget": 4, "budget_duration": "1h"}]), ("4", "1h")),
        (_team(member_max_budget=0, members=[{"user": "u"}]), ("0", None)),
        # a default without a window of its own takes the team's (LiteLLM's fallback)
        (_team(member_max_budget=1, budget_duration="1mo"), ("1", "1mo")),
        # a window alone is no budget
        (_team(members=[{"user": "u", "budget_duration": "1d"}]), (None, "1d")),
        # another user's entry does not apply
        (_team(member_max_budget=1, members=[{"user": "v", "max_budget": 9}]), ("1", None)),
    ],
)
def test_member_budget_falls_back_to_the_team_default(
    team: Team, expected: tuple[str | None, str | None]
) -> None:
    limit, duration = team.member_budget("u")
    assert (None if limit is None else str(limit), duration) == expected
    ref = team_member_ref(team, "u", NOW, UTC_ZONE)
    assert (ref is None) is (limit is None)


def _tagged_policy(reject_client_tags: bool) -> CompiledPolicy:
    return compile_policy(
        parse_policy(
            {
                "model_groups": POLICY_DATA["model_groups"],
                "tags": [
                    {"name": "key-tag", "max_budget": 1},
                    {"name": "team-tag", "max_budget": 2},
                    {"name": "client-tag", "max_budget": 3},
                ],
                "teams": [{"id": "t", "metadata": {"tags": ["team-tag", "key-tag"]}}],
                "keys": [
                    {"hash": SAM, "alias": "sam", "metadata": {"tags": ["key-tag"]}},
                    {"hash": hash_key("sk-tom-team"), "alias": "tom", "team": "t"},
                ],
                "general_settings": {"reject_clientside_metadata_tags": reject_client_tags},
            }
        ),
        env=ENV,
    )


@pytest.mark.parametrize(
    ("key", "client_tags", "reject", "tags"),
    [
        ("sk-sam-budget", None, False, ["key-tag"]),  # the key's own tag, nothing sent
        ("sk-sam-budget", ["client-tag"], False, ["client-tag", "key-tag"]),
        ("sk-sam-budget", ["key-tag"], False, ["key-tag"]),  # once, not twice
        ("sk-sam-budget", None, True, ["key-tag"]),  # client tags refused, the key's apply
        ("sk-tom-team", ["client-tag"], False, ["client-tag", "team-tag", "key-tag"]),
    ],
)
def test_policy_tags_count_for_tag_budgets(
    key: str, client_tags: list[str] | None, reject: bool, tags: list[str]
) -> None:
    policy = _tagged_policy(reject)
    body = {} if client_tags is None else {"metadata": {"tags": client_tags}}
    decision = route(policy, key, **body)
    assert [b.ident for b in decision.budgets if b.kind == "tag"] == tags


def test_rejected_client_tags_are_still_refused() -> None:
    with pytest.raises(GatewayError) as info:
        route(_tagged_policy(True), "sk-sam-budget", metadata={"tags": ["key-tag"]})
    assert info.value.code == "clientside_tags_rejected"


async def test_key_tag_budget_refuses_once_spent() -> None:
    policy = _tagged_policy(False)
    gateway = await seeded(policy, {spend_key("tag", "key-tag"): 1})
    with pytest.raises(GatewayError) as info:
        await gateway.reserve(route(policy, "sk-sam-budget"), policy)
    assert (info.value.status, info.value.code) == (429, "tag_budget_exceeded")


@pytest.mark.parametrize(
    ("client", "key_tags", "team_tags", "merged"),
    [
        ((), (), None, ()),
        (("a",), ("b",), None, ("a", "b")),
        (("b", "a"), ("a", "c"), ("c", "d"), ("b", "a", "c", "d")),
        ((), ("k",), ("t",), ("k", "t")),
    ],
)
def test_request_tags_merge_in_litellm_order(
    client: tuple[str, ...],
    key_tags: tuple[str, ...],
    team_tags: tuple[str, ...] | None,
    merged: tuple[str, ...],
) -> None:
    key = VirtualKey(hash=SAM, metadata=KeyMetadata(tags=key_tags))
    team = None if team_tags is None else Team(id="t", metadata=KeyMetadata(tags=team_tags))
    assert request_tags(client, Caller(key, team)) == merged
    assert request_tags(client, None) == client
