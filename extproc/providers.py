"""How each upstream provider expects its credential to be presented."""

from __future__ import annotations

__all__ = ["CLIENT_CREDENTIAL_HEADERS", "auth_header_for"]

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
