"""The study end to end (quick config): outputs, determinism, and resume after a real SIGKILL."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssprompt.errors import UserError
from ssprompt.study import load_config

ROOT = Path(__file__).resolve().parents[2]
METRIC_COLS = ("variant", "task", "seed", "mIoU", "AP50", "PQ")


def _study(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ssprompt.cli", "study", "--quick",
                             "--device", "cpu", "--out", str(out), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(run: Path) -> list[tuple]:
    with open(run / "results.csv") as f:
        return [tuple(r[c] for c in METRIC_COLS) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "full"
    p = _study(out)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    return out


def test_quick_study_writes_every_output(full_run):
    for name in ("results.csv", "results.json", "summary.md", "config.yaml", "variants.png",
                 "ablation_n_prompts.png", "fusion_weights.png", "loss_curves.png"):
        assert (full_run / name).exists(), name
    cfg = load_config(ROOT / "configs" / "quick.yaml")
    rows = _metrics(full_run)
    assert len(rows) == len(cfg.cells())
    summary = (full_run / "summary.md").read_text()
    assert "ssprompt" in summary and "**" in summary
    assert not list(full_run.rglob("*.tmp"))
    # every cell keeps its per-image test statistics; every Δ to zero-shot has an interval
    assert len(list((full_run / "cells").glob("*.stats.npz"))) == len(rows)
    assert "Differences with 95% intervals" in summary
    assert "points below their zero-shot baseline" in summary   # the loss check always reports
    import json
    iv = json.loads((full_run / "results.json").read_text())["intervals"]
    # every row's Δ to its baseline first, then the configured comparisons
    assert [e["a"] for e in iv["pairs"]] == [v.name for v in cfg.variants[1:]] + [
        a for a, _ in cfg.comparisons]
    base = {e["a"]: e["b"] for e in iv["pairs"][:len(cfg.variants) - 1]}  # own grid's zero-shot
    assert base["ssprompt-N25"] == "zero-shot-N25" and base["zero-shot-N25"] == "zero-shot"
    d = iv["pairs"][0]["tasks"]["shift"]["mIoU"]
    assert d["lo"] <= d["delta"] <= d["hi"]


def test_committed_files_recompute_every_interval(full_run, tmp_path):
    """What a study commits (config, results.json, summary.md, per_image.npz; no cells/) is
    enough to recompute every interval, and the recompute script finds them equal; a changed
    interval or a damaged record is reported."""
    import json
    import shutil

    committed = tmp_path / "committed"
    committed.mkdir()
    for name in ("config.yaml", "results.json", "summary.md", "per_image.npz"):
        shutil.copy(full_run / name, committed / name)
    script = [sys.executable, str(ROOT / "scripts" / "recompute_intervals.py")]
    r = subprocess.run([*script, str(committed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every interval reproduced" in r.stdout
    res = json.loads((committed / "results.json").read_text())
    # the primary family is Holm-adjusted, the rest has q-values
    d = res["intervals"]["pairs"][0]["tasks"]["shift"]["mIoU"]
    assert d["family"] == "exploratory" and ("q" in d or d.get("zero_inflated"))
    assert res["intervals"]["multiplicity"]["primary"] == [["ssprompt", "zero-shot"],
                                                           ["ssprompt-N25", "ssprompt"]]
    d["hi"] += 0.5
    (committed / "results.json").write_text(json.dumps(res))
    r = subprocess.run([*script, str(committed)], capture_output=True, text=True)
    assert r.returncode == 1 and "recomputed" in r.stdout


def test_shots_sweep(tmp_path):
    """``shots: [k, ...]`` runs each learned variant once per k (NAME-kK, k shots each), the
    fixed ones once, and plots metric vs k."""
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(
        "name: sweep\ntasks: [novel]\nseeds: [0]\nshots: [1, 2, 8]\nn_test: 6\n"
        "train: {steps: 3, batch: 4}\nselection: {every: 3, report_raw: false}\nvariants:\n"
        "  - {name: zero-shot, kind: zero_shot, role: baseline}\n  - {name: ssprompt, kind: weighted}\n"
        "comparisons:\n  - [ssprompt-k8, ssprompt-k2]\n")
    cfg = load_config(cfg_path)
    assert [(v.name, cfg.shots_of(v)) for v in cfg.variants] == [
        ("zero-shot", 8), ("ssprompt-k1", 1), ("ssprompt-k2", 2), ("ssprompt-k8", 8)]
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ssprompt.cli", "study", "--config", str(cfg_path),
                        "--device", "cpu", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    res = json.loads((out / "results.json").read_text())
    shots = {c["variant"]: c["shots"] for c in res["cells"]}
    assert shots == {"zero-shot": 8, "ssprompt-k1": 1, "ssprompt-k2": 2, "ssprompt-k8": 8}
    k1 = [c for c in res["cells"] if c["variant"] == "ssprompt-k1"][0]
    assert k1["selection"]["selected"] == "default"          # one shot: nothing to validate on
    assert (out / "shots.png").exists()
    summary = (out / "summary.md").read_text()
    assert "ssprompt-k8 − ssprompt-k2" in summary and "k = 1, 2, 8 shots" in summary


def test_killed_study_resumes_to_identical_numbers(full_run, tmp_path):
    out = tmp_path / "killed"
    p = _study(out)
    cells = out / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cells.glob("*.json"))) < 3:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = {f.name: f.stat().st_mtime_ns for f in cells.glob("*.json")}
    assert 3 <= len(finished) < len(load_config(ROOT / "configs" / "quick.yaml").cells())
    assert not (out / "results.csv").exists()

    p = _study(out)
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    for name, mtime in finished.items():  # finished cells were not redone
        assert (cells / name).stat().st_mtime_ns == mtime
    assert _metrics(out) == _metrics(full_run)  # same config + seeds -> identical numbers


def test_workers_give_the_numbers_of_one_process(full_run, tmp_path):
    # whole (variant, task) groups go to each worker, at the same torch thread count as the
    # one-process run (OMP_NUM_THREADS=1): every cell must come out identical
    import json

    out = tmp_path / "workers"
    p = _study(out, "--workers", "2")
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    assert "2 workers x 1 thread" in stderr
    assert _metrics(out) == _metrics(full_run)
    cells = [json.loads(f.read_text()) for f in (out / "cells").glob("*.json")]
    assert len(cells) == len(load_config(ROOT / "configs" / "quick.yaml").cells())
    assert {c["torch_threads"] for c in cells} == {1}


def test_a_failing_worker_stops_the_study_with_one_line(tmp_path):
    from tqdm import tqdm

    from ssprompt.study.runner import _run_workers, study_groups

    cfg = load_config(ROOT / "configs" / "quick.yaml")
    args = dict(config=str(tmp_path / "missing.yaml"), sets=None, sfm="embedded",
                checkpoint=None, device="cpu", cache_dir=None, cells_dir=str(tmp_path))
    with pytest.raises(UserError,
                       match=r"study worker \d: .*missing.yaml: study config not found") as e:
        _run_workers(study_groups(cfg)[:2], 2, 1, tqdm(disable=True), args)
    assert "\n" not in str(e.value)


def test_cells_of_other_sfm_weights_are_run_again(full_run, tmp_path):
    # the same config with other weights (a re-pretrained SFM) must not resume the old cells
    import json
    import shutil

    from cli_helpers import save_tiny_embedded
    from ssprompt.sfm.embedded import file_hash

    out = tmp_path / "other-sfm"
    shutil.copytree(full_run, out)
    weights = save_tiny_embedded(tmp_path / "tiny.safetensors")
    p = _study(out, "--checkpoint", str(weights))
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    cells = [json.loads(f.read_text()) for f in (out / "cells").glob("*.json")]
    assert cells and {c["weights_hash"] for c in cells} == {file_hash(weights)}
    assert _metrics(out) != _metrics(full_run)


def test_changed_config_refuses_to_mix(full_run, tmp_path):
    cfg = tmp_path / "other.yaml"
    text = (ROOT / "configs" / "quick.yaml").read_text().replace("shots: 4", "shots: 3")
    cfg.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ssprompt.cli", "study", "--config", str(cfg),
                        "--out", str(full_run)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "different config" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unknown_config_key_is_rejected(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs" / "quick.yaml").read_text() + "learning_rate: 3\n")
    with pytest.raises(UserError, match="learning_rate"):
        load_config(cfg)
    cfg.write_text((ROOT / "configs" / "quick.yaml").read_text().replace(
        "role: baseline}", "role: baseline, colour: red}"))
    with pytest.raises(UserError, match="colour"):
        load_config(cfg)


def test_comparisons_must_name_study_variants(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs" / "quick.yaml").read_text()
                   + "comparisons:\n  - [ssprompt, nonexistent]\n")
    with pytest.raises(UserError, match=r"comparisons\[0\]"):
        load_config(cfg)


def test_cells_far_below_the_baseline_are_listed():
    """A seed that collapses is listed even when the row's mean looks harmless; a cell within
    the loss margin, the baseline itself and other seeds' baselines are not."""
    from ssprompt.study.aggregate import worse_cells
    from ssprompt.study.config import LARGE_LOSS
    from ssprompt.study.report import _worse_table

    cfg = load_config(ROOT / "configs" / "quick.yaml")
    base, other = cfg.variants[0].name, cfg.variants[1].name

    def row(variant, seed, miou, ap50, pq, kept=None):
        return {"variant": variant, "task": "novel", "seed": seed, "mIoU": miou, "AP50": ap50,
                "PQ": pq, "selection": {"selected": kept}}

    rows = [row(base, 0, 30.0, 60.0, 50.0), row(base, 1, 30.0, 60.0, 50.0),
            row(other, 0, 31.0, 60.0 - LARGE_LOSS + 0.5, 50.0, kept=40),     # small loss: fine
            row(other, 1, 30.0, 12.0, 49.0, kept=80)]                        # collapse
    worse = worse_cells(cfg, rows)
    assert [(w["variant"], w["seed"], w["selected"]) for w in worse] == [(other, 1, 80)]
    assert worse[0]["metrics"] == {"AP50": [12.0, 60.0]}
    table = "\n".join(_worse_table(cfg, worse))
    assert "AP50 12.0 vs 60.0 (-48.0)" in table
    assert "None" in "\n".join(_worse_table(cfg, worse_cells(cfg, rows[:3])))


