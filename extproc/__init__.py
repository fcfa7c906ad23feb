"""extproc: an LLM policy engine that plugs into Envoy through ext_proc and ext_authz."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
