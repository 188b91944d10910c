"""Pretrain the embedded SFM on the source corpus (``ssprompt pretrain``).

Hungarian-matched class + mask BCE + dice losses on every decoder layer, AdamW with warm-up and
cosine decay, an EMA of the weights (what is saved), mild photometric augmentation, and a point
layout of random size jittered within its cells so that the SFM answers to any N.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import torch
from tqdm import tqdm

from .data.scenes import TASKS, CLASS_NAMES, make_scene
from .losses import set_loss
from .prompts.layout import jittered_layout
from .sfm.embedded import EmbeddedSFM

N_CHOICES = (36, 64, 100, 100, 144)


def _scene_arrays(i: int):
    s = make_scene(TASKS["source"], "train", i)
    return s.image, s.instance, [(seg["id"], seg["category"]) for seg in s.segments]


def build_pool(n: int, workers: int = 2):
    with Pool(workers) as p:
        return list(tqdm(p.imap(_scene_arrays, range(n), chunksize=32), total=n,
                         desc="composing source scenes"))


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild photometric jitter (B, 3, H, W) in [0, 1]: gain, contrast, colour, noise."""
    b = images.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    x = images * (0.55 + 0.8 * r(b, 1, 1, 1))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.6 + 0.7 * r(b, 1, 1, 1)) + mean
    x = x * (0.8 + 0.4 * r(b, 3, 1, 1))
    x = x + torch.randn(x.shape, generator=g) * 0.06 * r(b, 1, 1, 1)
    return x.clamp(0, 1)


def batch_targets(pool, idx, flips):
    imgs, targets = [], []
    for i, f in zip(idx, flips):
        image, inst, segs = pool[i]
        img = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        inst_t = torch.from_numpy(inst)
        if f:
            img, inst_t = img.flip(-1), inst_t.flip(-1)
        labels = torch.tensor([c for _, c in segs], dtype=torch.long)
        masks = inst_t[None] == torch.tensor([s for s, _ in segs]).view(-1, 1, 1)
        imgs.append(img)
        targets.append((labels, masks))
    return torch.stack(imgs), targets


def pretrain(out: Path, minutes: float = 40.0, steps: int = 100_000, batch: int = 16,
             lr: float = 5e-4, pool_size: int = 6000, seed: int = 0, log_every: int = 50,
             init_from: Path | None = None, warmup: int = 200) -> dict:
    """Pretrain for ``minutes`` of wall time (or ``steps``); ``init_from`` continues from saved
    weights (a second stage with a fresh schedule)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pool = build_pool(pool_size)
    model = EmbeddedSFM()
    if init_from is not None:
        from .sfm.embedded import load_embedded
        model.load_state_dict(load_embedded(init_from).state_dict())
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    names = [CLASS_NAMES[c] for c in TASKS["source"].vocab]
    from .sfm.modeling.text_encoder import sentence_embeddings
    sent = sentence_embeddings(names)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    budget = minutes * 60 - (time.time() - t0)
    log = []
    start = time.time()
    bar = tqdm(total=steps, desc="pretraining")
    step = 0
    while step < steps and time.time() - start < budget:
        frac = min(1.0, (time.time() - start) / budget)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        idx = torch.randint(len(pool), (batch,), generator=g).tolist()
        flips = (torch.rand(batch, generator=g) < 0.5).tolist()
        images, targets = batch_targets(pool, idx, flips)
        images = augment(images, g)
        n = N_CHOICES[int(torch.randint(len(N_CHOICES), (1,), generator=g))]
        spatial = model.encode_points(jittered_layout(n, g))
        semantic = model.text_encoder.embed_sentences(sent)
        outputs = model.decode(model.encode_image(images), spatial, semantic, aux=True)
        loss, parts = set_loss(outputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
                if pe.is_floating_point():
                    pe.mul_(d).add_(pm, alpha=1 - d)
                else:
                    pe.copy_(pm)
        step += 1
        bar.update(1)
        if step % log_every == 0:
            row = {"step": step, "seconds": round(time.time() - start, 1), "loss": float(loss),
                   **{k: round(v, 4) for k, v in parts.items()}, "n": n}
            log.append(row)
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if step % 1000 == 0:
            ema.save(out / "embedded_sfm.safetensors")
    bar.close()
    digest = ema.save(out / "embedded_sfm.safetensors")
    with open(out / "pretrain_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log[0]))
        w.writeheader()
        w.writerows(log)
    info = {"steps": step, "batch": batch, "lr": lr, "pool_size": pool_size, "seed": seed,
            "init_from": str(init_from) if init_from else None,
            "minutes": round((time.time() - t0) / 60, 1), "weights_sha256_16": digest,
            "images_seen": step * batch}
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2))
    _plot(log, out / "pretrain_loss.png")
    return info


def _plot(log: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("step")
    ax.set_ylabel("set loss (all decoder layers)")
    ax.set_yscale("log")
    ax.set_title("embedded SFM pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
