"""The policy package (``schema``); re-exports its names."""

from extproc.policy.schema import (
    CompiledDeployment,
    CompiledGroup,
    CompiledPolicy,
    CredentialRef,
    Deployment,
    ModelGroup,
    Policy,
    PolicyError,
    compile_policy,
    load_policy,
    parse_policy,
)

__all__ = [
    "CompiledDeployment",
    "CompiledGroup",
    "CompiledPolicy",
    "CredentialRef",
    "Deployment",
    "ModelGroup",
    "Policy",
    "PolicyError",
    "compile_policy",
    "load_policy",
    "parse_policy",
]
