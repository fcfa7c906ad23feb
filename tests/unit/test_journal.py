"""The spend journal's startup checks and lock, and where `extproc up` keeps it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from extproc import cli
from extproc.launcher import default_state_dir
from extproc.settings import Settings, state_home
from extproc.store import MemoryStore
from extproc.store.journal import JournalError, SpendJournal, check_journal


def test_unusable_paths_are_one_line_errors_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file")
    cases = {
        tmp_path: "Is a directory",
        tmp_path / "plain" / "spend.jsonl": "Not a directory",
        tmp_path / "plain" / "deeper" / "spend.jsonl": "Not a directory",
        Path("/proc/extproc-no-such-dir/spend.jsonl"): "No such file or directory",
    }
    for path, reason in cases.items():
        with pytest.raises(JournalError) as info:
            SpendJournal(path)
        message = str(info.value)
        assert message.startswith(f"cannot write the spend journal {path}: {reason}")
        assert "\n" not in message


def test_one_process_holds_a_journal_until_it_closes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spend.jsonl"
    check_journal(path)  # a check makes the directory and holds nothing
    assert path.exists()
    journal = SpendJournal(path)
    with pytest.raises(JournalError, match="in use by another extproc process"):
        SpendJournal(path)
    with pytest.raises(JournalError, match="in use"):
        check_journal(path)
    journal.close()
    journal.close()  # twice is harmless
    SpendJournal(path).close()


async def test_store_close_lets_the_journal_go(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    store = MemoryStore(journal=path)
    assert store.journal_path == path
    await store.close()
    reopened = MemoryStore(journal=path)
    await reopened.close()
    assert MemoryStore().journal_path is None


def test_up_state_dir_is_one_per_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = default_state_dir(Path("a/policy.yaml"))
    assert first == default_state_dir(tmp_path / "a" / "policy.yaml")  # same file, same dir
    assert first != default_state_dir(Path("b/policy.yaml"))  # same name, other file
    assert first.parent == tmp_path / "home" / ".local" / "state" / "extproc" / "up"
    assert first.name.startswith("policy-")


def test_serve_default_journal_follows_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXTPROC_SPEND_JOURNAL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_home() == tmp_path / ".local" / "state" / "extproc"
    assert Settings().spend_journal == str(state_home() / "spend.jsonl")


def test_ctrl_c_while_a_command_starts_is_a_quiet_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_keys", interrupted)
    assert cli.main(["keys", "new"]) == 130
