"""The package layout: the pure core imports no runtime, I/O, clock or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "extproc" / "core"

#: Rule: the core takes the clock, the rng and ids as arguments, and never imports the
#: runtime, the adapters, the CLI, the Envoy config, or a network client.
FORBIDDEN = (
    "extproc.state",
    "extproc.adapters",
    "extproc.cli",
    "extproc.envoy",
    "extproc.dev",
    "grpc",
    "redis",
    "aiohttp",
    "time",
    "random",
    "uuid",
    "secrets",
)
#: Known exceptions, module → imports it may make anyway.
ALLOWED: dict[str, frozenset[str]] = {
    # The response side builds the dynamic-metadata Struct Envoy carries from the
    # ext_authz filter to ext_proc: protobuf message types only, no gRPC and no I/O.
    "metering": frozenset({"envoy.config.core.v3"}),
}


#: The store modules the core may import: the dataclasses of store effects and the
#: key builder (no store I/O).
STORE_ALLOWED = ("extproc.store.base", "extproc.store.keys")


def _forbidden(name: str) -> bool:
    if name.startswith("extproc.store"):
        return not any(name == s or name.startswith(s + ".") for s in STORE_ALLOWED)
    return any(name == f or name.startswith(f + ".") for f in (*FORBIDDEN, "envoy"))


def _imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))  # sub-packages (translate/) are the core too


def test_the_core_has_modules() -> None:
    assert len(_modules()) > 20


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_a_core_module_imports_nothing_impure(path: Path) -> None:
    allowed = ALLOWED.get(path.stem, frozenset())
    bad = [
        name
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        if _forbidden(name) and not any(name == a or name.startswith(a + ".") for a in allowed)
    ]
    assert not bad, f"extproc/core/{path.relative_to(CORE)} imports {bad}"
