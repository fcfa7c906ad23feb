"""Deployments that name their provider (``api_base``), through the real Envoy in both
modes: the config ``extproc envoy-config`` renders from the policy alone has a DNS
cluster with TLS per provider host; each call gets the provider's path, Host and SNI,
and Azure OpenAI its deployment path, ``api-version`` and ``api-key``. No test reaches
the internet: the providers are local HTTPS mocks with a certificate made here."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anthropic
import openai
import pytest
import yaml

from extproc.cli.main import main
from tests.helpers import (
    Proc,
    envoy_argv,
    extproc_argv,
    free_port,
    http_ok,
    port_open,
    running,
)
from tests.integration.stack import KEYS, start_server, wait_for_extproc_healthy

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (and 127.0.0.1) and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl = shutil.which("openssl")
    assert openssl is not None
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class Providers:
    """The local HTTPS providers: their ports and the CA that signed them."""

    ports: dict[str, int]
    ca: Path

    def _open(self, site: str, method: str) -> Any:
        request = urllib.request.Request(
            f"https://localhost:{self.ports[site]}/_mock/requests", method=method
        )
        context = ssl.create_default_context(cafile=str(self.ca))
        return urllib.request.urlopen(request, context=context, timeout=5)  # noqa: S310

    def seen(self, site: str) -> list[dict[str, Any]]:
        with self._open(site, "GET") as resp:
            return list(json.load(resp))

    def clear(self) -> None:
        for site in self.ports:
            self._open(site, "DELETE").close()


def policy_for(ports: dict[str, int]) -> dict[str, Any]:
    one, two = ports["tls_one"], ports["tls_two"]
    return {
        "model_groups": [
            {
                "name": "oai",
                "deployments": [
                    {
                        "id": "oai-1",
                        "model": "gpt-up",
                        "api_base": f"https://localhost:{one}/v1",
                        "credential": {"env": "TEST_KEY_A"},
                    }
                ],
            },
            {
                "name": "compat",
                "deployments": [
                    {
                        "id": "groq-1",
                        "provider": "groq",
                        "model": "llama-up",
                        "api_base": f"https://localhost:{one}/openai/v1/",
                        "credential": {"env": "TEST_KEY_A"},
                    }
                ],
            },
            {
                "name": "claude",
                "deployments": [
                    {
                        "id": "claude-1",
                        "provider": "anthropic",
                        "model": "claude-up",
                        "api_base": f"https://localhost:{one}",
                        "credential": {"env": "TEST_KEY_A"},
                    }
                ],
            },
            {
                "name": "az",
                "num_retries": 1,
                "deployments": [
                    {
                        "id": "az-1",
                        "provider": "azure",
                        "model": "azure/gpt4o-prod",
                        "api_base": f"https://localhost:{two}",
                        "api_version": "2024-10-21",
                        "credential": {"env": "TEST_KEY_B"},
                        "weight": 1,
                    },
                    {
                        "id": "az-oai",
                        "model": "gpt-up",
                        "api_base": f"https://localhost:{one}/v1",
                        "credential": {"env": "TEST_KEY_A"},
                        "weight": 0,
                    },
                ],
            },
        ]
    }


def render(
    workdir: Path,
    policy: Path,
    grpc_port: int,
    port: int,
    admin: int,
    ca: Path,
    mode: str,
    name: str,
) -> Path:
    """The Envoy config ``extproc envoy-config`` renders for the policy."""
    out = workdir / f"{name}.yaml"
    args = ["envoy-config", "--policy", str(policy), "--mode", mode, "--port", str(port)]
    args += ["--grpc-port", str(grpc_port), "--envoy-admin-port", str(admin)]
    args += ["--upstream-ca", str(ca), "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Providers, Path, str]]:
    mode: Literal["ext_proc", "ext_authz"] = request.param
    workdir = tmp_path_factory.mktemp(f"prov-{mode}")
    cert, key = make_cert(workdir, "provider")
    ports = {"tls_one": free_port(), "tls_two": free_port()}
    args: list[str] = []
    for name, key_var in (("tls_one", "TEST_KEY_A"), ("tls_two", "TEST_KEY_B")):
        args += ["--upstream", f"{name}=127.0.0.1:{ports[name]}:{key_var}"]
    args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    mock = Proc("mock", extproc_argv("mock", *args), workdir / "mock.log", env=KEYS)
    policy = workdir / "policy.yaml"
    policy.write_text(yaml.safe_dump(policy_for(ports)))
    with (
        running(mock, lambda: all(port_open(p) for p in ports.values())),
        start_server(workdir, policy) as (_, grpc_port, _admin),
    ):
        port, admin = free_port(), free_port()
        config = render(workdir, policy, grpc_port, port, admin, cert, mode, f"envoy-{mode}")
        envoy = Proc("envoy", envoy_argv(config), workdir / "envoy.log")
        with running(envoy, lambda: http_ok(f"http://127.0.0.1:{admin}/ready")):
            wait_for_extproc_healthy(f"http://127.0.0.1:{admin}")
            yield (
                f"http://127.0.0.1:{port}",
                Providers(ports, cert),
                workdir,
                mode,
            )


def test_openai_and_compatible_hosts_get_their_path_host_and_sni(
    gateway: tuple[str, Providers, Path, str],
) -> None:
    url, providers, _, mode = gateway
    providers.clear()
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        for model in ("oai", "compat"):
            reply = client.chat.completions.create(model=model, messages=MESSAGES)
            assert reply.choices[0].message.content
        seen = providers.seen("tls_one")
        assert [s["path"] for s in seen] == ["/v1/chat/completions", "/openai/v1/chat/completions"]
        assert {s["sni"] for s in seen} == {"localhost"}
        assert {s["headers"]["Host"].split(":")[0] for s in seen} == {"localhost"}
        assert {s["headers"]["Authorization"] for s in seen} == {"Bearer sk-test-a"}
        if mode == "ext_proc":
            assert [json.loads(s["body"])["model"] for s in seen] == ["gpt-up", "llama-up"]


def test_anthropic_gets_its_path_and_key(gateway: tuple[str, Providers, Path, str]) -> None:
    url, providers, _, _ = gateway
    providers.clear()
    with anthropic.Anthropic(base_url=url, api_key="x", max_retries=0) as client:
        reply = client.messages.create(model="claude", max_tokens=16, messages=MESSAGES)
        assert reply.content
        assert client.messages.count_tokens(model="claude", messages=MESSAGES).input_tokens > 0
        seen = providers.seen("tls_one")
        assert [s["path"] for s in seen] == ["/v1/messages", "/v1/messages/count_tokens"]
        assert {s["headers"]["x-api-key"] for s in seen} == {"sk-test-a"}


def test_azure_gets_its_deployment_path_version_and_api_key(
    gateway: tuple[str, Providers, Path, str],
) -> None:
    url, providers, _, _ = gateway
    providers.clear()
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(model="az", messages=MESSAGES)  # weight 0: az-1
        assert reply.choices[0].message.content
        (seen,) = providers.seen("tls_two")
        assert (
            seen["path"] == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        )
        assert seen["headers"]["api-key"] == "sk-test-b"
        assert "Authorization" not in seen["headers"]
        # az-1 fails: the retry goes to the OpenAI deployment with OpenAI's path
        providers.clear()
        raw = client.chat.completions.with_raw_response.create(
            model="az", messages=MESSAGES, extra_headers={"x-mock-fail": "tls_two=500"}
        )
        assert raw.headers["x-litellm-model-id"] == "az-oai"
        (retried,) = providers.seen("tls_one")
        assert retried["path"].split("?")[0] == "/v1/chat/completions"
        assert retried["headers"]["Authorization"] == "Bearer sk-test-a"
        assert "api-key" not in retried["headers"]


def test_a_certificate_from_another_ca_is_refused(
    gateway: tuple[str, Providers, Path, str],
) -> None:
    """The same providers behind an Envoy that trusts another CA: no call gets
    through (the certificate is checked, not just used)."""
    _, providers, workdir, mode = gateway
    other, _ = make_cert(workdir, "other")
    policy = workdir / "policy.yaml"
    (workdir / "other").mkdir(exist_ok=True)
    with start_server(workdir / "other", policy) as (_, grpc_port, _admin):
        port, admin = free_port(), free_port()
        config = render(workdir, policy, grpc_port, port, admin, other, mode, f"other-{mode}")
        envoy = Proc("envoy-other", envoy_argv(config), workdir / "envoy-other.log")
        with running(envoy, lambda: http_ok(f"http://127.0.0.1:{admin}/ready")):
            wait_for_extproc_healthy(f"http://127.0.0.1:{admin}")
            providers.clear()
            with openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
            ) as client:
                with pytest.raises(openai.APIStatusError) as refused:
                    client.chat.completions.create(model="oai", messages=MESSAGES)
                assert refused.value.status_code == 503
                assert providers.seen("tls_one") == []


def test_extproc_up_runs_a_policy_of_real_providers_in_one_step(tmp_path: Path) -> None:
    """`extproc up --policy` with deployments that name their provider: no mock is
    started, and calls go to the provider (here a local HTTPS upstream)."""
    from tests.integration.test_lifecycle import running_up  # noqa: PLC0415

    cert, key = make_cert(tmp_path, "provider")
    port = free_port()
    args = ["--upstream", f"prov=127.0.0.1:{port}:TEST_KEY_A"]
    args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    mock = Proc("mock", extproc_argv("mock", *args), tmp_path / "mock.log", env=KEYS)
    policy = tmp_path / "real.yaml"
    deployment = {
        "id": "real-1",
        "model": "gpt-up",
        "api_base": f"https://localhost:{port}/v1",
        "credential": {"env": "TEST_KEY_A"},
    }
    policy.write_text(
        yaml.safe_dump({"model_groups": [{"name": "auto", "deployments": [deployment]}]})
    )
    providers = Providers({"prov": port}, cert)
    with (
        running(mock, lambda: port_open(port)),
        running_up(
            tmp_path,
            "--policy",
            str(policy),
            "--upstream-ca",
            str(cert),
            "--state-dir",
            str(tmp_path / "state"),
            env=KEYS,
        ) as up,
        openai.OpenAI(base_url=f"{up.url}/v1", api_key="x", max_retries=0) as client,
    ):
        assert client.chat.completions.create(model="auto", messages=MESSAGES).choices
        (seen,) = providers.seen("prov")
        assert (seen["path"], seen["sni"]) == ("/v1/chat/completions", "localhost")
        # nothing to mock: no mock listens where `extproc up` puts them
        assert not any(port_open(p) for p in up.ports[-3:])
