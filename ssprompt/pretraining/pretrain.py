"""Pretrain the embedded SFM on the source corpus (``ssprompt pretrain``).

Hungarian-matched class + mask BCE + dice losses on every decoder layer, AdamW with warm-up and
cosine decay over a wall-clock budget, an EMA of the weights (what is saved), a fresh composed
scene for every sample, geometric and mild photometric augmentation, and a point layout of random
size jittered within its cells so that the SFM answers to any N.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.scenes import CLASS_NAMES, TASKS, make_scene
from ..sfm.losses import set_loss
from ..prompts.layout import jittered_layout
from ..sfm.embedded import EmbeddedSFM

N_CHOICES = (36, 64, 100, 100, 144)
FIRST_SCENE = 10_000  # pretraining scenes are source/train scenes from here on: fresh every step,
#                       clear of the k-shot pool and the val scenes (indices < 1,100)


def fresh_scenes(step: int, batch: int, seed: int) -> list[tuple]:
    """The ``batch`` scenes of ``step``: new ones every step (an endless corpus, ~1 ms each),
    reproducible from the seed. (image uint8 HxWx3, instance int32 HxW, [(segment id, class)])."""
    first = FIRST_SCENE + (seed * 100_000_000) + step * batch
    out = []
    for i in range(first, first + batch):
        s = make_scene(TASKS["source"], "train", i)
        out.append((s.image, s.instance, [(seg["id"], seg["category"]) for seg in s.segments]))
    return out


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


def warp(images: torch.Tensor, instances: torch.Tensor, g: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation (+-15 deg), scale (0.85-1.2) and shift (+-6%) of images (B, 3, H, W)
    and their instance maps (B, H, W) alike (nearest for ids; reflected borders), so that the
    SFM sees its few thousand items in more poses than the item sources hold."""
    import torch.nn.functional as F

    b = images.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    angle = (r(b) - 0.5) * (2 * math.pi * 15 / 180)
    scale = 0.85 + 0.35 * r(b)
    flip = torch.where(r(b) < 0.5, -1.0, 1.0)
    shift = (r(b, 2) - 0.5) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)
    inst = F.grid_sample(instances[:, None].float(), grid, mode="nearest",
                         padding_mode="reflection", align_corners=False)[:, 0].round().long()
    return images, inst


def batch_targets(scenes, g: torch.Generator):
    """Images (B, 3, H, W) in [0, 1], warped, and per image (labels, masks) of the segments
    that stay visible."""
    imgs = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _, _ in scenes])
    inst = torch.stack([torch.from_numpy(ins).long() for _, ins, _ in scenes])
    imgs, inst = warp(imgs, inst, g)
    targets = []
    for k, (_, _, segs) in enumerate(scenes):
        ids = torch.tensor([s for s, _ in segs], dtype=torch.long)
        masks = inst[k][None] == ids.view(-1, 1, 1)
        keep = masks.flatten(1).sum(1) >= 8
        labels = torch.tensor([c for _, c in segs], dtype=torch.long)
        targets.append((labels[keep], masks[keep]))
    return imgs, targets


class SceneStream(torch.utils.data.IterableDataset):
    """Endless pretraining batches (images (B, 3, H, W) warped and jittered, per-image targets),
    the same sequence for a seed whether made in the training process or in a worker: its own
    generator, independent of the one that draws point layouts."""

    def __init__(self, batch: int, seed: int):
        self.batch, self.seed = batch, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1)
        step = 0
        while True:
            images, targets = batch_targets(fresh_scenes(step, self.batch, self.seed), g)
            yield augment(images, g), targets
            step += 1


def scene_batches(batch: int, seed: int, workers: int | None):
    """An iterator over SceneStream batches, composed in ``workers`` background processes
    (default: 0 on CPU, where a worker only competes for the same cores (measured: 354 steps
    against 406 in 90 s on 2 cores), 2 on CUDA, where it keeps the GPU fed). Either way the
    batches are the same."""
    stream = SceneStream(batch, seed)
    if not workers:
        return iter(stream)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                            prefetch_factor=4, persistent_workers=True))


