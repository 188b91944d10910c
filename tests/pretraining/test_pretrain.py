"""Pretraining data pipeline: fresh scenes per step, geometric warp that keeps labels aligned,
and a short end-to-end run that writes loadable weights."""

import json

import numpy as np
import torch

from ssprompt.pretraining.pretrain import (batch_targets, fresh_scenes, precision_context, pretrain,
                               scene_batches, train_step, warp)


def test_fresh_scenes_are_new_every_step_and_reproducible():
    a0, a1 = fresh_scenes(0, 2, seed=0), fresh_scenes(1, 2, seed=0)
    again = fresh_scenes(0, 2, seed=0)
    other_seed = fresh_scenes(0, 2, seed=1)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a0, again))
    assert not np.array_equal(a0[0][0], a1[0][0])
    assert not np.array_equal(a0[0][0], other_seed[0][0])


def test_warp_moves_image_and_instance_map_together():
    # each instance gets its own flat colour; after the warp the colour nearest to each pixel
    # must name the pixel's instance (bilinear mixing only blurs the borders of regions)
    b, h = 4, 48
    inst = torch.zeros(b, h, h, dtype=torch.long)
    inst[:, 5:25, 5:30] = 1
    inst[:, 28:45, 10:40] = 2
    inst[:, 10:40, 33:46] = 3
    palette = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    images = palette[inst].permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(3)
    wi, wl = warp(images, inst, g)
    assert wi.shape == images.shape and wl.shape == inst.shape
    assert not torch.equal(wl, inst)  # something moved
    nearest = torch.cdist(wi.permute(0, 2, 3, 1).reshape(-1, 3), palette).argmin(1)
    agree = (nearest == wl.flatten()).float().mean()
    assert agree > 0.97, float(agree)


def test_batch_targets_drop_segments_warped_out_of_view():
    scenes = fresh_scenes(0, 4, seed=0)
    images, targets = batch_targets(scenes, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 96, 96) and 0 <= images.min() and images.max() <= 1
    for (labels, masks), (_, _, segs) in zip(targets, scenes):
        assert labels.shape[0] == masks.shape[0] <= len(segs)
        assert (masks.flatten(1).sum(1) >= 8).all()
        assert not (masks.sum(0) > 1).any()  # segments never overlap


def test_pretrain_runs_a_few_steps_and_writes_loadable_weights(tmp_path):
    from ssprompt.sfm.embedded import load_embedded

    info = pretrain(tmp_path, steps=3, batch=2, log_every=2, warmup=1)
    assert info["steps"] == 3 and info["images_seen"] == 6
    log = (tmp_path / "pretrain_log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and [r.split(",")[0] for r in log[1:]] == ["2", "3"]
    saved = json.loads((tmp_path / "pretrain_info.json").read_text())
    assert saved["weights_sha256_16"] == info["weights_sha256_16"]
    model = load_embedded(tmp_path / "embedded_sfm.safetensors")
    assert not any(p.requires_grad for p in model.parameters())


def test_scene_batches_are_the_same_in_a_worker_process():
    here, worker = scene_batches(2, seed=3, workers=0), scene_batches(2, seed=3, workers=1)
    for _ in range(2):
        (a, ta), (b, tb) = next(here), next(worker)
        assert torch.equal(a, b)
        for (la, ma), (lb, mb) in zip(ta, tb):
            assert torch.equal(la, lb) and torch.equal(ma, mb)


def test_bf16_step_keeps_fp32_weights_and_fp32_off_switch():
    from ssprompt.data.scenes import CLASS_NAMES, TASKS
    from ssprompt.prompts.layout import grid_layout
    from ssprompt.sfm.embedded import EmbeddedSFM
    from ssprompt.sfm.modeling.text_encoder import sentence_embeddings

    images, targets = next(scene_batches(2, seed=0, workers=0))
    sent = sentence_embeddings([CLASS_NAMES[c] for c in TASKS["source"].vocab])
    torch.manual_seed(0)
    model = EmbeddedSFM().train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, parts = train_step(model, opt, images, targets, grid_layout(16), sent, "bf16")
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts, not weights
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    cpu = torch.device("cpu")
    with precision_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision_context(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
