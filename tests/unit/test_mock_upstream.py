"""The mock upstream as a one-API provider and as a model that calls tools: what it
answers must be what the providers' own SDKs parse and rebuild."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic.types
import openai.types.chat
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionToolParam, ParsedFunctionToolCall

from extproc.cli.main import main
from extproc.dev.mock_upstream import MockSite, make_mock_app
from tests.helpers import Proc, extproc_argv, free_port, port_open, running
from tests.unit.translate_support import (
    accumulate_message,
    anthropic_events,
    check_completion,
    check_message,
    openai_chunks,
)

Client = TestClient[Any, Any]
Site = Callable[..., AbstractAsyncContextManager[Client]]

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
CHAT_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
        # strict: the SDK's accumulator parses the arguments
        "strict": True,
    },
}
OTHER_CHAT_TOOL = {"type": "function", "function": {"name": "other", "parameters": {}}}
MESSAGES_TOOL = {
    "name": "lookup",
    "description": "Look something up.",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}
OTHER_MESSAGES_TOOL = {"name": "other", "input_schema": {"type": "object"}}


@pytest.fixture
def site() -> Site:
    @asynccontextmanager
    async def serve(api: str | None = None, api_key: str | None = None) -> AsyncIterator[Client]:
        app = make_mock_app(MockSite("m", "127.0.0.1", 0, api_key, api=api))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            yield client

    return serve


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **extra}


def messages(**extra: Any) -> dict[str, Any]:
    body = {"model": "claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    return {**body, **extra}


async def post(client: Client, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    resp = await client.post(path, json=body, headers=headers)
    return resp.status, await resp.json()


async def post_raw(client: Client, path: str, body: Any, **headers: str) -> bytes:
    resp = await client.post(path, json=body, headers=headers)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    return await resp.read()


def body_for(path: str) -> dict[str, Any]:
    return messages() if path.startswith("/v1/messages") else chat(input="hi", prompt="hi")


# ---- one-API sites ----


@pytest.mark.parametrize("path", ANTHROPIC_PATHS)
async def test_an_openai_site_refuses_anthropic_paths_as_openai_does(site: Site, path: str) -> None:
    async with site("openai") as client:
        status, body = await post(client, path, messages())
        assert status == 404
        assert body == {
            "error": {
                "message": f"Invalid URL (POST {path})",
                "type": "invalid_request_error",
                "param": None,
                "code": "unknown_url",
            }
        }
        # a failure rule does not turn the refusal into another error
        status, _ = await post(client, path, messages(), **{"x-mock-fail": "m=500"})
        assert status == 404
        seen = await (await client.get("/_mock/requests")).json()
        assert [s["path"] for s in seen] == [path, path]


@pytest.mark.parametrize("path", OPENAI_PATHS)
async def test_an_anthropic_site_refuses_openai_paths_as_anthropic_does(
    site: Site, path: str
) -> None:
    async with site("anthropic") as client:
        resp = await client.post(path, json=chat())
        assert resp.status == 404
        body = await resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
        assert path in body["error"]["message"]
        assert body["request_id"] == resp.headers["request-id"]
        assert set(body) == {"type", "error", "request_id"}
        assert set(body["error"]) == {"type", "message"}


@pytest.mark.parametrize(
    ("api", "paths"), [("openai", OPENAI_PATHS), ("anthropic", ANTHROPIC_PATHS)]
)
async def test_a_one_api_site_serves_its_own_paths(
    site: Site, api: str, paths: tuple[str, ...]
) -> None:
    async with site(api) as client:
        for path in paths:
            status, _ = await post(client, path, body_for(path))
            assert status == 200, path


async def test_a_site_of_both_apis_serves_every_path(site: Site) -> None:
    async with site() as client:
        for path in OPENAI_PATHS + ANTHROPIC_PATHS:
            status, _ = await post(client, path, body_for(path))
            assert status == 200, path
        status, body = await post(client, "/v1/nowhere", {})
        assert status == 404
        assert body["error"]["code"] == "unknown_url"


@pytest.mark.parametrize(
    ("status", "err_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "api_error"),
        (529, "overloaded_error"),
    ],
)
async def test_an_anthropic_site_fails_in_anthropic_shape(
    site: Site, status: int, err_type: str
) -> None:
    async with site("anthropic") as client:
        for path in ANTHROPIC_PATHS:
            got, body = await post(client, path, messages(), **{"x-mock-fail": f"m={status}"})
            assert got == status
            assert body["type"] == "error"
            assert body["error"]["type"] == err_type
            assert body["error"]["message"] == f"The mock deployment m answers {status}."


async def test_an_anthropic_site_refuses_a_bad_key_and_body_in_anthropic_shape(
    site: Site,
) -> None:
    async with site("anthropic", api_key="sk-ant") as client:
        status, body = await post(client, "/v1/messages", messages(), **{"x-api-key": "wrong"})
        assert (status, body["error"]["type"]) == (401, "authentication_error")
        resp = await client.post("/v1/messages", data=b"{", headers={"x-api-key": "sk-ant"})
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
        status, _ = await post(client, "/v1/messages", messages(), **{"x-api-key": "sk-ant"})
        assert status == 200


@pytest.mark.parametrize("api", ["openai", None])
async def test_other_sites_fail_in_openai_shape(site: Site, api: str | None) -> None:
    async with site(api) as client:
        status, body = await post(
            client, "/v1/chat/completions", chat(), **{"x-mock-fail": "m=429"}
        )
        assert status == 429
        assert body == {
            "error": {
                "message": "The mock deployment m answers 429.",
                "type": "rate_limit_error",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }


def test_the_command_line_makes_one_api_sites(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("both", "oai", "ant")}
    argv = [a for name, port in ports.items() for a in ("--upstream", f"{name}=127.0.0.1:{port}")]
    argv += ["--only", "oai=openai", "--only", "ant=anthropic"]
    proc = Proc("mock", extproc_argv("mock", *argv), tmp_path / "mock.log")
    with running(proc, lambda: all(port_open(p) for p in ports.values())):

        def status(site: str, path: str) -> int:
            url = f"http://127.0.0.1:{ports[site]}{path}"
            request = urllib.request.Request(url, json.dumps(body_for(path)).encode())
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
                    return int(resp.status)
            except urllib.error.HTTPError as err:
                return err.code

        assert [status(s, "/v1/chat/completions") for s in ports] == [200, 200, 404]
        assert [status(s, "/v1/messages") for s in ports] == [200, 404, 200]


def test_the_command_line_checks_its_only_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["mock", "--upstream", "a=127.0.0.1:1", "--only", "a=grpc"])
    assert "API one of anthropic, openai" in capsys.readouterr().err
    assert main(["mock", "--upstream", "a=127.0.0.1:1", "--only", "b=openai"]) == 2
    assert "--only names no --upstream: b" in capsys.readouterr().err


# ---- tool calls: OpenAI chat completions ----


def openai_stream(raw: bytes) -> tuple[list[dict[str, Any]], openai.types.chat.ChatCompletion]:
    """The stream's chunks (each a valid ``ChatCompletionChunk``) and what the SDK's
    accumulator, knowing the request's tools, rebuilds from them."""
    chunks = openai_chunks(raw)
    assert chunks[-1] == "[DONE]"
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState(input_tools=[CHAT_TOOL])
    out: list[dict[str, Any]] = []
    for chunk in chunks[:-1]:
        assert isinstance(chunk, dict)
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk))
        out.append(chunk)
    return out, state.get_final_completion()


