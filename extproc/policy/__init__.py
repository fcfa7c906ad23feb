"""The policy: its schema (``schema``), its compiled snapshot (``compiled``) and the loader
(``loader``). The names are re-exported here, so ``from extproc.policy import ...`` reads
the same whichever module holds them.
"""

from extproc.policy.compiled import (
    CompiledDeployment,
    CompiledGroup,
    CompiledPolicy,
    compile_policy,
)
from extproc.policy.loader import load_policy, parse_policy
from extproc.policy.schema import CredentialRef, Deployment, ModelGroup, Policy, PolicyError

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
