"""Credential redaction: what counts as an echo of a deployment key."""

from __future__ import annotations

from extproc.core.redaction import Redactor
from extproc.policy import compile_policy, parse_policy


def test_every_form_of_every_secret_is_replaced() -> None:
    redactor = Redactor(["sk-live-abc/def", 'quote"key-123', "short"])
    assert redactor.bytes(b"nothing to see") is None
    assert redactor.bytes(b"key sk-live-abc/def!") == b"key [REDACTED]!"
    # as a JSON string would carry it
    assert redactor.bytes(b'{"m": "quote\\"key-123"}') == b'{"m": "[REDACTED]"}'
    assert redactor.text("Bearer sk-live-abc/def, sk-live-abc/def") == (
        "Bearer [REDACTED], [REDACTED]"
    )
    # too short to redact without mangling bodies
    assert redactor.text("short") is None
    assert not Redactor(["tiny"])


def test_a_secret_containing_another_is_replaced_whole() -> None:
    redactor = Redactor(["sk-aaaaaaaa", "sk-aaaaaaaa-long"])
    assert redactor.text("sk-aaaaaaaa-long") == "[REDACTED]"


def test_the_policy_knows_its_credentials_without_their_prefix() -> None:
    raw = {
        "model_groups": [
            {
                "name": "g",
                "deployments": [
                    {"id": "o", "cluster": "c", "model": "m", "credential": {"env": "K1"}},
                    {
                        "id": "a",
                        "provider": "anthropic",
                        "cluster": "c",
                        "model": "m",
                        "credential": {"env": "K2"},
                    },
                ],
            }
        ]
    }
    policy = compile_policy(parse_policy(raw, "t"), env={"K1": "sk-openai-1", "K2": "ant-2-key"})
    redactor = policy.redactor
    assert redactor.text("Bearer sk-openai-1") == "Bearer [REDACTED]"
    assert redactor.text("ant-2-key") == "[REDACTED]"


def test_header_values_outside_latin_1_are_not_a_crash() -> None:
    from envoy.config.core.v3 import base_pb2  # noqa: PLC0415
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: PLC0415

    from extproc.adapters.ext_proc import _redact_headers  # noqa: PLC0415

    msg = pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key="x-price", value="5 €"),
                base_pb2.HeaderValue(key="x-echo", raw_value=b"Bearer sk-secret-123456"),
            ]
        )
    )
    common = pb.CommonResponse()
    assert _redact_headers(msg, Redactor(["sk-secret-123456"]), common)
    (changed,) = common.header_mutation.set_headers
    assert (changed.header.key, changed.header.raw_value) == ("x-echo", b"Bearer [REDACTED]")