def precision_context(device: torch.device, precision: str):
    """Mixed precision for pretraining. ``bf16``: autocast to bfloat16 on CPU as on CUDA, and on
    CPU the plain-math attention kernel. Measured on this 2-core AMD EPYC (avx512_bf16), batch 16,
    N = 100, model compute per step: fp32 316 ms; bf16 230 ms; bf16 + math attention 205 ms (the
    fused CPU attention's backward alone took 55 ms at these tiny sequence lengths). A CPU
    without native bf16 should use ``fp32``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision {precision!r}: choose bf16 or fp32")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def train_step(model: EmbeddedSFM, opt: torch.optim.Optimizer, images: torch.Tensor,
               targets: list, points: torch.Tensor, sentences: torch.Tensor,
               precision: str = "bf16") -> tuple[torch.Tensor, dict]:
    """One optimiser step on a batch: every decoder layer's set loss, clipped gradients."""
    with precision_context(images.device, precision):
        spatial = model.encode_points(points.to(images.device))
        semantic = model.text_encoder.embed_sentences(sentences)
        outputs = model.decode(model.encode_image(images), spatial, semantic, aux=True)
    loss, parts = set_loss(outputs, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss, parts


# Where ``ssprompt pretrain`` writes unless told otherwise: never the packaged weights
# (ssprompt/weights/), which a run overwrites every 1,000 steps only when named explicitly.
DEFAULT_OUT = Path("runs") / "pretrain"


def pretrain(out: Path = DEFAULT_OUT, minutes: float = 58.0, steps: int = 100_000,
             batch: int = 16, lr: float = 5e-4, seed: int = 0, log_every: int = 50,
             init_from: Path | None = None, warmup: int = 200, device: str = "auto",
             precision: str = "bf16", workers: int | None = None) -> dict:
    """Pretrain for ``minutes`` of wall time (or ``steps``); ``init_from`` continues from saved
    weights (a second stage with a fresh schedule)."""
    from ..sfm import resolve_device

    dev = resolve_device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = EmbeddedSFM()
    if init_from is not None:
        from ..sfm.embedded import load_embedded
        model.load_state_dict(load_embedded(init_from).state_dict())
        for p in model.parameters():
            p.requires_grad_(True)
    model.to(dev).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    ema_float = [v for v in ema.state_dict().values() if v.is_floating_point()]
    live_float = [v for v in model.state_dict().values() if v.is_floating_point()]
    names = [CLASS_NAMES[c] for c in TASKS["source"].vocab]
    from ..sfm.modeling.text_encoder import sentence_embeddings
    sent = sentence_embeddings(names).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    budget = minutes * 60 - (time.time() - t0)
    log = []
    batches = scene_batches(batch, seed, (2 if dev.type == "cuda" else 0)
                            if workers is None else workers)
    start = time.time()
    # the wall-clock budget usually ends the run: the bar counts steps and shows minutes left
    bar = tqdm(total=steps if steps < 100_000 else None, desc="pretraining", unit="step")
    step = 0
    while step < steps and time.time() - start < budget:
        frac = min(1.0, max((time.time() - start) / budget, step / steps))
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        images, targets = next(batches)
        images = images.to(dev)
        targets = [(lab.to(dev), m.to(dev)) for lab, m in targets]
        n = N_CHOICES[int(torch.randint(len(N_CHOICES), (1,), generator=g))]
        loss, parts = train_step(model, opt, images, targets, jittered_layout(n, g), sent,
                                 precision)
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():  # the model has no integer buffers: every entry is averaged
            torch._foreach_lerp_(ema_float, live_float, 1 - d)
        step += 1
        bar.update(1)
        row = {"step": step, "seconds": round(time.time() - start, 1),
               "loss": float(loss.detach()), **{k: round(v, 4) for k, v in parts.items()}, "n": n}
        if step % log_every == 0:
            log.append(row)
            left = max(0.0, budget - (time.time() - start)) / 60
            bar.set_postfix(loss=f"{row['loss']:.3f}", left=f"{left:.0f} min")
        if step % 1000 == 0:
            ema.save(out / "embedded_sfm.safetensors")
    bar.close()
    if step and (not log or log[-1]["step"] != step):
        log.append(row)
    digest = ema.save(out / "embedded_sfm.safetensors")
    with open(out / "pretrain_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log[0]))
        w.writeheader()
        w.writerows(log)
    info = {"steps": step, "batch": batch, "lr": lr, "seed": seed, "precision": precision,
            "device": str(dev), "cpu_threads": torch.get_num_threads(),
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
