"""Loading a policy: the YAML file read and validated with path-named errors, then compiled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from extproc.policy.compiled import CompiledPolicy, compile_policy
from extproc.policy.schema import Policy, PolicyError

__all__ = ["load_policy", "parse_policy"]


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "<root>"


def parse_policy(data: Any, source: str = "<memory>") -> Policy:
    """Validate parsed YAML into a :class:`Policy`, with path-named errors."""
    if not isinstance(data, dict):
        raise PolicyError(source, ["<root>: the policy must be a YAML mapping"])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            lines.append(f"{_format_loc(loc)}: {err['msg']}")
        raise PolicyError(source, lines) from None


def load_policy(
    path: Path,
    *,
    env: Mapping[str, str] | None = None,
    allow_inline_credentials: bool = False,
) -> CompiledPolicy:
    """Read, validate and compile a policy file."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(source, [f"cannot read the policy file: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(source, [f"not valid YAML: {exc}"]) from None
    policy = parse_policy(data, source)
    return compile_policy(
        policy,
        source=source,
        base_dir=path.parent,
        env=env,
        allow_inline_credentials=allow_inline_credentials,
    )
