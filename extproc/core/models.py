"""The model list: ``GET /v1/models`` and ``/v1/models/{id}``, answered by the gateway.

Rule: a caller sees exactly the model groups it may call, judged by the same
:func:`~extproc.core.access.check_model_access` the call path uses; with no keys in
the policy, every group. A group the call path would refuse by name is neither listed
nor found one by one (404 ``model_not_found``, as for an unknown name).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from extproc.core.access import Caller, check_model_access
from extproc.core.endpoints import ModelsTarget
from extproc.core.errors import GatewayError, ModelNotFoundError
from extproc.policy import CompiledGroup, CompiledPolicy

__all__ = ["CREATED", "OWNED_BY", "Answer", "answer_models", "may_use", "visible_groups"]

#: The fixed ``created`` (Unix seconds) and ``owned_by`` LiteLLM's proxy lists every
#: model group with; a group has no release date of its own.
CREATED = 1677610602
OWNED_BY = "openai"
#: ``CREATED`` as RFC 3339, for the Anthropic shape's ``created_at``.
_CREATED_AT = "2023-02-28T18:56:42Z"

#: The longest id echoed back in a 404's message.
_ECHO = 256

Shape = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Answer:
    """A response the gateway sends itself, with a 2xx status."""

    body: bytes
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)


def may_use(caller: Caller | None, group: CompiledGroup, policy: CompiledPolicy) -> bool:
    """Whether ``caller`` may call ``group`` by its name (the call path's access check;
    no caller: no keys, every group)."""
    if caller is None:
        return True
    try:
        check_model_access(
            caller,
            group.name,
            group.name,
            (d.provider for d in group.deployments),
            policy.access_groups,
        )
    except GatewayError:
        return False
    return True


def visible_groups(caller: Caller | None, policy: CompiledPolicy) -> tuple[CompiledGroup, ...]:
    """The groups ``caller`` may call by name, in the policy's order."""
    return tuple(g for g in policy.groups.values() if may_use(caller, g, policy))


def _entry(group: CompiledGroup, shape: Shape) -> dict[str, Any]:
    if shape == "anthropic":
        return {
            "type": "model",
            "id": group.name,
            "display_name": group.name,
            "created_at": _CREATED_AT,
            "lifecycle": "active",
        }
    return {"id": group.name, "object": "model", "created": CREATED, "owned_by": OWNED_BY}


def _page(entries: Iterable[dict[str, Any]], shape: Shape) -> dict[str, Any]:
    data = list(entries)
    if shape == "anthropic":
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    return {"object": "list", "data": data}


def answer_models(
    target: ModelsTarget, caller: Caller | None, policy: CompiledPolicy, shape: Shape
) -> Answer:
    """The list, or the one model ``target`` names; a 404 for a group the caller
    cannot see."""
    groups = visible_groups(caller, policy)
    if target.model is None:
        body: dict[str, Any] = _page((_entry(g, shape) for g in groups), shape)
    else:
        found = next((g for g in groups if g.name == target.model), None)
        if found is None:
            shown = target.model[:_ECHO].encode("unicode_escape").decode("ascii")
            raise ModelNotFoundError(
                f"The model `{shown}` does not exist or you do not have access to it.",
                param="model",
            )
        body = _entry(found, shape)
    return Answer(json.dumps(body, separators=(",", ":")).encode())
