"""ssprompt.engine.train: fault injection (a non-finite loss stops training with one error line
and no partial result)."""

from __future__ import annotations

import pytest
from cli_helpers import assert_one_error_line, save_tiny_embedded

RESULT_FILES = ("metrics.json", "prompts.safetensors", "config.json", "loss.csv")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_embedded(tmp_path_factory.mktemp("sfm") / "tiny.safetensors", 0)


def assert_no_results(out) -> None:
    for name in RESULT_FILES:
        assert not (out / name).exists(), f"partial output {out / name}"
    if out.exists():
        assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_non_finite_loss_stops_training(tiny, tmp_path, monkeypatch, capsys):
    import ssprompt.sfm.losses
    import ssprompt.engine.train
    from ssprompt.cli import main

    def nan_losses(out, groups, w=None):
        return [(out.mask_logits.sum() * float("nan"), {"cls": 0.0, "bce": 0.0, "dice": 0.0})
                for _ in groups]

    monkeypatch.setattr(ssprompt.sfm.losses, "set_losses", nan_losses)
    monkeypatch.setattr(ssprompt.engine.train, "set_losses", nan_losses)
    out = tmp_path / "o"
    rc = main(["train", "--task", "shift", "--steps", "2", "--shots", "2", "--n-test", "2",
               "--n-prompts", "10", "--checkpoint", str(tiny), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "nan" in assert_one_error_line(err, "loss", erased_ok=True).lower()
    assert_no_results(out)
