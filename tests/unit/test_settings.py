from __future__ import annotations

import pytest
from pydantic import ValidationError

from extproc.state.runtime import gateway_config
from extproc.state.settings import Settings


def test_env_prefix_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_GRPC_PORT", "6000")
    monkeypatch.setenv("EXTPROC_SESSION_HEADERS", "X-Litellm-Session-Id, X-Agent-Run")
    monkeypatch.setenv("EXTPROC_FAIL_MODE", "closed")
    monkeypatch.setenv("EXTPROC_STORE_URL", "redis://127.0.0.1:6390/0")
    settings = Settings()
    assert settings.grpc_address == "127.0.0.1:6000"
    assert settings.session_headers == ("x-litellm-session-id", "x-agent-run")
    assert settings.fail_mode == "closed"
    assert gateway_config(settings).session_headers == settings.session_headers


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EXTPROC_FAIL_MODE", "sometimes"),
        ("EXTPROC_GRPC_PORT", "70000"),
        ("EXTPROC_CLUSTER_HEADER", "x-envoy-upstream"),
        ("EXTPROC_CLUSTER_HEADER", "bad header"),
        ("EXTPROC_SESSION_HEADERS", "ok,bad header"),
        ("EXTPROC_UNKNOWN_PATHS", "drop"),
    ],
)
def test_invalid_settings(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_a_ctrl_c_wrapped_by_an_import_is_still_a_ctrl_c() -> None:
    """A KeyboardInterrupt raised while a class body is built comes back as the cause
    of a RuntimeError (``__set_name__``): the command line exits 130 for it too."""
    from extproc.cli.main import interrupted  # noqa: PLC0415

    wrapped = RuntimeError("Error calling __set_name__")
    wrapped.__cause__ = KeyboardInterrupt()
    assert interrupted(wrapped)
    assert not interrupted(RuntimeError("a real error"))