async def test_chat_calls_the_first_tool(site: Site) -> None:
    async with site("openai") as client:
        body = chat(tools=[CHAT_TOOL, OTHER_CHAT_TOOL], n=2)
        status, answer = await post(client, "/v1/chat/completions", body)
    assert status == 200
    completion = check_completion(answer)
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert isinstance(call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
        assert call.id.startswith("call_")
        assert (call.function.name, json.loads(call.function.arguments)) == (
            "lookup",
            {"query": "mock"},
        )
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == (
        '{"query": "mock"}'
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12  # as without tools


@pytest.mark.parametrize(
    ("choice", "called"),
    [
        ("none", None),
        ("auto", "lookup"),
        ("required", "lookup"),
        ({"type": "function", "function": {"name": "other"}}, "other"),
    ],
)
async def test_chat_follows_tool_choice(site: Site, choice: Any, called: str | None) -> None:
    async with site() as client:
        body = chat(tools=[CHAT_TOOL, OTHER_CHAT_TOOL], tool_choice=choice)
        _, answer = await post(client, "/v1/chat/completions", body)
    message = check_completion(answer).choices[0].message
    calls = message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ([called] if called else [])


def after_call(*results: str) -> dict[str, Any]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"query": "mock"}'},
    }
    return chat(
        tools=[CHAT_TOOL],
        messages=[
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            *({"role": "tool", "tool_call_id": "call_1", "content": r} for r in results),
        ],
    )


