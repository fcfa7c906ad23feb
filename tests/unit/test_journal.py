"""The spend journal's startup checks and lock, and where `extproc up` keeps it."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import extproc.cli.main as cli
from extproc.cli.up import default_state_dir
from extproc.state.settings import Settings, state_home
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


def _total(path: Path) -> int:
    return sum(int(json.loads(line)["v"]) for line in path.read_text().splitlines())


def test_a_failed_write_keeps_the_lines_for_the_next_flush(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = SpendJournal(state / "spend.jsonl")
    journal.record("{spend}:key:a", 10, None)  # no loop: written at once
    shutil.move(state, tmp_path / "moved")
    state.write_text("the directory is gone, a file is in its place")
    journal.record("{spend}:key:a", 20, None)  # fails: kept
    journal.record("{spend}:key:a", 30, None)  # fails again: both kept
    state.unlink()
    shutil.move(tmp_path / "moved", state)
    journal.flush()
    assert _total(state / "spend.jsonl") == 60  # nothing lost, nothing twice
    journal.close()


def test_a_batch_that_fails_part_way_is_not_counted_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spend.jsonl"
    journal = SpendJournal(path)
    journal.record("{spend}:key:a", 5, None)
    real_fsync = os.fsync
    failures = [OSError(errno.EIO, "Input/output error")]

    def flaky_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    journal.record("{spend}:key:a", 7, None)  # written, then fsync fails: cut off again
    assert _total(path) == 5
    journal.flush()
    assert _total(path) == 12
    journal.close()


async def test_a_failed_compaction_appends_instead_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spend.jsonl"
    store = MemoryStore(journal=path)
    await store.reserve("r1", ["{spend}:key:a"], limits=[None], amount=1, ttls_s=[None], hold_s=9)
    await store.settle("r1", ["{spend}:key:a"], 4, [None])
    (tmp_path / "spend.jsonl.tmp").mkdir()  # the compaction's temporary file cannot be made
    await store.close()
    assert "compaction failed" in caplog.text
    assert _total(path) == 4
    reopened = MemoryStore(journal=path)
    assert await reopened.get_many(["{spend}:key:a"]) == [4]
    await reopened.close()
