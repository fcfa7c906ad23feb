"""Store keys: one builder, no two part tuples alike, one hash tag the ids cannot move."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from redis.crc import key_slot

from extproc.core.access import VirtualKey
from extproc.core.budgets import BudgetRef, alert_key, spend_key
from extproc.core.health import cooldown_key, minute_key
from extproc.core.leases import parallel_key
from extproc.core.limits import rpm_key, tpm_key
from extproc.core.sessions import counter_key
from extproc.core.windows import cached_duration, calendar_period
from extproc.store.base import RESV_EXPIRY, RESV_HASH
from extproc.store.keys import SPEND, split_key, store_key

#: What ids may hold: the separator, braces, the escape characters, blanks, and
#: characters outside ASCII (a lone surrogate too).
ALPHABET = [":", "{", "}", "\\", "%", " ", "\n", "\t", "|", "é", "世", "🙂", "\ud800"]
ALPHABET += list("ab01-_.%25")
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _part(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))


def _case(rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
    tag: tuple[str, ...] = (
        rng.choice(["spend", "dep", "key", "session_iterations", "a:b", "{x}"]),
    )
    tag += tuple(_part(rng) for _ in range(rng.randint(0, 3)))
    return tag, tuple(_part(rng) for _ in range(rng.randint(0, 4)))


def _hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first '{' and the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


def test_no_two_part_tuples_make_the_same_key() -> None:
    rng = random.Random(20261123)
    seen: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for _ in range(30_000):
        tag, parts = _case(rng)
        key = store_key(tag, *parts)
        assert seen.setdefault(key, (tag, parts)) == (tag, parts), key
        assert split_key(key) == (tag, parts)
        # exactly one hash tag, first, naming the tag the code chose
        assert key.startswith("{")
        assert key.count("{") == key.count("}") == 1
        assert _hash_tag(key) == store_key(tag)[1:-1]
        assert key.isascii()
        assert key.isprintable()
    assert len(seen) > 25_000  # the generator did produce many distinct tuples


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # team t with session u:s and team t:u with session s
        (
            (("session_iterations", "team", "t", "u:s"), "count"),
            (("session_iterations", "team", "t:u", "s"), "count"),
        ),
        ((("spend",), "end_user", "x:1d"), (("spend",), "end_user", "x", "1d")),
        ((("spend",), "team_member", "t", "u:v"), (("spend",), "team_member", "t:u", "v")),
        ((("dep", "a}"), "cooldown"), (("dep", "a"), "}:cooldown")),
        ((("spend",), "a%3Ab"), (("spend",), "a:b")),
        ((("spend",), "", "x"), (("spend",), "x")),
        ((("spend", ""),), (("spend",),)),
    ],
)
def test_known_look_alikes_differ(one: tuple[object, ...], other: tuple[object, ...]) -> None:
    def build(spec: tuple[object, ...]) -> str:
        tag, *parts = spec
        return store_key(tag, *parts)  # type: ignore[arg-type]

    assert build(one) != build(other)


def test_ids_cannot_move_the_slot() -> None:
    spend = key_slot(store_key(SPEND).encode())
    for ident in ["}{evil}", "{other}", "a}b", "{", "}"]:
        for key in (spend_key("end_user", ident), spend_key("tag", ident, "1h")):
            assert key_slot(key.encode()) == spend
        assert _hash_tag(cooldown_key(ident)).startswith("dep:")
        assert key_slot(cooldown_key(ident).encode()) == key_slot(
            minute_key(ident, 5, "req").encode()
        )
    assert key_slot(RESV_HASH.encode()) == key_slot(RESV_EXPIRY.encode()) == spend


def test_budget_keys_keep_their_shape() -> None:
    day = cached_duration("1d")
    period = calendar_period(day, NOW, ZoneInfo("UTC"))
    member = BudgetRef("team_member", "t", "l", Decimal(1), duration=day, period=period, member="u")
    assert member.store_key == f"{{t:team:t}}:team_member:t:u:1d:{period.ident}"
    assert (
        alert_key(member, "soft_budget")
        == f"{{alert:team_member:t:u:1d:{period.ident}}}:soft_budget"
    )
    assert spend_key("key", "ab") == "{t:key:ab}:key:ab"
    assert spend_key("key", "ab", tenant=("t", "team", "x")) == "{t:team:x}:key:ab"
    assert spend_key("team", "x") == "{t:team:x}:team:x"
    assert spend_key("tag", "x", tenant=("t", "team", "x")) == "{spend}:tag:x"  # shared
    assert spend_key("end_user", "x:1d") == "{spend}:end_user:x%3A1d"
    assert counter_key(("anon",), "s") == "{t:anon:s}:session_iterations:s:count"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "spend",
        "{}",
        "{}:x",
        "{spend",
        "spend}",
        "{spend}x",
        "x{spend}",
        "{sp:en}d}",
        "{spend}:%61",
        "{spend}:%zz",
        "{spend}:%C3",
        "{spend}:a b",
    ],
)
def test_split_refuses_what_the_builder_never_writes(text: str) -> None:
    assert split_key(text) is None


def test_an_empty_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        store_key(())
    with pytest.raises(ValueError, match="namespace"):
        store_key(("",), "x")


def test_tenants_spread_over_a_three_node_cluster() -> None:
    """30 teams' keys fall in all three slot ranges a 3-node cluster splits 16,384
    slots into (``redis-cli --cluster create``), and each tenant's budgets, session
    counters, rate limits and leases share one slot."""
    ranges = [range(5461), range(5461, 10923), range(10923, 16384)]
    nodes = set()
    for i in range(30):
        team = f"team-{i}"
        tenant = ("t", "team", team)
        member = VirtualKey(hash="ab" * 32, team=team)
        keys = [
            spend_key("team", team),
            spend_key("key", "ab" * 32, tenant=tenant),
            spend_key("team_member", team, "u", tenant=tenant),
            counter_key(("team", team), "session-1"),
            rpm_key(member),
            tpm_key(member),
            parallel_key(member),
        ]
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) == 1, keys
        (slot,) = slots
        nodes.add(next(n for n, r in enumerate(ranges) if slot in r))
    assert nodes == {0, 1, 2}
    # budgets that span tenants stay in one slot of their own
    shared = {spend_key(kind, "x") for kind in ("tag", "provider", "global", "end_user")}
    assert {key_slot(k.encode()) for k in shared} == {key_slot(store_key(SPEND).encode())}