async def test_chat_answers_a_tool_result_quoting_it(site: Site) -> None:
    async with site("openai") as client:
        _, answer = await post(client, "/v1/chat/completions", after_call("42 apples"))
        _, two = await post(client, "/v1/chat/completions", after_call("one", "two"))
        parts = after_call("x")
        parts["messages"][-1]["content"] = [{"type": "text", "text": "in parts"}]
        _, parted = await post(client, "/v1/chat/completions", parts)
    choice = check_completion(answer).choices[0]
    assert (choice.finish_reason, choice.message.tool_calls) == ("stop", None)
    assert choice.message.content == "The tool said: 42 apples"
    assert check_completion(two).choices[0].message.content == "The tool said: one two"
    assert check_completion(parted).choices[0].message.content == "The tool said: in parts"


async def test_chat_streams_a_tool_call_as_openai_does(site: Site) -> None:
    async with site("openai") as client:
        body = chat(tools=[CHAT_TOOL], stream=True, stream_options={"include_usage": True})
        raw = await post_raw(client, "/v1/chat/completions", body)
    chunks, completion = openai_stream(raw)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    (opening,) = deltas[0]["tool_calls"]
    assert opening["index"] == 0
    assert opening["id"].startswith("call_")
    assert opening["type"] == "function"
    assert opening["function"] == {"name": "lookup", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:-1]]
    assert len(fragments) >= 2
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[1:-1])
    assert "".join(fragments) == '{"query": "mock"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert isinstance(call, ParsedFunctionToolCall)
    assert call.id == opening["id"]
    assert call.function.name == "lookup"
    assert call.function.parsed_arguments == {"query": "mock"}


async def test_chat_streams_the_answer_to_a_tool_result(site: Site) -> None:
    async with site() as client:
        body = {**after_call("42 apples"), "stream": True}
        raw = await post_raw(client, "/v1/chat/completions", body)
    chunks, completion = openai_stream(raw)
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    assert len(chunks) > 3  # in pieces
    choice = completion.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("stop", "The tool said: 42 apples")


async def test_chat_without_tools_answers_as_before(site: Site) -> None:
    async with site() as client:
        _, answer = await post(client, "/v1/chat/completions", chat())
        raw = await post_raw(client, "/v1/chat/completions", chat(stream=True))
    assert check_completion(answer).choices[0].message.content == "Hello from the mock upstream."
    _, completion = openai_stream(raw)
    assert completion.choices[0].message.content == "Hello from the mock upstream."


# ---- tool calls: Anthropic messages ----


