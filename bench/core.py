"""Measurement helpers of the benchmark; a module of their own so that spawned workers can
import them."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _setup(n: int = 100, n_classes: int | None = None, batch: int = 8):
    from ssprompt.data.scenes import SceneSplit
    from ssprompt.sfm.features import FeatureCache
    from ssprompt.geometry import to_batch
    from ssprompt.sfm.losses import set_loss
    from ssprompt.prompts.promptset import PromptConfig, PromptSet
    from ssprompt.sfm import load_sfm

    sfm = load_sfm("embedded", device="cpu")
    data = SceneSplit("shift", "train", shots=16, seed=0)
    scenes = [data[i] for i in range(batch)]
    names = data.class_names
    targets = []
    for s in scenes:
        labels, masks = s.targets(sfm.image_size)
        targets.append((torch.from_numpy(labels), torch.from_numpy(masks)))
    if n_classes is not None:  # C synthetic class prompts; labels folded into range(C)
        names = [f"class number {i}" for i in range(n_classes)]
        targets = [(lab % n_classes, m) for lab, m in targets]
    prompts = PromptSet(sfm, names, PromptConfig("weighted", n_prompts=n),
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(prompts.trainable(), lr=1e-3)
    cache = FeatureCache()
    feats = cache.get(sfm, [s.image for s in scenes])
    images = to_batch([s.image for s in scenes], sfm.image_size)

    def step(recompute: bool = False):
        f = sfm.encode_image(images) if recompute else feats
        sp, se = prompts()
        loss, _ = set_loss(sfm.decode(f, sp, se), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return sfm, prompts, step


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, value: int, repeats: int, q) -> None:
    torch.set_num_threads(2)
    if kind == "n":
        _, _, step = _setup(n=value)
    else:
        _, _, step = _setup(n_classes=value)
    base = _peak_mb()
    t = _median_time(step, repeats)
    q.put({"step_s": t, "peak_mb": _peak_mb(), "baseline_mb": base})




def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's practical fp32 peak: the FLOP/s of a large ``torch.mm`` (2 n^3 FLOPs), the
    best BLAS case, with the threads the benchmark uses."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _median_time(lambda: torch.mm(a, b), repeats, warmup=1)
    return 2 * n ** 3 / t


def step_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward + backward), as torch's ``FlopCounterMode`` counts
    them: matmuls, convolutions, attention and einsums; element-wise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()