def test_roles_and_per_grid_baselines():
    """Every row's Δ is taken against the zero-shot row with its own grid (same N); a zero-shot
    row at another N against the baseline (the grid's own effect); roles name the rows."""
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.baseline == "zero-shot" and cfg.full == "ssprompt"
    assert cfg.baseline_of("zero-shot") is None
    assert cfg.baseline_of("ssprompt") == "zero-shot"
    assert cfg.baseline_of("learned-only") == "zero-shot"
    for n in (25, 50, 200):
        assert cfg.baseline_of(f"ssprompt-N{n}") == f"zero-shot-N{n}"
        assert cfg.baseline_of(f"zero-shot-N{n}") == "zero-shot"
    assert len(cfg.seeds) >= 8


def test_old_and_missing_config_keys_get_one_clear_error(tmp_path):
    text = (ROOT / "configs" / "quick.yaml").read_text()
    cfg = tmp_path / "old.yaml"
    cfg.write_text(text.replace("kind: zero_shot, role: baseline", "mode: default"))
    with pytest.raises(UserError, match="'mode' is now called 'kind'"):
        load_config(cfg)
    cfg.write_text(text.replace(", role: baseline", ""))
    with pytest.raises(UserError, match="role: baseline"):
        load_config(cfg)
    cfg.write_text(text.replace("kind: vanilla_2d", "kind: vanilla"))
    with pytest.raises(UserError, match="kind 'vanilla' is unknown"):
        load_config(cfg)
    cfg.write_text(text.replace("kind: zero_shot, role: baseline",
                                "kind: zero_shot, role: baseline, weight: dim"))
    with pytest.raises(UserError, match="'weight' is now called 'weight_shape'"):
        load_config(cfg)
