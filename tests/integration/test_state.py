"""Where a gateway keeps its state: the spend journal, named at startup, never shared.

Tests run as root, where permission bits stop nothing: the unwritable paths here fail
for root too (a path that is a directory, a path under a regular file, under /proc).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from extproc.state.settings import DEFAULT_POLICY
from tests.helpers import PYTHON, ROOT, free_port
from tests.integration.stack import KEYS, VALID_POLICY
from tests.integration.test_lifecycle import chat, running_up


def _a_directory(tmp_path: Path) -> Path:
    return tmp_path


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text("not a directory")
    return tmp_path / "plain" / "state" / "spend.jsonl"


def _under_proc(tmp_path: Path) -> Path:
    del tmp_path
    return Path("/proc/extproc-no-such-dir/spend.jsonl")


UNWRITABLE: list[Callable[[Path], Path]] = [_a_directory, _under_a_file, _under_proc]


@pytest.mark.parametrize("where", UNWRITABLE, ids=lambda f: f.__name__.strip("_"))
def test_serve_refuses_an_unwritable_journal_in_one_line(
    tmp_path: Path, where: Callable[[Path], Path]
) -> None:
    journal = where(tmp_path)
    env = {
        **os.environ,
        **KEYS,
        "EXTPROC_POLICY_PATH": str(VALID_POLICY),
        "EXTPROC_SPEND_JOURNAL": str(journal),
        "EXTPROC_GRPC_PORT": str(free_port()),
        "EXTPROC_ADMIN_PORT": str(free_port()),
    }
    result = subprocess.run(
        [PYTHON, "-m", "extproc", "serve"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"extproc serve: cannot write the spend journal {journal}")
    assert "EXTPROC_SPEND_JOURNAL" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("where", UNWRITABLE, ids=lambda f: f.__name__.strip("_"))
def test_up_refuses_an_unwritable_state_dir_before_starting_anything(
    tmp_path: Path, where: Callable[[Path], Path]
) -> None:
    state = where(tmp_path)
    if state == tmp_path:  # a state directory whose journal path is a directory
        (state / "spend.jsonl").mkdir()
    else:
        state = state.parent
    result = subprocess.run(
        [PYTHON, "-m", "extproc", "up", "--state-dir", str(state), "--port", str(free_port())],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"extproc up: cannot write the spend journal {state}")
    assert "--state-dir" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "ready at" not in result.stdout


def test_a_second_server_on_one_journal_is_refused(tmp_path: Path) -> None:
    """Two processes compacting one journal would drop each other's spend."""
    from tests.integration.stack import start_server  # noqa: PLC0415

    with start_server(tmp_path) as _:
        result = subprocess.run(
            [PYTHON, "-m", "extproc", "serve"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={
                **os.environ,
                **KEYS,
                "EXTPROC_POLICY_PATH": str(VALID_POLICY),
                "EXTPROC_SPEND_JOURNAL": str(tmp_path / "spend.jsonl"),
                "EXTPROC_GRPC_PORT": str(free_port()),
                "EXTPROC_ADMIN_PORT": str(free_port()),
            },
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"extproc serve: the spend journal {tmp_path / 'spend.jsonl'} is in use by another "
        "extproc process (EXTPROC_SPEND_JOURNAL)"
    )


def _global_spend(admin_url: str) -> float:
    with urllib.request.urlopen(f"{admin_url}/budgets", timeout=5) as resp:  # noqa: S310
        budgets = json.load(resp)["budgets"]
    return float(next(b["spend"] for b in budgets if b["kind"] == "global"))


def test_up_keeps_one_journal_per_policy(tmp_path: Path) -> None:
    """Without --state-dir, each policy file gets its own journal under the state home
    (named in the banner); the same policy finds its spend again on its next run."""
    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["general_settings"] = {"max_budget": 100}
    policies = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        policies.append(tmp_path / name / "policy.yaml")
        policies[-1].write_text(yaml.safe_dump(data))
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    state_home = home / ".local" / "state" / "extproc" / "up"

    with running_up(tmp_path, "--policy", str(policies[0]), env=env, name="a1") as first:
        for _ in range(3):
            chat(first.url)
        spent = _global_spend(first.admin_url)
        journal_a = Path(first.journal())
        assert first.stop(signal.SIGINT, group=True) == 0  # Ctrl-C: compacts the journal
    assert spent > 0
    assert journal_a.parent.parent == state_home
    assert journal_a.read_text()  # what was spent is on disk

    with running_up(tmp_path, "--policy", str(policies[1]), env=env, name="b") as other:
        journal_b = Path(other.journal())
        assert journal_b != journal_a
        assert journal_b.parent.parent == state_home
        assert _global_spend(other.admin_url) == 0  # nothing of policy a's spend
        chat(other.url)
        assert other.stop(signal.SIGTERM) == 0

    with running_up(tmp_path, "--policy", str(policies[0]), env=env, name="a2") as again:
        assert Path(again.journal()) == journal_a
        assert _global_spend(again.admin_url) == pytest.approx(spent)
        assert again.stop(signal.SIGTERM) == 0
    for name in ("a1", "b", "a2"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text()
