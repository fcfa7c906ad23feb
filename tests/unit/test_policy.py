from __future__ import annotations

from pathlib import Path

import pytest

from extproc.policy import PolicyError, load_policy
from extproc.state.settings import DEFAULT_POLICY

POLICIES = Path(__file__).resolve().parent.parent / "policies"
INVALID = sorted((POLICIES / "invalid").glob("*.yaml"))
ENV = {"TEST_KEY_A": "sk-a", "TEST_KEY_B": "sk-b", "TEST_KEY_C": "sk-c", "X": "x"}


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: '"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policy_names_the_path(path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(path, env=ENV)
    joined = "\n".join(info.value.errors)
    assert _expected(path) in joined
    assert str(path) in str(info.value)


def test_inline_secret_never_in_error() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(POLICIES / "invalid" / "inline_credential.yaml")
    assert "sk-inline-secret" not in str(info.value)


def test_inline_credential_allowed_by_setting() -> None:
    policy = load_policy(
        POLICIES / "invalid" / "inline_credential.yaml", allow_inline_credentials=True
    )
    dep = policy.groups["auto"].deployments[0]
    assert dep.auth_value == "Bearer sk-inline-secret"
    assert "sk-inline-secret" not in repr(dep)


def test_valid_policy_compiles_credentials_per_provider() -> None:
    policy = load_policy(POLICIES / "valid.yaml", env=ENV)
    auto = policy.groups["auto"]
    assert [d.id for d in auto.deployments] == ["dep-a", "dep-b"]
    assert auto.cumulative_weights == (3.0, 4.0)
    a = auto.deployments[0]
    assert (a.auth_header, a.auth_value) == ("authorization", "Bearer sk-a")
    claude = policy.groups["claude"].deployments[0]
    assert (claude.auth_header, claude.auth_value) == ("x-api-key", "sk-c")
    azure = policy.groups["azure-gpt"].deployments[0]
    # read from a file relative to the policy, trailing newline stripped
    assert (azure.auth_header, azure.auth_value) == ("api-key", "azure-secret-value")
    assert policy.groups["open"].deployments[0].auth_value is None
    assert policy.clusters == {"mock_a", "mock_b", "mock_c"}


def test_credential_with_line_break_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "model_groups: [{name: g, deployments: [{id: a, cluster: c, model: m, "
        "credential: {env: BAD}}]}]"
    )
    with pytest.raises(PolicyError, match="printable ASCII"):
        load_policy(path, env={"BAD": "sk\r\nx-evil: 1"})


def test_example_policy_is_valid() -> None:
    env = {
        "EXTPROC_MOCK_KEY_A": "a",
        "EXTPROC_MOCK_KEY_B": "b",
        "EXTPROC_MOCK_KEY_ANTHROPIC": "c",
    }
    policy = load_policy(DEFAULT_POLICY, env=env)
    assert len(policy.groups["auto"].deployments) >= 2
