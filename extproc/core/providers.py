"""How each upstream provider expects its credential to be presented."""

from __future__ import annotations

__all__ = [
    "ANTHROPIC_API",
    "CLIENT_CREDENTIAL_HEADERS",
    "OPENAI_COMPATIBLE",
    "auth_header_for",
    "credential_edits",
    "model_prefix_provider",
]

# Rule: every header a client could use to present a credential is listed here, so
# the gateway strips all of them before it injects the deployment's own.
CLIENT_CREDENTIAL_HEADERS: tuple[str, ...] = ("authorization", "x-api-key", "api-key")

_AUTH_STYLE: dict[str, tuple[str, str]] = {
    "anthropic": ("x-api-key", ""),
    "azure": ("api-key", ""),
    "azure_ai": ("api-key", ""),
}


#: Providers that speak Anthropic's Messages API.
ANTHROPIC_API = frozenset({"anthropic"})
#: Providers known to speak OpenAI's API (their own or a compatible one); a provider
#: outside both sets is treated as OpenAI-compatible, and ``extproc check`` says so.
OPENAI_COMPATIBLE = frozenset(
    {
        "openai",
        "azure",
        "azure_ai",
        "groq",
        "mistral",
        "deepseek",
        "together_ai",
        "fireworks_ai",
        "openrouter",
        "perplexity",
        "xai",
        "cerebras",
        "deepinfra",
        "ollama",
        "vllm",
        "hosted_vllm",
        "lm_studio",
        "nvidia_nim",
        "sambanova",
        "litellm_proxy",
    }
)
#: LiteLLM's provider prefixes of model names (``azure/gpt-4o``) that name a provider
#: with its own API, credential header or path: a mismatch with ``provider`` is a
#: deployment configured for one provider and called like another.
_MODEL_PREFIXES = frozenset(
    {
        *OPENAI_COMPATIBLE,
        *ANTHROPIC_API,
        "bedrock",
        "vertex_ai",
        "gemini",
        "cohere",
        "sagemaker",
        "watsonx",
        "huggingface",
        "replicate",
    }
)


def model_prefix_provider(model: str) -> str | None:
    """The provider a LiteLLM-style model string names (``anthropic/claude-3``), if any."""
    prefix, sep, _ = model.partition("/")
    return prefix if sep and prefix in _MODEL_PREFIXES else None


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
