"""Speed and memory of the transformers backends (SAM 3, SAM 2), random weights.

``bench_backends(quick)`` builds each model from its configuration (no download, no checkpoint),
then times, per backend: the image encoder, one prompt-learning step (fused prompts -> decode ->
set loss -> backward -> AdamW) on cached features vs with the encoder recomputed, and the step
with N = 25 / 50 / 100 / 200 prompts and (SAM 3) C = 10 / 150 classes, with the peak memory the
step adds (CUDA: max allocated; CPU: peak RSS above the step's start, sampled every 2 ms).

``quick=False`` uses the real configurations (SAM 3: ``Sam3Config()``, 1008 px, ViT-L/14 32
layers, 200 queries; SAM 2: hiera-base-plus, 1024 px) and is meant for a GPU. ``quick=True``
keeps the prompt-side modules at their real width (D = 256, SAM 3's 200 queries and mask
decoder, SAM 2's prompt encoder and mask decoder) but shrinks the image encoders, SAM 3's DETR
depth and the feature-map size: SAM 3 at 112 px with 2 ViT layers and 1 + 1 DETR layers, SAM 2
at 256 px with 8 Hiera blocks, one image per step, one CPU thread (on a shared 2-core CPU two
threads wait on each other at every op); it says so in ``size``. Random weights are fine for
timing, not for accuracy.

``sam3_real_flops()`` (``python -m bench.backends --flops``; part of the full run) counts SAM 3's
FLOPs at its real size, which a CPU cannot time: the image encoder per image, and one detector +
mask-decoder pass per (image, concept) pair, the unit a SAM 3 prompt-learning step repeats
images x C times.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

N_VALUES = (25, 50, 100, 200)
C_VALUES = (10, 150)
TEXT_TOKENS = 6   # valid tokens of each random class prompt (SAM 3 pads names to 32)


# -- configurations ----------------------------------------------------------------------------
def sam3_config(quick: bool):
    from transformers import Sam3Config

    if not quick:
        return Sam3Config(), "real: Sam3Config() (1008 px, ViT-L/14 x 32, 200 queries)"
    size, layers, detr = 112, 2, 1
    t = size // 14
    cfg = Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", image_size=size,
                                 num_hidden_layers=layers, global_attn_indexes=[layers - 1],
                                 window_size=t),
            backbone_feature_sizes=[[4 * t, 4 * t], [2 * t, 2 * t], [t, t]]),
        text_config=dict(num_hidden_layers=1), detr_encoder_config=dict(num_layers=detr),
        detr_decoder_config=dict(num_layers=detr), geometry_encoder_config=dict(num_layers=1))
    return cfg, (f"reduced: {size} px (real 1008), {layers} ViT layers (real 32), DETR "
                 f"{detr}+{detr} layers (real 6+6), text encoder 1 layer (not in the step); "
                 "D 256, 200 queries, mask decoder as real; 1 CPU thread")


def sam2_config(quick: bool):
    from transformers import Sam2Config

    size = 256 if quick else 1024
    hiera = dict(model_type="sam2_hiera_det_model", hidden_size=112, num_attention_heads=2,
                 image_size=[size, size], embed_dim_per_stage=[112, 224, 448, 896],
                 num_attention_heads_per_stage=[2, 4, 8, 16],
                 window_size_per_stage=[8, 4, 14, 7],
                 window_positional_embedding_background_size=[14, 14])
    if quick:
        hiera.update(blocks_per_stage=[1, 2, 4, 1], global_attention_blocks=[5])
    else:
        hiera.update(blocks_per_stage=[2, 3, 16, 3], global_attention_blocks=[12, 16, 20])
    s = size // 4
    cfg = Sam2Config(
        vision_config=dict(model_type="sam2_vision_model", backbone_config=hiera,
                           backbone_channel_list=[896, 448, 224, 112],
                           backbone_feature_sizes=[[s, s], [s // 2, s // 2], [s // 4, s // 4]]),
        prompt_encoder_config=dict(image_size=size))
    note = ("real: hiera-base-plus (1024 px, 24 blocks)" if not quick else
            f"reduced: {size} px (real 1024), 8 Hiera blocks (real 24); prompt encoder and mask "
            "decoder as real; 1 CPU thread")
    return cfg, note


def build(kind: str, quick: bool, device):
    """A frozen backend with random weights: (sfm, size note)."""
    from ssprompt.sfm.base import freeze

    torch.manual_seed(0)
    if kind == "sam3":
        from transformers import Sam3Model

        from ssprompt.sfm.sam3 import Sam3SFM

        cfg, note = sam3_config(quick)
        return freeze(Sam3SFM(Sam3Model(cfg).eval(), tokenizer=None).to(device)), note
    from transformers import Sam2Model

    from ssprompt.sfm.sam2 import Sam2SFM

    cfg, note = sam2_config(quick)
    return freeze(Sam2SFM(Sam2Model(cfg).eval()).to(device)), note


# -- measuring ---------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory added inside the block, in MB (CUDA: allocator; CPU: sampled RSS)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap back to the OS first, so the RSS baseline is what is in use
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self.peak = self._rss()
        self.stop = threading.Event()

        def poll():
            while not self.stop.wait(0.002):
                self.peak = max(self.peak, self._rss())

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mb = (max(self.peak, self._rss()) - self.base) / 2**20


def _timed(fn, repeats: int, device) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _targets(b: int, size: int, classes: int, device) -> list:
    """Three random rectangles per image with random classes."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(b):
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for k in range(3):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            masks[k, y0:y0 + size // 3, x0:x0 + size // 3] = True
        out.append((torch.randint(0, classes, (3,), generator=g).to(device), masks.to(device)))
    return out


def _prompts(sfm, kind: str, n: int, c: int, device):
    from ssprompt.prompts.fusion import FusedPrompt
    from ssprompt.prompts.layout import grid_layout

    with torch.no_grad():
        spatial = FusedPrompt(sfm.encode_points(grid_layout(n).to(device)).float(), "weighted")
    semantic = None
    if kind == "sam3":
        g = torch.Generator().manual_seed(1)
        text = torch.zeros(c, sfm.text_len, sfm.text_hidden)
        text[:, :TEXT_TOKENS] = torch.randn(c, TEXT_TOKENS, sfm.text_hidden, generator=g)
        semantic = FusedPrompt(text.flatten(1).to(device), "weighted")
    return torch.nn.ModuleList([m for m in (spatial, semantic) if m is not None])


def _step_fn(sfm, kind: str, feats_fn, n: int, c: int, b: int, device):
    """A closure doing one prompt-learning step; ``feats_fn()`` gives the image features."""
    from ssprompt.sfm.losses import set_loss
    from ssprompt.sfm.base import autocast

    prompts = _prompts(sfm, kind, n, c, device)
    opt = torch.optim.AdamW(prompts.parameters(), lr=1e-3)
    targets = _targets(b, sfm.image_size, c if kind == "sam3" else 1, device)

    def step():
        feats = feats_fn()
        with autocast(device):
            out = sfm.decode(feats, prompts[0](), prompts[1]() if kind == "sam3" else None)
        loss, _ = set_loss(out, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_backend(kind: str, quick: bool, device="cpu") -> dict:
    sfm, note = build(kind, quick, device)
    b = 1 if quick else 2
    repeats = 1 if quick else 5
    images = torch.rand(b, 3, sfm.image_size, sfm.image_size, device=device)
    res: dict = {"size": note, "batch_images": b, "repeats": repeats,
                 "params_m": round(sum(p.numel() for p in sfm.parameters()) / 1e6, 1)}
    sfm.encode_image(images)                                   # warm-up
    res["encoder_ms"] = 1e3 * _timed(lambda: sfm.encode_image(images), repeats, device)
    feats = sfm.encode_image(images)
    c0 = 10 if kind == "sam3" else 1
    cached = _step_fn(sfm, kind, lambda: feats, 100, c0, b, device)
    recompute = _step_fn(sfm, kind, lambda: sfm.encode_image(images), 100, c0, b, device)
    cached()                                                   # warm-up
    res["step_cached_ms"] = 1e3 * _timed(cached, repeats, device)
    res["step_recomputed_ms"] = 1e3 * _timed(recompute, repeats, device)
    res["cache_speedup"] = res["step_recomputed_ms"] / res["step_cached_ms"]
    for n in N_VALUES:
        step = _step_fn(sfm, kind, lambda: feats, n, c0, b, device)
        with PeakMemory(device) as mem:
            res[f"step_N{n}_ms"] = 1e3 * _timed(step, repeats, device)
        res[f"step_N{n}_peak_mb"] = mem.mb
    if kind == "sam3":
        for c in C_VALUES:
            step = _step_fn(sfm, kind, lambda: feats, 100, c, b, device)
            with PeakMemory(device) as mem:
                res[f"step_C{c}_ms"] = 1e3 * _timed(step, repeats, device)
            res[f"step_C{c}_peak_mb"] = mem.mb
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}


def sam3_real_flops(n_values=(25, 200), device="cpu") -> dict:
    """FLOPs of SAM 3 at its REAL configuration (``Sam3Config()``, 1008 px), counted with
    ``torch.utils.flop_counter``: the image encoder per image (on the meta device: nothing is
    computed) and one no-grad detector + mask-decoder pass per (image, concept) pair for N
    queries (on random features; ~15 s each on one CPU thread, ~3.5 GB of weights)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Sam3Config, Sam3Model

    from ssprompt.sfm.base import freeze
    from ssprompt.sfm.sam3 import Sam3SFM

    res = {}
    with torch.device("meta"):
        meta = freeze(Sam3SFM(Sam3Model(Sam3Config()).eval(), tokenizer=None))
    with FlopCounterMode(display=False) as fc:
        meta.encode_image(torch.zeros(1, 3, meta.image_size, meta.image_size, device="meta"))
    res["encoder_tflop_per_image"] = fc.get_total_flops() / 1e12
    cfg = Sam3Config()
    cfg.vision_config.backbone_config.num_hidden_layers = 1   # the encoder is not run below
    cfg.text_config.num_hidden_layers = 1
    torch.manual_seed(0)
    sfm = freeze(Sam3SFM(Sam3Model(cfg).eval(), tokenizer=None).to(device))
    side = [4 * sfm.image_size // 14, 2 * sfm.image_size // 14, sfm.image_size // 14]
    vision = [torch.randn(1, sfm.hidden, s, s, device=device) for s in side]
    text = torch.randn(1, 1, sfm.text_len, sfm.text_hidden, device=device)
    valid = torch.zeros(1, 1, sfm.text_len, dtype=torch.bool, device=device)
    valid[..., :TEXT_TOKENS] = True
    for n in n_values:
        q = sfm.queries()[torch.arange(n, device=device) % sfm.num_queries]
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            sfm._decode_group(vision, q, text, valid)
        res[f"decode_tflop_per_image_concept_N{n}"] = fc.get_total_flops() / 1e12
    return {k: round(v, 3) for k, v in res.items()}


def bench_backends(quick: bool) -> dict:
    """Per backend (sam3, sam2): plain numbers (ms, MB, ratios) and a ``size`` note saying
    whether the configuration is real or reduced; ``device`` says where it ran."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if quick and device == "cpu":
        torch.set_num_threads(1)  # on a shared 2-core CPU, 2 threads wait on each other per op
    t = time.perf_counter()
    try:
        out = {kind: bench_backend(kind, quick, device) for kind in ("sam3", "sam2")}
    finally:
        torch.set_num_threads(threads)
    if not quick:
        out["sam3_real_flops"] = sam3_real_flops(device=device)
    out["device"] = device if device == "cpu" else torch.cuda.get_device_name()
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


if __name__ == "__main__":
    import json
    import sys

    if "--flops" in sys.argv:
        print(json.dumps(sam3_real_flops(), indent=1))
    else:
        print(json.dumps(bench_backends(quick="--full" not in sys.argv), indent=1))
