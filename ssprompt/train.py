"""Few-shot prompt learning on a frozen SFM: one readable loop.

Only prompt parameters train; every SFM parameter is frozen and in eval mode. Image features of
the k training images come from the feature cache, so the image encoder runs once per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .distributed import all_reduce_mean_, rank_world
from .errors import UserError
from .features import FeatureCache
from .losses import set_loss
from .prompts.promptset import PromptSet
from .sfm.base import PromptableSFM


class NonFiniteLoss(UserError):
    """Training diverged: the loss became NaN or infinite."""


@dataclass
class TrainConfig:
    steps: int = 150
    lr: float = 5e-3
    weight_decay: float = 0.05
    batch: int = 8
    warmup: int = 10
    seed: int = 0
    log_every: int = 10


def train_prompts(sfm: PromptableSFM, prompts: PromptSet, dataset, cfg: TrainConfig,
                  cache: FeatureCache | None = None, progress: bool = False) -> list[dict]:
    """Optimise ``prompts`` on every scene of ``dataset``; returns the loss log."""
    params = prompts.trainable()
    if not params:
        return []
    cache = cache if cache is not None else FeatureCache()
    scenes = [dataset[i] for i in range(len(dataset))]
    feats = cache.get(sfm, [s.image for s in scenes])
    device = next(iter(feats.tensors.values())).device
    targets = []
    for s in scenes:
        labels, masks = s.targets()
        targets.append((torch.from_numpy(labels).to(device), torch.from_numpy(masks).to(device)))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch, len(scenes))
    log: list[dict] = []
    order: list[int] = []
    for step in tqdm(range(cfg.steps), desc="prompt learning", disable=not progress, leave=False):
        lr_scale = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale
        if len(order) < batch:
            order += torch.randperm(len(scenes), generator=g).tolist()
        idx, order = order[:batch], order[batch:]
        rank, world = rank_world()
        idx = idx[rank::world] or idx[:1]  # torchrun: each rank takes its share of the batch
        spatial, semantic = prompts()
        out = sfm.decode(feats.index(idx), spatial, semantic)
        loss, parts = set_loss(out, [targets[i] for i in idx])
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"step {step}: loss is {float(loss)}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_mean_(params)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.append({"step": step, "loss": round(float(loss.detach()), 5),
                        **{k: round(v, 5) for k, v in parts.items()}})
    return log
