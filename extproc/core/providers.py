"""How each upstream provider expects its credential to be presented."""

from __future__ import annotations

__all__ = ["CLIENT_CREDENTIAL_HEADERS", "auth_header_for", "credential_edits"]

# Rule: every header a client could use to present a credential is listed here, so
# the gateway strips all of them before it injects the deployment's own.
CLIENT_CREDENTIAL_HEADERS: tuple[str, ...] = ("authorization", "x-api-key", "api-key")

_AUTH_STYLE: dict[str, tuple[str, str]] = {
    "anthropic": ("x-api-key", ""),
    "azure": ("api-key", ""),
    "azure_ai": ("api-key", ""),
}


def auth_header_for(provider: str) -> tuple[str, str]:
    """The (header, value prefix) a provider reads its API key from.

    OpenAI's ``Authorization: Bearer`` is the default: most providers (Groq, Mistral,
    DeepSeek, vLLM, Ollama, OpenRouter, ...) speak the OpenAI protocol.
    """
    return _AUTH_STYLE.get(provider, ("authorization", "Bearer "))


def credential_edits(
    auth_header: str | None, auth_value: str | None
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The (headers to set, headers to remove) that give a request to a deployment its
    credential: ``auth_header`` set to ``auth_value``.

    Rule: no client credential travels upstream: every header of
    :data:`CLIENT_CREDENTIAL_HEADERS` is removed, except the one the deployment's own
    value overwrites; a deployment without a credential (``auth_value`` None) gets
    none, its own header removed too; an unknown deployment (``auth_header`` None)
    gets every client credential header removed."""
    if auth_header is None:
        return (), CLIENT_CREDENTIAL_HEADERS
    remove = tuple(h for h in CLIENT_CREDENTIAL_HEADERS if h != auth_header)
    if auth_value is None:
        return (), (*remove, auth_header)
    return ((auth_header, auth_value),), remove
