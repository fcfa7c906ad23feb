"""Policy reload: the snapshot is swapped whole, and a bad file changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.gateway import Gateway
from extproc.policy import load_policy
from extproc.settings import Settings
from extproc.store import MemoryStore

ONE = "model_groups: [{name: first, deployments: [{id: a, cluster: c, model: m}]}]\n"
TWO = ONE + "  - {name: second, deployments: [{id: b, cluster: c, model: m}]}\n"


def test_reload_swaps_policy_and_keeps_old_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ONE)
    gateway = Gateway(Settings(policy_path=path), load_policy(path), MemoryStore())
    old = gateway.policy
    path.write_text(TWO.replace("model_groups: [", "model_groups:\n  - ").replace("]}]\n", "]}\n"))
    assert gateway.reload_policy()
    assert set(gateway.policy.groups) == {"first", "second"}
    assert gateway.policy is not old

    current = gateway.policy
    path.write_text("model_groups: [{name: broken, deployments: [{id: a, model: m}]}]")
    assert not gateway.reload_policy()
    assert gateway.policy is current
    assert "model_groups[0].deployments[0].cluster: Field required" in caplog.text
    assert gateway.metrics.policy_reloads.labels("error")._value.get() == 1
