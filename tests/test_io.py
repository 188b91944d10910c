"""ssprompt.io: atomic JSON writes (a crash mid-write keeps the previous file)."""

from __future__ import annotations

import json

import pytest


def test_write_json_atomic(tmp_path):
    from ssprompt.io import write_json

    p = tmp_path / "d" / "metrics.json"
    write_json(p, {"mIoU": 1.5, "bad": float("nan")})
    assert json.loads(p.read_text()) == {"mIoU": 1.5, "bad": None}
    assert sorted(x.name for x in p.parent.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("where", ["dumps", "write", "replace"])
def test_write_json_crash_keeps_previous_file(tmp_path, monkeypatch, where):
    import ssprompt.io as sio

    p = tmp_path / "metrics.json"
    sio.write_json(p, {"mIoU": 1.0})
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk on fire")

    if where == "dumps":
        monkeypatch.setattr(sio.json, "dumps", boom)
    elif where == "write":
        monkeypatch.setattr(sio.os, "fsync", boom)  # after a partial write, before the rename
    else:
        monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        sio.write_json(p, {"mIoU": 2.0, "more": list(range(1000))})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left
