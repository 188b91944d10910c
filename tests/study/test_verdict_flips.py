"""scripts/verdict_flips.py: which verdicts of a study flip on a rerun."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("verdict_flips", ROOT / "scripts/verdict_flips.py")
vf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vf)


def _run(folder: Path, intervals: dict) -> Path:
    folder.mkdir()
    pairs = [{"a": "ssprompt", "b": "zero-shot",
              "tasks": {"novel": {m: {"delta": d, "lo": lo, "hi": hi}
                                  for m, (d, lo, hi) in intervals.items()}}}]
    (folder / "results.json").write_text(json.dumps({"intervals": {"pairs": pairs},
                                                     "study_wall_s": 600}))
    return folder


def test_flips_are_counted_and_written(tmp_path, capsys):
    a = _run(tmp_path / "a", {"mIoU": (3, 1, 5), "AP50": (1, -1, 3), "PQ": (-4, -6, -2)})
    b = _run(tmp_path / "b", {"mIoU": (2, -0.5, 4.5), "AP50": (1.2, -0.8, 3.2),
                              "PQ": (-4, -6.5, -1.5)})
    out = tmp_path / "robustness.md"
    assert vf.main([str(a), str(b), "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["n_verdicts"] == 3 and report["n_flips"] == 1
    assert [r["verdict"] for r in report["verdicts"] if r["flipped"]] == \
        ["ssprompt - zero-shot | novel | mIoU"]
    assert "**1 flip**" in out.read_text()
    assert "1 of 3 verdicts flip" in capsys.readouterr().out


def test_different_studies_are_refused(tmp_path, capsys):
    a = _run(tmp_path / "a", {"mIoU": (3, 1, 5)})
    b = _run(tmp_path / "b", {"PQ": (3, 1, 5)})
    assert vf.main([str(a), str(b), "--out", str(tmp_path / "r.md")]) == 2
    assert "not the same study" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_cells_that_move_and_reselect_are_counted():
    def cell(seed, miou, selected):
        return {"variant": "ssprompt", "task": "novel", "seed": seed, "mIoU": miou,
                "AP50": 50.0, "PQ": 40.0, "selection": {"selected": selected}}

    first = {"cells": [cell(0, 30.0, 40), cell(1, 31.0, "default"), cell(2, 32.0, 60)]}
    second = {"cells": [cell(0, 30.0, 40), cell(1, 31.5, "default"), cell(2, 33.0, 70)]}
    assert vf.cell_changes(first, second) == (3, 2, 1)
    assert vf.cell_changes(first, first) == (3, 0, 0)