async def test_messages_call_the_first_tool(site: Site) -> None:
    async with site("anthropic") as client:
        body = messages(tools=[MESSAGES_TOOL, OTHER_MESSAGES_TOOL])
        status, answer = await post(client, "/v1/messages", body)
    assert status == 200
    message = check_message(answer)
    assert message.stop_reason == "tool_use"
    text, use = message.content
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "Let me look that up."
    assert isinstance(use, anthropic.types.ToolUseBlock)
    assert use.id.startswith("toolu_")
    assert (use.name, use.input) == ("lookup", {"query": "mock"})
    assert message.usage.output_tokens == 6


@pytest.mark.parametrize(
    ("choice", "called"),
    [
        ({"type": "none"}, None),
        ({"type": "auto"}, "lookup"),
        ({"type": "any"}, "lookup"),
        ({"type": "tool", "name": "other"}, "other"),
    ],
)
async def test_messages_follow_tool_choice(site: Site, choice: Any, called: str | None) -> None:
    async with site() as client:
        body = messages(tools=[MESSAGES_TOOL, OTHER_MESSAGES_TOOL], tool_choice=choice)
        _, answer = await post(client, "/v1/messages", body)
    message = check_message(answer)
    uses = [b.name for b in message.content if isinstance(b, anthropic.types.ToolUseBlock)]
    assert uses == ([called] if called else [])
    assert message.stop_reason == ("tool_use" if called else "end_turn")


def after_use(*results: Any) -> dict[str, Any]:
    use = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"query": "mock"}}
    blocks = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": r} for r in results]
    return messages(
        tools=[MESSAGES_TOOL],
        messages=[
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me."}, use]},
            {"role": "user", "content": blocks},
        ],
    )


async def test_messages_answer_a_tool_result_quoting_it(site: Site) -> None:
    async with site("anthropic") as client:
        _, answer = await post(client, "/v1/messages", after_use("42 apples"))
        blocks = [{"type": "text", "text": "in blocks"}]
        _, blocked = await post(client, "/v1/messages", after_use(blocks))
    message = check_message(answer)
    assert message.stop_reason == "end_turn"
    assert [b.model_dump() for b in message.content] == [
        {"type": "text", "text": "The tool said: 42 apples", "citations": None}
    ]
    text = check_message(blocked).content[0]
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "The tool said: in blocks"


async def test_messages_stream_a_tool_call_as_anthropic_does(site: Site) -> None:
    async with site("anthropic") as client:
        body = messages(tools=[MESSAGES_TOOL], stream=True)
        raw = await post_raw(client, "/v1/messages", body)
    events = anthropic_events(raw)
    kinds = [e["type"] for e in events]
    fragments = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    texts = kinds.count("content_block_delta") - len(fragments)
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * texts,
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * len(fragments),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert texts >= 2
    assert len([f for f in fragments if f]) >= 2
    assert "".join(fragments) == '{"query": "mock"}'
    tool_start = events[texts + 3]
    assert tool_start["index"] == 1
    assert tool_start["content_block"]["input"] == {}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"output_tokens": 6}
    message = accumulate_message(raw)
    assert message.stop_reason == "tool_use"
    text, use = message.content
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "Let me look that up."
    assert isinstance(use, anthropic.types.ToolUseBlock)
    assert use.id == tool_start["content_block"]["id"]
    assert (use.name, use.input) == ("lookup", {"query": "mock"})


async def test_messages_stream_the_answer_to_a_tool_result(site: Site) -> None:
    async with site() as client:
        raw = await post_raw(client, "/v1/messages", {**after_use("42 apples"), "stream": True})
    message = accumulate_message(raw)
    assert message.stop_reason == "end_turn"
    (text,) = message.content
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "The tool said: 42 apples"


async def test_messages_without_tools_answer_as_before(site: Site) -> None:
    async with site() as client:
        _, answer = await post(client, "/v1/messages", messages())
        raw = await post_raw(client, "/v1/messages", messages(stream=True))
    for message in (check_message(answer), accumulate_message(raw)):
        assert message.stop_reason == "end_turn"
        assert [b.model_dump()["text"] for b in message.content] == [
            "Hello from the mock upstream."
        ]
