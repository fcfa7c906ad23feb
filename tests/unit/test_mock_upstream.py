"""The mock upstream as a one-API provider: it refuses the other API's paths, and
shapes its errors, as that provider does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from extproc.cli.main import main
from extproc.dev.mock_upstream import MockSite, make_mock_app
from tests.helpers import Proc, extproc_argv, free_port, port_open, running

Client = TestClient[Any, Any]
Site = Callable[..., AbstractAsyncContextManager[Client]]

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


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
