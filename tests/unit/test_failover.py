"""The failover plan (composite clusters) and the automatic -large group."""

from __future__ import annotations

from pathlib import Path

import yaml

from extproc.core.failover import (
    FailoverGroup,
    FailoverRoute,
    composite_name,
    deployment_cluster_name,
    failover_plan,
    next_attempt,
    served_path,
)
from extproc.policy import compile_policy, parse_policy
from tests.helpers import decide_request

TRIO = FailoverGroup("trio", [("a", "ca"), ("b", "cb"), ("c", "cc")], num_retries=2)


def attempts(plan: dict[str, FailoverRoute], dep: str) -> list[str]:
    return [d for d, _ in plan[dep].attempts]


def test_retries_then_fallbacks_capped_at_five() -> None:
    big = FailoverGroup("big", [(f"x{i}", "cx") for i in range(8)])
    solo = FailoverGroup("solo", [("s", "cs")], fallbacks=["trio", "big"])
    plan = failover_plan([TRIO, big, solo])
    assert attempts(plan, "b") == ["b", "a", "c"]
    assert attempts(plan, "s") == ["s", "a", "b", "c", "x0", "x1"]  # 1 + at most 5
    assert "x0" not in plan  # no retries, no fallbacks: no failover


def test_default_fallbacks_apply_to_groups_without_their_own() -> None:
    spare = FailoverGroup("spare", [("z", "cz")])
    lone = FailoverGroup("lone", [("l", "cl")])
    plan = failover_plan([lone, spare], default_fallbacks=["spare"])
    assert attempts(plan, "l") == ["l", "z"]
    assert "z" not in plan  # a group is not its own fallback


def test_cluster_names_are_envoy_safe_and_distinct() -> None:
    names = {composite_name(i) for i in ("a:b", "a/b", "a_b")}
    assert len(names) == 3
    assert all(n.replace(".", "").replace("_", "").replace("-", "").isalnum() for n in names)
    assert deployment_cluster_name("a:b") != composite_name("a:b")


def test_large_group_from_bundled_windows(tmp_path: Path) -> None:
    policy = parse_policy(
        {
            "model_groups": [
                {
                    "name": "auto",
                    "deployments": [
                        {"id": "small", "cluster": "c1", "model": "gpt-4o"},  # 128k (bundled)
                        {"id": "large", "cluster": "c2", "model": "gpt-4.1"},  # ~1M
                    ],
                }
            ]
        }
    )
    compiled = compile_policy(policy)
    assert [d.id for d in compiled.groups["auto-large"].deployments] == ["large"]
    assert compiled.groups["auto"].context_window_fallbacks == ("auto-large",)


def test_class_fallbacks_make_a_dynamic_route() -> None:
    strict = FailoverGroup(
        "strict",
        [("s1", "c1"), ("s2", "c2")],
        num_retries=1,
        fallbacks=["spare"],
        content_policy_fallbacks=["lenient"],
        context_window_fallbacks=["large", "lenient"],
    )
    lenient = FailoverGroup("lenient", [("l", "cl")])
    large = FailoverGroup("large", [("g1", "cg"), ("g2", "cg")])
    spare = FailoverGroup("spare", [("z", "cz")])
    plan = failover_plan([strict, lenient, large, spare])
    route = plan["s1"]
    assert route.dynamic
    assert attempts(plan, "s1") == ["s1", "s2", "z"]  # the default order has no class list
    assert [d for d, _ in route.targets("content_policy")] == ["l"]
    assert [d for d, _ in route.targets("context_window")] == ["g1", "g2", "l"]
    assert route.slots == 6  # 3 default + 3 context-window, capped at 1 + 5
    assert not plan.get("z", FailoverRoute("x", (("z", "cz"),))).dynamic
    # every deployment an attempt may reach has a cluster of its own
    assert {d for d, _ in route.deployments()} == {"s1", "s2", "z", "l", "g1", "g2"}


def test_next_attempt_follows_the_error_class() -> None:
    strict = FailoverGroup(
        "strict",
        [("s1", "c1"), ("s2", "c2")],
        num_retries=1,
        fallbacks=["spare"],
        content_policy_fallbacks=["lenient"],
        context_window_fallbacks=["large"],
    )
    plan = failover_plan(
        [
            strict,
            FailoverGroup("lenient", [("l", "cl")]),
            FailoverGroup("large", [("g1", "cg"), ("g2", "cg")]),
            FailoverGroup("spare", [("z", "cz")]),
        ]
    )
    route = plan["s1"]

    def nxt(events: dict[int, str], attempt: int) -> str | None:
        found = next_attempt(route, events, attempt)
        return found[0] if found else None

    assert nxt({}, 1) == "s1"
    # plain failures walk the default order: the group's retry, then its fallback
    assert [nxt({}, n) for n in (2, 3, 4)] == ["s2", "z", None]
    # a content-policy refusal skips the retries and generic fallbacks
    assert nxt({1: "content_policy"}, 2) == "l"
    assert nxt({1: "content_policy"}, 3) is None  # the list ran out: no other group
    # a refusal after a plain failure: that attempt's class list
    assert nxt({2: "context_window"}, 3) == "g1"
    assert nxt({2: "context_window"}, 4) == "g2"  # g1 failed plainly: the list goes on
    assert nxt({2: "context_window"}, 5) is None
    # never the same deployment twice, never beyond the slots
    assert nxt({1: "context_window", 2: "context_window"}, 3) == "g2"
    assert nxt({}, 99) is None
    assert served_path(route, {1: "content_policy"}, 2) == [("s1", "c1"), ("l", "cl")]


