"""Deployments that name their upstream directly (LiteLLM's ``api_base``).

A deployment may say where its provider is, ``api_base: https://api.openai.com/v1``,
instead of naming an Envoy cluster. The gateway then makes the cluster itself (one per
scheme, host and port: DNS, TLS with the host as SNI and certificate name, the
provider's Host header) and sends each call to the path the provider expects:

- OpenAI's API (every provider but ``anthropic`` and ``azure``): the api_base's path
  replaces the ``/v1`` of the call's path, as the OpenAI SDK appends the endpoint to
  its ``base_url``: ``https://api.groq.com/openai/v1`` serves ``/v1/chat/completions``
  at ``/openai/v1/chat/completions``; an api_base with no path keeps ``/v1``.
- Anthropic (``provider: anthropic``): the api_base is the host, as in the Anthropic
  SDK (``https://api.anthropic.com``); its path, if any, comes before ``/v1/...``
  (a path ending in ``/v1`` is taken as the version itself).
- Azure OpenAI (``provider: azure``): ``/openai/deployments/<model>/<endpoint>`` with
  ``api-version`` (the deployment's ``api_version``) in the query string; ``model``
  is the Azure deployment name (a LiteLLM-style ``azure/`` prefix is dropped). The
  Responses API is ``/openai/responses?api-version=...``, the deployment named in the
  body's ``model``. An api_base whose path is ``/openai/v1`` is Azure's v1 API,
  addressed like OpenAI's.

The client's query string is kept (Azure's ``api-version`` replaced). Rule: a path is
always rebuilt from the endpoint the call names (the last segments of its path), so
a retry on another deployment gets that deployment's path, never the previous one's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

__all__ = [
    "ApiBase",
    "check_api_version",
    "endpoint_suffix",
    "parse_api_base",
    "upstream_path",
]

#: The endpoints' paths after the version, longest first (so ``/messages/count_tokens``
#: is not read as ``/messages``).
_SUFFIXES = (
    "/messages/count_tokens",
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_PATH = re.compile(r"^(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*/?$")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class ApiBase:
    """A parsed ``api_base``."""

    scheme: str
    host: str
    port: int
    #: Without a trailing slash; "" for none.
    path: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """The Host header the provider expects: the host, and the port unless the
        scheme's own."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def cluster(self) -> str:
        """The Envoy cluster the gateway makes for this scheme, host and port."""
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", self.host)[:80]
        digest = hashlib.sha1(
            f"{self.scheme}://{self.host}:{self.port}".encode(), usedforsecurity=False
        ).hexdigest()[:8]
        return f"provider.{readable}.{self.port}.{digest}"


def parse_api_base(text: str) -> ApiBase:
    """``api_base`` checked: http(s), a DNS name or IP address, an optional port and
    path; no credentials, query or fragment (a ValueError says which)."""
    if len(text) > 512 or not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("api_base must be a printable ASCII URL of at most 512 characters")
    if "%" in text:
        raise ValueError("api_base must not hold percent-encoded characters")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError("api_base must start with https:// or http://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("api_base must not hold credentials: use the deployment's credential")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("api_base must not have a query string or fragment")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise ValueError(f"api_base has no valid host name: {host[:64]!r}") from None
    try:
        port = parts.port
    except ValueError:
        raise ValueError("api_base has an invalid port") from None
    if port == 0:
        raise ValueError("api_base has an invalid port")
    path = parts.path.rstrip("/")
    if not _PATH.match(path or "/") or any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError("api_base has an invalid path")
    return ApiBase(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


def check_api_version(value: str) -> str:
    if not _VERSION.match(value):
        raise ValueError("api_version uses letters, digits and . _ - (at most 64)")
    return value


_AZURE_DEPLOYMENT = re.compile(r"^(?:/[^?]*)?/openai/deployments/[^/?]+(/[^?]*)$")


def endpoint_suffix(path: str) -> tuple[str, str] | None:
    """(the endpoint's path after the version, the query string) of a call's path,
    whatever prefix it has (the client's ``/v1``, a provider's, Azure's deployment
    path, whose name is never read as part of the endpoint); None for a path that
    names no endpoint."""
    bare, _, query = path.partition("?")
    bare = bare.rstrip("/") if len(bare) > 1 else bare
    azure = _AZURE_DEPLOYMENT.match(bare)
    if azure is not None:
        bare = azure.group(1)
    for suffix in _SUFFIXES:
        if bare.endswith(suffix):
            return suffix, query
    return None


def upstream_path(
    base: ApiBase | None, provider: str, model: str, api_version: str | None, path: str
) -> str:
    """The path a call to ``path`` (the client's, or an earlier attempt's) takes to a
    deployment: its api_base's rule (module docstring), or ``/v1/<endpoint>`` for a
    deployment without one (its Envoy cluster is the provider's host)."""
    found = endpoint_suffix(path)
    if found is None:
        return path
    suffix, query = found
    if base is None:
        prefix = "/v1"
    elif provider == "azure" and base.path != "/openai/v1" and not base.path.endswith("/v1"):
        name = quote(model.removeprefix("azure/"), safe="")
        params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "api-version"]
        if api_version is not None:
            params.append(("api-version", api_version))
        root = base.path.removesuffix("/openai")
        if suffix == "/responses":
            target = f"{root}/openai/responses"
        else:
            target = f"{root}/openai/deployments/{name}{suffix}"
        return f"{target}?{urlencode(params)}" if params else target
    elif provider == "anthropic":
        prefix = base.path if base.path.endswith("/v1") else f"{base.path}/v1"
    else:
        prefix = base.path or "/v1"
    return f"{prefix}{suffix}?{query}" if query else f"{prefix}{suffix}"
