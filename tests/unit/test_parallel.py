"""Parallel-request leases: handed to Envoy as metadata, given back from its access log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.adapters.access_log import AccessLogService, lease_of
from extproc.adapters.ext_authz import AuthorizationService
from extproc.adapters.ext_proc import ExternalProcessorService
from extproc.core.access import hash_key
from extproc.core.leases import AUTHZ_NAMESPACE, LEASE_NAMESPACE, Lease
from extproc.policy import load_policy
from extproc.state.runtime import Gateway
from extproc.state.settings import Settings
from extproc.store import MemoryStore, StoreUnavailableError
from extproc.store.base import Admission, Admitted
from tests.helpers import body_msg, headers_msg, post_headers
from tests.unit.test_services import check_request

POLICY = Path(__file__).resolve().parent.parent / "policies" / "budgets.yaml"
ENV = {"TEST_KEY_A": "sk-a"}
BODY = json.dumps({"model": "auto", "messages": []}).encode()
NO_CONTEXT: Any = None
ZED = hash_key("sk-zed-parallel")
SLOTS = f"{{t:key:{ZED}}}:key:{ZED}:parallel"


def make_gateway(store: MemoryStore | None = None, **settings: Any) -> Gateway:
    return Gateway(
        Settings(policy_path=POLICY, **settings),
        load_policy(POLICY, env=ENV),
        store or MemoryStore(),
        rng=lambda: 0.1,
    )


async def ext_proc_lease(gateway: Gateway) -> pb.ProcessingResponse:
    async def source() -> AsyncIterator[pb.ProcessingRequest]:
        yield headers_msg(post_headers(authorization="Bearer sk-zed-parallel"))
        yield body_msg(BODY)

    replies = [r async for r in ExternalProcessorService(gateway).Process(source(), NO_CONTEXT)]
    return replies[-1]


def in_flight(gateway: Gateway) -> int:
    store = gateway.store
    assert isinstance(store, MemoryStore)
    return len(store._leases.get(SLOTS, {}))


def log_entry(namespace: str, token: str) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.metadata.filter_metadata[namespace].update({"lease": token})
    return entry


async def test_ext_proc_hands_the_lease_to_envoy_and_the_log_gives_it_back() -> None:
    gateway = make_gateway()
    reply = await ext_proc_lease(gateway)
    token = reply.dynamic_metadata.fields[LEASE_NAMESPACE].struct_value.fields["lease"]
    lease = Lease.parse(token.string_value)
    assert lease is not None
    assert lease.store_key == SLOTS
    assert in_flight(gateway) == 1  # held until Envoy logs the end of the stream
    await ext_proc_lease(gateway)
    refused = await ext_proc_lease(gateway)
    assert refused.immediate_response.status.code == 429
    assert b"parallel_request_limit_exceeded" in refused.immediate_response.body

    async def logs() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        msg = als_pb2.StreamAccessLogsMessage()
        msg.http_logs.log_entry.append(log_entry(LEASE_NAMESPACE, lease.token))
        msg.http_logs.log_entry.append(log_entry(LEASE_NAMESPACE, "spend:key:x|y"))
        yield msg

    await AccessLogService(gateway).StreamAccessLogs(logs(), NO_CONTEXT)
    assert in_flight(gateway) == 1
    assert gateway.metrics.leases.labels("unknown")._value.get() == 1


async def test_check_puts_the_lease_in_its_dynamic_metadata() -> None:
    gateway = make_gateway()
    service = AuthorizationService(gateway)
    request = check_request(
        "/v1/chat/completions", BODY, {"authorization": "Bearer sk-zed-parallel"}
    )
    reply = await service.Check(request, NO_CONTEXT)
    lease = Lease.parse(reply.dynamic_metadata.fields["lease"].string_value)
    assert lease is not None
    # Envoy files it under the filter's name; the access log reads it from there
    assert lease_of(log_entry(AUTHZ_NAMESPACE, lease.token)) == lease
    await service.Check(request, NO_CONTEXT)
    denied = await service.Check(request, NO_CONTEXT)
    assert denied.denied_response.status.code == 429


@pytest.mark.parametrize(
    "token",
    [
        "",
        "{key:abc}:parallel|x",
        f"{SLOTS}|short",
        f"{SLOTS}|{'a' * 32}\n",
        "spend:global:all|x",
        f"parallel:{{key:{ZED}}}|{'a' * 32}",  # not the builder's shape
        f"{{key:{ZED}}}:parallel|{'a' * 32}",  # the old shape
        f"{{t:team:x}}:key:{ZED}:parallel:x|{'a' * 32}",
        f"{{t:anon:x}}:key:{ZED}:parallel|{'a' * 32}",
        f"{{key:{ZED}}}:parallel:x|{'a' * 32}",
        f"{{key:{ZED}}}:ratelimit:rpm|{'a' * 32}",  # another key of the same caller
        f"{{key:{ZED.upper()}}}:parallel|{'a' * 32}",
    ],
)
def test_foreign_tokens_are_not_leases(token: str) -> None:
    assert Lease.parse(token) is None


async def test_stream_closed_before_delivery_releases_the_lease() -> None:
    gateway = make_gateway()

    async def source() -> AsyncIterator[pb.ProcessingRequest]:
        yield headers_msg(post_headers(authorization="Bearer sk-zed-parallel"))
        yield body_msg(BODY)

    stream = ExternalProcessorService(gateway).Process(source(), NO_CONTEXT)
    assert isinstance(stream, AsyncGenerator)
    await anext(stream)
    await anext(stream)  # the body reply (with the lease) is produced ...
    assert in_flight(gateway) == 1
    await stream.aclose()  # ... but the stream is torn down before it is sent on
    await asyncio.sleep(0.01)
    assert in_flight(gateway) == 0


class DownStore(MemoryStore):
    async def admit(self, admission: Admission) -> Admitted:
        raise StoreUnavailableError("down")


@pytest.mark.parametrize(("mode", "status"), [("open", None), ("closed", 503)])
async def test_store_down_follows_fail_mode(mode: str, status: int | None) -> None:
    gateway = make_gateway(DownStore(), fail_mode=mode)
    reply = await ext_proc_lease(gateway)
    if status is None:
        # admitted without a slot known; the lease still goes to Envoy, so a batch
        # that ran after all has its slot given back at the end of the stream
        assert reply.WhichOneof("response") == "request_body"
        assert LEASE_NAMESPACE in reply.dynamic_metadata.fields
    else:
        assert reply.immediate_response.status.code == status


async def test_a_refused_request_holds_no_slot() -> None:
    gateway = make_gateway()
    for _ in range(5):
        await ext_proc_lease(gateway)
    assert in_flight(gateway) == 2
    assert gateway.metrics.leases.labels("acquired")._value.get() == 2
