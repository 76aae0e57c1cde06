"""Atomic writes and the quarantine folder."""

from __future__ import annotations

import os
import stat

import pytest

from lemonade_inferos import durable


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state" / "file.json"
    durable.atomic_write(path, "one")
    durable.atomic_write(path, b"two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["file.json"]


def test_a_secret_is_written_user_only(tmp_path):
    path = tmp_path / "token"
    durable.atomic_write(path, "s3cret", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "file"
    durable.atomic_write(path, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        durable.atomic_write(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["file"]


def test_quarantine_moves_the_file_aside_and_names_it(tmp_path, home, caplog):
    bad = tmp_path / "history.jsonl"
    bad.write_bytes(b"\xff\xfe")
    target = durable.quarantine(bad, "not UTF-8")
    assert not bad.exists() and target.parent == home / "quarantine" and target.read_bytes() == b"\xff\xfe"
    assert str(bad) in caplog.text and "not UTF-8" in caplog.text


def test_the_quarantine_folder_is_bounded(tmp_path, home, monkeypatch):
    monkeypatch.setattr(durable, "QUARANTINE_MAX_FILES", 3)
    for index in range(6):
        bad = tmp_path / f"bad{index}"
        bad.write_text("x")
        durable.quarantine(bad, "test")
    assert len(list((home / "quarantine").iterdir())) == 3
