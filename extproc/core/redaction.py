"""Deployment credentials never reach a client, even when an upstream echoes them.

Some upstreams (proxies, misconfigured providers, debugging endpoints) repeat the
request's API key in an error body or a header. The gateway injected that key, so it
takes it out again: every occurrence of any deployment credential of the policy, as
sent and as a JSON string would escape it, becomes ``[REDACTED]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["REDACTED", "Redactor"]

REDACTED = "[REDACTED]"
#: Shorter credentials are not redacted: replacing every "abc" in a body would
#: mangle it, and no provider issues keys that short.
MIN_SECRET_CHARS = 8


class Redactor:
    """Finds and replaces a fixed set of secrets in bytes and header values."""

    __slots__ = ("_forms", "_text")

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[bytes] = set()
        for secret in secrets:
            if len(secret) < MIN_SECRET_CHARS:
                continue
            forms.add(secret.encode())
            forms.add(json.dumps(secret)[1:-1].encode())  # "/" is not escaped; '"' and '\\' are
        # longest first: a secret that contains another is replaced whole
        self._forms = tuple(sorted(forms, key=len, reverse=True))
        self._text = tuple(form.decode() for form in self._forms)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def found(self, data: bytes) -> bool:
        """Whether ``data`` holds any of the secrets."""
        return any(form in data for form in self._forms)

    def bytes(self, data: bytes) -> bytes | None:
        """``data`` with every secret replaced, or None when it holds none."""
        found = False
        for form in self._forms:
            if form in data:
                data = data.replace(form, REDACTED.encode())
                found = True
        return data if found else None

    def text(self, value: str) -> str | None:
        """A header value with every secret replaced, or None when it holds none."""
        found = False
        for form in self._text:
            if form in value:
                value = value.replace(form, REDACTED)
                found = True
        return value if found else None