def test_only_the_server_names_the_chosen_deployment() -> None:
    import json  # noqa: PLC0415
    from datetime import UTC, datetime  # noqa: PLC0415

    from extproc.core.decision import GatewayConfig  # noqa: PLC0415
    from extproc.core.failover import DEPLOYMENT_HEADER  # noqa: PLC0415
    from extproc.core.request import RequestHead  # noqa: PLC0415
    from extproc.policy import load_policy  # noqa: PLC0415

    policy = load_policy(
        Path(__file__).resolve().parent.parent / "policies" / "routing.yaml",
        env={"TEST_KEY_A": "a", "TEST_KEY_B": "b"},
    )
    now = datetime(2026, 11, 23, tzinfo=UTC)
    forged = {DEPLOYMENT_HEADER: "ha1-b"}

    def route(model: str) -> tuple[dict[str, str], tuple[str, ...]]:
        raw = json.dumps({"model": model, "messages": []}).encode()
        head = RequestHead("POST", "/v1/chat/completions", forged)
        decision = decide_request(head, raw, policy, GatewayConfig(), lambda: 0.0, now=now)
        return dict(decision.set_headers), decision.remove_headers

    plain_set, plain_removed = route("cheap")  # no failover: a client's header is dropped
    assert DEPLOYMENT_HEADER in plain_removed
    assert DEPLOYMENT_HEADER not in plain_set
    ha_set, _ = route("ha1")  # failover: the server's own choice overwrites it
    assert ha_set[DEPLOYMENT_HEADER] == "ha1-a"
    assert ha_set["x-extproc-cluster"].startswith("fo.")


def test_timeouts_resolve_deployment_then_group_then_router_settings() -> None:
    from extproc.core.failover import AttemptTimeouts  # noqa: PLC0415

    policy = compile_policy(
        parse_policy(
            yaml.safe_load("""
router_settings: {timeout: 30, stream_timeout: 20}
model_groups:
  - name: g
    num_retries: 1
    timeout: 10
    deployments:
      - {id: a, provider: openai, cluster: ca, model: m, timeout: 3}
      - {id: b, provider: openai, cluster: cb, model: m, stream_timeout: 4}
  - name: h
    fallbacks: [g]
    deployments:
      - {id: c, provider: openai, cluster: cc, model: m}
"""),
            "<test>",
        ),
        env={},
    )
    assert policy.failover["a"].timeouts == AttemptTimeouts(3, 20)
    assert policy.failover["b"].timeouts == AttemptTimeouts(10, 4)
    assert policy.failover["c"].timeouts == AttemptTimeouts(30, 20)
    # a stream without a stream timeout of its own waits as long as any call
    assert AttemptTimeouts(7, None).stream == 7
    assert AttemptTimeouts(None, None).stream is None


def test_a_streamed_failover_call_is_marked_for_the_stream_route() -> None:
    import json  # noqa: PLC0415
    from datetime import UTC, datetime  # noqa: PLC0415

    from extproc.core.decision import GatewayConfig  # noqa: PLC0415
    from extproc.core.failover import STREAM_HEADER  # noqa: PLC0415
    from extproc.core.request import RequestHead  # noqa: PLC0415
    from extproc.policy import load_policy  # noqa: PLC0415

    policy = load_policy(
        Path(__file__).resolve().parent.parent / "policies" / "routing.yaml",
        env={"TEST_KEY_A": "a", "TEST_KEY_B": "b"},
    )
    now = datetime(2026, 11, 23, tzinfo=UTC)

    def set_headers(model: str, stream: bool) -> dict[str, str]:
        raw = json.dumps({"model": model, "messages": [], "stream": stream}).encode()
        head = RequestHead("POST", "/v1/chat/completions", {})
        decision = decide_request(head, raw, policy, GatewayConfig(), lambda: 0.0, now=now)
        return dict(decision.set_headers)

    assert set_headers("ha1", stream=True)[STREAM_HEADER] == "1"
    assert STREAM_HEADER not in set_headers("ha1", stream=False)
    assert STREAM_HEADER not in set_headers("cheap", stream=True)  # no failover route


def test_a_timed_out_attempt_counts_as_a_408() -> None:
    from extproc.core.decision import failed_attempt  # noqa: PLC0415

    policy = compile_policy(
        parse_policy(
            yaml.safe_load("""
model_groups:
  - name: g
    num_retries: 1
    deployments:
      - {id: a, provider: openai, cluster: ca, model: m}
      - {id: b, provider: openai, cluster: cb, model: m}
"""),
            "<test>",
        ),
        env={},
    )
    cluster = deployment_cluster_name("b")
    timed_out = failed_attempt(policy, cluster, client_left=False, timed_out=True)
    assert timed_out is not None
    assert (timed_out.deployment, timed_out.status) == ("b", 408)
    reset = failed_attempt(policy, cluster, client_left=False)
    assert reset is not None
    assert reset.status == 503
    assert failed_attempt(policy, cluster, client_left=True, timed_out=True) is None
