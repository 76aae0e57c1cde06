"""The history file survives damage: bad lines are set aside, the good ones kept."""

from __future__ import annotations

import json

from lemonade_inferos.metrics.recorder import History


def test_a_damaged_history_file_is_quarantined_and_its_good_entries_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROS_HOME", str(tmp_path / "home"))
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"kind": "policy", "n": 1}\n\xff\xfe garbage\n42\n[1, 2]\n{"kind": "config", "n": 2}\n{"torn": ')
    history = History(path)
    assert [e["n"] for e in history.entries()] == [1, 2]
    assert history.entries(kind="x") == [] and history.entries(kind="config")[0]["n"] == 2
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2]
    assert len(list((tmp_path / "home" / "quarantine").iterdir())) == 1


def test_entries_that_json_cannot_encode_are_written_as_text(tmp_path):
    history = History(tmp_path / "history.jsonl")
    history.append({"kind": "fallback", "error": RuntimeError("boom")})
    assert "boom" in History(tmp_path / "history.jsonl").entries()[0]["error"]
